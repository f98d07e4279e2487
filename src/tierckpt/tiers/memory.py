"""The memory tier: node-local tmpfs, written directly by the training processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
from types import TracebackType

import xxhash

from .base import KeyNotFoundError
from .directory import DirectoryTier

__all__ = ["MemoryTier", "SharedRead"]


class MemoryTier(DirectoryTier):
    """A :class:`DirectoryTier` on tmpfs, private to the user (mode 0700); no fsync."""

    def __init__(self, root: str) -> None:
        super().__init__(root, name="memory", dir_mode=0o700, durable_sync=False)

    def ensure_root(self) -> None:
        """Create the root (0700) if it is missing, e.g. after a node reboot."""
        if not os.path.isdir(self.root):
            os.makedirs(self.root, mode=0o700, exist_ok=True)
            os.chmod(self.root, 0o700)

    def open_shared(self, key: str) -> SharedRead:
        """Open ``key`` for reading under a shared flock (see :class:`SharedRead`).

        Raises :class:`KeyNotFoundError` when the file is missing, or when a save has
        already claimed it for reuse (an exclusive flock is held): its bytes are going.
        """
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError as e:
            raise KeyNotFoundError(f"{key} not found in the memory tier ({self.url})") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError as e:
            os.close(fd)
            raise KeyNotFoundError(
                f"{key} in the memory tier was evicted and is being reused by a save"
            ) from e
        return SharedRead(fd, key)

    def read_into(self, key: str, offset: int, out: memoryview, chunk: int = 4 << 20) -> str:
        """Read ``len(out)`` bytes of ``key`` at ``offset`` into ``out``; their digest."""
        with self.open_shared(key) as f:
            return f.read_into(offset, out, chunk)


class SharedRead:
    """One memory-tier file open for reading under a shared ``flock``.

    The staging pool claims a pooled file only under an exclusive non-blocking flock, so
    while a reader holds this the file's bytes are never reused by a later save. Reads copy
    out of the file (``pread``, no mapping: a file truncated meanwhile reads short, never
    SIGBUS) and hash what they copied.
    """

    def __init__(self, fd: int, key: str) -> None:
        self._fd = fd
        self.key = key

    def read_into(self, offset: int, out: memoryview, chunk: int = 4 << 20) -> str:
        """Read ``len(out)`` bytes at ``offset`` into ``out``; their xxh3-128 digest.

        One pass: each chunk is hashed while it is still in cache. Raises
        :class:`KeyNotFoundError` when the file is too short.
        """
        hasher = xxhash.xxh3_128()
        done = 0
        while done < len(out):
            part = out[done : done + chunk]
            got = 0
            while got < len(part):
                n = os.preadv(self._fd, [part[got:]], offset + done + got)
                if n == 0:
                    raise KeyNotFoundError(
                        f"{self.key} in the memory tier is shorter than expected"
                    )
                got += n
            hasher.update(part)
            done += len(part)
        return hasher.hexdigest()

    def read(self, offset: int, length: int) -> tuple[bytearray, str]:
        """A private copy of ``length`` bytes at ``offset`` and the digest of that copy."""
        buf = bytearray(length)
        return buf, self.read_into(offset, memoryview(buf))

    def close(self) -> None:
        if self._fd < 0:
            return
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> SharedRead:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
