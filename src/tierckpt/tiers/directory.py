"""A tier over a local directory: the memory tier (tmpfs) and the ``file://`` durable tier."""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterable
from typing import TypeVar

from .._faults import crash_point
from ..constants import DIR_TRIES
from ..errors import DurableUnavailableError, TierFullError
from .base import Buffer, KeyNotFoundError

__all__ = ["DirectoryTier", "fsync_dir", "in_made_dir", "remove_quietly"]

_T = TypeVar("_T")

TMP_MARK = ".tmp-"
_OWN_TMP = re.compile(r"(?P<key>.+)\.tmp-\d+(?:-[0-9a-f]{16})?")
"""This tier's temporaries: ``<key>.tmp-<pid>-<16 hex>`` (``<key>.tmp-<pid>`` before 0.2)."""


class DirectoryTier:
    """Blobs as files under ``root``; writes go to a temporary name and are renamed.

    With ``durable_sync`` (the default, for the ``file://`` durable tier) a write returns
    only once it is on disk, as DCP's ``FileSystemWriter`` does: the temporary is fsynced
    before its rename, and the directory after it (and every new directory into its
    parent), so a later write (a step's COMMIT) can never reach the disk before it. The
    memory tier on tmpfs passes ``durable_sync=False``: there is no disk to reach.
    """

    def __init__(
        self, root: str, *, name: str, dir_mode: int = 0o755, durable_sync: bool = True
    ) -> None:
        self.root = os.path.abspath(root)
        self.name = name
        self.url = "file://" + self.root
        self._dir_mode = dir_mode
        self.durable_sync = durable_sync

    def ensure_root(self) -> None:
        """Create the root directory if it is missing."""
        os.makedirs(self.root, mode=self._dir_mode, exist_ok=True)

    def check_available(self, *, create: bool = True) -> None:
        """Raise :class:`DurableUnavailableError` when the root cannot be created or written.

        With ``create=False`` (readers, read-only commands) nothing is created: a missing
        root is an empty tier, and an existing one need only be readable.
        """
        if not create:
            self._check_readable()
            return
        try:
            self.ensure_root()
        except OSError as e:
            raise DurableUnavailableError(
                f"The {self.name} tier directory {self.root} cannot be created ({e.strerror}); "
                "fix the path or its permissions."
            ) from e
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise DurableUnavailableError(
                f"The {self.name} tier directory {self.root} is not writable; fix its permissions."
            )

    def _check_readable(self) -> None:
        """A missing root that could be created later is fine (an empty tier)."""
        existing = self.root
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise DurableUnavailableError(
                f"The {self.name} tier directory {self.root} cannot be created ({existing} is "
                "not a directory); fix the path."
            )
        if existing == self.root and not os.access(self.root, os.R_OK | os.X_OK):
            raise DurableUnavailableError(
                f"The {self.name} tier directory {self.root} is not readable; fix its permissions."
            )

    def path(self, key: str) -> str:
        """The file path of ``key``."""
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid key {key!r}")
        return os.path.join(self.root, key)

    def _tmp_path(self, key: str) -> str:
        # pid and a random token: writers on two hosts sharing a directory can share a pid.
        return f"{self.path(key)}{TMP_MARK}{os.getpid()}-{secrets.token_hex(8)}"

    def _makedirs(self, key: str) -> None:
        """Create the directories of ``key``; with ``durable_sync``, fsync each new one's parent."""
        target = os.path.dirname(self.path(key))
        if os.path.isdir(target):
            return
        missing = []
        d = target
        while not os.path.isdir(d) and os.path.dirname(d) != d:
            missing.append(d)
            d = os.path.dirname(d)
        os.makedirs(target, mode=self._dir_mode, exist_ok=True)
        if self.durable_sync:
            for d in reversed(missing):
                fsync_dir(os.path.dirname(d))

    def _publish(self, tmp: str, key: str) -> None:
        """Rename ``tmp`` (fsynced already when ``durable_sync``) to ``key``, durably."""
        final = self.path(key)
        os.replace(tmp, final)
        if self.durable_sync:
            fsync_dir(os.path.dirname(final))

    def _new_tmp(self, key: str) -> str:
        """A new, empty temporary of ``key``, in its directory (created first, again if a
        sweep removed it meanwhile, see :func:`in_made_dir`)."""
        tmp = self._tmp_path(key)
        in_made_dir(
            tmp,
            lambda: os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)),
            makedirs=lambda: self._makedirs(key),
        )
        return tmp

    def write(self, key: str, chunks: Iterable[Buffer]) -> int:
        tmp = self._new_tmp(key)
        total = 0
        try:
            with open(tmp, "wb", buffering=0) as f:
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    while view:
                        n = f.write(view)
                        total += n or 0
                        view = view[n:]
                if self.durable_sync:
                    os.fsync(f.fileno())
            self._publish(tmp, key)
        except BaseException as e:
            remove_quietly(tmp)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierFullError(
                    f"The {self.name} tier at {self.root} is full while writing {key}: "
                    "free space, lower memory_keep_last / memory_budget, or enlarge the tmpfs."
                ) from e
            raise
        return total

    def put_file(self, key: str, path: str, progress: Callable[[int], None] | None = None) -> int:
        """Copy a local file in (atomic); ``progress(nbytes)`` is told as chunks land."""
        tmp = self._new_tmp(key)
        try:
            if progress is None:
                shutil.copyfile(path, tmp)
            else:
                _copy_counting(path, tmp, progress)
            if self.durable_sync:
                fd = os.open(tmp, os.O_RDWR)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            crash_point("tier.before_put_rename")
            self._publish(tmp, key)
        except BaseException:
            remove_quietly(tmp)
            raise
        return os.path.getsize(self.path(key))

    def read(self, key: str, offset: int = 0, length: int | None = None) -> Buffer:
        try:
            fd = os.open(self.path(key), os.O_RDONLY)
        except FileNotFoundError as e:
            raise KeyNotFoundError(f"{key} not found in the {self.name} tier ({self.url})") from e
        try:
            if length is None:
                length = os.fstat(fd).st_size - offset
            buf = bytearray(length)
            view = memoryview(buf)
            got = 0
            while got < length:
                n = os.preadv(fd, [view[got:]], offset + got)
                if n == 0:
                    raise KeyNotFoundError(
                        f"{key} in the {self.name} tier is shorter than expected "
                        f"({offset + got} < {offset + length} bytes)"
                    )
                got += n
            return buf
        finally:
            os.close(fd)

    def list(self, prefix: str) -> dict[str, int]:
        base = self.path(prefix)
        out: dict[str, int] = {}
        for dirpath, _dirs, files in os.walk(base):
            rel_dir = os.path.relpath(dirpath, base)
            for fname in files:
                if TMP_MARK in fname:
                    continue
                rel = fname if rel_dir == "." else f"{rel_dir}/{fname}"
                try:
                    out[rel] = os.path.getsize(os.path.join(dirpath, fname))
                except FileNotFoundError:
                    continue
        return out

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        try:
            with os.scandir(self.path(prefix)) as it:
                return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
        except (FileNotFoundError, NotADirectoryError):
            return []

    def delete(self, key: str) -> None:
        remove_quietly(self.path(key))

    def delete_prefix(self, prefix: str) -> None:
        shutil.rmtree(self.path(prefix), ignore_errors=True)

    def discard_partial(self, prefix: str) -> int:
        """Remove the temporaries of unfinished writes of keys that start with ``prefix``.

        ``prefix`` is a string prefix of keys: ``ns/step_1/`` (a directory) or
        ``ns/step_1/<attempt>-r0.`` (names within it). Only files of this tier's own
        temporary naming are removed; finished keys and foreign files stay. A write still in
        progress loses its temporary too: call this only where the writers of those keys are
        known to be gone. Returns how many were removed.
        """
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"invalid prefix {prefix!r}")
        top = self.path(prefix.rsplit("/", 1)[0]) if "/" in prefix else self.root
        removed = 0
        for dirpath, dirs, files in os.walk(top):
            rel = os.path.relpath(dirpath, self.root)
            rel = "" if rel == "." else rel + "/"
            dirs[:] = [d for d in dirs if (rel + d + "/").startswith(prefix)]
            for fname in files:
                m = _OWN_TMP.fullmatch(fname)
                if m and (rel + m["key"]).startswith(prefix):
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(os.path.join(dirpath, fname))
                        removed += 1
        return removed

    def mtime(self, key: str) -> float | None:
        """Modification time of ``key``, or None when it is missing."""
        try:
            return os.path.getmtime(self.path(key))
        except FileNotFoundError:
            return None

    def usage_bytes(self) -> int:
        """Bytes held under the root (every namespace)."""
        return sum(self.list("").values()) if os.path.isdir(self.root) else 0


