"""Verified blob bytes from the nearest tier: memory first, then each tier for what is missing.

A blob is a ``(file, offset, length, checksum)`` range of a step's data file. Every blob is
copied out of its tier first and the copy is checked against its xxh3-128 checksum (so what
is verified is what is delivered); a blob that fails in one tier is read from the next, and
one that fails everywhere raises :class:`IntegrityError`: wrong bytes are never returned.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from . import layout
from ._device_copy import SLOTS, PinnedRing
from ._log import step_message
from .constants import READ_THREADS, SPLIT_MIN_BYTES
from .errors import IntegrityError
from .manifest import checksum
from .progress import Progress
from .tiers.base import Buffer, KeyNotFoundError, Tier
from .tiers.memory import MemoryTier

__all__ = ["Blob", "Fetcher"]

_Fetched = tuple[Buffer | None, int, str]
"""A blob as read from a tier: its bytes (None when read straight into its target), their
length and the xxh3-128 of exactly those bytes."""


@dataclass(frozen=True)
class Blob:
    """One range of a step's data file to fetch, and what its bytes must hash to."""

    offset: int
    length: int
    checksum: str
    into: memoryview | None = None
    """Copy a memory-tier blob straight into this (and verify it there) instead of a buffer."""
    name: str = ""
    """What the blob holds, for the error raised when no tier has it."""
    device: torch.Tensor | None = None
    """A GPU target (flat uint8): memory-tier bytes go there through the fetcher's pinned
    ring, verified as they are read; other tiers return a buffer for the caller to copy."""


