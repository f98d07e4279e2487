"""Restart loads in fresh processes: tierckpt's reader against a bare ``preadv`` of the same bytes.

    python -m benchmarks.restart_load [--state-gib 2] [--nproc 2] [--restarts 6] [--out F]

Issue 9's target 4 as a restarted job sees it. One job saves the benchmark's FSDP training
state once: step 1 into tierckpt's memory tier (``tierckpt-memory``, default config) and the
same bytes into one tmpfs file per rank (``preadv-tmpfs``), and DCP's metadata for a
reader that moves no bytes (``dcp-noop``: what DCP's own planning costs). Then every restart starts fresh
rank processes for one system; each builds its state (initialised, so its pages are warm),
and the ranks time, between two barriers, that system's load of step 1: for tierckpt a new
``TieredStorageReader(config)`` (the ranks agree on the newest step) and ``dcp.load``, for
``preadv-tmpfs`` a ``preadv`` of each tensor's bytes into it. In the same process they then
time a ``copy_`` of the same bytes between warm tensors (``memcpy``) and check what was loaded
against a digest taken at the save. The systems take turns at going first; no restart is
discarded, the first one included. A restart's time is its slowest rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from typing import Any

from ._launch import RunDirs, launch, terminate_on_signals
from .models import SHAPES, LlamaShape, pick_scale

SYSTEMS = ("tierckpt-memory", "preadv-tmpfs", "dcp-noop")
"""``dcp-noop`` moves no bytes: its restart is what DCP's own load planning costs."""
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _digest(local: dict[str, Any]) -> str:
    """xxh3-128 of every local tensor's bytes, in name order."""
    import torch
    import xxhash

    h = xxhash.xxh3_128()
    for name in sorted(local):
        t = local[name].contiguous()
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _state(shape: LlamaShape, sharding: str) -> Any:
    from .run import build_state

    state, _model, _optim = build_state(shape, sharding)
    return state


def _context(rank: int, world_size: int, dirs: tuple[str, str]) -> Any:
    from .systems import RankContext

    return RankContext(rank, world_size, dirs[0], dirs[1], None)


def save_rank(
    rank: int, world_size: int, shape: LlamaShape, sharding: str, dirs: tuple[str, str]
) -> list[str]:
    """Save step 1 with every system; every rank's digest of the bytes saved."""
    import torch.distributed as dist

    from .systems import SYSTEMS as ALL

    state = _state(shape, sharding)
    ctx = _context(rank, world_size, dirs)
    for name in SYSTEMS:
        system = ALL[name](ctx)
        if name != "tierckpt-memory":
            system.prepare(state)  # (tierckpt's prepare starts a spare fill: not wanted here)
        system.save(state, 1)
        system.close()
    digests: list[Any] = [None] * world_size
    dist.all_gather_object(digests, _digest(state.local))
    return digests


def restart_rank(
    rank: int,
    world_size: int,
    name: str,
    shape: LlamaShape,
    sharding: str,
    dirs: tuple[str, str],
    digests: list[str],
) -> list[dict[str, Any]]:
    """One fresh process of a restart: time ``name``'s load, then a memcpy; every rank's."""
    import torch
    import torch.distributed as dist

    from .systems import SYSTEMS as ALL

    state = _state(shape, sharding)
    with torch.no_grad():  # what is loaded must come from the checkpoint, not the init
        for t in state.local.values():
            t.fill_(-7.0)
    system = ALL[name](_context(rank, world_size, dirs))
    if name != "tierckpt-memory":
        system.prepare(state)
    dist.barrier()
    t0 = time.perf_counter()
    info = system.load(state, 1) or {}
    load_s = time.perf_counter() - t0
    dist.barrier()
    ok = _digest(state.local) == digests[rank] if system.moves_bytes else True
    copies = {k: torch.empty_like(t) for k, t in state.local.items()}
    for k, t in state.local.items():  # touch the copies' pages before timing
        copies[k].copy_(t)
    dist.barrier()
    t0 = time.perf_counter()
    for k, t in state.local.items():
        t.copy_(copies[k])
    memcpy_s = time.perf_counter() - t0
    dist.barrier()
    system.close()
    rec = {"load_s": load_s, "memcpy_s": memcpy_s, "ok": ok, "nbytes": state.nbytes, **info}
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, rec)
    return out


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.restart_load", description=__doc__)
    p.add_argument("--state-gib", type=float, default=2.0, help="state over all ranks")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--restarts", type=int, default=6, help="fresh starts per system")
    p.add_argument("--sharding", choices=("fsdp2", "dtensor"), default="fsdp2")
    p.add_argument("--out", help="JSON results (default: results/restart-load-<n>r.json)")
    p.add_argument("--timeout-s", type=float, default=900.0)
    return p.parse_args(argv)


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per system: the restarts' times (slowest rank each), medians and worst."""
    out: dict[str, Any] = {}
    for name in SYSTEMS:
        mine = [r for r in runs if r["system"] == name]
        loads = [max(x["load_s"] for x in r["ranks"]) for r in mine]
        copies = [max(x["memcpy_s"] for x in r["ranks"]) for r in mine]
        out[name] = {
            "load_s": loads,
            "memcpy_s": copies,
            "first_s": loads[0],
            "median_s": statistics.median(loads),
            "worst_s": max(loads),
            "memcpy_median_s": statistics.median(copies),
            "all_ok": all(x["ok"] for r in mine for x in r["ranks"]),
        }
    return out


