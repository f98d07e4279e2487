"""The tiers made safe (issue 7): durable ``file://`` writes reach the disk in order (d05),
debris of a killed upload can be discarded (d17), temporaries never collide across hosts.

The fsync order is observed two ways: the real system calls under ``strace`` (where it is
installed and ptrace is allowed), and, everywhere, a tracer that records each ``os.fsync`` /
``os.replace`` the tier makes, with the path behind every file descriptor, before letting
the real call through.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures_s3 import S3Server
from tierckpt.tiers.directory import DirectoryTier
from tierckpt.tiers.memory import MemoryTier
from tierckpt.tiers.s3 import S3Tier, uploads

SRC = str(Path(__file__).resolve().parents[1] / "src")

Event = tuple[str, str, str]
"""``(kind, path, target)``: ``("fsync", path, "")``, ``("rename", src, dst)`` or
``("commit", "", "")`` when the COMMIT write starts consuming its bytes."""


class Tracer:
    """Records the fsync / rename calls of this process, in order, then makes them."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.events: list[Event] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            self.events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"), ""))
            real_fsync(fd)

        def replace(src: str, dst: str) -> None:
            real_replace(src, dst)
            self.events.append(("rename", os.fspath(src), os.fspath(dst)))

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "replace", replace)

    def commit_chunks(self, data: bytes) -> Iterator[bytes]:
        """The COMMIT's chunks; marks the moment its write begins."""
        self.events.append(("commit", "", ""))
        yield data


def _write_step(tier: DirectoryTier, src_file: str, commit: Iterator[bytes]) -> None:
    """What a drain does: data via write and put_file, then the COMMIT, in a new step dir."""
    tier.write("ns/step_1/a.data", [b"a" * 1000, b"b" * 24])
    tier.put_file("ns/step_1/b.data", src_file)
    tier.write("ns/step_1/COMMIT", commit)


def _assert_synced_before_commit(events: list[Event], root: str) -> None:
    """Each data file: fsync of its temporary → rename → fsync of its directory → COMMIT.

    And each directory created for the step is fsynced into its parent before the COMMIT.
    """
    kinds = [e[0] for e in events]
    assert "commit" in kinds, events
    commit_at = kinds.index("commit")
    step_dir = os.path.join(root, "ns", "step_1")
    for name in ("a.data", "b.data"):
        final = os.path.join(step_dir, name)
        renames = [i for i, e in enumerate(events) if e[0] == "rename" and e[2] == final]
        assert renames, f"{name} was never renamed into place: {events}"
        r = renames[0]
        tmp = events[r][1]
        assert os.path.basename(tmp).startswith(name + ".tmp-"), tmp
        file_syncs = [i for i, e in enumerate(events) if e[0] == "fsync" and e[1] == tmp]
        assert file_syncs and file_syncs[0] < r, f"{name}: no fsync of {tmp} before its rename"
        dir_syncs = [
            i for i, e in enumerate(events) if e[0] == "fsync" and e[1] == step_dir and i > r
        ]
        assert dir_syncs, f"{name}: the directory {step_dir} is not fsynced after the rename"
        assert dir_syncs[0] < commit_at, f"{name}: the COMMIT write began before the dir fsync"
    for parent in (root, os.path.join(root, "ns")):  # they gained "ns" and "step_1"
        syncs = [i for i, e in enumerate(events) if e[0] == "fsync" and e[1] == parent]
        assert syncs and syncs[0] < commit_at, f"{parent} not fsynced before the COMMIT"


@pytest.fixture
def src_file(tmp_path: Path) -> str:
    path = tmp_path / "src.bin"
    path.write_bytes(os.urandom(3 * 2**20 + 5))
    return str(path)


