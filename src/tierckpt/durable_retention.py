"""Durable-tier retention: keep the newest K steps (and every Mth), sweep stray uploads.

Runs in the background after each durable commit; a failed delete is logged, not raised.
A step is deleted commit-first, so it turns invisible before its files go.
"""

from __future__ import annotations

import logging

from . import layout
from .catalog import StepCatalog
from .config import CheckpointConfig
from .tiers.base import Tier
from .tiers.memory import MemoryTier

__all__ = ["durable_steps_to_keep", "sweep_durable"]


def durable_steps_to_keep(
    steps: list[int], keep_last: int | None, keep_every: int | None
) -> set[int]:
    """The committed durable steps that retention keeps."""
    if keep_last is None:
        return set(steps)
    keep = set(sorted(steps)[-keep_last:])
    if keep_every:
        keep |= {s for s in steps if s % keep_every == 0}
    return keep


def sweep_durable(config: CheckpointConfig, durable: Tier, log: logging.Logger) -> list[int]:
    """Apply durable retention and remove stray objects; returns the steps deleted."""
    ns = config.namespace
    catalog = StepCatalog(durable, ns, log)
    memory = StepCatalog(MemoryTier(config.memory_root or ""), ns, log)
    deleted: list[int] = []
    try:
        committed = catalog.committed()
    except Exception as e:
        log.warning("Durable retention skipped: listing %s failed: %s", durable.url, e)
        return deleted
    keep = durable_steps_to_keep(
        sorted(committed), config.durable_keep_last, config.durable_keep_every
    )
    newest = max(committed) if committed else None
    for step in catalog.steps():
        try:
            if step in committed:
                if step not in keep:
                    durable.delete(catalog.key(step, layout.COMMIT_NAME))
                    durable.delete_prefix(layout.step_dir(ns, step))
                    deleted.append(step)
                    log.info("Durable retention deleted step %d from %s.", step, durable.url)
                elif step != newest:
                    _delete_superseded(catalog, step, committed[step].files())
            elif newest is not None and step < newest and not _draining(memory, step):
                log.info(
                    "Removing stray objects of uncommitted step %d from %s.", step, durable.url
                )
                durable.delete_prefix(layout.step_dir(ns, step))
        except Exception as e:
            log.warning("Durable retention could not clean step %d in %s: %s", step, durable.url, e)
    return deleted


def _draining(memory: StepCatalog, step: int) -> bool:
    """True when the memory tier holds a durable step whose upload may still be under way."""
    record = memory.commit(step)
    return record is not None and record.durable


def _delete_superseded(catalog: StepCatalog, step: int, live: dict[str, int]) -> None:
    for name in catalog.files(step):
        if name != layout.COMMIT_NAME and name not in live and layout.attempt_of(name):
            catalog.tier.delete(catalog.key(step, name))
