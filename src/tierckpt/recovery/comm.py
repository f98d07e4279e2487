"""The store, and forming / aborting a generation's process group (gloo; NCCL behind the same seam).

The store is connected once per process and reused by every generation: a generation's
group is ``init_process_group(backend, store=PrefixStore(...))``, which costs one exchange
of addresses among live processes, not a rendezvous.
"""

from __future__ import annotations

import datetime
import os
import threading
from typing import Protocol

import torch
import torch.distributed as dist
from torch.distributed import PrefixStore, Store, TCPStore

__all__ = [
    "CommBackend",
    "GlooBackend",
    "NcclBackend",
    "backend_for",
    "connect_store",
    "form_group",
    "reset_collective_state",
]


class CommBackend(Protocol):
    """What recovery needs of a communication backend."""

    name: str

    def abort(self) -> None:
        """Abort the default group at once, without waiting for peers; peers' pending
        collectives on it fail (gloo: their connections are closed)."""

    def healthy(self) -> bool:
        """Whether this process's device can still be used (else it must be replaced)."""


def _abort_default_group() -> None:
    if not dist.is_initialized():
        return
    try:
        dist.distributed_c10d._abort_process_group()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


class GlooBackend:
    """CPU: aborting closes the group's TCP pairs, so blocked peers fail at once."""

    name = "gloo"

    def abort(self) -> None:
        _abort_default_group()

    def healthy(self) -> bool:
        return True


class NcclBackend:
    """GPU: aborts the NCCL communicators (``ncclCommAbort``, via torch's
    ``_abort_process_group``); the device is healthy when a synchronize returns in time.

    Written to the same seam as gloo; not run in CI (no GPU there)."""

    name = "nccl"

    def __init__(self, health_timeout_s: float = 10.0) -> None:
        self.health_timeout_s = health_timeout_s

    def abort(self) -> None:
        _abort_default_group()

    def healthy(self) -> bool:
        ok: list[bool] = []

        def probe() -> None:
            torch.cuda.synchronize()
            ok.append(True)

        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(self.health_timeout_s)
        return bool(ok)


def backend_for(name: str) -> CommBackend:
    """The backend object for ``"gloo"`` or ``"nccl"``."""
    if name == "gloo":
        return GlooBackend()
    if name == "nccl":
        return NcclBackend()
    raise ValueError(f"backend={name!r}: recovery supports 'gloo' and 'nccl'.")


def connect_store(timeout_s: float = 300.0, *, client: bool = False) -> Store:
    """The job's TCPStore at MASTER_ADDR:MASTER_PORT, connected once.

    Under ``tierckpt-run`` (and torchrun's shared agent store) the store lives in the
    launcher and every worker is a client; otherwise rank 0 hosts it, as ``env://`` does.
    ``client=True`` opens one more connection (for a thread of its own).
    """
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    port = int(os.environ["MASTER_PORT"])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    return TCPStore(
        host,
        port,
        world,
        is_master=(rank == 0 and not agent and not client),
        timeout=datetime.timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )


def form_group(
    store: Store, prefix: str, rank: int, world_size: int, backend: str, timeout_s: float
) -> None:
    """Initialise the default process group of one generation on ``prefix`` of ``store``."""
    # Store keys of groups carry a per-process group counter, reset by destroying the
    # default group but not by a failed init (a failure during recovery): start every
    # generation from 0 so that a fresh replacement and a healthy rank use the same keys.
    dist.distributed_c10d._world.group_count = 0
    dist.init_process_group(
        backend,
        store=PrefixStore(prefix, store),
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )


def reset_collective_state() -> None:
    """Forget tierckpt's per-group collective bookkeeping after a new generation's group.

    tierckpt numbers its store keys of bounded arrivals (``_collective.arrive``) per process
    and orders a namespace's saves (``dcp/_inflight``); a replaced rank starts both from
    zero, so every rank of the new generation must too. (A hook tierckpt's manager could
    own: ``tierckpt.reset_process_group_state()``.)
    """
    from .._runtime import RUNTIME

    c = RUNTIME.collectives
    with c.lock:
        c.sequence.clear()
        c.last_save.clear()
