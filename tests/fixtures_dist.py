"""Distributed-test fixtures: a gloo process launcher and tmpfs / directory roots.

``run_ranks(fn, world_size, *args)`` starts ``world_size`` real processes, forked from a
forkserver that has imported torch, tierckpt and the worker modules (see
:class:`PreloadedStarts`; ``TIERCKPT_TEST_START=spawn`` starts them with "spawn"); each
joins a gloo process group (MASTER_ADDR=127.0.0.1 and a free MASTER_PORT) and runs ``fn(rank, world_size, *args)``, a module-level function of
``distworkers``. It returns every rank's (picklable) result in rank order, raises an
AssertionError that carries the traceback of every failing rank, kills ranks that outlive
the timeout, and always reaps every process it started (and their children).
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import pytest

__all__ = ["RankOutcome", "launch_ranks", "run_ranks"]

SHM = "/dev/shm"
FAILURE_GRACE_S = 10.0
"""After one rank fails, how long the others get to finish before they are killed."""


@dataclass
class RankOutcome:
    """What one rank process left behind."""

    rank: int
    exitcode: int | None
    """Process exit code; negative for a signal (-9 for SIGKILL); None if it was killed by us."""
    result: Any = None
    error: str | None = None
    """Formatted traceback when ``fn`` raised."""
    killed_at_timeout: bool = False
    stacks: str = ""
    """Stacks of every thread, dumped before a timeout kill or on a fatal signal."""

    @property
    def ok(self) -> bool:
        return self.error is None and self.exitcode == 0 and not self.killed_at_timeout


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class _Launcher:
    """What a rank takes from the process that launches it, as a spawned child would: a
    forkserver's children otherwise inherit the server's environment, cwd and sys.path."""

    env: dict[str, str]
    cwd: str
    path: list[str]

    @classmethod
    def now(cls) -> _Launcher:
        return cls(dict(os.environ), os.getcwd(), list(sys.path))

    def apply(self) -> None:
        os.environ.clear()
        os.environ.update(self.env)
        os.chdir(self.cwd)
        sys.path[:] = self.path


def _rank_entry(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    out_dir: str,
    launcher: _Launcher,
    args: tuple[Any, ...],
) -> None:
    """Body of one rank process (runs in the started child)."""
    launcher.apply()
    # Own process group, so the launcher can kill this rank and anything it spawned.
    os.setpgid(0, 0)
    # SIGUSR1 dumps every thread's stack into the output dir (sent before a timeout kill).
    stacks = open(os.path.join(out_dir, f"rank{rank}.stacks"), "w")  # noqa: SIM115
    faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True)
    faulthandler.enable(file=stacks, all_threads=True)  # and on SIGSEGV, SIGBUS, ...
    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "OMP_NUM_THREADS": "1",
        }
    )
    payload: tuple[str, Any]
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        try:
            payload = ("ok", fn(rank, world_size, *args))
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
    except BaseException:
        payload = ("error", f"rank {rank}:\n{traceback.format_exc()}")
    tmp = os.path.join(out_dir, f"rank{rank}.pkl.tmp")
    try:
        with open(tmp, "wb") as f:
            pickle.dump(payload, f)
    except Exception:
        with open(tmp, "wb") as f:
            pickle.dump(
                ("error", f"rank {rank}: result not picklable:\n{traceback.format_exc()}"), f
            )
    os.replace(tmp, os.path.join(out_dir, f"rank{rank}.pkl"))
    # The outcome is recorded. gloo can abort (std::terminate, no Python frame) in its C++
    # teardown during interpreter finalization, also with DCP's own FileSystemWriter and no
    # tierckpt; end the rank without finalization, after what tierckpt's exit hook would do.
    with contextlib.suppress(Exception):
        from tierckpt import wait_for_drains

        wait_for_drains(timeout=60)
    stacks.flush()
    os._exit(0)


def _kill(p: Any) -> None:
    """SIGKILL a rank and every process in its process group (what it spawned)."""
    if p.pid is None:  # never started
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)
    p.kill()  # no-op once the process is reaped; covers a rank that has not called setpgid yet


def _reported_error(out_dir: str, rank: int) -> bool:
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return False
    with open(path, "rb") as f:
        return bool(pickle.load(f)[0] == "error")


class PreloadedStarts:
    """Stands in for ``multiprocessing`` here: rank processes are forked from a forkserver
    that has already imported torch, tierckpt and the given worker modules. Each rank
    takes the launching process's environment, cwd and sys.path (:class:`_Launcher`).

    Each launch then costs ~0.1 s instead of ~2.3 s of imports; the ranks are still fresh
    processes (the server never ran a torch op, a collective or a save).
    """

    def __init__(self, modules: list[str]) -> None:
        import multiprocessing

        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(["torch", "tierckpt", *modules])

    def get_context(self, method: str | None = None) -> Any:
        return self._ctx


WORKER_MODULES = sorted(
    p.stem
    for p in Path(__file__).parent.glob("*.py")
    if p.stem.endswith("workers") or p.stem.startswith("workers_")
)
"""Preloaded by the forkserver: every module of rank functions in this directory."""
START_ENV = "TIERCKPT_TEST_START"


@functools.cache
def _forkserver() -> PreloadedStarts:
    """The forkserver of this pytest process (started at its first launch)."""
    return PreloadedStarts(WORKER_MODULES)


def _starts() -> Any:
    """Where rank processes come from: the shared forkserver, or ``multiprocessing``'s
    "spawn" when ``TIERCKPT_TEST_START=spawn`` (each rank imports everything itself)."""
    if os.environ.get(START_ENV, "forkserver") == "spawn":
        return mp
    return _forkserver()


def launch_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0
) -> list[RankOutcome]:
    """Run ``fn`` on ``world_size`` gloo ranks; report each rank's outcome, never raise."""
    ctx = _starts().get_context("spawn")
    out_dir = tempfile.mkdtemp(prefix="tierckpt-ranks-")
    port = _free_port()
    launcher = _Launcher.now()
    procs = [
        ctx.Process(
            target=_rank_entry,
            args=(fn, rank, world_size, port, out_dir, launcher, args),
            name=f"rank{rank}",
            daemon=False,
        )
        for rank in range(world_size)
    ]
    timed_out: set[int] = set()
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed_at: float | None = None
        while True:
            alive = [p for p in procs if p.is_alive()]
            if not alive:
                break
            now = time.monotonic()
            if failed_at is None and any(
                p.exitcode not in (None, 0) or _reported_error(out_dir, r)
                for r, p in enumerate(procs)
            ):
                failed_at = now
            limit = deadline if failed_at is None else min(deadline, failed_at + FAILURE_GRACE_S)
            if now >= limit:
                for p in alive:
                    timed_out.add(procs.index(p))
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p.pid, signal.SIGUSR1)
                time.sleep(1.0)
                for p in alive:
                    _kill(p)
                break
            wait([p.sentinel for p in alive], timeout=min(0.5, max(0.0, limit - now)))
    finally:
        for p in procs:
            # Kill whatever a rank left behind (e.g. a DCP checkpointer subprocess).
            _kill(p)
            if p.pid is not None:
                p.join(30)
        outcomes = []
        for r, p in enumerate(procs):
            o = RankOutcome(rank=r, exitcode=p.exitcode, killed_at_timeout=r in timed_out)
            if o.killed_at_timeout or p.exitcode not in (0, None):
                with (
                    contextlib.suppress(OSError),
                    open(os.path.join(out_dir, f"rank{r}.stacks")) as f,
                ):
                    o.stacks = f.read()
            path = os.path.join(out_dir, f"rank{r}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as f:
                    status, value = pickle.load(f)
                if status == "ok":
                    o.result = value
                else:
                    o.error = value
            outcomes.append(o)
        shutil.rmtree(out_dir, ignore_errors=True)
    return outcomes


def run_ranks(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on gloo ranks and return their results.

    Raises AssertionError with every failing rank's traceback if any rank raised, died or
    hung past ``timeout`` seconds.
    """
    outcomes = launch_ranks(fn, world_size, *args, timeout=timeout)
    bad = [o for o in outcomes if not o.ok]
    if bad:
        parts = []
        for o in bad:
            if o.error:
                parts.append(o.error)
            elif o.killed_at_timeout:
                parts.append(
                    f"rank {o.rank}: still running, killed (timeout {timeout}s or a peer failed); "
                    f"its threads were at:\n{o.stacks}"
                )
            else:
                parts.append(
                    f"rank {o.rank}: exited with code {o.exitcode} and no result\n{o.stacks}"
                )
        raise AssertionError(
            f"{len(bad)} of {world_size} ranks failed running {fn.__name__}:\n" + "\n".join(parts)
        )
    return [o.result for o in outcomes]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def memory_root() -> Iterator[str]:
    """A fresh path ``/dev/shm/tierckpt-test-<uuid>`` (not created: tierckpt creates it).

    Removed in teardown, whatever the test did.
    """
    path = os.path.join(SHM, f"tierckpt-test-{uuid.uuid4().hex}")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def durable_dir(tmp_path: Path) -> str:
    """A fresh local directory for the durable tier (absolute path)."""
    d = tmp_path / "durable"
    d.mkdir()
    return str(d)


@pytest.fixture
def config_factory(memory_root: str, durable_dir: str) -> Callable[..., Any]:
    """``make(**overrides) -> CheckpointConfig`` on the test's memory root and durable dir."""

    def make(**overrides: Any) -> Any:
        from tierckpt import CheckpointConfig

        kwargs: dict[str, Any] = {
            "namespace": "run-1",
            "world_size": 2,
            "memory_root": memory_root,
            "durable_base_path": "file://" + durable_dir,
        }
        kwargs.update(overrides)
        return CheckpointConfig(**kwargs)

    return make


@contextlib.contextmanager
def mounted_tmpfs(options: str) -> Iterator[str]:
    """A tmpfs mounted with ``options`` under /dev/shm, unmounted and removed on exit;
    the test is skipped only where mount is not permitted."""
    path = os.path.join(SHM, f"tierckpt-test-tmpfs-{uuid.uuid4().hex}")
    os.mkdir(path)
    try:
        res = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", path],
            capture_output=True,
            text=True,
            check=False,
        )
        if res.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {res.stderr}")
        try:
            yield path
        finally:
            if subprocess.run(["umount", path], check=False).returncode != 0:
                subprocess.run(["umount", "-l", path], check=False)
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def tiny_tmpfs() -> Iterator[str]:
    """A 2 MiB tmpfs mounted under /dev/shm; skipped only where mount is not permitted."""
    with mounted_tmpfs("size=2m") as path:
        yield path


@pytest.fixture
def huge_tmpfs() -> Iterator[str]:
    """A 256 MiB tmpfs with shmem huge pages (``huge=within_size``) under /dev/shm."""
    with mounted_tmpfs("size=256m,huge=within_size") as path:
        yield path
