"""Where replicas go: groups of ``replicas + 1`` nodes, a ring inside each group.

The last group takes the remainder, so every node count >= 2 works (odd ones too); each
node holds exactly ``replicas`` replicas (of different nodes) and never its own. A rank's
replica goes to the rank with the same local index on the target node.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["node_order", "node_targets", "rank_targets"]


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
