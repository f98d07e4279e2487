"""What ``tierckpt ls`` and ``tierckpt inspect`` show: one row per step, one per item."""

from __future__ import annotations

import logging
import pickle
import time
from typing import Any

from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    Metadata,
    TensorStorageMetadata,
)

from . import layout
from .catalog import StepCatalog
from .cleanup import step_names
from .errors import CheckpointNotFoundError, IntegrityError
from .history import newest_key
from .manifest import CommitRecord
from .nodemem import human_age, human_bytes
from .peer.inventory import node_parts
from .retention import abandoned_steps, drain_pending
from .tiers.base import Tier
from .tiers.memory import MemoryTier

__all__ = ["format_table", "item_rows", "step_rows"]


def _replication_state(step: int, record: CommitRecord | None, memory: Tier | None) -> str:
    """This node's parts of ``step``: its own ranks (and the nodes replicating them) and the
    replicas it holds of other nodes' ranks; "-" for a one-node save or none here."""
    if (
        record is None
        or memory is None
        or (record.peer_replicas <= 0 and len(set(record.nodes)) <= 1)
    ):
        return "-"
    return node_parts(memory, record.namespace, record).describe()


def step_rows(namespace: str, tiers: list[Tier], log: logging.Logger) -> list[dict[str, Any]]:
    """One dict per step of ``namespace`` in any tier, oldest save first (newest last)."""
    now = time.time()
    rows: dict[int, dict[str, Any]] = {}
    records: dict[int, CommitRecord] = {}
    memory = next((t for t in tiers if isinstance(t, MemoryTier)), None)
    for tier in tiers:
        cat = StepCatalog(tier, namespace, log)
        commits = {s: cat.read_commit(s) for s in cat.steps()}
        committed = {s: r for s, (r, _) in commits.items() if r is not None}
        gone = abandoned_steps(committed)
        for step, (record, problem) in commits.items():
            files = cat.files(step)
            row = rows.setdefault(
                step,
                {"step": step, "tiers": [], "size": 0, "drain": "-", "notes": []},
            )
            row["size"] = max(row["size"], sum(files.values()))
            if problem is not None:
                row["notes"].append(f"{tier.name}: unreadable commit (left in place)")
                continue
            if record is None:
                ours = any(layout.is_ours(n) for n in step_names(cat, step))
                row["notes"].append(
                    f"{tier.name}: " + ("uncommitted" if ours else "foreign (left in place)")
                )
                continue
            row["tiers"].append(tier.name)
            records.setdefault(step, record)
            if step in gone:
                row["notes"].append(f"{tier.name}: abandoned by a rewind")
            if isinstance(tier, MemoryTier) and record.durable:
                row["drain"] = "pending" if drain_pending(record, files) else "drained"
            elif tier is not memory and row["drain"] == "-":
                row["drain"] = "durable"
    out = []
    for step, row in rows.items():
        record = records.get(step)
        row["saved"] = record.created if record is not None else None
        row["generation"] = record.generation if record is not None else None
        row["attempt"] = record.attempt if record is not None else None
        row["world_size"] = record.world_size if record is not None else None
        row["age_s"] = now - record.created if record is not None else None
        row["peers"] = _replication_state(step, record, memory)
        if record is not None and memory is not None and record.nodes:
            row["nodes"] = dict(enumerate(record.nodes))
            row["node_parts"] = node_parts(memory, namespace, record).to_json()
        out.append(row)
    out.sort(
        key=lambda r: (r["generation"] is not None, newest_key(r["step"], r["generation"] or 0))
    )
    return out


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    """Aligned text lines of :func:`step_rows`."""
    head = ("STEP", "SAVED", "SIZE", "TIERS", "DRAIN", "PEERS", "AGE", "NOTES")
    lines = [head]
    for r in rows:
        saved = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["saved"])) if r["saved"] else "-"
        )
        lines.append(
            (
                str(r["step"]),
                saved,
                human_bytes(r["size"]),
                ",".join(r["tiers"]) or "-",
                r["drain"],
                r["peers"],
                human_age(r["age_s"]) if r["age_s"] is not None else "-",
                "; ".join(r["notes"]),
            )
        )
    widths = [max(len(x[i]) for x in lines) for i in range(len(head) - 1)]
    return [
        "  ".join(c.ljust(w) for c, w in zip(x, widths, strict=False)) + "  " + x[-1] for x in lines
    ]


def _metadata(namespace: str, step: int, tiers: list[Tier], log: logging.Logger) -> Metadata:
    """The step's DCP metadata from the first tier whose copy matches its commit."""
    problems = []
    for tier in tiers:
        cat = StepCatalog(tier, namespace, log)
        record = cat.commit(step)
        if record is None:
            continue
        try:
            data = cat.read_metadata(record)  # checksum verified before unpickling
        except (IntegrityError, OSError) as e:
            problems.append(f"{tier.name}: {e}")
            continue
        metadata = pickle.loads(bytes(data))
        if isinstance(metadata, Metadata):
            return metadata
        problems.append(f"{tier.name}: not DCP metadata")
    if problems:
        raise IntegrityError(f"Step {step}: no usable metadata: {'; '.join(problems)}")
    raise CheckpointNotFoundError(
        f"Step {step} of namespace {namespace} is committed in no tier "
        f"({', '.join(t.url for t in tiers)}): see `tierckpt ls -n {namespace}`."
    )


def item_rows(
    namespace: str, step: int, tiers: list[Tier], log: logging.Logger
) -> list[dict[str, Any]]:
    """One dict per item of the step: name, kind, dtype, shape, bytes."""
    md = _metadata(namespace, step, tiers, log)
    lengths: dict[str, int] = {}
    for index, info in (md.storage_data or {}).items():
        lengths[index.fqn] = lengths.get(index.fqn, 0) + int(getattr(info, "length", 0))
    rows = []
    for fqn, item in sorted(md.state_dict_metadata.items()):
        if isinstance(item, TensorStorageMetadata):
            dtype = item.properties.dtype
            numel = 1
            for d in item.size:
                numel *= d
            rows.append(
                {
                    "name": fqn,
                    "kind": "tensor",
                    "dtype": str(dtype).removeprefix("torch."),
                    "shape": list(item.size),
                    "bytes": numel * dtype.itemsize,
                    "shards": len(item.chunks),
                }
            )
        elif isinstance(item, BytesStorageMetadata):
            rows.append(
                {
                    "name": fqn,
                    "kind": "object",
                    "dtype": "-",
                    "shape": None,
                    "bytes": lengths.get(fqn, 0),
                    "shards": 1,
                }
            )
    return rows
