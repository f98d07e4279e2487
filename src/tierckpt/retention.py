"""Memory-tier retention: keep the newest steps, stay under the budget, sweep debris.

Rules (DESIGN invariants 5, 8, 9): the newest save (highest generation) is never evicted,
nor a step whose durable drain is still pending; saves a rewind abandoned go first.
Half-written steps (no COMMIT, attempts whose leases are not live) and files of superseded
attempts are removed; only names tierckpt writes are ever deleted.
"""

from __future__ import annotations

import logging

from . import layout, nodemem
from ._faults import crash_point
from .catalog import StepCatalog
from .cleanup import (
    live_attempts,
    remove_dir_if_empty,
    remove_files,
    retire_step,
    step_names,
    warn_foreign,
    warn_unreadable,
)
from .errors import MemoryBudgetError
from .history import abandoned, newest_key
from .manifest import CommitRecord
from .staging import StagingPool, release_deleted_mappings
from .tiers.memory import MemoryTier

__all__ = ["abandoned_steps", "drain_pending", "evict", "make_room", "sweep"]


def evict(
    catalog: StepCatalog,
    step: int,
    record: CommitRecord | None = None,
    live: set[str] | None = None,
    *,
    recycle: bool = True,
) -> None:
    """Remove a committed step: its COMMIT first (invisible), then the files tierckpt wrote.

    Data files go to the staging pool (unless ``recycle`` is False: the budget needs the
    bytes freed). Files of other live attempts (a re-save of this step
    under way) and files tierckpt did not write stay; the directory goes once it is empty.
    ``record``, when given, must still be the step's commit (else nothing is evicted).
    """
    tier = catalog.tier
    if live is None:
        live = live_attempts(tier, catalog.namespace) if isinstance(tier, MemoryTier) else set()
    current, _ = catalog.read_commit(step)
    if record is not None and (current is None or current.attempt != record.attempt):
        return  # re-committed (or gone) since the decision: not ours to evict now
    keep = set(live)
    if current is not None:
        keep -= {current.attempt} | {r.attempt for r in current.ranks}

    def recycle_data(names: list[str]) -> None:
        if isinstance(tier, MemoryTier) and recycle:
            pool = StagingPool(tier, catalog.namespace)
            data = [
                n
                for n in names
                if n.endswith(".data") and layout.is_ours(n) and layout.attempt_of(n) not in keep
            ]
            for name in data:
                pool.recycle(tier.path(catalog.key(step, name)), keep=len(data))
        crash_point("evict.mid")

    names = retire_step(catalog, step, keep, before_files=recycle_data)
    warn_foreign(catalog, step, names, catalog.log)


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


def abandoned_steps(committed: dict[int, CommitRecord]) -> set[int]:
    """Committed steps of one tier that a later save at the same or a lower step abandons."""
    saves = ((s, r.attempt, r.generation) for s, r in committed.items())
    return {step for step, _ in abandoned(saves)}


def fully_replicated(record: CommitRecord, listing: dict[str, int]) -> bool:
    """Whether every part of ``record`` that this node holds as its own (a manifest with no
    ``.replica`` marker beside it) is marked ``.replicated``."""
    for entry in record.ranks:
        if entry.manifest not in listing:
            continue
        if layout.replica_name(entry.attempt, entry.rank) in listing:
            continue  # a replica of another node's part
        if layout.replicated_name(entry.attempt, entry.rank) not in listing:
            return False
    return True


def _newest_replicated(
    catalog: StepCatalog, committed: dict[int, CommitRecord], order: list[int], gone: set[int]
) -> list[int]:
    """The newest save that is fully replicated, kept while newer ones are not yet (so that
    losing this node leaves a restorable save); nothing when replication is off."""
    for step in reversed(order):
        record = committed[step]
        if record.peer_replicas <= 0 or step in gone:
            continue
        if fully_replicated(record, catalog.files(step)):
            return [step]
    return []


def _evictable(catalog: StepCatalog, committed: dict[int, CommitRecord]) -> list[int]:
    """Committed steps that may be evicted: abandoned ones first, then oldest save first.

    Never the newest save (highest generation), nor a step whose drain is pending.
    """
    if not committed:
        return []
    order = sorted(committed, key=lambda s: newest_key(s, committed[s].generation))
    newest = order[-1]
    gone = abandoned_steps(committed)
    keep = {newest, *_newest_replicated(catalog, committed, order, gone)}
    out = [s for s in order if s not in keep and not drain_pending(committed[s], catalog.files(s))]
    return [s for s in out if s in gone] + [s for s in out if s not in gone]


def _scan(catalog: StepCatalog, live: set[str], log: logging.Logger) -> dict[int, CommitRecord]:
    """Committed steps; removes half-written ones (no COMMIT, attempts not live) on the way.

    A step whose COMMIT cannot be parsed is left alone, and so is every file tierckpt did
    not write: both are reported once.
    """
    committed: dict[int, CommitRecord] = {}
    for step in catalog.steps():
        record, problem = catalog.read_commit(step)
        if problem is not None:
            warn_unreadable(catalog, step, problem, log)
            continue
        if record is not None:
            committed[step] = record
            continue
        names = step_names(catalog, step)
        stale = [
            n
            for n in names
            if n != layout.COMMIT_NAME and layout.is_ours(n) and layout.attempt_of(n) not in live
        ]
        if stale:
            log.info(
                "Removing half-written step %d from the memory tier (its attempts %s are no "
                "longer live).",
                step,
                sorted({layout.attempt_of(n) or n for n in stale}),
            )
            remove_files(catalog, step, stale, keep=live)
        warn_foreign(catalog, step, names, log)
        remove_dir_if_empty(catalog, step)
    return committed


def sweep(catalog: StepCatalog, keep_last: int, log: logging.Logger) -> int:
    """Apply ``keep_last`` (abandoned saves go first and do not count), remove half-written
    steps of attempts no longer live, and files of superseded attempts.

    Returns how many committed steps remain.
    """
    tier = catalog.tier
    live: set[str] = set()
    if isinstance(tier, MemoryTier):
        StagingPool(tier, catalog.namespace).sweep_orphans()
        live = live_attempts(tier, catalog.namespace)
    committed = _scan(catalog, live, log)
    gone = abandoned_steps(committed)
    excess = len(committed) - len(gone) - keep_last
    for step in _evictable(catalog, committed):
        if step in gone:
            log.info("Evicting step %d from the memory tier: a later save rewound past it.", step)
        elif excess > 0:
            excess -= 1
            log.debug(
                "Evicting step %d from the memory tier (memory_keep_last=%d).", step, keep_last
            )
        else:
            continue
        evict(catalog, step, committed[step], live)
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
            evict(catalog, step, committed[step], recycle=False)
        release_deleted_mappings()
        used = tier.usage_bytes()
        if used + needed <= budget:
            return
    if nodemem.release_expired(tier.root, log, exclude=catalog.namespace):
        used = tier.usage_bytes()  # finished jobs' namespaces whose memory_ttl passed
        if used + needed <= budget:
            return
    raise MemoryBudgetError(
        f"The memory tier at {tier.root} holds {used} bytes; {needed} more would exceed the "
        f"budget of {budget} bytes and no step of namespace {catalog.namespace} may be evicted "
        "(the newest committed step and steps still draining to the durable tier are kept). "
        f"{nodemem.budget_help(tier.root)} Or raise memory_budget, save less often, or wait "
        "for pending durable drains."
    )
