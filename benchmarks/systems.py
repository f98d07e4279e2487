"""The checkpointing systems the benchmark compares; each one is a small class.

A system saves, loads and (optionally) async-saves one rank's part of the state. The
harness (benchmarks/run.py) times those calls on every rank at once; a system only does
the work. To add one (the S3 paths, say), subclass :class:`System`, decorate it with
:func:`register`, and import its module from ``benchmarks/run.py`` (or list it in
``--systems`` once its module is imported).

Where a system keeps files: under ``self.shm`` (this run's tmpfs directory,
``/dev/shm/tierckpt-bench-<id>/<system>``) or ``self.disk`` (this run's directory on disk).
The harness removes both after the system's last repetition, and the whole run's
directories at exit, also on failure or Ctrl-C.
"""

from __future__ import annotations

import mmap
import os
import pickle
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult

import tierckpt

__all__ = ["SYSTEMS", "Pending", "RankContext", "State", "System", "register"]


@dataclass(frozen=True)
class RankContext:
    """Where one rank of one run may put files, and the run's knobs."""

    rank: int
    world_size: int
    shm_dir: str
    """This run's tmpfs directory (``/dev/shm/tierckpt-bench-<id>``)."""
    disk_dir: str
    """This run's directory on disk."""
    keep_last: int | None
    """``memory_keep_last`` of the tierckpt systems (None: the config's default)."""


@dataclass
class State:
    """One rank's training state, in the two forms the systems take."""

    dcp: dict[str, Any]
    """``{"model": ..., "optim": ...}`` from ``get_state_dict`` (DTensors), for DCP."""
    local: dict[str, torch.Tensor]
    """This rank's local shards by flat name, for the non-DCP systems."""
    nbytes: int
    """Bytes of this rank's tensors: the numerator of every MiB/s."""


@dataclass
class Pending:
    """An async save in flight."""

    done: Callable[[], object]
    """Blocks until the checkpoint is persisted (the save's future)."""
    staged: Callable[[], object] | None = None
    """Blocks until the training loop may modify the state again, when that is later
    than the return of ``async_save`` (DCP's ``AsyncSaveResponse.staging_completion``)."""


class System:
    """One way to checkpoint. Subclasses set ``name`` and ``about`` and do the work."""

    name: ClassVar[str]
    about: ClassVar[str]
    supports_async: ClassVar[bool] = True
    moves_bytes: ClassVar[bool] = True
    """False for a system that only measures overhead: its loads are not checked."""

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx
        slug = self.name.replace("+", "-")
        self.shm = os.path.join(ctx.shm_dir, slug)
        self.disk = os.path.join(ctx.disk_dir, slug)

    def prepare(self, state: State) -> None:
        """Untimed set-up before the first save (allocate buffers, ...)."""

    def save(self, state: State, step: int) -> None:
        raise NotImplementedError

    def load(self, state: State, step: int) -> dict[str, Any] | None:
        """Load ``step`` into the tensors of ``state``, in place; optionally facts to record."""
        raise NotImplementedError

    def async_save(self, state: State, step: int) -> Pending:
        raise NotImplementedError

    def end_rep(self, steps: list[int]) -> None:
        """Free what one repetition wrote, where the system itself would keep it forever."""

    def close(self) -> None:
        """Release what this rank holds (buffers, threads); called on every rank."""

    def cleanup(self) -> None:
        """Remove every file of this system (called on one rank, after every rank's close)."""
        shutil.rmtree(self.shm, ignore_errors=True)
        shutil.rmtree(self.disk, ignore_errors=True)


SYSTEMS: dict[str, type[System]] = {}


def register(cls: type[System]) -> type[System]:
    """Class decorator: make a system selectable by ``--systems``."""
    SYSTEMS[cls.name] = cls
    return cls


def pending_from_dcp(response: Any, *extra: Callable[[], object]) -> Pending:
    """A :class:`Pending` over what ``dcp.async_save`` returned (Future or AsyncSaveResponse)."""
    upload = getattr(response, "upload_completion", response)
    staging = getattr(response, "staging_completion", None)

    def done() -> None:
        upload.result()
        for wait in extra:
            wait()

    return Pending(done=done, staged=staging.result if staging is not None else None)


# -- the ceiling ---------------------------------------------------------------


