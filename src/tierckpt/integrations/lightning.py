"""Lightning: a ``CheckpointIO`` plug-in that saves and restores through tierckpt.

    from tierckpt.integrations.lightning import TierckptCheckpointIO
    trainer = L.Trainer(plugins=[TierckptCheckpointIO(cfg, durable_every_steps=1000)], ...)
    trainer.fit(model, ckpt_path="checkpoints/last.ckpt")

Lightning hands the plug-in rank 0's checkpoint dict (DDP state is replicated); it is saved
as one tierckpt step (``global_step``) of a one-rank job, to the memory tier of rank 0's
node and, every ``durable_every_steps``, to the durable tier. The ``.ckpt`` path Lightning
chooses gets a small JSON pointer (namespace and step), so ``ModelCheckpoint``'s file
handling (``last.ckpt``, ``save_top_k``) works unchanged; the bytes stay in the tiers, where
tierckpt's retention removes them. ``load_checkpoint`` is called on every rank, and every
rank reads the step from the nearest tier (other nodes from the durable tier).
Needs ``pip install "tierckpt[lightning]"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Any

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError as e:  # pragma: no cover - exercised without the extra only
    raise ImportError(
        'tierckpt.integrations.lightning needs Lightning: pip install "tierckpt[lightning]"'
    ) from e

from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

from ..api import save
from ..config import CheckpointConfig, require_config
from ..dcp.reader import TieredStorageReader
from ..errors import CheckpointNotFoundError

__all__ = ["POINTER_FORMAT", "TierckptCheckpointIO"]

POINTER_FORMAT = "tierckpt-pointer/1"
INT_KEY = "\x00int:"
"""DCP turns every dict key into a string; int keys (optimizer state) are marked with this."""


def _encode(obj: Any) -> Any:
    """``obj`` with every int dict key turned into ``INT_KEY + str(key)``."""
    if isinstance(obj, dict):
        return {(f"{INT_KEY}{k}" if isinstance(k, int) else k): _encode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj: Any) -> Any:
    """The reverse of :func:`_encode`."""
    if isinstance(obj, dict):
        return {
            (
                int(k[len(INT_KEY) :]) if isinstance(k, str) and k.startswith(INT_KEY) else k
            ): _decode(v)
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


class TierckptCheckpointIO(CheckpointIO):
    """Saves Lightning checkpoints as tierckpt steps; ``path`` holds a pointer to the step."""

    def __init__(self, config: CheckpointConfig, *, durable_every_steps: int | None = None) -> None:
        self.config = dataclasses.replace(require_config(config), world_size=1)
        self.durable_every_steps = durable_every_steps
        self._last: tuple[int, int] | None = None  # (step, id of the checkpoint dict)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        step = int(checkpoint.get("global_step", 0))
        durable = bool(self.durable_every_steps) and step % (self.durable_every_steps or 1) == 0
        if self._last != (step, id(checkpoint)):  # last.ckpt + epoch=..ckpt: one save
            save(
                checkpoint,
                config=self.config,
                step=step,
                save_to_durable=durable or None,
                no_dist=True,
            )
            self._last = (step, id(checkpoint))
        path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(
                {"format": POINTER_FORMAT, "namespace": self.config.namespace, "step": step}, f
            )
        os.replace(tmp, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        step = self._pointed_step(os.fspath(path))
        reader = TieredStorageReader(self.config, step=step)
        loaded: dict[str, Any] = _decode(_load_state_dict_from_keys(storage_reader=reader))
        return loaded

    def remove_checkpoint(self, path: Any) -> None:
        """Removes the pointer; the step's bytes are left to tierckpt's retention."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.fspath(path))

    def _pointed_step(self, path: str) -> int:
        try:
            with open(path) as f:
                pointer = json.load(f)
        except FileNotFoundError as e:
            raise CheckpointNotFoundError(f"No checkpoint pointer at {path}.") from e
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointNotFoundError(
                f"{path} is not a tierckpt pointer (a torch.save checkpoint? load it without "
                "TierckptCheckpointIO)."
            ) from e
        if not isinstance(pointer, dict) or pointer.get("format") != POINTER_FORMAT:
            raise CheckpointNotFoundError(f"{path} is not a tierckpt pointer.")
        if pointer.get("namespace") != self.config.namespace:
            raise CheckpointNotFoundError(
                f"{path} points to namespace {pointer.get('namespace')!r}, but this plug-in's "
                f"config is namespace {self.config.namespace!r}."
            )
        return int(pointer["step"])
