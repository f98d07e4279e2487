"""Agree on the step to go on from, and fill the ranks that need it from the nearest copy.

Each rank brings its live step (the last step it completed, or None: a fresh replacement,
or a rank whose own code raised mid-step). The job goes on from the newest live step some
rank holds. Ranks at that step keep their state; the others are filled from a live
data-parallel replica (a broadcast from the lowest rank that holds it) when the state is
replicated, else everyone restores it through the checkpointer (memory → peer → durable,
logged by tierckpt's load); when no rank holds a live step, or the step cannot be restored,
everyone restores the newest restorable save.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..errors import CheckpointNotFoundError
from .checkpointer import Checkpointer
from .errors import RecoveryError

__all__ = ["Fill", "agree_and_fill", "broadcast_state"]

log = logging.getLogger("tierckpt.recovery")


@dataclass
class Fill:
    """The outcome of one agreement: the step to go on after, and where state came from."""

    step: int | None
    """The last completed step every rank now holds (None: start from scratch)."""
    source: str
    """``live`` (kept), ``replica:<rank>``, ``checkpoint:<step>`` or ``scratch``, for this rank."""
    nbytes: int = 0


def _plain(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.state_dict() if isinstance(v, Stateful) else v) for k, v in state.items()}


def broadcast_state(state: dict[str, Any], src: int) -> int:
    """Copy ``state`` from rank ``src`` to every rank in place; the bytes received here."""
    plain = _plain(state)
    leaves, spec = tree_flatten(plain)
    tensors = [i for i, x in enumerate(leaves) if isinstance(x, torch.Tensor)]
    is_tensor = set(tensors)
    sig = [(tuple(leaves[i].shape), str(leaves[i].dtype)) for i in tensors]
    rank = dist.get_rank()
    meta: list[Any] = [
        ([x for i, x in enumerate(leaves) if i not in is_tensor], sig) if rank == src else None
    ]
    dist.broadcast_object_list(meta, src=src)
    others, src_sig = meta[0]
    if src_sig != sig:
        raise RecoveryError(
            f"rank {rank}: its state's tensors differ from rank {src}'s ({len(sig)} vs "
            f"{len(src_sig)} tensors, or shapes/dtypes): a live replica can fill only "
            "identical (data-parallel) state; pass replicated=False."
        )
    nbytes = 0
    for i in tensors:
        t = leaves[i]
        buf = t if t.is_contiguous() else t.contiguous()
        dist.broadcast(buf, src=src)
        if buf is not t:
            t.copy_(buf)
        nbytes += t.numel() * t.element_size()
    if rank != src:
        it = iter(others)
        leaves = [x if i in is_tensor else next(it) for i, x in enumerate(leaves)]
        plain = tree_unflatten(leaves, spec)
        for k, v in state.items():
            if isinstance(v, Stateful):
                v.load_state_dict(plain[k])
            else:
                state[k] = plain[k]
    return 0 if rank == src else nbytes


def _restore(
    ckpt: Checkpointer, state: dict[str, Any], step: int | None, on_overwrite: Callable[[], None]
) -> Fill:
    on_overwrite()
    try:
        got = ckpt.restore(state, step)
    except CheckpointNotFoundError:  # that step's save never committed (a manager raises)
        if step is None:
            raise
        got = None
    if got is None and step is not None:
        got = ckpt.restore(state, None)
    return Fill(got, "scratch" if got is None else f"checkpoint:{got}")


def agree_and_fill(
    live: int | None,
    state: dict[str, Any],
    ckpt: Checkpointer,
    *,
    replicated: bool,
    on_overwrite: Callable[[], None] = lambda: None,
) -> Fill:
    """Collective on the default group: agree on the step and fill this rank's state.

    ``on_overwrite`` is called before this rank's state starts being overwritten (a fill
    that fails halfway leaves it neither the old step nor the new one)."""
    views: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(views, live)
    held = [v for v in views if v is not None]
    rank = dist.get_rank()
    if not held:
        fill = _restore(ckpt, state, None, on_overwrite)
    else:
        target = max(held)
        if all(v == target for v in views):
            fill = Fill(target, "live")
        elif replicated:
            src = views.index(target)
            if live != target:
                on_overwrite()
            nbytes = broadcast_state(state, src)
            fill = Fill(target, "live" if live == target else f"replica:{src}", nbytes)
        else:
            fill = _restore(ckpt, state, target, on_overwrite)
            if fill.step == live:
                fill.source = "live+" + fill.source  # reloaded from its own node's memory tier
    log.info(
        "tierckpt: rank %d going on after step %s (live steps by rank %s): state from %s%s",
        rank,
        fill.step,
        views,
        fill.source,
        f" ({fill.nbytes / 1e6:.1f} MB)" if fill.nbytes else "",
    )
    return fill
