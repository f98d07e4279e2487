"""The core of a save, free of DCP: one rank's part in the memory tier, and the memory commit.

A rank's part is one data file (its staging buffer, renamed into the step) plus its rank
manifest; the coordinator then commits the step in memory (metadata, then COMMIT) and
remembers the commit for nodes that lack it. The DCP adapter (``dcp/writer.py``) turns
plans and write results into the plain data these functions take.

(Named ``saving`` because ``tierckpt.save`` is the public save function.)
"""

from __future__ import annotations

import functools
import io
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import layout
from ._exit import run_in_background
from ._faults import crash_point
from ._log import logger_for, rate, step_message
from ._runtime import RUNTIME
from .catalog import StepCatalog
from .config import CheckpointConfig
from .leases import lease_name
from .manifest import BlobInfo, CommitRecord, RankEntry, RankManifest, checksum, rank_manifest
from .peer.placement import Peers
from .retention import make_room, sweep
from .staged_upload import StagedUpload, data_key, follow_buffer
from .staging import (
    PrivateBuffer,
    StagingBuffer,
    StagingPool,
    align,
    budget_lock,
    is_full,
    tensor_bytes,
)
from .tiers.base import Tier
from .tiers.directory import in_made_dir, remove_quietly
from .tiers.memory import MemoryTier

__all__ = [
    "PartItem",
    "RankPart",
    "WrittenPart",
    "acquire_buffer",
    "commit_memory",
    "grow_buffer",
    "install_commit",
    "last_commit",
    "release_buffer",
    "write_rank_part",
]

PartItem = io.BytesIO | torch.Tensor
"""One item of a rank's part: serialized bytes, or a tensor (staged or not)."""

LastCommit = tuple[int, str, bytes, bytes]
"""(step, attempt, commit JSON, metadata) of a coordinator's last memory commit."""


# -- staging buffers within the memory budget --


def _room(memory: MemoryTier, config: CheckpointConfig) -> Callable[[int], None] | None:
    """The budget check of this save's allocations (None without a memory budget)."""
    budget = config.memory_budget_bytes
    if budget is None:
        return None
    catalog = StepCatalog(memory, config.namespace, logger_for(config))
    return lambda extra: make_room(catalog, extra, budget, catalog.log)


def acquire_buffer(
    memory: MemoryTier, config: CheckpointConfig, attempt: str, rank: int, nbytes: int
) -> StagingBuffer:
    """Claim a staging buffer (a pooled file when one fits) within the memory budget."""
    return StagingPool(memory, config.namespace).acquire(
        nbytes, name=lease_name(attempt, rank), make_room=_room(memory, config), rank=rank
    )


def grow_buffer(
    memory: MemoryTier, config: CheckpointConfig, buffer: StagingBuffer, extra: int
) -> None:
    """Allocate room past a staged buffer for items staged privately or found at write."""
    StagingPool(memory, config.namespace).grow(buffer, extra, _room(memory, config))


def release_buffer(
    memory: MemoryTier, config: CheckpointConfig, buffer: StagingBuffer, *, discard: bool = False
) -> None:
    """Give up a buffer: back to the pool, or deleted when ``discard`` (a full tier); an
    upload that followed it is cancelled."""
    buffer.abandon("its save did not complete")
    buffer.close()
    pool = StagingPool(memory, config.namespace)
    if discard or not pool.recycle(buffer.path, keep=1):
        remove_quietly(buffer.path)


# -- one rank's part --


@dataclass
class RankPart:
    """What one rank writes for one save attempt."""

    step: int
    attempt: str
    rank: int
    durable: bool
    """Whether the step drains to the durable tier (recorded in the manifest)."""
    items: Iterable[PartItem]
    """The planned items in order; consumed after the retention sweep."""
    buffer: StagingBuffer | None = None
    """The staging buffer the items were staged into, if any (taken over here)."""
    private: PrivateBuffer | None = None
    """The private buffer of replicated items, if any (given back here)."""