@register
class Memcpy(System):
    name = "memcpy"
    about = "copy_ of each local tensor into preallocated, already-touched tensors (the ceiling)"
    supports_async = False

    def prepare(self, state: State) -> None:
        self.bufs = {k: torch.empty_like(t) for k, t in state.local.items()}
        for k, t in state.local.items():
            self.bufs[k].copy_(t)

    def save(self, state: State, step: int) -> None:
        for k, t in state.local.items():
            self.bufs[k].copy_(t)

    def load(self, state: State, step: int) -> None:
        for k, t in state.local.items():
            t.copy_(self.bufs[k])

    def close(self) -> None:
        self.bufs = {}


def _packed_layout(state: State) -> tuple[list[tuple[str, int, int]], int]:
    """(name, offset, bytes) of each local tensor packed into one file at 64-byte
    boundaries, and the file's size (at least 1)."""
    layout: list[tuple[str, int, int]] = []
    off = 0
    for k, t in state.local.items():
        n = t.numel() * t.element_size()
        layout.append((k, off, n))
        off = (off + n + 63) // 64 * 64
    return layout, max(off, 1)


@register
class MemcpyTmpfs(System):
    name = "memcpy-tmpfs"
    about = "copy_ into a fresh mmap'd tmpfs file per save (pays the page faults); load copies back"
    supports_async = False

    def prepare(self, state: State) -> None:
        os.makedirs(self.shm, exist_ok=True)
        self.layout, self.size = _packed_layout(state)

    def _path(self, step: int) -> str:
        return os.path.join(self.shm, f"rank{self.ctx.rank}-step{step}.bin")

    def _copy(self, state: State, step: int, *, into_file: bool) -> None:
        fd = os.open(self._path(step), os.O_RDWR | (os.O_CREAT if into_file else 0), 0o600)
        try:
            if into_file:
                os.ftruncate(fd, self.size)
            mm = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = torch.frombuffer(mm, dtype=torch.uint8)
        for k, off, n in self.layout:
            t = state.local[k].reshape(-1).view(torch.uint8)
            if into_file:
                base[off : off + n].copy_(t)
            else:
                t.copy_(base[off : off + n])
        del base
        mm.close()

    def save(self, state: State, step: int) -> None:
        self._copy(state, step, into_file=True)

    def load(self, state: State, step: int) -> None:
        self._copy(state, step, into_file=False)

    def end_rep(self, steps: list[int]) -> None:
        for s in steps:
            if os.path.exists(self._path(s)):
                os.remove(self._path(s))


@register
class PreadvTmpfs(System):
    name = "preadv-tmpfs"
    about = (
        "pwrite of each local tensor into one tmpfs file per rank (reused); load = preadv of "
        "each tensor's bytes straight into it: the floor of any load from tmpfs"
    )
    supports_async = False

    def prepare(self, state: State) -> None:
        os.makedirs(self.shm, exist_ok=True)
        self.path = os.path.join(self.shm, f"rank{self.ctx.rank}.bin")
        self.layout, _ = _packed_layout(state)

    def _raw(self, t: torch.Tensor) -> memoryview:
        return memoryview(t.reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]

    def _io(self, state: State, write: bool) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            for k, off, n in self.layout:
                view, done = self._raw(state.local[k]), 0
                while done < n:
                    if write:
                        done += os.pwrite(fd, view[done:], off + done)
                    else:
                        done += os.preadv(fd, [view[done:]], off + done)
        finally:
            os.close(fd)

    def save(self, state: State, step: int) -> None:
        self._io(state, write=True)

    def load(self, state: State, step: int) -> None:
        self._io(state, write=False)


# -- through DCP ---------------------------------------------------------------


