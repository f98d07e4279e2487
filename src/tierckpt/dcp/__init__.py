"""Thin PyTorch DCP adapters over the tiers."""

from .plan_cache import CachedSavePlanner
from .reader import TieredStorageReader
from .writer import TieredStorageWriter

__all__ = ["CachedSavePlanner", "TieredStorageReader", "TieredStorageWriter"]