@dataclass(frozen=True)
class WrittenPart:
    """A rank's part as written: its manifest and each item's blob, in item order."""

    manifest: RankManifest
    blobs: list[BlobInfo]
    file_size: int
    upload: StagedUpload | None = None
    """The durable upload of the data file that began while it was written, if any."""


def _tensor_of(data: Any) -> torch.Tensor:
    tensor = data.detach()
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def _raw(tensor: torch.Tensor) -> memoryview:
    raw: Any = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return memoryview(raw)


def _unstaged_bytes(items: list[PartItem], buffer: StagingBuffer | None) -> int:
    """Bytes (aligned) of the items that are not staged in ``buffer`` and will not fit in
    the rest of its mapped region (where :func:`_place` copies them while there is room)."""
    total = 0
    used = buffer.used if buffer is not None else 0
    capacity = buffer.capacity if buffer is not None else 0
    for data in items:
        if isinstance(data, io.BytesIO):
            nbytes = data.getbuffer().nbytes
        elif buffer is None or buffer.offset_of(data.detach()) is None:
            nbytes = tensor_bytes(data)
        else:
            continue
        if _fits(used, nbytes, capacity):
            used = align(used + nbytes)
        else:
            total += align(nbytes)
    return total


def _fits(used: int, nbytes: int, capacity: int) -> bool:
    """Whether :func:`_place` copies an item of ``nbytes`` into the mapped region (else it
    is appended past it): the one rule both it and :func:`_unstaged_bytes` follow."""
    return bool(nbytes) and used + nbytes <= capacity


def _place(data: PartItem, buffer: StagingBuffer, fname: str, tail: int) -> tuple[BlobInfo, int]:
    """Record one item's blob; returns it and the new tail.

    Staged tensors are recorded in place; other tensors and byte items are copied into
    the mapped region while it has room; anything else is appended at ``tail`` (past the
    region, into room the buffer was grown by).
    """
    if isinstance(data, io.BytesIO):
        view = data.getbuffer()
        if _fits(buffer.used, view.nbytes, buffer.capacity):
            at, digest = buffer.put_bytes(view)
            return BlobInfo(fname, at, view.nbytes, digest), tail
        buffer.append(view, tail)
        return BlobInfo(fname, tail, view.nbytes, checksum(view)), tail + view.nbytes
    tensor = _tensor_of(data)
    dtype, shape = str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape)
    nbytes = tensor_bytes(tensor)
    offset = buffer.offset_of(tensor)
    if offset is None and _fits(buffer.used, nbytes, buffer.capacity):
        offset, digest = buffer.place_hashed(tensor.contiguous())
        return BlobInfo(fname, offset, nbytes, digest, dtype, shape), tail
    if offset is not None:  # staged: hashed as it was written, or now
        digest = buffer.digest_at(offset, nbytes) or checksum(buffer.memory(offset, nbytes))
        return BlobInfo(fname, offset, nbytes, digest, dtype, shape), tail
    start = align(tail)
    raw = _raw(tensor)
    buffer.append(raw, start)
    return BlobInfo(fname, start, nbytes, checksum(raw), dtype, shape), start + nbytes


