"""The memory tier: node-local tmpfs, written directly by the training processes."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
from types import TracebackType
from typing import TYPE_CHECKING, Any

import xxhash

from ..constants import READ_HASH_CHUNK, USAGE_WALKS
from ..errors import UnsafeMemoryRootError
from .base import KeyNotFoundError
from .directory import TMP_MARK, DirectoryTier

if TYPE_CHECKING:
    import torch

    from .._device_copy import PinnedRing
    from ..config import CheckpointConfig

__all__ = ["MemoryTier", "SharedRead", "open_memory_tier"]


class MemoryTier(DirectoryTier):
    """A :class:`DirectoryTier` on tmpfs, private to the user (mode 0700); no fsync."""

    def __init__(self, root: str) -> None:
        super().__init__(root, name="memory", dir_mode=0o700, durable_sync=False)

    def usage_bytes(self) -> int:
        """Bytes held under the root (every namespace), each file counted once.

        Other ranks move files between directories while this walks the tree (an evicted
        file into the pool; a save's buffer from ``.staging/`` into its step, which runs
        under the budget lock when there is a budget), and one walk can miss a file moved
        behind it: the budget check would then admit a second part that does not fit. So
        it walks until two walks see the same files, at most ``USAGE_WALKS`` times, and
        else counts every file any walk saw (never less).
        """
        seen: dict[tuple[int, int], int] = {}
        last: dict[tuple[int, int], int] | None = None
        for _ in range(USAGE_WALKS):
            now = self._file_sizes()
            if now == last:
                return sum(now.values())
            seen.update(now)
            last = now
        return sum(seen.values())

    def _file_sizes(self) -> dict[tuple[int, int], int]:
        """``{(device, inode): size}`` of the files under the root, as one walk sees them."""
        out: dict[tuple[int, int], int] = {}
        for dirpath, _dirs, files in os.walk(self.root):
            for fname in files:
                if TMP_MARK in fname:
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, fname), follow_symlinks=False)
                except FileNotFoundError:
                    continue
                out[(st.st_dev, st.st_ino)] = st.st_size
        return out

    def ensure_root(self, namespace: str | None = None) -> None:
        """Create the root (and ``namespace``'s directory) 0700 if missing; refuse untrusted ones."""
        self.check_trusted(namespace, create=True)

    def check_trusted(self, namespace: str | None = None, *, create: bool = False) -> None:
        """Raise :class:`UnsafeMemoryRootError` unless the root is this user's own.

        The root, and ``namespace``'s directory in it, must each be a real directory (lstat:
        a symlink is refused, never followed) owned by the effective user and not writable by
        group or others. With ``create`` missing ones are made with mode 0700; without, a
        missing one is simply an empty tier and nothing is created.
        """
        paths = [("memory root", self.root)]
        if namespace is not None:
            paths.append(("namespace directory", self.path(namespace)))
        for what, path in paths:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                if not create:
                    return
                st = _make_private_dir(path)
            _refuse_untrusted(what, path, st)

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

    def read_into(
        self, key: str, offset: int, out: memoryview, chunk: int = READ_HASH_CHUNK
    ) -> str:
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

    def read_into(self, offset: int, out: memoryview, chunk: int = READ_HASH_CHUNK) -> str:
        """Read ``len(out)`` bytes at ``offset`` into ``out``; their xxh3-128 digest.

        One pass: each chunk is hashed while it is still in cache. Raises
        :class:`KeyNotFoundError` when the file is too short.
        """
        hasher = xxhash.xxh3_128()
        self._read_hashed(offset, out, hasher, chunk)
        return hasher.hexdigest()

    def read_to_device(
        self, offset: int, target: torch.Tensor, ring: PinnedRing, chunk: int = READ_HASH_CHUNK
    ) -> str:
        """Read ``target.numel()`` bytes at ``offset`` into ``target`` (flat uint8, on the
        ring's device) through ``ring``'s host slots; the xxh3-128 of the bytes read.

        The copies may still be in flight on return: ``ring.finish()`` waits for them.
        """
        hasher = xxhash.xxh3_128()
        ring.copy_in(
            target, lambda slot, done: self._read_hashed(offset + done, slot, hasher, chunk)
        )
        return hasher.hexdigest()

    def _read_hashed(
        self, offset: int, out: memoryview, hasher: Any, chunk: int = READ_HASH_CHUNK
    ) -> None:
        """``preadv`` ``len(out)`` bytes at ``offset`` into ``out``, feeding ``hasher``."""
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


def open_memory_tier(config: CheckpointConfig, *, create: bool = False) -> MemoryTier:
    """The memory tier of ``config``, its root and namespace directory checked as trusted."""
    tier = MemoryTier(config.memory_root or "")
    tier.check_trusted(config.namespace, create=create)
    return tier


def _make_private_dir(path: str) -> os.stat_result:
    """Create ``path`` with mode 0700 (whatever the umask); its lstat."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        return os.lstat(path)  # made concurrently (another rank): checked like any other
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return os.lstat(path)


def _refuse_untrusted(what: str, path: str, st: os.stat_result) -> None:
    uid = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        problem = f"a symlink (to {os.readlink(path)!r})"
        fix = "use the real directory's path if it is your own"
    elif not stat.S_ISDIR(st.st_mode):
        problem = "not a directory"
        fix = "remove or move the file"
    elif st.st_uid != uid:
        problem = f"owned by uid {st.st_uid}, not by this user (uid {uid})"
        fix = f"if it is yours, `chown {uid} {path}`"
    elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        problem = f"writable by group or others (mode {stat.S_IMODE(st.st_mode):o})"
        fix = f"`chmod 700 {path}`"
    else:
        return
    raise UnsafeMemoryRootError(
        f"The {what} {path} is {problem}: another local user could read, replace or plant "
        f"checkpoint files there, so tierckpt does not use it. Fix: {fix}, or set "
        "TIERCKPT_MEMORY_ROOT (or CheckpointConfig(memory_root=...)) to a directory of your "
        "own; the default /dev/shm/tierckpt-<uid> is created with mode 0700."
    )
