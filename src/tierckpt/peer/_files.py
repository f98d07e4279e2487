"""Files under the service's root, reached without following any symlink.

Every path is walked from an open descriptor of the root, one component at a time, with
``O_NOFOLLOW``: a symlink anywhere in a key (a parent directory or the file itself) is
refused, and nothing outside the root can be reached, whatever is renamed meanwhile.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator

from ..constants import DIR_TRIES
from ..errors import PeerError
from ..tiers.base import KeyNotFoundError

__all__ = ["Root", "default_allow", "is_temporary", "temporary_name"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_TEMPORARY = re.compile(r".+\.tmp-\d+(?:-[0-9a-f]{16})?")
"""``<name>.tmp-<pid>-<16 hex>``: the temporaries of the directory tiers and of PUT."""


def default_allow(key: str) -> bool:
    """A relative ``/``-separated path of plain names: no ``..``, ``.``, empty or absolute part."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        return False
    return all(part not in ("", ".", "..") for part in key.split("/"))


def is_temporary(name: str) -> bool:
    return _TEMPORARY.fullmatch(name) is not None


def _refused(key: str, e: OSError) -> PeerError:
    return PeerError(f"{key!r} is refused: a component is a symlink or not a directory ({e}).")


class Root:
    """The directory a service serves; every method takes a key already allowed."""

    def __init__(self, path: str) -> None:
        self.path = os.path.realpath(path)
        if not os.path.isdir(self.path):
            raise PeerError(f"The peer service root {path} is not a directory; create it first.")

    def _walk(self, parts: list[str], *, create: bool) -> int:
        """An open descriptor of the directory ``parts`` under the root (created 0700)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in parts:
                try:
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(name, 0o700, dir_fd=fd)
                    nfd = os.open(name, _DIR_FLAGS, dir_fd=fd)
                os.close(fd)
                fd = nfd
        except BaseException:
            os.close(fd)
            raise
        return fd

    def open_parent(self, key: str, *, create: bool = False) -> tuple[int, str]:
        """``(descriptor of key's directory, key's last name)``; KeyNotFoundError if missing.

        With ``create`` missing directories are made (mode 0700). The caller closes the fd.
        """
        *dirs, name = key.split("/")
        try:
            return self._walk(dirs, create=create), name
        except FileNotFoundError as e:
            raise KeyNotFoundError(f"{key} not found") from e
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _refused(key, e) from e
            raise

    def open_new(self, key: str, open_in: Callable[[int], int]) -> tuple[int, int]:
        """``(descriptor of key's directory, open_in(that descriptor))``: a new file opened
        in key's directory, made first (mode 0700). The caller closes both.

        Retention removes step directories it finds empty, so the directory may go between
        its creation and the file; it is then made again (``open_in`` failed with
        ``FileNotFoundError`` in a removed directory) a few times.
        """
        for tries_left in range(DIR_TRIES - 1, -1, -1):
            dfd, _name = self.open_parent(key, create=True)
            try:
                return dfd, open_in(dfd)
            except FileNotFoundError:
                removed = os.fstat(dfd).st_nlink == 0
                os.close(dfd)
                if tries_left == 0 or not removed:
                    raise
            except BaseException:
                os.close(dfd)
                raise
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def parent(self, key: str) -> Iterator[tuple[int, str]]:
        """:meth:`open_parent` (without creating) as a context manager."""
        fd, name = self.open_parent(key)
        try:
            yield fd, name
        finally:
            os.close(fd)

    def open_read(self, key: str) -> int:
        """``key`` opened for reading under a shared, non-blocking flock (see MemoryTier).

        A file a save has claimed for reuse (exclusive flock) reads as missing: its bytes are
        going. Symlinks and non-regular files are refused.
        """
        with self.parent(key) as (dfd, name):
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except FileNotFoundError as e:
                raise KeyNotFoundError(f"{key} not found") from e
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise _refused(key, e) from e
                raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise PeerError(f"{key!r} is refused: not a regular file.")
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError as e:
                raise KeyNotFoundError(f"{key} was evicted and is being reused by a save") from e
        except BaseException:
            os.close(fd)
            raise
        return fd

    def size(self, key: str) -> int | None:
        """Size of the regular file ``key``, None when missing (symlinks count as missing)."""
        try:
            with self.parent(key) as (dfd, name):
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except (KeyNotFoundError, FileNotFoundError):
            return None
        return st.st_size if stat.S_ISREG(st.st_mode) else None

    def list(self, prefix: str) -> dict[str, int]:
        """Regular files under ``prefix`` (recursively, names relative to it), no temporaries."""
        try:
            top = self._walk(prefix.split("/") if prefix else [], create=False)
        except FileNotFoundError:
            return {}
        except OSError as e:
            if e.errno in (errno.ELOOP, errno.ENOTDIR):
                raise _refused(prefix, e) from e
            raise
        out: dict[str, int] = {}
        try:
            for dirpath, _dirs, files, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                for name in files:
                    if is_temporary(name):
                        continue
                    with contextlib.suppress(FileNotFoundError):
                        st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            out[os.path.normpath(os.path.join(dirpath, name))] = st.st_size
        finally:
            os.close(top)
        return out


def temporary_name(name: str) -> str:
    return f"{name}.tmp-{os.getpid()}-{secrets.token_hex(8)}"
