"""tierckpt: tiered checkpointing (node memory, peer memory, durable object store) for PyTorch DCP."""

from .api import async_save, load, save
from .config import CheckpointConfig
from .dcp.reader import TieredStorageReader
from .dcp.writer import TieredStorageWriter
from .drain import wait_for_drains
from .errors import (
    CheckpointNotFoundError,
    CollectiveTimeoutError,
    ConfigError,
    DurableTierError,
    DurableUnavailableError,
    IntegrityError,
    InvalidStepError,
    MemoryBudgetError,
    PeerError,
    StepUnloadableError,
    TierckptError,
    TierFullError,
    UnsafeMemoryRootError,
)
from .resume import PendingDrain, pending_drains, resume_pending

__all__ = [
    "CheckpointConfig",
    "CheckpointNotFoundError",
    "CollectiveTimeoutError",
    "ConfigError",
    "DurableTierError",
    "DurableUnavailableError",
    "IntegrityError",
    "InvalidStepError",
    "MemoryBudgetError",
    "PeerError",
    "PendingDrain",
    "StepUnloadableError",
    "TierFullError",
    "TieredStorageReader",
    "TieredStorageWriter",
    "TierckptError",
    "UnsafeMemoryRootError",
    "pending_drains",
    "async_save",
    "load",
    "resume_pending",
    "save",
    "wait_for_drains",
]
__version__ = "0.1.0"
