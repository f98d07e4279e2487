"""``tierckpt.prefault``: pay for the memory tier's pages before the first save needs them.

A job's first saves write fresh tmpfs pages, and a page's first touch is the expensive part
of a save (about 2 s per GiB on these VMs, 7x a rewrite of resident pages; DESIGN "Measured
on these machines"). :func:`prefault` starts, in the background and at a bounded rate, one
spare buffer the size of this rank's part; the first save then copies into resident pages.
:class:`~tierckpt.CheckpointManager` calls it from ``restore()``, the call every job makes
before it trains. Later saves keep one spare ahead until evictions feed the pool.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from ._dist import process_rank
from .config import CheckpointConfig, require_config
from .dcp._stage import staged_sizes
from .nodemem import hold_namespace
from .staging import StagingPool, align
from .state import ModelState
from .tiers.memory import open_memory_tier

__all__ = ["prefault"]

_SLACK = 1 << 20
"""Room past the tensors for the serialized (non-tensor) items of a part."""


def _optimizer_tensors(optimizer: Any, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The optimizer's state tensors; for one that has not stepped yet, an estimate: two
    per parameter (Adam's moments), without stepping it the way ``get_state_dict`` would."""
    held = [t for st in optimizer.state.values() for t in st.values() if torch.is_tensor(t)]
    return held if held else [p for p in params for _ in range(2)]


def _tensors_of(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` as DCP would save it, sized without side effects: a :class:`ModelState`
    becomes its model's local tensors plus its optimizer's, other ``Stateful`` values their
    state dicts."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, ModelState):
            params = list(value.model.state_dict().values())
            optim = value.optimizer
            optimizers = optim if isinstance(optim, list | tuple) else [optim] if optim else []
            out[key] = {
                "model": params,
                "optim": [
                    _optimizer_tensors(o, [p for p in params if torch.is_tensor(p)])
                    for o in optimizers
                ],
            }
        elif isinstance(value, Stateful):
            out[key] = value.state_dict()
        else:
            out[key] = value
    return out


def prefault(config: CheckpointConfig, state: dict[str, Any]) -> bool:
    """Start filling, in the background, a spare memory-tier buffer for this rank's next save
    of ``state``; True when one was started (False: ``config.memory_prefault`` is off, one
    that fits is already pooled or being filled, or the memory budget has no room).

    Not collective; cheap to call. A save that starts before the fill is done takes the
    spare as far as it got.
    """
    config = require_config(config)
    if not config.memory_prefault:
        return False
    sizes = staged_sizes(_tensors_of(state), replicated_private=config.world_size > 1)
    nbytes = align(sizes.shared + sizes.private + _SLACK)
    memory = open_memory_tier(config)
    memory.ensure_root(config.namespace)
    hold_namespace(config, memory)
    rank = process_rank()
    pool = StagingPool(memory, config.namespace)
    return pool.prefault_spare(nbytes, config.memory_budget_bytes, rank) is not None
