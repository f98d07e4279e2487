"""Loading memory-tier bytes into GPU tensors through a small ring of pinned host buffers.

A restarted process has no pinned memory: pinning a buffer the size of the state costs as
much as reading it (page faults plus locking, ~2.6 GB/s measured on an H200 host), and a copy
from pageable memory runs at a quarter of the link's speed. So a load reads each blob piece
by piece into one of a few small pinned slots (hashing each piece while it is in cache) and
queues the slot's host-to-device copy on a side stream; a slot is reused once its copy has
landed. The reads and the copies overlap; the ring is a few MiB, allocated once per load.

On a CPU ``device`` (what CI runs) the slots are plain memory and the copies synchronous:
the chunking and hashing are the same code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["SLOT_BYTES", "SLOTS", "PinnedRing"]

SLOT_BYTES = 8 << 20
"""One slot: long enough that a copy is far past its launch cost, short enough to stay warm."""
SLOTS = 4


class PinnedRing:
    """``slots`` host buffers of ``slot_bytes`` feeding copies into tensors on ``device``."""

    def __init__(
        self, device: torch.device, slot_bytes: int = SLOT_BYTES, slots: int = SLOTS
    ) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._slots = [
            torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(slots)
        ]
        arrays: list[Any] = [s.numpy() for s in self._slots]
        self._views = [memoryview(a) for a in arrays]
        self._events: list[Any] = [None] * slots
        self._next = 0
        self._lock = threading.Lock()
        self._slot_locks = [threading.Lock() for _ in range(slots)]
        self._stream: Any = None
        if self.cuda:
            self._stream = torch.cuda.Stream(device=device)
            # Copies land after whatever the training stream queued on the targets.
            self._stream.wait_stream(torch.cuda.current_stream(device))

    @property
    def slot_bytes(self) -> int:
        return self._slots[0].numel()

    def copy_in(self, target: torch.Tensor, fill: Callable[[memoryview, int], None]) -> None:
        """Fill ``target`` (a flat uint8 tensor on the device) slot by slot:
        ``fill(slot_view, done)`` writes its next ``len(slot_view)`` bytes."""
        nbytes = target.numel()
        done = 0
        while done < nbytes:
            with self._lock:
                index = self._next
                self._next = (index + 1) % len(self._slots)
            with self._slot_locks[index]:  # one reader's until its copy is queued
                event = self._events[index]
                if event is not None:
                    event.synchronize()  # its previous copy has landed: the slot is free
                n = min(self.slot_bytes, nbytes - done)
                fill(self._views[index][:n], done)
                self._queue(index, target[done : done + n], n)
            done += n

    def _queue(self, index: int, dest: torch.Tensor, n: int) -> None:
        source = self._slots[index][:n]
        if not self.cuda:
            dest.copy_(source)
            return
        with torch.cuda.stream(self._stream):
            dest.copy_(source, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self._stream)
        self._events[index] = event

    def finish(self) -> None:
        """Wait until every queued copy has landed (before the targets are handed over)."""
        if self._stream is not None:
            self._stream.synchronize()
