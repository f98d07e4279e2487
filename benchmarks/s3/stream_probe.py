"""How an upload while staging (``durable_stream``) slows the staging copy, in one process.

    .venv/bin/python -m benchmarks.s3.stream_probe --servers moto --mib 256 --trials 3

One process stages ``--mib`` of float32 tensors into a fresh memory-tier buffer, then
uploads the finished file (``put_file``, the default drain), or stages it while a
:class:`~tierckpt.staged_upload.StagedUpload` sends it to the same loopback server. Reported
per mode: staging seconds (what blocks training), staging + upload seconds, and the process's
CPU seconds. Its tmpfs files and the server are removed at exit.
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shutil
import statistics
import time
import uuid

import torch

from .servers import serving

MIB = 2**20
MODES = ("after", "while")


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _trial(mode: str, key: str, tensors: list[torch.Tensor], memory, cfg, tier) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from tierckpt.saving import acquire_buffer, release_buffer
    from tierckpt.staged_upload import StagedUpload

    nbytes = sum(t.numel() * 4 for t in tensors)
    buffer = acquire_buffer(memory, cfg, uuid.uuid4().hex[:8], 0, nbytes)
    try:
        c0, t0 = _cpu(), time.perf_counter()
        upload = None
        if mode == "while":
            upload = StagedUpload(tier, key, buffer.path, idle_s=60, log=logging.getLogger("x"))
            buffer.watcher = upload
        for t in tensors:
            buffer.place(t)
        buffer.finish(buffer.used)
        staged = time.perf_counter() - t0
        sent = upload.result() if upload is not None else tier.put_file(key, buffer.path)
        assert sent == nbytes, (sent, nbytes)
        return {"stage_s": staged, "total_s": time.perf_counter() - t0, "cpu_s": _cpu() - c0}
    finally:
        release_buffer(memory, cfg, buffer, discard=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.s3.stream_probe")
    p.add_argument("--servers", default="moto")
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--trials", type=int, default=3)
    args = p.parse_args(argv)
    from tierckpt import CheckpointConfig
    from tierckpt.tiers.memory import open_memory_tier
    from tierckpt.tiers.s3 import S3Tier

    root = f"/dev/shm/tierckpt-probe-{os.getpid()}"
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(32 * MIB // 4, generator=g) for _ in range(args.mib // 32)]
    print("| server | upload | staging s, median / worst | staging + upload s | CPU s |")
    print("|---|---|---:|---:|---:|")
    try:
        for server in args.servers.split(","):
            with serving(server, f"{root}-srv", "probe") as (srv, _client):
                cfg = CheckpointConfig(namespace="p", world_size=1, memory_root=root)
                memory = open_memory_tier(cfg)
                tier = S3Tier("s3://probe/x", endpoint_url=srv.endpoint_url, part_size=32 * MIB)
                runs: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
                for trial in range(args.trials):
                    for mode in MODES:
                        runs[mode].append(
                            _trial(mode, f"p/{trial}-{mode}", tensors, memory, cfg, tier)
                        )
                for mode, rs in runs.items():
                    st = [r["stage_s"] for r in rs]
                    med = {k: statistics.median(r[k] for r in rs) for k in ("total_s", "cpu_s")}
                    print(
                        f"| {server} | {mode} staging | {statistics.median(st):.2f} / {max(st):.2f} "
                        f"| {med['total_s']:.2f} | {med['cpu_s']:.2f} |",
                        flush=True,
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(f"{root}-srv", ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
