"""One save of a namespace at a time per process: a second save waits for the first.

Two ``dcp.async_save`` calls in flight run their collectives from two threads on the same
process group; the ranks can interleave them differently and then wait forever. Each save
takes a turn, in program order (same on every rank), when it is staged (``async_save``) or
set up (``save``); the thread that runs it waits, before its first collective, until the
previous save's thread has finished, for at most ``collective_timeout_s``. Only saves run on
a thread of their own (DCP's ``async_save`` executor) are waited for: that thread ends
with its save.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .._runtime import RUNTIME
from ..config import CheckpointConfig
from ..errors import CollectiveTimeoutError

__all__ = ["Turn", "take_turn"]


@dataclass
class Turn:
    """One save's place in the namespace's order."""

    step: int | None
    previous: Turn | None
    taker: threading.Thread = field(default_factory=threading.current_thread)
    """The thread that started the save (the caller of ``dcp.save`` / ``async_save``)."""
    runner: threading.Thread | None = None
    """The thread running the save's collectives (known once it is set up)."""
    started: threading.Event = field(default_factory=threading.Event)

    def run(self, config: CheckpointConfig) -> None:
        """In the thread running this save: register it, then wait for the previous save."""
        self.runner = threading.current_thread()
        self.started.set()
        prev, self.previous = self.previous, None  # keep no chain of old turns alive
        if prev is None:
            return
        timeout = config.collective_timeout_s
        deadline = time.monotonic() + timeout
        if not prev.started.wait(timeout):
            return  # the previous save never ran (it failed before its set-up)
        runner = prev.runner
        if runner is None or runner is prev.taker or runner is self.runner:
            # A save run by its caller's thread (``dcp.save``) has returned before that
            # thread went on; one run elsewhere at the same time is the caller's own doing.
            return
        runner.join(max(0.0, deadline - time.monotonic()))
        if runner.is_alive():
            raise CollectiveTimeoutError(
                f"Step {self.step}: the previous save of namespace {config.namespace!r} (step "
                f"{prev.step}) is still running after collective_timeout_s={timeout:g}s; this "
                "save waited for it instead of running beside it. Wait for the previous "
                "async_save's future before starting the next one, or raise collective_timeout_s."
            )


def take_turn(config: CheckpointConfig, step: int | None) -> Turn:
    """The next turn of ``config``'s namespace in this process (after the newest one)."""
    key = (config.memory_root or "", config.namespace)
    c = RUNTIME.collectives
    with c.lock:
        turn = Turn(step=step, previous=c.last_save.get(key))
        c.last_save[key] = turn
    return turn
