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

from .._log import logger_for
from .._runtime import RUNTIME
from ..config import CheckpointConfig
from ..errors import CollectiveTimeoutError

__all__ = ["Turn", "saves_in_flight", "take_turn", "wait_for_saves_in_flight"]


@dataclass
class Turn:
    """One save's place in the namespace's order."""

    step: int | None
    previous: Turn | None
    config: CheckpointConfig | None = None
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
        turn = Turn(step=step, previous=c.last_save.get(key), config=config)
        c.last_save[key] = turn
    return turn


def _elsewhere(turn: Turn) -> bool:
    """Whether ``turn`` runs (or ran) in the thread that takes turns, or in no thread here."""
    if not turn.started.is_set():
        return False
    runner = turn.runner
    return runner is None or runner is turn.taker or runner is threading.current_thread()


def saves_in_flight() -> list[Turn]:
    """Every save of this process that runs, or is about to run, on a thread of its own
    (an ``async_save``), oldest first per namespace."""
    c = RUNTIME.collectives
    with c.lock:
        newest = list(c.last_save.values())
    out: list[Turn] = []
    for turn in newest:
        chain: list[Turn] = []
        t: Turn | None = turn
        while t is not None:
            if not _elsewhere(t) and not (t.runner is not None and not t.runner.is_alive()):
                chain.append(t)
            t = t.previous
        out.extend(reversed(chain))
    return out


START_WAIT_S = 30.0
"""At most this long for a staged save's thread to start (DCP starts it at once)."""


def wait_for_saves_in_flight(why: str) -> list[Turn]:
    """Wait until every async save of this process has finished its collectives, each for
    at most its ``collective_timeout_s``; the saves still running after that."""
    left: list[Turn] = []
    for turn in saves_in_flight():
        config = turn.config
        timeout = config.collective_timeout_s if config is not None else 300.0
        if config is not None:
            logger_for(config).debug(
                "tierckpt: %s waits for the async save of step %s of namespace %r",
                why,
                turn.step,
                config.namespace,
            )
        deadline = time.monotonic() + timeout
        if not turn.started.wait(min(timeout, START_WAIT_S)):
            continue  # it never started here: it failed before its set-up
        runner = turn.runner
        if runner is None or runner is turn.taker or runner is threading.current_thread():
            continue
        runner.join(max(0.0, deadline - time.monotonic()))
        if runner.is_alive():
            left.append(turn)
            if config is not None:
                logger_for(config).warning(
                    "tierckpt: the async save of step %s of namespace %r still runs after "
                    "collective_timeout_s=%gs; %s goes on without it (the save may fail).",
                    turn.step,
                    config.namespace,
                    timeout,
                    why,
                )
    return left
