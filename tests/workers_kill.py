"""Rank workers of the kill -9 matrix (``test_kill_matrix.py``).

A *job* is a 2-rank gloo run under ``fixtures_dist.launch_ranks``. It arms
``TIERCKPT_CRASH_AT`` so one rank SIGKILLs itself at a named crash point, and every rank
watches its peers: when any rank dies, the others SIGKILL themselves at once (a job crash:
"the node's trainer died"), so no survivor finishes uploads or hangs in a collective.

States are deterministic in ``(step, rank)``: each rank owns ~0.5 MB of tensors under its
own keys (so every rank writes a data file), plus replicated tensors and non-tensor items.
Equal :func:`distworkers.fingerprint` values mean bit-exact equality.
"""

from __future__ import annotations

import os
import select
import signal
import threading
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from distworkers import blank_extra, extra_values, fingerprint
from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter, wait_for_drains
from tierckpt._faults import CRASH_ENV
from tierckpt.resume import resume_pending_once

# --------------------------------------------------------------------------- states


def is_durable(step: int) -> bool:
    """Phase 1 drains every 2nd step to the durable tier."""
    return step % 2 == 0


def rank_part(step: int, rank: int) -> dict[str, Any]:
    """What rank ``rank`` alone saves at ``step`` (its own keys)."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return {
        f"own_r{rank}": {
            "w": torch.randn(256, 512, generator=g),  # 512 KiB
            "ids": torch.randint(0, 1 << 40, (33,), generator=g),
            "half": torch.randn(17, generator=g).to(torch.bfloat16),
        },
        f"note_r{rank}": {"rank": rank, "step": step, "tag": f"r{rank}s{step}" * (rank + 1)},
    }


def shared_part(step: int) -> dict[str, Any]:
    """What every rank saves identically at ``step`` (replicated items)."""
    g = torch.Generator().manual_seed(7 * step + 3)
    return {"shared": torch.randn(64, generator=g).to(torch.float64), "extra": extra_values(step)}


def rank_state(step: int, rank: int) -> dict[str, Any]:
    return {**shared_part(step), **rank_part(step, rank)}


def blank_state(ranks: list[int]) -> dict[str, Any]:
    """A load target with the structure of the union of ``ranks``' states, other values."""
    sd = shared_part(999_999)
    sd["extra"] = blank_extra()
    for r in ranks:
        part = rank_part(999_999, r)
        part[f"note_r{r}"] = {"rank": -1, "step": -1, "tag": ""}
        sd.update(part)
    return sd


def union_state(step: int, ranks: list[int]) -> dict[str, Any]:
    sd = shared_part(step)
    for r in ranks:
        sd.update(rank_part(step, r))
    return sd


# --------------------------------------------------------------------------- job death

_IN_JOB = threading.Event()


def join_the_job(marks: str) -> None:
    """Arm a watchdog: when any other rank of the job dies, SIGKILL this process at once.

    Before killing, it leaves ``<marks>/rank<R>.followed`` so the test can tell a rank that
    died at its crash point from one that died with the job.
    """
    rank = dist.get_rank()
    pids: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(pids, os.getpid())
    fds = [os.pidfd_open(p) for p in pids if p != os.getpid()]
    _IN_JOB.set()

    def watch() -> None:
        select.select(fds, [], [])  # a pidfd turns readable when its process exits
        if _IN_JOB.is_set():
            with open(os.path.join(marks, f"rank{rank}.followed"), "w"):
                pass
            os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="kill-matrix-watchdog", daemon=True).start()


def leave_the_job() -> None:
    """Disarm the watchdog (call before the final barrier of a run that was not killed)."""
    _IN_JOB.clear()


def arm_crash(spec: str | None) -> None:
    if spec:
        os.environ[CRASH_ENV] = spec
    else:
        os.environ.pop(CRASH_ENV, None)


# --------------------------------------------------------------------------- saving


def save_step(cfg: CheckpointConfig, step: int, rank: int, mode: str, durable: bool) -> None:
    """Save ``rank_state(step, rank)`` with ``dcp.save`` or ``dcp.async_save``; wait for all."""
    sd = rank_state(step, rank)
    w = TieredStorageWriter(cfg, step=step, save_to_durable=durable)
    if mode == "sync":
        dcp.save(sd, storage_writer=w)
    else:
        res: Any = dcp.async_save(sd, storage_writer=w)
        upload = getattr(res, "upload_completion", res)
        upload.result(timeout=60)
    w.durable_done.result(timeout=60)


def w_train_until_killed(
    rank: int,
    world_size: int,
    cfg: CheckpointConfig,
    marks: str,
    crash: str,
    mode: str,
    last_step: int,
) -> Any:
    """Phase 1: save steps 1..last_step (durable every 2nd) with a crash point armed."""
    arm_crash(crash)
    join_the_job(marks)
    for step in range(1, last_step + 1):
        save_step(cfg, step, rank, mode, durable=is_durable(step))
    leave_the_job()
    dist.barrier()
    return "survived"  # the crash point was never reached


def w_restart(
    rank: int,
    world_size: int,
    cfg: CheckpointConfig,
    marks: str,
    crash: str | None,
    next_step: int,
) -> Any:
    """A restart: finish interrupted drains, load the newest step, save ``next_step``.

    The resume is awaited before the load, so a crash armed in it (``crash``) happens
    before this job commits anything. Ranks resume one after another, the coordinator
    last: a non-coordinator's resume then always finds the step still pending (the
    coordinator's resume would otherwise race it to the durable commit).
    """
    arm_crash(crash)
    join_the_job(marks)
    resumed_steps = None
    for turn in reversed(range(world_size)):
        if rank == turn:
            resumed = resume_pending_once(cfg)
            resumed_steps = resumed.result(timeout=60) if resumed is not None else None
        dist.barrier()
    sd = blank_state([rank])
    reader = TieredStorageReader(cfg)
    dcp.load(sd, storage_reader=reader)
    loaded_step = reader.step
    loaded = fingerprint(sd)
    expected = fingerprint(rank_state(loaded_step, rank)) if loaded_step is not None else None
    save_step(cfg, next_step, rank, "sync", durable=True)
    drains_done = wait_for_drains(timeout=60)
    leave_the_job()
    dist.barrier()
    return {
        "resumed": resumed_steps,
        "step": loaded_step,
        "loaded": loaded,
        "expected": expected,
        "bytes": dict(reader.bytes_read_by_tier),
        "drains_done": drains_done,
    }


# --------------------------------------------------------------------------- one process


def load_alone(cfg: CheckpointConfig, step: int | None, ranks: list[int]) -> dict[str, Any]:
    """Load every rank's items in this one process (no process group): step and fingerprint."""
    sd = blank_state(ranks)
    reader = TieredStorageReader(cfg, step=step)
    dcp.load(sd, storage_reader=reader, no_dist=True)
    return {
        "step": reader.step,
        "loaded": fingerprint(sd),
        "bytes": dict(reader.bytes_read_by_tier),
    }


def expected_alone(step: int, ranks: list[int]) -> dict[str, Any]:
    return fingerprint(union_state(step, ranks))


def try_load_alone(cfg: CheckpointConfig, step: int | None, ranks: list[int]) -> dict[str, Any]:
    """Like :func:`load_alone`; a failure is returned as ``{"error": "<type>: <message>"}``."""
    try:
        return load_alone(cfg, step, ranks)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
