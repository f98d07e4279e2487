"""Whether the memory root's tmpfs backs files with huge pages, and the hint when it does not.

On a tmpfs mounted with ``huge=always`` or ``huge=within_size`` a file's pages are 2 MiB.
Measured here (benchmarks/README.md, "Shmem huge pages"): a fresh job's first saves of 1 GiB
into memory just freed took 0.23-0.40 s instead of 0.78-1.6 s (the steady state, 0.24 s,
from the first save on), and mapping a resident file 0.002 s instead of 0.22 s per GiB.
Memory the host has taken back (a VM with free page reporting) costs the same either way.
``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` overrides every mount only when it is
``force`` or ``deny``; its other values apply to the kernel's internal mount.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

__all__ = ["TmpfsMount", "huge_pages_hint", "log_huge_pages_hint", "mount_of"]

SHMEM_ENABLED = "/sys/kernel/mm/transparent_hugepage/shmem_enabled"
MOUNTS = "/proc/self/mounts"

_hinted: set[str] = set()
_hinted_lock = threading.Lock()


@dataclass(frozen=True)
class TmpfsMount:
    """The filesystem a path is on, as ``/proc/self/mounts`` lists it."""

    mountpoint: str
    fstype: str
    huge: str
    """The huge-page policy files written there get: never, always, within_size or advise."""

    @property
    def huge_pages(self) -> bool:
        """True when files written with ``write()`` get huge pages (``advise`` needs madvise)."""
        return self.fstype == "tmpfs" and self.huge in ("always", "within_size")


def _unescape(field: str) -> str:
    """A /proc/mounts field with its octal escapes (``\\040`` for a space) decoded."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _within(path: str, mountpoint: str) -> bool:
    return mountpoint in ("/", path) or path.startswith(mountpoint + "/")


def mount_of(
    path: str, mounts: str | None = None, shmem_enabled: str | None = None
) -> TmpfsMount | None:
    """The mount ``path`` is on (the last one listed at the deepest mount point); None when
    it cannot be told. ``mounts`` / ``shmem_enabled``: those files' text (read when None)."""
    try:
        if mounts is None:
            with open(MOUNTS) as f:
                mounts = f.read()
        if shmem_enabled is None:
            with open(SHMEM_ENABLED) as f:
                shmem_enabled = f.read()
    except OSError:
        if mounts is None:
            return None
        shmem_enabled = shmem_enabled or ""
    target = os.path.realpath(path)  # symlinks resolved; a part not made yet is kept
    best: tuple[str, str, str] | None = None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 4:
            continue
        mountpoint, fstype, options = _unescape(fields[1]), fields[2], fields[3]
        if _within(target, mountpoint) and (best is None or len(mountpoint) >= len(best[0])):
            best = (mountpoint, fstype, options)
    if best is None:
        return None
    mountpoint, fstype, options = best
    huge = next((o[5:] for o in options.split(",") if o.startswith("huge=")), "never")
    forced = _selected(shmem_enabled)
    if fstype == "tmpfs" and forced in ("force", "deny"):
        huge = "always" if forced == "force" else "never"
    return TmpfsMount(mountpoint, fstype, huge)


def _selected(sysfs: str) -> str:
    """The bracketed choice of a sysfs list such as ``always [never] deny force``."""
    for word in sysfs.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return sysfs.strip()


def huge_pages_hint(root: str, mount: TmpfsMount | None) -> str | None:
    """What to do when ``root`` is on a tmpfs without huge pages (None otherwise)."""
    if mount is None or mount.fstype != "tmpfs" or mount.huge_pages:
        return None
    return (
        f"tierckpt: the memory root {root} is on a tmpfs with 4 KiB pages ({mount.mountpoint}, "
        f"huge={mount.huge}). On a tmpfs with huge pages a job's first saves run at the "
        "speed of later ones (measured 3-4x faster when the memory is not cold): as root, "
        "`mount -t tmpfs -o size=<bytes>,huge=within_size tmpfs /mnt/tierckpt` and set "
        "TIERCKPT_MEMORY_ROOT=/mnt/tierckpt (README, 'Memory budget and retention')."
    )


def log_huge_pages_hint(root: str, log: logging.Logger) -> None:
    """Log :func:`huge_pages_hint` for ``root`` at DEBUG (the default output stays one line
    per save and load), once per process and root."""
    with _hinted_lock:
        if root in _hinted:
            return
        _hinted.add(root)
    hint = huge_pages_hint(root, mount_of(root))
    if hint is not None:
        log.debug(hint)
