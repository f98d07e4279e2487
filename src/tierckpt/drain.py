"""Background copy of committed memory-tier steps into the durable tier.

Every rank uploads its own part (data files, then its manifest, which marks the part
complete). The coordinator then waits for every rank's manifest, writes the DCP
metadata and, last, the commit record. What is committed is decided from the durable tier
itself, never through the training process group (invariant 6). Within a job the waits are
woken through the job's store (:mod:`tierckpt.drain_signals`): one listing then confirms;
without it they poll the tier. A rank whose upload fails leaves a ``.failed`` marker there
(and says so through the store), so the coordinator stops waiting at once.

The background threads and the exit wait live in :mod:`tierckpt._exit` (re-exported here).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable

from . import layout
from ._exit import run_in_background, set_exit_wait, wait_at_exit, wait_for_drains
from ._faults import crash_point
from ._log import rate, step_message
from ._runtime import RUNTIME
from .catalog import StepCatalog
from .constants import (
    COMMIT_POLL_FIRST_S,
    COMMIT_POLL_MAX_S,
    COMMIT_TIER_CHECK_S,
    STORE_POLL_FIRST_S,
    STORE_POLL_MAX_S,
)
from .drain_signals import DrainSignals
from .errors import DurableTierError, DurableUnavailableError
from .manifest import CommitRecord, RankManifest
from .progress import Progress
from .staged_upload import StagedUpload
from .tiers.base import Tier
from .tiers.directory import DirectoryTier
from .tiers.memory import MemoryTier

__all__ = [
    "check_reachable",
    "clear_failed",
    "commit_durable",
    "in_flight",
    "run_in_background",
    "set_exit_wait",
    "upload_rank_part",
    "wait_at_exit",
    "wait_for_drains",
    "watch_durable_commit",
]


def check_reachable(durable: Tier, *, create: bool = True) -> None:
    """Raise :class:`DurableUnavailableError` now if the tier says it is unreachable.

    ``create=False`` creates nothing (a missing ``file://`` directory is an empty tier).
    """
    check = getattr(durable, "check_available", None)
    if check is not None:
        check(create=create)


def upload_rank_part(
    memory: MemoryTier,
    durable: Tier,
    namespace: str,
    manifest: RankManifest,
    log: logging.Logger,
    *,
    mark_drained: bool = True,
    staged: StagedUpload | None = None,
) -> int:
    """Copy one rank's files of a step to the durable tier; the manifest goes last.

    ``staged`` is the upload of a data file that began while it was written: it is waited
    for instead of redone (and redone whole if it was cancelled or failed). On failure a
    ``.failed`` marker is left in the durable tier (when it can be written) so the
    coordinator's durable commit stops waiting for this part.
    """
    t0 = time.perf_counter()
    step, rank, attempt = manifest.step, manifest.rank, manifest.attempt
    drains = RUNTIME.drains
    with drains.lock:
        drains.in_flight.add((namespace, step, attempt, rank))
    total = 0
    progress = Progress(
        log,
        f"step {step} drain (rank {rank})",
        sum(manifest.files[n].get("size", 0) for n in manifest.files),
    )
    try:
        for name in manifest.files:
            key = layout.step_key(namespace, step, name)
            sent = _staged_result(staged, key, manifest.files[name].get("size", -1), log)
            if sent is not None:
                total += sent
            elif isinstance(durable, DirectoryTier):  # byte progress as the copy goes
                total += durable.put_file(key, memory.path(key), progress=progress.add)
            else:
                total += durable.put_file(key, memory.path(key))
            progress.add(total - progress.done)
        crash_point("drain.after_data")
        durable.write(
            layout.step_key(namespace, step, layout.manifest_name(attempt, rank)),
            [manifest.to_json()],
        )
        crash_point("drain.after_manifest")
    except BaseException as e:
        if not isinstance(e, DurableUnavailableError):
            mark_failed(durable, namespace, step, attempt, rank, e, log)
        raise
    finally:
        with drains.lock:
            drains.in_flight.discard((namespace, step, attempt, rank))
    if mark_drained:  # the coordinator's part is marked once the durable commit is written
        memory.write(layout.step_key(namespace, step, layout.drained_name(attempt, rank)), [b""])
    log.debug(
        step_message(
            rank,
            step,
            f"Durable upload of this rank's part completed: {rate(total, time.perf_counter() - t0)}",
        )
    )
    return total


def _staged_result(
    staged: StagedUpload | None, key: str, size: int, log: logging.Logger
) -> int | None:
    """Bytes the staged upload of ``key`` sent, once it is done; ``None`` when there is none
    for ``key`` or it was cancelled or failed (then the file is uploaded whole)."""
    if staged is None or staged.key != key:
        return None
    try:
        sent = staged.result()
    except Exception as e:
        log.warning("The upload of %s while it was staged failed (%s); uploading it whole.", key, e)
        return None
    if sent is not None and sent != size:
        log.warning(
            "The upload of %s while it was staged sent %d bytes, not %d; uploading it whole.",
            key,
            sent,
            size,
        )
        return None
    if sent is not None:
        log.debug("%s was uploaded while it was staged (%d bytes).", key, sent)
    return sent


def mark_failed(
    durable: Tier,
    namespace: str,
    step: int,
    attempt: str,
    rank: int,
    error: BaseException,
    log: logging.Logger,
) -> None:
    """Best effort: tell the coordinator (through the durable tier) that this part failed."""
    key = layout.step_key(namespace, step, layout.failed_name(attempt, rank))
    reason = f"{type(error).__name__}: {error}"[:500]
    try:
        durable.write(key, [json.dumps({"rank": rank, "error": reason}).encode()])
    except Exception as e:
        log.warning(step_message(rank, step, f"Could not leave the failure marker {key}: {e}"))


def clear_failed(durable: Tier, namespace: str, step: int, attempt: str, rank: int) -> None:
    """Best effort: remove this part's failure marker before it is uploaded again."""
    with contextlib.suppress(Exception):
        durable.delete(layout.step_key(namespace, step, layout.failed_name(attempt, rank)))


def _failure_reason(durable: Tier, key: str) -> str:
    try:
        return str(json.loads(bytes(durable.read(key))).get("error", "unknown error"))
    except Exception:
        return "its marker is unreadable"


def in_flight(namespace: str, step: int, attempt: str, rank: int) -> bool:
    """True while this process is uploading that rank's part or committing its attempt."""
    drains = RUNTIME.drains
    with drains.lock:
        uploading = (namespace, step, attempt, rank) in drains.in_flight
        return uploading or (namespace, step, attempt) in drains.committing


def _await(
    check: Callable[[], bool],
    deadline: float,
    signalled: Callable[[], str | None] | None,
    on_failed: Callable[[str], None],
) -> bool:
    """True once ``check()`` (a look at the durable tier) is, False at ``deadline``.

    With ``signalled`` (a look at the job store's keys, see :mod:`tierckpt.drain_signals`)
    the tier is looked at when the store says the parts are there, or failed (then
    ``on_failed(what it said)`` unless the tier has them after all), and every
    ``COMMIT_TIER_CHECK_S`` meanwhile; without it, or once the store fails, it is polled.
    """
    if signalled is None:
        return _poll(check, deadline)
    delay = STORE_POLL_FIRST_S
    next_look = time.monotonic() + COMMIT_TIER_CHECK_S
    while True:
        said = signalled()
        now = time.monotonic()
        if said is not None or now >= next_look:
            if check():
                return True
            if said is not None and said.startswith("failed"):
                on_failed(said)
            if said is not None:  # said "ok" but the tier disagrees: the tier decides
                return _poll(check, deadline)
            next_look = now + COMMIT_TIER_CHECK_S
        if now >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, STORE_POLL_MAX_S)