class _DCPSystem(System):
    """Save and load through ``torch.distributed.checkpoint`` with this system's writer/reader."""

    def writer(self, step: int) -> Any:
        raise NotImplementedError

    def reader(self, step: int) -> Any:
        raise NotImplementedError

    plan_caching: ClassVar[bool] = False
    """Save with ``DefaultSavePlanner(enable_plan_caching=True)``."""

    def persisted(self, writer: Any) -> Callable[[], object] | None:
        """What else to wait for after DCP's future until the step is persisted."""
        return None

    def planner(self) -> Any:
        if not self.plan_caching:
            return None
        from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

        return DefaultSavePlanner(enable_plan_caching=True)

    def save(self, state: State, step: int) -> None:
        w = self.writer(step)
        dcp.save(state.dcp, storage_writer=w, planner=self.planner())
        wait = self.persisted(w)
        if wait is not None:
            wait()

    def load(self, state: State, step: int) -> dict[str, Any] | None:
        reader = self.reader(step)
        dcp.load(state.dcp, storage_reader=reader)
        by_tier = getattr(reader, "bytes_read_by_tier", None)
        return {"bytes_read_by_tier": dict(by_tier)} if by_tier is not None else None

    def async_save(self, state: State, step: int) -> Pending:
        w = self.writer(step)
        response = dcp.async_save(state.dcp, storage_writer=w, planner=self.planner())
        wait = self.persisted(w)
        return pending_from_dcp(response, *([wait] if wait else []))


# DCP with storage that moves no bytes: DCP's own floor.


class _NoopWriter(StorageWriter):
    """Records what DCP asks it to write and writes nothing; the metadata goes to ``path``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> torch.futures.Future[Any]:
        results = [
            WriteResult(index=i.index, size_in_bytes=0, storage_data=None) for i in plan.items
        ]
        fut: torch.futures.Future[Any] = torch.futures.Future()
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "wb") as f:
            pickle.dump(metadata, f)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False

    def storage_meta(self) -> StorageMeta | None:
        return None


class _NoopReader(StorageReader):
    """Reads the metadata ``_NoopWriter`` left and no bytes at all."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with open(self.path, "rb") as f:
            return pickle.load(f)  # type: ignore[no-any-return]

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *a: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        fut: torch.futures.Future[None] = torch.futures.Future()
        fut.set_result(None)
        return fut

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return False


@register
class DCPNoop(_DCPSystem):
    name = "dcp-noop"
    about = (
        "dcp.save / dcp.load with a storage writer/reader that moves no bytes: DCP's own "
        "planning and collectives, the floor of any DCP storage layer"
    )
    supports_async = False
    moves_bytes = False

    def _path(self, step: int) -> str:
        return os.path.join(self.shm, f"step_{step}.metadata")

    def writer(self, step: int) -> Any:
        return _NoopWriter(self._path(step))

    def reader(self, step: int) -> Any:
        return _NoopReader(self._path(step))


# -- tierckpt -----------------------------------------------------------------


@register
class TierckptMemory(_DCPSystem):
    name = "tierckpt-memory"
    about = "TieredStorageWriter/Reader, memory tier (tmpfs) only"
    durable = False
    pause_gc = True

    def config(self, memory_root: str | None = None) -> tierckpt.CheckpointConfig:
        keep = {} if self.ctx.keep_last is None else {"memory_keep_last": self.ctx.keep_last}
        return tierckpt.CheckpointConfig(
            namespace="bench",
            world_size=self.ctx.world_size,
            memory_root=memory_root or os.path.join(self.shm, "memory"),
            durable_base_path="file://" + os.path.join(self.disk, "durable"),
            pause_gc=self.pause_gc,
            **keep,  # type: ignore[arg-type]
        )

    def prepare(self, state: State) -> None:
        # What CheckpointManager.restore() does at a job's start: fill a spare in the
        # background, so the first save copies into resident pages if training gives it time.
        tierckpt.prefault(self.config(), state.dcp)

    def writer(self, step: int) -> Any:
        return tierckpt.TieredStorageWriter(self.config(), step=step, save_to_durable=self.durable)

    def reader(self, step: int) -> Any:
        # The step just saved is the newest: the reader agrees on it, as after a restart.
        return tierckpt.TieredStorageReader(self.config())


@register
class DCPNoopCached(DCPNoop):
    name = "dcp-noop-cached"
    about = "dcp-noop with DefaultSavePlanner(enable_plan_caching=True)"
    plan_caching = True


@register
class TierckptCached(TierckptMemory):
    name = "tierckpt-memory-cached"
    about = "tierckpt-memory with DefaultSavePlanner(enable_plan_caching=True)"
    plan_caching = True


@register
class TierckptGcOn(TierckptMemory):
    name = "tierckpt-memory-gc-on"
    about = "tierckpt-memory with pause_gc=False: the cyclic GC may run inside saves and loads"
    pause_gc = False


