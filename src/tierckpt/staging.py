"""One-copy staging: tensors are copied once, straight into an mmap'd memory-tier file.

A rank's staging buffer becomes that rank's data file of the step when it is written
(a rename, no copy). Data files of evicted steps return to a per-namespace pool and are
reused by later saves, so their pages are already resident: copies run at memcpy speed
instead of page-fault speed (see DESIGN "Measured on these machines").
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import re
import secrets
import threading
from collections.abc import Callable

import torch
import xxhash

from .errors import TierFullError
from .tiers.memory import MemoryTier

__all__ = ["ALIGN", "StagingBuffer", "StagingPool", "release_deleted_mappings", "tensor_bytes"]

ALIGN = 64
"""Byte alignment of each blob in a data file."""
_POOL_DIR = ".pool"
_STAGING_DIR = ".staging"


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class StagingBuffer:
    """A bump allocator over one mmap'd memory-tier file."""

    def __init__(self, path: str, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self.used = 0
        self._fd = os.open(path, os.O_RDWR)
        self.reused_bytes = os.fstat(self._fd).st_size
        try:
            # Allocate the blocks now: a full tmpfs then fails here with ENOSPC instead of
            # killing the process with SIGBUS on a later write through the mapping.
            # Files made here are always fully allocated, so a reused one that covers the
            # capacity needs no second pass over its pages.
            if capacity > self.reused_bytes:
                os.posix_fallocate(self._fd, 0, capacity)
        except OSError as e:
            os.close(self._fd)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierFullError(
                    f"The memory tier at {os.path.dirname(path)} has no room for a {capacity}-byte "
                    "staging buffer: free tmpfs space, lower memory_keep_last or set memory_budget."
                ) from e
            raise
        hits = _MAPPINGS.hits
        self._mmap = _MAPPINGS.get(self._fd, capacity) if capacity else None
        self.kind = (
            "reused mapping"
            if _MAPPINGS.hits > hits
            else ("pooled file" if self.reused_bytes >= capacity else "new pages")
        )
        self._base = _address(self._mmap) if self._mmap is not None else 0
        self._pinned = False

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
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._mmap, dtype=dtype, count=numel, offset=offset)
        return flat.view(shape)

    def place(self, tensor: torch.Tensor) -> torch.Tensor:
        """Copy ``tensor`` into the buffer (its one copy); returns the staged view.

        CUDA tensors are copied asynchronously when the buffer is pinned; the caller
        synchronises the stream before the staged values are read.
        """
        offset = self.alloc(tensor_bytes(tensor))
        staged = self.view(offset, tensor.dtype, tuple(tensor.shape))
        if staged.numel():
            staged.copy_(tensor, non_blocking=self._pinned and tensor.is_cuda)
        return staged

    def place_hashed(self, tensor: torch.Tensor, chunk: int = 4 << 20) -> tuple[int, str]:
        """Copy a CPU tensor in and checksum it in one pass; (offset, xxh3-128 digest).

        Each chunk is hashed right after it is copied, while it is still in cache.
        """
        nbytes = tensor_bytes(tensor)
        offset = self.alloc(nbytes)
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
        return offset, hasher.hexdigest()

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
        assert self._mmap is not None
        return memoryview(self._mmap)[offset : offset + nbytes]

    def append(self, data: memoryview | bytes, at: int) -> None:
        """Write bytes past the mapped region (extra items found at write time)."""
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self._fd, view, at)
            view, at = view[n:], at + n

    def finish(self, size: int) -> None:
        """Trim the file to ``size`` bytes; the mapping stays valid for staged views."""
        if size < os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, max(size, 0))

    def pin(self) -> None:
        """Page-lock the mapped region for asynchronous GPU-to-host copies (CUDA only)."""
        if self._mmap is None or self._pinned:
            return
        import weakref

        cudart = torch.cuda.cudart()
        if int(cudart.cudaHostRegister(self._base, self.capacity, 0)) == 0:
            self._pinned = True
            weakref.finalize(self._mmap, cudart.cudaHostUnregister, self._base)

    def close(self) -> None:
        """Drop the file descriptor; the mapping lives while staged tensors reference it."""
        with contextlib.suppress(OSError):
            os.close(self._fd)


