"""Rank workers for the prefault tests (``test_prefault.py``): ``fn(rank, world_size, *args)``
run in spawned gloo ranks (``fixtures_dist.run_ranks``); results are picklable dicts."""

from __future__ import annotations

import os
import time
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

import distworkers as dw
import tierckpt
from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter
from tierckpt.staging import StagingPool
from workers_staging import sharded_tensors


def _pool(cfg: CheckpointConfig) -> str:
    assert cfg.memory_root is not None
    return os.path.join(cfg.memory_root, cfg.namespace, ".pool")


def _wait_for(cfg: CheckpointConfig, prefix: str, suffix: str = "", timeout: float = 30) -> str:
    """The path of the first pooled file named ``prefix...suffix`` (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            names = os.listdir(_pool(cfg))
        except FileNotFoundError:
            names = []
        for name in names:
            if name.startswith(prefix) and name.endswith(suffix):
                return os.path.join(_pool(cfg), name)
        time.sleep(0.01)
    raise AssertionError(f"no pooled {prefix}*{suffix} after {timeout}s: {names}")


def _step_inodes(cfg: CheckpointConfig, step: int) -> dict[int, str]:
    assert cfg.memory_root is not None
    d = os.path.join(cfg.memory_root, cfg.namespace, f"step_{step}")
    return {os.stat(os.path.join(d, n)).st_ino: n for n in os.listdir(d)}


def _pooled_names(cfg: CheckpointConfig) -> list[str]:
    try:
        return sorted(os.listdir(_pool(cfg)))
    except FileNotFoundError:
        return []


def _save_and_load(cfg: CheckpointConfig, state: dict[str, Any], step: int) -> bool:
    dcp.save(state, storage_writer=TieredStorageWriter(cfg, step=step))
    want = dw.fingerprint(state)
    for t in state.values():
        t._local_tensor.zero_()
    dcp.load(state, storage_reader=TieredStorageReader(cfg, step=step))
    return dw.fingerprint(state) == want


def w_prefault_then_save(rank: int, world_size: int, cfg: CheckpointConfig) -> dict[str, Any]:
    """prefault() fills a spare of this rank's part; the first save writes into that file."""
    state = sharded_tensors(1, world_size, rows=32768)  # 8 MiB + 128 KiB per rank
    part = sum(t._local_tensor.numel() * 4 for t in state.values())
    started = tierckpt.prefault(cfg, state)
    again = tierckpt.prefault(cfg, state)  # one spare per rank at a time
    spare = _wait_for(cfg, f"r{rank}-", ".spare")
    inode, size = os.stat(spare).st_ino, os.stat(spare).st_size
    after_fill = tierckpt.prefault(cfg, state)  # a pooled one fits
    exact = _save_and_load(cfg, state, 1)
    return {
        "started": started,
        "again": again,
        "after_fill": after_fill,
        "spare_size": size,
        "part": part,
        "used_spare": _step_inodes(cfg, 1).get(inode, ""),
        "pooled_after": _pooled_names(cfg),
        "exact": exact,
    }


def w_save_takes_over_a_fill(rank: int, world_size: int, cfg: CheckpointConfig) -> dict[str, Any]:
    """A save that needs a buffer while this rank's spare is being filled stops the fill and
    writes into the spare as far as it got (then trimmed to the part's size)."""
    state = sharded_tensors(2, world_size, rows=32768)
    assert cfg.memory_root is not None
    memory = tierckpt.tiers.memory.open_memory_tier(cfg)
    memory.ensure_root(cfg.namespace)
    thread = StagingPool(memory, cfg.namespace).prefault_spare(512 << 20, None, rank)
    assert thread is not None
    filling = _wait_for(cfg, f".filling-r{rank}-")
    inode = os.stat(filling).st_ino
    exact = _save_and_load(cfg, state, 1)
    used = _step_inodes(cfg, 1).get(inode, "")
    d = os.path.join(cfg.memory_root, cfg.namespace, "step_1")
    return {
        "fill_alive": thread.is_alive(),
        "used_spare": used,
        "used_size": os.stat(os.path.join(d, used)).st_size if used else None,
        "pooled_after": _pooled_names(cfg),
        "exact": exact,
    }


def w_manager_restore_prefaults(
    rank: int, world_size: int, cfg: CheckpointConfig
) -> dict[str, Any]:
    """CheckpointManager.restore() on a fresh job starts the spare its first save uses."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.Linear(512, 512))
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    state = {"model": tierckpt.ModelState(model, optim)}
    with tierckpt.CheckpointManager(cfg, every_steps=1) as mgr:
        restored = mgr.restore(state)
        spare = _wait_for(cfg, f"r{rank}-", ".spare")
        inode, size = os.stat(spare).st_ino, os.stat(spare).st_size
        stepped = dict(optim.state)  # restore must not have stepped the optimizer
        model(torch.randn(4, 512)).sum().backward()
        optim.step()
        mgr.save(1, state)
        mgr.wait()
    return {
        "restored": restored,
        "optim_state_before_training": len(stepped),
        "spare_size": size,
        "used_spare": _step_inodes(cfg, 1).get(inode, ""),
    }
