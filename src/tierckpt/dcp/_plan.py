"""The data a ``TieredStorageWriter`` puts in DCP's save plans and write results.

DCP's plan caching (``DefaultSavePlanner(enable_plan_caching=True)``) replays an earlier
save's plans, storage data included, so nothing a save needs may come from a plan alone:

- each rank's local plan carries a per-save ``token`` (a nonce, not an attempt id) with what
  the coordinator may use as a hint (the newest commit in the rank's memory tier);
- the coordinator's global plan echoes each rank's token with its answer (durable or not,
  a commit to install); a rank follows that answer only when the echo is its own token,
  so a replayed (cached) global plan is recognised and ignored;
- the facts the commit is built from (each rank's step, attempt, generation, durable flag)
  travel in a :class:`PartReport`, one extra write result per rank, which DCP gathers
  anew for every save.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan
from torch.distributed.checkpoint.storage import WriteResult

from .._log import logger_for
from ..catalog import StepCatalog
from ..config import CheckpointConfig
from ..errors import ConfigError, InvalidStepError
from ..history import begin_upload, newest_key
from ..saving import last_commit
from ..tiers.memory import MemoryTier

__all__ = [
    "REPORT_INDEX",
    "GlobalPlan",
    "PartReport",
    "check_reports",
    "fresh_answer",
    "global_plans",
    "local_plan",
    "new_token",
    "report_result",
    "split_results",
]

REPORT_INDEX = MetadataIndex(fqn="\0tierckpt-part-report")
"""Index of the extra write result each rank returns (never a real item's index)."""


def new_token() -> str:
    """A per-save nonce that recognises a replayed plan (never an attempt id)."""
    return secrets.token_hex(8)


@dataclass(frozen=True)
class _LocalPlanData:
    rank: int
    token: str
    """This save's nonce on this rank; the coordinator echoes it back."""
    newest_committed: tuple[int, str] | None
    """(step, attempt) of the newest commit (by generation) in this rank's memory tier:
    only a hint for which ranks need the previous commit installed."""
    attempt_hint: str = ""
    """This rank's attempt when the plan is fresh; a replayed plan's is stale. Used only to
    protect (never to name) files of an upload in flight."""


@dataclass(frozen=True)
class _GlobalPlanData:
    durable: bool
    token: str | None = None
    """The token of the local plan this answers; another token means a replayed plan."""
    install: tuple[bytes, bytes] | None = None
    """(commit record, DCP metadata) of the previous step, for a node that lacks them."""


@dataclass(frozen=True)
class PartReport:
    """What a rank's part of this save is: sent as an extra write result, never cached."""

    rank: int
    step: int
    attempt: str
    durable: bool
    newest_generation: int
    """The highest generation among the commits in this rank's memory tier."""
    node_id: str = ""
    """This rank's node (ranks of one node share its memory tier)."""
    peer_address: tuple[str, int] | None = None
    """This rank's peer service (None in a one-node job)."""


@dataclass(frozen=True)
class GlobalPlan:
    """What the coordinator decided for a save."""

    plans: list[SavePlan]
    attempt_hints: dict[int, str]
    """Each rank's attempt as its plan reports it: exact without plan caching, possibly an
    earlier save's with it (never used to build a commit)."""


def local_plan(
    plan: SavePlan,
    memory: MemoryTier,
    config: CheckpointConfig,
    rank: int,
    token: str,
    attempt: str,
) -> tuple[SavePlan, int]:
    """``plan`` with this rank's storage data; and the highest generation among the
    commits in this rank's memory tier (for its :class:`PartReport`)."""
    catalog = StepCatalog(memory, config.namespace, logger_for(config))
    records = list(catalog.committed().values())
    top = max(records, key=lambda r: newest_key(r.step, r.generation), default=None)
    data = _LocalPlanData(
        rank=rank,
        token=token,
        newest_committed=(top.step, top.attempt) if top is not None else None,
        attempt_hint=attempt,
    )
    return dataclasses.replace(plan, storage_data=data), top.generation if top else 0


def report_result(report: PartReport) -> WriteResult:
    """``report`` as the extra write result of a rank's part."""
    return WriteResult(index=REPORT_INDEX, size_in_bytes=0, storage_data=report)


def split_results(
    results: list[list[WriteResult]],
) -> tuple[list[list[WriteResult]], list[PartReport | None]]:
    """Each rank's item results, and its :class:`PartReport` (None if it sent none)."""
    items: list[list[WriteResult]] = []
    reports: list[PartReport | None] = []
    for rank_results in results:
        report = None
        mine = []
        for wr in rank_results:
            if isinstance(wr.storage_data, PartReport):
                report = wr.storage_data
            else:
                mine.append(wr)
        items.append(mine)
        reports.append(report)
    return items, reports


def fresh_answer(plan: SavePlan, token: str) -> _GlobalPlanData | None:
    """The coordinator's answer to this save's local plan; None for a replayed plan."""
    glob = plan.storage_data
    if isinstance(glob, _GlobalPlanData) and glob.token == token:
        return glob
    return None


def global_plans(
    plans: list[SavePlan],
    memory: MemoryTier,
    config: CheckpointConfig,
    step: int,
    attempt: str,
    save_to_durable: bool,
) -> GlobalPlan:
    """The coordinator's answer to every rank's local plan.

    A replayed plan (DCP's plan caching) has no storage data or an earlier save's: the
    answer then echoes no token, or that stale one, and its rank ignores it.
    """
    if len(plans) != config.world_size:
        raise ConfigError(
            f"CheckpointConfig.world_size={config.world_size} but {len(plans)} ranks are "
            "saving: set world_size=dist.get_world_size()."
        )
    infos = [p.storage_data if isinstance(p.storage_data, _LocalPlanData) else None for p in plans]
    ns = config.namespace
    if save_to_durable:  # other nodes' uploads start before the memory commit
        # Attempts from replayed plans are stale: they only protect more. The save's step
        # is protected as a whole until its durable commit, whatever its ranks' attempts.
        reported = {i.attempt_hint for i in infos if i is not None and i.attempt_hint}
        begin_upload(ns, step, attempt, reported | {attempt})
    # The memory commit is written on this (the coordinator's) node; ranks on other nodes
    # get the previous step's commit with this plan and install it in their own tier.
    last = last_commit(memory, ns)
    out = []
    for plan, info in zip(plans, infos, strict=True):
        install = None
        if info is not None and last is not None and info.newest_committed != (last[0], last[1]):
            install = (last[2], last[3])
        glob = _GlobalPlanData(
            durable=save_to_durable, token=info.token if info else None, install=install
        )
        out.append(dataclasses.replace(plan, storage_data=glob))
    hints = {r: i.attempt_hint for r, i in enumerate(infos) if i is not None and i.attempt_hint}
    return GlobalPlan(out, hints)


def check_reports(
    reports: Sequence[PartReport | None], step: int, durable: bool
) -> list[PartReport]:
    """Every rank's report, checked: one per rank, the same step and durable flag."""
    missing = [r for r, rep in enumerate(reports) if rep is None]
    if missing:
        raise ConfigError(
            f"Ranks {missing} sent no tierckpt part report: every rank must save with a "
            "TieredStorageWriter of the same namespace."
        )
    got = [rep for rep in reports if rep is not None]
    steps = {rep.step for rep in got}
    if steps != {step}:
        raise InvalidStepError(
            f"Ranks disagree on the step being saved: {sorted(steps | {step})}. "
            "Give every rank the same step."
        )
    flags = {rep.durable for rep in got}
    if flags != {durable}:
        raise ConfigError(
            "Ranks disagree on save_to_durable for this save (with DCP's plan caching each "
            "rank follows its own writer): pass the same save_to_durable on every rank."
        )
    return got
