"""``TieredStorageWriter``: DCP's StorageWriter over the memory tier, draining to durable."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.staging import AsyncStager
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from .. import layout
from .._faults import crash_point
from .._log import logger_for, rate, step_message
from ..catalog import StepCatalog
from ..config import CheckpointConfig, require_config
from ..drain import (
    check_reachable,
    commit_durable,
    run_in_background,
    set_exit_wait,
    upload_rank_part,
    watch_durable_commit,
)
from ..durable_retention import sweep_durable
from ..errors import ConfigError, DurableTierError, InvalidStepError, TierckptError
from ..history import begin_upload, newest_key, next_generation
from ..leases import AttemptLease, lease_name
from ..manifest import BlobInfo, CommitRecord, RankEntry, RankManifest, checksum, rank_manifest
from ..nodemem import hold_namespace
from ..resume import note_failure, note_success, resume_pending_once
from ..retention import make_room, sweep
from ..staging import PrivateBuffer, StagingBuffer, StagingPool, align, is_full, tensor_bytes
from ..tiers.directory import remove_quietly
from ..tiers.durable import open_durable_tier
from ..tiers.memory import open_memory_tier
from ._stage import stage_into, staged_sizes

__all__ = ["TieredStorageWriter"]


@dataclass(frozen=True)
class _LocalPlanData:
    rank: int
    step: int
    attempt: str
    newest_committed: tuple[int, str] | None
    """(step, attempt) of the newest commit (by generation) in this rank's memory tier."""
    newest_generation: int = 0
    """The highest generation among the commits in this rank's memory tier."""


@dataclass(frozen=True)
class _GlobalPlanData:
    durable: bool
    install: tuple[bytes, bytes] | None = None
    """(commit record, DCP metadata) of the previous step, for a node that lacks them."""


_LAST_COMMIT: dict[tuple[str, str], tuple[int, str, bytes, bytes]] = {}
"""Coordinator: (memory root, namespace) -> (step, attempt, commit JSON, metadata) of its last commit."""


def _tensor_of(data: Any) -> torch.Tensor:
    tensor = data.detach()
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def _raw(tensor: torch.Tensor) -> memoryview:
    raw: Any = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return memoryview(raw)