def in_made_dir(
    path: str, make: Callable[[], _T], *, makedirs: Callable[[], None] | None = None
) -> _T:
    """``make()`` the entry ``path`` (a file created or renamed there) in a directory that
    ``makedirs`` (default: ``os.makedirs``, mode 0700) creates first.

    Retention removes step directories it finds empty, so a directory may vanish between
    its creation and its first entry; ``make`` then fails with ``FileNotFoundError`` and is
    retried. Any other missing path (a rename's source) is raised at once.
    """
    parent = os.path.dirname(path)
    for tries_left in range(DIR_TRIES - 1, -1, -1):
        if makedirs is None:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        else:
            makedirs()
        try:
            return make()
        except FileNotFoundError:
            if tries_left == 0 or os.path.isdir(parent):
                raise
    raise AssertionError("unreachable")


def fsync_dir(path: str) -> None:
    """fsync a directory, making the names created or renamed in it durable.

    ``EINVAL`` (a file system that cannot sync directories) is ignored: there is nothing
    more to do there.
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def remove_quietly(path: str) -> None:
    """Remove a file; a missing one is not an error."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


COPY_CHUNK = 64 * 2**20
"""Bytes copied between two progress reports of :meth:`DirectoryTier.put_file`."""


def _copy_counting(src: str, dst: str, progress: Callable[[int], None]) -> None:
    """Copy ``src`` to a new file ``dst`` in the kernel, chunk by chunk, reporting each."""
    with open(src, "rb") as fin, open(dst, "wb") as fout:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            n = os.sendfile(fout.fileno(), fin.fileno(), offset, min(COPY_CHUNK, size - offset))
            if n == 0:
                raise OSError(f"{src} shrank while it was copied")
            offset += n
            progress(n)
