"""Proof that a save attempt is still being written: a file lock its process holds.

A writer holds an exclusive ``flock`` on ``<namespace>/.leases/<name>`` for as long as the
files it names may still be in use (a save attempt being staged, written or committed). The
kernel drops the lock when the process dies, kill -9 included and whatever its pid namespace,
so a sweep that finds a lease unlocked (or missing) has proof that its files were abandoned.
Pid liveness and mtimes prove nothing (pids are reused and namespaced; recycled buffers keep
old mtimes).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
from collections.abc import Iterator

__all__ = ["LEASE_DIR", "AttemptLease", "is_live", "lease_name", "node_lock", "sweep_leases"]

LEASE_DIR = ".leases"
_NEW = ".new-"
"""Infix of a lease's private name while it is being taken."""
_NEW_TRIES = 8


def lease_name(attempt: str, rank: int) -> str:
    """The lease of one rank's part of one save attempt."""
    return f"{attempt}-r{rank}"


def _path(namespace_dir: str, name: str) -> str:
    return os.path.join(namespace_dir, LEASE_DIR, name)


class AttemptLease:
    """An exclusive lock on ``<namespace_dir>/.leases/<name>``, held until :meth:`release`.

    ``create=False`` never makes the namespace directory: a background job whose namespace
    was removed meanwhile (``clear-memory``, a finished job) gets ``FileNotFoundError``
    instead of bringing the directory back.
    """

    def __init__(self, namespace_dir: str, name: str, *, create: bool = True) -> None:
        self.path = _path(namespace_dir, name)
        lease_dir = os.path.dirname(self.path)
        if create:
            os.makedirs(lease_dir, mode=0o700, exist_ok=True)
        else:
            with contextlib.suppress(FileExistsError):
                os.mkdir(lease_dir, 0o700)
        # Lock a private name first, then rename it into place: the lease never appears
        # unlocked, so a concurrent sweep cannot mistake it for an abandoned one. A sweep
        # removes private names left unlocked (a writer killed before its rename), so one
        # may go before it is locked: the rename then fails and a new name is taken.
        for tries_left in range(_NEW_TRIES - 1, -1, -1):
            tmp = f"{self.path}{_NEW}{secrets.token_hex(4)}"
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.rename(tmp, self.path)
            except FileNotFoundError:
                os.close(fd)
                if tries_left == 0:
                    raise
                continue
            except BaseException:
                os.close(fd)
                raise
            break
        self._fd: int | None = fd

    def release(self) -> None:
        """Drop the lease: unlink first, so its name is never seen unlocked while held."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)
        os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()


@contextlib.contextmanager
def node_lock(path: str) -> Iterator[None]:
    """Hold the exclusive flock of the lock file ``path`` (created if missing) for a block:
    the ranks and jobs of a node that take it run that block one at a time."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def is_live(namespace_dir: str, name: str) -> bool:
    """True while some process holds the lease ``name``."""
    try:
        fd = os.open(_path(namespace_dir, name), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock taken when the lease was free
    return False


def sweep_leases(namespace_dir: str) -> int:
    """Remove lease files no process holds (their owners died or finished, or were killed
    while taking one: private ``.new-`` names); returns the count."""
    removed = 0
    with (
        contextlib.suppress(FileNotFoundError),
        os.scandir(os.path.join(namespace_dir, LEASE_DIR)) as it,
    ):
        for e in it:
            if is_live(namespace_dir, e.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                os.remove(e.path)
                removed += 1
    return removed
