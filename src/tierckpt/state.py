"""State beyond tensors, as DCP ``Stateful`` objects saved and restored with the step.

- :class:`ModelState`: model + optimizer(s) through ``get_state_dict`` / ``set_state_dict``
  (plain, DDP and FSDP2 models).
- :class:`RNGState`: torch (CPU and CUDA), numpy and Python RNG states, one per rank.
- :class:`PerRank`: any ``state_dict()`` / ``load_state_dict()`` object whose state differs
  per rank (a data loader's position), saved under a key of its own for each rank.
- :class:`ResumableIterator`: the data-position protocol for loaders without one (when
  torchdata's ``StatefulDataLoader`` is not used): it counts the batches handed out and, on
  restore, re-creates the epoch's iterator and skips that many.
- :class:`Batches`: an endless iterator over a loader's epochs, saved with its position
  (torchdata's ``StatefulDataLoader`` state, or the :class:`ResumableIterator` protocol).
- :class:`TrainingState`: a dict of all of them, what :meth:`CheckpointManager.save` takes.

Per-rank entries are saved under ``rank_<r>`` keys, so a restore needs the same world size.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from ._dist import process_rank

__all__ = ["Batches", "ModelState", "PerRank", "RNGState", "ResumableIterator", "TrainingState"]


class ModelState:
    """A model and its optimizer(s) as one ``Stateful``: ``{"model": ..., "optim": ...}``."""

    def __init__(self, model: torch.nn.Module, optimizer: Any = None) -> None:
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            msd, _ = get_state_dict(self.model, [])
            return {"model": msd}
        msd, osd = get_state_dict(self.model, self.optimizer)
        return {"model": msd, "optim": osd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_state_dict(self.model, [], model_state_dict=state["model"], optim_state_dict={})
            return
        set_state_dict(
            self.model,
            self.optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


class PerRank:
    """``obj``'s state under ``rank_<r>``: every rank saves and restores its own."""

    def __init__(self, obj: Any, rank: int | None = None) -> None:
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(
                f"{type(obj).__name__} has no state_dict()/load_state_dict(): wrap a loader "
                "in tierckpt.ResumableIterator, or use torchdata's StatefulDataLoader."
            )
        self.obj = obj
        self.rank = rank

    def _key(self) -> str:
        return f"rank_{process_rank() if self.rank is None else self.rank}"

    def state_dict(self) -> dict[str, Any]:
        return {self._key(): self.obj.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.obj.load_state_dict(state[self._key()])


class RNGState:
    """This rank's RNG states: torch CPU (and every CUDA device once CUDA is initialised),
    numpy's global generator when numpy is installed, and Python's ``random``."""

    def __init__(self, rank: int | None = None) -> None:
        self.rank = rank

    def _key(self) -> str:
        return f"rank_{process_rank() if self.rank is None else self.rank}"

    def state_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out["cuda"] = torch.cuda.get_rng_state_all()
        try:
            import numpy as np
        except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
            pass
        else:
            out["numpy"] = np.random.get_state()
        return {self._key(): out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state[self._key()]
        torch.set_rng_state(mine["torch"])
        random.setstate(_as_tuple(mine["python"]))
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(mine["cuda"])
        if "numpy" in mine:
            import numpy as np

            np.random.set_state(mine["numpy"])


def _as_tuple(value: Any) -> Any:
    """Python's RNG state with its lists turned back into tuples (``random.setstate``)."""
    if isinstance(value, list | tuple):
        return tuple(_as_tuple(v) for v in value)
    return value


class ResumableIterator:
    """Batches of ``make_iter(epoch)``, with a position that survives a restart.

    ``make_iter(epoch)`` must yield the same batches in the same order for the same epoch
    (e.g. ``DataLoader`` over a ``DistributedSampler`` after ``set_epoch(epoch)``, or a
    loader with a seeded ``generator``). The state is ``{"epoch", "offset"}``: the batches
    handed out in this epoch. After :meth:`load_state_dict` the next batch is the one that
    followed the save; the skipped batches are produced again and dropped, so the cost of a
    restore grows with the offset. Iterating past the end starts the next epoch.
    """

    def __init__(self, make_iter: Callable[[int], Iterable[Any]], epoch: int = 0) -> None:
        self.make_iter = make_iter
        self.epoch = epoch
        self.offset = 0
        self._it: Iterator[Any] | None = None

    def __iter__(self) -> ResumableIterator:
        return self

    def __next__(self) -> Any:
        while True:
            if self._it is None:
                self._it = iter(self.make_iter(self.epoch))
                for _ in range(self.offset):
                    next(self._it)
            try:
                item = next(self._it)
            except StopIteration:
                self.epoch, self.offset, self._it = self.epoch + 1, 0, None
                continue
            self.offset += 1
            return item

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.offset, self._it = int(state["epoch"]), int(state["offset"]), None


class Batches:
    """An endless iterator over a loader's epochs whose position is saved with the step.

    For a loader with ``state_dict()`` / ``load_state_dict()`` (torchdata's
    ``StatefulDataLoader``) the state is the loader's own plus its ``generator``'s; after a
    restore the iterator is re-created at once and the RNGs it draws from on creation are put
    back, so the batches *and* the random stream after them match an uninterrupted run. Any
    other loader is treated as :class:`ResumableIterator` (``loader.sampler.set_epoch`` is
    called each epoch when it exists). ``epoch`` counts the epochs started.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.stateful = hasattr(loader, "state_dict") and hasattr(loader, "load_state_dict")
        self._fallback = None if self.stateful else ResumableIterator(self._epoch_iter)
        self.epoch = 0
        self._it: Iterator[Any] | None = None

    def _epoch_iter(self, epoch: int) -> Iterable[Any]:
        set_epoch = getattr(getattr(self.loader, "sampler", None), "set_epoch", None)
        if set_epoch is not None:
            set_epoch(epoch)
        loader: Iterable[Any] = self.loader
        return loader

    def __iter__(self) -> Batches:
        return self

    def __next__(self) -> Any:
        if self._fallback is not None:
            item = next(self._fallback)
            self.epoch = self._fallback.epoch
            return item
        while True:
            if self._it is None:
                self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                self._it = None
                self.epoch += 1

    def _generator(self) -> torch.Generator | None:
        g = getattr(self.loader, "generator", None)
        return g if isinstance(g, torch.Generator) else None

    def state_dict(self) -> dict[str, Any]:
        if self._fallback is not None:
            return {"fallback": self._fallback.state_dict()}
        g = self._generator()
        out: dict[str, Any] = {"loader": self.loader.state_dict(), "epoch": self.epoch}
        if g is not None:
            out["generator"] = g.get_state()
        return out

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._fallback is not None:
            self._fallback.load_state_dict(state["fallback"])
            self.epoch = self._fallback.epoch
            return
        self.epoch = int(state["epoch"])
        self.loader.load_state_dict(state["loader"])
        rng = torch.get_rng_state()
        self._it = iter(self.loader)  # draws a base seed; the saved streams are put back below
        torch.set_rng_state(rng)
        g = self._generator()
        if g is not None and "generator" in state:
            g.set_state(state["generator"])


class TrainingState(dict[str, Any]):
    """Everything a step needs to resume exactly, as the dict ``save`` / ``restore`` take.

    Keys: ``"app"`` (:class:`ModelState` of ``model`` and ``optimizer``), ``"scheduler"``,
    ``"rng"`` (:class:`RNGState`, unless ``rng=False``), ``"data"`` (:class:`PerRank` of
    ``batches``: a :class:`Batches`, or any object with ``state_dict`` / ``load_state_dict``;
    it comes after ``"rng"`` because DCP restores ``Stateful`` values in key order and a
    :class:`Batches` puts back the RNG its restore draws from), and any ``extra`` items (``Stateful`` objects or plain values; plain values are replaced
    by the restored ones, read them back from the dict).
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        optimizer: Any = None,
        *,
        scheduler: Any = None,
        batches: Any = None,
        rng: bool = True,
        **extra: Any,
    ) -> None:
        super().__init__()
        if model is not None:
            self["app"] = ModelState(model, optimizer)
        if scheduler is not None:
            self["scheduler"] = scheduler
        if rng:
            self["rng"] = RNGState()
        if batches is not None:
            self["data"] = PerRank(batches)
        self.update(extra)
