"""Durable-tier retention: keep the newest K saves (and every Mth step), sweep stray uploads.

Runs in the background after each durable commit; a failed delete is logged, not raised.
A step is deleted commit-first, so it turns invisible before its files go. Saves a rewind
abandoned go first; only names tierckpt writes are deleted, and never those of an attempt
still in use (a lease on this node, a memory commit still draining, an upload this
process coordinates). A step with an unreadable commit and files tierckpt did not write
are left in place and reported.
"""

from __future__ import annotations

import logging

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
from .config import CheckpointConfig
from .history import newest_key, uploading, uploading_steps
from .manifest import CommitRecord
from .retention import abandoned_steps
from .tiers.base import Tier
from .tiers.memory import MemoryTier

__all__ = ["durable_steps_to_keep", "sweep_durable"]


def durable_steps_to_keep(
    committed: dict[int, CommitRecord], keep_last: int | None, keep_every: int | None
) -> set[int]:
    """The committed durable steps that retention keeps.

    Without ``keep_last`` every step. Else the ``keep_last`` newest saves (by generation)
    that no rewind abandoned, plus those of them whose step is a multiple of ``keep_every``.
    """
    if keep_last is None:
        return set(committed)
    gone = abandoned_steps(committed)
    kept = sorted(
        (s for s in committed if s not in gone),
        key=lambda s: newest_key(s, committed[s].generation),
    )
    keep = set(kept[-keep_last:])
    if keep_every:
        keep |= {s for s in kept if s % keep_every == 0}
    return keep


def _attempts(record: CommitRecord) -> set[str]:
    return {record.attempt} | {r.attempt for r in record.ranks}


def _in_use(
    config: CheckpointConfig, durable_commits: dict[int, CommitRecord], log: logging.Logger
) -> set[str]:
    """Attempts whose durable files may still be uploading or needed for a drain."""
    ns = config.namespace
    memory = MemoryTier(config.memory_root or "")
    out = live_attempts(memory, ns)
    for step, record in StepCatalog(memory, ns, log).committed().items():
        durable = durable_commits.get(step)
        if record.durable and (durable is None or durable.attempt != record.attempt):
            out |= _attempts(record)  # its drain may still be under way
    out |= uploading(ns, {s: r.attempt for s, r in durable_commits.items()})
    return out


def sweep_durable(config: CheckpointConfig, durable: Tier, log: logging.Logger) -> list[int]:
    """Apply durable retention and remove stray objects; returns the steps deleted."""
    ns = config.namespace
    catalog = StepCatalog(durable, ns, log)
    deleted: list[int] = []
    try:
        steps = catalog.steps()
        commits = {step: catalog.read_commit(step) for step in steps}
    except Exception as e:
        log.warning("Durable retention skipped: listing %s failed: %s", durable.url, e)
        return deleted
    committed = {s: r for s, (r, _) in commits.items() if r is not None}
    keep = durable_steps_to_keep(committed, config.durable_keep_last, config.durable_keep_every)
    in_use = _in_use(config, committed, log)
    busy = uploading_steps(ns, {s: r.attempt for s, r in committed.items()})
    highest = max(committed, default=None)
    for step in steps:
        record, problem = commits[step]
        if step in busy:
            continue  # a save of this step is uploading; its ranks' attempts may be unknown
        try:
            if problem is not None:
                warn_unreadable(catalog, step, problem, log)
                continue
            names = step_names(catalog, step)
            if record is not None and step not in keep:
                retire_step(catalog, step, keep=in_use - _attempts(record))
                deleted.append(step)
                log.debug("Durable retention deleted step %d from %s.", step, durable.url)
            elif record is not None:
                # Superseded attempts' files. An attempt still uploading is in ``in_use``: the
                # coordinator (which takes part in every save) holds its lease, its memory
                # commit or its upload registration.
                remove_files(catalog, step, names, keep=in_use | _attempts(record))
            elif record is None and highest is not None and step < highest:
                # Uploads of saves above every committed step may still be under way on
                # another node; those wait for a later commit.
                if remove_files(catalog, step, names, keep=in_use):
                    log.info(
                        "Removed stray objects of uncommitted step %d from %s.", step, durable.url
                    )
                remove_dir_if_empty(catalog, step)
            warn_foreign(catalog, step, names, log)
        except Exception as e:
            log.warning("Durable retention could not clean step %d in %s: %s", step, durable.url, e)
    return deleted
