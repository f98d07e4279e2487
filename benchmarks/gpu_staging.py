"""Staging a CUDA state dict into the memory tier against a raw copy into pinned memory.

    python -m benchmarks.gpu_staging [--gib 2] [--saves 10] [--reps 10] [--root DIR] [--json F]
    torchrun --nproc-per-node 2 -m benchmarks.gpu_staging --gib 0.5   # 2 ranks, one GPU

Needs a CUDA device (issue 9, item 8); CI never runs it, the CPU path is what the tests
cover. In one process (or on every rank at once), in one run (tierckpt first, so its first
saves pay their own pinned memory):

- ``raw-pinned``: each tensor ``copy_(non_blocking=True)`` on a side stream into one
  preallocated pinned buffer at tierckpt's alignment, then one synchronize: the baseline of
  the target (blocked time <= 1.2x this). ``raw-pinned-1`` is one contiguous copy of the
  same bytes (the link's peak); ``raw-pageable`` the per-tensor copy into warm pageable memory.
- ``tierckpt``: ``dcp.async_save`` with ``TieredStorageWriter`` at default settings (a fresh
  job: ``prefault`` as ``CheckpointManager.restore`` calls it, then ``--saves`` saves): the
  time the call blocks (the state may change again when it returns) and the time until the
  step is committed in memory (survives kill -9), the first saves one by one.
- ``dcp-fs``: DCP's own ``FileSystemWriter(cache_staged_state_dict=True)`` on the same
  tmpfs (its pinned stager), for comparison.
- a restart-like load (a fresh ``TieredStorageReader``) into CUDA tensors, every value checked.

Before each save one tensor is overwritten by a kernel on the default stream, so a staging
copy that does not wait for the training stream would be caught by the check.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import tierckpt
from benchmarks.read_paths import preadv_file
from tierckpt.staging import align, tensor_bytes

GIB = 2**30


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _say(*args: object) -> None:
    if _rank() == 0:
        print(*args, flush=True)


def make_state(gib: float, width: int = 2048) -> dict[str, torch.Tensor]:
    """A model-like CUDA state: per layer a width x width weight and three width vectors."""
    layer = (width * width + 3 * width) * 4
    layers = max(int(gib * GIB) // layer, 1)
    gen = torch.Generator(device="cuda").manual_seed(1234)
    state: dict[str, torch.Tensor] = {}
    for i in range(layers):
        state[f"l{i}.w"] = torch.randn(width, width, device="cuda", generator=gen)
        for name in ("b", "ln_w", "ln_b"):
            state[f"l{i}.{name}"] = torch.randn(width, device="cuda", generator=gen)
    torch.cuda.synchronize()
    return state


def _timed(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    _barrier()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class RawCopies:
    """The baselines: device-to-host copies into preallocated, warm host memory."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        self.state = state
        total = sum(align(tensor_bytes(t)) for t in state.values())
        t0 = time.perf_counter()
        self.pinned = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        self.pinned_alloc_s = time.perf_counter() - t0
        self.pageable = torch.empty(total, dtype=torch.uint8)
        self.pageable.fill_(0)  # warm: the pages exist
        self.pinned.fill_(0)
        self.dst_pinned = self._views(self.pinned)
        self.dst_pageable = self._views(self.pageable)
        flat = sum(t.numel() for t in state.values())
        self.flat_src = torch.empty(flat, dtype=torch.float32, device="cuda")
        self.flat_dst = self.pinned[: flat * 4].view(torch.float32)

    def _views(self, buf: torch.Tensor) -> list[torch.Tensor]:
        views, off = [], 0
        for t in self.state.values():
            n = tensor_bytes(t)
            views.append(buf[off : off + n].view(t.dtype).view(t.shape))
            off = align(off + n)
        return views

    def per_tensor(self, pinned: bool) -> None:
        dst = self.dst_pinned if pinned else self.dst_pageable
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for d, s in zip(dst, self.state.values(), strict=True):
                d.copy_(s, non_blocking=pinned)
        stream.synchronize()

    def contiguous(self) -> None:
        self.flat_dst.copy_(self.flat_src, non_blocking=True)
        torch.cuda.synchronize()


