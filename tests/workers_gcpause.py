"""Rank workers for tests/test_gcpause.py (spawned: module-level functions)."""

from __future__ import annotations

import gc
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter
from tierckpt._gcpause import paused_count


class _Spy:
    """Whether the collector was on at each of tierckpt's DCP calls on this rank."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def wrap(self, obj: Any, *names: str) -> None:
        for name in names:
            real = getattr(obj, name)

            def call(*a: Any, _real: Any = real, _name: str = name, **k: Any) -> Any:
                self.seen.append((_name, gc.isenabled()))
                return _real(*a, **k)

            setattr(obj, name, call)


def w_save_and_load(rank: int, world_size: int, cfg: CheckpointConfig) -> dict[str, Any]:
    state = {f"r{rank}.w": torch.randn(256, 64), "shared": torch.arange(8)}
    out: dict[str, Any] = {}
    for step in (1, 2):
        writer = TieredStorageWriter(cfg, step=step)
        spy = _Spy()
        spy.wrap(writer, "_write_data", "_finish")
        dcp.save(state, storage_writer=writer)
        out[f"save{step}"] = (spy.seen, gc.isenabled(), paused_count())
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    reader = TieredStorageReader(cfg)
    spy = _Spy()
    spy.wrap(reader, "prepare_local_plan", "_read_data")
    dcp.load(target, storage_reader=reader)
    out["load"] = (spy.seen, gc.isenabled(), paused_count())
    out["exact"] = all(torch.equal(state[k], target[k]) for k in state)
    return out
