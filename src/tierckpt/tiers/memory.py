"""The memory tier: node-local tmpfs, written directly by the training processes."""

from __future__ import annotations

import os

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
