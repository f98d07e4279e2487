"""A restart load of one rank's file by one reader thread against several (a file split
into runs of blobs), in one process, interleaved.

    python -m benchmarks.read_threads [--gib 1] [--reps 6] [--threads 1,2]

One ``dcp.save`` into the memory tier of ``--gib`` float32 (64 MiB tensors), then ``--reps``
rounds of a fresh ``TieredStorageReader`` load with each thread count; every value is
checked at the end. See benchmarks/README.md ("GPU staging" and the load path).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed.checkpoint as dcp

import tierckpt
from tierckpt import fetch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=6)
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.threads.split(",")]
    logging.getLogger("tierckpt").setLevel(logging.WARNING)
    root = tempfile.mkdtemp(dir="/dev/shm", prefix="tierckpt-bench-threads-")
    try:
        config = tierckpt.CheckpointConfig(
            namespace="threads",
            world_size=1,
            memory_root=root,
            durable_base_path="file://" + root + "/durable",
            memory_prefault=False,
        )
        n = max(int(args.gib * 16), 1)
        state = {"m": {f"w{i}": torch.randn(4096, 4096) for i in range(n)}}
        dcp.save(state, storage_writer=tierckpt.TieredStorageWriter(config, step=1))
        out = {"m": {k: torch.zeros_like(v) for k, v in state["m"].items()}}
        times: dict[int, list[float]] = {c: [] for c in counts}
        original = fetch.read_threads
        try:
            for _ in range(args.reps):
                for c in counts:
                    fetch.read_threads = lambda local_ranks, c=c: c  # type: ignore[misc]
                    t0 = time.perf_counter()
                    dcp.load(out, storage_reader=tierckpt.TieredStorageReader(config))
                    times[c].append(time.perf_counter() - t0)
        finally:
            fetch.read_threads = original  # type: ignore[misc]
        assert all(torch.equal(out["m"][k], v) for k, v in state["m"].items()), "wrong bytes"
        base = statistics.median(times[counts[0]])
        print("| reader threads | median s | worst s | speed vs the first |")
        print("|---|---|---|---|")
        for c, xs in times.items():
            med = statistics.median(xs)
            print(f"| {c} | {med:.3f} | {max(xs):.3f} | {base / med:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
