"""``TieredStorageReader``: DCP's StorageReader reading each blob from the nearest valid tier.

The DCP side only: choosing the step is :mod:`tierckpt.restore`, fetching verified bytes is
:mod:`tierckpt.fetch`; here ReadItems become blobs and fetched bytes become tensors.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import time
import warnings
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader

from .. import fetch, layout, metrics
from .._collective import arrive
from .._dist import dist_ready, process_rank
from .._exit import run_in_background
from .._gcpause import GcPause, PauseSlot, pause_gc
from .._log import logger_for, megabytes, rate, step_message, summary
from ..config import CheckpointConfig, require_config
from ..errors import IntegrityError
from ..fetch import Blob, Fetcher
from ..manifest import BlobInfo, CommitRecord
from ..nodemem import hold_namespace
from ..peer.refill import refill_parts
from ..restore import Finder
from ..tiers.base import Buffer, Tier
from ..tiers.durable import open_durable_tier
from ..tiers.memory import MemoryTier

__all__ = ["TieredStorageReader"]


class TieredStorageReader(StorageReader):
    """Loads a step from the nearest tier holding a valid copy of each blob.

    With ``step=None`` the ranks agree (collectively, when ``torch.distributed`` is
    initialised) on the newest step that every rank can restore from some tier.
    After ``dcp.load``: :attr:`step` is the step loaded and :attr:`bytes_read_by_tier`
    counts bytes read from each tier. The step is chosen when the reader is built (so a
    missing checkpoint raises :class:`CheckpointNotFoundError` here), or with
    ``resolve_now=False`` when ``dcp.load`` reads the metadata.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        step: int | None = None,
        *,
        process_group: dist.ProcessGroup | None = None,
        resolve_now: bool = True,
    ) -> None:
        super().__init__()
        self.config = require_config(config)
        self.process_group = process_group
        self.requested_step = layout.parse_step(step) if step is not None else None
        self.step: int | None = None
        self.bytes_read_by_tier: dict[str, int] = {"memory": 0, "peer": 0, "durable": 0}
        self.rank = process_rank()
        self.log = logger_for(config)
        # The durable tier is opened lazily: memory restores never wait for it to answer.
        self.finder = Finder(
            self.config,
            MemoryTier(config.memory_root or ""),
            open_durable_tier(config, check=False),
            self.rank,
            self.log,
        )
        self.attempt: str | None = None
        self._record: CommitRecord | None = None
        self._metadata: Metadata | None = None
        self._storage_data: dict[Any, BlobInfo] = {}
        hold_namespace(config)  # owns the namespace's node memory, if it is on this node
        self._gc = PauseSlot()
        if resolve_now:  # else in read_metadata, i.e. inside dcp.load (still collective)
            self._resolve()  # collective when torch.distributed is initialised

    @property
    def memory(self) -> MemoryTier:
        return self.finder.memory

    @memory.setter
    def memory(self, tier: MemoryTier) -> None:
        self.finder.memory = tier

    @property
    def durable(self) -> Tier:
        return self.finder.durable

    @property
    def tiers(self) -> list[Tier]:
        """The tiers read from, nearest first (memory alone while durable is unreachable)."""
        return self.finder.tiers

    # -- choosing the step --

    def _resolve(self) -> None:
        """Agree with every rank on (step, attempt), then read that step's DCP metadata."""
        with self._paused("load: the ranks' agreement"):
            self._agree()

    def _paused(self, what: str) -> GcPause | contextlib.nullcontext[None]:
        if not self.config.pause_gc:
            return contextlib.nullcontext()
        return pause_gc(what, self.config.collective_timeout_s)

    def _agree(self) -> None:
        choice, source = self.finder.agree(self._all_gather, self.requested_step)
        self.step, self.attempt = choice
        self._record = source.record
        self._metadata = self.finder.read_metadata(source, _unpickle_metadata)
        self.log.debug(
            step_message(
                self.rank,
                self.step,
                f"Loading attempt {choice[1]} (commit found in the {source.tier.name} tier)",
            )
        )

    def _all_gather(self, view: Any) -> list[Any]:
        """Every rank's view, in rank order (this rank's alone without torch.distributed)."""
        if not dist_ready():
            return [view]
        arrive(
            "reader",
            self.config.namespace,
            self.config.collective_timeout_s,
            "build the reader (TieredStorageReader / tierckpt.load)",
            self.process_group,
        )
        gathered: list[Any] = [None] * dist.get_world_size(self.process_group)
        dist.all_gather_object(gathered, view, group=self.process_group)
        return gathered

    # -- StorageReader --

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        step = layout.step_from_path(checkpoint_id) if checkpoint_id is not None else None
        if step is not None and step != self.step:
            self.requested_step = step
            self._metadata = None
        self.bytes_read_by_tier = {"memory": 0, "peer": 0, "durable": 0}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def read_metadata(self, *args: Any) -> Metadata:
        if self._metadata is None:
            self._resolve()
        assert self._metadata is not None
        return self._metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any) -> None:
        # Through DCP's planning collectives until this rank's reads are done (read_data).
        self._gc.start(
            self.config.pause_gc, f"step {self.step} load", self.config.collective_timeout_s
        )
        self._storage_data = dict(metadata.storage_data or {})

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        try:
            return self._read_data(plan, planner)
        finally:
            self._gc.end()

    def _read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        assert self.step is not None and self.attempt is not None
        t0 = time.perf_counter()
        before = dict(self.bytes_read_by_tier)
        per_file: dict[str, list[ReadItem]] = defaultdict(list)
        for item in plan.items:
            per_file[self._blob(item).relative_path].append(item)
        # Resolve targets here (planners need not be thread-safe); the reads run in a pool.
        targets: dict[int, torch.Tensor] = {}
        direct: dict[int, torch.Tensor] = {}
        for item in plan.items:
            if item.type != LoadItemType.BYTE_IO:
                target = targets[id(item)] = planner.resolve_tensor(item).detach()
                if self._direct_ok(item, target):
                    direct[id(item)] = target
        blobs = {
            f: [self._request(i, direct.get(id(i))) for i in its] for f, its in per_file.items()
        }
        fetcher = Fetcher(
            self.config.namespace,
            self.step,
            self.memory,
            self.tiers,
            self.bytes_read_by_tier,
            self.rank,
            self.log,
            threads=fetch.read_threads(self.config.local_world_size or 1),
        )
        try:
            loaded = fetcher.fetch_all(blobs)
        except IntegrityError as e:
            raise self.finder.mark_unloadable(self.step, self.attempt, e) from e
        finally:  # GPU copies land before any other write to their targets
            fetcher.finish_device_copies()
        if self.finder.peer_tiers and self._record is not None:
            args = (self.config, self.memory, self._record, self.rank, list(per_file))
            peers, log = list(self.finder.peer_tiers), self.log
            # In the background: the load is done; tierckpt.wait_for_drains() waits for it.
            run_in_background(lambda: refill_parts(*args, peers, log), name="tierckpt-refill")
        for fname, items in per_file.items():
            for item, buf in zip(items, loaded[fname], strict=True):
                if buf is None:  # read straight into its target and verified there
                    planner.commit_tensor(item, direct[id(item)])
                else:
                    self._apply(item, buf, planner, targets.get(id(item)))
        total = sum(self.bytes_read_by_tier.values()) - sum(before.values())
        by_tier = ", ".join(
            f"{k}={v - before.get(k, 0)}" for k, v in self.bytes_read_by_tier.items()
        )
        seconds = time.perf_counter() - t0
        metrics.observe_load(
            self.config.namespace,
            self.step,
            seconds,
            {k: v - before.get(k, 0) for k, v in self.bytes_read_by_tier.items()},
        )
        self.log.debug(
            step_message(
                self.rank,
                self.step,
                f"Read {len(plan.items)} items, {rate(total, seconds)}; bytes by tier: {by_tier}",
            )
        )
        if self.rank == 0:
            tiers = [k for k, v in self.bytes_read_by_tier.items() if v > before.get(k, 0)]
            summary(
                self.log,
                f"loaded step {self.step} from {' and '.join(tiers) or 'memory'} "
                f"({megabytes(total)} in {seconds:.2f} s)",
            )
        fut: torch.futures.Future[None] = torch.futures.Future()
        fut.set_result(None)
        return fut

    def _request(self, item: ReadItem, target: torch.Tensor | None) -> Blob:
        """The blob to fetch for one item (copied straight into ``target`` when given)."""
        blob = self._blob(item)
        into = device = None
        if target is not None and target.device.type == "cpu":
            raw: Any = target.reshape(-1).view(torch.uint8).numpy()
            into = memoryview(raw)
        elif target is not None:  # a GPU tensor: through pinned slots, hashed as read
            device = target.reshape(-1).view(torch.uint8)
        return Blob(blob.offset, blob.length, blob.checksum, into, item.storage_index.fqn, device)

    def _direct_ok(self, item: ReadItem, target: torch.Tensor) -> bool:
        """True when a blob maps byte for byte onto its contiguous target tensor, on a device
        that blobs are read straight into (CPU; CUDA through pinned slots)."""
        blob = self._blob(item)
        return (
            blob.shape is not None
            and target.device.type in _DIRECT_DEVICES
            and target.is_contiguous()
            and str(target.dtype).removeprefix("torch.") == blob.dtype
            and tuple(target.shape) == tuple(blob.shape)
            and tuple(item.lengths) == tuple(blob.shape)
            and not any(item.storage_offsets)
        )

    def _blob(self, item: ReadItem) -> BlobInfo:
        info = self._storage_data.get(item.storage_index)
        if not isinstance(info, BlobInfo):
            raise IntegrityError(
                f"Step {self.step}: no tierckpt blob recorded for {item.storage_index.fqn}; the "
                "metadata is foreign or corrupt."
            )
        return info

    def _apply(
        self, item: ReadItem, buf: Buffer, planner: LoadPlanner, target: torch.Tensor | None
    ) -> None:
        blob = self._blob(item)
        if item.type == LoadItemType.BYTE_IO:
            planner.load_bytes(item, io.BytesIO(bytes(buf)))
            return
        if blob.dtype is None or blob.shape is None:
            raise IntegrityError(
                f"Step {self.step}: blob of {item.storage_index.fqn} has no tensor type."
            )
        dtype = getattr(torch, blob.dtype)
        if blob.length == 0:
            tensor = torch.empty(blob.shape, dtype=dtype)
        else:
            with warnings.catch_warnings():  # some tiers return read-only bytes; we only read them
                warnings.simplefilter("ignore")
                tensor = torch.frombuffer(buf, dtype=dtype).reshape(blob.shape)
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        if target is None:
            target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise IntegrityError(
                f"Step {self.step}: {item.storage_index.fqn} has shape {tuple(tensor.size())} in the "
                f"checkpoint but {tuple(target.size())} in the state dict being loaded."
            )
        target.copy_(tensor)
        planner.commit_tensor(item, target)


_DIRECT_DEVICES = frozenset({"cpu", "cuda"})
"""Devices whose tensors a memory-tier blob is read straight into (CUDA: via pinned slots)."""


def _unpickle_metadata(data: Buffer) -> Metadata | None:
    """DCP metadata from its verified bytes; None when they hold something else."""
    metadata = pickle.loads(data)
    return metadata if isinstance(metadata, Metadata) else None
