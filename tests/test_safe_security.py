"""Trusted roots, verified unpickling, strict names, read-only commands, the seed's step error.

Defects of issue 7: d09 (memory root trust), d10 (nothing unpickled before its checksum
matches), d21 (namespace with a trailing newline), d22 (read-only commands create
./checkpoints), d23 (the seed-compat writer without a step).
"""

from __future__ import annotations

import builtins
import glob
import json
import logging
import os
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fixtures_dist import run_ranks
from tierckpt import (
    CheckpointConfig,
    ConfigError,
    IntegrityError,
    InvalidStepError,
    TieredStorageReader,
    TieredStorageWriter,
    UnsafeMemoryRootError,
    resume_pending,
)
from tierckpt.cli import main as cli
from tierckpt.compat.sagemaker import SageMakerCheckpointConfig, SageMakerTieredStorageWriter
from tierckpt.config import DEFAULT_MEMORY_ROOT
from tierckpt.manifest import CommitRecord, checksum
from workers_security import w_save_replicated

warnings.filterwarnings("ignore", message="torch.distributed is disabled")

NS = "job"


def _cfg(memory_root: str, durable_dir: str, **kw: Any) -> CheckpointConfig:
    kw.setdefault("namespace", NS)
    kw.setdefault("world_size", 1)
    return CheckpointConfig(memory_root=memory_root, durable_base_path=durable_dir, **kw)


def _save(cfg: CheckpointConfig, step: int, value: float, durable: bool = False) -> None:
    w = TieredStorageWriter(cfg, step=step, save_to_durable=durable)
    dcp.save({"w": torch.full((64,), value), "meta": {"note": "x"}}, storage_writer=w)
    w.durable_done.result(timeout=60)


def _load(cfg: CheckpointConfig) -> tuple[int | None, torch.Tensor]:
    out = {"w": torch.zeros(64), "meta": {"note": ""}}
    reader = TieredStorageReader(cfg)
    dcp.load(out, storage_reader=reader)
    return reader.step, out["w"]


def _step_dir(root: str, step: int) -> str:
    return os.path.join(root, NS, f"step_{step}")


def _one(pattern: str) -> str:
    (path,) = glob.glob(pattern)
    return path


@pytest.fixture
def base(memory_root: str) -> Iterator[str]:
    """An existing private scratch directory under /dev/shm (removed afterwards)."""
    os.mkdir(memory_root, 0o700)
    yield memory_root


# --------------------------------------------------------------------------- d09


def _assert_refused(cfg: CheckpointConfig, capsys: pytest.CaptureFixture[str]) -> None:
    """Writer, reader and the CLI all refuse the memory root, typed and saying what to do."""
    with pytest.raises(UnsafeMemoryRootError, match="TIERCKPT_MEMORY_ROOT") as info:
        TieredStorageWriter(cfg, step=1)
    assert isinstance(info.value, ConfigError)
    with pytest.raises(UnsafeMemoryRootError):
        TieredStorageReader(cfg)
    assert cli(["ls", "-n", NS, "--memory-root", cfg.memory_root or ""]) == 2
    assert "TIERCKPT_MEMORY_ROOT" in capsys.readouterr().err


