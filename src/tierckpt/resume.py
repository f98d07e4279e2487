"""Finishing durable drains that a crash interrupted (DESIGN: "a drain interrupted by a
crash is resumed on restart")."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

import torch.distributed as dist

from . import layout
from ._faults import crash_point
from ._log import logger_for, step_message
from .catalog import StepCatalog
from .config import CheckpointConfig
from .drain import commit_durable, in_flight, run_in_background, upload_rank_part
from .durable_retention import sweep_durable
from .manifest import CommitRecord
from .retention import drain_pending
from .tiers.base import Tier
from .tiers.durable import open_durable_tier
from .tiers.memory import MemoryTier, open_memory_tier

__all__ = ["resume_pending", "resume_pending_once"]

_RESUMED: set[tuple[str, str]] = set()
_LOCK = threading.Lock()


def resume_pending(config: CheckpointConfig, *, rank: int | None = None) -> Future[list[int]]:
    """In the background, finish uploading committed memory steps whose durable copy is pending.

    ``rank`` selects whose parts this process uploads (default: this process's rank when
    ``torch.distributed`` is initialised, else every rank found on this node). Rank 0 (or a
    lone process) writes the durable commit once every part is there. Returns a future of
    the steps resumed.
    """
    if rank is None and dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
    memory = open_memory_tier(config)
    durable = open_durable_tier(config, create=False)  # uploads create what they write
    log = logger_for(config)
    return run_in_background(
        lambda: _resume(config, memory, durable, rank, log),
        name="tierckpt-resume",
        wait_at_exit=False,
    )


def resume_pending_once(config: CheckpointConfig) -> Future[list[int]] | None:
    """:func:`resume_pending` the first time a writer or reader of a namespace is built here."""
    key = (config.memory_root or "", config.namespace)
    with _LOCK:
        if key in _RESUMED:
            return None
        _RESUMED.add(key)
    return resume_pending(config)


def _resume(
    config: CheckpointConfig,
    memory: MemoryTier,
    durable: Tier,
    rank: int | None,
    log: logging.Logger,
) -> list[int]:
    mem = StepCatalog(memory, config.namespace, log)
    dur = StepCatalog(durable, config.namespace, log)
    resumed = []
    for step, record in sorted(mem.committed().items()):
        if not record.durable:
            continue
        existing = dur.commit(step)
        if existing is not None and existing.attempt == record.attempt:
            continue
        listing = mem.files(step)
        if not drain_pending(record, listing) and rank not in (None, 0):
            continue
        log.warning(step_message(rank or 0, step, "Resuming an interrupted durable drain"))
        _upload_parts(config, mem, memory, durable, record, listing, rank, log)
        crash_point("resume.after_upload")
        if rank in (None, 0):
            me = next((r for r in record.ranks if r.attempt == record.attempt), None)
            mark = (me.attempt, me.rank) if me is not None else None
            commit_durable(
                memory, durable, record, config.durable_commit_timeout_s, log, coordinator=mark
            )
        resumed.append(step)
    if resumed and rank in (None, 0):
        sweep_durable(config, durable, log)
    return resumed


def _upload_parts(
    config: CheckpointConfig,
    mem: StepCatalog,
    memory: MemoryTier,
    durable: Tier,
    record: CommitRecord,
    listing: dict[str, int],
    rank: int | None,
    log: logging.Logger,
) -> None:
    for part in record.ranks:
        if rank is not None and part.rank != rank:
            continue
        if layout.drained_name(part.attempt, part.rank) in listing:
            continue
        if in_flight(config.namespace, record.step, part.attempt, part.rank):
            continue
        if part.manifest not in listing:
            continue  # that rank's files live on another node; its own process resumes them
        manifest = mem.read_manifest(record, part)  # verified against the commit first
        upload_rank_part(memory, durable, config.namespace, manifest, log)
