"""Rank workers for tests/test_safe_durable.py (spawned: module-level functions).

Every ``w_*`` function has the signature ``fn(rank, world_size, *args)`` and returns plain
data that the test asserts on. Crashes are real SIGKILLs at named crash points
(``TIERCKPT_CRASH_AT``, see ``tierckpt._faults``); failures are real (a durable path that
cannot be created, a data object whose key is taken by a directory).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import tierckpt
from distworkers import capture_logs, describe_error, durable_root
from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter, layout
from tierckpt.manifest import RankManifest

warnings.filterwarnings("ignore")


def state(step: int, rank: int) -> dict[str, Any]:
    """A small state dict: a per-rank tensor and a shared one, deterministic in ``step``."""
    return {
        f"own{rank}": torch.full((2048,), float(step * 10 + rank)),
        "shared": torch.arange(512, dtype=torch.float64) * step,
    }


class HeldDrainWriter(TieredStorageWriter):
    """The real writer whose durable drain starts only when :meth:`release` is called.

    So a crash point in the drain is reached after ``dcp.save`` returned (the step is
    committed in memory), never racing the memory commit.
    """

    def _start_drain(self, manifest: RankManifest) -> None:
        self._held = manifest

    def release(self) -> None:
        TieredStorageWriter._start_drain(self, self._held)


def _outcome(fut: Any, timeout: float) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        fut.result(timeout=timeout)
    except BaseException as e:
        return {"ok": False, "errors": describe_error(e), "s": time.monotonic() - t0}
    return {"ok": True, "s": time.monotonic() - t0}


def _crash_in_drain(cfg: CheckpointConfig, step: int, rank: int, point: str) -> None:
    w = HeldDrainWriter(cfg, step=step, save_to_durable=True)
    dcp.save(state(step, rank), storage_writer=w)
    dist.barrier()  # every rank's dcp.save returned: the step is committed in memory
    os.environ["TIERCKPT_CRASH_AT"] = point
    w.release()
    w.durable_done.result(timeout=60)  # the drain SIGKILLs this process first
    raise AssertionError(f"not reached: the drain should have been killed at {point}")


# --------------------------------------------------------------------------- d03


def w_two_nodes_die_mid_drain(
    rank: int, world_size: int, cfg: CheckpointConfig, roots: list[str]
) -> None:
    """Each rank its own node (memory root): step 1 drains, step 2's drain is killed on
    both ranks once their data files are uploaded (before any manifest)."""
    cfg = dataclasses.replace(cfg, memory_root=roots[rank])
    w = TieredStorageWriter(cfg, step=1, save_to_durable=True)
    dcp.save(state(1, rank), storage_writer=w)
    w.durable_done.result(timeout=60)
    dist.barrier()
    _crash_in_drain(cfg, 2, rank, "drain.after_data")


def w_two_nodes_resume_then_load_from_durable(
    rank: int, world_size: int, cfg: CheckpointConfig, roots: list[str]
) -> dict[str, Any]:
    """Restart: each node resumes its part; then wipe both memory roots and load."""
    cfg = dataclasses.replace(cfg, memory_root=roots[rank])
    out: dict[str, Any] = {"resume": _outcome(tierckpt.resume_pending(cfg), timeout=60)}
    dist.barrier()
    shutil.rmtree(roots[rank], ignore_errors=True)
    dist.barrier()
    sd = {f"own{rank}": torch.zeros(2048), "shared": torch.zeros(512, dtype=torch.float64)}
    try:
        reader = TieredStorageReader(cfg)
        dcp.load(sd, storage_reader=reader)
        out["loaded_step"] = reader.step
        out["bytes"] = dict(reader.bytes_read_by_tier)
        want = state(2, rank)
        out["bit_exact"] = all(torch.equal(sd[k], want[k]) for k in want)
    except BaseException as e:
        out["load_errors"] = describe_error(e)
    return out


# --------------------------------------------------------------------------- d13


def w_one_rank_cannot_reach_durable(
    rank: int, world_size: int, cfg: CheckpointConfig, bad_durable: str
) -> dict[str, Any]:
    """Rank 1's durable location cannot be created; both ranks save a durable step."""
    if rank == 1:
        cfg = dataclasses.replace(cfg, durable_base_path=bad_durable)
    out: dict[str, Any] = {}
    t0 = time.monotonic()
    try:
        w = TieredStorageWriter(cfg, step=1, save_to_durable=True)
        dcp.save(state(1, rank), storage_writer=w)
    except BaseException as e:
        out["save_errors"] = describe_error(e)
        return out
    out["save_s"] = time.monotonic() - t0
    out["memory_committed"] = os.path.exists(
        os.path.join(cfg.memory_root or "", cfg.namespace, "step_1", "COMMIT")
    )
    if rank == 1:
        out["durable"] = _outcome(w.durable_done, timeout=30)
    dist.barrier()
    return out


