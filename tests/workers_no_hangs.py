"""Rank workers of ``test_no_hangs.py``: no silent hangs, errors a user can catch.

Each ``w_*`` runs on every rank of a real gloo job (``fixtures_dist.run_ranks``).
"""

from __future__ import annotations

import glob
import os
import time
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import distworkers as dw
import tierckpt
from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter


def _error(e: BaseException) -> dict[str, Any]:
    failures = getattr(e, "failures", None)
    return {
        "types": [c.__name__ for c in type(e).__mro__],
        "message": str(e),
        "failure_ranks": sorted(failures) if failures is not None else None,
        "failure_types": (
            {r: type(f).__name__ for r, f in failures.items()} if failures is not None else None
        ),
    }


def w_reader_on_rank0_only(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Save step 1 on every rank, then build a reader on rank 0 alone."""
    tierckpt.save(dw.plain_state(1), config=cfg, step=1)
    out: dict[str, Any] = {}
    if rank == 0:
        t0 = time.monotonic()
        try:
            TieredStorageReader(cfg)
            out["error"] = None
        except BaseException as e:
            out["error"] = _error(e)
        out["seconds"] = time.monotonic() - t0
    dist.barrier()  # rank 1 keeps the store alive until rank 0 is done
    return out


def w_two_async_saves_in_flight(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Two ``dcp.async_save`` of one namespace without waiting in between; then load step 2."""
    t0 = time.monotonic()
    first = dcp.async_save(dw.plain_state(1), storage_writer=TieredStorageWriter(cfg, step=1))
    second = dcp.async_save(dw.plain_state(2), storage_writer=TieredStorageWriter(cfg, step=2))
    first.result(timeout=60)
    second.result(timeout=60)
    seconds = time.monotonic() - t0
    sd = dw.blank_plain_state()
    step = tierckpt.load(sd, config=cfg)
    return {
        "seconds": seconds,
        "step": step,
        "loaded": dw.fingerprint(sd),
        "expected": dw.fingerprint(dw.plain_state(2)),
    }


def w_load_with_other_shapes(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Save the plain state, load it into a state dict whose ``w`` has another shape."""
    tierckpt.save(dw.plain_state(1), config=cfg, step=1)
    sd = dw.blank_plain_state(scale=2)  # w is (128, 32) instead of (64, 32)
    try:
        tierckpt.load(sd, config=cfg)
    except tierckpt.TierckptError as e:
        return _error(e)
    return None


def _shards_only(seed: int, world_size: int) -> dict[str, Any]:
    """DTensors sharded over the ranks and nothing replicated: each rank reads its own file."""
    sd = dw.sharded_state(seed, world_size)
    return {"w": sd["w"], "v": sd["v"]}


def w_corrupt_blob_only_rank1_needs(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Save a sharded step in memory only; rank 1 corrupts its own shard; every rank loads."""
    tierckpt.save(_shards_only(1, world_size), config=cfg, step=1)
    dist.barrier()
    if rank == 1:
        step_dir = os.path.join(cfg.memory_root or "", cfg.namespace, "step_1")
        (data,) = glob.glob(os.path.join(step_dir, "*-r1.data"))
        with open(data, "r+b") as f:
            raw = bytearray(f.read())
            f.seek(0)
            f.write(bytes(b ^ 0xFF for b in raw))
    dist.barrier()
    try:
        tierckpt.load(_shards_only(2, world_size), config=cfg, step=1)
    except tierckpt.TierckptError as e:
        return _error(e)
    return None


def w_destroy_with_an_async_save_in_flight(
    rank: int, world_size: int, cfg: CheckpointConfig, group: str
) -> Any:
    """Async saves of steps 1-3 as the seed's example makes them (waiting for the previous
    one), then ``dist.destroy_process_group()`` right after the last ``async_save`` returns.
    ``group``: "default" (the save's collectives run on the group being destroyed), "own"
    (a gloo group of its own, which destroying the default group destroys too) or
    "process" (DCP's process-based checkpointer: its collectives run in another process)."""
    from torch.distributed.checkpoint import _async_process_executor as ape
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    pg = dist.new_group(backend="gloo") if group == "own" else None
    kind = AsyncCheckpointerType.PROCESS if group == "process" else AsyncCheckpointerType.THREAD
    sd = dw.plain_state(1, scale=64)
    future: Any = None
    for step in (1, 2, 3):
        if future is not None:
            future.result(timeout=120)
        res = dcp.async_save(
            sd,
            storage_writer=TieredStorageWriter(cfg, step=step),
            process_group=pg,
            async_checkpointer_type=kind,
        )
        future = getattr(res, "upload_completion", res)
    t0 = time.monotonic()
    dist.destroy_process_group()
    destroy_s = time.monotonic() - t0
    done_at_destroy = future.done()
    error = None
    try:
        future.result(timeout=120)
    except BaseException as e:
        error = f"{type(e).__name__}: {str(e)[:300]}"
    if group == "process" and ape._CHECKPOINT_PROCESS is not None:
        ape._CHECKPOINT_PROCESS.__del__()  # sends TERMINATE and joins
        ape._CHECKPOINT_PROCESS = None
    return {
        "destroy_s": destroy_s,
        "done_at_destroy": done_at_destroy,
        "error": error,
        "committed": dw.committed_steps(cfg.memory_root or "", cfg.namespace),
    }
