"""Rank workers for tests/test_manager.py (spawned: module-level functions)."""

from __future__ import annotations

import os
import random
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torchdata.stateful_dataloader import StatefulDataLoader

import tierckpt

warnings.filterwarnings("ignore")


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 64),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 4),
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def _loader(rank: int) -> StatefulDataLoader:
    g = torch.Generator().manual_seed(7 + rank)
    data = torch.utils.data.TensorDataset(
        torch.randn(48, 16, generator=g), torch.randn(48, 4, generator=g)
    )
    return StatefulDataLoader(
        data, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(rank)
    )


def w_exact_resume(
    rank: int,
    world_size: int,
    cfg: tierckpt.CheckpointConfig,
    out: str,
    steps: int,
    crash_at: int,
    tag: str,
) -> Any:
    """FSDP2 + AdamW + StepLR + dropout + a shuffling StatefulDataLoader; every step saved to
    memory, every 2nd to durable; losses (float.hex) appended to a file as they happen.
    ``crash_at``: both ranks SIGKILL themselves right after saving that step."""
    torch.use_deterministic_algorithms(True)
    model = _model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=3, gamma=0.5)
    batches = tierckpt.Batches(_loader(rank))  # epochs, resumed mid-epoch
    random.seed(1234)
    np.random.seed(1234)
    torch.manual_seed(1234 + rank)  # the dropout masks differ per rank, as in real jobs
    state = tierckpt.TrainingState(model, optim, scheduler=sched, batches=batches)
    log = Path(out) / f"loss-{tag}-r{rank}.txt"
    with tierckpt.CheckpointManager(cfg, every_steps=1, durable_every_steps=2, keep=2) as mgr:
        restored = mgr.restore(state)
        for step in range((restored or 0) + 1, steps + 1):
            x, y = next(batches)
            # python / numpy RNG feed the "augmentation", so their restore matters too
            x = x * (1.0 + 0.01 * random.random()) + float(np.random.rand()) * 0.01
            loss = nn.functional.mse_loss(model(x), y)
            optim.zero_grad(set_to_none=True)
            loss.backward()
            optim.step()
            sched.step()
            with open(log, "a") as f:
                f.write(f"{step} {loss.item().hex()}\n")
            mgr.save(step, state)
            if step == crash_at:
                mgr.wait()  # the step is committed in memory; now die as a node would
                os.kill(os.getpid(), signal.SIGKILL)
        mgr.wait(durable=True)
    return {"restored": restored, "last_restore": mgr.last_restore}


def w_sigterm(rank: int, world_size: int, cfg: tierckpt.CheckpointConfig, out: str) -> Any:
    """Save every step to memory only until a SIGTERM (sent to one rank) stops the job."""
    Path(out, f"pid-r{rank}").write_text(str(os.getpid()))
    state = {"w": torch.zeros(1000), "step": 0}
    mgr = tierckpt.CheckpointManager(cfg, every_steps=1, grace_s=30)
    try:
        for step in range(1, 2000):
            state["w"] += 1
            state["step"] = step
            mgr.save(step, state)
            Path(out, f"step-r{rank}").write_text(str(step))
            time.sleep(0.02)
    except tierckpt.Preempted as e:
        return {"step": e.step, "durable": e.durable, "code": e.code}
    return {"step": None}
