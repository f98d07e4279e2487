"""The step agreement across nodes: which saves every rank can restore with peers' help.

Each node's leader (its local rank 0) reports, in the agreement's one gather, the files its
node's memory tier holds and the file lists of its commits. A rank can restore a save when
every file it lacks (or, without the commit, every file of the save) is complete on some
node that answers: its own memory, a live peer's, or durable (counted by the rank itself).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import CheckpointConfig
from .secret import job_secret
from .tier import PeerTier, complete_files

if TYPE_CHECKING:
    from ..restore import Choice, View

__all__ = ["PeerView", "is_node_leader"]


def is_node_leader(config: CheckpointConfig, rank: int) -> bool:
    """Whether ``rank`` reports its node's holdings: torchrun's local rank 0."""
    local = os.environ.get("LOCAL_RANK")
    if local is not None and local.isdigit():
        return int(local) == 0
    return rank % (config.local_world_size or 1) == 0


@dataclass
class _Node:
    node_id: str
    address: tuple[str, int] | None
    listing: dict[int, dict[str, int]]


@dataclass
class PeerView:
    """What the leaders of every node reported."""

    nodes: dict[str, _Node]
    record_files: dict[Any, tuple[int, dict[str, int]]]

    @classmethod
    def of(cls, gathered: list[View], config: CheckpointConfig) -> PeerView | None:
        """The gathered holdings, or None for a one-node job (no rank reported any)."""
        if not config.multi_node or not any(v.leader for v in gathered):
            return None
        nodes: dict[str, _Node] = {}
        record_files: dict[Any, tuple[int, dict[str, int]]] = {}
        for v in gathered:
            if not v.leader:
                continue
            listing = {s: complete_files(f) for s, f in v.listing.items()}
            nodes[v.node_id] = _Node(v.node_id, v.peer_address, listing)
            record_files.update(v.record_files)
        return cls(nodes, record_files)

    def _held(self, step: int, name: str, size: int, exclude: str | None) -> bool:
        for node in self.nodes.values():
            if node.node_id == exclude or node.address is None:
                continue
            have = node.listing.get(step, {})
            if name in have and (size < 0 or have[name] == size):
                return True
        return False

    def restorable(self, gathered: list[View], generation: dict[Choice, int]) -> list[set[Choice]]:
        """For each rank, the saves it can restore from its tiers or its peers' memory
        (``generation`` gains the saves only peers make restorable)."""
        out: list[set[Choice]] = []
        for v in gathered:
            can = set(v.restorable)
            for choice, (gen, missing) in v.needs.items():
                files = self.record_files.get(choice, (gen, {}))[1]
                if all(self._held(choice[0], n, files.get(n, -1), v.node_id) for n in missing):
                    can.add(choice)
                    generation.setdefault(choice, gen)
            seen = {(s, a) for s, a, _ in v.saves}
            for choice, (gen, files) in self.record_files.items():
                if choice in seen:
                    continue  # this rank has the commit and judged it above
                if all(self._held(choice[0], n, size, None) for n, size in files.items()):
                    can.add(choice)
                    generation.setdefault(choice, gen)
            out.append(can)
        return out

    def tiers(self, my_node: str, config: CheckpointConfig) -> list[PeerTier]:
        """A read-only tier per other node that answers (none for this rank's own node)."""
        secret = job_secret()
        return [
            PeerTier(
                n.node_id, n.address, secret, n.listing, config.namespace, config.peer_timeout_s
            )
            for n in self.nodes.values()
            if n.node_id != my_node and n.address is not None
        ]
