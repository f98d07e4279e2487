"""Copying one rank's part of a committed save into the memory tier of its peers.

Runs in the background after the save: it waits until this node holds the step's commit
(every node does when ``dcp.save`` returns), then sends the data file (verified per blob
on receipt), the rank manifest and, last, the ``.replica`` marker to each target; then
writes ``.replicated`` here. ``done`` (``writer.peer_done``) completes when that is over
and fails with :class:`ReplicationError` when it cannot be (the save stays committed).
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

from .. import layout, metrics
from .._exit import run_in_background
from .._faults import crash_point
from .._log import logger_for, rate, step_message
from ..catalog import StepCatalog
from ..config import CheckpointConfig
from ..errors import ReplicationError
from ..manifest import CommitRecord, RankManifest, checksum
from ..priority import background_priority
from ..tiers.memory import MemoryTier
from .node import PeerNode
from .placement import rank_targets

__all__ = ["Superseded", "Target", "replicate_part"]

POLL_S = 0.005
"""How often a replication waiting for its step's commit looks for it (a local stat)."""

_latest: dict[tuple[str, str, int], int] = {}
_locks: dict[tuple[str, str, int], threading.Lock] = {}
_cooldown: dict[tuple[str, str, int], float] = {}
"""When the next replication of a rank may start (``peer_duty_cycle``)."""
_guard = threading.Lock()


@dataclass(frozen=True)
class Target:
    """A rank on another node that receives a replica."""

    rank: int
    node_id: str
    address: tuple[str, int] | None


def replicate_part(
    config: CheckpointConfig,
    memory: MemoryTier,
    node: PeerNode,
    manifest: RankManifest,
    done: Future[None],
) -> None:
    """Replicate ``manifest``'s part in the background to the targets its commit places it
    on (none when the save makes no replicas); resolves ``done``."""
    key = (memory.root, config.namespace, manifest.rank)
    with _guard:
        seq = _latest[key] = _latest.get(key, 0) + 1
        lock = _locks.setdefault(key, threading.Lock())

    def superseded() -> bool:
        with _guard:
            return _latest[key] != seq

    def body() -> None:
        background_priority()
        with lock:  # one replication of a rank at a time, in order
            with _guard:
                resume_at = _cooldown.get(key, 0.0)
            time.sleep(max(0.0, resume_at - time.monotonic()))  # the duty cycle's rest
            if superseded():  # a newer save of this rank is queued: replicate that one
                raise Superseded(
                    f"Step {manifest.step}: not replicated, a newer save of rank "
                    f"{manifest.rank} was queued behind it (replications coalesce)."
                )
            busy = _replicate(config, memory, node, manifest, superseded)
            rest = busy * (1.0 / config.peer_duty_cycle - 1.0)  # only transfers count
            with _guard:
                _cooldown[key] = time.monotonic() + rest

    fut = run_in_background(body, name=f"tierckpt-replicate-{manifest.step}")
    fut.add_done_callback(lambda f: _resolve(done, f))


class Superseded(ReplicationError):
    """A queued replication skipped because a newer save of the same rank came after it."""


def _resolve(done: Future[None], fut: Future[None]) -> None:
    if done.done():
        return
    error = fut.exception()
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


def targets_of(record: CommitRecord, rank: int) -> list[Target]:
    """The ranks (on other nodes) that receive ``rank``'s part of ``record``."""
    if record.peer_replicas <= 0 or len(record.nodes) != record.world_size:
        return []
    ranks = rank_targets(record.nodes, record.peer_replicas)[rank]
    out = []
    for r in ranks:
        address = record.addresses[r] if r < len(record.addresses) else None
        where = (str(address[0]), int(address[1])) if address else None
        out.append(Target(r, record.nodes[r], where))
    return out


def _still_committed(catalog: StepCatalog, manifest: RankManifest) -> bool:
    record = catalog.commit(manifest.step)
    return record is not None and any(
        r.rank == manifest.rank and r.attempt == manifest.attempt for r in record.ranks
    )


