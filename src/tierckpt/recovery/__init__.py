"""In-process recovery for plain PyTorch: a failed rank is replaced, the others go on.

``run(train_step, state, checkpointer, steps=...)`` is the step loop (see
:mod:`.wrapper`); ``tierckpt-run`` (:mod:`.launch`) starts the workers like torchrun but
restarts only the one that died. See README "In-process recovery".
"""

from .checkpointer import ApiCheckpointer, Checkpointer
from .comm import CommBackend, GlooBackend, NcclBackend
from .errors import RecoveryError
from .fill import Fill
from .loader import StepLoader
from .wrapper import Recovery, RecoveryOptions, RunResult, is_replacement, run

__all__ = [
    "ApiCheckpointer",
    "Checkpointer",
    "CommBackend",
    "Fill",
    "GlooBackend",
    "NcclBackend",
    "Recovery",
    "RecoveryError",
    "RecoveryOptions",
    "RunResult",
    "StepLoader",
    "is_replacement",
    "run",
]