class Fetcher:
    """Fetches the blobs of one step for one rank, counting bytes per tier into ``counts``."""

    def __init__(
        self,
        namespace: str,
        step: int,
        memory: MemoryTier,
        tiers: list[Tier],
        counts: dict[str, int],
        rank: int,
        log: logging.Logger,
        *,
        threads: int = 1,
    ) -> None:
        self.namespace = namespace
        self.threads = max(1, threads)
        """Reader threads this fetch may use (:func:`read_threads`)."""
        self.step = step
        self.memory = memory
        self.tiers = tiers
        self.counts = counts
        self.rank = rank
        self.log = log
        self._count_lock = threading.Lock()
        self._rings: dict[torch.device, PinnedRing] = {}
        self._rings_lock = threading.Lock()
        self.progress = Progress(log, f"step {step} load (rank {rank})", 0)

    def fetch_all(self, files: dict[str, list[Blob]]) -> dict[str, list[Buffer | None]]:
        """:meth:`fetch_file` for every file, in a pool of reader threads.

        A large file is read by several threads at once, each over a run of its blobs
        (a rank's part is one file): as many as this rank's share of the CPUs allows.
        """
        threads = self.threads
        self.progress.total = sum(b.length for blobs in files.values() for b in blobs)
        work = [
            (fname, group)
            for fname, blobs in files.items()
            for group in split_blobs(blobs, max(1, threads // max(len(files), 1)), SPLIT_MIN_BYTES)
        ]
        with ThreadPoolExecutor(min(threads, len(work)) or 1, "tierckpt-read") as pool:
            loaded = list(
                pool.map(lambda w: self.fetch_file(w[0], [files[w[0]][i] for i in w[1]]), work)
            )
        out: dict[str, list[Buffer | None]] = {f: [None] * len(b) for f, b in files.items()}
        for (fname, group), bufs in zip(work, loaded, strict=True):
            for i, buf in zip(group, bufs, strict=True):
                out[fname][i] = buf
        return out

    def _ring(self, device: torch.device) -> PinnedRing:
        """This fetch's pinned slots feeding ``device`` (made on first use)."""
        with self._rings_lock:
            ring = self._rings.get(device)
            if ring is None:
                ring = self._rings[device] = PinnedRing(device, slots=max(SLOTS, 2 * self.threads))
            return ring

    def finish_device_copies(self) -> None:
        """Wait for every GPU copy queued by this fetch (before the targets are used)."""
        for ring in self._rings.values():
            ring.finish()

    def fetch_file(self, fname: str, blobs: list[Blob]) -> list[Buffer | None]:
        """The verified bytes of each blob of one file (None: copied into its ``into``)."""
        key = layout.step_key(self.namespace, self.step, fname)
        pending = sorted(range(len(blobs)), key=lambda i: blobs[i].offset)
        got: dict[int, Buffer | None] = {}
        reasons: dict[int, list[str]] = defaultdict(list)
        for tier in self.tiers:
            if not pending:
                break
            if tier is self.memory:
                fetched = self._read_memory(key, [blobs[i] for i in pending])
            else:
                fetched = _fetch(tier, key, [blobs[i] for i in pending])
            still: list[int] = []
            corrupt = 0
            for i, res in zip(pending, fetched, strict=True):
                blob = blobs[i]
                if isinstance(res, Exception):
                    reasons[i].append(f"{tier.name}: {type(res).__name__}: {res}")
                    corrupt += not isinstance(res, KeyNotFoundError)
                elif res[1] != blob.length or res[2] != blob.checksum:
                    reasons[i].append(f"{tier.name}: checksum mismatch")
                    corrupt += 1
                else:
                    got[i] = res[0]
                    self._count(tier, blob.length)
                    continue
                still.append(i)
            if still and tier is not self.tiers[-1]:
                # Absent files are routine (a node restarted, a step only in durable);
                # bytes that fail their checksum or cannot be read are worth a warning.
                self.log.log(
                    logging.WARNING if corrupt else logging.DEBUG,
                    step_message(
                        self.rank,
                        self.step,
                        f"{len(still)} of {len(pending)} blobs of {fname} are "
                        f"{'corrupt or unreadable' if corrupt else 'not'} in the {tier.name} tier "
                        f"(first: {reasons[still[0]][-1]}); reading them from the next tier",
                    ),
                )
            pending = still
        if pending:
            blob = blobs[pending[0]]
            raise IntegrityError(
                f"Step {self.step}: no valid copy of {fname} [{blob.offset}:+{blob.length}] "
                f"({blob.name}) in any tier: {'; '.join(reasons[pending[0]])}. "
                "Load an earlier step (TieredStorageReader(config, step=N))."
            )
        return [got[i] for i in range(len(blobs))]

    def _count(self, tier: Tier, nbytes: int) -> None:
        with self._count_lock:
            self.counts[tier.name] = self.counts.get(tier.name, 0) + nbytes
        self.progress.add(nbytes)

    def _read_memory(self, key: str, blobs: list[Blob]) -> list[_Fetched | Exception]:
        """Memory tier: copy each blob out (into its ``into`` when given, else into a
        private buffer) and hash the copy, under a shared flock.

        The lock keeps the staging pool from reusing the file while it is read. A direct
        blob that fails its checksum leaves its target to be overwritten by the next tier's
        verified bytes (or the load raises): wrong bytes are never returned.
        """
        try:
            handle = self.memory.open_shared(key)
        except Exception as e:
            return [e] * len(blobs)
        out: list[_Fetched | Exception] = []
        with handle:
            for blob in blobs:
                try:
                    if blob.device is not None:
                        digest = handle.read_to_device(
                            blob.offset, blob.device, self._ring(blob.device.device)
                        )
                        out.append((None, blob.length, digest))
                    elif blob.into is not None:
                        digest = handle.read_into(blob.offset, blob.into)
                        out.append((None, blob.length, digest))
                    else:
                        buf, digest = handle.read(blob.offset, blob.length)
                        out.append((buf, len(buf), digest))
                except Exception as e:
                    out.append(e)
        return out


def read_threads(local_ranks: int) -> int:
    """Reader threads of one rank: its share of this node's CPUs (the CPUs it may run on,
    divided among the node's ``local_ranks`` processes), at most READ_THREADS."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(READ_THREADS, cpus // max(local_ranks, 1)))


def split_blobs(blobs: list[Blob], parts: int, min_bytes: int = SPLIT_MIN_BYTES) -> list[list[int]]:
    """Indices of ``blobs`` in up to ``parts`` runs of neighbouring blobs (by offset) of
    about equal bytes, none under ``min_bytes`` unless it is the only one."""
    order = sorted(range(len(blobs)), key=lambda i: blobs[i].offset)
    total = sum(b.length for b in blobs)
    parts = max(1, min(parts, len(blobs), total // max(min_bytes, 1)))
    if parts == 1:
        return [order] if order else []
    share = total / parts
    runs: list[list[int]] = [[]]
    filled = 0
    for i in order:
        if runs[-1] and filled >= share * len(runs) and len(runs) < parts:
            runs.append([])
        runs[-1].append(i)
        filled += blobs[i].length
    return runs


def _fetch(tier: Tier, key: str, blobs: list[Blob]) -> list[_Fetched | Exception]:
    """Bytes of each blob from a tier other than memory (an exception for a failed one)."""
    fetch_into = getattr(tier, "fetch_into", None)
    if fetch_into is not None:  # peers: received straight into the targets, then hashed
        out: list[_Fetched | Exception] = fetch_into(
            key, [(b.offset, b.length, b.into) for b in blobs]
        )
        return out
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


def _attempt(fn: Callable[..., Buffer], *args: Any) -> Buffer | Exception:
    try:
        return fn(*args)
    except Exception as e:
        return e
