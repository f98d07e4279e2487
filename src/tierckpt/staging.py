"""One-copy staging: tensors are copied once, straight into an mmap'd memory-tier file.

A rank's staging buffer becomes that rank's data file of the step when it is written
(a rename, no copy). Data files of evicted steps return to a per-namespace pool and are
reused by later saves, so their pages are already resident: copies run at memcpy speed
instead of page-fault speed (see DESIGN "Measured on these machines").

Safety rules: a staging file or a pre-faulted spare is abandoned only when its lease is not
live (never judged by pid or mtime); a pooled file is claimed only under an exclusive
non-blocking flock, so a file a reader holds (shared flock) is never reused; with a memory
budget, the check and the allocation run under one node-wide lock per memory root; a full
tmpfs is a :class:`TierFullError` and the failed buffer is deleted, not pooled.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import mmap
import os
import re
import secrets
import threading
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Protocol

import torch
import xxhash

from . import _hostpin
from .constants import ALIGN, HASH_CHUNK, HASH_WHILE_STAGING, ORPHANS_POOLED, TOUCH_CHUNK
from .errors import TierFullError
from .leases import AttemptLease, is_live, lease_name, node_lock, sweep_leases
from .priority import background_priority
from .tiers.memory import MemoryTier

__all__ = [
    "ALIGN",
    "PrivateBuffer",
    "StagingBuffer",
    "StageWatcher",
    "StagingPool",
    "budget_lock",
    "is_full",
    "pwrite_all",
    "release_deleted_mappings",
    "tensor_bytes",
]

_POOL_DIR = ".pool"
_STAGING_DIR = ".staging"
_BUDGET_LOCK = ".budget.lock"
"""Under the memory root: held while a rank checks the budget and allocates (node-wide)."""
_FILLING = ".filling-"
_SPARE = ".spare"
"""Suffix of a pooled file no save has written yet (a spare: its pages hold zeros, or, for one
whose fill a save stopped, are partly unallocated)."""


_FILLS: dict[tuple[str, int], tuple[threading.Thread, threading.Event]] = {}
"""This process's spare fills in progress, by (pool directory, rank); a fill removes its
own entry when it ends, a save that stops it removes it first."""
_FILLS_LOCK = threading.Lock()


def _is_spare(path: str | None) -> bool:
    """True for a new file (``None``: nothing claimed) or a spare: its pages are unwritten."""
    return path is None or path.endswith(_SPARE)


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def is_full(error: BaseException) -> bool:
    """True for a full tier: a :class:`TierFullError` or an ENOSPC / EDQUOT ``OSError``."""
    return isinstance(error, TierFullError) or (
        isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
    )


def _full(path: str, nbytes: int, error: OSError) -> TierFullError:
    full = TierFullError(
        f"The memory tier at {os.path.dirname(path)} has no room for {nbytes} more bytes of a "
        "staging buffer: free tmpfs space, lower memory_keep_last or set memory_budget."
    )
    full.__cause__ = error
    return full


class StageWatcher(Protocol):
    """Follows a buffer as it fills (:class:`tierckpt.staged_upload.StagedUpload`)."""

    def staged(self, upto: int) -> None:
        """Bytes ``[0, upto)`` are written."""

    def finish(self, size: int) -> None:
        """The file is complete at ``size`` bytes."""

    def cancel(self, reason: str) -> None:
        """The buffer will not become a committed data file."""


class StagingBuffer:
    """A bump allocator over one mmap'd memory-tier file.

    ``fd`` (optional) is an open, exclusively flocked descriptor of ``path`` that the
    buffer takes over; the lock is dropped by :meth:`close`.
    """

    def __init__(
        self, path: str, capacity: int, fd: int | None = None, *, unwritten: bool = False
    ) -> None:
        self.path = path
        self.capacity = capacity
        self.used = 0
        self._fd = os.open(path, os.O_RDWR) if fd is None else fd
        self._digests: dict[int, tuple[int, str]] = {}
        try:
            self.reused_bytes = os.fstat(self._fd).st_size
            # Allocate the blocks now: a full tmpfs then fails here with ENOSPC instead of
            # killing the process with SIGBUS on a later write through the mapping.
            # Files made here are always fully allocated, so a reused one that covers the
            # capacity needs no second pass over its pages.
            fresh = unwritten or self.reused_bytes == 0
            if capacity > self.reused_bytes or unwritten:  # a spare may be partly allocated
                os.posix_fallocate(self._fd, 0, capacity)
            self.file_size = os.fstat(self._fd).st_size
            hits = _MAPPINGS.hits
            # A new file or a spare is filled with write(): tmpfs then skips zeroing the
            # pages it allocates and there is no fault per 4 KiB page (about 2x faster here
            # than copying through a fresh mapping). Written pages are
            # mapped with MAP_POPULATE and copied into at memcpy speed.
            self.by_syscall = fresh and capacity > 0
            self._mmap = (
                _MAPPINGS.get(self._fd, capacity, populate=not self.by_syscall)
                if capacity
                else None
            )
        except BaseException as e:
            os.close(self._fd)
            if isinstance(e, OSError) and is_full(e):
                raise _full(path, capacity, e) from e
            raise
        self.kind = (
            "reused mapping"
            if _MAPPINGS.hits > hits
            else ("new pages, written" if self.by_syscall else "pooled file")
        )
        self._base = _address(self._mmap) if self._mmap is not None else 0
        self._flat: torch.Tensor | None = None
        self.pin_after_write: int | None = None
        """The CUDA device whose save staged privately: page-lock the mapping once the
        write is done (in that device's context)."""
        self._pinned = False
        self.watcher: StageWatcher | None = None
        """Told how far the bytes are written (copies run in allocation order)."""
        self._gpu_queued = False

    def digest_at(self, offset: int, nbytes: int) -> str | None:
        """The xxh3-128 recorded when ``nbytes`` were written at ``offset`` (None if not)."""
        known = self._digests.get(offset)
        return known[1] if known is not None and known[0] == nbytes else None

    def _write_hashed(self, raw: memoryview, offset: int, chunk: int = HASH_CHUNK) -> str:
        """write() ``raw`` at ``offset`` chunk by chunk, hashing each chunk while in cache."""
        hasher = xxhash.xxh3_128()
        for start in range(0, raw.nbytes, chunk):
            part = raw[start : start + chunk]
            pwrite_all(self._fd, part, offset + start)
            hasher.update(part)
            self._report(offset + start + part.nbytes)
        digest = hasher.hexdigest()
        self._digests[offset] = (raw.nbytes, digest)
        return digest

    def alloc(self, nbytes: int) -> int:
        """Reserve ``nbytes`` (aligned) in the mapped region; returns the offset."""
        offset = self.used
        if offset + nbytes > self.capacity:
            raise ValueError("staging buffer overflow")
        self.used = align(offset + nbytes)
        return offset

    def view(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor over bytes of the mapped region."""
        numel = 1
        for d in shape:
            numel *= d
        if numel == 0 or self._mmap is None:
            return torch.empty(shape, dtype=dtype)
        if self._flat is None:  # one tensor over the mapping; each view is a slice of it
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._flat = torch.frombuffer(self._mmap, dtype=torch.uint8)
        return self._flat[offset : offset + numel * dtype.itemsize].view(dtype).view(shape)

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` into the buffer (its one copy); returns the staged view.

        CUDA tensors are copied asynchronously when the buffer is pinned; the caller
        synchronises the stream before the staged values are read.
        """
        if tensor.device.type == "cpu" and tensor.is_contiguous() and HASH_WHILE_STAGING:
            # Hashed chunk by chunk as it is copied (in cache): the write that follows in
            # the background needs no second pass over the bytes.
            offset, _ = self.place_hashed(tensor)
            return self.view(offset, tensor.dtype, tuple(tensor.shape))
        offset = self.alloc(tensor_bytes(tensor))
        staged = self.view(offset, tensor.dtype, tuple(tensor.shape))
        if not staged.numel():
            return staged
        if self.by_syscall and tensor.device.type == "cpu":
            self._write_hashed(_raw_bytes(tensor), offset)
        else:
            queued = self._pinned and tensor.is_cuda
            staged.copy_(tensor, non_blocking=queued)
            self._gpu_queued |= queued
            self._report(self.used)
        return staged

    def place_hashed(self, tensor: torch.Tensor, chunk: int = HASH_CHUNK) -> tuple[int, str]:
        """Copy a CPU tensor in and checksum it in one pass; (offset, xxh3-128 digest).

        Each chunk is hashed right after it is copied, while it is still in cache.
        """
        nbytes = tensor_bytes(tensor)
        offset = self.alloc(nbytes)
        if self.by_syscall and nbytes:
            return offset, self._write_hashed(_raw_bytes(tensor), offset, chunk)
        staged = self.view(offset, tensor.dtype, tuple(tensor.shape)).reshape(-1)
        source = tensor.reshape(-1)
        raw = self.memory(offset, nbytes)
        hasher = xxhash.xxh3_128()
        step = max(chunk // max(tensor.element_size(), 1), 1)
        for start in range(0, staged.numel(), step):
            staged[start : start + step].copy_(source[start : start + step])
            hasher.update(
                raw[start * tensor.element_size() : (start + step) * tensor.element_size()]
            )
            self._report(offset + min(start + step, staged.numel()) * tensor.element_size())
        digest = hasher.hexdigest()
        self._digests[offset] = (nbytes, digest)
        return offset, digest

    def offset_of(self, tensor: torch.Tensor) -> int | None:
        """The offset of ``tensor`` if it is a contiguous view inside the mapped region."""
        if self._mmap is None or not tensor.is_contiguous() or tensor.device.type != "cpu":
            return None
        ptr = tensor.data_ptr()
        end = ptr + tensor_bytes(tensor)
        if self._base <= ptr and end <= self._base + self.capacity and tensor.numel():
            return ptr - self._base
        return None

    def memory(self, offset: int, nbytes: int) -> memoryview:
        """A read-only view of mapped bytes."""
        if not nbytes:
            return memoryview(b"")
        assert self._mmap is not None
        return memoryview(self._mmap)[offset : offset + nbytes]

    def put_bytes(self, data: memoryview | bytes) -> tuple[int, str]:
        """Copy bytes into the mapped region; (offset, xxh3-128 of the bytes as stored)."""
        view = memoryview(data).cast("B")
        offset = self.alloc(view.nbytes)
        if view.nbytes and self.by_syscall:
            return offset, self._write_hashed(view, offset)
        if view.nbytes:
            assert self._mmap is not None
            self._mmap[offset : offset + view.nbytes] = view
            self._report(self.used)
        return offset, xxhash.xxh3_128_hexdigest(self.memory(offset, view.nbytes))

    def _report(self, upto: int) -> None:
        """Tell the watcher ``[0, upto)`` is written, unless a GPU copy may still be running."""
        if self.watcher is not None and not self._gpu_queued:
            self.watcher.staged(upto)

    def gpu_copies_done(self) -> None:
        """The GPU copies queued into the buffer have landed (their stream is synchronised)."""
        self._gpu_queued = False
        self._report(self.used)

    def extend(self, extra: int) -> None:
        """Allocate ``extra`` bytes past the file's end for :meth:`append` (not mapped)."""
        if extra <= 0:
            return
        try:
            os.posix_fallocate(self._fd, self.file_size, extra)
        except OSError as e:
            if is_full(e):
                raise _full(self.path, extra, e) from e
            raise
        self.file_size += extra

    def append(self, data: memoryview | bytes, at: int) -> None:
        """Write bytes past the mapped region (extra items found at write time)."""
        view = memoryview(data).cast("B")
        try:
            while view:
                n = os.pwrite(self._fd, view, at)
                view, at = view[n:], at + n
        except OSError as e:
            if is_full(e):
                raise _full(self.path, view.nbytes, e) from e
            raise

    def finish(self, size: int) -> None:
        """Trim the file to ``size`` bytes (the mapping stays valid for staged views); its
        watcher is told the file is complete."""
        if size < os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, max(size, 0))
        if self.watcher is not None:
            self.watcher.finish(size)

    def abandon(self, reason: str) -> None:
        """This buffer will not become a committed data file: its watcher stops."""
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.cancel(reason)

    def gpu_ready(self) -> bool:
        """True when GPU copies can land in the mapping asynchronously (it is page-locked)."""
        return self._mmap is not None and _MAPPINGS.is_pinned(self._mmap)

    def pin(self) -> None:
        """Page-lock the mapped region for asynchronous GPU-to-host copies (CUDA only).

        Once per mapping: a reused mapping stays registered across saves.
        """
        if self._mmap is None or self._pinned:
            return
        self._pinned = _MAPPINGS.pin(self._mmap)

    def close(self) -> None:
        """Drop the claim and the file descriptor; the mapping lives while staged tensors
        reference it (it holds a duplicate of the descriptor, hence the explicit unlock)."""
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        with contextlib.suppress(OSError):
            os.close(self._fd)
        self._fd = -1


class _MappingCache:
    """This process's mappings of staging files, kept across saves.

    A new mapping of resident tmpfs pages still pays a minor fault per 4 KiB page
    (~2.5 GB/s here); reusing the mapping a file had in an earlier save copies at
    memcpy speed. Entries are keyed by inode and dropped once their file is deleted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int], tuple[int, mmap.mmap]] = {}
        self._unpopulated: set[tuple[int, int]] = set()
        self._pinned: dict[int, int] = {}
        """Page-locked mappings: ``id(mapping)`` -> its address (unregistered before unmap)."""
        self.hits = 0

    def get(self, fd: int, capacity: int, *, populate: bool = True) -> mmap.mmap:
        """A mapping of ``fd`` of ``capacity`` bytes: this process's earlier one when it has
        one (a hit), else a new one, its page tables filled when ``populate``.

        A mapping made without ``populate`` (its file was then filled with write()) has no
        page tables yet; the first later ``populate`` request maps the file anew with
        MAP_POPULATE (about 9 GB/s for resident pages here, vs a minor fault per page).
        """
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            self.prune()
            entry = self._entries.get(key)
            stale = populate and key in self._unpopulated
            if entry is not None and len(entry[1]) == capacity and not stale:
                self.hits += 1
                return entry[1]
            if entry is not None:
                self._drop(key)
            flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
            mm = mmap.mmap(fd, capacity, flags=flags)
            self._entries[key] = (os.dup(fd), mm)
            if not populate:
                self._unpopulated.add(key)
            return mm

    def is_pinned(self, mm: mmap.mmap) -> bool:
        """True when ``mm`` is page-locked."""
        with self._lock:
            return id(mm) in self._pinned

    def pin(self, mm: mmap.mmap) -> bool:
        """Page-lock ``mm`` (one of this cache's mappings) once; True when it is locked."""
        with self._lock:
            if id(mm) in self._pinned:
                return True
            key = next((k for k, entry in self._entries.items() if entry[1] is mm), None)
            if key is None:
                return False  # dropped meanwhile: never lock what is about to be unmapped
            base = _address(mm)
            if not _hostpin.register(base, len(mm)):
                return False
            self._pinned[id(mm)] = base
            self._unpopulated.discard(key)  # locking faulted every page in: keep this mapping
            return True

    def holds(self, path: str) -> bool:
        """True when this process has a mapping of the file at ``path``."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in self._entries

    def prune(self) -> None:
        """Unmap files that have been deleted, so their tmpfs pages are freed (lock held)."""
        for key, (fd, _mm) in list(self._entries.items()):
            try:
                gone = os.fstat(fd).st_nlink == 0
            except OSError:
                gone = True
            if gone:
                self._drop(key)

    def _drop(self, key: tuple[int, int]) -> None:
        self._unpopulated.discard(key)
        fd, mm = self._entries.pop(key)
        base = self._pinned.pop(id(mm), None)
        if base is not None:
            _hostpin.unregister(base)
        with contextlib.suppress(BufferError, ValueError):
            mm.close()  # fails while staged tensors still view it; then GC unmaps it
        with contextlib.suppress(OSError):
            os.close(fd)


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
_MAPPINGS = _MappingCache()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor (made contiguous) as a flat memoryview, any dtype."""
    flat: Any = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return memoryview(flat)


def _address(mm: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


@contextlib.contextmanager
def budget_lock(root: str, enabled: bool = True) -> Iterator[None]:
    """Hold the node-wide budget lock of the memory root ``root`` (a no-op if not enabled).

    Every rank of a node checks the budget and allocates under it, so their allocations
    together never exceed the budget.
    """
    if not enabled:
        yield
        return
    with node_lock(os.path.join(root, _BUDGET_LOCK)):
        yield


def _lock_exclusive(path: str) -> int | None:
    """An O_RDWR descriptor of ``path`` under an exclusive flock, or None when the file is
    gone or someone (a reader, another claim) holds a lock on it."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


_STAGING_NAME = re.compile(r"^([0-9a-f]{12})-r(\d+)-p\d+$")
"""``<attempt>-r<rank>-p<pid>``: a staging buffer of one rank's part of one save attempt."""


class StagingPool:
    """Per-namespace reserve of resident data files in the memory tier."""

    def __init__(self, memory: MemoryTier, namespace: str) -> None:
        self.memory = memory
        self.namespace = namespace
        self.ns_dir = os.path.join(memory.root, namespace)
        self.pool_dir = os.path.join(self.ns_dir, _POOL_DIR)
        self.staging_dir = os.path.join(self.ns_dir, _STAGING_DIR)

    def acquire(
        self,
        nbytes: int,
        name: str,
        make_room: Callable[[int], None] | None = None,
        *,
        rank: int = 0,
    ) -> StagingBuffer:
        """A buffer of ``nbytes``: a pooled file if one fits, else a new file.

        ``name`` is ``<attempt>-r<rank>``, whose lease the caller holds. ``make_room(extra)``
        is called after the claim and before any allocation, with the bytes the buffer will
        add to the tier (a claimed file already counts in its usage); the call and the
        allocation run under the node's :func:`budget_lock`. If either fails, the claim is
        undone (the file is deleted instead when the tier is full).
        """
        self._stop_fill(rank)  # a spare being filled for this rank is taken as it is
        os.makedirs(self.staging_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.staging_dir, f"{name}-p{os.getpid()}")
        with budget_lock(self.memory.root, make_room is not None):
            fd, claimed = self._claim(nbytes, rank, path)
            try:
                existing = os.fstat(fd).st_size
                if existing > nbytes:
                    os.ftruncate(fd, nbytes)  # give back what this save does not need
                    existing = nbytes
                if make_room is not None:
                    make_room(nbytes - existing)
            except BaseException as e:
                os.close(fd)
                self._undo(path, claimed, e)
                raise
            try:  # closes fd if it fails
                return StagingBuffer(path, nbytes, fd=fd, unwritten=_is_spare(claimed))
            except BaseException as e:
                self._undo(path, claimed, e)
                raise

    def grow(
        self, buffer: StagingBuffer, extra: int, make_room: Callable[[int], None] | None = None
    ) -> None:
        """Allocate ``extra`` more bytes at the end of ``buffer``, within the budget."""
        with budget_lock(self.memory.root, make_room is not None):
            if make_room is not None:
                make_room(extra)
            buffer.extend(extra)

    def _claim(self, nbytes: int, rank: int, path: str) -> tuple[int, str | None]:
        """Move a pooled file (or a new one) to ``path``; its locked descriptor and old path.

        A pooled file is claimed only under an exclusive non-blocking flock: one a reader
        holds (shared flock) is skipped, so a load never sees its bytes reused.
        """
        for candidate in self._candidates(nbytes, rank):
            fd = _lock_exclusive(candidate)
            if fd is None:
                continue
            try:
                os.rename(candidate, path)  # atomic claim; another rank may have won
            except FileNotFoundError:
                os.close(fd)
                continue
            return fd, candidate
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd, None

    def _undo(self, path: str, claimed: str | None, error: BaseException) -> None:
        with contextlib.suppress(OSError):
            if claimed is not None and not is_full(error):
                os.rename(path, claimed)
            else:
                os.remove(path)

    def _candidates(self, nbytes: int, rank: int) -> list[str]:
        """Pooled files, best fit first: the smallest that holds ``nbytes``, then the largest.

        Files this process has mapped before come first (their mapping is reused), then this
        rank's own files (the pool is shared by the ranks of a node), then any other.
        """
        files = self._pooled()
        own = f"r{rank}-"
        fits = sorted(
            (not _MAPPINGS.holds(p), not os.path.basename(p).startswith(own), s, p)
            for p, s in files.items()
            if s >= nbytes
        )
        short = sorted(((s, p) for p, s in files.items() if s < nbytes), reverse=True)
        return [p for *_, p in fits] + [p for _, p in short]

    def _pooled(self, *, filling: bool = False) -> dict[str, int]:
        """Pooled files and sizes; spares still being allocated only when ``filling``."""
        out = {}
        with contextlib.suppress(FileNotFoundError), os.scandir(self.pool_dir) as it:
            for e in it:
                if e.name.startswith(".") != filling:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    out[e.path] = e.stat().st_size
        return out

    def claim_into(self, nbytes: int, dest: str, *, leave: int = 1) -> bool:
        """Move a pooled file of at least ``nbytes`` (the smallest such) to ``dest``, under
        its exclusive lock (a file a reader holds is skipped), leaving ``leave`` pooled files
        for this node's next saves; False when none is taken."""
        files = self._pooled()
        if len(files) <= leave:
            return False
        for candidate in sorted(
            (p for p, s in files.items() if s >= nbytes), key=lambda p: files[p]
        ):
            fd = _lock_exclusive(candidate)
            if fd is None:
                continue
            try:
                os.rename(candidate, dest)
            except FileNotFoundError:
                continue
            finally:
                os.close(fd)
            return True
        return False

    def recycle(self, path: str, keep: int) -> bool:
        """Move a data file of an evicted step into the pool if it holds fewer than ``keep``."""
        if len(self._pooled()) >= keep:
            return False
        os.makedirs(self.pool_dir, mode=0o700, exist_ok=True)
        try:
            os.rename(
                path, os.path.join(self.pool_dir, f"{_rank_tag(path)}{secrets.token_hex(8)}.buf")
            )
        except FileNotFoundError:
            return False
        return True

    def drop(self, nbytes: int) -> int:
        """Delete pooled files until ``nbytes`` are freed (for the budget); bytes freed.

        Files a reader holds are kept: deleting them would free nothing until it is done.
        """
        freed = 0
        for path, size in sorted(self._pooled().items(), key=lambda kv: kv[1]):
            if freed >= nbytes:
                break
            fd = _lock_exclusive(path)
            if fd is None:
                continue
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    freed += size
            finally:
                os.close(fd)
        return freed

    def prefault_spare(
        self, nbytes: int, budget: int | None, rank: int = 0
    ) -> threading.Thread | None:
        """In the background, add one pre-faulted file of ``nbytes`` for ``rank`` if none fits.

        The spare's pages are written (zeros) at a bounded rate, so the save that claims it
        writes resident pages: a page's first touch is the cost of a fresh buffer (about
        2 s per GiB on these VMs, see DESIGN "Measured on these machines"), paid here instead
        of in the save. A save of this process that needs a buffer while the fill runs stops
        it and takes the spare as far as it got (:meth:`acquire`).

        The spare is named ``.filling-r<rank>-<token>`` while it is filled and holds a
        lease of the same name; the budget check and the size run under the node lock.
        """
        own = f"r{rank}-"
        pooled = self._pooled()
        if nbytes <= 0 or any(
            s >= nbytes and os.path.basename(p).startswith(own) for p, s in pooled.items()
        ):
            return None
        with _FILLS_LOCK:
            running = _FILLS.get((self.pool_dir, rank))
        if (running is not None and running[0].is_alive()) or any(
            os.path.basename(p).startswith(f"{_FILLING}{own}") for p in self._pooled(filling=True)
        ):
            return None  # one spare per rank at a time
        if budget is not None and self.memory.usage_bytes() + nbytes > budget:
            return None
        stop = threading.Event()

        def fill() -> None:
            background_priority()  # the cores training leaves idle
            # Never re-create a namespace removed meanwhile (clear-memory, a finished test):
            # only the pool directory itself is made, inside a namespace that still exists.
            try:
                os.mkdir(self.pool_dir, 0o700)
            except FileExistsError:
                pass
            except FileNotFoundError:
                return
            name = f"{_FILLING}{own}{secrets.token_hex(8)}"
            tmp = os.path.join(self.pool_dir, name)
            try:  # the lease before the file: a sweep never sees the spare unleased
                lease = AttemptLease(self.ns_dir, name, create=False)
            except OSError:
                return
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    with budget_lock(self.memory.root, budget is not None):
                        if budget is not None and self.memory.usage_bytes() + nbytes > budget:
                            raise TierFullError("no room in the budget for a spare")
                        os.ftruncate(fd, nbytes)  # counted in the usage from now on
                    _touch_gently(fd, nbytes, stop)  # ENOSPC here, never SIGBUS later
                finally:
                    os.close(fd)
                # As far as it got (stopped by a save): the claimer allocates the rest and
                # fills the file with write(), which suits touched and untouched pages alike.
                os.rename(tmp, os.path.join(self.pool_dir, f"{own}{secrets.token_hex(8)}{_SPARE}"))
            except (OSError, TierFullError):
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            finally:
                lease.release()

        key = (self.pool_dir, rank)

        def run() -> None:
            try:
                fill()
            finally:  # a finished fill leaves no entry behind
                with _FILLS_LOCK:
                    if _FILLS.get(key, (None,))[0] is threading.current_thread():
                        del _FILLS[key]

        thread = threading.Thread(target=run, name="tierckpt-prefault", daemon=True)
        with _FILLS_LOCK:
            _FILLS[key] = (thread, stop)
        thread.start()
        return thread

    def _stop_fill(self, rank: int) -> None:
        """Stop this process's spare fill for ``rank``, if one runs, and wait for its file."""
        with _FILLS_LOCK:
            entry = _FILLS.pop((self.pool_dir, rank), None)
        if entry is not None and entry[0].is_alive():
            entry[1].set()
            entry[0].join()

    def sweep_orphans(self) -> None:
        """Reclaim staging files and spares whose writers are gone (their lease is not live).

        Liveness is the writer's lease, never its pid (pids are reused and namespaced) nor a
        file's age; names tierckpt does not recognise are left alone.
        """
        with contextlib.suppress(FileNotFoundError), os.scandir(self.staging_dir) as it:
            for e in it:
                m = _STAGING_NAME.match(e.name)
                if m is None or is_live(self.ns_dir, lease_name(m.group(1), int(m.group(2)))):
                    continue
                if not self.recycle(e.path, keep=ORPHANS_POOLED):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(e.path)
        with contextlib.suppress(FileNotFoundError), os.scandir(self.pool_dir) as it:
            for e in it:
                if e.name.startswith(_FILLING) and not is_live(self.ns_dir, e.name):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(e.path)
        sweep_leases(self.ns_dir)  # leases of writers that finished or died


_RANK_OF_DATA = re.compile(r"-r(\d+)(?:\.data)?(?:-p\d+)?$")


def _rank_tag(path: str) -> str:
    """``r<rank>-`` for a data file of that rank, else empty."""
    m = _RANK_OF_DATA.search(os.path.basename(path))
    return f"r{m.group(1)}-" if m else ""


def pwrite_all(fd: int, data: memoryview, pos: int) -> None:
    """Write all of ``data`` at ``pos`` (``pwrite`` may write less than asked)."""
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:], pos + done)


@functools.cache
def _zeros() -> bytes:
    """One chunk of zeros, made on the first fill (not at import in every process)."""
    return bytes(TOUCH_CHUNK)


def _touch_gently(fd: int, nbytes: int, stop: threading.Event) -> None:
    """Allocate and write (zeros) ``nbytes`` of tmpfs pages chunk by chunk, idle as long as
    each chunk took, until done or ``stop`` is set.

    A spare is filled while training (and often the next save) runs, at the lowest CPU
    priority: at most half of one core goes to it, and the page allocator is left to the
    foreground half the time.
    """
    import time

    for start in range(0, nbytes, TOUCH_CHUNK):
        if stop.is_set():
            return
        t0 = time.perf_counter()
        length = min(TOUCH_CHUNK, nbytes - start)
        os.posix_fallocate(fd, start, length)
        pwrite_all(fd, memoryview(_zeros())[:length], start)
        stop.wait(time.perf_counter() - t0)


def release_deleted_mappings() -> None:
    """Unmap this process's staging mappings of deleted files, so their tmpfs pages are freed."""
    with _MAPPINGS._lock:
        _MAPPINGS.prune()


class PrivateBuffer:
    """A bump allocator over a process-private CPU buffer (anonymous memory; pinned for
    CUDA sources), reused across saves.

    It stages what this rank may not write itself (replicated tensors of a multi-rank job,
    which DCP's plan gives to one rank): only the planned ones are then copied into the
    memory tier. Give it back with :meth:`give_back` once those copies are done.
    """

    _free: ClassVar[list[torch.Tensor]] = []
    _lock: ClassVar[threading.Lock] = threading.Lock()
    _KEEP: ClassVar[int] = 2

    def __init__(self, nbytes: int, *, pinned: bool = False) -> None:
        self.storage = self._take(nbytes, pinned)
        self.capacity = nbytes
        self.used = 0
        self.pinned = pinned

    @classmethod
    def _take(cls, nbytes: int, pinned: bool) -> torch.Tensor:
        with cls._lock:
            fits = [t for t in cls._free if t.numel() >= nbytes and t.is_pinned() == pinned]
            if fits:
                best = min(fits, key=lambda t: t.numel())
                cls._free.remove(best)
                return best
        return torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=pinned)

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` in (its one copy); returns the staged CPU view."""
        nbytes = tensor_bytes(tensor)
        offset = self.used
        if offset + nbytes > self.capacity:
            raise ValueError("private staging buffer overflow")
        self.used = align(offset + nbytes)
        if nbytes == 0:
            return torch.empty(tensor.shape, dtype=tensor.dtype)
        staged = self.storage[offset : offset + nbytes].view(tensor.dtype).view(tensor.shape)
        staged.copy_(tensor, non_blocking=self.pinned and tensor.is_cuda)
        return staged

    def give_back(self) -> None:
        """Return the memory for reuse by a later save (keeps the largest few)."""
        storage, self.storage = self.storage, torch.empty(0, dtype=torch.uint8)
        if storage.numel() == 0:
            return
        with self._lock:
            self._free.append(storage)
            self._free.sort(key=lambda t: t.numel(), reverse=True)
            del self._free[self._KEEP :]
