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
