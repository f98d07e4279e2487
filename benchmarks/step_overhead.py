"""What checkpointing every step costs a training loop (tierckpt async_save vs never).

    python -m benchmarks.step_overhead            # defaults below, 2 ranks, 3 trials
    python -m benchmarks.step_overhead --quick    # 1 trial, few steps

A Llama-shaped model (FSDP2 on CPU gloo) trains ``--steps`` steps on random tokens, once
without checkpoints and once saving every step with ``dcp.async_save`` through a
``TieredStorageWriter`` (memory tier), on a process group of its own. Before each save the
loop waits for the previous save's future; before each optimizer step it waits for the
previous save's staging (when the save reports staging separately). The time of a run
includes waiting for the last save. The two modes alternate, ``--trials`` times each; the
overhead is ``median(checkpointing) / median(never) - 1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from . import report
from ._launch import RankFailure, RunDirs, launch, terminate_on_signals
from .models import SHAPES, LlamaShape

__all__ = ["main"]

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Options:
    shape: LlamaShape
    steps: int
    warmup_steps: int
    trials: int
    batch: int
    seq: int
    shm_dir: str
    saver: str = "dcp"


def _train_loop(
    model: Any, optim: Any, opts: Options, save: Any | None, first_step: int
) -> dict[str, float]:
    """``opts.steps`` training steps; with ``save``, one async checkpoint after each."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(dist.get_rank())
    vocab = opts.shape.vocab
    pending: Any = None
    waited = 0.0
    started = 0.0

    def wait(what: str) -> None:
        nonlocal waited
        if pending is None:
            return
        t = time.perf_counter()
        pending[what]()
        waited += time.perf_counter() - t

    dist.barrier()
    t0 = time.perf_counter()
    for i in range(opts.steps):
        tokens = torch.randint(vocab, (opts.batch, opts.seq + 1), generator=gen)
        logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
        loss.backward()
        wait("staged")
        optim.step()
        optim.zero_grad(set_to_none=True)
        if save is not None:
            wait("done")
            t = time.perf_counter()
            pending = save(first_step + i)
            started += time.perf_counter() - t
    if save is not None:
        wait("done")
    total = time.perf_counter() - t0
    return {"s": total, "save_call_s": started, "wait_s": waited}


def rank_main(rank: int, world_size: int, opts: Options) -> dict[str, Any] | None:
    import logging

    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    import tierckpt

    from .models import build_model

    logging.getLogger("tierckpt").setLevel(logging.ERROR)
    import torch

    model = build_model(opts.shape, "fsdp2")
    optim = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ckpt_group = dist.new_group(backend="gloo")
    config = tierckpt.CheckpointConfig(
        namespace="overhead",
        world_size=world_size,
        memory_root=os.path.join(opts.shm_dir, "memory"),
        durable_base_path="file://" + os.path.join(opts.shm_dir, "durable-unused"),
    )

    manager = (
        tierckpt.CheckpointManager(
            config, every_steps=1, process_group=ckpt_group, preemption=False
        )
        if opts.saver == "manager"
        else None
    )

    def save(step: int) -> dict[str, Any]:
        msd, osd = get_state_dict(model, optim)
        if manager is not None:  # its defaults: async, plan caching
            manager.save(step, {"model": msd, "optim": osd}, force=True)
            pending = manager.pending
            assert pending is not None
            return {"done": pending.committed.result, "staged": lambda: None}
        writer = tierckpt.TieredStorageWriter(config, step=step, save_to_durable=False)
        response = dcp.async_save(
            {"model": msd, "optim": osd}, storage_writer=writer, process_group=ckpt_group
        )
        upload = getattr(response, "upload_completion", response)
        staging = getattr(response, "staging_completion", None)
        return {"done": upload.result, "staged": staging.result if staging else lambda: None}

    # Warm-up: the first steps allocate the optimizer state, the first save the buffers.
    short = dataclasses.replace(opts, steps=opts.warmup_steps)
    _train_loop(model, optim, short, None, 0)
    _train_loop(model, optim, short, save, 10**6)
    runs: dict[str, list[dict[str, float]]] = {"never": [], "every_step": []}
    step = 0
    for trial in range(opts.trials):
        order = ("never", "every_step") if trial % 2 == 0 else ("every_step", "never")
        for mode in order:
            runs[mode].append(
                _train_loop(model, optim, opts, save if mode != "never" else None, step)
            )
            step += opts.steps
    state_bytes = (
        sum(t.to_local().numel() * t.element_size() for t in model.parameters()) * 3
    )  # params + exp_avg + exp_avg_sq
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, {"runs": runs, "state_bytes": state_bytes})
    if manager is not None:
        manager.close()
    dist.destroy_process_group(ckpt_group)
    return gathered if rank == 0 else None


