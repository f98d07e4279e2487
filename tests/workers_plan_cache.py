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


def w_manager_caches_plans(
    rank: int, world_size: int, cfg: CheckpointConfig, plan_caching: bool
) -> dict[str, Any]:
    """A CheckpointManager at its defaults (async saves, every step) through five saves:
    an unchanged state, a new key (as an optimizer's state appears after its first step),
    and a tensor that changes dtype at the same shape. Records per save whether DCP replayed
    this rank's plan and what the committed metadata says, then a restore of every save."""
    from torch.distributed.checkpoint.planner import SavePlanner

    import tierckpt.manager as manager_module
    from tierckpt import CheckpointManager, TieredStorageReader

    writers: list[PlanRecordingWriter] = []

    class Recording(PlanRecordingWriter):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            writers.append(self)

    manager_module.TieredStorageWriter = Recording  # type: ignore[misc]

    def state(step: int) -> dict[str, Any]:
        sd = sharded_state(step, world_size)
        if step >= 3:
            sd["more"] = torch.full((5,), float(step))
        if step >= 5:
            sd["more"] = sd["more"].to(torch.bfloat16)
        return sd

    out: dict[str, Any] = {"saves": []}
    mgr = CheckpointManager(cfg, every_steps=1, preemption=False, plan_caching=plan_caching)
    key = mgr._plan_key
    for step in range(1, 6):
        sd = state(step)
        mgr.save(step, sd)
        mgr.wait()
        meta = TieredStorageReader(cfg, step=step).read_metadata()
        target = blank_sharded_state(world_size)
        if step >= 3:
            target["more"] = torch.zeros(5, dtype=sd["more"].dtype)
        restored = CheckpointManager(cfg, every_steps=1, preemption=False)
        loaded = restored.restore(target, step=step)
        restored.close()
        out["saves"].append(
            {
                "step": step,
                "replayed": writers[-1].replayed,
                "more_dtype": str(meta.state_dict_metadata["more"].properties.dtype)
                if "more" in meta.state_dict_metadata
                else None,
                "loaded_step": loaded,
                "same": fingerprint(target) == fingerprint(sd),
            }
        )

    def cached() -> bool:  # the coordinator keeps all plans, every rank its own
        return any(
            key in getattr(SavePlanner, name) for name in ("_cached_all_plans", "_cached_save_plan")
        )

    out["cached_before_close"] = cached()
    mgr.close()
    out["cached_after_close"] = cached()
    return out