def table(summary: dict[str, Any]) -> str:
    base = summary["preadv-tmpfs"]
    copy = statistics.median([c for name in SYSTEMS for c in summary[name]["memcpy_s"]])
    lines = [
        "| restart load | first s | median s | worst s | x preadv median / worst | x memcpy median |",
        "|---|---|---|---|---|---|",
    ]
    for name in SYSTEMS:
        s = summary[name]
        lines.append(
            f"| {name} | {s['first_s']:.3f} | {s['median_s']:.3f} | {s['worst_s']:.3f} | "
            f"{base['median_s'] / s['median_s']:.2f} / {base['worst_s'] / s['worst_s']:.2f} | "
            f"{copy / s['median_s']:.2f} |"
        )
    bound = base["median_s"] + summary["dcp-noop"]["median_s"]
    lines.append(
        f"| preadv-tmpfs + dcp-noop (a bare read inside DCP's planning) | - | {bound:.3f} | - | "
        f"{base['median_s'] / bound:.2f} / - | {copy / bound:.2f} |"
    )
    lines.append(f"| memcpy (same bytes, warm, in each process) | - | {copy:.3f} | - | - | 1.00 |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    from . import report

    base = SHAPES["7b"]
    shape = base.scaled(pick_scale(base, int(args.state_gib * 2**30)))
    threads = max(1, len(os.sched_getaffinity(0)) // args.nproc)
    out = args.out or os.path.join(RESULTS_DIR, f"restart-load-{args.nproc}r.json")
    command = shlex.join(["python", "-m", "benchmarks.restart_load", *(argv or sys.argv[1:])])
    runs: list[dict[str, Any]] = []
    with terminate_on_signals(), RunDirs() as run_dirs:
        dirs = (run_dirs.shm, run_dirs.disk)
        kw: dict[str, Any] = {"out_dir": run_dirs.disk, "threads": threads}
        digests = launch(
            save_rank, args.nproc, (shape, args.sharding, dirs), timeout_s=args.timeout_s, **kw
        )
        for i in range(args.restarts):
            order = SYSTEMS[i % len(SYSTEMS) :] + SYSTEMS[: i % len(SYSTEMS)]
            for name in order:
                ranks = launch(
                    restart_rank,
                    args.nproc,
                    (name, shape, args.sharding, dirs, digests),
                    timeout_s=args.timeout_s,
                    **kw,
                )
                runs.append({"system": name, "restart": i, "ranks": ranks})
                print(f"restart {i} {name}: {max(x['load_s'] for x in ranks):.3f} s", flush=True)
    summary = _summary(runs)
    result = {
        "command": command,
        "machine": report.machine_info(),
        "config": {"shape": shape.name, "nproc": args.nproc, "restarts": args.restarts},
        "runs": runs,
        "summary": summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(table(summary))
    bad = [n for n in SYSTEMS if not summary[n]["all_ok"]]
    if bad:
        print(f"loaded bytes differ from the saved ones: {bad}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
