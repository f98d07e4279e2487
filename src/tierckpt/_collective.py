"""Bounded arrival at tierckpt's own collective steps.

Before a collective of its own (the readers' agreement ``all_gather_object``), every rank
sets a key in the default group's store and waits, for at most ``collective_timeout_s``,
for every other rank's key. A rank missing at the deadline is named in a
:class:`~tierckpt.errors.CollectiveTimeoutError`, instead of gloo's silent 30-minute wait.
Keys are numbered per (step kind, namespace, ranks) by how many such steps this process
entered, so the n-th reader of a namespace on every rank uses the same key.
"""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from ._runtime import RUNTIME
from .errors import CollectiveTimeoutError

__all__ = ["arrive"]


def _next_sequence(key: tuple[str, ...]) -> int:
    c = RUNTIME.collectives
    with c.lock:
        n = c.sequence.get(key, 0)
        c.sequence[key] = n + 1
    return n


def arrive(
    kind: str,
    namespace: str,
    timeout_s: float,
    what: str,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Wait until every rank of ``group`` has arrived at this step (``what`` names it:
    "build the reader"); :class:`CollectiveTimeoutError` naming the missing ranks after
    ``timeout_s``. A no-op without torch.distributed or on one rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    ranks = dist.get_process_group_ranks(group) if group is not None else None
    if ranks is None:
        ranks = list(range(dist.get_world_size()))
    if len(ranks) <= 1:
        return
    me = dist.get_rank()
    seq = _next_sequence((kind, namespace, ",".join(map(str, ranks))))
    prefix = f"tierckpt/{kind}/{namespace}/{'-'.join(map(str, ranks))}/{seq}"
    store = dist.distributed_c10d._get_default_store()
    store.set(f"{prefix}/{me}", "1")
    keys = [f"{prefix}/{r}" for r in ranks]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
        return
    except Exception:  # the store's timeout (DistStoreError); named below
        pass
    missing = [r for r, k in zip(ranks, keys, strict=True) if not store.check([k])]
    if not missing:
        return  # arrived just at the deadline
    raise CollectiveTimeoutError(
        f"Rank {me} is waiting for ranks {missing} to {what} (namespace {namespace!r}, "
        f"step #{seq} of this kind in this process); gave up after collective_timeout_s="
        f"{timeout_s:g}s. Every rank of the process group must {what}: call it on all ranks "
        "(or raise collective_timeout_s if those ranks are only slow). The group cannot be "
        "used for tierckpt's collectives after this; restart the job."
    )
