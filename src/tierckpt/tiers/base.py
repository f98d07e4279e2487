"""The storage seam every tier implements: a handful of methods over ``str`` keys.

Keys are ``/``-separated and relative to the tier's root. Tiers know nothing of DCP,
steps or commits; :mod:`tierckpt.catalog` builds those on top.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from ..errors import CheckpointNotFoundError

__all__ = ["Buffer", "KeyNotFoundError", "Tier"]

Buffer = bytes | bytearray | memoryview


class KeyNotFoundError(CheckpointNotFoundError):
    """A key does not exist in a tier."""


@runtime_checkable
class Tier(Protocol):
    """A flat key/value store of immutable blobs.

    Keys are relative, ``/``-separated, without ``..``; a bad key raises ``ValueError``.
    ``write`` and ``put_file`` are atomic (readers see the whole new blob or the old state)
    and, on a durable tier, durable when they return, so a later write (a step's COMMIT) can
    never be persisted before the blobs written earlier. There is no create-only write:
    every save attempt writes under names of its own, and a commit is a plain atomic write.
    Errors: :class:`KeyNotFoundError` for a missing key, the
    :class:`~tierckpt.errors.DurableTierError` family for a store that fails.

    Library code deletes only through :mod:`tierckpt.catalog` / :mod:`tierckpt.cleanup`,
    key by key (nothing it cannot prove it wrote); there is no bulk delete in the seam.
    """

    name: str
    """``"memory"``, ``"peer"`` or ``"durable"``: the label used in logs and counters."""
    url: str
    """Where the tier lives, for messages."""

    def write(self, key: str, chunks: Iterable[Buffer]) -> int:
        """Store the concatenated chunks under ``key`` (replacing it); the bytes written.

        Readers see all of it or nothing; a failure (also one raised by ``chunks``) leaves
        the previous value, or no key, in place.
        """
        ...

    def put_file(self, key: str, path: str) -> int:
        """Store a local file's contents under ``key`` (atomic like :meth:`write`); its size."""
        ...

    def read(self, key: str, offset: int = 0, length: int | None = None) -> Buffer:
        """Bytes ``[offset, offset+length)`` of ``key``; raises :class:`KeyNotFoundError`."""
        ...

    def list(self, prefix: str) -> dict[str, int]:
        """Every finished key under ``prefix/`` (relative to it) with its size in bytes.

        Temporaries of unfinished writes are never listed; a missing prefix gives ``{}``.
        """
        ...

    def list_dirs(self, prefix: str) -> builtins.list[str]:
        """Sorted names of the immediate sub-directories (common prefixes) of ``prefix/``."""
        ...

    def delete(self, key: str) -> None:
        """Remove ``key``; a missing key is not an error."""
        ...
