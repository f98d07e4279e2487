"""Starting a save's durable drain: this rank's upload, the coordinator's durable commit,
and the watch that resolves a writer's ``durable_done`` from the durable tier.

Each runs on a background thread (``drain.run_in_background``); failures are noted for the
background retry and reported through ``durable_done`` as typed errors.
"""

from __future__ import annotations

import time
from concurrent.futures import Future

from . import metrics
from ._log import logger_for, step_message, summary
from .config import CheckpointConfig
from .drain import (
    check_reachable,
    commit_durable,
    run_in_background,
    upload_rank_part,
    watch_durable_commit,
)
from .drain_signals import DrainSignals, job_signals
from .durable_retention import sweep_durable
from .errors import DurableTierError, TierckptError
from .manifest import CommitRecord, RankManifest
from .resume import note_failure, note_success
from .staged_upload import StagedUpload
from .tiers.base import Tier
from .tiers.memory import MemoryTier

__all__ = ["as_drain_error", "start_durable_commit", "start_upload", "watch_commit"]


def as_drain_error(error: BaseException, step: int | None) -> BaseException:
    """A drain failure as a :class:`DurableTierError` (typed errors pass through)."""
    if isinstance(error, TierckptError):
        return error
    wrapped = DurableTierError(
        f"Step {step}: the durable drain failed ({type(error).__name__}: {error}); the step stays "
        "committed in memory, the drain is retried in the background (tierckpt.pending_drains "
        "lists it) and the next writer or reader of the namespace resumes it."
    )
    wrapped.__cause__ = error
    return wrapped


def watch_commit(
    config: CheckpointConfig,
    durable: Tier,
    step: int,
    attempt: str,
    rank: int,
    done: Future[None],
    after: Future[int] | None = None,
    signals: DrainSignals | None = None,
) -> None:
    """Resolve ``done`` once the durable tier has committed ``step`` (after ``after``);
    woken through the job's store when ``signals`` are given."""
    timeout, log = config.durable_commit_timeout_s, logger_for(config)
    ns = config.namespace

    def watch() -> None:
        try:
            if after is not None:
                after.result()
            watch_durable_commit(durable, ns, step, attempt, rank, timeout, log, signals)
            done.set_result(None)
        except BaseException as e:
            done.set_exception(as_drain_error(e, step))

    run_in_background(watch, name=f"tierckpt-watch-{step}", wait_at_exit=False)


def start_upload(
    config: CheckpointConfig,
    memory: MemoryTier,
    durable: Tier,
    manifest: RankManifest,
    *,
    coordinator: bool,
    done: Future[None],
    staged: StagedUpload | None = None,
) -> Future[int]:
    """Upload this rank's part in the background; on a non-coordinator also watch for the
    durable commit (the coordinator's part succeeds with its durable commit). ``staged``:
    the upload of its data file that began while it was written (waited for, not redone)."""
    log = logger_for(config)
    ns = config.namespace
    step, attempt, rank = manifest.step, manifest.attempt, manifest.rank
    signals = job_signals(log)

    def upload_part() -> int:
        try:
            check_reachable(durable)
            total = upload_rank_part(
                memory, durable, ns, manifest, log, mark_drained=not coordinator, staged=staged
            )
        except BaseException as e:
            note_failure(config, step, attempt, rank, e, log)  # retried in the background
            if signals is not None:
                signals.part_done(ns, step, attempt, rank, f"{type(e).__name__}: {e}")
            raise
        if signals is not None:
            signals.part_done(ns, step, attempt, rank)
        if not coordinator:  # the coordinator's part succeeds with its durable commit
            note_success(config, rank)
        return total

    upload = run_in_background(
        upload_part,
        name=f"tierckpt-upload-{manifest.step}",
        exit_note=(log, step_message(rank, step, "This rank's durable upload")),
    )
    if not coordinator:  # the coordinator chains the durable commit after the memory commit
        watch_commit(config, durable, step, attempt, rank, done, after=upload, signals=signals)
    return upload


def start_durable_commit(
    config: CheckpointConfig,
    memory: MemoryTier,
    durable: Tier,
    record: CommitRecord,
    metadata: bytes,
    *,
    attempt: str,
    rank: int,
    upload: Future[int] | None,
    done: Future[None],
) -> None:
    """Commit ``record`` in the durable tier in the background, after this rank's upload."""
    timeout, log = config.durable_commit_timeout_s, logger_for(config)
    t0 = time.perf_counter()
    signals = job_signals(log)
    others = [(r.attempt, r.rank) for r in record.ranks if (r.attempt, r.rank) != (attempt, rank)]

    def commit() -> None:
        try:
            if upload is not None:
                upload.result()
            commit_durable(
                memory,
                durable,
                record,
                timeout,
                log,
                metadata=metadata,
                coordinator=(attempt, rank),
                signals=signals,
            )
        except BaseException as e:
            if signals is not None:
                signals.committed(record.namespace, record.step, others, f"{type(e).__name__}: {e}")
            note_failure(config, record.step, attempt, rank, e, log)
            metrics.observe_drain(config.namespace, time.perf_counter() - t0, 0, ok=False)
            done.set_exception(as_drain_error(e, record.step))
            log.error(step_message(rank, record.step, f"Durable drain failed: {e}"))
            return
        summary(
            log, f"step {record.step} durable in {durable.url} ({time.perf_counter() - t0:.1f} s)"
        )
        metrics.observe_drain(
            config.namespace,
            time.perf_counter() - t0,
            sum(max(n, 0) for n in record.files().values()),
            ok=True,
        )
        if signals is not None:
            signals.committed(record.namespace, record.step, others)
        done.set_result(None)
        note_success(config, rank)
        sweep_durable(config, durable, log)

    run_in_background(
        commit,
        name=f"tierckpt-commit-{record.step}",
        exit_note=(log, step_message(rank, record.step, "The durable commit")),
    )
