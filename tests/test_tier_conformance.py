"""One conformance suite for every :class:`~tierckpt.tiers.base.Tier` backend.

The same tests run against a directory on tmpfs (the memory tier's shape), a directory on
disk (the ``file://`` durable tier) and S3 (moto on loopback). A backend passes only if it
behaves like the others.
"""

from __future__ import annotations

import array
import os
import pickle
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fixtures_s3 import S3Server
from tierckpt.errors import CheckpointNotFoundError
from tierckpt.tiers.base import Buffer, KeyNotFoundError, Tier
from tierckpt.tiers.directory import DirectoryTier
from tierckpt.tiers.s3 import S3Tier

MiB = 2**20
PART = 5 * MiB


@pytest.fixture(params=["shm", "disk", "s3"])
def tier(request: pytest.FixtureRequest, tmp_path: object) -> Iterator[Tier]:
    """A fresh, empty tier of each kind."""
    if request.param == "shm":
        if not os.path.isdir("/dev/shm"):
            pytest.skip("no /dev/shm on this host")
        root = f"/dev/shm/tierckpt-test-{uuid.uuid4().hex}"
        try:
            t = DirectoryTier(root, name="memory")
            t.ensure_root()
            yield t
        finally:
            shutil.rmtree(root, ignore_errors=True)
    elif request.param == "disk":
        t = DirectoryTier(str(tmp_path), name="durable")
        t.ensure_root()
        yield t
    else:
        server: S3Server = request.getfixturevalue("s3_server")
        bucket: str = request.getfixturevalue("s3_bucket")
        s3 = S3Tier(
            f"s3://{bucket}/ns/root",
            endpoint_url=server.endpoint_url,
            part_size=PART,
            max_concurrency=4,
            max_retries=2,
            timeout_s=20,
        )
        s3.check_available()
        try:
            yield s3
        finally:
            s3.close()


def _blob(n: int, seed: int = 0) -> bytes:
    return (bytes(range(seed % 251, 251)) + bytes(range(seed % 251))) * (n // 251) + bytes(n % 251)


def test_is_a_tier(tier: Tier) -> None:
    assert isinstance(tier, Tier)
    assert tier.name in ("memory", "durable")
    assert "://" in tier.url


def test_round_trip_multi_chunk(tier: Tier) -> None:
    floats = array.array("f", [1.5, -2.0, 3.25])
    chunks: list[Buffer] = [
        b"ab",
        bytearray(b"cd"),
        memoryview(b"xxefxx")[2:4],
        memoryview(floats),  # not bytes: format "f"
    ]
    n = tier.write("a/b/blob", chunks)
    expected = b"abcdef" + floats.tobytes()
    assert n == len(expected)
    assert bytes(tier.read("a/b/blob")) == expected
    assert tier.list("a") == {"b/blob": len(expected)}


def test_generator_chunks_and_reused_buffer(tier: Tier) -> None:
    buf = bytearray(MiB)

    def gen() -> Iterator[bytearray]:
        for i in range(7):  # 7 MiB > one 5 MiB part: multipart on S3
            buf[:] = bytes([i]) * MiB  # the same buffer, refilled between yields
            yield buf

    assert tier.write("reuse", gen()) == 7 * MiB
    assert bytes(tier.read("reuse")) == b"".join(bytes([i]) * MiB for i in range(7))


@pytest.mark.parametrize("chunks", [[], [b""], [b"", b""]], ids=["none", "one-empty", "two-empty"])
def test_empty_blob(tier: Tier, chunks: list[bytes]) -> None:
    assert tier.write("empty", chunks) == 0
    assert bytes(tier.read("empty")) == b""
    assert tier.list("") == {"empty": 0}


def test_large_blob_multipart(tier: Tier) -> None:
    data = os.urandom(12 * MiB + 12345)  # 3 parts of 5 MiB on S3
    n = tier.write("big/blob", (memoryview(data)[i : i + MiB] for i in range(0, len(data), MiB)))
    assert n == len(data)
    assert tier.list("big") == {"blob": len(data)}
    got = tier.read("big/blob")
    assert len(got) == len(data)
    assert bytes(got) == data
    # Ranges that cross part boundaries.
    assert bytes(tier.read("big/blob", PART - 10, 20)) == data[PART - 10 : PART + 10]
    assert bytes(tier.read("big/blob", 3, 2 * PART + 7)) == data[3 : 3 + 2 * PART + 7]
    assert bytes(tier.read("big/blob", PART + 1)) == data[PART + 1 :]


def test_ranged_reads(tier: Tier) -> None:
    data = _blob(1000, seed=7)
    tier.write("r", [data])
    assert bytes(tier.read("r", 0, 10)) == data[:10]
    assert bytes(tier.read("r", 990, 10)) == data[990:]
    assert bytes(tier.read("r", 123, 456)) == data[123:579]
    assert bytes(tier.read("r", 500)) == data[500:]
    assert bytes(tier.read("r", 999)) == data[999:]
    assert bytes(tier.read("r", 1000)) == b""
    assert bytes(tier.read("r", 10, 0)) == b""
    assert bytes(tier.read("r", 0, 1000)) == data


@pytest.mark.parametrize(("offset", "length"), [(995, 10), (1000, 1), (2000, 5)])
def test_read_past_end_raises(tier: Tier, offset: int, length: int) -> None:
    tier.write("r", [_blob(1000)])
    with pytest.raises(KeyNotFoundError, match="shorter than expected"):
        tier.read("r", offset, length)


def test_missing_key(tier: Tier) -> None:
    with pytest.raises(KeyNotFoundError) as info:
        tier.read("no/such/key")
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, CheckpointNotFoundError)
    assert "no/such/key" in str(info.value)
    assert tier.url in str(info.value)
    with pytest.raises(KeyNotFoundError):
        tier.read("no/such/key", 5, 10)
    with pytest.raises(KeyNotFoundError):
        tier.read("no/such/key", 0, 0)


