"""Which of this node's parts of durable steps are still pending, and who is on them.

A part (one rank's files of a step held in this node's memory) is pending when its manifest
says durable (or the node's commit does), it has neither ``.drained`` nor ``.unpinned``.
It is *owned elsewhere* while an upload of this process runs on it, or the live save that
wrote it holds its lease and its drain has not failed here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch.distributed as dist

from . import layout
from ._runtime import RUNTIME
from .catalog import StepCatalog
from .config import CheckpointConfig
from .drain import in_flight
from .errors import TierckptError
from .leases import is_live, lease_name
from .manifest import CommitRecord, RankManifest
from .tiers.memory import MemoryTier

__all__ = [
    "Part",
    "default_rank",
    "is_durable_part",
    "own_parts",
    "owned_elsewhere",
    "part_key",
    "pending_parts",
    "retryable",
]


@dataclass(frozen=True)
class Part:
    """One rank's files of a step, held in this node's memory."""

    step: int
    attempt: str
    rank: int
    manifest: str
    nbytes: int
    mtime: float


def default_rank(rank: int | None) -> int | None:
    """``rank``, or this process's rank when it is None and ``torch.distributed`` is up."""
    if rank is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return rank


def part_key(config: CheckpointConfig, part: Part) -> tuple[str, str, int, str, int]:
    """The key of ``part`` in ``RUNTIME.resumes.failed``."""
    return (config.memory_root or "", config.namespace, part.step, part.attempt, part.rank)


def own_parts(
    memory: MemoryTier, namespace: str, step: int, listing: dict[str, int], rank: int | None
) -> list[Part]:
    """Parts of ``step`` held here (for ``rank``, or every rank) neither drained nor unpinned."""
    out = []
    for name in listing:
        parsed = layout.parse_manifest_name(name)
        if parsed is None or (rank is not None and parsed[1] != rank):
            continue
        attempt, r = parsed
        if (
            layout.drained_name(attempt, r) in listing
            or layout.unpinned_name(attempt, r) in listing
        ):
            continue
        prefix = layout.part_prefix(attempt, r)
        nbytes = sum(size for n, size in listing.items() if n.startswith(prefix))
        mtime = memory.mtime(layout.step_key(namespace, step, name)) or 0.0
        out.append(Part(step, attempt, r, name, nbytes, mtime))
    return out


def is_durable_part(
    memory: MemoryTier, mem: StepCatalog, part: Part, record: CommitRecord | None
) -> bool:
    """True when ``part`` belongs to a durable save (its commit, or else its manifest, says so).

    Raises :class:`IntegrityError` for a damaged manifest (it cannot be drained).
    """
    if record is not None:
        committed = any(r.rank == part.rank and r.attempt == part.attempt for r in record.ranks)
        if not (record.durable and committed):  # other attempts of a step are superseded
            return False
    key = mem.key(part.step, part.manifest)
    manifest = RankManifest.from_json(memory.read(key), where=f"{memory.url}/{key}")
    return record is not None or manifest.durable


def pending_parts(
    config: CheckpointConfig, memory: MemoryTier, rank: int | None, log: logging.Logger
) -> list[Part]:
    """Every pending durable part of this node (for ``rank``), oldest save first.

    Damaged manifests are skipped here (the resume logs them).
    """
    mem = StepCatalog(memory, config.namespace, log)
    out = []
    for step in mem.steps():
        listing = mem.files(step)
        parts = own_parts(memory, config.namespace, step, listing, rank)
        if not parts:
            continue
        record = mem.commit(step) if layout.COMMIT_NAME in listing else None
        for part in parts:
            try:
                if is_durable_part(memory, mem, part, record):
                    out.append(part)
            except (OSError, TierckptError):
                continue
    return sorted(out, key=lambda p: (p.mtime, p.step))


def owned_elsewhere(config: CheckpointConfig, memory: MemoryTier, part: Part) -> bool:
    """True while another job is on this part: an upload running here, or the live save that
    wrote it (its lease is held) and whose drain has not failed."""
    if in_flight(config.namespace, part.step, part.attempt, part.rank):
        return True
    if part_key(config, part) in RUNTIME.resumes.failed:
        return False
    return is_live(memory.path(config.namespace), lease_name(part.attempt, part.rank))


def retryable(
    config: CheckpointConfig, memory: MemoryTier, rank: int | None, log: logging.Logger
) -> bool:
    """True when a pending part of this node (for ``rank``) is owned by no other job."""
    try:
        parts = pending_parts(config, memory, rank, log)
    except OSError:
        return False
    return any(not owned_elsewhere(config, memory, p) for p in parts)
