"""Which parts of a save one node holds: its own, replicas of other nodes', and where its
own parts are replicated (for ``tierckpt ls`` and ``verify``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from .. import layout
from ..manifest import CommitRecord
from ..tiers.base import Tier

__all__ = ["NodeParts", "node_parts"]


@dataclass
class NodeParts:
    """One node's holdings of one save."""

    own: list[int] = field(default_factory=list)
    """Ranks whose part was written on this node."""
    replicas: dict[int, str] = field(default_factory=dict)
    """Rank -> the node it came from, for the verified replicas held here."""
    replicated_to: dict[int, list[str]] = field(default_factory=dict)
    """Rank -> the nodes holding a replica of this node's part (marked once complete)."""

    def describe(self) -> str:
        """A short human-readable summary, e.g. ``own r0-r1 -> node1; replicas r2,r3``."""
        if not (self.own or self.replicas):
            return "-"
        parts = []
        if self.own:
            targets = sorted({n for ns in self.replicated_to.values() for n in ns})
            text = "own " + _ranks(self.own)
            if self.replicated_to and len(self.replicated_to) == len(self.own):
                text += " -> " + ",".join(targets)
            elif self.replicated_to:
                text += f" ({len(self.replicated_to)}/{len(self.own)} replicated)"
            parts.append(text)
        if self.replicas:
            sources = sorted(set(self.replicas.values()))
            parts.append(f"replicas {_ranks(sorted(self.replicas))} from {','.join(sources)}")
        return "; ".join(parts)

    def to_json(self) -> dict[str, object]:
        return {
            "own": self.own,
            "replicas": {str(k): v for k, v in self.replicas.items()},
            "replicated_to": {str(k): v for k, v in self.replicated_to.items()},
        }


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"r{ranks[0]}-r{ranks[-1]}"
    return ",".join(f"r{r}" for r in ranks)


def _json(tier: Tier, key: str) -> dict[str, object]:
    try:
        obj = json.loads(bytes(tier.read(key)))
    except Exception:
        return {}
    return obj if isinstance(obj, dict) else {}


def node_parts(tier: Tier, namespace: str, record: CommitRecord) -> NodeParts:
    """What ``tier`` (one node's memory tier) holds of ``record``'s parts."""
    listing = tier.list(layout.step_dir(namespace, record.step))
    out = NodeParts()
    for entry in record.ranks:
        if entry.manifest not in listing or any(f not in listing for f in entry.files):
            continue
        replica = layout.replica_name(entry.attempt, entry.rank)
        if replica in listing:
            body = _json(tier, layout.step_key(namespace, record.step, replica))
            out.replicas[entry.rank] = str(body.get("from_node", "?"))
            continue
        out.own.append(entry.rank)
        marker = layout.replicated_name(entry.attempt, entry.rank)
        if marker in listing:
            body = _json(tier, layout.step_key(namespace, record.step, marker))
            nodes = body.get("nodes", [])
            out.replicated_to[entry.rank] = (
                [str(n) for n in nodes] if isinstance(nodes, list) else []
            )
    return out
