"""A tier over a local directory: the memory tier (tmpfs) and the ``file://`` durable tier."""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import shutil
from collections.abc import Iterable

from .._faults import crash_point
from ..errors import DurableUnavailableError, TierFullError
from .base import Buffer, KeyNotFoundError

__all__ = ["DirectoryTier", "remove_quietly"]

_TMP_MARK = ".tmp-"


class DirectoryTier:
    """Blobs as files under ``root``; writes go to a temporary name and are renamed."""

    def __init__(self, root: str, *, name: str, dir_mode: int = 0o755) -> None:
        self.root = os.path.abspath(root)
        self.name = name
        self.url = "file://" + self.root
        self._dir_mode = dir_mode

    def ensure_root(self) -> None:
        """Create the root directory if it is missing."""
        os.makedirs(self.root, mode=self._dir_mode, exist_ok=True)

    def check_available(self) -> None:
        """Raise :class:`DurableUnavailableError` when the root cannot be created or written."""
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

    def path(self, key: str) -> str:
        """The file path of ``key``."""
        if key.startswith("/") or ".." in key.split("/"):
            raise ValueError(f"invalid key {key!r}")
        return os.path.join(self.root, key)

    def _tmp_path(self, key: str) -> str:
        return f"{self.path(key)}{_TMP_MARK}{os.getpid()}"

    def _makedirs(self, key: str) -> None:
        os.makedirs(os.path.dirname(self.path(key)), mode=self._dir_mode, exist_ok=True)

    def write(self, key: str, chunks: Iterable[Buffer]) -> int:
        self._makedirs(key)
        tmp = self._tmp_path(key)
        total = 0
        try:
            with open(tmp, "wb", buffering=0) as f:
                for chunk in chunks:
                    view = memoryview(chunk).cast("B")
                    while view:
                        n = f.write(view)
                        total += n or 0
                        view = view[n:]
            os.replace(tmp, self.path(key))
        except BaseException as e:
            remove_quietly(tmp)
            if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise TierFullError(
                    f"The {self.name} tier at {self.root} is full while writing {key}: "
                    "free space, lower memory_keep_last / memory_budget, or enlarge the tmpfs."
                ) from e
            raise
        return total

    def put_file(self, key: str, path: str) -> int:
        self._makedirs(key)
        tmp = self._tmp_path(key)
        try:
            shutil.copyfile(path, tmp)
            crash_point("tier.before_put_rename")
            os.replace(tmp, self.path(key))
        except BaseException:
            remove_quietly(tmp)
            raise
        return os.path.getsize(self.path(key))

    def write_if_absent(self, key: str, data: Buffer) -> bool:
        self._makedirs(key)
        tmp = self._tmp_path(key)
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path(key))  # fails if the key exists: create-only
        except FileExistsError:
            return False
        finally:
            remove_quietly(tmp)
        return True

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
                if _TMP_MARK in fname:
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

    def mtime(self, key: str) -> float | None:
        """Modification time of ``key``, or None when it is missing."""
        try:
            return os.path.getmtime(self.path(key))
        except FileNotFoundError:
            return None

    def usage_bytes(self) -> int:
        """Bytes held under the root (every namespace)."""
        return sum(self.list("").values()) if os.path.isdir(self.root) else 0

    def discard_partial(self, prefix: str) -> int:
        """Remove temporaries (``<key>.tmp-<pid>``) of keys starting with ``prefix`` that a
        killed writer left; returns how many. Only for keys no live process is writing."""
        head, _, stem = prefix.rpartition("/")
        base = self.path(head) if head else self.root
        found: builtins.list[str] = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(base) as it:
            for e in it:
                if not e.name.startswith(stem):
                    continue
                if e.is_dir(follow_symlinks=False):
                    found += [os.path.join(d, f) for d, _, fs in os.walk(e.path) for f in fs]
                else:
                    found.append(e.path)
        partial = [f for f in found if _TMP_MARK in os.path.basename(f)]
        for f in partial:
            remove_quietly(f)
        return len(partial)


def remove_quietly(path: str) -> None:
    """Remove a file; a missing one is not an error."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
