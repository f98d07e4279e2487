"""Rank workers for tests/test_safe_security.py (run by ``fixtures_dist.run_ranks``)."""

from __future__ import annotations

import glob
import json
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from tierckpt import CheckpointConfig, TieredStorageWriter


def w_save_replicated(rank: int, world_size: int, cfg: CheckpointConfig, step: int) -> Any:
    """Save one replicated tensor (DCP gives it to a single rank), drained to durable.

    Returns how many blobs this rank's manifest lists.
    """
    writer = TieredStorageWriter(cfg, step=step, save_to_durable=True)
    dcp.save({"w": torch.arange(8, dtype=torch.float32)}, storage_writer=writer)
    writer.durable_done.result(timeout=60)
    step_dir = os.path.join(cfg.memory_root or "", cfg.namespace, f"step_{step}")
    (path,) = glob.glob(os.path.join(step_dir, f"*-r{rank}.manifest.json"))
    with open(path, "rb") as f:
        files = json.loads(f.read())["files"]
    return {"items": sum(len(entry["blobs"]) for entry in files.values())}
