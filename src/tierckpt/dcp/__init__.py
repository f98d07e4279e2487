"""Thin PyTorch DCP adapters over the tiers."""

from .reader import TieredStorageReader
from .writer import TieredStorageWriter

__all__ = ["TieredStorageReader", "TieredStorageWriter"]
