"""Processes of the node-memory tests (issue 12 item 2): jobs that save and exit, and a job
that stays alive holding its namespace."""

from __future__ import annotations

import os
import time
from typing import Any

import distworkers as w
from tierckpt import CheckpointConfig


def w_save_and_exit(rank: int, world_size: int, cfg: CheckpointConfig, step: int) -> int:
    """Save one step and return (the process then exits, leaving its namespace behind)."""
    w.save(cfg, w.plain_state(step, scale=40), step)
    return step


def w_first_save(rank: int, world_size: int, cfg: CheckpointConfig) -> dict[str, Any]:
    """A new job's first save: its errors (None when it worked) and what it then loads."""
    errors = w.try_save(cfg, w.plain_state(1, scale=40), 1)
    out: dict[str, Any] = {"errors": errors}
    if errors is None:
        sd = w.blank_plain_state(scale=40)
        out["load"] = w.load(cfg, sd)
        out["same"] = w.full_fingerprint(sd) == w.full_fingerprint(w.plain_state(1, scale=40))
    return out


def hold(cfg: CheckpointConfig, ready: str, stop: str) -> None:
    """A live job: save step 1, say so in ``ready``, stay alive until ``stop`` exists."""
    w.save(cfg, w.plain_state(1, scale=40), 1)
    with open(ready, "w") as f:
        f.write(str(os.getpid()))
    deadline = time.monotonic() + 120
    while not os.path.exists(stop) and time.monotonic() < deadline:
        time.sleep(0.05)