@register
class TierckptManager(TierckptMemory):
    name = "tierckpt-manager"
    about = (
        "CheckpointManager at its defaults (caches DCP's plans under a key of its own); "
        "save: async_save=False, async: the default async manager"
    )

    def __init__(self, ctx: RankContext) -> None:
        super().__init__(ctx)
        self._managers: dict[bool, tierckpt.CheckpointManager] = {}

    def _manager(self, asynchronous: bool) -> tierckpt.CheckpointManager:
        # Built at the first save of each kind, on every rank at once (it makes gloo groups).
        if asynchronous not in self._managers:
            self._managers[asynchronous] = tierckpt.CheckpointManager(
                self.config(), every_steps=1, async_save=asynchronous, preemption=False
            )
        return self._managers[asynchronous]

    def save(self, state: State, step: int) -> None:
        mgr = self._manager(False)
        mgr.save(step, state.dcp, force=True)
        mgr.wait()

    def async_save(self, state: State, step: int) -> Pending:
        mgr = self._manager(True)
        mgr.save(step, state.dcp, force=True)
        pending = mgr.pending
        assert pending is not None
        return Pending(done=pending.committed.result)

    def close(self) -> None:
        for mgr in self._managers.values():
            mgr.close()
        self._managers.clear()


@register
class TierckptDurable(TierckptMemory):
    name = "tierckpt-memory+durable"
    about = (
        "TieredStorageWriter with save_to_durable=True to a file:// dir on disk; save and async "
        "total last until durable_done; load reads the durable tier (empty memory root)"
    )
    durable = True

    def persisted(self, writer: Any) -> Callable[[], object] | None:
        return writer.durable_done.result  # type: ignore[no-any-return]

    def reader(self, step: int) -> Any:
        # A node that lost its memory tier: the step comes from the durable directory.
        empty = os.path.join(self.shm, "empty-memory")
        return tierckpt.TieredStorageReader(self.config(memory_root=empty), step=step)


# -- alternatives -------------------------------------------------------------


class _DCPFileSystem(_DCPSystem):
    """DCP's own FileSystemWriter/Reader with default options, one directory per step."""

    base: str

    def _dir(self, step: int) -> str:
        return os.path.join(self.base, f"step_{step}")

    def writer(self, step: int) -> Any:
        return dcp.FileSystemWriter(self._dir(step))

    def reader(self, step: int) -> Any:
        return dcp.FileSystemReader(self._dir(step))

    def end_rep(self, steps: list[int]) -> None:
        if self.ctx.rank == 0:
            for s in steps:
                shutil.rmtree(self._dir(s), ignore_errors=True)


@register
class DCPTmpfs(_DCPFileSystem):
    name = "dcp-fs-tmpfs"
    about = "DCP FileSystemWriter/Reader (defaults) to a directory on tmpfs"

    def __init__(self, ctx: RankContext) -> None:
        super().__init__(ctx)
        self.base = self.shm


@register
class DCPDisk(_DCPFileSystem):
    name = "dcp-fs-disk"
    about = "DCP FileSystemWriter/Reader (defaults, fsync on) to a directory on disk"

    def __init__(self, ctx: RankContext) -> None:
        super().__init__(ctx)
        self.base = self.disk


@register
class TorchSave(System):
    name = "torch-save"
    about = (
        "torch.save / torch.load of each rank's local tensors to tmpfs; load copies into the "
        "state; async = clone, then torch.save on a thread"
    )

    def __init__(self, ctx: RankContext) -> None:
        super().__init__(ctx)
        os.makedirs(self.shm, exist_ok=True)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="bench-torch-save")

    def _path(self, step: int) -> str:
        return os.path.join(self.shm, f"rank{self.ctx.rank}-step{step}.pt")

    def save(self, state: State, step: int) -> None:
        torch.save(state.local, self._path(step))

    def load(self, state: State, step: int) -> None:
        loaded = torch.load(self._path(step), weights_only=True)
        with torch.no_grad():
            for k, t in state.local.items():
                t.copy_(loaded[k])

    def async_save(self, state: State, step: int) -> Pending:
        staged = {k: t.clone() for k, t in state.local.items()}
        fut: Future[None] = self.pool.submit(torch.save, staged, self._path(step))
        return Pending(done=fut.result)

    def end_rep(self, steps: list[int]) -> None:
        for s in steps:
            if os.path.exists(self._path(s)):
                os.remove(self._path(s))

    def close(self) -> None:
        self.pool.shutdown(wait=True)
