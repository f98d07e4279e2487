"""How many bytes to copy, then hash, at a time (``tierckpt.constants.HASH_CHUNK``).

    python -m benchmarks.hash_chunk [--gib 1] [--reps 5] [--root /dev/shm] [--chunks-kib 256,1024,4096]

One process, one thread, warm memory, through tierckpt's own code: a steady-state save's
copy into a pooled, mapped staging file with its checksum (``StagingBuffer.place_hashed``),
and a load's ``preadv`` out of the memory tier with its checksum (``SharedRead.read_into``),
each beside the same bytes moved without a checksum. Every copy is hashed chunk by chunk
while the chunk is still in cache; a smaller chunk stays in L2 but costs more calls.
Medians and worst of ``--reps`` rounds, each running every case once. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from tierckpt.staging import StagingBuffer
from tierckpt.tiers.memory import MemoryTier


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--root", default="/dev/shm", help="a tmpfs directory")
    ap.add_argument("--chunks-kib", default="256,1024,4096,16384")
    a = ap.parse_args(argv)
    nbytes = int(a.gib * (1 << 30)) // 4 * 4
    chunks = [int(c) << 10 for c in a.chunks_kib.split(",")]
    root = tempfile.mkdtemp(prefix="tierckpt-bench-hash-", dir=a.root)
    try:
        src = torch.randn(nbytes // 4)
        dst = torch.empty_like(src)
        dst.fill_(0)  # warm
        raw_dst = memoryview(dst.view(torch.uint8).numpy())  # type: ignore[arg-type]
        path = os.path.join(root, "buf")
        open(path, "wb").close()
        first = StagingBuffer(path, nbytes)  # a new file: written with pwrite
        first.place(src)
        first.close()

        def staged() -> StagingBuffer:
            return StagingBuffer(path, nbytes)  # a pooled file: its mapping, populated

        buffers: list[StagingBuffer] = []

        def place(chunk: int | None) -> Callable[[], object]:
            def run() -> object:
                buf = staged()
                buffers.append(buf)
                if chunk is None:
                    return buf.view(buf.alloc(nbytes), src.dtype, tuple(src.shape)).copy_(src)
                return buf.place_hashed(src, chunk)

            return run

        tier = MemoryTier(root)
        shared = tier.open_shared("buf")
        fd = os.open(path, os.O_RDONLY)

        def read(chunk: int | None) -> Callable[[], object]:
            def run() -> object:
                if chunk is not None:
                    return shared.read_into(0, raw_dst, chunk)
                done = 0
                while done < nbytes:
                    done += os.preadv(fd, [raw_dst[done:]], done)
                return done

            return run

        cases: list[tuple[str, Callable[[], object]]] = []
        for label, make in (("save: copy into a pooled mapping", place), ("load: preadv", read)):
            cases.append((f"{label}, no checksum", make(None)))
            cases += [(f"{label} + xxh3-128 per {c >> 10} KiB", make(c)) for c in chunks]
        times: dict[str, list[float]] = {label: [] for label, _ in cases}
        for _ in range(a.reps):  # interleaved: a noisy stretch hits every case alike
            for label, fn in cases:
                times[label].append(_seconds(fn))
                for buf in buffers:
                    buf.close()
                buffers.clear()
        shared.close()
        os.close(fd)
        gib = nbytes / (1 << 30)
        print(f"{gib:.2f} GiB, one process, {a.reps} reps, root {a.root}")
        print("| path | median ms | worst ms | GB/s (median) |")
        print("|---|---|---|---|")
        for label, ts in times.items():
            med = statistics.median(ts)
            print(f"| {label} | {med * 1e3:.0f} | {max(ts) * 1e3:.0f} | {nbytes / med / 1e9:.1f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
