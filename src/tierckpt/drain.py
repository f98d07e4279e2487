"""Background copy of committed memory-tier steps into the durable tier.

Every rank uploads its own part (data files, then its manifest, which marks the part
complete). The coordinator then waits for every rank's manifest, writes the DCP
metadata and, last, the commit record. Coordination goes through the durable tier
itself, never through the training process group (invariant 6).
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from . import layout
from ._faults import crash_point
from ._log import rate, step_message
from .catalog import StepCatalog
from .errors import DurableTierError
from .manifest import CommitRecord, RankManifest
from .tiers.base import Tier
from .tiers.memory import MemoryTier

__all__ = [
    "commit_durable",
    "in_flight",
    "run_in_background",
    "upload_rank_part",
    "wait_for_drains",
    "watch_durable_commit",
]

T = TypeVar("T")
_PENDING: set[Future[Any]] = set()
_IN_FLIGHT: set[tuple[str, int, str, int]] = set()
"""(namespace, step, attempt, rank) of uploads running in this process."""
_PENDING_LOCK = threading.Lock()


def run_in_background(fn: Callable[[], T], *, name: str, wait_at_exit: bool = True) -> Future[T]:
    """Run ``fn`` on a daemon thread; its future completes with the result or the error.

    Jobs with ``wait_at_exit`` are awaited when the interpreter exits normally, so the
    last durable step of a finished run is not cut off.
    """
    fut: Future[T] = Future()

    def body() -> None:
        try:
            fut.set_result(fn())
        except BaseException as e:
            fut.set_exception(e)
        finally:
            with _PENDING_LOCK:
                _PENDING.discard(fut)

    if wait_at_exit:
        with _PENDING_LOCK:
            _PENDING.add(fut)
    threading.Thread(target=body, name=name, daemon=True).start()
    return fut


def wait_for_drains(timeout: float | None = None) -> bool:
    """Wait for this process's uploads and durable commits; True if all finished."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        with _PENDING_LOCK:
            pending = list(_PENDING)
        if not pending:
            return True
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            return False
        try:
            pending[0].exception(timeout=left)
        except TimeoutError:
            return False


atexit.register(wait_for_drains)


def upload_rank_part(
    memory: MemoryTier,
    durable: Tier,
    namespace: str,
    manifest: RankManifest,
    log: logging.Logger,
    *,
    mark_drained: bool = True,
) -> int:
    """Copy one rank's files of a step to the durable tier; the manifest goes last."""
    t0 = time.perf_counter()
    step, rank, attempt = manifest.step, manifest.rank, manifest.attempt
    _IN_FLIGHT.add((namespace, step, attempt, rank))
    total = 0
    for name in manifest.files:
        key = layout.step_key(namespace, step, name)
        total += durable.put_file(key, memory.path(key))
    crash_point("drain.after_data")
    durable.write(
        layout.step_key(namespace, step, layout.manifest_name(attempt, rank)), [manifest.to_json()]
    )
    crash_point("drain.after_manifest")
    if mark_drained:  # the coordinator's part is marked once the durable commit is written
        memory.write(layout.step_key(namespace, step, layout.drained_name(attempt, rank)), [b""])
    _IN_FLIGHT.discard((namespace, step, attempt, rank))
    log.info(
        step_message(
            rank,
            step,
            f"Durable upload of this rank's part completed: {rate(total, time.perf_counter() - t0)}",
        )
    )
    return total


def in_flight(namespace: str, step: int, attempt: str, rank: int) -> bool:
    """True while this process is uploading that rank's part."""
    return (namespace, step, attempt, rank) in _IN_FLIGHT


def _poll(check: Callable[[], bool], deadline: float) -> bool:
    delay = 0.02
    while True:
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def commit_durable(
    memory: MemoryTier,
    durable: Tier,
    record: CommitRecord,
    timeout_s: float,
    log: logging.Logger,
    *,
    metadata: bytes | None = None,
    coordinator: tuple[str, int] | None = None,
) -> None:
    """Coordinator: once every rank's part is durable, write metadata and then the commit."""
    t0 = time.perf_counter()
    catalog = StepCatalog(durable, record.namespace, log)
    needed = {r.manifest for r in record.ranks}
    missing: list[str] = []

    def all_parts_there() -> bool:
        nonlocal missing
        missing = sorted(needed - set(catalog.files(record.step)))
        return not missing

    if not _poll(all_parts_there, time.monotonic() + timeout_s):
        raise DurableTierError(
            f"Step {record.step}: the durable commit gave up after {timeout_s}s waiting for "
            f"{missing} in {durable.url}; those ranks' uploads failed or their processes died. "
            "The step stays committed in memory; the next writer or reader resumes the drain."
        )
    crash_point("drain.before_durable_metadata")
    md_key = catalog.key(record.step, record.metadata)
    if metadata is not None:
        durable.write(md_key, [metadata])
    else:
        durable.put_file(md_key, memory.path(md_key))
    crash_point("drain.after_durable_metadata")
    catalog.write_commit(record)
    crash_point("drain.after_durable_commit")
    if coordinator is not None:  # until now retention kept the step: this node's part is done
        attempt, rank = coordinator
        memory.write(
            layout.step_key(record.namespace, record.step, layout.drained_name(attempt, rank)),
            [b""],
        )
    log.info(
        step_message(
            0,
            record.step,
            f"Durable commit written in {time.perf_counter() - t0:.3f}s ({durable.url})",
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
) -> None:
    """Non-coordinators: wait until the durable commit of ``step`` includes this rank's attempt."""
    catalog = StepCatalog(durable, namespace, log)

    def committed() -> bool:
        record = catalog.commit(step)
        return record is not None and any(
            r.rank == rank and r.attempt == attempt for r in record.ranks
        )

    if not _poll(committed, time.monotonic() + timeout_s):
        raise DurableTierError(
            f"Step {step}: no durable commit including rank {rank} appeared in {durable.url} "
            f"within {timeout_s}s; see the coordinator's log for the cause."
        )
