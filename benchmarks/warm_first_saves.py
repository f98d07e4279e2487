"""A fresh job's first saves on warm memory, with and without shmem huge pages.

    python -m benchmarks.warm_first_saves --roots /mnt/tierckpt-huge,/dev/shm [--gib 1] [--runs 3]

One process, ``dcp.save`` of 252 float32 tensors (``--gib`` in all), 6 saves back to back:
tierckpt's memory tier (``memory_keep_last`` 3, no spare prefault) against DCP's
``FileSystemWriter`` keeping 3 steps the same way. Before each series, 5x the state is written
to the same tmpfs and deleted, so the saves get memory just freed, as on a host that does not
hand free memory back (bare metal). One small untimed series per system comes first (a
process's one-time costs). On this VM memory left unused for ~20 s goes back to the
host and costs the same to touch with any page size: ``benchmarks.run`` measures that case.
See benchmarks/README.md, "Shmem huge pages".
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Iterator

import torch
import torch.distributed.checkpoint as dcp

import tierckpt
from tierckpt.hugepages import mount_of

SAVES = 6
KEEP = 3


@contextlib.contextmanager
def _scratch(root: str) -> Iterator[str]:
    path = os.path.join(root, f"tierckpt-bench-warm-{uuid.uuid4().hex[:8]}")
    os.makedirs(path, mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _warm(directory: str, nbytes: int) -> None:
    """Write ``nbytes`` into a file there and delete it: the next allocations reuse its pages."""
    chunk = memoryview(bytearray(64 << 20))
    path = os.path.join(directory, "warm")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for off in range(0, nbytes, chunk.nbytes):
            os.pwrite(fd, chunk, off)
    finally:
        os.close(fd)
        os.remove(path)


def _series(system: str, root: str, state: dict[str, torch.Tensor], nbytes: int) -> list[float]:
    times = []
    with _scratch(root) as base:
        _warm(base, 5 * nbytes)
        cfg = tierckpt.CheckpointConfig(
            namespace="warm",
            world_size=1,
            memory_root=os.path.join(base, "memory"),
            durable_base_path="file://" + os.path.join(base, "durable"),
            memory_keep_last=KEEP,
            memory_prefault=False,
        )
        for step in range(1, SAVES + 1):
            if system == "tierckpt":
                writer: object = tierckpt.TieredStorageWriter(cfg, step=step)
            else:
                writer = dcp.FileSystemWriter(os.path.join(base, f"step_{step}"))
            t = time.perf_counter()
            dcp.save(state, storage_writer=writer)  # type: ignore[arg-type]
            times.append(time.perf_counter() - t)
            if system == "dcp" and step > KEEP:
                shutil.rmtree(os.path.join(base, f"step_{step - KEEP}"))
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.warm_first_saves")
    p.add_argument("--roots", default="/dev/shm", help="comma-separated tmpfs directories")
    p.add_argument("--gib", type=float, default=1.0, help="state size (default 1)")
    p.add_argument("--runs", type=int, default=3, help="series per system and root (default 3)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    count = 252
    per = max(1, int(args.gib * 2**30) // 4 // count)
    state = {f"t{i}": torch.randn(per) for i in range(count)}
    nbytes = per * 4 * count
    small = {k: v[:1024] for k, v in state.items()}
    for system in ("tierckpt", "dcp"):  # one-time costs of a process (imports, pools): untimed
        _series(system, args.roots.split(",")[0], small, 0)
    print(
        f"{nbytes / 2**30:.2f} GiB, {count} tensors, {SAVES} saves back to back, {args.runs} runs"
    )
    print("| tmpfs | system | saves #1-#6, s (median of runs) | worst of #1-#4 | worst of all |")
    print("|---|---|---|---|---|")
    for root in args.roots.split(","):
        mount = mount_of(root)
        label = f"{root} (huge={mount.huge if mount else '?'})"
        for system in ("tierckpt", "dcp"):
            runs = [_series(system, root, state, nbytes) for _ in range(args.runs)]
            med = [statistics.median(r[i] for r in runs) for i in range(SAVES)]
            first = max(max(r[:4]) for r in runs)
            worst = max(max(r) for r in runs)
            cells = " ".join(f"{x:.3f}" for x in med)
            print(f"| {label} | {system} | {cells} | {first:.3f} | {worst:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
