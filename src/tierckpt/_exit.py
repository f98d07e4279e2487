"""Background jobs of tierckpt, and the bounded wait for them at interpreter exit.

Jobs started with ``wait_at_exit`` (drains, durable commits, resumes) are registered in
``RUNTIME.drains.pending`` until they finish. At normal interpreter exit they are awaited
for at most ``durable_exit_wait_s``; what that abandons is logged as an ERROR and resumed
by the next run (its steps stay committed in memory).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from ._runtime import RUNTIME

__all__ = ["run_in_background", "set_exit_wait", "wait_at_exit", "wait_for_drains"]

T = TypeVar("T")


def run_in_background(
    fn: Callable[[], T],
    *,
    name: str,
    wait_at_exit: bool = True,
    exit_note: tuple[logging.Logger, str] | None = None,
) -> Future[T]:
    """Run ``fn`` on a daemon thread; its future completes with the result or the error.

    Jobs with ``wait_at_exit`` are awaited (for at most ``durable_exit_wait_s``) when the
    interpreter exits normally, so the last durable step of a finished run is not cut
    off; ``exit_note`` names the job in the ERROR line logged if the wait gives up.
    """
    fut: Future[T] = Future()
    drains = RUNTIME.drains

    def body() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:
            fut.set_exception(e)
        finally:
            with drains.lock:
                drains.pending.pop(fut, None)

    if wait_at_exit:
        with drains.lock:
            drains.pending[fut] = exit_note
    threading.Thread(target=body, name=name, daemon=True).start()
    return fut


def wait_for_drains(timeout: float | None = None) -> bool:
    """Wait for this process's uploads and durable commits; True if all finished.

    Retries of failed drains are not waited for (see ``tierckpt.pending_drains``).
    """
    deadline = None if timeout is None else time.monotonic() + timeout
    drains = RUNTIME.drains
    while True:
        with drains.lock:
            pending = list(drains.pending)
        if not pending:
            return True
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        try:
            pending[0].exception(timeout=left)
        except TimeoutError:
            return False


def set_exit_wait(seconds: float) -> None:
    """Bound the exit wait by ``seconds`` (the longest any config of this process asked for)."""
    drains = RUNTIME.drains
    with drains.lock:
        drains.exit_wait_s = (
            seconds if not drains.exit_wait_set else max(drains.exit_wait_s, seconds)
        )
        drains.exit_wait_set = True


def wait_at_exit() -> bool:
    """What runs at interpreter exit: wait at most the exit bound, log what is abandoned.

    Abandoned work is not lost: the steps stay committed in memory and the next writer or
    reader of the namespace resumes their drains. True if everything finished.
    """
    drains = RUNTIME.drains
    t0 = time.monotonic()
    if wait_for_drains(timeout=drains.exit_wait_s):
        return True
    waited = time.monotonic() - t0
    with drains.lock:
        notes = [n for f, n in drains.pending.items() if not f.done()]
    for note in notes:
        log, what = note if note is not None else (logging.getLogger("tierckpt"), "A drain")
        log.error(
            f"{what} abandoned at exit after waiting {waited:.1f}s (durable_exit_wait_s); the "
            "step stays committed in memory and the next run resumes its drain "
            "(tierckpt.resume_pending)."
        )
    return False


atexit.register(wait_at_exit)