def bench_raw(state: dict[str, torch.Tensor], reps: int) -> tuple[float, dict[str, Any]]:
    """(seconds to allocate the pinned buffer, the baselines' timings, interleaved)."""
    raw = RawCopies(state)
    cases: dict[str, list[float]] = {"raw-pinned": [], "raw-pinned-1": [], "raw-pageable": []}
    for _ in range(reps):
        cases["raw-pinned"].append(_timed(lambda: raw.per_tensor(True)))
        cases["raw-pinned-1"].append(_timed(raw.contiguous))
        cases["raw-pageable"].append(_timed(lambda: raw.per_tensor(False)))
    return raw.pinned_alloc_s, {k: _stats(v) for k, v in cases.items()}


def bench_preadv(root: str, nbytes: int, reps: int) -> dict[str, Any]:
    """A bare ``preadv`` of ``nbytes`` from a resident tmpfs file into warm memory (the base
    of issue 9's load target), and the same bytes host-to-device from warm pinned memory."""
    path = os.path.join(root, f"preadv-probe-r{_rank()}")
    out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out.fill_(1)
    view = memoryview(out.numpy())
    with open(path, "wb") as f:
        f.write(view)
    dest = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    reads: list[float] = []
    h2d: list[float] = []
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            preadv_file(path, view)
            reads.append(time.perf_counter() - t0)
            h2d.append(
                _timed(lambda: (dest.copy_(out, non_blocking=True), torch.cuda.synchronize()))
            )
    finally:
        os.unlink(path)
    return {"preadv": _stats(reads), "h2d_pinned": _stats(h2d)}


def _stats(xs: list[float]) -> dict[str, float]:
    return {"median": statistics.median(xs), "worst": max(xs), "best": min(xs), "n": len(xs)}


def _touch(state: dict[str, torch.Tensor], value: float) -> None:
    """Overwrite one tensor by a kernel on the training (default) stream."""
    next(iter(state.values())).fill_(value)


def _timed_async_save(sd: dict[str, Any], writer: Any) -> tuple[float, float]:
    """(seconds until the state may change again, seconds until the save completed)."""
    t0 = time.perf_counter()
    response = dcp.async_save(sd, storage_writer=writer)
    staging = getattr(response, "staging_completion", None)
    if staging is not None:
        staging.result()
    t1 = time.perf_counter()
    getattr(response, "upload_completion", response).result()
    return t1 - t0, time.perf_counter() - t0


def bench_tierckpt(
    state: dict[str, torch.Tensor], root: str, saves: int, world: int
) -> dict[str, Any]:
    config = tierckpt.CheckpointConfig(
        namespace="gpu",
        world_size=world,
        memory_root=os.path.join(root, "memory"),
        durable_base_path="file://" + os.path.join(root, "durable"),
    )
    sd = {"model": state}
    tierckpt.prefault(config, sd)
    blocked: list[float] = []
    total: list[float] = []
    for step in range(1, saves + 1):
        _touch(state, float(step))
        torch.cuda.synchronize()
        _barrier()
        b, t = _timed_async_save(sd, tierckpt.TieredStorageWriter(config, step=step))
        blocked.append(b)
        total.append(t)
    # A sync save too (write_data sees the CUDA tensors themselves).
    sync: list[float] = []
    for step in range(saves + 1, saves + 3):
        _touch(state, float(step))
        sync.append(
            _timed(
                lambda s=step: dcp.save(
                    sd, storage_writer=tierckpt.TieredStorageWriter(config, step=s)
                )
            )
        )
    last = saves + 2
    target = {"model": {k: torch.zeros_like(v) for k, v in state.items()}}
    loads = [
        _timed(lambda: dcp.load(target, storage_reader=tierckpt.TieredStorageReader(config)))
        for _ in range(3)
    ]
    torch.cuda.synchronize()
    wrong = [k for k, v in state.items() if not torch.equal(v, target["model"][k])]
    first = next(iter(state))
    return {
        "blocked_s": blocked,
        "committed_s": total,
        "sync_save_s": sync,
        "load_s": loads[0],
        "load_s_all": loads,
        "loaded_step_ok": bool(torch.all(target["model"][first] == float(last)).item()),
        "wrong_tensors": wrong[:5],
        "n_wrong": len(wrong),
    }


