"""Save/load benchmark of tierckpt against DCP's FileSystemWriter, torch.save and memcpy.

    python -m benchmarks.run                 # 7b-shaped, scaled to ~2 GiB of state, 2 ranks
    python -m benchmarks.run --quick         # tiny model, 1 repetition: a smoke run
    python -m benchmarks.run --model 1b --state-gib 4 --systems memcpy,tierckpt-memory

Each system runs in fresh rank processes (so no system inherits another's memory or
caches) on the same deterministic sharded state (FSDP2 on CPU gloo), one system after the
other; each repetition is a save, a load of that save, and an async save.
A table goes to stdout, a JSON file and a PNG chart to ``--out``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

from . import report
from ._launch import RankFailure, RunDirs, launch, terminate_on_signals
from .models import SHAPES, LlamaShape, pick_scale

__all__ = ["DEFAULT_SYSTEMS", "main"]

DEFAULT_SYSTEMS = (
    "memcpy",
    "memcpy-tmpfs",
    "preadv-tmpfs",
    "dcp-noop",
    "dcp-noop-cached",
    "tierckpt-memory",
    "tierckpt-memory-cached",
    "tierckpt-manager",
    "tierckpt-memory+durable",
    "dcp-fs-tmpfs",
    "dcp-fs-disk",
    "torch-save",
)
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Options:
    """What every rank needs to know (picklable)."""

    shape: LlamaShape
    sharding: str
    system: str
    reps: int
    warmup: int
    first_saves: int
    first_keep: int
    first_gap_s: float
    cold_wait_s: float
    keep_last: int | None
    shm_dir: str
    disk_dir: str
    rss_interval_s: float
    log_level: str


def _system_modules() -> None:
    """Import every module that registers systems (the S3 ones go here when they land)."""
    from . import systems  # noqa: F401


# -- on each rank --------------------------------------------------------------


def build_state(shape: Any, sharding: str) -> tuple[Any, Any, Any]:
    """This rank's training state (model + AdamW, sharded), its model and its optimizer."""
    import torch
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from .models import sharded_training_state
    from .systems import State

    model, optim = sharded_training_state(shape, sharding)
    msd, osd = get_state_dict(model, optim)
    local: dict[str, torch.Tensor] = {}

    def add(prefix: str, tree: Any) -> None:
        if isinstance(tree, dict):
            for k, v in tree.items():
                add(f"{prefix}.{k}", v)
        elif isinstance(tree, torch.Tensor):
            t = tree.to_local() if hasattr(tree, "to_local") else tree
            local[prefix] = t.detach()

    with torch.no_grad():
        add("model", msd)
        add("optim", osd["state"])
    nbytes = sum(t.numel() * t.element_size() for t in local.values())
    return State(dcp={"model": msd, "optim": osd}, local=local, nbytes=nbytes), model, optim


def _verify_load(system: Any, state: Any, step: int) -> str | None:
    """Overwrite the largest local tensors, load ``step``, check they came back."""
    import torch

    names = sorted(state.local, key=lambda k: state.local[k].numel(), reverse=True)[:3]
    names += [k for k in state.local if k.startswith("optim.") and k.endswith(".step")][:1]
    with torch.no_grad():
        want = {k: state.local[k].clone() for k in names}
        for k in names:
            state.local[k].fill_(-7.0)
    system.load(state, step)
    bad = [k for k in names if not torch.equal(state.local[k], want[k])]
    with torch.no_grad():
        for k in bad:
            state.local[k].copy_(want[k])
    return f"load returned different values for {bad}" if bad else None


def _load(system: Any, state: Any, step: int, info: dict[str, Any]) -> None:
    info.update(system.load(state, step) or {})


