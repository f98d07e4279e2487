"""The life cycle of node memory: who owns a namespace, how big and old it is, releasing it.

A process that builds a writer or reader of a namespace holds an *owner lease* on it
(``<memory_root>/<namespace>/.leases/owner-<pid>-<token>``, an :class:`AttemptLease`) for
the rest of its life; the kernel drops it when the process exits or dies. A namespace is
*live* while any lease in it (owner or save attempt) is held. Only namespaces that are not
live are ever released (removed whole): by ``tierckpt clear-memory`` or, for a job that set
``memory_ttl`` (stored in ``<namespace>/.ttl``), by any later tierckpt process on the node
once nothing in the namespace changed for that long.

Releasing and taking an owner lease both happen under ``<memory_root>/.release.lock``, and a
released namespace is first renamed away, so a job starting in a namespace that is being
released gets a fresh, empty one and never loses files it wrote.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ._runtime import RUNTIME
from .catalog import StepCatalog
from .errors import UnsafeMemoryRootError
from .history import newest_key
from .leases import LEASE_DIR, AttemptLease, is_live, node_lock
from .tiers.memory import MemoryTier

if TYPE_CHECKING:
    from .config import CheckpointConfig

__all__ = [
    "NamespaceInfo",
    "OwnerLease",
    "budget_help",
    "hold_namespace",
    "is_owner_lease",
    "namespace_info",
    "namespaces",
    "release_expired",
    "release_lock",
    "release_lock_if_present",
    "release_namespace",
]

OWNER_PREFIX = "owner-"
TTL_NAME = ".ttl"
_RELEASE_LOCK = ".release.lock"
_RELEASED = ".released-"
_NAMESPACE = re.compile(r"[A-Za-z0-9_-]+")


def is_owner_lease(name: str) -> bool:
    """True for the name of an owner lease (it names no save attempt)."""
    return name.startswith(OWNER_PREFIX)


class OwnerLease(AttemptLease):
    """The owner lease of one (memory root, namespace), taken by the process ``pid``."""

    def __init__(self, namespace_dir: str) -> None:
        self.pid = os.getpid()
        super().__init__(namespace_dir, f"{OWNER_PREFIX}{self.pid}-{secrets.token_hex(4)}")

    def current(self) -> bool:
        """Held by this process and still the file at its path (not released under it)."""
        if self._fd is None or self.pid != os.getpid():
            return False
        try:
            a, b = os.stat(self.path), os.fstat(self._fd)
        except OSError:
            return False
        return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)

    def release(self) -> None:
        """Drop the lease; an inherited copy (after fork) only forgets it."""
        if self.pid != os.getpid():
            self.forget()
            return
        super().release()

    def forget(self) -> None:
        """Drop an inherited copy (after fork) without removing the parent's lease file."""
        if self._fd is not None and self.pid != os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def release_lock(root: str) -> contextlib.AbstractContextManager[None]:
    """The node-wide lock under which namespaces are taken and released."""
    return node_lock(os.path.join(root, _RELEASE_LOCK))


def release_lock_if_present(root: str) -> contextlib.AbstractContextManager[None]:
    """:func:`release_lock` of ``root``, or nothing when the root does not exist."""
    return release_lock(root) if os.path.isdir(root) else contextlib.nullcontext()


class _OwnWhenCreated:
    """Stands in for a writer's ``memory.ensure_root``: the first call that creates the
    namespace directory also takes the owner lease (a writer creates nothing when built)."""

    def __init__(self, config: CheckpointConfig) -> None:
        self.config = config
        self.done = False

    def __call__(self, namespace: str | None = None) -> None:
        MemoryTier(self.config.memory_root or "").ensure_root(namespace)
        if not self.done and namespace == self.config.namespace:
            self.done = hold_namespace(self.config)


