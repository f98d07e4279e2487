"""Which save is newest (generations), and what this process knows of each namespace's saves.

"Newest" is the newest *save*, not the highest step (DESIGN invariant 8). Every commit
carries a generation, higher for every later save of the namespace. A save A is
*abandoned* when a committed save B has ``B.generation > A.generation`` and
``B.step <= A.step``: the job rewound to an older step after A, so A's branch is never
chosen again and is the first to go. A re-save of a step abandons its earlier attempt.

The process-wide state used here (``RUNTIME.history``, one lock) is what a process saved,
restored, found unloadable, or is still uploading; it is lost with the process, by design.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from ._runtime import RUNTIME

__all__ = [
    "abandoned",
    "begin_upload",
    "marked_unloadable",
    "mark_unloadable",
    "newest_key",
    "next_generation",
    "observe",
    "uploading",
]

Save = tuple[int, str, int]
"""(step, attempt, generation) of one commit."""


def newest_key(step: int, generation: int, attempt: str = "") -> tuple[int, int, str]:
    """Sort key of saves: by generation, then step (commits without generations), then
    attempt id, so that every rank orders equal keys alike."""
    return (generation, step, attempt)


def observe(namespace: str, generation: int) -> None:
    """Remember that this process saved or restored a save of ``generation``."""
    with RUNTIME.history.lock:
        if generation > RUNTIME.history.newest_generation.get(namespace, 0):
            RUNTIME.history.newest_generation[namespace] = generation


def next_generation(namespace: str, reported: Iterable[int]) -> int:
    """The generation of a new save: newer than the clock, every rank's tier, and this process."""
    with RUNTIME.history.lock:
        seen = RUNTIME.history.newest_generation.get(namespace, 0)
    generation = max(time.time_ns(), 1 + max(reported, default=0), 1 + seen)
    observe(namespace, generation)
    return generation


def abandoned(saves: Iterable[Save]) -> set[tuple[int, str]]:
    """(step, attempt) of every save that a later save at the same or a lower step abandons."""
    by_generation: dict[int, set[tuple[int, str]]] = {}
    for step, attempt, generation in saves:
        by_generation.setdefault(generation, set()).add((step, attempt))
    out: set[tuple[int, str]] = set()
    lowest_newer: int | None = None  # lowest step among strictly newer saves
    for generation in sorted(by_generation, reverse=True):
        group = by_generation[generation]
        if lowest_newer is not None:
            out |= {s for s in group if s[0] >= lowest_newer}
        low = min(step for step, _ in group)
        lowest_newer = low if lowest_newer is None else min(lowest_newer, low)
    return out


def mark_unloadable(namespace: str, step: int, attempt: str) -> None:
    with RUNTIME.history.lock:
        RUNTIME.history.unloadable.add((namespace, step, attempt))


def marked_unloadable(namespace: str, step: int, attempt: str) -> bool:
    with RUNTIME.history.lock:
        return (namespace, step, attempt) in RUNTIME.history.unloadable


def begin_upload(namespace: str, step: int, attempt: str, attempts: Iterable[str]) -> None:
    """A durable save coordinated here: its ranks' uploads may be under way on any node."""
    with RUNTIME.history.lock:
        saves = RUNTIME.history.uploading.setdefault(namespace, {})
        saves[(step, attempt)] = saves.get((step, attempt), frozenset()) | frozenset(attempts)


def uploading_steps(namespace: str, durable_commits: dict[int, str]) -> set[int]:
    """Steps of durable saves coordinated here and not yet durably committed.

    With DCP's plan caching the coordinator learns its ranks' attempts only at the memory
    commit, after their uploads began: durable retention leaves these steps alone.
    """
    with RUNTIME.history.lock:
        saves = RUNTIME.history.uploading.get(namespace, {})
        return {step for step, attempt in saves if durable_commits.get(step) != attempt}


def uploading(namespace: str, durable_commits: dict[int, str]) -> set[str]:
    """Attempts of durable saves coordinated here and not yet durably committed.

    ``durable_commits`` (step -> coordinator attempt in the durable tier) retires saves
    whose durable commit is written.
    """
    with RUNTIME.history.lock:
        saves = RUNTIME.history.uploading.get(namespace, {})
        for key in [k for k in saves if durable_commits.get(k[0]) == k[1]]:
            del saves[key]
        return {a for attempts in saves.values() for a in attempts}