def test_list_and_list_dirs(tier: Tier) -> None:
    files = {"a/x": 1, "a/b/y": 2, "a/b/c/z": 3, "ab/w": 4, "top": 5}
    for key, n in files.items():
        tier.write(key, [b"." * n])
    assert tier.list("") == files
    assert tier.list("a") == {"x": 1, "b/y": 2, "b/c/z": 3}
    assert tier.list("a/") == tier.list("a")
    assert tier.list("a/b") == {"y": 2, "c/z": 3}
    assert tier.list("ab") == {"w": 4}
    assert tier.list("missing") == {}
    assert tier.list("a/x/not-a-dir") == {}
    assert tier.list_dirs("") == ["a", "ab"]
    assert tier.list_dirs("a") == ["b"]
    assert tier.list_dirs("a/b") == ["c"]
    assert tier.list_dirs("a/b/c") == []
    assert tier.list_dirs("missing") == []


def test_list_dirs_sorted(tier: Tier) -> None:
    names = ["step_10", "step_2", "step_1", "other"]
    for name in names:
        tier.write(f"ns/{name}/data", [b"1"])
    assert tier.list_dirs("ns") == sorted(names)


def test_overwrite_replaces_whole(tier: Tier) -> None:
    tier.write("k", [b"x" * 100])
    tier.write("k", [b"short"])
    assert bytes(tier.read("k")) == b"short"
    assert tier.list("") == {"k": 5}
    big = os.urandom(6 * MiB)
    tier.write("k", [big])
    tier.write("k", [b"tiny"])
    assert bytes(tier.read("k")) == b"tiny"


def test_failed_write_leaves_nothing_partial(tier: Tier) -> None:
    tier.write("k", [b"old"])

    class Boom(RuntimeError):
        pass

    def chunks() -> Iterator[bytes]:
        yield b"n" * (6 * MiB)  # past the first part: an upload is under way on S3
        yield b"n" * MiB
        raise Boom("source failed")

    with pytest.raises(Boom):
        tier.write("k", chunks())
    with pytest.raises(Boom):
        tier.write("fresh", chunks())
    assert bytes(tier.read("k")) == b"old"
    assert tier.list("") == {"k": 3}


def test_delete_idempotent(tier: Tier) -> None:
    tier.write("d/k", [b"1"])
    tier.delete("d/k")
    with pytest.raises(KeyNotFoundError):
        tier.read("d/k")
    tier.delete("d/k")
    tier.delete("never/was")
    assert tier.list("") == {}


def test_delete_prefix(tier: DirectoryTier | S3Tier) -> None:
    # Not part of the Tier protocol: a method of the concrete classes (tierckpt clear-memory).
    for key in ("a/x", "a/b/y", "a/b/c/z", "ab/w", "top"):
        tier.write(key, [b"1"])
    tier.delete_prefix("a")
    assert tier.list("") == {"ab/w": 1, "top": 1}  # "ab" is not under "a/"
    assert tier.list_dirs("") == ["ab"]
    tier.delete_prefix("a")
    tier.delete_prefix("missing")
    tier.delete_prefix("ab/")
    assert tier.list("") == {"top": 1}


