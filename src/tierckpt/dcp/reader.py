"""``TieredStorageReader``: DCP's StorageReader reading each blob from the nearest valid tier."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader

from .. import errors as _errors
from .. import layout
from .._log import logger_for, rate, step_message
from ..catalog import StepCatalog, StepSource
from ..config import CheckpointConfig, require_config
from ..constants import READ_THREADS
from ..errors import (
    CheckpointNotFoundError,
    DurableUnavailableError,
    IntegrityError,
    StepUnloadableError,
    TierckptError,
)
from ..history import abandoned, mark_unloadable, marked_unloadable, newest_key, observe
from ..manifest import BlobInfo, checksum
from ..nodemem import hold_namespace
from ..resume import resume_pending_once
from ..tiers.base import Buffer, KeyNotFoundError, Tier
from ..tiers.durable import open_durable_tier
from ..tiers.memory import MemoryTier

__all__ = ["TieredStorageReader"]

_Choice = tuple[int, str]  # (step, attempt)
_Fetched = tuple[Buffer | None, int, str]
"""A blob as read from a tier: its bytes (None when read straight into its target), their
length and the xxh3-128 of exactly those bytes."""


@dataclass
class _View:
    """What one rank found, exchanged in the agreement."""

    restorable: dict[_Choice, int] = field(default_factory=dict)
    """(step, attempt) -> generation of every save this rank can restore from some tier."""
    saves: set[tuple[int, str, int]] = field(default_factory=set)
    """(step, attempt, generation) of every commit this rank sees (rewinds abandon some)."""
    unloadable: dict[_Choice, str] = field(default_factory=dict)
    """Saves this rank (or its node) found a blob of with no valid copy anywhere, and why."""
    durable_error: str | None = None
    """Why the durable tier did not answer on this rank (it then counts as empty)."""
    error: tuple[list[str], str] | None = None
    """(names of the error's classes, message) when building the view failed."""


def _same_error(errors: list[tuple[list[str], str]]) -> TierckptError:
    """One typed error for every rank: the first rank's tierckpt class, every rank's message."""
    cls: type[TierckptError] = TierckptError
    for name in errors[0][0]:
        found = getattr(_errors, name, None)
        if isinstance(found, type) and issubclass(found, TierckptError):
            cls = found
            break
    return cls("Finding checkpoints failed: " + "; ".join(msg for _, msg in errors))


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
        self.bytes_read_by_tier: dict[str, int] = {"memory": 0, "durable": 0}
        self.rank = dist.get_rank() if _dist_ready() else 0
        self.log = logger_for(config)
        self.memory = MemoryTier(config.memory_root or "")
        hold_namespace(config)  # owns the namespace's node memory, if it is on this node
        # Opened lazily: memory restores never wait for the durable tier to answer.
        self.durable = open_durable_tier(config, check=False)
        self.tiers: list[Tier] = [self.memory, self.durable]
        self.attempt: str | None = None
        self._durable_error: str | None = None
        self._durable_checked = False
        self._metadata: Metadata | None = None
        self._storage_data: dict[Any, BlobInfo] = {}
        self._count_lock = threading.Lock()
        if resolve_now:  # else in read_metadata, i.e. inside dcp.load (still collective)
            self._resolve()  # collective when torch.distributed is initialised

    # -- choosing the step --

    def _check_durable(self) -> str | None:
        """Whether the durable tier answers (once per reader); an outage is logged, not raised.

        An unreachable durable tier counts as empty: memory restores go on without it.
        """
        if self._durable_checked:
            return self._durable_error
        self._durable_checked = True
        check = getattr(self.durable, "check_available", None)
        try:
            if check is not None:
                check(create=False)  # a reader creates nothing
        except Exception as e:
            self._durable_error = f"{type(e).__name__}: {e}"
            self.tiers = [self.memory]
            self.log.warning(
                f"[Rank {self.rank}] The durable tier {self.durable.url} is unreachable ({e}); "
                "this rank restores from the memory tier alone."
            )
            return self._durable_error
        try:
            resume_pending_once(self.config)
        except Exception as e:
            self.log.warning(f"Resuming pending durable drains failed: {e}")
        return None

    def _sources(self) -> tuple[dict[_Choice, StepSource], _View]:
        """Every (step, attempt) this rank can restore, with the tier holding its commit;
        and this rank's view for the agreement."""
        ns = self.config.namespace
        self.memory.check_trusted(ns)  # inside the gathered part: every rank sees a refusal
        view = _View(durable_error=self._check_durable())
        catalogs = [StepCatalog(t, ns, self.log) for t in self.tiers]
        records: dict[_Choice, StepSource] = {}
        listings: dict[tuple[str, int], dict[str, int]] = {}
        steps = sorted({s for c in catalogs for s in c.steps()}, reverse=True)
        for step in steps:
            for cat in catalogs:
                record = cat.commit(step)
                if record is None:
                    continue
                choice = (step, record.attempt)
                view.saves.add((step, record.attempt, record.generation))
                if choice in records or self.requested_step not in (None, step):
                    continue
                missing = set(record.files())
                for other in catalogs:
                    key = (other.tier.name, step)
                    if key not in listings:
                        listings[key] = other.files(step)
                    missing &= set(other.missing_files(record, listings[key]))
                if missing:
                    self.log.warning(
                        step_message(
                            self.rank,
                            step,
                            f"Not restorable from any tier: missing {sorted(missing)}",
                        )
                    )
                    continue
                records[choice] = StepSource(cat.tier, record)
                view.restorable[choice] = record.generation
                why = self._unloadable(step, record.attempt, listings[(self.memory.name, step)])
                if why is not None:
                    view.unloadable[choice] = why
        return records, view

    def _unloadable(self, step: int, attempt: str, listing: dict[str, int]) -> str | None:
        """Why this rank or its node could not load that attempt before, or None."""
        if marked_unloadable(self.config.namespace, step, attempt):
            return "this process found a blob with no valid copy in any tier"
        for name in sorted(n for n in listing if layout.is_unloadable_mark(n, attempt)):
            try:
                raw = self.memory.read(layout.step_key(self.config.namespace, step, name))
                return str(json.loads(bytes(raw))["reason"])
            except Exception:
                return f"marked by {name}"
        return None

    def _resolve(self) -> None:
        """Agree with every rank on (step, attempt), then read that step's DCP metadata.

        Everything a rank finds (or fails to find) travels in one ``all_gather_object``, so
        every rank raises the same typed error, or every rank chooses the same save: the
        newest (by generation) that every rank can restore, that no rewind abandoned and
        that no rank found unloadable (unless that step was asked for by number).
        """
        sources: dict[_Choice, StepSource] = {}
        view = _View()
        try:
            sources, view = self._sources()
        except Exception as e:  # surfaced after the collective, on every rank
            view.error = (
                [c.__name__ for c in type(e).__mro__],
                f"rank {self.rank}: {type(e).__name__}: {e}",
            )
        gathered: list[Any] = [view]
        if _dist_ready():
            group = self.process_group
            gathered = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, view, group=group)
        errors = [v.error for v in gathered if v.error]
        if errors:
            raise _same_error(errors)
        gone = abandoned(s for v in gathered for s in v.saves)
        generation = {c: g for v in gathered for c, g in v.restorable.items()}
        common: set[_Choice] = set.intersection(*(set(v.restorable) for v in gathered)) - gone
        marks: dict[_Choice, list[str]] = defaultdict(list)
        for rank, v in enumerate(gathered):
            for c, why in v.unloadable.items():
                marks[c].append(f"rank {rank}: {why}")
        candidates = common if self.requested_step is not None else common - set(marks)
        if not candidates:
            raise self._not_found(sources, gathered, gone, marks)

        def key(c: _Choice) -> tuple[int, int, str]:
            return newest_key(c[0], generation[c], c[1])

        choice = max(candidates, key=key)
        for c in sorted(set(marks) & common - candidates):
            if key(c) > key(choice):
                self.log.warning(
                    step_message(
                        self.rank,
                        c[0],
                        f"Skipping step {c[0]} (attempt {c[1]}): it cannot be loaded "
                        f"({'; '.join(marks[c])}). Falling back to step {choice[0]}.",
                    )
                )
        newer_abandoned = sorted({s for s, _ in gone if s > choice[0]})
        if newer_abandoned:
            self.log.info(
                step_message(
                    self.rank,
                    choice[0],
                    f"Steps {newer_abandoned} belong to saves a later rewind abandoned; skipped.",
                )
            )
        source = sources[choice]
        self.step, self.attempt = choice
        observe(self.config.namespace, generation[choice])
        self._metadata = self._read_metadata(source)
        self.log.info(
            step_message(
                self.rank,
                self.step,
                f"Loading attempt {choice[1]} (commit found in the {source.tier.name} tier)",
            )
        )

    def _not_found(
        self,
        local: dict[_Choice, StepSource],
        gathered: list[_View],
        gone: set[_Choice],
        marks: dict[_Choice, list[str]],
    ) -> TierckptError:
        where = f"memory ({self.memory.root}) or durable ({self.durable.url})"
        ns = self.config.namespace
        outages = [
            f"rank {r}: {v.durable_error}" for r, v in enumerate(gathered) if v.durable_error
        ]
        if outages:
            return DurableUnavailableError(
                f"No step of namespace {ns!r} is restorable by every rank, and the durable tier "
                f"is unreachable on {'; '.join(outages)}. Fix the durable tier (or its "
                "configuration) on those ranks, or restore from a memory tier that holds a "
                "complete step."
            )
        why = ""
        if marks:
            why += f" Unloadable: {sorted(s for s, _ in marks)}."
        if gone:
            why += f" Abandoned by a later rewind: {sorted({s for s, _ in gone})}."
        if self.requested_step is not None:
            return CheckpointNotFoundError(
                f"Step {self.requested_step} of namespace {ns!r} is not restorable by every rank from "
                f"{where}: it is uncommitted, was evicted, or lost files.{why} Load another step or pass step=None."
            )
        if local:
            return CheckpointNotFoundError(
                f"No step of namespace {ns!r} is restorable by every rank (this rank could load "
                f"{sorted(s for s, _ in local)}); check that every node sees the durable tier {self.durable.url}.{why}"
            )
        return CheckpointNotFoundError(
            f"No committed checkpoint of namespace {ns!r} in {where}: start from scratch or check "
            f"namespace, memory_root and durable_base_path.{why}"
        )

    def _read_metadata(self, source: StepSource) -> Metadata:
        """The step's DCP metadata; each copy is unpickled only once its checksum matches."""
        record = source.record
        last: Exception | None = None
        for tier in [source.tier, *[t for t in self.tiers if t is not source.tier]]:
            try:
                data = StepCatalog(tier, self.config.namespace, self.log).read_metadata(record)
            except Exception as e:  # missing, unreachable, or not the bytes the commit vouches for
                if isinstance(e, IntegrityError):
                    self.log.warning(step_message(self.rank, record.step, str(e)))
                last = e
                continue
            try:
                metadata = pickle.loads(data)
            except Exception as e:
                last = e
                continue
            if isinstance(metadata, Metadata):
                return metadata
        raise IntegrityError(
            f"Step {record.step}: no copy of its DCP metadata {record.metadata} is readable and "
            f"matches its commit's checksum ({last})."
        )

    # -- StorageReader --

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        step = layout.step_from_path(checkpoint_id) if checkpoint_id is not None else None
        if step is not None and step != self.step:
            self.requested_step = step
            self._metadata = None
        self.bytes_read_by_tier = {t.name: 0 for t in self.tiers}

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return False

    def read_metadata(self, *args: Any) -> Metadata:
        if self._metadata is None:
            self._resolve()
        assert self._metadata is not None
        return self._metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any) -> None:
        self._storage_data = dict(metadata.storage_data or {})

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> torch.futures.Future[None]:
        assert self.step is not None
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
        workers = max(1, min(READ_THREADS, len(per_file)))
        try:
            with ThreadPoolExecutor(workers, thread_name_prefix="tierckpt-read") as pool:
                loaded = list(pool.map(partial(self._read_file, direct=direct), per_file.items()))
        except IntegrityError as e:
            raise self._mark_unloadable(e) from e
        for items in loaded:
            for item, buf in items:
                if buf is None:  # read straight into its target and verified there
                    planner.commit_tensor(item, direct[id(item)])
                else:
                    self._apply(item, buf, planner, targets.get(id(item)))
        total = sum(self.bytes_read_by_tier.values()) - sum(before.values())
        by_tier = ", ".join(
            f"{k}={v - before.get(k, 0)}" for k, v in self.bytes_read_by_tier.items()
        )
        self.log.info(
            step_message(
                self.rank,
                self.step,
                f"Read {len(plan.items)} items, {rate(total, time.perf_counter() - t0)}; bytes by tier: {by_tier}",
            )
        )
        fut: torch.futures.Future[None] = torch.futures.Future()
        fut.set_result(None)
        return fut

    def _mark_unloadable(self, error: IntegrityError) -> StepUnloadableError:
        """Record that this rank cannot load the chosen step, so the next agreement skips it.

        The marker ``<attempt>.unloadable-r<rank>`` goes into the step's directory in this
        node's memory tier (and this process remembers it).
        """
        assert self.step is not None and self.attempt is not None
        ns = self.config.namespace
        mark_unloadable(ns, self.step, self.attempt)
        name = layout.unloadable_name(self.attempt, self.rank)
        body = {"rank": self.rank, "step": self.step, "attempt": self.attempt}
        try:
            self.memory.ensure_root()
            self.memory.write(
                layout.step_key(ns, self.step, name),
                [json.dumps({**body, "reason": str(error), "time": time.time()}).encode()],
            )
            where = f"marked unloadable ({name} in the memory tier {self.memory.root})"
        except Exception as e:
            where = f"marked unloadable in this process (writing {name} failed: {e})"
        return StepUnloadableError(
            f"{error} Step {self.step} is now {where}: the next load with step=None falls back "
            "to the newest step before it (tierckpt.load does so at once)."
        )

    def _direct_ok(self, item: ReadItem, target: torch.Tensor) -> bool:
        """True when a blob maps byte for byte onto its (contiguous CPU) target tensor."""
        blob = self._blob(item)
        return (
            blob.shape is not None
            and target.device.type == "cpu"
            and target.is_contiguous()
            and str(target.dtype).removeprefix("torch.") == blob.dtype
            and tuple(target.shape) == tuple(blob.shape)
            and tuple(item.lengths) == tuple(blob.shape)
            and not any(item.storage_offsets)
        )

    def _count(self, tier: Tier, nbytes: int) -> None:
        with self._count_lock:
            self.bytes_read_by_tier[tier.name] = self.bytes_read_by_tier.get(tier.name, 0) + nbytes

    def _blob(self, item: ReadItem) -> BlobInfo:
        info = self._storage_data.get(item.storage_index)
        if not isinstance(info, BlobInfo):
            raise IntegrityError(
                f"Step {self.step}: no tierckpt blob recorded for {item.storage_index.fqn}; the "
                "metadata is foreign or corrupt."
            )
        return info

    def _read_file(
        self, entry: tuple[str, list[ReadItem]], direct: dict[int, torch.Tensor]
    ) -> list[tuple[ReadItem, Buffer | None]]:
        """Read every blob of one file: memory first, then each tier for what is still missing.

        Every blob is copied out of its tier first and the copy is checked against its
        xxh3-128 checksum (so what is verified is what is delivered); a blob that fails in
        one tier is read from the next, and one that fails everywhere raises: wrong bytes
        are never loaded.
        """
        fname, items = entry
        assert self.step is not None
        key = layout.step_key(self.config.namespace, self.step, fname)
        pending = sorted(items, key=lambda i: self._blob(i).offset)
        got: dict[int, Buffer | None] = {}
        reasons: dict[int, list[str]] = defaultdict(list)
        for tier in self.tiers:
            if not pending:
                break
            if tier is self.memory:
                fetched = self._read_memory(key, pending, direct)
            else:
                fetched = self._fetch(tier, key, [self._blob(i) for i in pending])
            still: list[ReadItem] = []
            corrupt = 0
            for item, res in zip(pending, fetched, strict=True):
                blob = self._blob(item)
                if isinstance(res, Exception):
                    reasons[id(item)].append(f"{tier.name}: {type(res).__name__}: {res}")
                    corrupt += not isinstance(res, KeyNotFoundError)
                elif res[1] != blob.length or res[2] != blob.checksum:
                    reasons[id(item)].append(f"{tier.name}: checksum mismatch")
                    corrupt += 1
                else:
                    got[id(item)] = res[0]
                    self._count(tier, blob.length)
                    continue
                still.append(item)
            if still and tier is not self.tiers[-1]:
                # Absent files are routine (a node restarted, a step only in durable);
                # bytes that fail their checksum or cannot be read are worth a warning.
                self.log.log(
                    logging.WARNING if corrupt else logging.INFO,
                    step_message(
                        self.rank,
                        self.step,
                        f"{len(still)} of {len(pending)} blobs of {fname} are "
                        f"{'corrupt or unreadable' if corrupt else 'not'} in the {tier.name} tier "
                        f"(first: {reasons[id(still[0])][-1]}); reading them from the next tier",
                    ),
                )
            pending = still
        if pending:
            item = pending[0]
            blob = self._blob(item)
            raise IntegrityError(
                f"Step {self.step}: no valid copy of {fname} [{blob.offset}:+{blob.length}] "
                f"({item.storage_index.fqn}) in any tier: {'; '.join(reasons[id(item)])}. "
                "Load an earlier step (TieredStorageReader(config, step=N))."
            )
        return [(item, got[id(item)]) for item in items]

    def _read_memory(
        self, key: str, items: list[ReadItem], direct: dict[int, torch.Tensor]
    ) -> list[_Fetched | Exception]:
        """Memory tier: copy each blob out (straight into its target when it maps byte for
        byte, else into a private buffer) and hash the copy, under a shared flock.

        The lock keeps the staging pool from reusing the file while it is read. A direct
        blob that fails its checksum leaves its target to be overwritten by the next tier's
        verified bytes (or the load raises): wrong bytes are never returned.
        """
        try:
            handle = self.memory.open_shared(key)
        except Exception as e:
            return [e] * len(items)
        out: list[_Fetched | Exception] = []
        with handle:
            for item in items:
                blob = self._blob(item)
                target = direct.get(id(item))
                try:
                    if target is not None:
                        raw: Any = target.reshape(-1).view(torch.uint8).numpy()
                        digest = handle.read_into(blob.offset, memoryview(raw))
                        out.append((None, blob.length, digest))
                    else:
                        buf, digest = handle.read(blob.offset, blob.length)
                        out.append((buf, len(buf), digest))
                except Exception as e:
                    out.append(e)
        return out

    def _fetch(self, tier: Tier, key: str, blobs: list[BlobInfo]) -> list[_Fetched | Exception]:
        """Bytes of each blob from a tier other than memory (an exception for a failed one)."""
        read_ranges = getattr(tier, "read_ranges", None)
        if read_ranges is not None:  # object stores: parallel ranged GETs, near ranges coalesced
            try:
                bufs: list[Buffer | Exception] = list(
                    read_ranges(key, [(b.offset, b.length) for b in blobs])
                )
            except Exception as e:
                bufs = [e] * len(blobs)
        else:
            bufs = [_attempt(tier.read, key, b.offset, b.length) for b in blobs]
        return [b if isinstance(b, Exception) else (b, len(b), checksum(b)) for b in bufs]

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


def _attempt(fn: Callable[..., Buffer], *args: Any) -> Buffer | Exception:
    try:
        return fn(*args)
    except Exception as e:
        return e


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized()