def _bench_system(name: str, state: Any, opts: Options, ctx: Any, sampler: Any) -> dict[str, Any]:
    import torch.distributed as dist

    from ._measure import timed, timed_async, tree_bytes
    from .systems import SYSTEMS

    system = SYSTEMS[name](ctx)
    rec: dict[str, Any] = {
        "first": [],
        "warmup": [],
        "reps": [],
        "error": None,
        "verify": None,
    }
    try:
        system.prepare(state)
        step = 0
        # A fresh job's first saves, back to back, one by one (cold tmpfs pages, empty pools).
        # Each system keeps the newest first_keep saves (tierckpt's memory_keep_last), as a
        # job rotating its checkpoints on tmpfs would; first_gap_s stands for a training step.
        for _ in range(opts.first_saves):
            time.sleep(opts.first_gap_s)
            step += 1
            rec["first"].append(timed(partial(system.save, state, step), sampler))
            if step > opts.first_keep:
                system.end_rep([step - opts.first_keep])
        system.end_rep(list(range(max(1, step - opts.first_keep + 1), step + 1)))
        if opts.first_saves:
            dist.barrier()
            if ctx.rank == 0:
                rec["first_tmpfs_mib"] = tree_bytes(opts.shm_dir) / 2**20
        for i in range(opts.warmup + opts.reps):
            it: dict[str, Any] = {}
            step += 1
            saved = step
            it["save"] = timed(partial(system.save, state, saved), sampler)
            if i == 0 and system.moves_bytes:
                dist.barrier()
                rec["verify"] = _verify_load(system, state, saved)
            info: dict[str, Any] = {}
            it["load"] = timed(partial(_load, system, state, saved, info), sampler)
            if info:
                it["load_info"] = info
            steps = [saved]
            if system.supports_async:
                step += 1
                steps.append(step)
                it["async"] = timed_async(partial(system.async_save, state, step), sampler)
            dist.barrier()
            if ctx.rank == 0:
                it["tmpfs_mib"] = tree_bytes(opts.shm_dir) / 2**20
            system.end_rep(steps)
            (rec["warmup"] if i < opts.warmup else rec["reps"]).append(it)
    except Exception:
        rec["error"] = traceback.format_exc()
    finally:
        system.close()
        dist.barrier()
        if ctx.rank == 0:
            system.cleanup()
        dist.barrier()
    return rec


