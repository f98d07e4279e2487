"""Durable retention with a policy object, planned first and applied on request.

``plan_gc`` lists what a :class:`~tierckpt.policies.RetentionPolicy` keeps and deletes
among the durable tier's committed saves (the newest save is always kept; saves a rewind
abandoned are always deleted); ``apply_gc`` deletes them the way the background retention
does (``retire_step``: commit first, only names tierckpt writes, never an attempt in use).
``tierckpt gc`` and :class:`~tierckpt.CheckpointManager`'s ``keep=`` use both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from .catalog import StepCatalog
from .cleanup import retire_step
from .config import CheckpointConfig
from .durable_retention import _attempts, _in_use
from .history import newest_key
from .policies import RetentionPolicy
from .retention import abandoned_steps
from .tiers.base import Tier

__all__ = ["GcPlan", "apply_gc", "plan_gc"]


@dataclass
class GcPlan:
    """What retention would do now."""

    keep: list[int] = field(default_factory=list)
    delete: list[int] = field(default_factory=list)
    abandoned: list[int] = field(default_factory=list)
    """Deleted because a later rewind abandoned them (a subset of ``delete``)."""
    unreadable: list[int] = field(default_factory=list)
    """Steps whose COMMIT cannot be parsed: left in place."""
    sizes: dict[int, int] = field(default_factory=dict)


def plan_gc(
    config: CheckpointConfig, durable: Tier, policy: RetentionPolicy, log: logging.Logger
) -> GcPlan:
    """The steps ``policy`` keeps and deletes in ``durable``, oldest save first."""
    catalog = StepCatalog(durable, config.namespace, log)
    plan = GcPlan()
    committed = {}
    for step in catalog.steps():
        record, problem = catalog.read_commit(step)
        if problem is not None:
            plan.unreadable.append(step)
        elif record is not None:
            committed[step] = record
            plan.sizes[step] = sum(catalog.files(step).values())
    gone = abandoned_steps(committed)
    order = sorted(
        (s for s in committed if s not in gone),
        key=lambda s: newest_key(s, committed[s].generation),
    )
    keep = set(policy.keep(list(order))) | set(order[-1:])
    plan.keep = [s for s in order if s in keep]
    plan.abandoned = sorted(gone)
    plan.delete = [s for s in order if s not in keep] + plan.abandoned
    return plan


def apply_gc(
    config: CheckpointConfig, durable: Tier, plan: GcPlan, log: logging.Logger
) -> list[int]:
    """Delete ``plan.delete``; a failed delete is logged, not raised. The steps deleted."""
    catalog = StepCatalog(durable, config.namespace, log)
    committed = catalog.committed()
    in_use = _in_use(config, committed, log)
    deleted = []
    for step in plan.delete:
        record = committed.get(step)
        if record is None:
            continue
        try:
            retire_step(catalog, step, keep=in_use - _attempts(record))
        except Exception as e:
            log.warning("tierckpt gc could not delete step %d from %s: %s", step, durable.url, e)
            continue
        deleted.append(step)
    return deleted
