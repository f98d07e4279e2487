"""The CPU priority of tierckpt's background threads (replication, spare fills)."""

from __future__ import annotations

import contextlib
import os
import threading

__all__ = ["background_priority"]


def background_priority() -> None:
    """Run the calling thread at the lowest CPU priority, so background work uses the cores
    training leaves idle (on Linux a thread's nice value is its own; elsewhere a no-op)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
