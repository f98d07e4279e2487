"""The memory tier: node-local tmpfs, written directly by the training processes."""

from __future__ import annotations

import mmap
import os

from .base import KeyNotFoundError
from .directory import DirectoryTier

__all__ = ["MemoryTier"]


class MemoryTier(DirectoryTier):
    """A :class:`DirectoryTier` on tmpfs, private to the user (mode 0700)."""

    def __init__(self, root: str) -> None:
        super().__init__(root, name="memory", dir_mode=0o700)

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
