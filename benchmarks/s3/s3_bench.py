"""S3 save and load throughput of one state dict: tierckpt, s3torchconnector's DCP, boto3.

    .venv/bin/python -m benchmarks.s3                      # 1 GiB over 2 ranks, 3 reps, moto + s3rver
    .venv/bin/python -m benchmarks.s3 --gib 0.25 --reps 1  # a quick run
    .venv/bin/python -m benchmarks.s3 --servers moto --systems tierckpt,boto3

Every system saves and loads the same state (``--gib`` in total, each rank its own
float32 tensors) against the same loopback server, one system after another, each in fresh
rank processes (gloo on CPU):

- ``tierckpt``: ``dcp.save`` with a ``TieredStorageWriter(save_to_durable=True)`` into the
  memory tier, timed until ``durable_done`` on every rank (the step committed in S3); load:
  the memory tier wiped, a fresh ``TieredStorageReader`` reads everything from S3.
  ``tierckpt-stream`` is the same with ``durable_stream=True`` (the data uploads while it
  is staged).
- ``s3torchconnector``: ``dcp.save`` / ``dcp.load`` with s3torchconnector 1.5's
  ``S3StorageWriter`` / ``S3StorageReader`` (defaults, ``force_path_style=True``).
- ``boto3``: each rank ``torch.save`` into a ``BytesIO`` then ``upload_fileobj``; load:
  ``download_fileobj`` then ``torch.load``.

Each phase starts and ends with a barrier; its time is the slowest rank's. Loaded values
are checked bit-exact against the saved ones. Results: a Markdown table on stdout and JSON in
``benchmarks/s3/results/``. See benchmarks/s3/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._launch import RunDirs, launch, terminate_on_signals

__all__ = ["main"]

MIB = 2**20
SYSTEMS = ("tierckpt", "tierckpt-stream", "s3torchconnector", "boto3")
SERVERS = ("moto", "s3rver")
BASELINE = "s3torchconnector"
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Options:
    """What every rank needs to know (picklable)."""

    system: str
    server: str
    server_pid: int
    bucket: str
    run_id: str
    per_rank_bytes: int
    tensor_bytes: int
    reps: int
    part_size: int
    concurrency: int
    memory_root: str


# --------------------------------------------------------------------------- on each rank


def _state(rank: int, opts: Options) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(1234 + rank)
    n, left, out = 0, opts.per_rank_bytes, {}
    while left > 0:
        nbytes = min(opts.tensor_bytes, left)
        out[f"rank{rank}.t{n:03d}"] = torch.randn(nbytes // 4, generator=g)
        left -= nbytes
        n += 1
    return out


class _Phase:
    """Barrier, run, barrier: the slowest rank's seconds, every rank's CPU, the server's CPU."""

    def __init__(self, opts: Options) -> None:
        import psutil

        self.server = psutil.Process(opts.server_pid)

    def _server_cpu(self) -> float:
        import psutil

        total = 0.0
        with contextlib.suppress(psutil.Error):
            for p in [self.server, *self.server.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system
        return total

    def run(self, fn: Callable[[], Any]) -> tuple[dict[str, float], Any]:
        import torch
        import torch.distributed as dist

        dist.barrier()
        s0, c0, t0 = self._server_cpu(), time.process_time(), time.perf_counter()
        out = fn()
        mine = time.perf_counter() - t0
        cpu = torch.tensor([time.process_time() - c0])
        dist.barrier()
        wall = time.perf_counter() - t0
        server = self._server_cpu() - s0
        dist.all_reduce(cpu)
        rec = {"s": wall, "rank_s": mine, "client_cpu_s": float(cpu.item())}
        rec["server_cpu_s"] = server  # meaningful on rank 0 (the one reported)
        return rec, out


def _max(value: float) -> float:
    import torch
    import torch.distributed as dist

    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _tierckpt(rank: int, opts: Options, state: Any, target: Any, prefix: str, rep: int) -> Any:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter

    cfg = CheckpointConfig(
        namespace="bench",
        world_size=dist.get_world_size(),
        memory_root=opts.memory_root,
        durable_base_path=f"s3://{opts.bucket}/{prefix}",
        memory_keep_last=1,
        s3_part_size=opts.part_size,
        s3_max_concurrency=opts.concurrency,
        durable_stream=opts.system == "tierckpt-stream",
    )
    phase = _Phase(opts)
    returned: dict[str, float] = {}

    def save() -> None:
        w = TieredStorageWriter(cfg, step=rep, save_to_durable=True)
        t0 = time.perf_counter()
        dcp.save(state, storage_writer=w)
        returned["s"] = time.perf_counter() - t0
        w.durable_done.result()

    save_rec, _ = phase.run(save)
    save_rec["memory_commit_s"] = _max(returned["s"])
    # Lose the memory tier: the load must come from S3.
    dist.barrier()
    if rank == 0:
        shutil.rmtree(os.path.join(opts.memory_root, "bench"), ignore_errors=True)
    dist.barrier()

    def load() -> dict[str, int]:
        reader = TieredStorageReader(cfg, step=rep)
        dcp.load(target, storage_reader=reader)
        return dict(reader.bytes_read_by_tier)

    load_rec, by_tier = phase.run(load)
    load_rec["bytes_by_tier"] = by_tier
    return save_rec, load_rec, target


def _s3torchconnector(
    rank: int, opts: Options, state: Any, target: Any, prefix: str, rep: int
) -> Any:
    import torch.distributed.checkpoint as dcp
    from s3torchconnector import S3ClientConfig
    from s3torchconnector.dcp import S3StorageReader, S3StorageWriter

    config = S3ClientConfig(force_path_style=True)
    path = f"s3://{opts.bucket}/{prefix}"
    phase = _Phase(opts)

    def save() -> None:
        w = S3StorageWriter(region="us-east-1", path=path, s3client_config=config)
        dcp.save(state, storage_writer=w)

    def load() -> None:
        r = S3StorageReader(region="us-east-1", path=path, s3client_config=config)
        dcp.load(target, storage_reader=r)

    save_rec, _ = phase.run(save)
    load_rec, _ = phase.run(load)
    return save_rec, load_rec, target


def _boto3(rank: int, opts: Options, state: Any, target: Any, prefix: str, rep: int) -> Any:
    import boto3
    import torch
    from botocore.config import Config

    client = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
    key = f"{prefix}/rank{rank}.pt"
    phase = _Phase(opts)

    def save() -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        client.upload_fileobj(buf, opts.bucket, key)

    def load() -> Any:
        buf = io.BytesIO()
        client.download_fileobj(opts.bucket, key, buf)
        buf.seek(0)
        return torch.load(buf, map_location="cpu")

    save_rec, _ = phase.run(save)
    load_rec, loaded = phase.run(load)
    return save_rec, load_rec, loaded


_RUNNERS = {
    "tierckpt": _tierckpt,
    "tierckpt-stream": _tierckpt,
    "s3torchconnector": _s3torchconnector,
    "boto3": _boto3,
}


def rank_main(rank: int, world_size: int, opts: Options) -> list[dict[str, Any]]:
    """Every repetition of one system on this rank; rank 0's records are reported."""
    import torch
    import torch.distributed as dist

    from .servers import delete_prefix

    state = _state(rank, opts)
    target = {k: torch.empty_like(v) for k, v in state.items()}
    reps = []
    for rep in range(opts.reps):
        for t in target.values():
            t.zero_()
        prefix = f"{opts.run_id}/{opts.system}/rep{rep}"
        save_rec, load_rec, loaded = _RUNNERS[opts.system](rank, opts, state, target, prefix, rep)
        same = torch.tensor([int(all(torch.equal(state[k], loaded[k]) for k in state))])
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        if not same.item():
            raise AssertionError(f"{opts.system} rep {rep}: loaded values differ from saved")
        dist.barrier()
        if rank == 0:
            import boto3
            from botocore.config import Config

            client = boto3.client("s3", config=Config(s3={"addressing_style": "path"}))
            delete_prefix(client, opts.bucket, prefix + "/")
        dist.barrier()
        reps.append({"rep": rep, "save": save_rec, "load": load_rec})
    return reps


# --------------------------------------------------------------------------- driver


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.s3", description=__doc__.split("\n")[0])
    p.add_argument("--gib", type=float, default=1.0, help="state dict size over all ranks")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is reported")
    p.add_argument("--servers", default=",".join(SERVERS), help="moto,s3rver")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--tensor-mib", type=int, default=32, help="size of each tensor")
    p.add_argument("--part-mib", type=int, default=32, help="tierckpt s3_part_size")
    p.add_argument("--concurrency", type=int, default=8, help="tierckpt s3_max_concurrency")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per system and server")
    p.add_argument("--out", default=None, help="JSON path (default results/s3-<gib>g-<n>r.json)")
    return p.parse_args(argv)


def _median(reps: list[dict[str, Any]], phase: str, key: str = "s") -> float:
    return statistics.median(r[phase][key] for r in reps)


def summarize(record: dict[str, Any], total_bytes: int) -> dict[str, Any]:
    """Medians and MiB/s of one system on one server."""
    reps = record["reps"]
    out = {}
    for phase in ("save", "load"):
        s = _median(reps, phase)
        out[phase] = {
            "median_s": s,
            "worst_s": max(r[phase]["s"] for r in reps),
            "mib_s": total_bytes / MIB / s,
            "client_cpu_s": _median(reps, phase, "client_cpu_s"),
            "server_cpu_s": _median(reps, phase, "server_cpu_s"),
        }
        out[phase]["server_cpu_share"] = out[phase]["server_cpu_s"] / s
    # How long dcp.save (or torch.save + upload) holds up the training loop: tierckpt's
    # returns at the memory commit; the others return once the bytes are in S3.
    if "memory_commit_s" in reps[0]["save"]:
        out["save"]["blocked_s"] = _median(reps, "save", "memory_commit_s")
    else:
        out["save"]["blocked_s"] = out["save"]["median_s"]
    out["loadavg"] = record.get("loadavg")
    return out


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per server and system, ratios against s3torchconnector."""
    lines = [
        "| server | system | save MiB/s (until in S3) | load MiB/s | save × s3tc | load × s3tc "
        "| training blocked per save | blocked ÷ s3tc's | save s, median / worst "
        "| server CPU save / load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    empty = " | | | | | | | | |"
    for server, systems in results["servers"].items():
        if "error" in systems:
            lines.append(f"| {server} | (not run: {systems['error']}){empty}")
            continue
        base = systems.get(BASELINE, {}).get("summary")
        for name, rec in systems.items():
            if "summary" not in rec:
                lines.append(f"| {server} | {name} (failed: {rec.get('error', '?')[:60]}){empty}")
                continue
            s = rec["summary"]
            ratio = {
                ph: (f"{s[ph]['mib_s'] / base[ph]['mib_s']:.2f}×" if base else "–")
                for ph in ("save", "load")
            }
            cpu = f"{s['save']['server_cpu_share']:.0%} / {s['load']['server_cpu_share']:.0%}"
            blocked = s["save"]["blocked_s"]
            b_ratio = f"{blocked / base['save']['blocked_s']:.2f}" if base else "–"
            spread = f"{s['save']['median_s']:.2f} / {s['save'].get('worst_s', 0.0):.2f}"
            lines.append(
                f"| {server} | {name} | {s['save']['mib_s']:.0f} | {s['load']['mib_s']:.0f} "
                f"| {ratio['save']} | {ratio['load']} | {blocked:.2f} s | {b_ratio} | {spread} "
                f"| {cpu} |"
            )
    return "\n".join(lines)


def _machine() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        models = {ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")}
        info["cpu_model"] = ", ".join(sorted(models))
    info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    from importlib.metadata import version

    for pkg in ("obstore", "moto", "boto3", "s3torchconnector"):
        with contextlib.suppress(Exception):
            info[pkg] = version(pkg)
    return info


def _run_server(
    name: str, args: argparse.Namespace, dirs: RunDirs, systems: list[str], total: int
) -> dict[str, Any]:
    from .servers import empty_and_delete_bucket, start_server

    try:
        server = start_server(name, dirs.shm)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    saved_env = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    bucket = f"tierckpt-bench-{dirs.id}"
    client = server.client()
    out: dict[str, Any] = {}
    try:
        client.create_bucket(Bucket=bucket)
        for system in systems:
            opts = Options(
                system=system,
                server=name,
                server_pid=server.proc.pid,
                bucket=bucket,
                run_id=dirs.id,
                per_rank_bytes=total // args.ranks,
                tensor_bytes=args.tensor_mib * MIB,
                reps=args.reps,
                part_size=args.part_mib * MIB,
                concurrency=args.concurrency,
                memory_root=os.path.join(dirs.shm, "memory"),
            )
            print(f"[{name}] {system}: {args.reps} reps of {total / MIB:.0f} MiB ...", flush=True)
            t0 = time.monotonic()
            load_before = os.getloadavg()
            try:
                reps = launch(
                    rank_main,
                    args.ranks,
                    (opts,),
                    out_dir=dirs.disk,
                    threads=1,
                    timeout_s=args.timeout_s,
                )
                loadavg = {"before": load_before, "after": os.getloadavg()}
                out[system] = {
                    "reps": reps,
                    "loadavg": loadavg,
                    "summary": summarize({"reps": reps, "loadavg": loadavg}, total),
                }
                s = out[system]["summary"]
                print(
                    f"[{name}] {system}: save {s['save']['mib_s']:.0f} MiB/s, "
                    f"load {s['load']['mib_s']:.0f} MiB/s ({time.monotonic() - t0:.0f}s)",
                    flush=True,
                )
            except Exception as e:
                traceback.print_exc()
                out[system] = {"error": f"{type(e).__name__}: {str(e)[-2000:]}"}
            finally:
                shutil.rmtree(opts.memory_root, ignore_errors=True)
                with contextlib.suppress(Exception):
                    from .servers import delete_prefix

                    delete_prefix(client, bucket, f"{dirs.id}/{system}/")
    finally:
        with contextlib.suppress(Exception):
            empty_and_delete_bucket(client, bucket)
        server.close()
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    systems = [s for s in args.systems.split(",") if s]
    servers = [s for s in args.servers.split(",") if s]
    for s in systems:
        if s not in SYSTEMS:
            raise SystemExit(f"unknown system {s!r}; choose from {', '.join(SYSTEMS)}")
    for s in servers:
        if s not in SERVERS:
            raise SystemExit(f"unknown server {s!r}; choose from {', '.join(SERVERS)}")
    total = int(args.gib * 2**30)
    out_path = args.out or os.path.join(
        RESULTS_DIR, f"s3-{args.gib:g}g-{args.ranks}r-{args.reps}x.json"
    )
    results: dict[str, Any] = {
        "command": " ".join(
            shlex.quote(a) for a in [".venv/bin/python", "-m", "benchmarks.s3", *sys.argv[1:]]
        ),
        "machine": _machine(),
        "options": {**vars(args), "total_bytes": total},
        "servers": {},
    }
    with terminate_on_signals(), RunDirs() as dirs:
        for name in servers:
            results["servers"][name] = _run_server(name, args, dirs, systems, total)
    print()
    print(table(results))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    print(f"\nJSON: {out_path}")
    failed = [
        f"{server}/{name}"
        for server, sysmap in results["servers"].items()
        for name, rec in sysmap.items()
        if name == "error" or "error" in rec
    ]
    return 1 if failed else 0
