"""What filling tmpfs pages costs, one process, one thread: the choices behind staging.

    python -m benchmarks.page_costs [--gib 0.5] [--reps 3] [--root /dev/shm] [--cold-wait-s 0]

Each row moves the same bytes from a warm tensor into a tmpfs file (or back), in a fresh
file unless it says "resident"; medians and worst of ``--reps``. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import shutil
import statistics
import time
import warnings
from collections.abc import Callable

import torch

from tierckpt.hugepages import mount_of

MADV_POPULATE_WRITE = 23
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)
CHUNK = 64 << 20


def _addr(mm: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(mm))


def _view(mm: mmap.mmap) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.frombuffer(mm, dtype=torch.uint8)


class Probe:
    def __init__(self, nbytes: int, directory: str) -> None:
        self.n = nbytes
        self.path = os.path.join(directory, "probe.bin")
        self.src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
        self.warm = self.src.clone()
        self.raw = memoryview(self.src.numpy())
        self.libc = ctypes.CDLL(None, use_errno=True)

    def discard(self) -> None:
        """Delete the last row's file, so its pages go back before the next row."""
        if os.path.exists(self.path):
            os.remove(self.path)

    def fresh(self) -> int:
        self.discard()
        return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)

    def pwrite_all(self, fd: int) -> None:
        for off in range(0, self.n, CHUNK):
            os.pwrite(fd, self.raw[off : off + CHUNK], off)

    def rows(self) -> dict[str, Callable[[], float]]:
        def timed(fn: Callable[[], object]) -> float:
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t

        def mapped_copy(populate: bool, fallocate: bool) -> float:
            fd = self.fresh()
            if fallocate:
                os.posix_fallocate(fd, 0, self.n)
            else:
                os.ftruncate(fd, self.n)
            t = time.perf_counter()
            mm = mmap.mmap(fd, self.n, flags=mmap.MAP_SHARED | (MAP_POPULATE if populate else 0))
            _view(mm).copy_(self.src)
            s = time.perf_counter() - t
            mm.close()
            os.close(fd)
            return s

        def with_fd(prepare: Callable[[int], object], fn: Callable[[int], object]) -> float:
            fd = self.fresh()
            prepare(fd)
            s = timed(lambda: fn(fd))
            os.close(fd)
            return s

        def resident_copy() -> float:
            fd = self.fresh()
            self.pwrite_all(fd)
            mm = mmap.mmap(fd, self.n, flags=mmap.MAP_SHARED | MAP_POPULATE)
            s = timed(lambda: _view(mm).copy_(self.src))
            mm.close()
            os.close(fd)
            return s

        def populate_resident() -> float:
            fd = self.fresh()
            self.pwrite_all(fd)
            s = timed(lambda: mmap.mmap(fd, self.n, flags=mmap.MAP_SHARED | MAP_POPULATE).close())
            os.close(fd)
            return s

        def preadv() -> float:
            fd = self.fresh()
            self.pwrite_all(fd)
            dst = memoryview(self.warm.numpy())

            def read() -> None:
                for off in range(0, self.n, CHUNK):
                    os.preadv(fd, [dst[off : off + CHUNK]], off)

            s = timed(read)
            os.close(fd)
            return s

        def nothing(fd: int) -> None:
            return None

        return {
            "memcpy into warm memory": lambda: timed(lambda: self.warm.copy_(self.src)),
            "fresh file: fallocate + MAP_POPULATE + copy (before)": lambda: mapped_copy(True, True),
            "fresh file: mmap + copy (fault + zero per page)": lambda: mapped_copy(False, False),
            "fresh file: pwrite (staging now)": lambda: with_fd(nothing, self.pwrite_all),
            "fresh file: fallocate only (a spare, background)": lambda: with_fd(
                nothing, lambda fd: os.posix_fallocate(fd, 0, self.n)
            ),
            "fallocated spare: pwrite (staging now)": lambda: with_fd(
                lambda fd: os.posix_fallocate(fd, 0, self.n), self.pwrite_all
            ),
            "fallocated spare: mmap + copy (faults)": lambda: mapped_copy(False, True),
            "resident file: MAP_POPULATE only": populate_resident,
            "resident file, populated mapping: copy": resident_copy,
            "resident file: preadv into warm memory": preadv,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.page_costs")
    p.add_argument("--gib", type=float, default=0.5)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--root",
        default="/dev/shm",
        help="the tmpfs to measure (e.g. a private mount with huge=always)",
    )
    p.add_argument(
        "--cold-wait-s",
        type=float,
        default=0.0,
        help="idle before each row, so the memory freed by the row before is cold again",
    )
    args = p.parse_args(argv)
    mount = mount_of(args.root)
    torch.set_num_threads(1)
    directory = os.path.join(args.root, f"tierckpt-bench-pages-{os.getpid()}")
    os.makedirs(directory)
    try:
        probe = Probe(int(args.gib * 2**30), directory)
        rows = probe.rows()
        times: dict[str, list[float]] = {k: [] for k in rows}
        for _ in range(args.reps):
            for name, fn in rows.items():
                probe.discard()
                time.sleep(args.cold_wait_s)
                times[name].append(fn())
        mib = probe.n / 2**20
        print(
            f"{args.gib} GiB in {args.root} (huge={mount.huge if mount else '?'}), "
            f"medians of {args.reps} "
            f"(worst in brackets), {args.cold_wait_s:g} s idle before each row"
        )
        for name, ts in times.items():
            med = statistics.median(ts)
            print(f"| {name:54s} | {mib / med:7,.0f} MiB/s | {med:.3f} s ({max(ts):.3f}) |")
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
