"""Where replicas go: groups of ``replicas + 1`` nodes, a ring inside each group.

The last group takes the remainder, so every node count >= 2 works (odd ones too); each
node holds exactly ``replicas`` replicas (of different nodes) and never its own. A rank's
replica goes to the rank with the same local index on the target node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ..config import CheckpointConfig

__all__ = ["Peers", "node_order", "node_targets", "plan_peers", "rank_targets"]


def node_order(nodes_by_rank: Sequence[str]) -> list[str]:
    """Distinct node ids, ordered by the lowest rank on each."""
    seen: dict[str, None] = {}
    for node in nodes_by_rank:
        seen.setdefault(node, None)
    return list(seen)


def node_targets(nodes: Sequence[str], replicas: int) -> dict[str, list[str]]:
    """For each node, the nodes that hold its replicas (``min(replicas, n - 1)`` of them)."""
    n = len(nodes)
    replicas = min(replicas, n - 1)
    if replicas <= 0:
        return {node: [] for node in nodes}
    size = replicas + 1
    count = n // size
    groups = [list(nodes[i * size : (i + 1) * size]) for i in range(count)]
    groups[-1].extend(nodes[count * size :])
    out: dict[str, list[str]] = {}
    for group in groups:
        for i, node in enumerate(group):
            out[node] = [group[(i + k) % len(group)] for k in range(1, replicas + 1)]
    return out


def rank_targets(nodes_by_rank: Sequence[str], replicas: int) -> list[list[int]]:
    """For each rank, the ranks (one per target node) that receive its part."""
    order = node_order(nodes_by_rank)
    members: dict[str, list[int]] = {node: [] for node in order}
    for rank, node in enumerate(nodes_by_rank):
        members[node].append(rank)
    targets = node_targets(order, replicas)
    out: list[list[int]] = []
    for rank, node in enumerate(nodes_by_rank):
        local = members[node].index(rank)
        out.append([members[t][local % len(members[t])] for t in targets[node]])
    return out


@dataclass(frozen=True)
class Peers:
    """What a save knows of the job's nodes (from every rank's part report)."""

    nodes: list[str]
    """Node id of each rank."""
    addresses: list[tuple[str, int] | None]
    """Peer service of each rank (None where it runs none)."""
    replicas: int
    """Replicas of each node's part this save makes."""


class _Report(Protocol):
    @property
    def rank(self) -> int: ...
    @property
    def node_id(self) -> str: ...
    @property
    def peer_address(self) -> tuple[str, int] | None: ...


def plan_peers(config: CheckpointConfig, reports: Sequence[_Report]) -> Peers:
    """The job's nodes and the replicas this save makes: none when replication is off, the
    job has one node, or a node runs no peer service (then said once, as a warning)."""
    ordered = sorted(reports, key=lambda r: r.rank)
    nodes = [r.node_id for r in ordered]
    addresses = [tuple(r.peer_address) if r.peer_address else None for r in ordered]
    distinct = len(set(nodes))
    peers = Peers(nodes, addresses, 0)  # type: ignore[arg-type]
    if config.multi_node and distinct == 1:
        _warn_once(
            config,
            "one-node-id",
            f"The job spans several nodes (local_world_size={config.local_world_size} < "
            f"world_size={config.world_size}) but every rank reports node id {nodes[0]!r}: "
            "set TIERCKPT_NODE_ID (or torchrun's GROUP_RANK) per node. Peer replication is off.",
        )
        return peers
    if distinct == 1 or config.replicas == 0:
        return peers
    if any(a is None for a in addresses):
        _warn_once(
            config,
            "no-peer-service",
            f"Ranks run on {distinct} nodes but ranks "
            f"{[r for r, a in enumerate(addresses) if a is None]} run no peer service (their "
            "LOCAL_WORLD_SIZE equals world_size?): set LOCAL_WORLD_SIZE (torchrun does) or "
            "CheckpointConfig(local_world_size=...). Commits reach their nodes with the next "
            "save whose plans are not replayed from DCP's plan cache, and nothing is "
            "replicated.",
        )
        return peers
    return Peers(nodes, addresses, min(config.replicas, distinct - 1))  # type: ignore[arg-type]


def _warn_once(config: CheckpointConfig, what: str, message: str) -> None:
    from .._log import logger_for
    from .._runtime import RUNTIME

    key = ("placement", what, config.namespace)
    with RUNTIME.logs.lock:
        if key in RUNTIME.logs.warned:
            return
        RUNTIME.logs.warned.add(key)
    logger_for(config).warning(message)
