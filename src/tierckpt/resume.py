"""Finishing durable drains that failed or that a crash interrupted.

DESIGN: "a drain interrupted by a crash is resumed on restart". Every node works from
its own rank manifests, not from a commit record: a node other than the coordinator's
may never have received the step's memory commit, and still uploads its part
(:func:`resume_pending`). The coordinator writes the durable commit.

Which parts are pending is :mod:`tierckpt._pending`; the background retry of failed drains
and the ``durable_max_pending_steps`` bound are :mod:`tierckpt._retry`.
:func:`pending_drains` reports what is pending and the bytes it pins.
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from . import layout
from ._faults import crash_point
from ._log import logger_for, step_message, summary
from ._pending import (
    Part,
    default_rank,
    is_durable_part,
    own_parts,
    owned_elsewhere,
    part_key,
    pending_parts,
    retryable,
)
from ._retry import bound_pending, ensure_retrier
from ._runtime import RUNTIME
from .catalog import StepCatalog
from .config import CheckpointConfig
from .destination import job_config
from .drain import (
    check_reachable,
    clear_failed,
    commit_durable,
    run_in_background,
    upload_rank_part,
)
from .durable_retention import sweep_durable
from .manifest import CommitRecord, RankManifest
from .tiers.base import Tier
from .tiers.durable import open_durable_tier
from .tiers.memory import MemoryTier, open_memory_tier

__all__ = [
    "PendingDrain",
    "note_failure",
    "note_success",
    "pending_drains",
    "resume_pending",
    "resume_pending_once",
]


@dataclass(frozen=True)
class PendingDrain:
    """One rank's part of a durable step, held in this node's memory, not yet in durable."""

    step: int
    rank: int
    attempt: str
    nbytes: int
    """Bytes of this part pinned in the memory tier."""
    state: str
    """``"draining"`` (a writer or resume is on it), ``"retrying"`` (its drain failed here and
    is retried) or ``"interrupted"`` (its process died; the next resume uploads it)."""
    error: str | None = None
    """The last failure, for ``"retrying"``."""


# --------------------------------------------------------------------------- public


def resume_pending(config: CheckpointConfig, *, rank: int | None = None) -> Future[list[int]]:
    """In the background, finish uploading this node's parts of durable steps still pending.

    ``rank`` selects whose parts this process uploads (default: this process's rank when
    ``torch.distributed`` is initialised, else every rank found on this node). Rank 0 (or a
    lone process) writes the durable commit once every part is there. Never raises here: an
    unreachable durable tier fails the future, and the pending parts are retried. Returns a
    future of the steps resumed; a step that fails is logged and the others go on.

    The drain goes to the destination the job's writers recorded in the memory tier
    (:mod:`tierckpt.destination`) when ``config.durable_base_path`` is left at its default
    (``./checkpoints``); a durable location the config names explicitly is used as given.
    (``tierckpt resume --durable`` refuses one that differs from the record.)
    """
    rank = default_rank(rank)
    log = logger_for(config)

    def job() -> list[int]:
        memory = open_memory_tier(config)  # refuses an untrusted root (fails the future)
        cfg = job_config(config, refuse=False)  # the job's own, unless config names one
        try:
            durable = open_durable_tier(cfg, check=False)
            return _resume(cfg, memory, durable, rank, log)
        finally:
            if retryable(cfg, memory, rank, log):
                ensure_retrier(cfg, rank, _resume)

    return run_in_background(job, name="tierckpt-resume", wait_at_exit=True)


def resume_pending_once(config: CheckpointConfig) -> Future[list[int]] | None:
    """:func:`resume_pending` the first time a writer or reader of a namespace is built here."""
    key = (config.memory_root or "", config.namespace)
    with RUNTIME.resumes.lock:
        if key in RUNTIME.resumes.resumed:
            return None
        RUNTIME.resumes.resumed.add(key)
    return resume_pending(config)


def pending_drains(config: CheckpointConfig, *, rank: int | None = None) -> list[PendingDrain]:
    """This node's parts of durable steps not yet in the durable tier (oldest save first).

    ``rank`` as in :func:`resume_pending`. Their bytes stay pinned in the memory tier.
    """
    rank = default_rank(rank)
    memory = MemoryTier(config.memory_root or "")
    log = logger_for(config)
    out = []
    for part in pending_parts(config, memory, rank, log):
        error = RUNTIME.resumes.failed.get(part_key(config, part))
        if error is not None:
            state = "retrying"
        elif owned_elsewhere(config, memory, part):
            state = "draining"
        else:
            state = "interrupted"
        out.append(PendingDrain(part.step, part.rank, part.attempt, part.nbytes, state, error))
    return out


def note_failure(
    config: CheckpointConfig,
    step: int,
    attempt: str,
    rank: int,
    error: BaseException,
    log: logging.Logger,
) -> None:
    """A drain of this process failed: remember it, bound what stays pinned, retry later."""
    key = (config.memory_root or "", config.namespace, step, attempt, rank)
    with RUNTIME.resumes.lock:
        RUNTIME.resumes.failed[key] = f"{type(error).__name__}: {error}"
    memory = MemoryTier(config.memory_root or "")
    try:
        bound_pending(config, memory, rank, log)
    except Exception as e:  # reporting must not mask the drain's own error
        log.warning(step_message(rank, step, f"Could not apply durable_max_pending_steps: {e}"))
    ensure_retrier(config, rank, _resume)


def note_success(config: CheckpointConfig, rank: int) -> None:
    """A drain succeeded: the durable tier answers, so retry the failed ones now."""
    with RUNTIME.resumes.lock:
        retrier = RUNTIME.resumes.retriers.get((config.memory_root or "", config.namespace, rank))
    if retrier is not None:
        retrier.wake.set()


# --------------------------------------------------------------------------- resuming


def _resume(
    config: CheckpointConfig,
    memory: MemoryTier,
    durable: Tier,
    rank: int | None,
    log: logging.Logger,
) -> list[int]:
    """Upload this node's pending parts (newest step first); the coordinator commits.

    A step that fails is logged and the others go on.
    """
    key = (config.memory_root or "", config.namespace, rank)
    with RUNTIME.resumes.lock:
        lock = RUNTIME.resumes.resume_locks.setdefault(key, threading.Lock())
    with lock:
        check_reachable(durable, create=False)  # resuming nothing creates nothing
        mem = StepCatalog(memory, config.namespace, log)
        dur = StepCatalog(durable, config.namespace, log)
        resumed = []
        for step in sorted(mem.steps(), reverse=True):
            try:
                if _resume_step(config, mem, dur, step, rank, log):
                    resumed.append(step)
            except Exception as e:
                log.error(
                    step_message(
                        rank or 0,
                        step,
                        f"Resuming its durable drain failed ({type(e).__name__}: {e}); "
                        "the other steps go on.",
                    )
                )
        if resumed and rank in (None, 0):
            sweep_durable(config, durable, log)
        return sorted(resumed)


def _resume_step(
    config: CheckpointConfig,
    mem: StepCatalog,
    dur: StepCatalog,
    step: int,
    rank: int | None,
    log: logging.Logger,
) -> bool:
    memory, durable = mem.tier, dur.tier
    assert isinstance(memory, MemoryTier)
    listing = mem.files(step)
    parts = own_parts(memory, config.namespace, step, listing, rank)
    if not parts:
        return False
    record = mem.commit(step) if layout.COMMIT_NAME in listing else None
    if record is not None:
        if not record.durable:
            return False
        live = {(r.attempt, r.rank) for r in record.ranks}
        parts = [p for p in parts if (p.attempt, p.rank) in live]
    else:  # not committed on this node: its rank manifests say which parts are durable
        parts = [p for p in parts if is_durable_part(memory, mem, p, None)]
    coordinator_part = next(
        (p for p in parts if record is not None and p.attempt == record.attempt), None
    )
    must_commit = rank in (None, 0) and coordinator_part is not None
    if not parts:
        return False
    existing = dur.commit(step)
    done = set()
    if existing is not None:
        done = {(r.attempt, r.rank) for r in existing.ranks}
    todo = []
    for part in parts:
        if (part.attempt, part.rank) in done:  # durable already: only the marker was missing
            memory.write(mem.key(step, layout.drained_name(part.attempt, part.rank)), [b""])
            continue
        if owned_elsewhere(config, memory, part):
            if part is coordinator_part:
                must_commit = False  # the save that is on it writes the commit
            continue
        todo.append(part)
    if must_commit and existing is not None and record is not None:
        must_commit = existing.attempt != record.attempt
    if not todo and not must_commit:
        return False
    log.warning(step_message(rank or 0, step, "Resuming an interrupted durable drain"))
    _upload_parts(config, mem, durable, record, todo, coordinator_part, log)
    crash_point("resume.after_upload")
    if must_commit:
        assert record is not None and coordinator_part is not None
        for name in (layout.metadata_name(record.attempt), layout.COMMIT_NAME):
            _discard_partial(durable, mem.key(step, name), log)
        commit_durable(
            memory,
            durable,
            record,
            config.durable_commit_timeout_s,
            log,
            coordinator=(coordinator_part.attempt, coordinator_part.rank),
        )
        summary(log, f"step {step} durable in {durable.url} (resumed)")
    with RUNTIME.resumes.lock:
        for part in todo:
            RUNTIME.resumes.failed.pop(part_key(config, part), None)
    return True


def _upload_parts(
    config: CheckpointConfig,
    mem: StepCatalog,
    durable: Tier,
    record: CommitRecord | None,
    parts: list[Part],
    coordinator_part: Part | None,
    log: logging.Logger,
) -> None:
    """Upload each part (already complete in durable: just mark it); debris goes first."""
    memory = mem.tier
    assert isinstance(memory, MemoryTier)
    in_durable = (
        set(durable.list(layout.step_dir(config.namespace, parts[0].step))) if parts else set()
    )
    for part in parts:
        manifest = _read_part_manifest(mem, record, part)
        if record is None and not manifest.durable:
            continue
        mark = part is not coordinator_part  # the coordinator's part is marked at the commit
        if part.manifest in in_durable:
            if mark:
                memory.write(
                    mem.key(part.step, layout.drained_name(part.attempt, part.rank)), [b""]
                )
            continue
        _discard_partial(
            durable, mem.key(part.step, layout.part_prefix(part.attempt, part.rank)), log
        )
        clear_failed(durable, config.namespace, part.step, part.attempt, part.rank)
        try:
            upload_rank_part(memory, durable, config.namespace, manifest, log, mark_drained=mark)
        except BaseException as e:
            with RUNTIME.resumes.lock:
                RUNTIME.resumes.failed[part_key(config, part)] = f"{type(e).__name__}: {e}"
            raise


def _read_part_manifest(mem: StepCatalog, record: CommitRecord | None, part: Part) -> RankManifest:
    """A part's manifest, verified against the commit's checksum when this node has the commit.

    A node without the memory commit (its coordinator is elsewhere) uploads the manifest as it
    is: manifests are JSON, never unpickled, and readers verify them against the commit.
    """
    entry = (
        None
        if record is None
        else next(
            (r for r in record.ranks if r.rank == part.rank and r.attempt == part.attempt), None
        )
    )
    if record is not None and entry is not None:
        return mem.read_manifest(record, entry)
    key = mem.key(part.step, part.manifest)
    return RankManifest.from_json(mem.tier.read(key), where=f"{mem.tier.url}/{key}")


def _discard_partial(durable: Tier, prefix: str, log: logging.Logger) -> None:
    """Remove what a killed upload of ``prefix`` left (temporary files, open multipart uploads)."""
    discard = getattr(durable, "discard_partial", None)
    if discard is None:
        return
    try:
        n = discard(prefix)
    except Exception as e:
        log.warning("Could not remove partial uploads of %s in %s: %s", prefix, durable.url, e)
        return
    if n:
        log.info(
            "Removed %d partial upload(s) of %s left in %s by a crash.", n, prefix, durable.url
        )
