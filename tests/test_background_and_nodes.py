"""Background work, multi-node memory tiers, drain protection, foreign files, typed drain errors."""

from __future__ import annotations

import json
import os
import shutil
import threading
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tierckpt.drain
from coreworkers import w_durable_saves_record_collective_threads, w_two_nodes_save
from fixtures_dist import run_ranks
from tierckpt import (
    CheckpointConfig,
    CheckpointNotFoundError,
    DurableTierError,
    DurableUnavailableError,
    TieredStorageReader,
    TieredStorageWriter,
)

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def test_background_work_never_issues_collectives_from_tierckpt_threads(
    config_factory: Any,
) -> None:
    cfg = config_factory()
    for result in run_ranks(w_durable_saves_record_collective_threads, 2, cfg):
        assert result["n_calls"] > 0  # the recorder saw DCP's own collectives
        offenders = [t for t in result["threads"] if t.startswith("tierckpt")]
        assert offenders == [], f"collectives issued from tierckpt threads: {offenders}"


@pytest.fixture
def two_roots() -> Iterator[list[str]]:
    roots = [f"/dev/shm/tierckpt-test-{uuid.uuid4().hex}-node{i}" for i in range(2)]
    try:
        yield roots
    finally:
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)


def test_memory_retention_works_on_every_node_of_a_multi_node_job(
    config_factory: Any, two_roots: list[str]
) -> None:
    cfg = config_factory()
    node0, node1 = run_ranks(w_two_nodes_save, 2, cfg, two_roots)
    # The coordinator's node keeps exactly memory_keep_last=3 committed steps.
    assert node0["committed"] == [6, 7, 8] and node0["steps"] == [6, 7, 8]
    # Node 1 receives each commit with the next save's plan: one save behind, and retained.
    assert node1["committed"] == [5, 6, 7]
    assert node1["steps"] == [5, 6, 7, 8]
    # Both agree on the newest step restorable everywhere (durable step 8) and load it.
    assert node0["loaded_step"] == node1["loaded_step"] == 8
    assert node0["shared_ok"] and node1["shared_ok"]


# ---------------------------------------------------------------- single-process tests


@pytest.fixture
def cfg1(memory_root: str, durable_dir: str) -> CheckpointConfig:
    return CheckpointConfig(
        namespace="solo",
        world_size=1,
        memory_root=memory_root,
        durable_base_path="file://" + durable_dir,
        memory_keep_last=1,
    )


def _save(
    cfg: CheckpointConfig, step: int, value: float, durable: bool = False
) -> TieredStorageWriter:
    w = TieredStorageWriter(cfg, step=step, save_to_durable=durable)
    dcp.save({"w": torch.full((256,), value)}, storage_writer=w)
    return w


def _load(cfg: CheckpointConfig, step: int | None = None) -> tuple[int | None, torch.Tensor]:
    out = {"w": torch.zeros(256)}
    reader = TieredStorageReader(cfg, step=step)
    dcp.load(out, storage_reader=reader)
    return reader.step, out["w"]


def _memory_steps(cfg: CheckpointConfig) -> list[int]:
    d = os.path.join(cfg.memory_root or "", cfg.namespace)
    return sorted(int(n[5:]) for n in os.listdir(d) if n.startswith("step_"))


