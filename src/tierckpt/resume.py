"""Finishing durable drains that failed or that a crash interrupted.

DESIGN: "a drain interrupted by a crash is resumed on restart". Every node works from
its own rank manifests, not from a commit record: a node other than the coordinator's
may never have received the step's memory commit, and still uploads its part
(:func:`resume_pending`). The coordinator writes the durable commit.

While the process lives, a failed drain is retried in the background with exponential
backoff (``durable_retry_initial_s`` doubling up to ``durable_retry_max_s``, with
jitter), newest step first; a drain that succeeds wakes the retry at once. Undrained
steps stay pinned in memory, at most ``durable_max_pending_steps`` of them per node:
past it the oldest is unpinned with an ERROR (the newest save never is).
:func:`pending_drains` reports what is pending and the bytes it pins.
"""

from __future__ import annotations

import logging
import os
import random
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch.distributed as dist

from . import layout
from ._faults import crash_point
from ._log import logger_for, step_message
from .catalog import StepCatalog
from .config import CheckpointConfig
from .drain import (
    check_reachable,
    clear_failed,
    commit_durable,
    in_flight,
    mark_failed,
    run_in_background,
    upload_rank_part,
)
from .durable_retention import sweep_durable
from .errors import TierckptError
from .leases import is_live, lease_name
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

_RESUMED: set[tuple[str, str]] = set()
_LOCK = threading.Lock()
_STATE = threading.Lock()
_FAILED: dict[tuple[str, str, int, str, int], str] = {}
"""(memory root, namespace, step, attempt, rank) of parts whose drain failed here -> error."""
_RETRIERS: dict[tuple[str, str, int | None], _Retrier] = {}
_RESUME_LOCKS: dict[tuple[str, str, int | None], threading.Lock] = {}


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


@dataclass(frozen=True)
class _Part:
    step: int
    attempt: str
    rank: int
    manifest: str
    nbytes: int
    mtime: float


# --------------------------------------------------------------------------- public


def resume_pending(config: CheckpointConfig, *, rank: int | None = None) -> Future[list[int]]:
    """In the background, finish uploading this node's parts of durable steps still pending.

    ``rank`` selects whose parts this process uploads (default: this process's rank when
    ``torch.distributed`` is initialised, else every rank found on this node). Rank 0 (or a
    lone process) writes the durable commit once every part is there. Never raises here: an
    unreachable durable tier fails the future, and the pending parts are retried. Returns a
    future of the steps resumed; a step that fails is logged and the others go on.
    """
    rank = _default_rank(rank)
    log = logger_for(config)

    def job() -> list[int]:
        memory = open_memory_tier(config)  # refuses an untrusted root (fails the future)
        try:
            durable = open_durable_tier(config, check=False)
            return _resume(config, memory, durable, rank, log)
        finally:
            if _retryable(config, memory, rank, log):
                _ensure_retrier(config, rank)

    return run_in_background(job, name="tierckpt-resume", wait_at_exit=True)


def resume_pending_once(config: CheckpointConfig) -> Future[list[int]] | None:
    """:func:`resume_pending` the first time a writer or reader of a namespace is built here."""
    key = (config.memory_root or "", config.namespace)
    with _LOCK:
        if key in _RESUMED:
            return None
        _RESUMED.add(key)
    return resume_pending(config)


def pending_drains(config: CheckpointConfig, *, rank: int | None = None) -> list[PendingDrain]:
    """This node's parts of durable steps not yet in the durable tier (oldest save first).

    ``rank`` as in :func:`resume_pending`. Their bytes stay pinned in the memory tier.
    """
    rank = _default_rank(rank)
    memory = MemoryTier(config.memory_root or "")
    log = logger_for(config)
    out = []
    for part in _pending_parts(config, memory, rank, log):
        error = _FAILED.get(_key(config, part))
        if error is not None:
            state = "retrying"
        elif _owned_elsewhere(config, memory, part):
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
    with _STATE:
        _FAILED[key] = f"{type(error).__name__}: {error}"
    memory = MemoryTier(config.memory_root or "")
    try:
        _bound_pending(config, memory, rank, log)
    except Exception as e:  # reporting must not mask the drain's own error
        log.warning(step_message(rank, step, f"Could not apply durable_max_pending_steps: {e}"))
    _ensure_retrier(config, rank)


