"""A save's durable drain signalled through the job's rendezvous store, not by polling S3.

Each rank sets ``tierckpt/<ns>/<step>/<attempt>-r<rank>/part`` once its part is in the durable
tier (``ok``) or its upload failed (``failed: <reason>``, after the ``.failed`` marker); the
coordinator checks those keys, then sets ``.../committed`` for every rank once the durable
commit is written (or ``failed: <reason>``). A key only wakes a waiter: what it then decides
comes from the durable tier (one listing), which stays the only source of truth.

The keys are checked without blocking (a few ms apart, on loopback or the job's network):
a blocking store wait cannot also notice a part that another process uploads without
signalling (a drain resumed after a failure), for which the tier is still listed every few
seconds (``COMMIT_TIER_CHECK_S``). The store is the one the process group was made with
(TCPStore, or the torchrun agent's); its values are a few bytes per rank per drained save,
deleted once read. The signals keep the job's store object alive, so drains that outlive
``destroy_process_group`` still reach it. Where there is no process group (a single
process, DCP's process-based async saves, a drain resumed after a restart), once the store
fails, or with ``TIERCKPT_DRAIN_STORE=0``, the drain polls the durable tier as before. No
collective is issued (invariant 6): store requests are point-to-point.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import torch.distributed as dist

from ._dist import dist_ready

__all__ = ["STORE_ENV", "DrainSignals", "job_signals"]

STORE_ENV = "TIERCKPT_DRAIN_STORE"
"""Set to ``0`` to poll the durable tier instead of using the job store (for comparison, or
where the store must carry nothing else)."""

_FAILED = b"failed: "


def _key(namespace: str, step: int, attempt: str, rank: int, what: str) -> str:
    return f"tierckpt/{namespace}/{step}/{attempt}-r{rank}/{what}"


class DrainSignals:
    """Set and check drain progress keys in one job's store (see the module docstring)."""

    def __init__(self, store: Any, log: logging.Logger | None = None) -> None:
        self._store = store  # kept: it owns the server in the process that hosts it
        self._conn: Any = None
        self._lock = threading.Lock()
        self._broken = False
        self._log = log or logging.getLogger("tierckpt")

    def _give_up(self, what: str, error: BaseException) -> None:
        if not self._broken:
            self._broken = True
            self._log.debug(
                "The job's store failed (%s: %s: %s); drains poll the durable tier instead.",
                what,
                type(error).__name__,
                error,
            )

    def _client(self) -> Any:
        """This object's own connection to the store, made on first use (lock held)."""
        if self._conn is None:
            self._conn = self._store.clone()
        return self._conn

    def _set(self, key: str, value: bytes) -> None:
        if self._broken:
            return
        try:
            with self._lock:  # one connection, one request at a time
                self._client().set(key, value)
        except Exception as e:
            self._give_up(f"set {key}", e)

    def part_done(
        self, namespace: str, step: int, attempt: str, rank: int, error: str | None = None
    ) -> None:
        """This rank's part of ``step`` is in the durable tier (or failed with ``error``)."""
        value = b"ok" if error is None else _FAILED + error.encode()[:500]
        self._set(_key(namespace, step, attempt, rank, "part"), value)

    def committed(
        self, namespace: str, step: int, ranks: list[tuple[str, int]], error: str | None = None
    ) -> None:
        """The durable commit of ``step`` is written (or failed) for ``(attempt, rank)``s."""
        value = b"ok" if error is None else _FAILED + error.encode()[:500]
        for attempt, rank in ranks:
            self._set(_key(namespace, step, attempt, rank, "committed"), value)

    def _read(self, keys: list[str]) -> str | None:
        """Without waiting: ``"failed: <reason>"`` if a key says so, ``"ok"`` once every key
        is set (the keys are then deleted), else None (also once the store failed)."""
        if self._broken:
            return None
        try:
            with self._lock:
                client = self._client()
                if not client.check(keys):
                    failed = [k for k in keys if client.check([k]) and _failed(client.get(k))]
                    return client.get(failed[0]).decode(errors="replace") if failed else None
                values = [client.get(k) for k in keys]
                bad = [v for v in values if _failed(v)]
                if bad:
                    return bad[0].decode(errors="replace")
                for k in keys:
                    client.delete_key(k)
                return "ok"
        except Exception as e:
            self._give_up("check", e)
            return None

    def parts(self, namespace: str, step: int, ranks: list[tuple[str, int]]) -> str | None:
        """What the ranks signalled of their parts: see :meth:`_read`."""
        return self._read([_key(namespace, step, a, r, "part") for a, r in ranks])

    def commit_of(self, namespace: str, step: int, attempt: str, rank: int) -> str | None:
        """What the coordinator signalled of the durable commit of this rank's part."""
        return self._read([_key(namespace, step, attempt, rank, "committed")])


def _failed(value: bytes) -> bool:
    return value.startswith(_FAILED)


def job_signals(log: logging.Logger | None = None) -> DrainSignals | None:
    """Signals over this process's job store, or None without a process group.

    Call from the thread that starts a drain (while the process group exists); the drain's
    threads hold the result, and with it the store, only while they run (a process group
    made again later, by in-process recovery, gets a store of its own).
    """
    if os.environ.get(STORE_ENV, "1") == "0":
        return None
    try:
        if not dist_ready():
            return None
        store = dist.distributed_c10d._get_default_store()
    except Exception:
        return None
    return DrainSignals(store, log)