def write_rank_part(
    memory: MemoryTier,
    config: CheckpointConfig,
    part: RankPart,
    *,
    install: tuple[bytes, bytes] | None = None,
    started: float | None = None,
    durable: Tier | None = None,
) -> WrittenPart:
    """Write ``part`` into the memory tier: blobs into the buffer, the buffer renamed into
    the step, then the rank manifest. ``install`` is (commit JSON, metadata) of the
    previous step from another node, committed here first; a retention sweep precedes the
    write. ``started`` (``perf_counter``) is when the write began, for the log line.
    ``durable``: the durable tier, when the data file may upload there as it is written
    (see :mod:`tierckpt.staged_upload`)."""
    t0 = time.perf_counter() if started is None else started
    log = logger_for(config)
    ns, step, attempt, rank = config.namespace, part.step, part.attempt, part.rank
    catalog = StepCatalog(memory, ns, log)
    if install:
        install_commit(catalog, *install)
    committed_before = sweep(catalog, config.memory_keep_last, log)
    items = list(part.items)
    buffer, private = part.buffer, part.private
    fname = layout.data_name(attempt, rank)
    blobs: list[BlobInfo] = []
    size = 0
    try:
        # Room for what is not staged in the buffer: planned items staged privately,
        # unstaged tensors (dcp.save) and byte items. Only planned items are stored.
        extra = _unstaged_bytes(items, buffer)
        if buffer is None and items:
            buffer = acquire_buffer(memory, config, attempt, rank, extra)
            log.debug(step_message(rank, step, f"Writing into a staging buffer ({buffer.kind})"))
        elif buffer is not None and extra:
            grow_buffer(memory, config, buffer, extra)
        upload = _staged_upload(config, part, buffer, durable, log)
        if buffer is not None:
            tail = buffer.capacity
            for data in items:
                info, tail = _place(data, buffer, fname, tail)
                blobs.append(info)
            size = tail if tail > buffer.capacity else buffer.used
            if not blobs:
                buffer.abandon("this rank's part has no data")
            buffer.finish(size)
    except BaseException as e:
        if buffer is not None:
            release_buffer(memory, config, buffer, discard=is_full(e))
        raise
    finally:
        if private is not None:
            private.give_back()  # its planned tensors are copied into the buffer
    if buffer is not None:
        if buffer.pin_after_write is not None:
            _pin_in_background(buffer, buffer.pin_after_write)
        buffer.close()
        if blobs:
            target = memory.path(layout.step_key(ns, step, fname))
            crash_point("save.before_rename")
            # Under the budget lock: another rank's budget check never walks the tree while
            # this file moves from .staging/ into its step (MemoryTier.usage_bytes).
            with budget_lock(memory.root, config.memory_budget_bytes is not None):
                in_made_dir(target, functools.partial(os.rename, buffer.path, target))
            crash_point("save.after_rename")
        else:
            release_buffer(memory, config, buffer)
    manifest = rank_manifest(
        rank,
        attempt,
        step,
        part.durable,
        fname if blobs else None,
        size,
        ((i.offset, i.length, i.checksum) for i in blobs),
    )
    memory.write(
        layout.step_key(ns, step, layout.manifest_name(attempt, rank)), [manifest.to_json()]
    )
    crash_point("save.after_manifest")
    log.debug(
        step_message(
            rank,
            step,
            f"In-memory write completed: {len(blobs)} items, {rate(size, time.perf_counter() - t0)}",
        )
    )
    # Until evictions feed the pool (fewer than keep_last steps committed), keep one
    # pre-allocated spare there so the next save also copies into resident pages.
    warming_up = committed_before < config.memory_keep_last
    if config.memory_prefault and buffer is not None and warming_up:
        StagingPool(memory, ns).prefault_spare(buffer.capacity, config.memory_budget_bytes, rank)
    return WrittenPart(manifest, blobs, size, upload if blobs else None)


def _pin_in_background(buffer: StagingBuffer, device: int) -> None:
    """Page-lock ``buffer``'s mapping off the save's path, so a later GPU save that reuses
    the file copies into it directly (the mapping cache keeps it across renames)."""

    def pin() -> None:
        torch.cuda.set_device(device)  # this rank's context, not device 0's
        buffer.pin()

    run_in_background(pin, name="tierckpt-pin", wait_at_exit=False)


def _staged_upload(
    config: CheckpointConfig,
    part: RankPart,
    buffer: StagingBuffer | None,
    durable: Tier | None,
    log: logging.Logger,
) -> StagedUpload | None:
    """The upload following ``buffer`` to this part's durable data file (begun now for a
    buffer acquired at write time); one that cannot serve this part is cancelled."""
    if buffer is None:
        return None
    if not part.durable or durable is None:
        buffer.abandon("the step is not saved to the durable tier")
        return None
    follow_buffer(
        config, durable, buffer, step=part.step, attempt=part.attempt, rank=part.rank, log=log
    )
    upload = buffer.watcher if isinstance(buffer.watcher, StagedUpload) else None
    key = data_key(config, part.step, part.attempt, part.rank)
    if upload is not None and upload.key != key:
        buffer.abandon("it was begun for another attempt or rank")
        return None
    return upload