def test_d09_a_symlinked_memory_root_is_refused_typed_and_nothing_is_written_through_it(
    base: str, durable_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    target = os.path.join(base, "elsewhere")
    os.mkdir(target, 0o700)
    link = os.path.join(base, "root")
    os.symlink(target, link)
    cfg = _cfg(link, durable_dir)

    _assert_refused(cfg, capsys)

    assert os.listdir(target) == []
    assert os.listdir(durable_dir) == []


def test_d09_a_world_writable_memory_root_is_refused_typed_and_nothing_is_written_through_it(
    base: str, durable_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = os.path.join(base, "root")
    os.mkdir(root)
    os.chmod(root, 0o777)
    cfg = _cfg(root, durable_dir)

    _assert_refused(cfg, capsys)
    with pytest.raises(UnsafeMemoryRootError, match="chmod 700"):
        TieredStorageWriter(cfg, step=1)

    assert os.listdir(root) == []
    assert os.stat(root).st_mode & 0o777 == 0o777, "tierckpt must not silently fix someone's dir"


def test_d09_a_memory_root_owned_by_another_user_is_refused_typed_and_nothing_is_written(
    base: str, durable_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = os.path.join(base, "root")
    os.mkdir(root, 0o700)
    other = 65534 if os.geteuid() != 65534 else 65533
    os.chown(root, other, -1)
    cfg = _cfg(root, durable_dir)

    _assert_refused(cfg, capsys)
    with pytest.raises(UnsafeMemoryRootError, match="chown"):
        TieredStorageWriter(cfg, step=1)

    assert os.listdir(root) == []


def test_d09_a_symlinked_namespace_directory_is_refused_and_nothing_is_written_through_it(
    base: str, durable_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = os.path.join(base, "root")
    os.mkdir(root, 0o700)
    target = os.path.join(base, "planted")
    os.mkdir(target, 0o700)
    os.symlink(target, os.path.join(root, NS))
    cfg = _cfg(root, durable_dir)

    _assert_refused(cfg, capsys)

    assert os.listdir(target) == []


def test_d09_the_default_memory_root_is_per_user_and_roots_are_created_private(
    memory_root: str, durable_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TIERCKPT_MEMORY_ROOT", raising=False)
    expected = f"/dev/shm/tierckpt-{os.geteuid()}"
    assert expected == DEFAULT_MEMORY_ROOT
    assert CheckpointConfig(namespace=NS, world_size=1).memory_root == expected

    # A permissive umask (002, common with per-user groups) must not leak into the tier.
    old = os.umask(0o002)
    try:
        cfg = _cfg(memory_root, durable_dir)
        _save(cfg, 1, 1.0)
    finally:
        os.umask(old)
    for path in (memory_root, os.path.join(memory_root, NS)):
        st = os.lstat(path)
        assert st.st_uid == os.geteuid(), path
        assert st.st_mode & 0o777 == 0o700, (path, oct(st.st_mode))
    assert _load(cfg)[0] == 1


# --------------------------------------------------------------------------- d10


class _Sentinel:
    """Unpickling this creates a file: proof that attacker-chosen code ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (self.path, "w"))


def _plant_code_pickle(metadata_file: str, sentinel: str) -> None:
    with open(metadata_file, "wb") as f:
        f.write(pickle.dumps(_Sentinel(sentinel)))


def _commit(root: str, step: int) -> CommitRecord:
    with open(os.path.join(_step_dir(root, step), "COMMIT"), "rb") as f:
        return CommitRecord.from_json(f.read(), where="test")


def test_d10_a_tampered_memory_metadata_is_never_unpickled_and_the_durable_copy_loads(
    memory_root: str, durable_dir: str, tmp_path: Path
) -> None:
    cfg = _cfg(memory_root, durable_dir)
    _save(cfg, 1, 7.0, durable=True)
    sentinel = str(tmp_path / "code-ran")
    _plant_code_pickle(_one(os.path.join(_step_dir(memory_root, 1), "*.metadata")), sentinel)

    step, w = _load(cfg)

    assert not os.path.exists(sentinel), "a tampered metadata pickle was unpickled"
    assert step == 1 and torch.equal(w, torch.full((64,), 7.0))


def test_d10_tampered_metadata_in_every_tier_raises_integrity_error_without_unpickling(
    memory_root: str, durable_dir: str, tmp_path: Path
) -> None:
    cfg = _cfg(memory_root, durable_dir)
    _save(cfg, 1, 7.0, durable=True)
    sentinel = str(tmp_path / "code-ran")
    for root in (memory_root, durable_dir):
        _plant_code_pickle(_one(os.path.join(_step_dir(root, 1), "*.metadata")), sentinel)

    with pytest.raises(IntegrityError, match="checksum"):
        TieredStorageReader(cfg)

    assert not os.path.exists(sentinel), "a tampered metadata pickle was unpickled"


def test_d10_a_commit_without_a_metadata_checksum_is_not_trusted_for_unpickling(
    memory_root: str, durable_dir: str, tmp_path: Path
) -> None:
    cfg = _cfg(memory_root, durable_dir)
    _save(cfg, 1, 7.0)
    sentinel = str(tmp_path / "code-ran")
    _plant_code_pickle(_one(os.path.join(_step_dir(memory_root, 1), "*.metadata")), sentinel)
    commit_file = os.path.join(_step_dir(memory_root, 1), "COMMIT")
    with open(commit_file, "rb") as f:
        obj = json.loads(f.read())
    obj["metadata_checksum"] = ""
    with open(commit_file, "w") as f:
        json.dump(obj, f)

    with pytest.raises(IntegrityError):
        TieredStorageReader(cfg)

    assert not os.path.exists(sentinel)


def test_d10_the_commit_records_the_checksum_of_the_metadata_and_of_every_rank_manifest(
    memory_root: str, durable_dir: str
) -> None:
    cfg = _cfg(memory_root, durable_dir, world_size=2)
    # Two ranks saving one replicated tensor: DCP gives it to one rank, the other writes none.
    results = run_ranks(w_save_replicated, 2, cfg, 3)
    assert sorted(r["items"] for r in results)[0] == 0, results

    for root in (memory_root, durable_dir):
        record = _commit(root, 3)
        with open(os.path.join(_step_dir(root, 3), record.metadata), "rb") as f:
            assert record.metadata_checksum == checksum(f.read())
        assert len(record.ranks) == 2
        for entry in record.ranks:
            with open(os.path.join(_step_dir(root, 3), entry.manifest), "rb") as f:
                assert entry.manifest_checksum == checksum(f.read()), (root, entry)


def _tamper_blob_and_manifest(root: str, step: int) -> None:
    """Change a data byte and rewrite the manifest's checksum to match (a consistent forgery)."""
    manifest_file = _one(os.path.join(_step_dir(root, step), "*-r0.manifest.json"))
    with open(manifest_file, "rb") as f:
        manifest = json.loads(f.read())
    (fname,) = manifest["files"]
    blob = max(manifest["files"][fname]["blobs"], key=lambda b: b[1])
    data_file = os.path.join(_step_dir(root, step), fname)
    with open(data_file, "r+b") as f:
        f.seek(blob[0])
        raw = bytearray(f.read(blob[1]))
        raw[0] ^= 0xFF
        f.seek(blob[0])
        f.write(raw)
    blob[2] = checksum(bytes(raw))
    with open(manifest_file, "w") as f:
        json.dump(manifest, f, sort_keys=True)


def test_d10_a_tampered_manifest_is_rejected_by_verify(
    memory_root: str, durable_dir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _cfg(memory_root, durable_dir)
    _save(cfg, 1, 7.0)
    args = ["verify", "-n", NS, "--step", "1", "--memory-root", memory_root]
    args += ["--durable", durable_dir]
    assert cli(args) == 0
    capsys.readouterr()
    _tamper_blob_and_manifest(memory_root, 1)

    assert cli(args) == 1

    out = capsys.readouterr().out
    assert "manifest" in out.lower() and "checksum" in out.lower(), out


def test_d10_a_tampered_manifest_is_not_resumed_into_the_durable_tier(
    memory_root: str, durable_dir: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = _cfg(memory_root, durable_dir)
    _save(cfg, 1, 7.0, durable=True)
    # Undo the drain: the durable copy is gone and memory no longer marks the part drained.
    shutil.rmtree(_step_dir(durable_dir, 1))
    for marker in glob.glob(os.path.join(_step_dir(memory_root, 1), "*.drained")):
        os.remove(marker)
    _tamper_blob_and_manifest(memory_root, 1)

    # One step's failure is logged and the other steps go on (d20): the forged part is refused.
    with caplog.at_level(logging.ERROR, logger="tierckpt"):
        resumed = resume_pending(cfg).result(timeout=60)
    assert 1 not in resumed
    assert any(
        "IntegrityError" in r.getMessage() and "manifest" in r.getMessage() for r in caplog.records
    ), [r.getMessage() for r in caplog.records]

    dur = _step_dir(durable_dir, 1)
    assert not os.path.exists(os.path.join(dur, "COMMIT"))
    assert not glob.glob(os.path.join(dur, "*.manifest.json"))


# --------------------------------------------------------------------------- d21


@pytest.mark.parametrize("namespace", ["run-1\n", "run-1\r\n", "\nrun-1"])
def test_d21_a_namespace_with_a_trailing_or_leading_newline_is_rejected(namespace: str) -> None:
    with pytest.raises(ConfigError, match="Invalid namespace"):
        CheckpointConfig(namespace=namespace, world_size=1, memory_root="/dev/shm/unused")


# --------------------------------------------------------------------------- d22


def test_d22_ls_verify_and_a_reader_create_neither_checkpoints_nor_the_memory_root(
    memory_root: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    where = ["-n", NS, "--memory-root", memory_root]

    assert cli(["ls", *where]) == 0
    assert cli(["verify", "--step", "1", *where]) == 1  # step 1 exists nowhere (issue 12)
    cfg = CheckpointConfig(namespace=NS, world_size=1, memory_root=memory_root)
    with pytest.raises(FileNotFoundError):  # CheckpointNotFoundError: an empty durable tier
        TieredStorageReader(cfg)

    assert not os.path.exists(tmp_path / "checkpoints")
    assert not os.path.exists(memory_root)


# --------------------------------------------------------------------------- d23


@pytest.mark.parametrize("path", [None, "any/path/here", "runs/latest"])
def test_d23_the_seed_compat_writer_without_a_step_raises_invalid_step_value_when_built(
    memory_root: str, path: str | None
) -> None:
    cfg = SageMakerCheckpointConfig(namespace=NS, world_size=1, memory_root=memory_root)
    with pytest.raises(InvalidStepError, match="Invalid step value"):
        SageMakerTieredStorageWriter(checkpoint_config=cfg, path=path)
    assert SageMakerTieredStorageWriter(checkpoint_config=cfg, path="x/step_3/y").step == 3
    assert not os.path.exists(os.path.join(memory_root, NS))
