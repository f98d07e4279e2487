"""tierckpt: tiered checkpointing (node memory, peer memory, durable object store) for PyTorch DCP."""

from . import metrics
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
    ReplicationError,
    StepUnloadableError,
    TierckptError,
    TierFullError,
    UnsafeMemoryRootError,
)
from .manager import CheckpointManager, PendingSave
from .policies import (
    AnyOf,
    EveryNSeconds,
    EveryNSteps,
    KeepEveryM,
    KeepLastK,
    Never,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
)
from .preemption import Preempted
from .prefault import prefault
from .resume import PendingDrain, pending_drains, resume_pending
from .state import Batches, ModelState, PerRank, ResumableIterator, RNGState, TrainingState

__all__ = [
    "AnyOf",
    "Batches",
    "CheckpointManager",
    "EveryNSeconds",
    "EveryNSteps",
    "KeepEveryM",
    "KeepLastK",
    "ModelState",
    "Never",
    "PendingSave",
    "PerRank",
    "Preempted",
    "RNGState",
    "ResumableIterator",
    "RetentionPolicy",
    "SaveContext",
    "SavePolicy",
    "TrainingState",
    "metrics",
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
    "ReplicationError",
    "StepUnloadableError",
    "TierFullError",
    "TieredStorageReader",
    "TieredStorageWriter",
    "TierckptError",
    "UnsafeMemoryRootError",
    "pending_drains",
    "prefault",
    "async_save",
    "load",
    "resume_pending",
    "save",
    "wait_for_drains",
]
__version__ = "0.1.0"
