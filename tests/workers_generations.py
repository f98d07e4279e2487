"""Rank workers for tests/test_safe_generations.py (spawned: module-level functions).

Every ``w_*`` function has the signature ``fn(rank, world_size, *args)`` and returns
picklable data; values are compared through :func:`distworkers.fingerprint` (bit-exact).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.tensor import Shard, distribute_tensor

import tierckpt
from distworkers import (
    blank_plain_state,
    capture_logs,
    describe_error,
    durable_root,
    fingerprint,
    plain_state,
    save,
    step_dirs,
)
from tierckpt import CheckpointConfig, TieredStorageReader

NEW_BRANCH = 100
"""Seed offset of the values saved after a rewind (seed = NEW_BRANCH + step)."""


def _commit(root: str, namespace: str, step: int) -> dict[str, Any] | None:
    path = os.path.join(root, namespace, f"step_{step}", "COMMIT")
    try:
        with open(path, "rb") as f:
            return dict(json.loads(f.read()))
    except FileNotFoundError:
        return None


def _commits(root: str, namespace: str) -> dict[int, str]:
    """``step -> coordinator attempt`` of every parseable commit in a tier root."""
    out = {}
    for step in step_dirs(root, namespace):
        record = _commit(root, namespace, step)
        if record is not None:
            out[step] = record["attempt"]
    return out


def _load(cfg: CheckpointConfig, sd: dict[str, Any], step: int | None = None) -> dict[str, Any]:
    reader = TieredStorageReader(cfg, step=step)
    dcp.load(sd, storage_reader=reader)
    return {"step": reader.step, "bytes": dict(reader.bytes_read_by_tier)}


# --------------------------------------------------------------------------- d01


def w_rewind_first_run(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Steps 1..6 (seed = step); 3 and 6 also durable."""
    for step in range(1, 7):
        save(cfg, plain_state(seed=step), step, durable=step % 3 == 0)
    assert tierckpt.wait_for_drains(timeout=60)
    dist.barrier()
    return {
        "memory": _commits(cfg.memory_root or "", cfg.namespace),
        "durable": _commits(durable_root(cfg), cfg.namespace),
    }


