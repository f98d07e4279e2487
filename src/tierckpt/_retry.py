"""Retrying this process's failed drains, and the bound on what stays pinned in memory.

While the process lives, a failed drain is retried in the background with exponential
backoff (``durable_retry_initial_s`` doubling up to ``durable_retry_max_s``, with
jitter), newest step first; a drain that succeeds wakes the retry at once. Undrained
steps stay pinned in memory, at most ``durable_max_pending_steps`` of them per node:
past it the oldest is unpinned with an ERROR (the newest save never is).
"""

from __future__ import annotations

import logging
import os
import random
import threading
from collections.abc import Callable

from . import layout
from ._log import logger_for, step_message
from ._pending import Part, owned_elsewhere, part_key, pending_parts
from ._runtime import RUNTIME
from .config import CheckpointConfig
from .drain import mark_failed
from .tiers.base import Tier
from .tiers.durable import open_durable_tier
from .tiers.memory import MemoryTier

__all__ = ["Resume", "Retrier", "bound_pending", "ensure_retrier"]

Resume = Callable[[CheckpointConfig, MemoryTier, Tier, int | None, logging.Logger], list[int]]
"""Uploads a node's pending parts (config, memory, durable, rank, log) -> steps resumed."""


def bound_pending(
    config: CheckpointConfig, memory: MemoryTier, rank: int | None, log: logging.Logger
) -> None:
    """Unpin the oldest pending steps past ``durable_max_pending_steps`` (never the newest)."""
    limit = config.durable_max_pending_steps
    parts = pending_parts(config, memory, rank, log)
    steps = list(dict.fromkeys(p.step for p in parts))  # oldest save first
    if len(steps) <= limit:
        return
    newest = steps[-1]
    unpinned: set[Part] = set()
    for part in parts:
        if len(steps) <= limit:
            break
        if part.step == newest or owned_elsewhere(config, memory, part):
            continue
        unpinned.add(part)
        memory.write(
            layout.step_key(
                config.namespace, part.step, layout.unpinned_name(part.attempt, part.rank)
            ),
            [b""],
        )
        with RUNTIME.resumes.lock:
            error = RUNTIME.resumes.failed.pop(part_key(config, part), "interrupted by a crash")
        log.error(
            step_message(
                part.rank,
                part.step,
                f"unpinned from the memory tier: its durable drain failed ({error}) and "
                f"{len(steps)} steps are pending (durable_max_pending_steps={limit}). Memory "
                f"retention may now evict it ({part.nbytes} bytes) and it will not reach the "
                "durable tier; newer steps are kept.",
            )
        )
        _mark_failed_later(config, part, log)
        if all(p in unpinned for p in parts if p.step == part.step):
            steps.remove(part.step)


def _mark_failed_later(config: CheckpointConfig, part: Part, log: logging.Logger) -> None:
    """In the background (the durable tier may be down): the coordinator stops waiting."""

    def mark() -> None:
        try:
            durable = open_durable_tier(config, check=False)
        except Exception as e:
            log.warning(step_message(part.rank, part.step, f"No failure marker left: {e}"))
            return
        error = RuntimeError("unpinned: durable_max_pending_steps exceeded")
        mark_failed(durable, config.namespace, part.step, part.attempt, part.rank, error, log)

    threading.Thread(target=mark, name="tierckpt-mark-failed", daemon=True).start()


class Retrier:
    """Retries this process's failed drains of one namespace until none is left."""

    def __init__(self, config: CheckpointConfig, rank: int | None, resume: Resume) -> None:
        self.config = config
        self.rank = rank
        self.resume = resume
        self.key = (config.memory_root or "", config.namespace, rank)
        self.wake = threading.Event()

    def run(self) -> None:
        config, log = self.config, logger_for(self.config)
        memory = MemoryTier(config.memory_root or "")
        delay = config.durable_retry_initial_s
        while True:
            if self.wake.wait(delay * random.uniform(0.8, 1.2)):
                self.wake.clear()
                delay = config.durable_retry_initial_s
            try:
                durable = open_durable_tier(config, check=False)
                self.resume(config, memory, durable, self.rank, log)
            except Exception as e:
                log.warning(
                    f"[Rank {self.rank or 0}] Retrying pending durable drains failed: "
                    f"{type(e).__name__}: {e}"
                )
            try:
                bound_pending(config, memory, self.rank, log)
            except OSError as e:
                log.warning(f"[Rank {self.rank or 0}] durable_max_pending_steps not applied: {e}")
            delay = min(max(delay, 1e-3) * 2, config.durable_retry_max_s)
            # decided under the lock: a failure noted meanwhile is seen here
            with RUNTIME.resumes.lock:
                try:
                    parts = pending_parts(config, memory, self.rank, log)
                except OSError:
                    parts = []
                if not os.path.isdir(memory.path(config.namespace)) or not any(
                    not owned_elsewhere(config, memory, p) for p in parts
                ):
                    del RUNTIME.resumes.retriers[self.key]
                    return
            log.warning(
                f"[Rank {self.rank or 0}] {len({p.step for p in parts})} durable step(s) "
                f"({sum(p.nbytes for p in parts)} bytes) stay pinned in the memory tier awaiting "
                f"{config.durable_base_path}; next retry in about {delay:.1f}s."
            )


def ensure_retrier(config: CheckpointConfig, rank: int | None, resume: Resume) -> None:
    """Start the retrier of this namespace and rank unless one runs; it retries with ``resume``."""
    key = (config.memory_root or "", config.namespace, rank)
    with RUNTIME.resumes.lock:
        if key in RUNTIME.resumes.retriers:
            return
        retrier = Retrier(config, rank, resume)
        RUNTIME.resumes.retriers[key] = retrier
    threading.Thread(
        target=retrier.run, name=f"tierckpt-retry-{config.namespace}", daemon=True
    ).start()
