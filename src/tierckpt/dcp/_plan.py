"""The storage data a ``TieredStorageWriter`` puts in DCP's save plans.

Each rank's local plan reports its attempt and the newest commit in its memory tier; the
coordinator's global plan answers whether the step drains to durable and hands nodes that
lack it the previous step's commit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from torch.distributed.checkpoint.planner import SavePlan

from .._log import logger_for
from ..catalog import StepCatalog
from ..config import CheckpointConfig
from ..errors import ConfigError, InvalidStepError
from ..history import begin_upload, newest_key, next_generation
from ..peer.placement import rank_targets
from ..peer.replicate import Target
from ..saving import last_commit
from ..tiers.memory import MemoryTier

__all__ = ["GlobalPlan", "global_plans", "local_plan"]


@dataclass(frozen=True)
class _LocalPlanData:
    rank: int
    step: int
    attempt: str
    newest_committed: tuple[int, str] | None
    """(step, attempt) of the newest commit (by generation) in this rank's memory tier."""
    newest_generation: int = 0
    """The highest generation among the commits in this rank's memory tier."""
    node_id: str = ""
    """This rank's node (ranks of one node share its memory tier)."""
    peer_address: tuple[str, int] | None = None
    """This rank's peer service (None in a one-node job)."""


@dataclass(frozen=True)
class _GlobalPlanData:
    durable: bool
    install: tuple[bytes, bytes] | None = None
    """(commit record, DCP metadata) of the previous step, for a node that lacks them."""
    peer_targets: tuple[Target, ...] = ()
    """The ranks on other nodes that receive this rank's part (empty: no replication)."""


@dataclass(frozen=True)
class GlobalPlan:
    """What the coordinator decided for a save: the plans and what it commits with."""

    plans: list[SavePlan]
    rank_attempts: dict[int, str]
    generation: int
    nodes: list[str] = dataclasses.field(default_factory=list)
    """Node id of each rank."""
    addresses: list[tuple[str, int] | None] = dataclasses.field(default_factory=list)
    """Peer service of each rank (None where it runs none)."""
    replicas: int = 0
    """Peer replicas of each node's part this save makes."""


def local_plan(
    plan: SavePlan,
    memory: MemoryTier,
    config: CheckpointConfig,
    rank: int,
    step: int,
    attempt: str,
    peer_address: tuple[str, int] | None = None,
) -> SavePlan:
    """``plan`` with this rank's storage data."""
    catalog = StepCatalog(memory, config.namespace, logger_for(config))
    records = list(catalog.committed().values())
    top = max(records, key=lambda r: newest_key(r.step, r.generation), default=None)
    data = _LocalPlanData(
        rank=rank,
        step=step,
        attempt=attempt,
        newest_committed=(top.step, top.attempt) if top is not None else None,
        newest_generation=top.generation if top is not None else 0,
        node_id=config.node_id or "",
        peer_address=peer_address,
    )
    return dataclasses.replace(plan, storage_data=data)


def global_plans(
    plans: list[SavePlan],
    memory: MemoryTier,
    config: CheckpointConfig,
    step: int,
    attempt: str,
    save_to_durable: bool,
) -> GlobalPlan:
    """The coordinator's answer to every rank's local plan."""
    infos = [p.storage_data for p in plans]
    if not all(isinstance(i, _LocalPlanData) for i in infos):
        raise ConfigError(
            "TieredStorageWriter got cached (empty) save plans: DCP's plan caching "
            "(DefaultSavePlanner(enable_plan_caching=True)) replays the first save's storage "
            "data, and each tierckpt save needs its own. Use a planner without plan caching."
        )
    steps = {i.step for i in infos}
    if len(steps) != 1:
        raise InvalidStepError(
            f"Ranks disagree on the step being saved: {sorted(steps)}. Give every rank the same step."
        )
    if len(plans) != config.world_size:
        raise ConfigError(
            f"CheckpointConfig.world_size={config.world_size} but {len(plans)} ranks are "
            "saving: set world_size=dist.get_world_size()."
        )
    rank_attempts = {i.rank: i.attempt for i in infos}
    ns = config.namespace
    # "Newest" is the newest save: above the clock, every rank's tier and this process.
    generation = next_generation(ns, (i.newest_generation for i in infos))
    if save_to_durable:  # other nodes' uploads start before the memory commit
        begin_upload(ns, step, attempt, rank_attempts.values())
    # The memory commit is written on this (the coordinator's) node; ranks on other nodes
    # get the previous step's commit with this plan and install it in their own tier.
    last = last_commit(memory, ns)
    ordered = sorted(infos, key=lambda i: i.rank)
    nodes = [i.node_id for i in ordered]
    addresses = [i.peer_address for i in ordered]
    replicas, targets = _placement(config, nodes, addresses)
    out = []
    for plan, info in zip(plans, infos, strict=True):
        install = None
        if last is not None and info.newest_committed != (last[0], last[1]):
            install = (last[2], last[3])
        peers = tuple(Target(r, nodes[r], addresses[r]) for r in targets[info.rank])
        glob = _GlobalPlanData(durable=save_to_durable, install=install, peer_targets=peers)
        out.append(dataclasses.replace(plan, storage_data=glob))
    return GlobalPlan(out, rank_attempts, generation, nodes, addresses, replicas)


def _placement(
    config: CheckpointConfig, nodes: list[str], addresses: list[tuple[str, int] | None]
) -> tuple[int, list[list[int]]]:
    """Peer replicas of this save and each rank's target ranks (none when replication is
    off, the job has one node, or a node runs no peer service: then said once, as a warning)."""
    distinct = len(set(nodes))
    none: list[list[int]] = [[] for _ in nodes]
    if config.multi_node and distinct == 1:
        _warn_once(
            config,
            "one-node-id",
            f"The job spans several nodes (local_world_size={config.local_world_size} < "
            f"world_size={config.world_size}) but every rank reports node id {nodes[0]!r}: "
            "set TIERCKPT_NODE_ID (or torchrun's GROUP_RANK) per node. Peer replication is off.",
        )
        return 0, none
    if distinct == 1 or config.replicas == 0:
        return 0, none
    if any(a is None for a in addresses):
        _warn_once(
            config,
            "no-peer-service",
            f"Ranks run on {distinct} nodes but ranks "
            f"{[r for r, a in enumerate(addresses) if a is None]} run no peer service (their "
            "LOCAL_WORLD_SIZE equals world_size?): set LOCAL_WORLD_SIZE (torchrun does) or "
            "CheckpointConfig(local_world_size=...). Commits reach their nodes with the next "
            "save, and nothing is replicated.",
        )
        return 0, none
    replicas = min(config.replicas, distinct - 1)
    return replicas, rank_targets(nodes, replicas)


def _warn_once(config: CheckpointConfig, what: str, message: str) -> None:
    from .._runtime import RUNTIME

    key = ("placement", what, config.namespace)
    with RUNTIME.logs.lock:
        if key in RUNTIME.logs.warned:
            return
        RUNTIME.logs.warned.add(key)
    logger_for(config).warning(message)