def hold_namespace(config: CheckpointConfig, writer_tier: MemoryTier | None = None) -> bool:
    """Take this process's owner lease on ``config``'s namespace (once), record its
    ``memory_ttl``, and release other namespaces of the node whose TTL passed.

    Nothing is created: a namespace not yet on this node is owned once a save creates it
    (``writer_tier``, a writer's memory tier, then takes the lease when it creates the
    directory); a reader of a namespace not on this node owns nothing. Never raises: an
    untrusted or unusable memory root is the writer's or reader's to report. True when the
    lease is held.
    """
    log = config.log
    root = config.memory_root or ""
    tier = MemoryTier(root)
    try:
        tier.check_trusted(config.namespace)
        if not os.path.isdir(tier.path(config.namespace)):
            if writer_tier is not None:
                setattr(writer_tier, "ensure_root", _OwnWhenCreated(config))  # noqa: B010
            return False
        key = (root, config.namespace)
        with RUNTIME.owners.lock:
            held = RUNTIME.owners.held.get(key)
            if isinstance(held, OwnerLease) and held.current():
                return True  # held since an earlier writer or reader: nothing to redo per save
            if isinstance(held, OwnerLease):
                held.forget()
            with release_lock(root):
                tier.check_trusted(config.namespace, create=True)
                RUNTIME.owners.held[key] = OwnerLease(tier.path(config.namespace))
        # Once per taking of the lease, not per save: budget pressure releases again
        # (retention.make_room), so a long job still frees expired leftovers when it must.
        _write_ttl(tier.path(config.namespace), config.memory_ttl_s)
        release_expired(root, log, exclude=config.namespace)
    except (OSError, UnsafeMemoryRootError) as e:
        log.debug("Node memory ownership of %s not recorded: %s", config.namespace, e)
        return False
    return True


def _write_ttl(ns_dir: str, ttl: float | None) -> None:
    path = os.path.join(ns_dir, TTL_NAME)
    if ttl is None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        return
    tmp = f"{path}.tmp-{secrets.token_hex(4)}"
    with open(tmp, "w") as f:
        f.write(f"{ttl}\n")
    os.replace(tmp, path)


def _read_ttl(ns_dir: str) -> float | None:
    try:
        with open(os.path.join(ns_dir, TTL_NAME)) as f:
            value = float(f.read().strip())
    except (OSError, ValueError):
        return None
    return value if value >= 0 else None


@dataclass
class NamespaceInfo:
    """What ``tierckpt ls --all`` shows of one namespace on the node."""

    name: str
    bytes: int
    newest_step: int | None
    newest_generation: int | None
    newest_save_time: float | None
    last_activity: float
    live_owners: list[str]
    """Names of the held leases (owner and save-attempt leases)."""
    ttl: float | None

    @property
    def live(self) -> bool:
        return bool(self.live_owners)

    @property
    def owner_pids(self) -> list[int]:
        out = []
        for n in self.live_owners:
            pid = n[len(OWNER_PREFIX) :].split("-", 1)[0]
            if is_owner_lease(n) and pid.isdigit():
                out.append(int(pid))
        return sorted(set(out))

    def describe_owner(self) -> str:
        if not self.live:
            return "no live owner"
        pids = self.owner_pids
        return f"live (pid {', '.join(map(str, pids))})" if pids else "live (a save in progress)"


def namespaces(root: str) -> list[str]:
    """Names of the namespace directories under the memory root (real directories only)."""
    try:
        with os.scandir(root) as it:
            return sorted(
                e.name
                for e in it
                if _NAMESPACE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)
            )
    except (FileNotFoundError, NotADirectoryError):
        return []


def live_leases(ns_dir: str) -> list[str]:
    """The leases in a namespace that some process holds."""
    try:
        names = os.listdir(os.path.join(ns_dir, LEASE_DIR))
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(n for n in names if is_live(ns_dir, n))


def _usage(ns_dir: str) -> tuple[int, float]:
    """(bytes of its files, newest mtime of anything in it) of a namespace directory."""
    size = 0
    newest = os.lstat(ns_dir).st_mtime
    for dirpath, dirs, files in os.walk(ns_dir):
        for entry in [*dirs, *files]:
            with contextlib.suppress(FileNotFoundError):
                st = os.lstat(os.path.join(dirpath, entry))
                newest = max(newest, st.st_mtime)
                if entry in files:
                    size += st.st_size
    return size, newest


