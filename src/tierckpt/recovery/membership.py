"""Generations and membership in the job's store, the store created once and reused.

Every recovery *generation* ``g`` forms its process group on ``PrefixStore(f"{root}/g{g}/pg",
store)``; no full re-rendezvous happens. Keys under ``root`` (one per launch attempt):

- ``gen``: the current generation. A rank that sees a fault in generation ``g`` moves it to
  ``g + 1`` with ``compare_set``, so several ranks (and the launcher) seeing the same fault
  bump it once.
- ``rank<r>/gen``: the generation rank ``r`` last tried to join (the launcher reads it when
  ``r`` dies, to bump that generation).
- ``g<g>/joined``: a counter; the group is formed once every rank has joined.
- ``g<g>/fault``: what was seen first (the rank, the reason), for the logs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from torch.distributed import Store

from .errors import RecoveryError

__all__ = ["Membership", "store_root"]

POLL_S = 0.01


def store_root() -> str:
    """The key prefix of this launch attempt (a torchrun restart gets a fresh one)."""
    run_id = os.environ.get("TIERCKPT_RUN_ID") or os.environ.get("TORCHELASTIC_RUN_ID", "job")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"tierckpt/{run_id}/a{attempt}"


@dataclass
class Membership:
    """One rank's view of the generations in ``store`` under ``root``."""

    store: Store
    root: str
    rank: int
    world_size: int

    def _key(self, name: str) -> str:
        return f"{self.root}/{name}"

    def generation(self) -> int:
        """The current generation (0 when none was set yet)."""
        key = self._key("gen")
        self.store.compare_set(key, "", "0")
        return int(self.store.get(key))

    def bump(self, seen: int, reason: str) -> int:
        """Move the generation past ``seen`` (once, whoever asks); the new current one."""
        key = self._key("gen")
        self.store.compare_set(key, "", "0")
        self.store.compare_set(key, str(seen), str(seen + 1))
        self.store.compare_set(self._key(f"g{seen}/fault"), "", f"rank {self.rank}: {reason}")
        return int(self.store.get(key))

    def fault_of(self, gen: int) -> str:
        """What ended generation ``gen`` first, as reported ("" if nothing was)."""
        key = self._key(f"g{gen}/fault")
        return self.store.get(key).decode() if self.store.check([key]) else ""

    def join(self, timeout_s: float) -> int:
        """Join the current generation; returns it once every rank has joined.

        A generation that moves on meanwhile (another failure) is left for the new one.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            gen = self.generation()
            self.store.set(self._key(f"rank{self.rank}/gen"), str(gen))
            counter = self._key(f"g{gen}/joined")
            self.store.add(counter, 1)
            while True:
                if self.store.add(counter, 0) >= self.world_size:
                    return gen
                if self.generation() != gen:
                    break  # a failure during recovery: join the next generation
                if time.monotonic() > deadline:
                    raise RecoveryError(
                        f"rank {self.rank}: only {self.store.add(counter, 0)} of "
                        f"{self.world_size} ranks joined generation {gen} within {timeout_s} s. "
                        "A replaced rank did not come back: is the job run by tierckpt-run "
                        "(plain torchrun restarts every worker instead)?"
                    )
                time.sleep(POLL_S)
