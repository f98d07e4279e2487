"""The checkpointer recovery needs, and an adapter over ``tierckpt.async_save`` / ``load``.

:class:`Checkpointer` is the subset of ``tierckpt.CheckpointManager`` the wrapper uses
(``save(step, state) -> bool``, ``restore(state, step=None) -> int | None``, ``wait()``);
:class:`ApiCheckpointer` implements it over the public calls until the manager lands.
"""

from __future__ import annotations

import contextlib
import datetime
from concurrent.futures import Future
from typing import Any, Protocol, runtime_checkable

import torch.distributed as dist

from .. import api
from ..config import CheckpointConfig
from ..errors import CheckpointNotFoundError

__all__ = ["ApiCheckpointer", "Checkpointer"]


@runtime_checkable
class Checkpointer(Protocol):
    """Saves a step's state (async, one in flight) and restores the newest restorable save."""

    def save(self, step: int, state: dict[str, Any]) -> bool:
        """Start saving ``state`` as ``step`` when the policy says so; whether it did."""

    def restore(self, state: dict[str, Any], step: int | None = None) -> int | None:
        """Load ``step`` (default: the newest restorable save) into ``state`` in place;
        the step loaded, or None when there is none. Collective."""

    def wait(self) -> None:
        """Wait for the save in flight."""


class ApiCheckpointer:
    """``tierckpt.async_save`` every ``every_steps`` (also durable every
    ``durable_every_steps``) on a gloo group of its own, ``tierckpt.load`` to restore.

    Call :meth:`reform` after the default group was re-formed (the wrapper does).
    ``timeout_s`` bounds each collective of the save's own group: a save in flight when a
    fault hit may be blocked in one (aborting a gloo group does not interrupt an operation
    that another thread of the process is running), and is abandoned after it.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        every_steps: int = 1,
        durable_every_steps: int | None = None,
        timeout_s: float = 60.0,
    ) -> None:
        self.config = config
        self.every_steps = every_steps
        self.durable_every_steps = durable_every_steps
        self.timeout_s = timeout_s
        self._future: Future[Any] | None = None
        self._group: dist.ProcessGroup | None = None

    def reform(self) -> None:
        """Drop the save in flight (its group is gone) and make a group on the new default."""
        if self._future is not None:
            with contextlib.suppress(BaseException):
                self._future.result(timeout=self.timeout_s + 5.0)
            self._future = None
        self._group = None
        if dist.is_initialized():
            self._group = dist.new_group(
                backend="gloo", timeout=datetime.timedelta(seconds=self.timeout_s)
            )

    def save(self, step: int, state: dict[str, Any]) -> bool:
        if step % self.every_steps != 0:
            return False
        self.wait()
        durable = bool(self.durable_every_steps) and step % (self.durable_every_steps or 1) == 0
        self._future = api.async_save(
            state, config=self.config, step=step, save_to_durable=durable, process_group=self._group
        )
        return True

    def restore(self, state: dict[str, Any], step: int | None = None) -> int | None:
        self.wait()
        try:
            return api.load(state, config=self.config, step=step, process_group=self._group)
        except CheckpointNotFoundError:
            return None

    def wait(self) -> None:
        if self._future is not None:
            fut, self._future = self._future, None
            fut.result()
