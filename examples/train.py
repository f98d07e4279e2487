"""A torchrun FSDP2 training script using ``tierckpt.CheckpointManager``.

    torchrun --nproc-per-node 2 examples/train.py --namespace my-run --work-dir /tmp/run

Trains a small MLP sharded with FSDP2 (``fully_shard``) on CPU (gloo) on synthetic data.
The manager saves every step to the memory tier (async) and every ``--durable-every``-th
step also to the durable tier, restores the newest restorable save on start, and on SIGTERM
saves the current step durably before the process exits. ``examples/demo.py`` (``make
demo``) launches it: on the first attempt rank ``--crash-rank`` SIGKILLs itself at
``--crash-at``; torchrun restarts the workers, which resume from the newest step every rank
can restore.

Checks: each rank records a digest of the state it saved at every step (a side file) and,
after a restore, requires the loaded state to be bit-exact to it. At the end each rank writes
a JSON summary (final step, digest of the final state, where the restore read from) that the
demo compares with an uninterrupted reference run.

Lines meant for the demo's output start with ``demo|``; everything else is shown only with
``--verbose``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

import tierckpt

MARK = "demo|"
BATCH, IN, HIDDEN, OUT = 32, 64, 256, 10


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--namespace", required=True, help="tierckpt namespace of this run")
    p.add_argument("--memory-root", help="memory tier root (default: tierckpt's)")
    p.add_argument("--durable", help="durable_base_path (default: ./checkpoints)")
    p.add_argument("--work-dir", required=True, help="where side files and results go")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--durable-every", type=int, default=10)
    p.add_argument("--crash-at", type=int, default=0, help="step to crash at; 0: never")
    p.add_argument("--crash-rank", type=int, default=1)
    p.add_argument("--no-checkpoint", action="store_true", help="reference run: no tierckpt")
    p.add_argument("--verbose", action="store_true", help="tierckpt's INFO logs too")
    return p.parse_args()


class Out:
    """Prints ``demo|[attempt a] text`` lines (rank 0 only unless ``every_rank``)."""

    def __init__(self, rank: int, attempt: int) -> None:
        self.rank = rank
        self.prefix = f"{MARK}[attempt {attempt}]"

    def __call__(self, text: str, *, every_rank: bool = False) -> None:
        if every_rank:
            emit(f"{self.prefix} rank {self.rank}: {text}")
        elif self.rank == 0:
            emit(f"{self.prefix} {text}")


def emit(line: str) -> None:
    """One write per line: the ranks share torchrun's stdout pipe and must not interleave."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def setup_logging(verbose: bool, prefix: str) -> None:
    """tierckpt's warnings (and with --verbose its INFO lines) go to stdout, marked for the demo."""
    log = logging.getLogger("tierckpt")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(f"{prefix} tierckpt %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO if verbose else logging.WARNING)
    log.propagate = False


def make_model() -> nn.Module:
    """The MLP, each Linear and the whole model sharded over the ranks with FSDP2."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, OUT),
    )
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch for (step, rank): labels from a fixed random teacher."""
    g = torch.Generator().manual_seed(1_000 * step + rank)
    x = torch.randn(BATCH, IN, generator=g)
    teacher = torch.Generator().manual_seed(12345)
    w = torch.randn(IN, OUT, generator=teacher)
    return x, (x @ w).argmax(dim=1)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (FSDP2), the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def digest(model: nn.Module, optim: torch.optim.Optimizer) -> str:
    """sha256 over this rank's shards of every parameter and optimizer state, in a fixed order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(_local(t).detach().cpu().numpy().tobytes())
    state = optim.state_dict()["state"]
    for pid in sorted(state):
        for key, value in sorted(state[pid].items()):
            h.update(f"{pid}.{key}".encode())
            if isinstance(value, torch.Tensor):
                h.update(_local(value).detach().cpu().numpy().tobytes())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def saved_digest(work_dir: Path, rank: int, step: int) -> str | None:
    """The digest this rank recorded when it saved ``step`` (the last record wins)."""
    path = work_dir / f"saved-r{rank}.jsonl"
    found = None
    if path.exists():
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            if rec["step"] == step:
                found = rec["digest"]
    return found


def main() -> int:
    args = parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) + 1
    out = Out(rank, attempt)
    setup_logging(args.verbose, f"{out.prefix} rank {rank}:")
    work_dir = Path(args.work_dir)
    model = make_model()
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    # Model + optimizer (through get_state_dict: FSDP2 shards), RNG states of every rank.
    state = tierckpt.TrainingState(model, optim)

    mgr = None
    start, restored = 0, None
    if not args.no_checkpoint:
        cfg = tierckpt.CheckpointConfig(
            namespace=args.namespace,
            world_size=world,
            memory_root=args.memory_root,
            durable_base_path=args.durable,
        )
        if attempt > 1:
            out(f"torchrun restarted the workers (restart {attempt - 1})")
        # memory every step (async), durable every --durable-every steps, SIGTERM handled
        mgr = tierckpt.CheckpointManager(cfg, every_steps=1, durable_every_steps=args.durable_every)
        step = mgr.restore(state)  # the newest save every rank can restore; None: none yet
        if step is None:
            out("no checkpoint yet: starting from scratch")
        else:
            start = step
            restored = dict(mgr.last_restore)
            restored["bytes_by_tier"] = {k: v for k, v in restored["bytes_by_tier"].items() if v}
            restored["tier"] = "+".join(restored["bytes_by_tier"]) or "nowhere"
            expected = saved_digest(work_dir, rank, start)
            got = digest(model, optim)
            exact = got == expected
            nbytes = ", ".join(f"{n:,} B from {t}" for t, n in restored["bytes_by_tier"].items())
            out(
                f"resumed from step {start} in {restored['seconds'] * 1000:.0f} ms "
                f"({nbytes}); model + optimizer "
                + ("bit-exact to what was saved" if exact else "DIFFER from what was saved"),
                every_rank=True,
            )
            if not exact:
                emit(f"{MARK}FAIL rank {rank}: digest {got} != saved {expected}")
                return 3

    durable_steps: list[int] = []
    for step in range(start + 1, args.steps + 1):
        x, y = batch(step, rank)
        optim.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optim.step()
        if mgr is None:
            continue
        if attempt == 1 and step == args.crash_at and rank == args.crash_rank:
            mgr.wait()  # the previous step is committed in memory
            out(f"step {step}: simulating a crash: SIGKILL to myself", every_rank=True)
            os.kill(os.getpid(), signal.SIGKILL)
        mgr.save(step, state)  # raises if the previous save failed
        with open(work_dir / f"saved-r{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "digest": digest(model, optim)}) + "\n")
        durable = step % args.durable_every == 0
        if durable:
            durable_steps.append(step)
        if step % 10 == 0:
            where = "memory + durable" if durable else "memory"
            out(f"step {step:3d}  loss {loss.item():.4f}  saved to {where}")

    if mgr is not None:
        mgr.wait(durable=True, timeout=120)  # raises if a drain failed
        mgr.close()
        if not tierckpt.wait_for_drains(timeout=120):
            raise RuntimeError("durable drains still running after 120 s")

    final = {
        "rank": rank,
        "attempt": attempt,
        "final_step": args.steps,
        "digest": digest(model, optim),
        "restored": restored,
        "durable_steps": durable_steps,
    }
    (work_dir / f"result-r{rank}.json").write_text(json.dumps(final))
    if mgr is not None:
        if restored is None:
            how = "never resumed"
        else:
            times = "once" if attempt == 2 else f"{attempt - 1} times"
            how = f"resumed {times}, from step {restored['step']} ({restored['tier']} tier)"
        steps = ", ".join(str(s) for s in final["durable_steps"]) or "none"
        out(f"training finished at step {args.steps}, {how}")
        out(f"durable copies of steps {steps} committed (durable_done)")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
