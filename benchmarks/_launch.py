"""Starting benchmark ranks (gloo on CPU) and keeping tmpfs clean whatever happens.

:class:`RunDirs` owns this run's directories (``/dev/shm/tierckpt-bench-<pid>-<id>`` and
one on disk) and removes them at exit, also after an error, Ctrl-C or SIGTERM; directories
left by a run that was killed outright (kill -9) are removed by the next run. :func:`launch`
starts ``nproc`` "spawn" processes that each join a gloo process group and run
``fn(rank, world_size, *args)``; it returns rank 0's result, and kills every rank it
started before it returns or raises.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from multiprocessing.connection import wait
from typing import Any

__all__ = ["SHM_PREFIX", "RankFailure", "RunDirs", "launch", "terminate_on_signals"]

SHM_PREFIX = "/dev/shm/tierckpt-bench-"
FAILURE_GRACE_S = 20.0
"""After one rank fails, how long the others get to exit on their own before they are killed."""


class RankFailure(RuntimeError):
    """A rank raised, died or timed out; the message carries every rank's traceback."""


class RunDirs:
    """This run's tmpfs and disk directories, removed at exit whatever happens."""

    def __init__(self, scratch: str | None = None, tmpfs: str | None = None) -> None:
        self.id = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
        shm_prefix = SHM_PREFIX if tmpfs is None else os.path.join(tmpfs, "tierckpt-bench-")
        self.shm = shm_prefix + self.id
        base = scratch or tempfile.gettempdir()
        self.disk = os.path.join(base, "tierckpt-bench-" + self.id)
        _remove_stale(shm_prefix)
        _remove_stale(os.path.join(base, "tierckpt-bench-"))
        os.makedirs(self.shm, mode=0o700)
        os.makedirs(self.disk, mode=0o700)
        atexit.register(self.remove)

    def clear(self) -> None:
        """Empty both directories (between systems)."""
        for top in (self.shm, self.disk):
            with contextlib.suppress(FileNotFoundError), os.scandir(top) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        shutil.rmtree(e.path, ignore_errors=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.remove(e.path)

    def remove(self) -> None:
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.disk, ignore_errors=True)

    def __enter__(self) -> RunDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _remove_stale(prefix: str) -> None:
    """Remove ``<prefix><pid>-<id>`` directories of runs whose process is gone (kill -9)."""
    parent, head = os.path.split(prefix)
    with contextlib.suppress(FileNotFoundError), os.scandir(parent) as it:
        for e in it:
            if not e.name.startswith(head) or not e.is_dir(follow_symlinks=False):
                continue
            pid = e.name[len(head) :].split("-", 1)[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(e.path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def terminate_on_signals() -> Iterator[None]:
    """Turn SIGTERM / SIGHUP into SystemExit, so ``finally`` blocks and atexit run."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank_entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    threads: int,
    out_path: str,
    args: tuple[Any, ...],
) -> None:
    """Body of one rank process."""
    import faulthandler

    faulthandler.enable()  # a SIGSEGV / SIGBUS in a rank prints its Python stack
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            # As torchrun sets them: every rank is on this node (reader threads per rank
            # are this node's CPUs divided among its ranks).
            "LOCAL_WORLD_SIZE": str(world_size),
            "GROUP_RANK": "0",
        }
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    outcome: tuple[str, Any]
    try:
        dist.init_process_group(
            "gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=15)
        )
        outcome = ("ok", fn(rank, world_size, *args))
    except BaseException:
        outcome = ("error", traceback.format_exc())
    finally:
        with contextlib.suppress(Exception):
            if dist.is_initialized():
                dist.destroy_process_group()
    with open(out_path, "wb") as f:
        pickle.dump(outcome, f)
    # Leave without interpreter teardown: the result is on disk, and C++ threads torn down
    # at exit sometimes abort ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1 if outcome[0] == "error" else 0)


def launch(
    fn: Callable[..., Any],
    nproc: int,
    args: tuple[Any, ...],
    *,
    out_dir: str,
    threads: int,
    timeout_s: float,
) -> Any:
    """Run ``fn(rank, nproc, *args)`` on ``nproc`` gloo ranks; rank 0's return value.

    ``fn`` must be a module-level function (the ranks are spawned, not forked).
    """
    ctx = mp.get_context("spawn")
    port = _free_port()
    paths = [os.path.join(out_dir, f"rank{r}.result") for r in range(nproc)]
    procs = [
        ctx.Process(
            target=_rank_entry,
            args=(fn, r, nproc, port, threads, paths[r], args),
            name=f"bench-rank{r}",
        )
        for r in range(nproc)
    ]
    deadline = time.monotonic() + timeout_s
    timed_out = False
    try:
        for p in procs:
            p.start()
        alive = {p.sentinel: p for p in procs}
        grace_until: float | None = None
        while alive:
            now = time.monotonic()
            limit = deadline if grace_until is None else min(deadline, grace_until)
            if now >= limit:
                timed_out = now >= deadline
                break
            for s in wait(list(alive), timeout=min(1.0, limit - now)):
                p = alive.pop(s)
                p.join()
                if p.exitcode != 0 and grace_until is None:
                    grace_until = time.monotonic() + FAILURE_GRACE_S
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()
    outcomes: list[tuple[str, Any] | None] = []
    for path in paths:
        try:
            with open(path, "rb") as f:
                outcomes.append(pickle.load(f))
        except (FileNotFoundError, EOFError, pickle.UnpicklingError):
            outcomes.append(None)
    problems = []
    for r, (p, o) in enumerate(zip(procs, outcomes, strict=True)):
        if o is None:
            why = "timed out" if timed_out else f"exited with code {p.exitcode} (no result)"
            problems.append(f"rank {r} {why}")
        elif o[0] == "error":
            problems.append(f"rank {r} raised:\n{o[1]}")
    if problems:
        raise RankFailure("\n".join(problems))
    first = outcomes[0]
    assert first is not None
    return first[1]
