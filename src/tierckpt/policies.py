"""Small policy objects: when :class:`~tierckpt.CheckpointManager` saves, and what it keeps.

A *save policy* has one method, ``should_save(ctx) -> bool``, and one attribute,
``deterministic``: True when the answer depends only on the step (every rank computes the
same answer), False when it depends on something else such as the clock; then the manager
uses rank 0's answer on every rank. A *retention policy* has one method,
``keep(steps) -> set[int]``: given the durable tier's committed saves, oldest save first,
the steps to keep (the newest save is always kept as well). Write your own by following
either protocol; :class:`AnyOf` combines both kinds.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from .errors import ConfigError

__all__ = [
    "AnyOf",
    "EveryNSeconds",
    "EveryNSteps",
    "KeepEveryM",
    "KeepLastK",
    "Never",
    "RetentionPolicy",
    "SaveContext",
    "SavePolicy",
]


@dataclass(frozen=True)
class SaveContext:
    """What a save policy may look at."""

    step: int
    """The step offered to :meth:`CheckpointManager.save`."""
    now: float
    """``time.monotonic()`` at the call."""
    last_step: int | None
    """The step of the previous save this manager started (or restored), None if none."""
    last_time: float | None
    """``time.monotonic()`` when that save started (or the manager was built)."""


@runtime_checkable
class SavePolicy(Protocol):
    """Decides whether a step is saved."""

    deterministic: bool
    """True when the decision depends only on the step (no agreement between ranks needed)."""

    def should_save(self, ctx: SaveContext) -> bool: ...


@runtime_checkable
class RetentionPolicy(Protocol):
    """Decides which committed durable steps stay."""

    def keep(self, steps: Sequence[int]) -> set[int]: ...


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: must be an int >= 1.")
    return value


class EveryNSteps:
    """Save every step that is a multiple of ``n`` (``n=1``: every step)."""

    deterministic = True

    def __init__(self, n: int) -> None:
        self.n = _positive_int("every_steps", n)

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step % self.n == 0

    def __repr__(self) -> str:
        return f"EveryNSteps({self.n})"


class EveryNSeconds:
    """Save when ``seconds`` have passed since the previous save (rank 0's clock decides)."""

    deterministic = False

    def __init__(self, seconds: float) -> None:
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
            raise ConfigError(f"every_seconds={seconds!r}: must be a number of seconds > 0.")
        self.seconds = float(seconds)

    def should_save(self, ctx: SaveContext) -> bool:
        since = ctx.last_time if ctx.last_time is not None else time.monotonic()
        return ctx.now - since >= self.seconds

    def __repr__(self) -> str:
        return f"EveryNSeconds({self.seconds:g})"


class Never:
    """Never save (e.g. the durable policy when nothing goes to the durable tier)."""

    deterministic = True

    def should_save(self, ctx: SaveContext) -> bool:
        return False

    def keep(self, steps: Sequence[int]) -> set[int]:
        return set()

    def __repr__(self) -> str:
        return "Never()"


class KeepLastK:
    """Keep the ``k`` newest saves."""

    def __init__(self, k: int) -> None:
        self.k = _positive_int("keep_last", k)

    def keep(self, steps: Sequence[int]) -> set[int]:
        return set(steps[-self.k :])

    def __repr__(self) -> str:
        return f"KeepLastK({self.k})"


class KeepEveryM:
    """Keep every step that is a multiple of ``m`` (milestones)."""

    def __init__(self, m: int) -> None:
        self.m = _positive_int("keep_every", m)

    def keep(self, steps: Sequence[int]) -> set[int]:
        return {s for s in steps if s % self.m == 0}

    def __repr__(self) -> str:
        return f"KeepEveryM({self.m})"


class AnyOf:
    """Save when any policy says so; keep what any policy keeps."""

    def __init__(self, *policies: object) -> None:
        if not policies:
            raise ConfigError("AnyOf() needs at least one policy.")
        self.policies = policies

    @property
    def deterministic(self) -> bool:
        return all(getattr(p, "deterministic", False) for p in self.policies)

    def should_save(self, ctx: SaveContext) -> bool:
        return any(p.should_save(ctx) for p in self.policies)  # type: ignore[attr-defined]

    def keep(self, steps: Sequence[int]) -> set[int]:
        out: set[int] = set()
        for p in self.policies:
            out |= p.keep(steps)  # type: ignore[attr-defined]
        return out

    def __repr__(self) -> str:
        return f"AnyOf({', '.join(map(repr, self.policies))})"
