"""Rank workers for tests/test_plan_caching.py (spawned: module-level functions)."""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.planner import SavePlan

from distworkers import blank_sharded_state, durable_root, fingerprint, load, sharded_state
from tierckpt import CheckpointConfig, TieredStorageWriter


class PlanRecordingWriter(TieredStorageWriter):
    """The real writer; records whether DCP replayed this rank's cached local plan."""

    replayed: bool | None = None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.replayed = not plan.usable
        return super().prepare_local_plan(plan)


def _commit(root: str, namespace: str, step: int) -> dict[str, Any]:
    with open(os.path.join(root, namespace, f"step_{step}", "COMMIT")) as f:
        return json.load(f)  # type: ignore[no-any-return]


def _save(cfg: CheckpointConfig, sd: dict[str, Any], step: int, *, durable: bool, mode: str) -> Any:
    w = PlanRecordingWriter(cfg, step=step, save_to_durable=durable)
    planner = DefaultSavePlanner(enable_plan_caching=True)
    if mode == "async":
        res = dcp.async_save(sd, storage_writer=w, planner=planner)
        getattr(res, "upload_completion", res).result(timeout=120)
    else:
        dcp.save(sd, storage_writer=w, planner=planner)
    w.durable_done.result(timeout=120)
    return w


def w_cached_plans(rank: int, world_size: int, cfg: CheckpointConfig) -> dict[str, Any]:
    """Saves 1-4 with DCP plan caching (sync and async, a changed plan, a durable step),
    then a rewind to step 2; every commit as written, and loads of the newest save."""
    saves = [  # (step, seed, extra key, durable, mode)
        (1, 1, False, False, "sync"),
        (2, 2, False, False, "async"),
        (3, 3, True, True, "sync"),  # a new key: the local plans change (DCP merges them)
        (4, 4, True, False, "async"),
        (2, 22, True, False, "sync"),  # rewind: step 2 again, newer than steps 3 and 4
    ]
    out: dict[str, Any] = {"saves": [], "loads": []}
    for step, seed, extra, durable, mode in saves:
        sd = sharded_state(seed, world_size)
        if extra:
            sd["more"] = torch.full((5,), float(seed))
        w = _save(cfg, sd, step, durable=durable, mode=mode)
        out["saves"].append(
            {
                "step": step,
                "attempt": w.attempt,
                "replayed": w.replayed,
                "commit": _commit(cfg.memory_root or "", cfg.namespace, step),
                "durable_commit": _commit(durable_root(cfg), cfg.namespace, step)
                if durable
                else None,
                "saved": fingerprint(sd),
            }
        )
        target = blank_sharded_state(world_size)
        if extra:
            target["more"] = torch.zeros(5)
        info = load(cfg, target)
        out["loads"].append({"step": info["step"], "loaded": fingerprint(target)})
    return out
