"""One worker of the tierckpt demo; ``examples/demo.py`` launches it under torchrun.

Trains a small MLP with DDP on CPU (gloo) on synthetic data. Every step is saved with
``dcp.async_save`` to the memory tier; every ``--durable-every``-th step also drains to the
durable tier. On the first attempt rank ``--crash-rank`` SIGKILLs itself at ``--crash-at``;
torchrun restarts the workers, which resume from the newest step every rank can restore.

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
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

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
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.ReLU(),
        nn.Linear(HIDDEN, OUT),
    )


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic batch for (step, rank): labels from a fixed random teacher."""
    g = torch.Generator().manual_seed(1_000 * step + rank)
    x = torch.randn(BATCH, IN, generator=g)
    teacher = torch.Generator().manual_seed(12345)
    w = torch.randn(IN, OUT, generator=teacher)
    return x, (x @ w).argmax(dim=1)


def digest(model: nn.Module, optim: torch.optim.Optimizer) -> str:
    """sha256 over every parameter and every optimizer state value, in a fixed order."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().numpy().tobytes())
    state = optim.state_dict()["state"]
    for pid in sorted(state):
        for key, value in sorted(state[pid].items()):
            h.update(f"{pid}.{key}".encode())
            if isinstance(value, torch.Tensor):
                h.update(value.detach().cpu().numpy().tobytes())
            else:
                h.update(repr(value).encode())
    return h.hexdigest()


def app_state(model: nn.Module, optim: torch.optim.Optimizer, step: int) -> dict[str, Any]:
    msd, osd = get_state_dict(model, optim)
    return {"model": msd, "optim": osd, "step": step}


def restore(
    cfg: tierckpt.CheckpointConfig,
    model: nn.Module,
    optim: torch.optim.Optimizer,
    pg: dist.ProcessGroup,
    out: Out,
) -> dict[str, Any] | None:
    """Load the newest step every rank can restore; None when there is none yet."""
    t0 = time.perf_counter()
    try:
        reader = tierckpt.TieredStorageReader(cfg, process_group=pg)
    except tierckpt.CheckpointNotFoundError:
        out("no checkpoint yet: starting from scratch")
        return None
    state = app_state(model, optim, -1)
    dcp.load(state, storage_reader=reader, process_group=pg)
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    seconds = time.perf_counter() - t0
    if state["step"] != reader.step:
        raise RuntimeError(f"loaded step {state['step']} but the reader chose step {reader.step}")
    by_tier = {k: v for k, v in reader.bytes_read_by_tier.items() if v}
    tier = "+".join(by_tier) or "nowhere"
    return {"step": reader.step, "seconds": seconds, "bytes_by_tier": by_tier, "tier": tier}


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
    # Checkpoint collectives run on their own gloo group, off the training group that
    # DDP uses: the async save's thread must not interleave with DDP's all-reduces.
    ckpt_pg = dist.new_group(backend="gloo")
    model = DistributedDataParallel(make_model())
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    cfg = None
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
        restored = restore(cfg, model, optim, ckpt_pg, out)
        if restored is not None:
            start = restored["step"]
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

    fut = None
    durable_writers: list[tierckpt.TieredStorageWriter] = []
    for step in range(start + 1, args.steps + 1):
        x, y = batch(step, rank)
        optim.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optim.step()
        if cfg is None:
            continue
        if fut is not None:
            fut.result()  # the previous save is committed in memory (raises if it failed)
        if attempt == 1 and step == args.crash_at and rank == args.crash_rank:
            out(f"step {step}: simulating a crash: SIGKILL to myself", every_rank=True)
            os.kill(os.getpid(), signal.SIGKILL)
        durable = step % args.durable_every == 0
        writer = tierckpt.TieredStorageWriter(cfg, step=step, save_to_durable=durable)
        fut = dcp.async_save(
            app_state(model, optim, step), storage_writer=writer, process_group=ckpt_pg
        )
        with open(work_dir / f"saved-r{rank}.jsonl", "a") as f:
            f.write(json.dumps({"step": step, "digest": digest(model, optim)}) + "\n")
        if durable:
            durable_writers.append(writer)
        if step % 10 == 0:
            where = "memory + durable" if durable else "memory"
            out(f"step {step:3d}  loss {loss.item():.4f}  saved to {where}")

    if fut is not None:
        fut.result()
    for writer in durable_writers:
        writer.durable_done.result(timeout=120)  # raises if the drain failed
    if not tierckpt.wait_for_drains(timeout=120):
        raise RuntimeError("durable drains still running after 120 s")

    final = {
        "rank": rank,
        "attempt": attempt,
        "final_step": args.steps,
        "digest": digest(model, optim),
        "restored": restored,
        "durable_steps": [w.step for w in durable_writers],
    }
    (work_dir / f"result-r{rank}.json").write_text(json.dumps(final))
    if cfg is not None:
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