# -- the memory commit --


def install_commit(catalog: StepCatalog, record_json: bytes, metadata: bytes) -> bool:
    """Commit, in this node's memory tier, a step whose commit was written on another node.

    True when the commit is (now) there; False when none of the step's parts is on this node.
    """
    record = CommitRecord.from_json(record_json, where="the coordinator's commit record")
    existing = catalog.commit(record.step)
    if existing is not None and existing.attempt == record.attempt:
        return True
    if not any(r.manifest in catalog.files(record.step) for r in record.ranks):
        return False  # none of this step's parts were written on this node
    catalog.commit_step(record, metadata, after_metadata="install.after_metadata")
    return True


def last_commit(memory: MemoryTier, namespace: str) -> LastCommit | None:
    """This process's last memory commit of ``namespace`` in ``memory`` (as coordinator)."""
    with RUNTIME.history.lock:
        return RUNTIME.history.last_commit.get((memory.root, namespace))


def _rank_entry(
    step: int, durable: bool, rank: int, attempt: str, blobs: Sequence[BlobInfo]
) -> RankEntry:
    """The commit's entry of one rank's part (its manifest rebuilt, for its checksum)."""
    size = max((info.file_size for info in blobs), default=0)
    fname = layout.data_name(attempt, rank) if blobs else None
    # The rank wrote exactly this manifest: rebuilt here, its checksum goes in the commit.
    manifest = rank_manifest(
        rank, attempt, step, durable, fname, size, ((b.offset, b.length, b.checksum) for b in blobs)
    )
    return RankEntry(
        rank,
        attempt,
        layout.manifest_name(attempt, rank),
        {fname: size} if fname is not None else {},
        manifest_checksum=checksum(manifest.to_json()),
    )


def commit_memory(
    memory: MemoryTier,
    config: CheckpointConfig,
    *,
    step: int,
    attempt: str,
    rank: int,
    generation: int,
    durable: bool,
    parts: Sequence[tuple[str, Sequence[BlobInfo]]],
    metadata: bytes,
    started: float | None = None,
    peers: Peers | None = None,
    publish: Callable[[bytes, bytes], None] | None = None,
) -> CommitRecord:
    """Commit ``step`` in this node's memory tier (metadata, then COMMIT) and sweep.

    ``parts[r]`` is (attempt, blobs) of rank ``r``'s part (blobs carry the file size);
    ``metadata`` is the serialized checkpoint metadata; ``rank`` is the coordinator's;
    ``peers`` says each rank's node, peer service and the replicas made (recorded in the
    commit). ``publish(record JSON, metadata)`` installs the commit on the other nodes first.
    """
    t0 = time.perf_counter() if started is None else started
    log = logger_for(config)
    ns = config.namespace
    ranks = [_rank_entry(step, durable, r, a, blobs) for r, (a, blobs) in enumerate(parts)]
    crash_point("save.before_metadata")
    record = CommitRecord(
        namespace=ns,
        step=step,
        attempt=attempt,
        world_size=len(parts),
        metadata=layout.metadata_name(attempt),
        ranks=ranks,
        durable=durable,
        metadata_checksum=checksum(metadata),
        generation=generation,
        nodes=list(peers.nodes) if peers else [],
        peer_replicas=peers.replicas if peers else 0,
        addresses=[list(a) if a else None for a in peers.addresses] if peers else [],
    )
    if publish is not None:
        publish(record.to_json(), metadata)
    catalog = StepCatalog(memory, ns, log)
    catalog.commit_step(record, metadata, after_metadata="save.after_metadata")
    crash_point("save.after_commit")
    with RUNTIME.history.lock:
        RUNTIME.history.last_commit[(memory.root, ns)] = (
            step,
            attempt,
            record.to_json(),
            metadata,
        )
    log.debug(step_message(rank, step, f"Memory commit written in {time.perf_counter() - t0:.3f}s"))
    sweep(catalog, config.memory_keep_last, log)
    return record