class TieredStorageWriter(StorageWriter, AsyncStager):
    """Saves a DCP checkpoint to the node's memory tier; chosen steps drain to durable.

    ``dcp.save`` / ``dcp.async_save`` complete once the memory tier has committed the
    step; :attr:`durable_done` completes once the durable tier has committed it.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        step: int | None = None,
        path: str | os.PathLike[str] | None = None,
        save_to_durable: bool | None = None,
    ) -> None:
        super().__init__()
        self.config = require_config(config)
        self._explicit_step = layout.parse_step(step) if step is not None else None
        self.step: int | None = self._explicit_step
        if self.step is None and path is not None:
            self.step = layout.step_from_path(path)
        self.path = path
        self.save_to_durable = (
            config.save_to_durable if save_to_durable is None else bool(save_to_durable)
        )
        self.attempt = layout.new_attempt_id()
        self.rank = 0
        self.is_coordinator = True
        self.durable_done: Future[None] = Future()
        self._durable = self.save_to_durable
        self._used = False
        self._staged_attempt = False
        self._lease: AttemptLease | None = None
        self._watching = False
        self._rank_attempts: dict[int, str] = {}
        self._generation = 0
        self._upload: Future[int] | None = None
        self._staging: StagingBuffer | None = None
        self._private: PrivateBuffer | None = None
        if not self.save_to_durable:
            self.durable_done.set_result(None)
        self.memory = open_memory_tier(config)  # refuses an untrusted root; creates nothing
        hold_namespace(config, self.memory)  # this process owns the namespace's node memory
        # Never raises for the durable tier here: a rank failing alone before DCP's
        # collectives would hang the others. An unreachable tier fails the drain instead.
        self.durable = open_durable_tier(config, check=False) if self.save_to_durable else None
        if self.save_to_durable:
            set_exit_wait(config.durable_exit_wait_s)
        resume_pending_once(config)

    # -- pickling (DCP's PROCESS checkpointer ships the writer to a subprocess) --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["durable_done"] = None
        state["_upload"] = None
        state["durable"] = None  # reopened on the other side; clients may not pickle
        state["_staging"] = None  # staged tensors travel with the state dict
        state["_private"] = None
        state["_lease"] = None  # the lease stays with (and dies with) this process
        if self.save_to_durable and not self._watching and self.step is not None:
            self._watching = True
            self._watch_from_parent()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.durable_done = Future()
        if not self.save_to_durable:
            self.durable_done.set_result(None)

    def _watch_from_parent(self) -> None:
        """In the training process, resolve ``durable_done`` from the durable tier itself."""
        assert self.step is not None and self.durable is not None
        step, attempt, rank, durable = self.step, self.attempt, self._rank_guess(), self.durable
        timeout, log = self.config.durable_commit_timeout_s, logger_for(self.config)
        done = self.durable_done

        def watch() -> None:
            try:
                watch_durable_commit(
                    durable, self.config.namespace, step, attempt, rank, timeout, log
                )
                done.set_result(None)
            except BaseException as e:
                done.set_exception(_typed(e, self.step))

        run_in_background(watch, name=f"tierckpt-watch-{step}", wait_at_exit=False)

    @staticmethod
    def _rank_guess() -> int:
        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0

    # -- StorageWriter --

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None and self._explicit_step is None:
            self.step = layout.step_from_path(checkpoint_id)
            self.path = checkpoint_id

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=layout.step_dir(self.config.namespace, self.step or 0))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if self.step is None:
            raise layout.no_step_error(self.path)
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", self._rank_guess()))
        if self._staged_attempt:
            self._staged_attempt = False  # stage() began this save's attempt
        else:
            self._begin_attempt(self.rank)

    def _begin_attempt(self, rank: int) -> None:
        """Start a save attempt: a fresh id (after the first) and a lease proving it is live.

        The lease is held until the next attempt of this writer or until it is collected or
        its process dies; sweeps never remove files of an attempt whose lease is held.
        """
        if self._used:
            self.attempt = layout.new_attempt_id()
        self._used = True
        self.memory.ensure_root(self.config.namespace)
        if self._lease is not None:
            self._lease.release()
        ns_dir = self.memory.path(self.config.namespace)
        self._lease = AttemptLease(ns_dir, lease_name(self.attempt, rank))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        assert self.step is not None
        catalog = StepCatalog(self.memory, self.config.namespace, logger_for(self.config))
        records = list(catalog.committed().values())
        top = max(records, key=lambda r: newest_key(r.step, r.generation), default=None)
        data = _LocalPlanData(
            rank=self.rank,
            step=self.step,
            attempt=self.attempt,
            newest_committed=(top.step, top.attempt) if top is not None else None,
            newest_generation=top.generation if top is not None else 0,
        )
        return dataclasses.replace(plan, storage_data=data)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        infos = [p.storage_data for p in plans]
        if not all(isinstance(i, _LocalPlanData) for i in infos):
            raise ConfigError(
                "TieredStorageWriter got cached (empty) save plans: DCP's plan caching "
                "(DefaultSavePlanner(enable_plan_caching=True)) replays the first save's storage "
                "data, and each tierckpt save needs its own. Use a planner without plan caching."
            )
        steps = {i.step for i in infos}
        if len(steps) != 1:
            raise InvalidStepError(
                f"Ranks disagree on the step being saved: {sorted(steps)}. Give every rank the same step."
            )
        if len(plans) != self.config.world_size:
            raise ConfigError(
                f"CheckpointConfig.world_size={self.config.world_size} but {len(plans)} ranks are "
                "saving: set world_size=dist.get_world_size()."
            )
        self._rank_attempts = {i.rank: i.attempt for i in infos}
        ns = self.config.namespace
        # "Newest" is the newest save: above the clock, every rank's tier and this process.
        self._generation = next_generation(ns, (i.newest_generation for i in infos))
        if self.save_to_durable:  # other nodes' uploads start before the memory commit
            begin_upload(ns, self.step or 0, self.attempt, self._rank_attempts.values())
        # The memory commit is written on this (the coordinator's) node; ranks on other nodes
        # get the previous step's commit with this plan and install it in their own tier.
        last = _LAST_COMMIT.get((self.memory.root, self.config.namespace))
        out = []
        for plan, info in zip(plans, infos, strict=True):
            install = None
            if last is not None and info.newest_committed != (last[0], last[1]):
                install = (last[2], last[3])
            glob = _GlobalPlanData(durable=self.save_to_durable, install=install)
            out.append(dataclasses.replace(plan, storage_data=glob))
        return out

    # -- AsyncStager: dcp.async_save copies the state dict once, into the memory tier --

    _synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Copy every tensor once: the shards this rank writes into its staging buffer in the
        memory tier; replicated tensors of a multi-rank job into a private, reused buffer
        (DCP's plan gives each to one rank, and only that rank copies it into the tier)."""
        t0 = time.perf_counter()
        rank = self._rank_guess()
        sizes = staged_sizes(state_dict, replicated_private=self.config.world_size > 1)
        self._begin_attempt(rank)
        self._staged_attempt = True
        buffer = self._acquire(sizes.shared, rank) if sizes.shared_count else None
        private = None
        try:
            if sizes.private:
                private = PrivateBuffer(sizes.private, pinned=sizes.cuda)
            staged = stage_into(state_dict, buffer, private)
        except BaseException as e:
            if buffer is not None:
                self._release(buffer, discard=is_full(e))
            if private is not None:
                private.give_back()
            raise
        self._staging, self._private = buffer, private
        crash_point("save.after_stage")
        kind = buffer.kind if buffer is not None else "no shard of its own"
        logger_for(self.config).info(
            step_message(
                rank,
                self.step,
                f"Staged into the memory tier ({kind}; {sizes.private} replicated bytes "
                f"privately): {rate(sizes.shared + sizes.private, time.perf_counter() - t0)}",
            )
        )
        return staged

    def synchronize_staging(self) -> None:
        """Staging is synchronous: nothing to wait for."""

    def close(self) -> None:
        """Nothing to release: buffers return to the pool when their step is evicted."""

    def _acquire(self, nbytes: int, rank: int) -> StagingBuffer:
        """Claim a staging buffer (a pooled file when one fits) within the memory budget."""
        return StagingPool(self.memory, self.config.namespace).acquire(
            nbytes, name=lease_name(self.attempt, rank), make_room=self._room(), rank=rank
        )

    def _grow(self, buffer: StagingBuffer, extra: int) -> None:
        """Allocate room past a staged buffer for items staged privately or found at write."""
        StagingPool(self.memory, self.config.namespace).grow(buffer, extra, self._room())

    def _room(self) -> Callable[[int], None] | None:
        """The budget check of this save's allocations (None without a memory budget)."""
        budget = self.config.memory_budget_bytes
        if budget is None:
            return None
        catalog = StepCatalog(self.memory, self.config.namespace, logger_for(self.config))
        return lambda extra: make_room(catalog, extra, budget, catalog.log)

    def _release(self, buffer: StagingBuffer, *, discard: bool = False) -> None:
        """Give up a buffer: back to the pool, or deleted when ``discard`` (a full tier)."""
        buffer.close()
        pool = StagingPool(self.memory, self.config.namespace)
        if discard or not pool.recycle(buffer.path, keep=1):
            remove_quietly(buffer.path)

    def write_data(
        self, plan: SavePlan, planner: SavePlanner
    ) -> torch.futures.Future[list[WriteResult]]:
        assert self.step is not None
        log = logger_for(self.config)
        glob = plan.storage_data
        self._durable = bool(getattr(glob, "durable", self.save_to_durable))
        if self._durable != self.save_to_durable:
            log.warning(
                step_message(
                    self.rank,
                    self.step,
                    "save_to_durable differs from the coordinator's; following the coordinator.",
                )
            )
        t0 = time.perf_counter()
        log.info(
            step_message(
                self.rank, self.step, f"Starting checkpoint write ({len(plan.items)} items)"
            )
        )
        ns, step, attempt, rank = self.config.namespace, self.step, self.attempt, self.rank
        catalog = StepCatalog(self.memory, ns, log)
        if getattr(glob, "install", None):
            self._install_commit(catalog, *glob.install)
        committed_before = sweep(catalog, self.config.memory_keep_last, log)
        resolved = [(item, planner.resolve_data(item)) for item in plan.items]
        buffer, private = self._staging, self._private
        self._staging = self._private = None
        fname = layout.data_name(attempt, rank)
        infos: list[tuple[Any, BlobInfo]] = []
        size = 0
        try:
            # Room for what is not staged in the buffer: planned items staged privately,
            # unstaged tensors (dcp.save) and byte items. Only planned items are stored.
            extra = self._unstaged_bytes(resolved, buffer)
            if buffer is None and resolved:
                buffer = self._acquire(extra, rank)
            elif buffer is not None and extra:
                self._grow(buffer, extra)
            if buffer is not None:
                tail = buffer.capacity
                for item, data in resolved:
                    info, tail = self._place(item.type, data, buffer, fname, tail)
                    infos.append((item, info))
                size = tail if tail > buffer.capacity else buffer.used
                buffer.finish(size)
        except BaseException as e:
            if buffer is not None:
                self._release(buffer, discard=is_full(e))
            raise
        finally:
            if private is not None:
                private.give_back()  # its planned tensors are copied into the buffer
        if buffer is not None:
            buffer.close()
            if infos:
                target = self.memory.path(layout.step_key(ns, step, fname))
                os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
                crash_point("save.before_rename")
                os.rename(buffer.path, target)
                crash_point("save.after_rename")
            else:
                self._release(buffer)
        manifest = rank_manifest(
            rank,
            attempt,
            step,
            self._durable,
            fname if infos else None,
            size,
            ((i.offset, i.length, i.checksum) for _, i in infos),
        )
        self.memory.write(
            layout.step_key(ns, step, layout.manifest_name(attempt, rank)), [manifest.to_json()]
        )
        crash_point("save.after_manifest")
        log.info(
            step_message(
                rank,
                step,
                f"In-memory write completed: {len(infos)} items, {rate(size, time.perf_counter() - t0)}",
            )
        )
        # Until evictions feed the pool (fewer than keep_last steps committed), keep one
        # pre-allocated spare there so the next save also copies into resident pages.
        warming_up = committed_before < self.config.memory_keep_last
        if self.config.memory_prefault and buffer is not None and warming_up:
            StagingPool(self.memory, ns).prefault_spare(
                buffer.capacity, self.config.memory_budget_bytes, rank
            )
        if self._durable:
            self._start_drain(manifest)
        elif not self.durable_done.done():
            self.durable_done.set_result(None)
        results = [
            WriteResult(
                index=item.index,
                size_in_bytes=info.length,
                storage_data=dataclasses.replace(info, file_size=size),
            )
            for item, info in infos
        ]
        fut: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        fut.set_result(results)
        return fut

    def _install_commit(self, catalog: StepCatalog, record_json: bytes, metadata: bytes) -> None:
        """Commit, in this node's memory tier, a step whose commit was written on another node."""
        record = CommitRecord.from_json(record_json, where="the coordinator's commit record")
        existing = catalog.commit(record.step)
        if existing is not None and existing.attempt == record.attempt:
            return
        if not any(r.manifest in catalog.files(record.step) for r in record.ranks):
            return  # none of this step's parts were written on this node
        catalog.commit_step(record, metadata, after_metadata="install.after_metadata")

    @staticmethod
    def _unstaged_bytes(resolved: list[tuple[Any, Any]], buffer: StagingBuffer | None) -> int:
        """Bytes (aligned) of the items that are not staged in ``buffer``."""
        total = 0
        for item, data in resolved:
            if item.type == WriteItemType.BYTE_IO:
                total += align(data.getbuffer().nbytes)
            elif buffer is None or buffer.offset_of(data.detach()) is None:
                total += align(tensor_bytes(data))
        return total

    @staticmethod
    def _place(
        item_type: WriteItemType, data: Any, buffer: StagingBuffer, fname: str, tail: int
    ) -> tuple[BlobInfo, int]:
        """Record one item's blob; returns it and the new tail.

        Staged tensors are recorded in place; other tensors and byte items are copied into
        the mapped region while it has room; anything else is appended at ``tail`` (past the
        region, into room the buffer was grown by).
        """
        if item_type == WriteItemType.BYTE_IO:
            assert isinstance(data, io.BytesIO)
            view = data.getbuffer()
            if view.nbytes and buffer.used + view.nbytes <= buffer.capacity:
                at, digest = buffer.put_bytes(view)
                return BlobInfo(fname, at, view.nbytes, digest), tail
            buffer.append(view, tail)
            return BlobInfo(fname, tail, view.nbytes, checksum(view)), tail + view.nbytes
        tensor = _tensor_of(data)
        dtype, shape = str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)
        nbytes = tensor_bytes(tensor)
        offset = buffer.offset_of(tensor)
        if offset is None and nbytes and buffer.used + nbytes <= buffer.capacity:
            offset, digest = buffer.place_hashed(tensor.contiguous())
            return BlobInfo(fname, offset, nbytes, digest, dtype, shape), tail
        if offset is not None:
            digest = checksum(buffer.memory(offset, nbytes))
            return BlobInfo(fname, offset, nbytes, digest, dtype, shape), tail
        start = align(tail)
        raw = _raw(tensor)
        buffer.append(raw, start)
        return BlobInfo(fname, start, nbytes, checksum(raw), dtype, shape), start + nbytes

    def _start_drain(self, manifest: RankManifest) -> None:
        durable = self.durable or open_durable_tier(self.config, check=False)
        self.durable = durable
        config, log = self.config, logger_for(self.config)
        ns, memory = self.config.namespace, self.memory
        coordinator = self.is_coordinator
        step, attempt, rank = manifest.step, manifest.attempt, manifest.rank

        def upload_part() -> int:
            try:
                check_reachable(durable)
                total = upload_rank_part(
                    memory, durable, ns, manifest, log, mark_drained=not coordinator
                )
            except BaseException as e:
                note_failure(config, step, attempt, rank, e, log)  # retried in the background
                raise
            if not coordinator:  # the coordinator's part succeeds with its durable commit
                note_success(config, rank)
            return total

        self._upload = run_in_background(
            upload_part,
            name=f"tierckpt-upload-{manifest.step}",
            exit_note=(log, step_message(rank, step, "This rank's durable upload")),
        )
        if self.is_coordinator:
            return  # finish() chains the durable commit after the memory commit
        upload, done = self._upload, self.durable_done
        timeout = self.config.durable_commit_timeout_s

        def watch() -> None:
            try:
                upload.result()
                watch_durable_commit(
                    durable, ns, manifest.step, manifest.attempt, manifest.rank, timeout, log
                )
                done.set_result(None)
            except BaseException as e:
                done.set_exception(_typed(e, self.step))

        run_in_background(watch, name=f"tierckpt-watch-{manifest.step}", wait_at_exit=False)

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        assert self.step is not None
        log = logger_for(self.config)
        t0 = time.perf_counter()
        ns, step = self.config.namespace, self.step
        storage_data: dict[Any, BlobInfo] = {}
        ranks: list[RankEntry] = []
        for rank, rank_results in enumerate(results):
            attempt = self._rank_attempts.get(rank, self.attempt)
            size = 0
            for wr in rank_results:
                info: BlobInfo = wr.storage_data
                storage_data[wr.index] = info
                size = max(size, info.file_size)
            fname = layout.data_name(attempt, rank) if rank_results else None
            # The rank wrote exactly this manifest: rebuilt here, its checksum goes in the commit.
            manifest = rank_manifest(
                rank,
                attempt,
                step,
                self._durable,
                fname,
                size,
                (
                    (wr.storage_data.offset, wr.storage_data.length, wr.storage_data.checksum)
                    for wr in rank_results
                ),
            )
            entry = RankEntry(
                rank,
                attempt,
                layout.manifest_name(attempt, rank),
                {fname: size} if fname is not None else {},
                manifest_checksum=checksum(manifest.to_json()),
            )
            ranks.append(entry)
        metadata.storage_data = storage_data
        crash_point("save.before_metadata")
        md_name = layout.metadata_name(self.attempt)
        md_bytes = pickle.dumps(metadata)
        record = CommitRecord(
            namespace=ns,
            step=step,
            attempt=self.attempt,
            world_size=len(results),
            metadata=md_name,
            ranks=ranks,
            durable=self._durable,
            metadata_checksum=checksum(md_bytes),
            generation=self._generation,
        )
        catalog = StepCatalog(self.memory, ns, log)
        catalog.commit_step(record, md_bytes, after_metadata="save.after_metadata")
        crash_point("save.after_commit")
        _LAST_COMMIT[(self.memory.root, ns)] = (step, self.attempt, record.to_json(), md_bytes)
        log.info(
            step_message(
                self.rank, step, f"Memory commit written in {time.perf_counter() - t0:.3f}s"
            )
        )
        sweep(catalog, self.config.memory_keep_last, log)
        if self._durable:
            self._start_durable_commit(record, md_bytes)

    def _start_durable_commit(self, record: CommitRecord, md_bytes: bytes) -> None:
        durable = self.durable or open_durable_tier(self.config, check=False)
        upload, done, memory = self._upload, self.durable_done, self.memory
        config, attempt, rank = self.config, self.attempt, self.rank
        timeout, log = self.config.durable_commit_timeout_s, logger_for(self.config)

        def commit() -> None:
            try:
                if upload is not None:
                    upload.result()
                commit_durable(
                    memory,
                    durable,
                    record,
                    timeout,
                    log,
                    metadata=md_bytes,
                    coordinator=(attempt, rank),
                )
            except BaseException as e:
                note_failure(config, record.step, attempt, rank, e, log)
                done.set_exception(_typed(e, record.step))
                log.error(step_message(rank, record.step, f"Durable drain failed: {e}"))
                return
            done.set_result(None)
            note_success(config, rank)
            sweep_durable(config, durable, log)

        run_in_background(
            commit,
            name=f"tierckpt-commit-{record.step}",
            exit_note=(log, step_message(rank, record.step, "The durable commit")),
        )


def _typed(error: BaseException, step: int | None) -> BaseException:
    """A drain failure as a :class:`DurableTierError` (typed errors pass through)."""
    if isinstance(error, TierckptError):
        return error
    wrapped = DurableTierError(
        f"Step {step}: the durable drain failed ({type(error).__name__}: {error}); the step stays "
        "committed in memory, the drain is retried in the background (tierckpt.pending_drains "
        "lists it) and the next writer or reader of the namespace resumes it."
    )
    wrapped.__cause__ = error
    return wrapped
