"""Hang detection: a rank stuck in a step after the job moved on ends itself.

Peers of a hung rank see their collective time out (the group's timeout is
``hang_timeout_s``) and move the generation on. A rank whose main thread is still inside a
step of an older generation ``hang_timeout_s`` after that is hung: its watchdog records it in
the store and SIGKILLs the process, so the launcher replaces it (under plain torchrun, every
worker is restarted and restores from memory).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

from .membership import Membership

__all__ = ["Watchdog"]

log = logging.getLogger("tierckpt.recovery")


class Watchdog:
    """Watches, from a thread with its own store connection, whether this rank is stuck."""

    def __init__(self, membership: Membership, hang_timeout_s: float, poll_s: float = 0.1):
        self.membership = membership
        self.hang_timeout_s = hang_timeout_s
        self.poll_s = poll_s
        self.generation = -1
        self.step: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="tierckpt-watchdog", daemon=True)
        self._thread.start()

    def enter(self, generation: int, step: int) -> None:
        """The main thread starts ``step`` in ``generation``."""
        self.generation, self.step = generation, step

    def leave(self) -> None:
        """The main thread is at a safe point (between steps, or recovering)."""
        self.step = None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _watch(self) -> None:
        behind_since: float | None = None
        while not self._stop.wait(self.poll_s):
            step, gen = self.step, self.generation
            try:
                moved_on = step is not None and self.membership.generation() > gen
            except Exception:
                return  # the store is gone: the job is over
            if not moved_on:
                behind_since = None
                continue
            now = time.monotonic()
            behind_since = behind_since or now
            if now - behind_since >= self.hang_timeout_s and self.step is not None:
                log.error(
                    "tierckpt: rank %d is hung in step %s of generation %d (the job moved on "
                    "%.1f s ago): killing this process so that it is replaced",
                    self.membership.rank,
                    step,
                    gen,
                    now - behind_since,
                )
                os.kill(os.getpid(), signal.SIGKILL)