def rank_main(rank: int, world_size: int, opts: Options) -> dict[str, Any] | None:
    """One system, measured on every rank; rank 0 returns every rank's records."""
    import logging
    import resource

    import torch.distributed as dist

    from ._measure import RssSampler
    from .systems import RankContext

    logging.basicConfig(format="[rank %(process)d] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("tierckpt").setLevel(opts.log_level)
    _system_modules()
    state, _model, _optim = build_state(opts.shape, opts.sharding)
    ctx = RankContext(rank, world_size, opts.shm_dir, opts.disk_dir, opts.keep_last)
    if opts.cold_wait_s:
        dist.barrier()
        time.sleep(opts.cold_wait_s)
    sampler = RssSampler(opts.rss_interval_s)
    rec = _bench_system(opts.system, state, opts, ctx, sampler)
    sampler.close()
    rec["nbytes"] = state.nbytes
    rec["ru_maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gathered: list[Any] = [None] * world_size if rank == 0 else []
    dist.gather_object(rec, gathered if rank == 0 else None, dst=0)
    return gathered if rank == 0 else None


# -- in the parent -------------------------------------------------------------


def _merge(old: list[dict[str, Any]] | None, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One system's per-rank records over rounds: repetitions appended, errors kept."""
    if old is None:
        return new
    if len(old) != len(new):
        return old if any(r.get("error") for r in old) else new
    out = []
    for a, b in zip(old, new, strict=True):
        merged = {**a}
        for key in ("first", "reps", "warmup"):
            merged[key] = a.get(key, []) + b.get(key, [])
        merged["error"] = a.get("error") or b.get("error")
        merged["verify"] = a.get("verify") or b.get("verify")
        merged["ru_maxrss_mib"] = max(a.get("ru_maxrss_mib") or 0, b.get("ru_maxrss_mib") or 0)
        out.append(merged)
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Save/load throughput of tierckpt vs DCP FileSystemWriter, torch.save and memcpy.",
    )
    p.add_argument("--model", choices=sorted(SHAPES), default=None, help="shape (default 7b)")
    p.add_argument(
        "--scale",
        type=float,
        default=None,
        help="multiply layers and widths by this (default: fit --state-gib)",
    )
    p.add_argument(
        "--state-gib",
        type=float,
        default=2.0,
        help="target of the automatic scale: model + AdamW state over all ranks (default 2)",
    )
    p.add_argument("--nproc", type=int, default=2, help="ranks (default 2)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run the system list this many times, rotating its order, each time with --reps "
        "timed reps (spreads every system over the run on a noisy machine; default 1)",
    )
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 3)")
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="repetitions before the timed ones (default 3: tierckpt's buffer pool fills over "
        "the first few saves; the first one is reported as '1st save')",
    )
    p.add_argument(
        "--systems",
        default=",".join(DEFAULT_SYSTEMS),
        help="comma-separated; memcpy is always added (default: all)",
    )
    p.add_argument("--sharding", choices=("fsdp2", "dtensor"), default="fsdp2")
    p.add_argument(
        "--first-saves",
        type=int,
        default=10,
        help="saves of a fresh job timed one by one before the warm-up (default 10)",
    )
    p.add_argument(
        "--first-keep",
        type=int,
        default=None,
        help="saves every system keeps during the first saves, deleting older ones as a job "
        "rotating checkpoints on tmpfs would (default: tierckpt's memory_keep_last)",
    )
    p.add_argument(
        "--first-gap-s",
        type=float,
        default=0.0,
        help="idle seconds before each first save, standing for training between checkpoints "
        "(default 0: back to back, the worst case)",
    )
    p.add_argument(
        "--cold-wait-s",
        type=float,
        default=20.0,
        help="idle seconds before a system's first saves: memory the previous system freed goes "
        "back to the host (free page reporting), so every system starts on cold pages "
        "(default 20; see README 'First saves')",
    )
    p.add_argument(
        "--keep-last",
        type=int,
        default=None,
        help="tierckpt memory_keep_last (default: CheckpointConfig's default)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads per rank (default: cores // nproc)",
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<name>.json)")
    p.add_argument(
        "--scratch", default=None, help="parent of the on-disk scratch dir (default /tmp)"
    )
    p.add_argument(
        "--tmpfs",
        default=None,
        help="parent of the tmpfs scratch dir, e.g. a tmpfs mounted with huge=within_size "
        "(default /dev/shm)",
    )
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds before ranks are killed")
    p.add_argument("--quick", action="store_true", help="tiny model, 1 repetition")
    p.add_argument("--no-chart", action="store_true", help="skip the PNG")
    p.add_argument(
        "--log-level",
        default="ERROR",
        help="level of the tierckpt logger in the ranks (default ERROR; WARNING shows fallbacks)",
    )
    args = p.parse_args(argv)
    if args.first_keep is None:
        from tierckpt import CheckpointConfig

        default_keep = CheckpointConfig.__dataclass_fields__["memory_keep_last"].default
        args.first_keep = args.keep_last or default_keep
    if args.quick:
        args.cold_wait_s = 0.0
        args.model = args.model or "tiny"
        args.reps = args.reps or 1
    args.model = args.model or "7b"
    args.reps = args.reps or 3
    return args


