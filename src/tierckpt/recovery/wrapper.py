"""``tierckpt.recovery.run``: a step loop that recovers from a failed rank without a restart.

The healthy processes stay alive: on a fault (an exception, a dead peer, a collective that
times out) they abort the generation's process group at the step they are in, join the
next generation in the same store, form a new group, agree on the step to go on from, fill
the ranks that need it (a replaced rank, a rank whose own code raised) and go on with the
next batch. Python, torch, the model and the optimizer are not rebuilt.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from .checkpointer import Checkpointer
from .comm import backend_for, connect_store, form_group, reset_collective_state
from .errors import RecoveryError
from .fill import agree_and_fill
from .loader import StepLoader
from .membership import Membership, store_root
from .watchdog import Watchdog

__all__ = ["Recovery", "RecoveryOptions", "RunResult", "is_replacement", "run"]

log = logging.getLogger("tierckpt.recovery")
SPAWNED_AT_ENV = "TIERCKPT_SPAWNED_AT"
"""Wall time (``time.time()``) at which the launcher started this process."""


@dataclass(kw_only=True)
class RecoveryOptions:
    """How :func:`run` detects failures and recovers."""

    hang_timeout_s: float = 60.0
    """A collective waiting this long fails (the peer is hung); a rank still inside a step
    this long after the job moved on kills itself so that it is replaced."""
    join_timeout_s: float = 300.0
    """How long a generation waits for every rank (a replaced one included) to join."""
    max_recoveries: int = 10
    """Recoveries one process makes before it gives up with :class:`RecoveryError`."""
    backend: str = "gloo"
    """``gloo`` or ``nccl`` (the default group of each generation)."""
    replicated: bool = True
    """The state is the same on every rank (data parallel): fill from a live replica.
    False (sharded state): ranks that need it restore through the checkpointer."""
    live_state_survives_comm_errors: bool = True
    """A step changes the state only after its last collective (forward, backward with
    the gradient all-reduce, then ``optimizer.step()``), so a rank whose step failed in a
    collective still holds the previous step. Set False when it does not."""
    on_reform: Callable[[], None] | None = None
    """Called after each new default group, e.g. for DDP:
    ``model._update_process_group(dist.group.WORLD)``."""
    on_event: Callable[[str, dict[str, Any]], None] | None = None
    """Called with ``("fault" | "joined" | "formed" | "filled" | "recovered", info)``, for
    logs, timings and tests."""


@dataclass
class Recovery:
    """One recovery as this rank saw it."""

    generation: int
    fault: str
    resumed_after: int | None
    source: str
    phases: dict[str, float] = field(default_factory=dict)
    """Seconds: ``abort``, ``wait_members``, ``reform``, ``restore``, ``first_step``
    (a replaced rank: ``start`` from its spawn to :func:`run` instead of ``abort``)."""
    steps_lost: int = 0


@dataclass
class RunResult:
    """What :func:`run` did in this process."""

    last_step: int | None
    generation: int
    recoveries: list[Recovery]


def is_replacement() -> bool:
    """Whether this process replaces a failed rank (``tierckpt-run`` started it after a
    failure): its state will be filled by :func:`run`, so its model may be built without
    initialising the parameters (e.g. on the meta device, then ``to_empty``)."""
    return os.environ.get("TIERCKPT_REPLACEMENT", "0") not in ("", "0")


def is_comm_error(error: BaseException) -> bool:
    """Whether ``error`` is a communication failure (not the user's own code failing)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text for s in ("Connection closed", "Connection reset", "Timed out", "gloo", "NCCL")
    )


