"""Rank workers of ``test_user_defaults.py`` (issue 12: items 1, 5, 6)."""

from __future__ import annotations

import os
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import tierckpt
from distworkers import plain_state
from tierckpt import CheckpointConfig, TieredStorageWriter
from workers_durable import _crash_in_drain


def w_save_durable_killed_before_drain(rank: int, world_size: int, cfg: CheckpointConfig) -> None:
    """Save step 1 durable; once it is committed in memory, its drain is SIGKILLed after
    the data file is uploaded (``drain.after_data``)."""
    _crash_in_drain(cfg, 1, rank, "drain.after_data")


def w_save_step_3_durable_twice(rank: int, world_size: int, cfg: CheckpointConfig) -> Any:
    """Save step 3 durable twice (different values), waiting for each durable commit and
    the retention sweep after it; the durable step directory after each, and the attempts."""
    out: dict[str, Any] = {"attempts": [], "listings": []}
    base = (cfg.durable_base_path or "")[len("file://") :]
    step_dir = os.path.join(base, cfg.namespace, "step_3")
    for seed in (1, 2):
        writer = TieredStorageWriter(cfg, step=3, save_to_durable=True)
        dcp.save(plain_state(seed=seed), storage_writer=writer)
        writer.durable_done.result(timeout=60)
        tierckpt.wait_for_drains(timeout=60)  # the sweep after the durable commit
        dist.barrier()
        out["attempts"].append(writer.attempt)
        out["listings"].append(sorted(os.listdir(step_dir)))
    return out
