"""``tierckpt.save`` / ``async_save`` / ``load``: DCP's calls with tierckpt's errors and fallbacks.

DCP wraps every rank's failure in a ``CheckpointException`` (a ``BaseException``). These
wrappers raise the first failing rank's typed :class:`~tierckpt.errors.TierckptError`
instead, with every rank's error in its ``failures`` attribute. :func:`load` with
``step=None`` also falls back, collectively, past a step some rank cannot load.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import Future
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import LoadPlanner, SavePlanner

from .config import CheckpointConfig
from .constants import MAX_LOAD_FALLBACKS
from .dcp.reader import TieredStorageReader
from .dcp.writer import TieredStorageWriter
from .errors import IntegrityError, StepUnloadableError, TierckptError

__all__ = ["MAX_FALLBACKS", "async_save", "load", "save"]

MAX_FALLBACKS = MAX_LOAD_FALLBACKS
"""How many unloadable steps one :func:`load` skips before it gives up."""


def failures_of(error: CheckpointException) -> dict[int, BaseException]:
    """rank -> the exception it raised, from DCP's CheckpointException."""
    out: dict[int, BaseException] = {}
    for rank, wrapped in sorted(error.failures.items()):
        inner = wrapped[0] if isinstance(wrapped, tuple) else wrapped
        if isinstance(inner, BaseException):
            out[rank] = inner
    return out


_SIZE_MISMATCH = re.compile(
    r"Size mismatch between saved (?P<saved>.+?) and current: (?P<current>.+?) for (?P<fqn>\S+)"
)


def _shape(text: str) -> str:
    """``(2, 3)`` from DCP's ``torch.Size([2, 3])``."""
    m = re.fullmatch(r"torch\.Size\(\[(.*)\]\)", text.strip())
    if m is None:
        return text
    dims = [d.strip() for d in m.group(1).split(",") if d.strip()]
    return "(" + ", ".join(dims) + ("," if len(dims) == 1 else "") + ")"


def _translated(inner: BaseException, step: int | None) -> TierckptError | None:
    """tierckpt's error for a DCP error it documents another way (a shape mismatch)."""
    m = _SIZE_MISMATCH.search(str(inner)) if isinstance(inner, ValueError) else None
    if m is None:
        return None
    at = f"Step {step}: " if step is not None else ""
    return IntegrityError(
        f"{at}{m['fqn']} has shape {_shape(m['saved'])} in the checkpoint but "
        f"{_shape(m['current'])} in the state dict being loaded. Build the model with the "
        "shapes it was saved with (or load another step)."
    )


def _typed(error: CheckpointException, step: int | None = None) -> BaseException:
    """The first rank's tierckpt error (every rank's in ``.failures``), else ``error``."""
    failures = failures_of(error)
    for inner in failures.values():
        typed = inner if isinstance(inner, TierckptError) else _translated(inner, step)
        if typed is not None:
            typed.failures = failures  # type: ignore[attr-defined]
            return typed
    return error


def load(
    state_dict: dict[str, Any],
    *,
    config: CheckpointConfig,
    step: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    planner: LoadPlanner | None = None,
) -> int:
    """Load ``state_dict`` in place from the newest restorable save (or ``step``); the step.

    Collective, like ``dcp.load``. With ``step=None``, a step that some rank cannot load
    (a blob with no valid copy in any tier) is marked and every rank retries with the step
    before it, up to :data:`MAX_FALLBACKS` times; each fallback is logged as a WARNING.
    """
    for tries in range(MAX_FALLBACKS + 1):
        reader = TieredStorageReader(config, step=step, process_group=process_group)
        try:
            dcp.load(
                state_dict, storage_reader=reader, planner=planner, process_group=process_group
            )
        except CheckpointException as e:
            failures = failures_of(e)
            unloadable = any(isinstance(f, StepUnloadableError) for f in failures.values())
            if unloadable and step is None and tries < MAX_FALLBACKS:
                continue  # every rank saw the same failures: every rank retries
            raise _typed(e, reader.step) from e
        assert reader.step is not None
        return reader.step
    raise AssertionError("unreachable")


def save(
    state_dict: dict[str, Any],
    *,
    config: CheckpointConfig,
    step: int | None = None,
    save_to_durable: bool | None = None,
    checkpoint_id: str | os.PathLike[str] | None = None,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    no_dist: bool = False,
) -> Future[None]:
    """``dcp.save`` through a :class:`TieredStorageWriter`; raises tierckpt's typed errors.

    The step is committed in memory when this returns. Returns the durable commit's
    future (already done when the step is not saved to the durable tier).
    """
    writer = TieredStorageWriter(config, step=step, save_to_durable=save_to_durable)
    try:
        dcp.save(
            state_dict,
            checkpoint_id=checkpoint_id,
            storage_writer=writer,
            planner=planner,
            process_group=process_group,
            no_dist=no_dist,
        )
    except CheckpointException as e:
        raise _typed(e) from e
    return writer.durable_done


def async_save(
    state_dict: dict[str, Any],
    *,
    config: CheckpointConfig,
    step: int | None = None,
    save_to_durable: bool | None = None,
    checkpoint_id: str | os.PathLike[str] | None = None,
    planner: SavePlanner | None = None,
    process_group: dist.ProcessGroup | None = None,
    **kwargs: Any,
) -> Any:
    """``dcp.async_save`` through a :class:`TieredStorageWriter` (staged into the memory tier).

    Returns what ``dcp.async_save`` returns; ``tierckpt.wait_for_drains()`` waits for the
    durable copy. Errors raised before it returns are tierckpt's typed errors.
    """
    writer = TieredStorageWriter(config, step=step, save_to_durable=save_to_durable)
    try:
        return dcp.async_save(
            state_dict,
            checkpoint_id=checkpoint_id,
            storage_writer=writer,
            planner=planner,
            process_group=process_group,
            **kwargs,
        )
    except CheckpointException as e:
        raise _typed(e) from e