def _poll(check: Callable[[], bool], deadline: float) -> bool:
    delay = COMMIT_POLL_FIRST_S
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, COMMIT_POLL_MAX_S)


def commit_durable(
    memory: MemoryTier,
    durable: Tier,
    record: CommitRecord,
    timeout_s: float,
    log: logging.Logger,
    *,
    metadata: bytes | None = None,
    coordinator: tuple[str, int] | None = None,
    signals: DrainSignals | None = None,
) -> None:
    """Coordinator: once every rank's part is durable, write metadata and then the commit.

    Stops waiting at once, with a :class:`DurableTierError` naming the rank, when a part
    that is still missing has a failure marker (or its rank signalled a failure). With
    ``signals`` the wait is woken through the job's store instead of polling the tier.
    """
    job = (record.namespace, record.step, record.attempt)
    drains = RUNTIME.drains
    with drains.lock:
        drains.committing.add(job)
    try:
        _commit_durable(memory, durable, record, timeout_s, log, metadata, coordinator, signals)
    finally:
        with drains.lock:
            drains.committing.discard(job)


def _commit_durable(
    memory: MemoryTier,
    durable: Tier,
    record: CommitRecord,
    timeout_s: float,
    log: logging.Logger,
    metadata: bytes | None,
    coordinator: tuple[str, int] | None,
    signals: DrainSignals | None,
) -> None:
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    catalog = StepCatalog(durable, record.namespace, log)
    needed = {r.manifest for r in record.ranks}
    missing: list[str] = []

    def all_parts_there() -> bool:
        nonlocal missing
        files = catalog.files(record.step)
        missing = sorted(needed - set(files))
        failed = [
            r
            for r in record.ranks
            if r.manifest in missing and layout.failed_name(r.attempt, r.rank) in files
        ]
        if failed:
            why = "; ".join(
                f"rank {r.rank}'s upload failed ("
                + _failure_reason(
                    durable, catalog.key(record.step, layout.failed_name(r.attempt, r.rank))
                )
                + ")"
                for r in failed
            )
            raise DurableTierError(
                f"Step {record.step}: the durable commit in {durable.url} stopped waiting: {why}. "
                "The step stays committed in memory; its drain is retried in the background "
                "and resumed by the next writer or reader of the namespace."
            )
        return not missing

    ranks = [(r.attempt, r.rank) for r in record.ranks]

    def part_failed(said: str) -> None:
        raise DurableTierError(
            f"Step {record.step}: the durable commit in {durable.url} stopped waiting: a "
            f"rank's upload {said}. The step stays committed in memory; its drain is "
            "retried in the background and resumed by the next writer or reader."
        )

    woken: list[str] = []  # what the store said, for the log line

    def parts_signalled() -> str | None:
        said = None if signals is None else signals.parts(record.namespace, record.step, ranks)
        woken.extend([said] if said is not None else [])
        return said

    signalled = None if signals is None else parts_signalled
    if not _await(all_parts_there, deadline, signalled, part_failed):
        raise DurableTierError(
            f"Step {record.step}: the durable commit gave up after {timeout_s}s waiting for "
            f"{missing} in {durable.url}; those ranks' uploads failed or their processes died. "
            "The step stays committed in memory; the next writer or reader resumes the drain."
        )
    crash_point("drain.before_durable_metadata")
    source = (
        metadata if metadata is not None else memory.path(catalog.key(record.step, record.metadata))
    )
    catalog.commit_step(record, source, after_metadata="drain.after_durable_metadata")
    crash_point("drain.after_durable_commit")
    if coordinator is not None:  # until now retention kept the step: this node's part is done
        attempt, rank = coordinator
        memory.write(
            layout.step_key(record.namespace, record.step, layout.drained_name(attempt, rank)),
            [b""],
        )
    log.debug(
        step_message(
            0,
            record.step,
            f"Durable commit written in {time.perf_counter() - t0:.3f}s ({durable.url}; the "
            + ("parts signalled through the job store)" if woken else "parts polled)"),
        )
    )