def _tmpfs_info(root: str) -> dict[str, str] | None:
    """Where the run's tmpfs scratch lives and its page size policy (``huge=``)."""
    from tierckpt.hugepages import mount_of

    mount = mount_of(root)
    return None if mount is None else {"dir": root, **asdict(mount)}


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _system_modules()
    from .systems import SYSTEMS

    names = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        print(f"unknown systems {unknown}; known: {sorted(SYSTEMS)}", file=sys.stderr)
        return 2
    if "memcpy" not in names:
        names.insert(0, "memcpy")
    base = SHAPES[args.model]
    scale = args.scale if args.scale is not None else pick_scale(base, int(args.state_gib * 2**30))
    shape = base.scaled(scale)
    cores = len(os.sched_getaffinity(0))
    threads = args.threads or max(1, cores // args.nproc)
    out = args.out or os.path.join(
        RESULTS_DIR, f"{'quick' if args.quick else 'bench'}-{args.model}-{args.nproc}r.json"
    )
    command = shlex.join([os.path.basename(sys.executable), "-m", "benchmarks.run", *sys.argv[1:]])
    if argv is not None:
        command = shlex.join(["python", "-m", "benchmarks.run", *argv])
    meta = {
        "command": command,
        "machine": {**report.machine_info(), "tmpfs": _tmpfs_info(args.tmpfs or "/dev/shm")},
        "config": {
            "model": args.model,
            "scale": scale,
            "shape": asdict(shape),
            "params": shape.param_count(),
            "state_bytes_planned": shape.state_bytes(),
            "nproc": args.nproc,
            "threads_per_rank": threads,
            "sharding": args.sharding,
            "reps": args.reps,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "first_saves": args.first_saves,
            "first_keep": args.first_keep,
            "first_gap_s": args.first_gap_s,
            "cold_wait_s": args.cold_wait_s,
            "keep_last": args.keep_last,
            "systems": names,
            "about": {n: SYSTEMS[n].about for n in names},
            "overhead_only": [n for n in names if not SYSTEMS[n].moves_bytes],
        },
    }
    print(report.header(meta), flush=True)
    records: dict[str, Any] = {}
    failed: list[str] = []
    loadavg: dict[str, list[tuple[float, float, float]]] = {n: [] for n in names}
    meta["machine"]["loadavg_before_system"] = loadavg
    revs: dict[str, list[str]] = {}
    meta["machine"]["source_before_system"] = revs
    with terminate_on_signals(), RunDirs(args.scratch, args.tmpfs) as dirs:
        for rnd in range(args.rounds):
            order = names[rnd % len(names) :] + names[: rnd % len(names)]
            for name in order:
                if name in failed:
                    continue
                loadavg[name].append(os.getloadavg())
                revs.setdefault(name, []).append(report.source_rev())
                opts = Options(
                    shape=shape,
                    sharding=args.sharding,
                    system=name,
                    reps=args.reps,
                    warmup=args.warmup,
                    first_saves=args.first_saves,
                    first_keep=args.first_keep,
                    first_gap_s=args.first_gap_s,
                    cold_wait_s=args.cold_wait_s if args.first_saves else 0.0,
                    keep_last=args.keep_last,
                    shm_dir=dirs.shm,
                    disk_dir=dirs.disk,
                    rss_interval_s=0.005,
                    log_level=args.log_level.upper(),
                )
                try:
                    ranks = launch(
                        rank_main,
                        args.nproc,
                        (opts,),
                        out_dir=dirs.disk,
                        threads=threads,
                        timeout_s=args.timeout,
                    )
                except RankFailure as e:
                    ranks = [{"error": str(e)}]
                records[name] = _merge(records.get(name), ranks)
                err = next((r["error"] for r in ranks if r.get("error")), None)
                if err:
                    failed.append(name)
                tag = f" (round {rnd + 1}/{args.rounds})" if args.rounds > 1 else ""
                print(
                    f"[bench] {name}{tag}: {'FAILED' if err else 'done'}",
                    file=sys.stderr,
                    flush=True,
                )
                dirs.clear()
    meta["machine"]["loadavg_end"] = os.getloadavg()
    result = report.build(meta, records)
    print(report.table(result), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    report.write_json(result, out)
    print(f"JSON: {out}")
    if not args.no_chart:
        png = os.path.splitext(out)[0] + ".png"
        report.chart(result, png)
        print(f"chart: {png}")
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("interrupted; this run's tmpfs and scratch directories were removed", file=sys.stderr)
        raise SystemExit(130) from None
