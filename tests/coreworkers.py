"""Rank workers for tests/test_background_and_nodes.py (spawned: module-level functions)."""

from __future__ import annotations

import os
import threading
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter, wait_for_drains

warnings.filterwarnings("ignore")

_COLLECTIVES = (
    "all_gather_object",
    "gather_object",
    "scatter_object_list",
    "broadcast_object_list",
    "all_reduce",
    "all_gather",
    "broadcast",
    "barrier",
    "reduce_scatter",
    "gather",
    "scatter",
)


def record_collectives() -> list[tuple[str, str]]:
    """Wrap torch.distributed's collectives; the list fills with (function, calling thread)."""
    calls: list[tuple[str, str]] = []
    for name in _COLLECTIVES:
        original = getattr(dist, name)

        def wrapper(*args: Any, __name: str = name, __orig: Any = original, **kwargs: Any) -> Any:
            calls.append((__name, threading.current_thread().name))
            return __orig(*args, **kwargs)

        setattr(dist, name, wrapper)
        setattr(dist.distributed_c10d, name, wrapper)
    return calls


def w_durable_saves_record_collective_threads(
    rank: int, world_size: int, cfg: CheckpointConfig
) -> Any:
    """Durable saves (sync and async) and a load; return which threads issued collectives."""
    calls = record_collectives()
    sd = {"w": torch.arange(4096, dtype=torch.float32), "step": 1}
    for step in range(1, 4):
        w = TieredStorageWriter(cfg, step=step, save_to_durable=True)
        if step % 2:
            dcp.save(sd, storage_writer=w)
        else:
            dcp.async_save(sd, storage_writer=w).result()
        w.durable_done.result(timeout=60)
    assert wait_for_drains(timeout=60)
    out = {"w": torch.zeros(4096), "step": 0}
    dcp.load(out, storage_reader=TieredStorageReader(cfg))
    assert torch.equal(out["w"], sd["w"])
    threads = sorted({t for _, t in calls})
    return {"threads": threads, "n_calls": len(calls)}


def w_two_nodes_save(rank: int, world_size: int, cfg: CheckpointConfig, roots: list[str]) -> Any:
    """Each rank is its own "node" (its own memory root); save 8 steps, durable every 4th."""
    import dataclasses

    cfg = dataclasses.replace(cfg, memory_root=roots[rank])
    sd = {"w": torch.full((1000,), float(rank)), "shared": torch.arange(64.0)}
    for step in range(1, 9):
        w = TieredStorageWriter(cfg, step=step, save_to_durable=(step % 4 == 0))
        dcp.save(sd, storage_writer=w)
        w.durable_done.result(timeout=60)
    assert wait_for_drains(timeout=60)
    dist.barrier()
    node_dir = os.path.join(roots[rank], cfg.namespace)
    steps = sorted(int(d[5:]) for d in os.listdir(node_dir) if d.startswith("step_"))
    committed = [s for s in steps if os.path.exists(os.path.join(node_dir, f"step_{s}", "COMMIT"))]
    out = {"w": torch.zeros(1000), "shared": torch.zeros(64)}
    reader = TieredStorageReader(cfg)
    dcp.load(out, storage_reader=reader)
    return {
        "steps": steps,
        "committed": committed,
        "loaded_step": reader.step,
        "shared_ok": bool(torch.equal(out["shared"], sd["shared"])),
    }