def _summarise(per_rank: list[dict[str, Any]], opts: Options) -> dict[str, Any]:
    out: dict[str, Any] = {"state_bytes": sum(r["state_bytes"] for r in per_rank)}
    for mode in ("never", "every_step"):
        trials = [
            {
                k: max(r["runs"][mode][i][k] for r in per_rank)
                for k in ("s", "save_call_s", "wait_s")
            }
            for i in range(opts.trials)
        ]
        out[mode] = {
            "trials": trials,
            "median_s": statistics.median(t["s"] for t in trials),
            "median_step_s": statistics.median(t["s"] for t in trials) / opts.steps,
        }
    out["overhead_pct"] = (out["every_step"]["median_s"] / out["never"]["median_s"] - 1) * 100
    out["overhead_pct_by_trial"] = [
        (c["s"] / n["s"] - 1) * 100
        for c, n in zip(out["every_step"]["trials"], out["never"]["trials"], strict=True)
    ]
    out["overhead_pct_median_of_trials"] = statistics.median(out["overhead_pct_by_trial"])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_overhead", description=__doc__)
    p.add_argument("--model", choices=sorted(SHAPES), default="small")
    p.add_argument("--scale", type=float, default=0.5, help="layers and widths x this")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--quick", action="store_true", help="1 trial of 5 steps")
    p.add_argument(
        "--saver",
        choices=("dcp", "manager"),
        default="dcp",
        help="dcp: dcp.async_save through a TieredStorageWriter (default); manager: "
        "CheckpointManager(every_steps=1) at its defaults (plan caching)",
    )
    p.add_argument("--out", default=os.path.join(RESULTS_DIR, "step_overhead.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.trials, args.steps, args.warmup_steps = 1, 5, 1
    shape = SHAPES[args.model].scaled(args.scale)
    threads = args.threads or max(1, len(os.sched_getaffinity(0)) // args.nproc)
    argv_used = sys.argv[1:] if argv is None else argv
    meta: dict[str, Any] = {
        "command": shlex.join(["python", "-m", "benchmarks.step_overhead", *argv_used]),
        "machine": report.machine_info(),
        "config": {
            **{k: v for k, v in vars(args).items() if k not in ("out", "timeout")},
            "shape": asdict(shape),
            "params": shape.param_count(),
            "threads_per_rank": threads,
        },
    }
    print(
        f"model {shape.name}: {shape.param_count() / 1e6:.0f}M params, "
        f"~{shape.state_bytes() / 2**20:,.0f} MiB state; {args.nproc} ranks x {threads} "
        f"thread(s); {args.steps} steps x {args.trials} trials, batch {args.batch}x{args.seq}",
        flush=True,
    )
    with terminate_on_signals(), RunDirs() as dirs:
        opts = Options(
            shape,
            args.steps,
            args.warmup_steps,
            args.trials,
            args.batch,
            args.seq,
            dirs.shm,
            args.saver,
        )
        try:
            per_rank = launch(
                rank_main,
                args.nproc,
                (opts,),
                out_dir=dirs.disk,
                threads=threads,
                timeout_s=args.timeout,
            )
        except RankFailure as e:
            print(f"run failed:\n{e}", file=sys.stderr)
            return 1
    result = {**meta, **_summarise(per_rank, opts)}
    result["machine"]["loadavg_end"] = os.getloadavg()
    n, c = result["never"], result["every_step"]
    print(f"state checkpointed each step: {result['state_bytes'] / 2**20:,.0f} MiB")
    print("| mode | s/step (median) | trials s |")
    print("|---|---|---|")
    saver = "CheckpointManager" if args.saver == "manager" else "tierckpt async_save"
    for name, r in (("never", n), (f"every step ({saver})", c)):
        trials = ", ".join(f"{t['s']:.2f}" for t in r["trials"])
        print(f"| {name} | {r['median_step_s']:.3f} | {trials} |")
    waits = statistics.median(t["wait_s"] + t["save_call_s"] for t in c["trials"]) / args.steps
    print(
        f"overhead: {result['overhead_pct']:+.1f}% (per trial: "
        f"{', '.join(f'{x:+.1f}%' for x in result['overhead_pct_by_trial'])}; median of "
        f"trials {result['overhead_pct_median_of_trials']:+.1f}%); "
        f"loop blocked in async_save + waits: {waits:.3f} s/step"
    )
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    report.write_json(result, args.out)
    print(f"JSON: {args.out}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted; this run's tmpfs and scratch directories were removed", file=sys.stderr)
        raise SystemExit(130) from None
