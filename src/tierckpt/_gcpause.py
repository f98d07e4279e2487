"""Pausing Python's cyclic garbage collector while a save or load runs.

A DCP save or load allocates thousands of small objects (plans, metadata, write results),
which now and then tips CPython into a full collection that walks every object of the
process: measured here, 0.12-0.15 s in 3 of 12 loads of a 2-rank job, on whichever rank
hit it while the other waited in a collective (``benchmarks/README.md``, "Garbage
collection"; Megatron-LM's ``--manual-gc`` exists for the same stragglers). Reference
counting still frees everything else meanwhile; only reference cycles wait for the end.

Pauses nest and may overlap across threads (a background ``async_save`` beside a load):
the collector is turned off by the first and back on by the last, and only if it was on
before. A pause its owner never ends (DCP raised between two of tierckpt's calls) is ended
by a watchdog after ``max_s``, with a warning.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time

__all__ = ["GcPause", "PauseSlot", "pause_gc"]

log = logging.getLogger("tierckpt")

_lock = threading.Condition()
_open: dict[int, tuple[float, str]] = {}  # token -> (deadline, what)
_resume = False  # whether the last pause to end turns the collector back on
_tokens = itertools.count(1)
_watchdog: threading.Thread | None = None


class GcPause:
    """One pause: :meth:`end` (idempotent) lets the collector run again once no other
    pause is open."""

    def __init__(self, token: int) -> None:
        self._token = token

    def end(self) -> None:
        _end(self._token, expired=False)

    def __enter__(self) -> GcPause:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()


def pause_gc(what: str, max_s: float) -> GcPause:
    """Turn the cyclic collector off for ``what`` ("step 7 load"), for ``max_s`` at most."""
    global _resume, _watchdog
    with _lock:
        if not _open:
            _resume = gc.isenabled()
            gc.disable()
        token = next(_tokens)
        _open[token] = (time.monotonic() + max_s, what)
        if _watchdog is None or not _watchdog.is_alive():
            _watchdog = threading.Thread(target=_watch, name="tierckpt-gc-watchdog", daemon=True)
            _watchdog.start()
        _lock.notify_all()
    return GcPause(token)


def paused_count() -> int:
    """How many pauses are open (tests)."""
    with _lock:
        return len(_open)


def _end(token: int, *, expired: bool) -> None:
    with _lock:
        entry = _open.pop(token, None)
        if entry is None:
            return
        if expired:
            log.warning(
                "tierckpt: %s is still running (or DCP gave up on it) past its limit; "
                "garbage collection, paused for it, runs again",
                entry[1],
            )
        if not _open and _resume:
            gc.enable()
        _lock.notify_all()


def _watch() -> None:
    """End pauses past their deadline; sleeps while none is open."""
    while True:
        with _lock:
            while not _open:
                _lock.wait()
            token, (deadline, _) = min(_open.items(), key=lambda kv: kv[1][0])
            wait = deadline - time.monotonic()
            if wait > 0:
                _lock.wait(wait)
                continue
        _end(token, expired=True)


class PauseSlot:
    """The one pause a save or load object holds: :meth:`start` ends the previous one."""

    def __init__(self) -> None:
        self._pause: GcPause | None = None

    def start(self, enabled: bool, what: str, max_s: float) -> None:
        self.end()
        if enabled:
            self._pause = pause_gc(what, max_s)

    def end(self) -> None:
        pause, self._pause = self._pause, None
        if pause is not None:
            pause.end()