def test_a_step_whose_durable_drain_is_pending_is_not_evicted_from_memory(
    cfg1: CheckpointConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    gate = threading.Event()
    real_upload = tierckpt.drain.upload_rank_part

    def held_upload(*args: Any, **kwargs: Any) -> int:
        assert gate.wait(60)
        return real_upload(*args, **kwargs)

    monkeypatch.setattr("tierckpt._drain_start.upload_rank_part", held_upload)
    first = _save(cfg1, 1, 1.0, durable=True)
    _save(cfg1, 2, 2.0)
    _save(cfg1, 3, 3.0)
    assert not first.durable_done.done()
    assert _memory_steps(cfg1) == [1, 3]  # keep_last=1 evicted step 2, never pending step 1
    gate.set()
    first.durable_done.result(timeout=30)
    _save(cfg1, 4, 4.0)
    assert _memory_steps(cfg1) == [4]  # drained: now evictable
    assert _load(cfg1, step=1)[1].eq(1.0).all()  # from the durable tier


def test_a_failed_drain_reports_a_typed_error_and_the_memory_commit_stays_loadable(
    cfg1: CheckpointConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken_upload(*args: Any, **kwargs: Any) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr("tierckpt._drain_start.upload_rank_part", broken_upload)
    w = _save(cfg1, 7, 7.0, durable=True)
    with pytest.raises(DurableTierError, match="Step 7: the durable drain failed"):
        w.durable_done.result(timeout=30)
    step, values = _load(cfg1)
    assert step == 7 and values.eq(7.0).all()


def test_a_non_durable_writer_has_durable_done_completed_at_once(cfg1: CheckpointConfig) -> None:
    w = TieredStorageWriter(cfg1, step=3)
    assert w.durable_done.done() and w.durable_done.result() is None


@pytest.mark.parametrize("damage", ["garbage", "foreign-namespace", "wrong-step", "future-format"])
def test_a_corrupt_or_foreign_commit_is_skipped_and_the_previous_step_loads(
    cfg1: CheckpointConfig, damage: str
) -> None:
    cfg = CheckpointConfig(
        namespace=cfg1.namespace,
        world_size=1,
        memory_root=cfg1.memory_root,
        durable_base_path=cfg1.durable_base_path,
        memory_keep_last=3,
    )
    _save(cfg, 1, 1.0)
    _save(cfg, 2, 2.0)
    commit = os.path.join(cfg.memory_root or "", cfg.namespace, "step_2", "COMMIT")
    with open(commit) as f:
        record = json.load(f)
    if damage == "garbage":
        data = b"\x00\xffnot json"
    else:
        record.update(
            {
                "foreign-namespace": {"namespace": "someone-else"},
                "wrong-step": {"step": 9},
                "future-format": {"format": 99},
            }[damage]
        )
        data = json.dumps(record).encode()
    with open(commit, "wb") as f:
        f.write(data)
    step, values = _load(cfg)
    assert step == 1 and values.eq(1.0).all()


def test_no_committed_step_anywhere_raises_checkpoint_not_found(cfg1: CheckpointConfig) -> None:
    with pytest.raises(
        CheckpointNotFoundError, match="No committed checkpoint of namespace 'solo'"
    ):
        TieredStorageReader(cfg1)


def test_a_durable_directory_that_cannot_be_created_is_a_typed_error(
    memory_root: str, tmp_path: Any
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = CheckpointConfig(
        namespace="solo",
        world_size=1,
        memory_root=memory_root,
        durable_base_path=f"file://{blocker}/ckpt",
    )
    with pytest.raises(DurableUnavailableError, match="cannot be created"):
        TieredStorageReader(cfg)
    # A writer never raises for the durable tier (a rank failing alone would hang the
    # others' collectives): the save commits in memory and its drain fails typed.
    w = TieredStorageWriter(cfg, step=1, save_to_durable=True)
    dcp.save({"w": torch.ones(16)}, storage_writer=w)
    with pytest.raises(DurableUnavailableError, match="cannot be created"):
        w.durable_done.result(timeout=30)


def test_dcp_plan_caching_saves_each_step_with_its_own_attempt_and_the_newest_loads(
    cfg1: CheckpointConfig,
) -> None:
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

    def save(step: int) -> str:
        w = TieredStorageWriter(cfg1, step=step)
        dcp.save(
            {"w": torch.full((256,), float(step))},
            storage_writer=w,
            planner=DefaultSavePlanner(enable_plan_caching=True),
        )
        return w.attempt

    attempts = [save(1), save(2), save(3)]
    assert len(set(attempts)) == 3
    step, values = _load(cfg1)
    assert step == 3 and values.eq(3.0).all()
