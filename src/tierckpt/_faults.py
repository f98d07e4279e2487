"""Named crash points for fault-injection tests (the kill -9 matrix).

``crash_point("drain.after_data")`` SIGKILLs the process when ``TIERCKPT_CRASH_AT`` names
that point. The variable holds ``point[@rank][#nth]`` entries separated by commas: ``@rank``
limits the crash to the process whose ``RANK`` is that rank, ``#nth`` to the nth time the
point is reached (default 1). Unset (every production run), a crash point costs one dict
lookup.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["CRASH_ENV", "crash_point"]

CRASH_ENV = "TIERCKPT_CRASH_AT"
_hits: dict[str, int] = {}
_lock = threading.Lock()


def _armed(point: str) -> int | None:
    """The hit count at which ``point`` kills this process, or None."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return None
    rank = os.environ.get("RANK", "0")
    for entry in spec.split(","):
        name, _, nth = entry.strip().partition("#")
        name, _, want_rank = name.partition("@")
        if name == point and (not want_rank or want_rank == rank):
            return int(nth) if nth else 1
    return None


def crash_point(point: str) -> None:
    """SIGKILL this process here if the fault-injection environment asks for it."""
    if CRASH_ENV not in os.environ:
        return
    nth = _armed(point)
    if nth is None:
        return
    with _lock:
        _hits[point] = _hits.get(point, 0) + 1
        hit = _hits[point]
    if hit == nth:
        os.kill(os.getpid(), signal.SIGKILL)
