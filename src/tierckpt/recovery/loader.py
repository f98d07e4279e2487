"""A data loader addressed by step, resumable at the exact next batch, with a tmpfs cache.

``StepLoader(batch_fn)`` returns ``batch_fn(i)`` for step ``i``: after recovery at step
``s`` the next batch is ``batch_fn(s + 1)``, the one an uninterrupted run would have used.
With ``cache_dir`` (under /dev/shm) and ``prefetch=N``, a background thread writes the next
``N`` batches there ahead of time; they outlive the process, so a replaced rank reads its
first batches from RAM instead of waiting on the data pipeline.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["StepLoader"]


class StepLoader:
    """Batches by step index, optionally prefetched into a tmpfs cache directory."""

    def __init__(
        self,
        batch_fn: Callable[[int], Any],
        *,
        cache_dir: str | None = None,
        prefetch: int = 0,
    ) -> None:
        self.batch_fn = batch_fn
        self.cache_dir = cache_dir
        self.prefetch = prefetch if cache_dir else 0
        self.cache_hits = 0
        self._wanted = -1
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        if cache_dir:
            os.makedirs(cache_dir, mode=0o700, exist_ok=True)

    def _path(self, index: int) -> str:
        assert self.cache_dir is not None
        return os.path.join(self.cache_dir, f"batch-{index}.pt")

    def get(self, index: int) -> Any:
        """The batch of step ``index`` (from the cache when it is there)."""
        batch = None
        if self.cache_dir and os.path.exists(self._path(index)):
            with contextlib.suppress(Exception):
                batch = torch.load(self._path(index), weights_only=False)
                self.cache_hits += 1
        if batch is None:
            batch = self.batch_fn(index)
        if self.prefetch:
            self._ahead(index)
        return batch

    def _ahead(self, index: int) -> None:
        with self._cv:
            self._wanted = index
            self._cv.notify()
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._fill, name="tierckpt-prefetch", daemon=True
            )
            self._thread.start()

    def _fill(self) -> None:
        while True:
            with self._cv:
                while self._wanted < 0 and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                at, self._wanted = self._wanted, -1
            for name in os.listdir(self.cache_dir or "."):
                if name.endswith(".pt") and name.startswith("batch-") and int(name[6:-3]) <= at:
                    with contextlib.suppress(OSError):
                        os.unlink(os.path.join(self.cache_dir or ".", name))
            for i in range(at + 1, at + 1 + self.prefetch):
                path = self._path(i)
                if not os.path.exists(path):
                    tmp = f"{path}.tmp-{os.getpid()}"
                    torch.save(self.batch_fn(i), tmp)
                    os.replace(tmp, path)

    def close(self, remove: bool = True) -> None:
        """Stop prefetching; remove the cache directory (a finished run needs it no more)."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(10)
        if remove and self.cache_dir:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
