"""``dist.destroy_process_group()`` waits for this process's async saves in flight.

A training script that ends with ``dcp.async_save(...)`` and then
``dist.destroy_process_group()`` (the seed library's own complete example does) destroyed
the group under the save's collectives: the run's last checkpoint failed with gloo's
"Connection closed by peer", or the exit hung on the save's thread. The first
``async_save`` through a :class:`~tierckpt.TieredStorageWriter` wraps
``torch.distributed.destroy_process_group`` so that it first waits for every such save of
this process (each for at most its ``collective_timeout_s``; a save still running then is
logged and the group destroyed anyway). Code that imported the function by name before
that first save calls the original.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d

from ._inflight import wait_for_saves_in_flight

__all__ = ["install"]

_lock = threading.Lock()


def install() -> None:
    """Wrap ``destroy_process_group`` (idempotent)."""
    with _lock:
        original = c10d.destroy_process_group
        if getattr(original, "_tierckpt_waits", False):
            return

        @functools.wraps(original)
        def destroy_process_group(*args: Any, **kwargs: Any) -> Any:
            wait_for_saves_in_flight("destroy_process_group")
            return original(*args, **kwargs)

        destroy_process_group._tierckpt_waits = True  # type: ignore[attr-defined]
        c10d.destroy_process_group = destroy_process_group
        if getattr(dist, "destroy_process_group", None) is original:
            dist.destroy_process_group = destroy_process_group