def test_put_file(tier: Tier, tmp_path: object) -> None:
    src = os.path.join(str(tmp_path), "src.bin")
    data = os.urandom(6 * MiB + 3)  # two parts on S3
    with open(src, "wb") as f:
        f.write(data)
    assert tier.put_file("files/a.bin", src) == len(data)
    assert bytes(tier.read("files/a.bin")) == data
    empty = os.path.join(str(tmp_path), "empty.bin")
    open(empty, "wb").close()
    assert tier.put_file("files/empty.bin", empty) == 0
    assert bytes(tier.read("files/empty.bin")) == b""
    assert tier.list("files") == {"a.bin": len(data), "empty.bin": 0}
    with pytest.raises(FileNotFoundError):
        tier.put_file("files/none", os.path.join(str(tmp_path), "does-not-exist"))
    assert "none" not in tier.list("files")


@pytest.mark.parametrize("key", ["../escape", "/abs", "a/../b"])
def test_invalid_keys_rejected(tier: Tier, key: str) -> None:
    with pytest.raises(ValueError):
        tier.write(key, [b"x"])
    with pytest.raises(ValueError):
        tier.read(key)


# -- debris of a writer killed mid-upload (d17) ----------------------------------------------

_KILLED_WRITERS = """
import os, pickle, sys, threading
tier = pickle.loads(sys.stdin.buffer.read())
keys = sys.argv[1:]
handed_over = threading.Barrier(len(keys))
def chunks():
    for _ in range(11):  # 11 MiB: two full 5 MiB parts handed over, a multipart upload open
        yield bytes(2**20)
    if handed_over.wait() == 0:  # every write is under way: die now, mid-upload
        os.kill(os.getpid(), 9)
    threading.Event().wait()
for key in keys:
    threading.Thread(target=tier.write, args=(key, chunks()), daemon=True).start()
threading.Event().wait(60)
"""


def _kill_mid_writes(tier: Tier, *keys: str) -> None:
    """A real process writes each key and is SIGKILLed mid-way, leaving what it leaves."""
    src = str(Path(__file__).resolve().parents[1] / "src")
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_WRITERS, *keys],
        input=pickle.dumps(tier),
        env=env,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == -9, child.stderr.decode()


def _debris(tier: Tier) -> list[str]:
    """The keys whose unfinished uploads are in ``tier``, as the store shows them."""
    if isinstance(tier, DirectoryTier):
        out = []
        for dirpath, _dirs, files in os.walk(tier.root):
            rel = os.path.relpath(dirpath, tier.root)
            out += [f"{rel}/{f.split('.tmp-')[0]}" for f in files if ".tmp-" in f]
        return sorted(out)
    assert isinstance(tier, S3Tier)
    client = _boto3(tier)
    uploads = client.list_multipart_uploads(Bucket=tier.bucket).get("Uploads", [])
    return sorted(u["Key"][len(tier.prefix) + 1 :] for u in uploads)


def _boto3(tier: S3Tier) -> Any:
    import boto3

    return boto3.client("s3", endpoint_url=tier.endpoint_url, region_name="us-east-1")


def test_d17_discard_partial_removes_a_killed_writers_upload_under_the_prefix_only(
    tier: Tier,
) -> None:
    finished = {"s/step_1/a-r0.data": b"r0", "s/step_1/a-r0.manifest": b"m", "s/step_2/x": b"x"}
    for key, data in finished.items():
        tier.write(key, [data])
    _kill_mid_writes(tier, "s/step_1/a-r0.data", "s/step_1/a-r1.data", "s/step_2/y")
    assert _debris(tier) == ["s/step_1/a-r0.data", "s/step_1/a-r1.data", "s/step_2/y"]
    assert tier.list("s") == {"step_1/a-r0.data": 2, "step_1/a-r0.manifest": 1, "step_2/x": 1}
    discard = tier.discard_partial  # type: ignore[attr-defined]
    # A name prefix (one rank's files of one attempt), as resume passes it.
    assert discard("s/step_1/a-r0.") == 1
    assert _debris(tier) == ["s/step_1/a-r1.data", "s/step_2/y"]
    assert discard("s/step_1/") == 1
    assert discard("s/step_1/") == 0
    assert _debris(tier) == ["s/step_2/y"]
    assert tier.list("s") == {"step_1/a-r0.data": 2, "step_1/a-r0.manifest": 1, "step_2/x": 1}
    for key, data in finished.items():
        assert bytes(tier.read(key)) == data
    assert discard("s/") == 1
    assert _debris(tier) == []
