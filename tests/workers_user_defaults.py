"""Rank workers of ``test_user_defaults.py`` (issue 12: items 1, 5, 6)."""

from __future__ import annotations

from typing import Any

import tierckpt
from distworkers import plain_state
from tierckpt import CheckpointConfig
from workers_durable import _crash_in_drain


def w_save_durable_killed_before_drain(rank: int, world_size: int, cfg: CheckpointConfig) -> None:
    """Save step 1 durable; once it is committed in memory, its drain is SIGKILLed after
    the data file is uploaded (``drain.after_data``)."""
    _crash_in_drain(cfg, 1, rank, "drain.after_data")


def w_save_step_durable(
    rank: int, world_size: int, cfg: CheckpointConfig, step: int, seed: int
) -> Any:
    """Save ``step`` durable (values from ``seed``) and wait for its durable commit."""
    tierckpt.save(plain_state(seed=seed), config=cfg, step=step, save_to_durable=True).result(
        timeout=60
    )
    tierckpt.wait_for_drains(timeout=60)
    return True


def w_save_and_load(rank: int, world_size: int, cfg: CheckpointConfig) -> int:
    """Save step 40 durable, wait for it, load it back (for the log lines on stderr)."""
    tierckpt.save(plain_state(seed=40), config=cfg, step=40, save_to_durable=True).result(
        timeout=60
    )
    sd = plain_state(seed=0)
    return tierckpt.load(sd, config=cfg)
