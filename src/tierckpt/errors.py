"""The tierckpt error hierarchy: every error says what went wrong and what to do."""

from __future__ import annotations

__all__ = [
    "CheckpointNotFoundError",
    "CollectiveTimeoutError",
    "ConfigError",
    "DurableTierError",
    "DurableUnavailableError",
    "IntegrityError",
    "InvalidStepError",
    "MemoryBudgetError",
    "PeerError",
    "StepUnloadableError",
    "TierFullError",
    "TierckptError",
    "UnsafeMemoryRootError",
]


class TierckptError(Exception):
    """Base of every error raised by tierckpt."""


class ConfigError(TierckptError, ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


class UnsafeMemoryRootError(ConfigError):
    """The memory root (or a namespace directory in it) is a symlink, owned by another user,
    or writable by group/others: another local user could read, swap or plant its files."""


class InvalidStepError(ConfigError):
    """A step id is missing or malformed (the seed's "Invalid step value")."""


class CheckpointNotFoundError(TierckptError, FileNotFoundError):
    """No committed checkpoint (or no valid copy of a needed file) exists in any tier."""


class IntegrityError(TierckptError):
    """Stored bytes failed their checksum, or a file is corrupt or foreign, in every tier."""


class StepUnloadableError(IntegrityError):
    """A blob of the chosen step has no valid copy in any tier; the step is marked so that
    the next load with ``step=None`` falls back to the step before it."""


class TierFullError(TierckptError):
    """A tier has no room for a save; nothing committed was touched."""


class MemoryBudgetError(TierFullError):
    """A save does not fit in the memory budget even after evicting what may be evicted."""


class DurableTierError(TierckptError):
    """An operation on the durable tier failed after its retries."""


class DurableUnavailableError(DurableTierError):
    """The durable location (bucket, directory) is missing or unreachable."""


class CollectiveTimeoutError(TierckptError, TimeoutError):
    """Ranks did not all reach one of tierckpt's collective steps within
    ``collective_timeout_s``; the message names the ranks that are missing and the likely cause."""


class PeerError(TierckptError):
    """The peer tier's transport failed: a peer is unreachable, timed out, refused the
    connection (wrong job secret, too busy) or refused a request (no room, bad key).

    ``remote_type`` is the class name of the error the peer raised, when it raised one
    (``"TierFullError"`` for a refused reservation, say), else ``None``.
    """

    remote_type: str | None = None
