"""Preemption: a SIGTERM (what schedulers send before eviction) becomes a durable save.

The handler only records the signal; the manager acts at its next ``save()`` call, at a
step boundary, where the state is consistent: every rank agrees that some rank was signalled,
saves that step to the durable tier, waits for it within the grace period, and raises
:class:`Preempted` (a ``SystemExit``), so the process exits with its ``finally`` blocks run.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any

__all__ = ["Preempted", "PreemptionWatcher"]


class Preempted(SystemExit):
    """Raised by ``CheckpointManager.save`` once the preemption save is durable (or the grace
    period ran out). A ``SystemExit``: uncaught, the process exits with ``code``."""

    def __init__(self, code: int, step: int, durable: bool) -> None:
        super().__init__(code)
        self.step = step
        """The step saved on preemption."""
        self.durable = durable
        """True when its durable copy committed within the grace period."""


class PreemptionWatcher:
    """Records ``signals`` (default SIGTERM) from the moment :meth:`install` runs."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM,), log: Any = None) -> None:
        self.signals = tuple(signals)
        self.received_at: float | None = None
        """``time.monotonic()`` of the first signal, None while none arrived."""
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._log: logging.Logger = log or logging.getLogger("tierckpt")

    @property
    def requested(self) -> bool:
        return self.received_at is not None

    def install(self) -> bool:
        """Install the handlers (main thread only; elsewhere a warning and False)."""
        if threading.current_thread() is not threading.main_thread():
            self._log.warning(
                "tierckpt: preemption handling needs the main thread; SIGTERM is not handled."
            )
            return False
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return True

    def uninstall(self) -> None:
        """Put the previous handlers back."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig, old in self._previous.items():
            signal.signal(sig, old)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()
            self.signum = signum
            self._log.warning(
                "tierckpt: %s received: the next save() saves its step to the durable tier, "
                "then the process exits.",
                signal.Signals(signum).name,
            )
