"""Deleting only what tierckpt can prove it wrote and abandoned (DESIGN invariant 9).

A file may be deleted only when :func:`layout.is_ours` recognises its name and its attempt
is not protected (a live lease, a commit that needs it, an upload under way). Everything
else in a step directory is left in place and reported once per step per process; a step
directory is removed only once it is empty.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable

from . import layout
from ._log import warn_once
from .catalog import StepCatalog
from .leases import LEASE_DIR, is_live
from .tiers.directory import DirectoryTier
from .tiers.memory import MemoryTier

__all__ = [
    "live_attempts",
    "retire_step",
    "remove_dir_if_empty",
    "remove_files",
    "step_names",
    "warn_foreign",
    "warn_unreadable",
]


def step_names(catalog: StepCatalog, step: int) -> list[str]:
    """Every name in a step directory; on directory tiers also temporaries (``name/`` for
    sub-directories), which a tier's ``list`` hides."""
    tier = catalog.tier
    prefix = layout.step_dir(catalog.namespace, step)
    if isinstance(tier, DirectoryTier):
        try:
            with os.scandir(tier.path(prefix)) as it:
                return sorted(e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in it)
        except (FileNotFoundError, NotADirectoryError):
            return []
    return sorted(tier.list(prefix))


def live_attempts(memory: MemoryTier, namespace: str) -> set[str]:
    """Attempts whose lease some process on this node holds (their files are in use)."""
    ns_dir = memory.path(namespace)
    out: set[str] = set()
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for name in os.listdir(os.path.join(ns_dir, LEASE_DIR)):
            attempt = layout.attempt_of(name)
            if attempt is not None and is_live(ns_dir, name):
                out.add(attempt)
    return out


def remove_files(catalog: StepCatalog, step: int, names: list[str], keep: set[str]) -> list[str]:
    """Delete the names that are ours, other than COMMIT, of attempts not in ``keep``."""
    removed = []
    for name in names:
        if name == layout.COMMIT_NAME or not layout.is_ours(name):
            continue
        if layout.attempt_of(name) in keep:
            continue
        catalog.tier.delete(catalog.key(step, name))
        removed.append(name)
    return removed


def retire_step(
    catalog: StepCatalog,
    step: int,
    keep: set[str],
    *,
    before_files: Callable[[list[str]], None] | None = None,
) -> list[str]:
    """The reverse of the commit rule: the COMMIT goes first (the step turns invisible), then
    the files tierckpt wrote, except those of attempts in ``keep``, then the emptied directory.

    ``before_files(names)`` runs between the two (the memory tier recycles data files there).
    Returns the names seen in the step before its files went.
    """
    catalog.tier.delete(catalog.key(step, layout.COMMIT_NAME))
    names = step_names(catalog, step)
    if before_files is not None:
        before_files(names)
    remove_files(catalog, step, step_names(catalog, step), keep=keep)
    remove_dir_if_empty(catalog, step)
    return names


def remove_dir_if_empty(catalog: StepCatalog, step: int) -> None:
    """Remove an emptied step directory (object stores have none to remove)."""
    tier = catalog.tier
    if isinstance(tier, DirectoryTier):
        with contextlib.suppress(OSError):
            os.rmdir(tier.path(layout.step_dir(catalog.namespace, step)))


def warn_foreign(catalog: StepCatalog, step: int, names: list[str], log: logging.Logger) -> None:
    """Report, once per step per process, files tierckpt did not write (left in place)."""
    foreign = [n for n in names if not layout.is_ours(n)]
    if not foreign:
        return
    tier = catalog.tier
    shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
    warn_once(
        log,
        ("foreign", tier.url, catalog.namespace, str(step)),
        f"Step {step} in the {tier.name} tier ({tier.url}) holds files tierckpt did not write "
        f"({shown}): left in place. Move them out of {layout.step_dir(catalog.namespace, step)} "
        "or use another namespace.",
    )


def warn_unreadable(catalog: StepCatalog, step: int, problem: str, log: logging.Logger) -> None:
    """Report, once per step per process, a step whose COMMIT cannot be parsed (left in place)."""
    tier = catalog.tier
    warn_once(
        log,
        ("unreadable", tier.url, catalog.namespace, str(step)),
        f"Step {step} in the {tier.name} tier ({tier.url}) has an unreadable commit and is "
        f"left in place: {problem} Delete the step yourself if it is not needed.",
    )