def _wait_for_commit(
    catalog: StepCatalog, manifest: RankManifest, timeout: float, superseded: object
) -> CommitRecord:
    deadline = time.monotonic() + timeout
    while True:
        record = catalog.commit(manifest.step)
        if record is not None and any(
            r.rank == manifest.rank and r.attempt == manifest.attempt for r in record.ranks
        ):
            return record
        if callable(superseded) and superseded():
            raise ReplicationError(
                f"Step {manifest.step}: not committed before this rank's next save; its part "
                "is not replicated (the next save is)."
            )
        if time.monotonic() >= deadline:
            raise ReplicationError(
                f"Step {manifest.step}: its commit did not reach this node within {timeout:.0f} s "
                "(the save failed, or this node's peer service was unreachable); its part is "
                "not replicated."
            )
        time.sleep(POLL_S)


def _replicate(
    config: CheckpointConfig,
    memory: MemoryTier,
    node: PeerNode,
    manifest: RankManifest,
    superseded: object,
) -> float:
    """Replicate one part; the seconds spent transferring (0 when nothing was sent)."""
    log = logger_for(config)
    ns, step, rank, attempt = config.namespace, manifest.step, manifest.rank, manifest.attempt
    catalog = StepCatalog(memory, ns, log)
    t0 = time.perf_counter()
    targets: list[Target] = []
    try:
        # The commit reaches every node before dcp.save returns, unless its push failed.
        record = _wait_for_commit(catalog, manifest, 2 * config.peer_timeout_s, superseded)
        targets = targets_of(record, rank)
        if not targets:
            return 0.0  # this save makes no replicas
        sending = time.perf_counter()
        manifest_json = manifest.to_json()
        marker = json.dumps(
            {
                "rank": rank,
                "attempt": attempt,
                "step": step,
                "from_node": config.node_id,
                "manifest_checksum": checksum(manifest_json),
            }
        ).encode()
        nbytes = 0
        for target in targets:
            if target.address is None:
                raise ReplicationError(
                    f"node {target.node_id} (rank {target.rank}) runs no peer service"
                )
            with node.client(target.address) as client:
                for fname, info in manifest.files.items():
                    fkey = layout.step_key(ns, step, fname)
                    blobs = [(int(o), int(n), str(c)) for o, n, c in info["blobs"]]
                    with memory.open_shared(fkey):  # the pool cannot reuse it meanwhile
                        client.put_file(memory.path(fkey), fkey, blobs, length=int(info["size"]))
                    nbytes += int(info["size"])
                crash_point("peer.after_data")
                client.put_bytes(
                    layout.step_key(ns, step, layout.manifest_name(attempt, rank)), manifest_json
                )
                client.put_bytes(  # written last: the replica is complete and verified
                    layout.step_key(ns, step, layout.replica_name(attempt, rank)), marker
                )
        memory.write(
            layout.step_key(ns, step, layout.replicated_name(attempt, rank)),
            [json.dumps({"nodes": [t.node_id for t in targets], "time": time.time()}).encode()],
        )
    except Superseded:
        raise
    except Exception as e:
        if not _still_committed(catalog, manifest):  # evicted meanwhile: nothing to keep
            log.debug(step_message(rank, step, f"Replication stopped: step evicted ({e})"))
            raise Superseded(
                f"Step {step}: evicted from memory while it replicated (newer saves replace "
                "it); the newest saves are replicated instead."
            ) from e
        where = ", ".join(f"node {t.node_id}" for t in targets)
        error = e if isinstance(e, ReplicationError) else None
        message = (
            f"Replicating rank {rank}'s part of step {step} to {where} failed: "
            f"{type(e).__name__}: {e}. The step stays committed in this node's memory; the "
            "next save replicates again."
        )
        log.warning(step_message(rank, step, message))
        metrics.observe_replication(ns, time.perf_counter() - t0, 0, False)
        raise ReplicationError(message) from (error or e)
    metrics.observe_replication(ns, time.perf_counter() - t0, nbytes, True)
    log.debug(
        step_message(
            rank,
            step,
            f"Replicated to {len(targets)} peer(s): {rate(nbytes, time.perf_counter() - t0)}",
        )
    )
    return time.perf_counter() - sending