def namespace_info(root: str, name: str, log: logging.Logger | None = None) -> NamespaceInfo:
    """Size, newest save, newest activity and live leases of one namespace."""
    log = log or logging.getLogger("tierckpt")
    ns_dir = os.path.join(root, name)
    size, newest = _usage(ns_dir)
    tier = MemoryTier(root)
    step = gen = when = None
    with contextlib.suppress(OSError):
        committed = StepCatalog(tier, name, log).committed()
        if committed:
            step = max(committed, key=lambda s: newest_key(s, committed[s].generation))
            gen = committed[step].generation
            with contextlib.suppress(OSError):
                when = os.stat(tier.path(f"{name}/step_{step}/COMMIT")).st_mtime
    return NamespaceInfo(
        name=name,
        bytes=size,
        newest_step=step,
        newest_generation=gen,
        newest_save_time=when,
        last_activity=newest,
        live_owners=live_leases(ns_dir),
        ttl=_read_ttl(ns_dir),
    )


def release_namespace(root: str, name: str, older_than: float | None = None) -> bool:
    """Remove one namespace whole, unless a live process owns it (or, with ``older_than``
    seconds, unless something in it changed more recently). True if it was removed."""
    ns_dir = os.path.join(root, name)
    with release_lock(root):
        try:
            st = os.lstat(ns_dir)
        except FileNotFoundError:
            return False
        if not _NAMESPACE.fullmatch(name) or not os.path.isdir(ns_dir) or os.path.islink(ns_dir):
            return False
        if st.st_uid != os.geteuid():
            return False
        if live_leases(ns_dir):
            return False
        if older_than is not None and time.time() - _usage(ns_dir)[1] < older_than:
            return False
        gone = os.path.join(root, f"{_RELEASED}{name}-{secrets.token_hex(4)}")
        os.rename(ns_dir, gone)  # atomic: a new owner now gets a fresh directory
    shutil.rmtree(gone, ignore_errors=True)
    return True


def release_expired(root: str, log: logging.Logger, exclude: str | None = None) -> list[str]:
    """Release every namespace whose stored ``memory_ttl`` passed and that no live process
    owns; returns their names. Leftovers of interrupted releases go too."""
    released = []
    for name in namespaces(root):
        if name == exclude:
            continue
        ttl = _read_ttl(os.path.join(root, name))
        if ttl is None:
            continue
        with contextlib.suppress(OSError):
            if release_namespace(root, name, older_than=ttl):
                log.info(
                    "Released node memory of namespace %s: its job is gone and its "
                    "memory_ttl of %gs passed.",
                    name,
                    ttl,
                )
                released.append(name)
    with contextlib.suppress(OSError), os.scandir(root) as it:
        for e in it:
            if e.name.startswith(_RELEASED) and e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path, ignore_errors=True)
    return released


def human_bytes(n: float) -> str:
    """``'1.5 GiB'``-style size."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def human_age(seconds: float) -> str:
    """``'3h12m'``-style age."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def budget_help(root: str) -> str:
    """What holds the node's memory and how to free it, for a budget error."""
    now = time.time()
    parts = []
    for name in namespaces(root):
        with contextlib.suppress(OSError):
            info = namespace_info(root, name)
            parts.append(
                f"{name} ({human_bytes(info.bytes)}, "
                + (
                    "owned by a live process"
                    if info.live
                    else f"no live owner, idle {human_age(now - info.last_activity)}"
                )
                + ")"
            )
    held = "; ".join(parts) if parts else "nothing"
    return (
        f"The budget counts every namespace under {root}: {held}. Free namespaces no live job "
        f"owns with `tierckpt clear-memory --older-than 1h --memory-root {root}` (or "
        "`tierckpt clear-memory -n NS`), or set memory_ttl so finished jobs release theirs."
    )