class _MappingCache:
    """This process's mappings of staging files, kept across saves.

    A new mapping of resident tmpfs pages still pays a minor fault per 4 KiB page
    (~2.5 GB/s here); reusing the mapping a file had in an earlier save copies at
    memcpy speed. Entries are keyed by inode and dropped once their file is deleted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[tuple[int, int], tuple[int, mmap.mmap]] = {}
        self.hits = 0

    def get(self, fd: int, capacity: int, *, populate: bool = True) -> mmap.mmap:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._lock:
            self.prune()
            entry = self._entries.get(key)
            if entry is not None and len(entry[1]) == capacity:
                self.hits += 1
                return entry[1]
            if entry is not None:
                self._drop(key)
            flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
            mm = mmap.mmap(fd, capacity, flags=flags)
            self._entries[key] = (os.dup(fd), mm)
            return mm

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
        fd, mm = self._entries.pop(key)
        with contextlib.suppress(BufferError, ValueError):
            mm.close()  # fails while staged tensors still view it; then GC unmaps it
        with contextlib.suppress(OSError):
            os.close(fd)


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
_MAPPINGS = _MappingCache()


def _address(mm: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


class StagingPool:
    """Per-namespace reserve of resident data files in the memory tier."""

    def __init__(self, memory: MemoryTier, namespace: str) -> None:
        self.memory = memory
        self.namespace = namespace
        self.pool_dir = os.path.join(memory.root, namespace, _POOL_DIR)
        self.staging_dir = os.path.join(memory.root, namespace, _STAGING_DIR)

    def acquire(
        self,
        nbytes: int,
        name: str,
        make_room: Callable[[int], None] | None = None,
        *,
        rank: int = 0,
    ) -> StagingBuffer:
        """A buffer of ``nbytes``: a pooled file if one fits, else a new file.

        ``make_room(extra)`` is called after the claim and before any allocation, with the
        bytes the buffer will add to the tier (a claimed file already counts in its usage);
        if it raises, the claim is undone.
        """
        os.makedirs(self.staging_dir, mode=0o700, exist_ok=True)
        path = os.path.join(self.staging_dir, f"{name}-p{os.getpid()}")
        claimed = None
        for candidate in self._candidates(nbytes, rank):
            try:
                os.rename(candidate, path)  # atomic claim; another rank may win the race
                claimed = candidate
                break
            except FileNotFoundError:
                continue
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.close(fd)
        try:
            existing = os.path.getsize(path)
            if existing > nbytes:
                os.truncate(path, nbytes)  # give back what this save does not need
                existing = nbytes
            if make_room is not None:
                make_room(nbytes - existing)
            return StagingBuffer(path, nbytes)
        except BaseException:
            with contextlib.suppress(OSError):
                if claimed is not None:
                    os.rename(path, claimed)
                else:
                    os.remove(path)
            raise

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
        """Delete pooled files until ``nbytes`` are freed (for the budget); bytes freed."""
        freed = 0
        for path, size in sorted(self._pooled().items(), key=lambda kv: kv[1]):
            if freed >= nbytes:
                break
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
                freed += size
        return freed

    def prefault_spare(
        self, nbytes: int, budget: int | None, rank: int = 0
    ) -> threading.Thread | None:
        """In the background, add one pre-faulted file of ``nbytes`` for ``rank`` if none fits."""
        own = f"r{rank}-"
        pooled = self._pooled()
        if nbytes <= 0 or any(
            s >= nbytes and os.path.basename(p).startswith(own) for p, s in pooled.items()
        ):
            return None
        if any(
            os.path.basename(p).startswith(f".filling-{own}") for p in self._pooled(filling=True)
        ):
            return None  # one spare per rank at a time
        if budget is not None and self.memory.usage_bytes() + nbytes > budget:
            return None

        def fill() -> None:
            os.makedirs(self.pool_dir, mode=0o700, exist_ok=True)
            tmp = os.path.join(self.pool_dir, f".filling-{own}{secrets.token_hex(8)}")
            try:
                fd = os.open(tmp, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    os.posix_fallocate(fd, 0, nbytes)  # allocates the pages; ENOSPC, never SIGBUS
                    # Map without MAP_POPULATE (it holds the process's mmap lock for the whole
                    # buffer, stalling the training thread's own allocations) and fill the page
                    # tables through libc's madvise, a foreign call that releases the GIL.
                    _populate(_MAPPINGS.get(fd, nbytes, populate=False))
                finally:
                    os.close(fd)
                os.rename(tmp, os.path.join(self.pool_dir, f"{own}{secrets.token_hex(8)}.buf"))
            except OSError:
                with contextlib.suppress(OSError):
                    os.remove(tmp)

        thread = threading.Thread(target=fill, name="tierckpt-prefault", daemon=True)
        thread.start()
        return thread

    def sweep_orphans(self) -> None:
        """Reclaim staging files of processes that died (kill -9) into the pool or delete them."""
        with contextlib.suppress(FileNotFoundError), os.scandir(self.staging_dir) as it:
            for e in it:
                pid = _pid_of(e.name)
                if pid is None or _alive(pid):
                    continue
                if not self.recycle(e.path, keep=4):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(e.path)
        with contextlib.suppress(FileNotFoundError), os.scandir(self.pool_dir) as it:
            for e in it:
                if e.name.startswith(".filling-"):
                    with contextlib.suppress(FileNotFoundError):
                        if _stale(e.path):
                            os.remove(e.path)


_RANK_OF_DATA = re.compile(r"-r(\d+)(?:\.data)?(?:-p\d+)?$")


def _rank_tag(path: str) -> str:
    """``r<rank>-`` for a data file of that rank, else empty."""
    m = _RANK_OF_DATA.search(os.path.basename(path))
    return f"r{m.group(1)}-" if m else ""


def _populate(mm: mmap.mmap) -> None:
    """MADV_POPULATE_WRITE through libc (releases the GIL); a no-op where unsupported."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(_address(mm)), ctypes.c_size_t(len(mm)), 23)


def release_deleted_mappings() -> None:
    """Unmap this process's staging mappings of deleted files, so their tmpfs pages are freed."""
    with _MAPPINGS._lock:
        _MAPPINGS.prune()


def _pid_of(name: str) -> int | None:
    head, _, pid = name.rpartition("-p")
    return int(pid) if head and pid.isdigit() else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(path: str, age_s: float = 600.0) -> bool:
    import time

    return time.time() - os.path.getmtime(path) > age_s
