"""This process's place in the default process group (none: a single process, rank 0)."""

from __future__ import annotations

import torch.distributed as dist

__all__ = ["dist_ready", "process_rank"]


def dist_ready() -> bool:
    """True when the default process group exists."""
    return dist.is_available() and dist.is_initialized()


def process_rank() -> int:
    """This process's rank in the default group, or 0 without one."""
    return dist.get_rank() if dist_ready() else 0