def note_success(config: CheckpointConfig, rank: int) -> None:
    """A drain succeeded: the durable tier answers, so retry the failed ones now."""
    with _STATE:
        retrier = _RETRIERS.get((config.memory_root or "", config.namespace, rank))
    if retrier is not None:
        retrier.wake.set()


# --------------------------------------------------------------------------- scanning


def _default_rank(rank: int | None) -> int | None:
    if rank is None and dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return rank


def _key(config: CheckpointConfig, part: _Part) -> tuple[str, str, int, str, int]:
    return (config.memory_root or "", config.namespace, part.step, part.attempt, part.rank)


def _own_parts(
    memory: MemoryTier, namespace: str, step: int, listing: dict[str, int], rank: int | None
) -> list[_Part]:
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
        out.append(_Part(step, attempt, r, name, nbytes, mtime))
    return out


def _is_durable_part(
    memory: MemoryTier, mem: StepCatalog, part: _Part, record: CommitRecord | None
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


def _pending_parts(
    config: CheckpointConfig, memory: MemoryTier, rank: int | None, log: logging.Logger
) -> list[_Part]:
    """Every pending durable part of this node (for ``rank``), oldest save first.

    Damaged manifests are skipped here (:func:`_resume` logs them).
    """
    mem = StepCatalog(memory, config.namespace, log)
    out = []
    for step in mem.steps():
        listing = mem.files(step)
        parts = _own_parts(memory, config.namespace, step, listing, rank)
        if not parts:
            continue
        record = mem.commit(step) if layout.COMMIT_NAME in listing else None
        for part in parts:
            try:
                if _is_durable_part(memory, mem, part, record):
                    out.append(part)
            except (OSError, TierckptError):
                continue
    return sorted(out, key=lambda p: (p.mtime, p.step))


def _owned_elsewhere(config: CheckpointConfig, memory: MemoryTier, part: _Part) -> bool:
    """True while another job is on this part: an upload running here, or the live save that
    wrote it (its lease is held) and whose drain has not failed."""
    if in_flight(config.namespace, part.step, part.attempt, part.rank):
        return True
    if _key(config, part) in _FAILED:
        return False
    return is_live(memory.path(config.namespace), lease_name(part.attempt, part.rank))


def _retryable(
    config: CheckpointConfig, memory: MemoryTier, rank: int | None, log: logging.Logger
) -> bool:
    try:
        parts = _pending_parts(config, memory, rank, log)
    except OSError:
        return False
    return any(not _owned_elsewhere(config, memory, p) for p in parts)


def _bound_pending(
    config: CheckpointConfig, memory: MemoryTier, rank: int | None, log: logging.Logger
) -> None:
    """Unpin the oldest pending steps past ``durable_max_pending_steps`` (never the newest)."""
    limit = config.durable_max_pending_steps
    parts = _pending_parts(config, memory, rank, log)
    steps = list(dict.fromkeys(p.step for p in parts))  # oldest save first
    if len(steps) <= limit:
        return
    newest = steps[-1]
    unpinned: set[_Part] = set()
    for part in parts:
        if len(steps) <= limit:
            break
        if part.step == newest or _owned_elsewhere(config, memory, part):
            continue
        unpinned.add(part)
        memory.write(
            layout.step_key(
                config.namespace, part.step, layout.unpinned_name(part.attempt, part.rank)
            ),
            [b""],
        )
        with _STATE:
            error = _FAILED.pop(_key(config, part), "interrupted by a crash")
        log.error(
            step_message(
                part.rank,
                part.step,
                f"unpinned from the memory tier: its durable drain failed ({error}) and "
                f"{len(steps)} steps are pending (durable_max_pending_steps={limit}). Memory "
                f"retention may now evict it ({part.nbytes} bytes) and it will not reach the "
                "durable tier; newer steps are kept.",
            )
        )
        _mark_failed_later(config, part, log)
        if all(p in unpinned for p in parts if p.step == part.step):
            steps.remove(part.step)


def _mark_failed_later(config: CheckpointConfig, part: _Part, log: logging.Logger) -> None:
    """In the background (the durable tier may be down): the coordinator stops waiting."""

    def mark() -> None:
        try:
            durable = open_durable_tier(config, check=False)
        except Exception as e:
            log.warning(step_message(part.rank, part.step, f"No failure marker left: {e}"))
            return
        error = RuntimeError("unpinned: durable_max_pending_steps exceeded")
        mark_failed(durable, config.namespace, part.step, part.attempt, part.rank, error, log)

    threading.Thread(target=mark, name="tierckpt-mark-failed", daemon=True).start()


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
    with _STATE:
        lock = _RESUME_LOCKS.setdefault(key, threading.Lock())
    with lock:
        check_reachable(durable)
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
    parts = _own_parts(memory, config.namespace, step, listing, rank)
    if not parts:
        return False
    record = mem.commit(step) if layout.COMMIT_NAME in listing else None
    if record is not None:
        if not record.durable:
            return False
        live = {(r.attempt, r.rank) for r in record.ranks}
        parts = [p for p in parts if (p.attempt, p.rank) in live]
    else:  # not committed on this node: its rank manifests say which parts are durable
        parts = [p for p in parts if _is_durable_part(memory, mem, p, None)]
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
        if _owned_elsewhere(config, memory, part):
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
    with _STATE:
        for part in todo:
            _FAILED.pop(_key(config, part), None)
    return True


def _upload_parts(
    config: CheckpointConfig,
    mem: StepCatalog,
    durable: Tier,
    record: CommitRecord | None,
    parts: list[_Part],
    coordinator_part: _Part | None,
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
            with _STATE:
                _FAILED[_key(config, part)] = f"{type(e).__name__}: {e}"
            raise


def _read_part_manifest(mem: StepCatalog, record: CommitRecord | None, part: _Part) -> RankManifest:
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


# --------------------------------------------------------------------------- retrying


class _Retrier:
    """Retries this process's failed drains of one namespace until none is left."""

    def __init__(self, config: CheckpointConfig, rank: int | None) -> None:
        self.config = config
        self.rank = rank
        self.key = (config.memory_root or "", config.namespace, rank)
        self.wake = threading.Event()

    def run(self) -> None:
        config, log = self.config, logger_for(self.config)
        memory = MemoryTier(config.memory_root or "")
        delay = config.durable_retry_initial_s
        while True:
            if self.wake.wait(delay * random.uniform(0.8, 1.2)):
                self.wake.clear()
                delay = config.durable_retry_initial_s
            try:
                durable = open_durable_tier(config, check=False)
                _resume(config, memory, durable, self.rank, log)
            except Exception as e:
                log.warning(
                    f"[Rank {self.rank or 0}] Retrying pending durable drains failed: "
                    f"{type(e).__name__}: {e}"
                )
            try:
                _bound_pending(config, memory, self.rank, log)
            except OSError as e:
                log.warning(f"[Rank {self.rank or 0}] durable_max_pending_steps not applied: {e}")
            delay = min(max(delay, 1e-3) * 2, config.durable_retry_max_s)
            with _STATE:  # decided under the lock: a failure noted meanwhile is seen here
                try:
                    parts = _pending_parts(config, memory, self.rank, log)
                except OSError:
                    parts = []
                if not os.path.isdir(memory.path(config.namespace)) or not any(
                    not _owned_elsewhere(config, memory, p) for p in parts
                ):
                    del _RETRIERS[self.key]
                    return
            log.warning(
                f"[Rank {self.rank or 0}] {len({p.step for p in parts})} durable step(s) "
                f"({sum(p.nbytes for p in parts)} bytes) stay pinned in the memory tier awaiting "
                f"{config.durable_base_path}; next retry in about {delay:.1f}s."
            )


def _ensure_retrier(config: CheckpointConfig, rank: int | None) -> None:
    key = (config.memory_root or "", config.namespace, rank)
    with _STATE:
        if key in _RETRIERS:
            return
        retrier = _Retrier(config, rank)
        _RETRIERS[key] = retrier
    threading.Thread(
        target=retrier.run, name=f"tierckpt-retry-{config.namespace}", daemon=True
    ).start()
