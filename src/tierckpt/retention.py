"""Memory-tier retention: keep the newest steps, stay under the budget, sweep debris.

Rules (DESIGN invariant 5): the newest committed step is never evicted, nor a step
whose durable drain is still pending. Half-written steps older than the newest
committed one, and files of superseded attempts, are removed.
"""

from __future__ import annotations

import logging

from . import layout
from ._faults import crash_point
from .catalog import StepCatalog
from .errors import MemoryBudgetError
from .manifest import CommitRecord
from .staging import StagingPool, release_deleted_mappings
from .tiers.memory import MemoryTier

__all__ = ["drain_pending", "evict", "make_room", "sweep"]


def evict(catalog: StepCatalog, step: int) -> None:
    """Remove a step from the memory tier, recycling its data files as staging buffers."""
    tier = catalog.tier
    if isinstance(tier, MemoryTier):
        pool = StagingPool(tier, catalog.namespace)
        data = [n for n in catalog.files(step) if n.endswith(".data")]
        for name in data:
            pool.recycle(tier.path(catalog.key(step, name)), keep=len(data))
    crash_point("evict.mid")
    tier.delete_prefix(layout.step_dir(catalog.namespace, step))


def drain_pending(record: CommitRecord, listing: dict[str, int]) -> bool:
    """True while a part of a durable step held on this node is not yet in the durable tier.

    Parts written on other nodes (their manifests are not in ``listing``) are those nodes'
    concern: each node's retention protects its own parts. A part whose failed drain was
    given up (``.unpinned``, see ``durable_max_pending_steps``) protects nothing.
    """
    if not record.durable:
        return False
    return any(
        r.manifest in listing
        and layout.drained_name(r.attempt, r.rank) not in listing
        and layout.unpinned_name(r.attempt, r.rank) not in listing
        for r in record.ranks
    )


def _evictable(catalog: StepCatalog, committed: dict[int, CommitRecord]) -> list[int]:
    """Committed steps that may be evicted, oldest first."""
    if not committed:
        return []
    newest = max(committed)
    out = []
    for step in sorted(committed):
        if step == newest:
            continue
        if drain_pending(committed[step], catalog.files(step)):
            continue
        out.append(step)
    return out


def sweep(catalog: StepCatalog, keep_last: int, log: logging.Logger) -> int:
    """Apply ``keep_last``, remove half-written steps and superseded attempt files.

    Returns how many committed steps remain.
    """
    tier = catalog.tier
    if isinstance(tier, MemoryTier):
        StagingPool(tier, catalog.namespace).sweep_orphans()
    committed = catalog.committed()
    newest = max(committed) if committed else None
    for step in catalog.steps():
        if step in committed:
            continue
        if newest is not None and step < newest:
            log.info("Removing half-written step %d from the memory tier.", step)
            tier.delete_prefix(layout.step_dir(catalog.namespace, step))
    evictable = _evictable(catalog, committed)
    excess = len(committed) - keep_last
    for step in evictable[: max(excess, 0)]:
        log.info("Evicting step %d from the memory tier (memory_keep_last=%d).", step, keep_last)
        evict(catalog, step)
        del committed[step]
    for step, record in committed.items():
        _remove_superseded(catalog, step, record)
    release_deleted_mappings()
    return len(committed)


def _remove_superseded(catalog: StepCatalog, step: int, record: CommitRecord) -> None:
    """Delete files of earlier attempts of a committed step.

    A file goes only when its attempt is not named by the commit AND that attempt's lease
    is not live (its writer finished, failed or died). Never judged by mtime or pid: a
    recycled buffer keeps an old mtime, and another rank may be re-saving this step now.
    """
    import os

    from .leases import LEASE_DIR, is_live, lease_name

    tier = catalog.tier
    if not isinstance(tier, MemoryTier):
        return
    ns_dir = tier.path(catalog.namespace)
    named = {r.attempt for r in record.ranks} | {record.attempt}
    files = catalog.files(step)
    try:  # listed after the files: a file's lease is taken before the file is written
        leases = os.listdir(os.path.join(ns_dir, LEASE_DIR))
    except FileNotFoundError:
        leases = []
    for name in files:
        attempt = layout.attempt_of(name)
        if attempt is None or attempt in named:
            continue
        rank = name[len(attempt) :].removeprefix("-r").split(".", 1)[0]
        if name[len(attempt) :].startswith("-r") and rank.isdigit():  # <attempt>-r<rank>.*
            live = is_live(ns_dir, lease_name(attempt, int(rank)))
        else:  # e.g. <attempt>.metadata: any rank of that attempt
            live = any(n.startswith(f"{attempt}-r") and is_live(ns_dir, n) for n in leases)
        if not live:
            tier.delete(catalog.key(step, name))


def make_room(catalog: StepCatalog, needed: int, budget: int | None, log: logging.Logger) -> None:
    """Evict the oldest evictable steps until ``needed`` more bytes fit in ``budget``.

    Callers hold the node's ``staging.budget_lock`` around this check and the allocation
    it admits, so the ranks of a node never exceed the budget together.
    """
    if budget is None:
        return
    tier = catalog.tier
    assert isinstance(tier, MemoryTier)
    if needed > budget:
        raise MemoryBudgetError(
            f"A save of {needed} bytes on this rank exceeds the whole memory budget of {budget} "
            f"bytes ({tier.root}): raise memory_budget or shard the state over more ranks."
        )
    used = tier.usage_bytes()
    if used + needed <= budget:
        return
    StagingPool(tier, catalog.namespace).drop(used + needed - budget)
    committed = catalog.committed()
    for step in [None, *_evictable(catalog, committed)]:
        if step is not None:
            log.info("Evicting step %d from the memory tier to stay under the budget.", step)
            tier.delete_prefix(layout.step_dir(catalog.namespace, step))
        release_deleted_mappings()
        used = tier.usage_bytes()
        if used + needed <= budget:
            return
    raise MemoryBudgetError(
        f"The memory tier at {tier.root} holds {used} bytes; {needed} more would exceed the "
        f"budget of {budget} bytes and no step may be evicted (the newest committed step and "
        "steps still draining to the durable tier are kept). Raise memory_budget, save less "
        "often, or wait for pending durable drains."
    )
