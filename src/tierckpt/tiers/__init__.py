"""Storage tiers behind one small protocol."""

from .base import KeyNotFoundError, Tier
from .directory import DirectoryTier
from .durable import open_durable_tier
from .memory import MemoryTier

__all__ = ["DirectoryTier", "KeyNotFoundError", "MemoryTier", "Tier", "open_durable_tier"]
