"""``TieredStorageWriter``: DCP's StorageWriter over the memory tier, draining to durable."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from .. import layout
from .._log import logger_for, rate, step_message
from ..catalog import StepCatalog
from ..config import CheckpointConfig
from ..drain import commit_durable, run_in_background, upload_rank_part, watch_durable_commit
from ..errors import ConfigError, InvalidStepError
from ..manifest import BlobInfo, CommitRecord, RankEntry, RankManifest, checksum
from ..retention import make_room, sweep
from ..tiers.durable import open_durable_tier
from ..tiers.memory import MemoryTier

__all__ = ["TieredStorageWriter"]


@dataclass(frozen=True)
class _LocalPlanData:
    rank: int
    step: int
    attempt: str


@dataclass(frozen=True)
class _GlobalPlanData:
    durable: bool


def _as_bytes_view(
    item_type: WriteItemType, data: Any
) -> tuple[memoryview, str | None, tuple[int, ...] | None]:
    """The raw bytes of one resolved item, with dtype and shape for tensors."""
    if item_type == WriteItemType.BYTE_IO:
        assert isinstance(data, io.BytesIO)
        return data.getbuffer(), None, None
    tensor = data.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    raw = tensor.reshape(-1).view(torch.uint8).numpy()
    return memoryview(raw), str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)


class TieredStorageWriter(StorageWriter):
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
        if not isinstance(config, CheckpointConfig):
            raise ConfigError(
                f"config must be a tierckpt.CheckpointConfig, got {type(config).__name__}."
            )
        self.config = config
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
        self._watching = False
        self._rank_attempts: dict[int, str] = {}
        self._upload: Future[int] | None = None
        self._manifest: RankManifest | None = None
        if not self.save_to_durable:
            self.durable_done.set_result(None)
        self.memory = MemoryTier(config.memory_root or "")
        self.durable = open_durable_tier(config) if self.save_to_durable else None

    # -- pickling (DCP's PROCESS checkpointer ships the writer to a subprocess) --

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["durable_done"] = None
        state["_upload"] = None
        state["durable"] = None  # reopened on the other side; clients may not pickle
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
                done.set_exception(e)

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
            raise InvalidStepError(
                f"Invalid step value: no step given (path={self.path!r}). Pass step=<int>, or a "
                "path / checkpoint_id containing 'step_<N>' (e.g. 'step_100/checkpoint')."
            )
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", self._rank_guess()))
        if self._used:
            self.attempt = layout.new_attempt_id()
        self._used = True
        self.memory.ensure_root()

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        assert self.step is not None
        data = _LocalPlanData(rank=self.rank, step=self.step, attempt=self.attempt)
        return dataclasses.replace(plan, storage_data=data)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        infos = [p.storage_data for p in plans]
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
        glob = _GlobalPlanData(durable=self.save_to_durable)
        return [dataclasses.replace(p, storage_data=glob) for p in plans]

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
        views: list[memoryview] = []
        results: list[WriteResult] = []
        blobs: list[list[Any]] = []
        offset = 0
        fname = layout.data_name(attempt, rank)
        for item in plan.items:
            view, dtype, shape = _as_bytes_view(item.type, planner.resolve_data(item))
            digest = checksum(view)
            info = BlobInfo(fname, offset, view.nbytes, digest, dtype, shape)
            results.append(
                WriteResult(index=item.index, size_in_bytes=view.nbytes, storage_data=info)
            )
            blobs.append([offset, view.nbytes, digest])
            views.append(view)
            offset += view.nbytes
        catalog = StepCatalog(self.memory, ns, log)
        sweep(catalog, self.config.memory_keep_last, log)
        make_room(catalog, offset, self.config.memory_budget_bytes, log)
        manifest = RankManifest(rank=rank, attempt=attempt, step=step, durable=self._durable)
        if views:
            self.memory.write(layout.step_key(ns, step, fname), views)
            manifest.files[fname] = {"size": offset, "blobs": blobs}
        self.memory.write(
            layout.step_key(ns, step, layout.manifest_name(attempt, rank)), [manifest.to_json()]
        )
        self._manifest = manifest
        log.info(
            step_message(
                rank,
                step,
                f"In-memory write completed: {len(views)} items, {rate(offset, time.perf_counter() - t0)}",
            )
        )
        if self._durable:
            self._start_drain(manifest)
        elif not self.durable_done.done():
            self.durable_done.set_result(None)
        fut: torch.futures.Future[list[WriteResult]] = torch.futures.Future()
        fut.set_result(results)
        return fut

    def _start_drain(self, manifest: RankManifest) -> None:
        durable = self.durable or open_durable_tier(self.config)
        self.durable = durable
        log = logger_for(self.config)
        ns, memory = self.config.namespace, self.memory
        self._upload = run_in_background(
            lambda: upload_rank_part(memory, durable, ns, manifest, log),
            name=f"tierckpt-upload-{manifest.step}",
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
                done.set_exception(e)

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
                storage_data[wr.index] = wr.storage_data
                size += wr.size_in_bytes
            files = {layout.data_name(attempt, rank): size} if rank_results else {}
            ranks.append(RankEntry(rank, attempt, layout.manifest_name(attempt, rank), files))
        metadata.storage_data = storage_data
        md_name = layout.metadata_name(self.attempt)
        self.memory.write(layout.step_key(ns, step, md_name), [pickle.dumps(metadata)])
        record = CommitRecord(
            namespace=ns,
            step=step,
            attempt=self.attempt,
            world_size=len(results),
            metadata=md_name,
            ranks=ranks,
            durable=self._durable,
        )
        catalog = StepCatalog(self.memory, ns, log)
        catalog.write_commit(record)
        log.info(
            step_message(
                self.rank, step, f"Memory commit written in {time.perf_counter() - t0:.3f}s"
            )
        )
        sweep(catalog, self.config.memory_keep_last, log)
        if self._durable:
            self._start_durable_commit(record)

    def _start_durable_commit(self, record: CommitRecord) -> None:
        durable = self.durable or open_durable_tier(self.config)
        upload, done, memory = self._upload, self.durable_done, self.memory
        timeout, log = self.config.durable_commit_timeout_s, logger_for(self.config)

        def commit() -> None:
            try:
                if upload is not None:
                    upload.result()
                commit_durable(memory, durable, record, timeout, log)
                done.set_result(None)
            except BaseException as e:
                done.set_exception(e)
                log.error(step_message(self.rank, record.step, f"Durable drain failed: {e}"))

        run_in_background(commit, name=f"tierckpt-commit-{record.step}")