def run(
    train_step: Callable[[int, Any], Any],
    state: dict[str, Any],
    checkpointer: Checkpointer,
    *,
    steps: int,
    loader: StepLoader | None = None,
    options: RecoveryOptions | None = None,
) -> RunResult:
    """Run ``train_step(step, batch)`` for steps ``0..steps-1``, recovering in place.

    ``state`` (values may be DCP ``Stateful``) is what ``checkpointer`` saves after every
    step and what a live replica or a restore fills. The process group is created here,
    from the job's store (MASTER_ADDR/MASTER_PORT, RANK, WORLD_SIZE as torchrun sets
    them); do not call ``init_process_group`` yourself. Batches come from
    ``loader.get(step)``. Returns once every step ran; a fault past ``max_recoveries``
    raises :class:`RecoveryError`.
    """
    opts = options or RecoveryOptions()
    backend = backend_for(opts.backend)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    store, root = connect_store(), store_root()
    members = Membership(store, root, rank, world)
    watchdog = Watchdog(
        Membership(connect_store(client=True), root, rank, world), opts.hang_timeout_s
    )
    emit = opts.on_event or (lambda name, info: None)
    live: int | None = None
    records: list[Recovery] = []
    pending: Recovery | None = None
    fault, gen, faults = "", -1, 0
    spawned = float(os.environ.get(SPAWNED_AT_ENV, "0") or 0)
    t_fault = time.monotonic()
    phases: dict[str, float] = {}
    if spawned and is_replacement():
        phases["start"] = max(0.0, time.time() - spawned)
        fault = "replaced this rank"
    try:
        while True:
            t0 = time.monotonic()
            overwritten: list[bool] = []
            try:
                gen = members.join(opts.join_timeout_s)
                t1 = time.monotonic()
                emit("joined", {"generation": gen, "rank": rank})
                form_group(
                    store, f"{root}/g{gen}/pg", rank, world, opts.backend, opts.hang_timeout_s
                )
                t2 = time.monotonic()
                emit("formed", {"generation": gen, "rank": rank})
                if hasattr(checkpointer, "reform"):
                    checkpointer.reform()
                reset_collective_state()
                if opts.on_reform is not None:
                    opts.on_reform()
                fill = agree_and_fill(
                    live,
                    state,
                    checkpointer,
                    replicated=opts.replicated,
                    on_overwrite=functools.partial(overwritten.append, True),
                )
                t3 = time.monotonic()
                emit("filled", {"generation": gen, "step": fill.step, "source": fill.source})
            except (Exception, CheckpointException) as e:
                faults += 1
                if faults > opts.max_recoveries:
                    raise RecoveryError(f"rank {rank}: recovery failed: {e!r}") from e
                log.warning(
                    "tierckpt: rank %d: generation %d failed while recovering: %r", rank, gen, e
                )
                if overwritten:
                    live = None  # a fill that failed halfway: the state is of no step
                backend.abort()
                members.bump(gen, f"failed while recovering: {e!r}")
                records.append(Recovery(gen, repr(e), None, "failed"))
                continue
            if gen > 0 or phases:
                phases |= {"wait_members": t1 - t0, "reform": t2 - t1, "restore": t3 - t2}
                lost = 0 if live is None or fill.step is None else max(0, live - fill.step)
                pending = Recovery(
                    gen, fault or members.fault_of(gen - 1), fill.step, fill.source, phases, lost
                )
            live = fill.step
            step = 0 if fill.step is None else fill.step + 1
            try:
                while step < steps:
                    watchdog.enter(gen, step)
                    train_step(step, loader.get(step) if loader is not None else None)
                    live = step
                    watchdog.leave()
                    if pending is not None:
                        pending.phases["first_step"] = time.monotonic() - t3
                        records.append(pending)
                        _report(rank, pending)
                        emit("recovered", {"rank": rank, "recovery": pending})
                        pending = None
                    checkpointer.save(step, state)
                    step += 1
                checkpointer.wait()
                return RunResult(live, gen, records)
            except (Exception, CheckpointException) as e:
                watchdog.leave()
                t_fault = time.monotonic()
                own = not is_comm_error(e)
                if own or not opts.live_state_survives_comm_errors:
                    live = None  # this rank's state may be half-updated: fill it
                fault = f"rank {rank} at step {step}: {e!r}"[:300]
                emit("fault", {"rank": rank, "step": step, "error": repr(e), "own": own})
                log.warning("tierckpt: generation %d failed (%s); recovering in place", gen, fault)
                faults += 1
                if faults > opts.max_recoveries:
                    raise RecoveryError(
                        f"rank {rank}: {opts.max_recoveries} recoveries "
                        f"already; giving up after {e!r}"
                    ) from e
                backend.abort()
                if not backend.healthy():
                    log.error(
                        "tierckpt: rank %d: the device is unusable; exiting to be replaced", rank
                    )
                    os._exit(1)
                members.bump(gen, fault)
                phases = {"abort": time.monotonic() - t_fault}
    finally:
        watchdog.stop()
        if loader is not None:
            loader.close(remove=True)
        if dist.is_initialized():
            dist.destroy_process_group()


def _report(rank: int, r: Recovery) -> None:
    times = ", ".join(f"{k} {v:.3f} s" for k, v in r.phases.items())
    log.warning(
        "tierckpt: rank %d recovered in place (generation %d, after step %s, state from %s, "
        "%d steps lost): %s",
        rank,
        r.generation,
        r.resumed_after,
        r.source,
        r.steps_lost,
        times,
    )