def test_d05_a_durable_directory_tier_fsyncs_file_then_renames_then_fsyncs_dir_before_the_commit(
    tmp_path: Path, src_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = str(tmp_path / "durable")
    tier = DirectoryTier(root, name="durable")
    tier.ensure_root()
    tracer = Tracer(monkeypatch)
    _write_step(tier, src_file, tracer.commit_chunks(b"{}"))
    monkeypatch.undo()
    _assert_synced_before_commit(tracer.events, root)
    assert bytes(tier.read("ns/step_1/b.data")) == Path(src_file).read_bytes()
    assert tier.list("ns/step_1") == {"a.data": 1024, "b.data": 3 * 2**20 + 5, "COMMIT": 2}


def test_d05_the_memory_tier_on_tmpfs_skips_fsync(
    memory_root: str, src_file: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = MemoryTier(memory_root)
    tier.ensure_root()
    tracer = Tracer(monkeypatch)
    _write_step(tier, src_file, tracer.commit_chunks(b"{}"))
    monkeypatch.undo()
    assert [e for e in tracer.events if e[0] == "fsync"] == []
    assert [e[0] for e in tracer.events].count("rename") == 3  # still atomic
    assert tier.list("ns/step_1") == {"a.data": 1024, "b.data": 3 * 2**20 + 5, "COMMIT": 2}


_STRACE_SCRIPT = """
import sys
from tierckpt.tiers.directory import DirectoryTier
root, src = sys.argv[1], sys.argv[2]
tier = DirectoryTier(root, name="durable")
tier.ensure_root()
tier.write("ns/step_1/a.data", [b"a" * 1000, b"b" * 24])
tier.put_file("ns/step_1/b.data", src)
tier.write("ns/step_1/COMMIT", [b"{}"])
"""

_FSYNC = re.compile(r"^(?:\d+\s+)?f(?:data)?sync\(\d+<(?P<path>[^>]*)>\)\s+=\s+0")
_RENAME = re.compile(
    r"^(?:\d+\s+)?rename(?:at2?)?\((?:[^,]+,\s*)?\"(?P<src>[^\"]+)\",\s*(?:[^,\"]+,\s*)?"
    r"\"(?P<dst>[^\"]+)\".*=\s+0"
)
_OPEN = re.compile(r"^(?:\d+\s+)?openat\([^,]+,\s*\"(?P<path>[^\"]+)\",\s*(?P<flags>[^,)]+)")


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    res = subprocess.run(
        ["strace", "-qq", "-e", "trace=none", "true"], capture_output=True, check=False
    )
    return res.returncode == 0


@pytest.mark.skipif(not _strace_works(), reason="strace is not installed or ptrace is refused")
def test_d05_under_strace_the_real_syscalls_order_fsync_rename_dir_fsync_before_the_commit(
    tmp_path: Path, src_file: str
) -> None:
    root = str(tmp_path / "durable")
    trace = str(tmp_path / "trace.txt")
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = ["strace", "-f", "-qq", "-y", "-o", trace, "-e"]
    cmd += ["trace=openat,fsync,fdatasync,rename,renameat,renameat2"]
    cmd += [sys.executable, "-c", _STRACE_SCRIPT, root, src_file]
    subprocess.run(cmd, env=env, check=True, timeout=120)
    events: list[Event] = []
    for line in Path(trace).read_text().splitlines():
        if m := _FSYNC.match(line):
            events.append(("fsync", m["path"], ""))
        elif m := _RENAME.match(line):
            events.append(("rename", m["src"], m["dst"]))
        elif (m := _OPEN.match(line)) and "COMMIT" in m["path"] and "O_CREAT" in m["flags"]:
            events.append(("commit", "", ""))
    _assert_synced_before_commit(events, root)


# -- temporaries of one pid on two hosts; debris that is not ours ---------------------------


def test_d05_two_writers_with_one_pid_on_two_hosts_never_share_a_temporary(
    tmp_path: Path,
) -> None:
    # Two hosts sharing an NFS durable directory can run writers with the same pid; two
    # tiers in this one process are exactly that. Host A's write is under way when host B
    # writes the same key from start to end.
    root = str(tmp_path / "nfs")
    host_a, host_b = DirectoryTier(root, name="durable"), DirectoryTier(root, name="durable")
    host_a.ensure_root()
    seen: list[str] = []

    def a_chunks() -> Iterator[bytes]:
        yield b"A" * 4096
        seen.extend(os.listdir(os.path.join(root, "s")))
        host_b.write("s/blob", [b"B" * 10])
        yield b"A" * 4096

    host_a.write("s/blob", a_chunks())
    assert len(seen) == 1 and re.fullmatch(r"blob\.tmp-\d+-[0-9a-f]{16}", seen[0]), seen
    assert bytes(host_a.read("s/blob")) == b"A" * 8192  # the last whole write wins
    assert os.listdir(os.path.join(root, "s")) == ["blob"]


def test_d17_discard_partial_removes_only_temporaries_of_tierckpts_own_naming(
    tmp_path: Path,
) -> None:
    tier = DirectoryTier(str(tmp_path / "d"), name="durable")
    tier.write("s/step_1/a.data", [b"done"])
    step = os.path.join(tier.root, "s", "step_1")
    ours = ["a.data.tmp-123-0123456789abcdef", "b.data.tmp-77"]  # today's and the old naming
    foreign = ["notes.tmp-backup", "c.tmp-12-xyz", "d.tmp-", "user.txt"]
    for name in ours + foreign:
        Path(step, name).write_bytes(b"x")
    assert tier.discard_partial("s/step_1/") == 2
    assert sorted(os.listdir(step)) == sorted(["a.data", *foreign])
    assert bytes(tier.read("s/step_1/a.data")) == b"done"
    assert tier.discard_partial("s/missing/") == 0
    with pytest.raises(ValueError):
        tier.discard_partial("../elsewhere")


def test_d17_without_boto3_s3_discard_partial_aborts_nothing_and_names_the_lifecycle_rule(
    s3_server: S3Server,
    s3_bucket: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    client = s3_server.client()
    up = client.create_multipart_upload(Bucket=s3_bucket, Key="p/s/step_1/a.data")
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.setattr(uploads, "_warned_no_boto3", threading.Event())
    tier = S3Tier(f"s3://{s3_bucket}/p", endpoint_url=s3_server.endpoint_url)
    with caplog.at_level("WARNING", logger="tierckpt"):
        assert tier.discard_partial("s/step_1/") == 0
        assert tier.discard_partial("s/step_1/") == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "AbortIncompleteMultipartUpload" in warnings[0], warnings
    monkeypatch.undo()
    left = client.list_multipart_uploads(Bucket=s3_bucket).get("Uploads", [])
    assert [u["UploadId"] for u in left] == [up["UploadId"]]
    with pytest.raises(ValueError):
        tier.discard_partial("s/../x")
