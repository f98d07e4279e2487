"""A load's copy out of the memory tier: ``preadv`` against a read-only mapping, by mount.

    python -m benchmarks.read_paths [--gib 1] [--reps 7] [--root /dev/shm] [--root /mnt/huge]

One process, one thread, a resident file, a warm destination, a fresh handle per read (as a
load opens one): tierckpt's own ``SharedRead`` (``preadv`` + xxh3-128 per 1 MiB), the
alternative it was measured against (a read-only mapping of the file, each 1 MiB copied out
and hashed where it landed: cheap to map on huge pages, not shipped because it did not win),
and a bare ``preadv`` without a checksum, the floor of issue 9's load target. Cases
interleave within each rep; medians and worst of ``--reps``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import xxhash

from tierckpt.constants import READ_HASH_CHUNK
from tierckpt.hugepages import mount_of
from tierckpt.tiers.memory import MemoryTier


def _seconds(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def preadv_file(path: str, out: memoryview) -> int:
    """A bare ``preadv`` loop: the first ``len(out)`` bytes of ``path`` into ``out``, from a
    fresh descriptor (as a load opens one), no checksum."""
    fd = os.open(path, os.O_RDONLY)
    try:
        done = 0
        while done < len(out):
            done += os.preadv(fd, [out[done:]], done)
    finally:
        os.close(fd)
    return done


def _cases(root: str, nbytes: int, out: memoryview) -> dict[str, Callable[[], object]]:
    """The read paths over one file of ``nbytes`` under ``root``."""
    tier = MemoryTier(root)
    path = os.path.join(root, "blob")

    def bare_preadv() -> object:
        return preadv_file(path, out[:nbytes])

    def shared_read() -> object:
        with tier.open_shared("blob") as handle:
            return handle.read_into(0, out)

    def mapped_read() -> object:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), nbytes, access=mmap.ACCESS_READ) as m:
            hasher = xxhash.xxh3_128()
            with memoryview(m) as source:
                for done in range(0, nbytes, READ_HASH_CHUNK):
                    end = min(done + READ_HASH_CHUNK, nbytes)
                    with source[done:end] as piece:
                        out[done:end] = piece
                    hasher.update(out[done:end])
            return hasher.hexdigest()

    return {
        "preadv, no checksum": bare_preadv,
        "preadv + xxh3-128 (SharedRead)": shared_read,
        "mapping + xxh3-128 (not shipped)": mapped_read,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument(
        "--root", action="append", help="a tmpfs directory (repeatable; default /dev/shm)"
    )
    a = ap.parse_args(argv)
    nbytes = int(a.gib * (1 << 30)) // 4 * 4
    src = torch.randn(nbytes // 4)
    dst = torch.zeros_like(src)  # touched: the copy, not page faults, is measured
    out = memoryview(dst.view(torch.uint8).numpy())  # type: ignore[arg-type]
    print(f"{nbytes / (1 << 30):.2f} GiB, one process, {a.reps} reps, fresh handle per read")
    print("| root (huge pages) | path | median ms | worst ms | speed vs bare preadv |")
    print("|---|---|---|---|---|")
    for base in a.root or ["/dev/shm"]:
        root = tempfile.mkdtemp(prefix="tierckpt-bench-read-", dir=base)
        try:
            with open(os.path.join(root, "blob"), "wb") as f:
                f.write(memoryview(src.view(torch.uint8).numpy()))  # type: ignore[arg-type]
            cases = _cases(root, nbytes, out)
            times: dict[str, list[float]] = {label: [] for label in cases}
            for _ in range(a.reps):
                for label, fn in cases.items():
                    times[label].append(_seconds(fn))
            assert torch.equal(dst, src), "a read path returned other bytes"
            mount = mount_of(root)
            where = f"{base} ({mount.huge if mount else '?'})"
            floor = statistics.median(times["preadv, no checksum"])
            for label, ts in times.items():
                med = statistics.median(ts)
                print(
                    f"| {where} | {label} | {med * 1e3:.0f} | {max(ts) * 1e3:.0f} "
                    f"| {floor / med:.2f} |"
                )
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