# --------------------------------------------------------------------------- d14


def w_rank1_upload_fails(rank: int, world_size: int, cfg: CheckpointConfig) -> dict[str, Any]:
    """Rank 1's data object cannot be written (its key is taken by a directory in the
    durable tier); how long the coordinator's durable_done and exit wait take."""
    handler = capture_logs(cfg, f"tierckpt-test-d14-{rank}")
    w = TieredStorageWriter(cfg, step=1, save_to_durable=True)
    if rank == 1:
        blocker = os.path.join(
            durable_root(cfg), cfg.namespace, "step_1", layout.data_name(w.attempt, 1), "x"
        )
        os.makedirs(blocker)
    dist.barrier()
    dcp.save(state(1, rank), storage_writer=w)
    out: dict[str, Any] = {"durable": _outcome(w.durable_done, timeout=120)}
    t0 = time.monotonic()
    out["drains_idle"] = tierckpt.wait_for_drains()  # what the interpreter's exit waits for
    out["exit_wait_s"] = time.monotonic() - t0
    out["logs"] = handler.records
    dist.barrier()
    return out


def w_rank1_dies_before_upload(rank: int, world_size: int, cfg: CheckpointConfig) -> dict[str, Any]:
    """Rank 1 is SIGKILLed before its upload starts: the coordinator's durable commit can
    never finish. The exit wait (what atexit runs) is bounded and logs what it abandons."""
    handler = capture_logs(cfg, f"tierckpt-test-d14b-{rank}")
    w = HeldDrainWriter(cfg, step=1, save_to_durable=True)
    dcp.save(state(1, rank), storage_writer=w)
    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), 9)
    w.release()
    from tierckpt import drain

    t0 = time.monotonic()
    finished = drain.wait_at_exit()
    return {"finished": finished, "s": time.monotonic() - t0, "logs": handler.records}


# --------------------------------------------------------------------------- d17


def w_die_before_put_rename(rank: int, world_size: int, cfg: CheckpointConfig) -> None:
    """Step 1's drain is killed between writing a data file's temporary copy and its rename."""
    _crash_in_drain(cfg, 1, rank, "tier.before_put_rename")


def w_resume(rank: int, world_size: int, cfg: CheckpointConfig) -> dict[str, Any]:
    out = {"resume": _outcome(tierckpt.resume_pending(cfg), timeout=60)}
    dist.barrier()
    return out


# --------------------------------------------------------------------------- store signals


def w_drain_woken_through_the_store(
    rank: int, world_size: int, cfg: CheckpointConfig, hold_s: float, destroy: bool
) -> dict[str, Any]:
    """Rank 1 starts its upload ``hold_s`` late; every listing of the durable tier made by
    this process during the drain is counted. With ``destroy`` the process group is gone
    before the drains start (drains that outlive ``destroy_process_group``)."""
    from tierckpt.catalog import StepCatalog
    from tierckpt.tiers.memory import MemoryTier

    handler = capture_logs(cfg, f"tierckpt-test-signals-{rank}")
    listings = []
    real_files = StepCatalog.files

    def counted(self: StepCatalog, step: int) -> dict[str, int]:
        if not isinstance(self.tier, MemoryTier):
            listings.append(time.monotonic())
        return real_files(self, step)

    StepCatalog.files = counted  # type: ignore[method-assign]
    w = HeldDrainWriter(cfg, step=1, save_to_durable=True)
    dcp.save(state(1, rank), storage_writer=w)
    dist.barrier()
    if destroy:
        dist.destroy_process_group()
    if rank == 1:
        time.sleep(hold_s)
    t0 = time.monotonic()
    w.release()
    out: dict[str, Any] = {"durable": _outcome(w.durable_done, timeout=60)}
    out["listings"] = len([t for t in listings if t >= t0])
    out["drains_idle"] = tierckpt.wait_for_drains()
    out["logs"] = handler.records
    if not destroy:
        dist.barrier()
    return out
