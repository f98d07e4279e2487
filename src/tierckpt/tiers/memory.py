"""The memory tier: node-local tmpfs, written directly by the training processes."""

from __future__ import annotations

import mmap
import os

import xxhash

from .base import KeyNotFoundError
from .directory import DirectoryTier

__all__ = ["MemoryTier"]


class MemoryTier(DirectoryTier):
    """A :class:`DirectoryTier` on tmpfs, private to the user (mode 0700); no fsync."""

    def __init__(self, root: str) -> None:
        super().__init__(root, name="memory", dir_mode=0o700, durable_sync=False)

    def ensure_root(self) -> None:
        """Create the root (0700) if it is missing, e.g. after a node reboot."""
        if not os.path.isdir(self.root):
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)

    def mapped(self, key: str) -> mmap.mmap | None:
        """A read-only mapping of ``key`` (None for an empty file); loads read through it."""
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError as e:
            raise KeyNotFoundError(f"{key} not found in the memory tier ({self.url})") from e
        try:
            size = os.fstat(fd).st_size
            return mmap.mmap(fd, size, access=mmap.ACCESS_READ) if size else None
        finally:
            os.close(fd)

    def read_into(self, key: str, offset: int, out: memoryview, chunk: int = 4 << 20) -> str:
        """Read ``len(out)`` bytes at ``offset`` into ``out``; their xxh3-128 digest.

        One pass: each chunk is hashed while it is still in cache. Raises
        :class:`KeyNotFoundError` when the file is missing or too short.
        """
        hasher = xxhash.xxh3_128()
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError as e:
            raise KeyNotFoundError(f"{key} not found in the memory tier ({self.url})") from e
        try:
            done = 0
            while done < len(out):
                part = out[done : done + chunk]
                got = 0
                while got < len(part):
                    n = os.preadv(fd, [part[got:]], offset + done + got)
                    if n == 0:
                        raise KeyNotFoundError(f"{key} in the memory tier is shorter than expected")
                    got += n
                hasher.update(part)
                done += len(part)
        finally:
            os.close(fd)
        return hasher.hexdigest()