def w_rewind_and_save(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Rewind: load step 3 explicitly, then save 4 (durable) and 5 (memory) of a new branch."""
    sd = blank_plain_state()
    info = _load(cfg, sd, step=3)
    out: dict[str, Any] = {
        "load": info,
        "loaded": fingerprint(sd),
        "expected": fingerprint(plain_state(seed=3)),
    }
    mem, dur = cfg.memory_root or "", durable_root(cfg)
    after: dict[int, Any] = {}
    attempts: dict[int, str] = {}
    for step, durable in ((4, True), (5, False)):
        w = save(cfg, plain_state(seed=NEW_BRANCH + step), step, durable=durable)
        assert tierckpt.wait_for_drains(timeout=60)
        dist.barrier()
        attempts[step] = w.attempt  # rank 0's attempt is the commit's
        after[step] = {
            "memory": _commits(mem, cfg.namespace),
            "durable": _commits(dur, cfg.namespace),
            "durable_dirs": sorted(step_dirs(dur, cfg.namespace)),
        }
        dist.barrier()
    out.update(attempts=attempts, after=after)
    return out


def w_restart_newest(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """A plain restart (step=None) after the rewind: which step, and which values."""
    sd = blank_plain_state()
    info = _load(cfg, sd)
    return {
        "load": info,
        "loaded": fingerprint(sd),
        "new_branch": {s: fingerprint(plain_state(seed=NEW_BRANCH + s)) for s in (4, 5)},
    }


# --------------------------------------------------------------------------- d07


def w_resave_until_older_id(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Step 5 durable (seed 1); then step 5 re-saved memory-only (seed 2) until the memory
    commit's attempt id sorts below the durable one's (so "max attempt id" picks the old one)."""
    save(cfg, plain_state(seed=1), 5, durable=True)
    assert tierckpt.wait_for_drains(timeout=60)
    dist.barrier()
    mem, dur = cfg.memory_root or "", durable_root(cfg)
    tries = 0
    while True:
        tries += 1
        save(cfg, plain_state(seed=2), 5, durable=False)
        dist.barrier()
        decision = [None]
        if rank == 0:
            m, d = _commit(mem, cfg.namespace, 5), _commit(dur, cfg.namespace, 5)
            assert m is not None and d is not None
            decision = [(m["attempt"], d["attempt"])]
        dist.broadcast_object_list(decision, src=0)
        memory_attempt, durable_attempt = decision[0]  # type: ignore[misc]
        if memory_attempt < durable_attempt or tries >= 30:
            break
    out: dict[str, Any] = {
        "tries": tries,
        "memory_attempt": memory_attempt,
        "durable_attempt": durable_attempt,
        "new": fingerprint(plain_state(seed=2)),
        "old": fingerprint(plain_state(seed=1)),
    }
    for name, step in (("latest", None), ("step5", 5)):
        sd = blank_plain_state()
        out[name] = {"load": _load(cfg, sd, step), "loaded": fingerprint(sd)}
    return out


# --------------------------------------------------------------------------- d08


def sharded(seed: int, world_size: int) -> dict[str, Any]:
    """A 64x32 float32 tensor sharded on dim 0 (each rank's shard is its own blob) + extras."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(64, 32, generator=g)
    return {"w": distribute_tensor(full, mesh, [Shard(0)]), "seed": seed}


def w_save_sharded(rank: int, world_size: int, cfg: CheckpointConfig, steps: list[int]) -> Any:
    for step in steps:
        save(cfg, sharded(step, world_size), step)
    dist.barrier()
    return {step: fingerprint(sharded(step, world_size)) for step in steps}


def w_load_with_fallback(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """``tierckpt.load`` (step=None): which step, the values, the WARNING lines."""
    handler = capture_logs(cfg)
    sd = sharded(999, world_size)
    try:
        step = tierckpt.load(sd, config=cfg)
    except BaseException as e:
        return {"errors": describe_error(e)}
    return {
        "step": step,
        "loaded": fingerprint(sd),
        "warnings": [m for level, m in handler.records if level == "WARNING"],
    }


def w_raw_load_twice(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Raw ``dcp.load`` through a reader, twice; the first may fail, the second must not."""
    handler = capture_logs(cfg)
    out: dict[str, Any] = {}
    for name in ("first", "second"):
        sd = sharded(999, world_size)
        reader = TieredStorageReader(cfg)
        try:
            dcp.load(sd, storage_reader=reader)
            out[name] = {"step": reader.step, "loaded": fingerprint(sd)}
        except BaseException as e:
            out[name] = {"errors": describe_error(e)}
        dist.barrier()
    out["warnings"] = [m for level, m in handler.records if level == "WARNING"]
    return out


# --------------------------------------------------------------------------- d12 / d13


def w_load_elapsed(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Load step=None; returns what was loaded (or the errors) and how long it took."""
    handler = capture_logs(cfg)
    sd = blank_plain_state()
    t0 = time.monotonic()
    try:
        info = _load(cfg, sd)
    except BaseException as e:
        return {"errors": describe_error(e), "elapsed": time.monotonic() - t0}
    return {
        "load": info,
        "loaded": fingerprint(sd),
        "expected": fingerprint(plain_state(seed=info["step"] or 0)),
        "elapsed": time.monotonic() - t0,
        "warnings": [m for level, m in handler.records if level == "WARNING"],
    }


def w_per_node_save(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """One memory root per rank ("node"); step 1 saved to both tiers."""
    cfg = dataclasses.replace(cfg, memory_root=os.path.join(cfg.memory_root or "", f"node{rank}"))
    save(cfg, plain_state(seed=1), 1, durable=True)
    assert tierckpt.wait_for_drains(timeout=60)
    dist.barrier()
    return sorted(step_dirs(cfg.memory_root or "", cfg.namespace))


def w_rank1_lost_memory_and_durable(
    rank: int, world_size: int, cfg: CheckpointConfig, unreachable: dict[str, Any]
) -> Any:
    """Rank 1's node lost its memory tier and cannot reach the durable tier; both load."""
    root = os.path.join(cfg.memory_root or "", f"node{rank}")
    if rank == 1:
        shutil.rmtree(root, ignore_errors=True)
        cfg = dataclasses.replace(cfg, s3_max_retries=1, **unreachable)
    cfg = dataclasses.replace(cfg, memory_root=root)
    return w_load_elapsed(rank, world_size, cfg)