def bench_dcp_fs(state: dict[str, torch.Tensor], root: str, saves: int) -> dict[str, Any]:
    from torch.distributed.checkpoint import FileSystemWriter

    sd = {"model": state}
    blocked: list[float] = []
    total: list[float] = []
    writer = None
    for step in range(1, saves + 1):
        path = os.path.join(root, "dcp-fs", f"step-{step}")
        writer = FileSystemWriter(path, cache_staged_state_dict=True)
        torch.cuda.synchronize()
        _barrier()
        b, t = _timed_async_save(sd, writer)
        blocked.append(b)
        total.append(t)
        _barrier()
        if _rank() == 0:
            shutil.rmtree(os.path.join(root, "dcp-fs", f"step-{step - 1}"), ignore_errors=True)
    return {"blocked_s": blocked, "committed_s": total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="state size per rank")
    parser.add_argument("--saves", type=int, default=10)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--dcp-saves", type=int, default=4)
    parser.add_argument("--root", default="/dev/shm", help="a tmpfs directory")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--verbose", action="store_true", help="tierckpt's DEBUG log")
    args = parser.parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(asctime)s %(message)s")
        logging.getLogger("tierckpt").setLevel(logging.DEBUG)
    if not torch.cuda.is_available():
        print("gpu_staging: no CUDA device; this benchmark needs one", file=sys.stderr)
        return 2
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    torch.cuda.set_device(0)
    run_root = os.path.join(
        args.root, f"tierckpt-gpu-{os.environ.get('TORCHELASTIC_RUN_ID', os.getpid())}"
    )
    results: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "world_size": world,
        "gib_per_rank": args.gib,
    }
    try:
        state = make_state(args.gib)
        nbytes = sum(tensor_bytes(t) for t in state.values())
        results.update(tensors=len(state), bytes_per_rank=nbytes)
        # tierckpt first: its first saves must not find pinned memory the baseline freed.
        ours = bench_tierckpt(state, run_root, args.saves, world)
        results["pinned_alloc_s"], results["raw"] = bench_raw(state, args.reps)
        results["tierckpt"] = ours
        os.makedirs(run_root, exist_ok=True)
        results["load_base"] = bench_preadv(run_root, nbytes, max(args.reps // 2, 3))
        try:
            results["dcp-fs"] = bench_dcp_fs(state, run_root, args.dcp_saves)
        except Exception as e:  # a torch version without the cached stager: say so, go on
            results["dcp-fs"] = {"error": repr(e)}
        base = results["raw"]["raw-pinned"]["median"]
        steady = ours["blocked_s"][4:] or ours["blocked_s"]
        results["summary"] = {
            "raw_pinned_gbs": nbytes / base / 1e9,
            "raw_pinned_contiguous_gbs": nbytes / results["raw"]["raw-pinned-1"]["median"] / 1e9,
            "raw_pageable_gbs": nbytes / results["raw"]["raw-pageable"]["median"] / 1e9,
            "blocked_first_saves_vs_raw": [b / base for b in ours["blocked_s"][:4]],
            "blocked_steady_median_vs_raw": statistics.median(steady) / base,
            "blocked_steady_worst_vs_raw": max(steady) / base,
            "blocked_steady_gbs": nbytes / statistics.median(steady) / 1e9,
            "committed_steady_median_vs_raw": statistics.median(
                ours["committed_s"][4:] or ours["committed_s"]
            )
            / base,
            "load_gbs": nbytes / ours["load_s"] / 1e9,
            "load_vs_preadv": results["load_base"]["preadv"]["median"] / ours["load_s"],
            "preadv_gbs": nbytes / results["load_base"]["preadv"]["median"] / 1e9,
            "h2d_pinned_gbs": nbytes / results["load_base"]["h2d_pinned"]["median"] / 1e9,
        }
        _say(json.dumps(results, indent=1))
        if args.json and _rank() == 0:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
    finally:
        try:
            _barrier()
        finally:  # also when another rank failed: tmpfs is RAM
            if _rank() == 0:
                shutil.rmtree(run_root, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
