"""Errors of the recovery wrapper."""

from __future__ import annotations

from ..errors import TierckptError

__all__ = ["RecoveryError"]


class RecoveryError(TierckptError):
    """The job could not recover in place (too many failures, a rank that never came back)."""
