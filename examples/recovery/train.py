"""A data-parallel MLP trained under ``tierckpt.recovery.run``, with injectable faults.

Used by ``examples/recovery_demo.py``, ``tests/test_recovery.py`` and
``benchmarks/recovery.py``; run it under ``tierckpt-run`` (in-place recovery) or
``torchrun`` (a kill restarts every worker, which restore from the memory tier)::

    tierckpt-run --nproc-per-node 2 examples/recovery/train.py --out /tmp/r --fault kill:1:7

``--fault KIND:RANK:STEP[:LIFE]`` (repeatable) fires once in life LIFE (default 0: the
first process; a replacement is life 1, 2, ...) of RANK, in the
middle of STEP (after backward, before the gradient all-reduce): ``kill`` (SIGKILL),
``raise`` (an exception in the user's code), ``hang`` (sleeps forever), ``recovery-kill``
(the replacement of RANK is killed again while it recovers: STEP is ignored). Each rank
writes ``<out>/r<rank>-l<life>.json``: its losses by step, pid, recoveries, and a hash of the
final parameters.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

import tierckpt
from tierckpt import recovery


class AppState(Stateful):
    """Model and optimizer, through DCP's state-dict helpers."""

    def __init__(self, model: torch.nn.Module, optim: torch.optim.Optimizer) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optim, model_state_dict=sd["model"], optim_state_dict=sd["optim"]
        )


def build(
    hidden: int, layers: int, *, init: bool = True
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The model (the same on every rank) and its optimizer; ``init=False`` leaves the
    parameters uninitialised (a replaced rank: recovery overwrites them)."""
    torch.manual_seed(0)
    dims = [32] + [hidden] * layers + [1]
    mods: list[torch.nn.Module] = []
    with torch.device("cpu" if init else "meta"):
        for i in range(len(dims) - 1):
            mods += [torch.nn.Linear(dims[i], dims[i + 1]), torch.nn.Tanh()]
    model = torch.nn.Sequential(*mods[:-1])
    if not init:
        model.to_empty(device="cpu")
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def make_batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s batch of step ``step``: deterministic, the same in every run."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(16, 32, generator=g)
    return x, x.sum(dim=1, keepdim=True).sin()


def params_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--namespace", default="recovery")
    p.add_argument("--memory-root", default=None)
    p.add_argument("--durable", default=None)
    p.add_argument("--durable-every", type=int, default=None)
    p.add_argument("--fault", action="append", default=[])
    p.add_argument("--hang-timeout", type=float, default=3.0)
    p.add_argument("--no-replica", action="store_true", help="restore from the checkpoint")
    p.add_argument("--manager", action="store_true", help="checkpoint with CheckpointManager")
    p.add_argument("--cache-dir", default=None, help="tmpfs batch cache (per rank subdir)")
    p.add_argument("--step-time", type=float, default=0.0, help="sleep per step (demo pacing)")
    p.add_argument(
        "--fresh-memory-per-attempt",
        action="store_true",
        help="a torchrun restart uses an empty memory tier (restores from durable)",
    )
    a = p.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    logging.getLogger("tierckpt").setLevel(logging.INFO)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    life = int(
        os.environ.get("TIERCKPT_REPLACEMENT") or os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0
    )
    faults = [(f.split(":") + ["0", "0"])[:4] for f in a.fault]  # kind, rank, step, life
    fired: set[str] = set()

    # A replaced rank's parameters are filled by recovery: skip their initialisation.
    model, optim = build(a.hidden, a.layers, init=not recovery.is_replacement())
    state = {"app": AppState(model, optim)}

    def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return make_batch(step, rank)

    losses: dict[int, str] = {}

    def fault_at(step: int) -> None:
        for kind, r, s, lf in faults:
            key = f"{kind}:{r}:{s}"
            if int(lf) != life or int(r) != rank or key in fired or kind == "recovery-kill":
                continue
            if int(s) == step:
                fired.add(key)
                with open(os.path.join(a.out, "fault-time"), "w") as f:
                    f.write(repr(time.time()))
                if kind == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                if kind == "raise":
                    raise ValueError(f"injected error in rank {rank} at step {step}")
                if kind == "hang":
                    time.sleep(3600)

    def train_step(step: int, b: tuple[torch.Tensor, torch.Tensor]) -> None:
        x, y = b
        optim.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        fault_at(step)
        for prm in model.parameters():
            assert prm.grad is not None
            dist.all_reduce(prm.grad)
            prm.grad /= world
        total = loss.detach().clone()
        dist.all_reduce(total)
        optim.step()
        losses[step] = (total / world).item().hex()
        step_ends[step] = time.time()
        if a.step_time:
            time.sleep(a.step_time)
        if rank == 0 and step % 5 == 0:
            print(f"demo| step {step} loss {float.fromhex(losses[step]):.6f}", flush=True)

    events: list[tuple[str, float]] = []
    step_ends: dict[int, float] = {}

    def on_event(name: str, info: dict[str, Any]) -> None:
        events.append((name, time.time()))
        if (
            name == "joined"
            and life == 1
            and any(k == "recovery-kill" and int(r) == rank for k, r, _, _ in faults)
        ):
            os.kill(os.getpid(), signal.SIGKILL)  # a second failure, during recovery

    root = a.memory_root
    if root and a.fresh_memory_per_attempt:
        root = f"{root}-a{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    cfg = tierckpt.CheckpointConfig(
        namespace=a.namespace, world_size=world, memory_root=root, durable_base_path=a.durable
    )
    ckpt: recovery.Checkpointer
    if a.manager:  # the manager layer: re-formed with the group (CheckpointManager.reform)
        ckpt = tierckpt.CheckpointManager(
            cfg, every_steps=1, durable_every_steps=a.durable_every, preemption=False
        )
    else:
        ckpt = recovery.ApiCheckpointer(
            cfg,
            every_steps=1,
            durable_every_steps=a.durable_every,
            timeout_s=max(a.hang_timeout, 2.0),
        )
    cache = os.path.join(a.cache_dir, f"r{rank}") if a.cache_dir else None
    loader = recovery.StepLoader(batch, cache_dir=cache, prefetch=4 if cache else 0)
    opts = recovery.RecoveryOptions(
        hang_timeout_s=a.hang_timeout,
        join_timeout_s=60,
        replicated=not a.no_replica,
        on_event=on_event,
    )
    t_start = time.time()
    res = recovery.run(train_step, state, ckpt, steps=a.steps, loader=loader, options=opts)
    out = {
        "rank": rank,
        "life": life,
        "pid": os.getpid(),
        "losses": losses,
        "final": params_hash(model),
        "generation": res.generation,
        "start": t_start,
        "end": time.time(),
        "spare_ready": os.environ.get("TIERCKPT_SPARE_READY_AT"),
        "spawned": os.environ.get("TIERCKPT_SPAWNED_AT"),
        "cache_hits": loader.cache_hits,
        "events": events,
        "step_ends": step_ends,
        "recoveries": [
            {
                "generation": r.generation,
                "fault": r.fault,
                "resumed_after": r.resumed_after,
                "source": r.source,
                "phases": r.phases,
                "steps_lost": r.steps_lost,
            }
            for r in res.recoveries
        ],
    }
    with open(os.path.join(a.out, f"r{rank}-l{life}.json"), "w") as f:
        json.dump(out, f)
    tierckpt.wait_for_drains(timeout=60)
    os._exit(0)  # gloo may abort in its C++ teardown at interpreter exit (see tests)


if __name__ == "__main__":
    main()
