"""Timing one operation on every rank at once, with this rank's peak RSS while it runs."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil
import torch.distributed as dist

__all__ = ["MIB", "RssSampler", "timed", "timed_async", "tree_bytes"]

MIB = 2**20


class RssSampler:
    """A thread reading this process's RSS every ``interval_s`` (psutil, /proc/<pid>/statm).

    ``rss`` counts anonymous memory plus mapped file pages (tmpfs mappings included);
    ``anon`` is ``rss - shared``, the private part (heap, tensors).
    """

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._lock = threading.Lock()
        self._peak_rss = 0
        self._peak_anon = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()

    def _sample(self) -> tuple[int, int]:
        mi = self._proc.memory_info()
        return mi.rss, mi.rss - mi.shared

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss, anon = self._sample()
            with self._lock:
                self._peak_rss = max(self._peak_rss, rss)
                self._peak_anon = max(self._peak_anon, anon)

    @contextmanager
    def window(self) -> Iterator[dict[str, float]]:
        """Peak RSS between entry and exit, in MiB, filled into the yielded dict at exit."""
        rss, anon = self._sample()
        with self._lock:
            self._peak_rss, self._peak_anon = rss, anon
        out: dict[str, float] = {"rss_before_mib": rss / MIB}
        yield out
        end_rss, end_anon = self._sample()
        with self._lock:
            out["rss_peak_mib"] = max(self._peak_rss, end_rss) / MIB
            out["anon_peak_mib"] = max(self._peak_anon, end_anon) / MIB

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def timed(fn: Callable[[], Any], sampler: RssSampler) -> dict[str, float]:
    """Run ``fn`` on every rank, started together after a barrier: seconds and RSS."""
    dist.barrier()
    with sampler.window() as rec:
        t0 = time.perf_counter()
        fn()
        rec["s"] = time.perf_counter() - t0
    return rec


def timed_async(start: Callable[[], Any], sampler: RssSampler) -> dict[str, float]:
    """Time an async save: until it returns, until staged, until persisted.

    ``blocked_s`` is the time the training loop cannot touch the state: until
    ``async_save`` returns, or until its staging completes if that is later.
    """
    dist.barrier()
    with sampler.window() as rec:
        t0 = time.perf_counter()
        pending = start()
        rec["return_s"] = time.perf_counter() - t0
        if pending.staged is not None:
            pending.staged()
        rec["blocked_s"] = time.perf_counter() - t0
        pending.done()
        rec["total_s"] = time.perf_counter() - t0
    return rec


def tree_bytes(path: str) -> int:
    """Bytes of the files under ``path`` (allocated blocks, so sparse files count as used)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
            except FileNotFoundError:
                continue
    return total