def watch_durable_commit(
    durable: Tier,
    namespace: str,
    step: int,
    attempt: str,
    rank: int,
    timeout_s: float,
    log: logging.Logger,
    signals: DrainSignals | None = None,
) -> None:
    """Non-coordinators: wait until the durable commit of ``step`` includes this rank's attempt.

    Ends at once, typed, when this rank's part has a failure marker (its upload, maybe in
    another process, failed) or the coordinator signalled that the commit failed. With
    ``signals`` the wait is woken through the job's store instead of polling the tier.
    """
    deadline = time.monotonic() + timeout_s
    catalog = StepCatalog(durable, namespace, log)
    failed = layout.failed_name(attempt, rank)

    def committed() -> bool:
        files = catalog.files(step)
        if layout.COMMIT_NAME in files:
            record = catalog.commit(step)
            if record is not None and any(
                r.rank == rank and r.attempt == attempt for r in record.ranks
            ):
                return True
        if failed in files and layout.manifest_name(attempt, rank) not in files:
            reason = _failure_reason(durable, catalog.key(step, failed))
            raise DurableTierError(
                f"Step {step}: rank {rank}'s durable upload failed ({reason}); the step stays "
                "committed in memory and its drain is retried."
            )
        return False

    def commit_failed(said: str) -> None:
        raise DurableTierError(
            f"Step {step}: the coordinator's durable commit {said}; the step stays committed "
            "in memory and its drain is retried."
        )

    signalled = (
        None if signals is None else lambda: signals.commit_of(namespace, step, attempt, rank)
    )
    if not _await(committed, deadline, signalled, commit_failed):
        raise DurableTierError(
            f"Step {step}: no durable commit including rank {rank} appeared in {durable.url} "
            f"within {timeout_s}s; see the coordinator's log for the cause."
        )
