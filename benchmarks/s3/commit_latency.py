"""How long a durable commit takes once every rank's part is in S3: store-woken vs polled.

    .venv/bin/python -m benchmarks.s3.commit_latency            # moto, 2 ranks, 10 saves each
    .venv/bin/python -m benchmarks.s3.commit_latency --servers moto,s3rver --saves 20

Two gloo ranks save a small state (``--mib`` per rank) with ``save_to_durable=True``; rank 1
starts its upload ``--hold-s`` late, so the coordinator has to wait for it. Per save: the
time from the last rank's part being in S3 to ``durable_done`` on every rank (the commit
gap: the metadata and COMMIT writes plus the waits), and how many listings of the durable
tier the two processes made meanwhile. Each save runs once woken through the job store (the
default) and once with ``TIERCKPT_DRAIN_STORE=0`` (polling S3 with backoff, the behaviour
before), alternating, in the same run. Prints a table; writes
``results/commit-latency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import time
from typing import Any

from .._launch import RunDirs, launch, terminate_on_signals
from .servers import serving

MIB = 2**20
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
MODES = ("store", "poll")


def _rank(
    rank: int, world_size: int, bucket: str, memory_root: str, mib: int, saves: int, hold_s: float
) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from tierckpt import CheckpointConfig, TieredStorageWriter
    from tierckpt.catalog import StepCatalog
    from tierckpt.drain_signals import STORE_ENV
    from tierckpt.manifest import RankManifest
    from tierckpt.tiers.memory import MemoryTier

    listings: list[float] = []
    real_files = StepCatalog.files

    def counted(self: StepCatalog, step: int) -> dict[str, int]:
        if not isinstance(self.tier, MemoryTier):
            listings.append(time.perf_counter())
        return real_files(self, step)

    StepCatalog.files = counted  # type: ignore[method-assign]

    class Held(TieredStorageWriter):
        def _start_drain(self, manifest: RankManifest) -> None:
            self.held = manifest

    state = {f"r{rank}": torch.randn(mib * MIB // 4, generator=torch.Generator().manual_seed(rank))}
    rows = []
    for i in range(saves * len(MODES)):
        mode = MODES[i % len(MODES)]
        os.environ[STORE_ENV] = "1" if mode == "store" else "0"
        cfg = CheckpointConfig(
            namespace="latency",
            world_size=world_size,
            memory_root=memory_root,
            durable_base_path=f"s3://{bucket}/latency",
            memory_keep_last=1,
            durable_keep_last=2,
        )
        w = Held(cfg, step=i, save_to_durable=True)
        dcp.save(state, storage_writer=w)
        dist.barrier()
        if rank == 1:
            time.sleep(hold_s)
        t0 = time.perf_counter()
        TieredStorageWriter._start_drain(w, w.held)
        marks: dict[str, Any] = {"mode": mode}
        assert w._upload is not None
        w._upload.result()
        marks["part_in_s3"] = time.perf_counter()
        w.durable_done.result()
        marks["durable_done"] = time.perf_counter()
        marks["listings"] = len([t for t in listings if t >= t0])
        dist.barrier()
        every: list[Any] = [None] * world_size
        dist.all_gather_object(every, marks)
        rows.append({"mode": mode, "ranks": every})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.s3.commit_latency", description=__doc__)
    p.add_argument("--servers", default="moto")
    p.add_argument("--mib", type=int, default=4, help="bytes per rank")
    p.add_argument("--saves", type=int, default=10, help="saves per mode")
    p.add_argument("--hold-s", type=float, default=1.0, help="rank 1 starts its upload late")
    args = p.parse_args(argv)
    results: dict[str, Any] = {"args": vars(args), "loadavg_start": os.getloadavg()}
    table = []
    with terminate_on_signals(), RunDirs() as dirs:
        for name in [s for s in args.servers.split(",") if s]:
            bucket = f"tierckpt-latency-{dirs.id}"
            memory_root = os.path.join(dirs.shm, f"memory-{name}")
            try:
                with serving(name, dirs.shm, bucket):
                    rows = launch(
                        _rank,
                        2,
                        (bucket, memory_root, args.mib, args.saves, args.hold_s),
                        out_dir=dirs.disk,
                        threads=1,
                        timeout_s=1800,
                    )
            finally:
                shutil.rmtree(memory_root, ignore_errors=True)
            results[name] = rows
            for mode in MODES:
                mine = [row for row in rows if row["mode"] == mode]
                gaps = [
                    max(r["durable_done"] for r in row["ranks"])
                    - max(r["part_in_s3"] for r in row["ranks"])
                    for row in mine
                ]
                lists = [sum(r["listings"] for r in row["ranks"]) for row in mine]
                table.append((name, mode, gaps, lists))
    results["loadavg_end"] = os.getloadavg()
    print()
    print(
        "| server | waits woken by | commit gap median s | worst s | listings per save (both ranks), median | worst |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, mode, gaps, lists in table:
        print(
            f"| {name} | {'job store' if mode == 'store' else 'polling S3'} | "
            f"{statistics.median(gaps):.3f} | {max(gaps):.3f} | {statistics.median(lists):.0f} | {max(lists)} |"
        )
    os.makedirs(RESULTS_DIR, exist_ok=True)
    out = os.path.join(RESULTS_DIR, "commit-latency.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
