"""Progress lines for long loads and drains: bytes done, MB/s and ETA, at a bounded rate.

Nothing is logged for an operation shorter than the interval (``$TIERCKPT_PROGRESS_S``,
default 10 s); a longer one logs at most one line per interval:
``tierckpt: step 40 drain (rank 0): 1.2 GB of 4.0 GB (30%), 250.0 MB/s, ETA 11 s``.
"""

from __future__ import annotations

import logging
import os
import threading
import time

__all__ = ["Progress", "interval_s"]

ENV = "TIERCKPT_PROGRESS_S"
DEFAULT_INTERVAL_S = 10.0


def interval_s() -> float:
    """Seconds between two progress lines of one operation."""
    try:
        return max(0.0, float(os.environ.get(ENV, DEFAULT_INTERVAL_S)))
    except ValueError:
        return DEFAULT_INTERVAL_S


class Progress:
    """Counts the bytes of one operation and logs its progress now and then (thread-safe)."""

    def __init__(self, log: logging.Logger, what: str, total: int) -> None:
        self.log, self.what, self.total = log, what, total
        self.done = 0
        self.interval = interval_s()
        self._t0 = self._last = time.monotonic()
        self._lock = threading.Lock()

    def add(self, nbytes: int) -> None:
        with self._lock:
            self.done += nbytes
            now = time.monotonic()
            if now - self._last < self.interval:
                return
            self._last = now
            line = self.line(now)
        self.log.info(line)

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self._t0, 1e-9)
        rate = self.done / elapsed
        text = f"tierckpt: {self.what}: {self.done / 1e9:.1f} GB"
        if self.total > 0:
            left = max(self.total - self.done, 0)
            eta = f"{left / rate:.0f} s" if rate > 0 else "?"
            text += (
                f" of {self.total / 1e9:.1f} GB ({100 * self.done / self.total:.0f}%), "
                f"{rate / 1e6:.1f} MB/s, ETA {eta}"
            )
        else:
            text += f", {rate / 1e6:.1f} MB/s"
        return text
