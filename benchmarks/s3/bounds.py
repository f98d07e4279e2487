"""What bounds S3 throughput here: the server, the client library, or tierckpt's own steps?

    .venv/bin/python -m benchmarks.s3.bounds                 # moto and s3rver
    .venv/bin/python -m benchmarks.s3.bounds --servers s3rver --mib 256

1. ``upload``: two processes (as two ranks would) each upload one tmpfs file of ``--mib``
   at the same moment, with obstore (tierckpt's client; 32 MiB parts, 8 in flight),
   s3torchconnector's CRT client and boto3's ``upload_file``. Wall time, MiB/s and the
   server's CPU seconds: if every client gets the same rate and the server's CPU time is
   close to the wall time, the server is the bound.
2. ``drain``: tierckpt on 2 gloo ranks, each saving ``--mib`` with ``save_to_durable=True``
   over part sizes and concurrencies: when the memory commit returned, when each rank's
   part was in S3, when ``durable_done`` completed (seconds from the start of the save).

Prints one line per measurement and writes ``results/bounds-<mib>m.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import time
from typing import Any

from .._launch import RunDirs, launch, terminate_on_signals
from .servers import serving

MIB = 2**20
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
CLIENTS = ("obstore", "s3torchconnector", "boto3")
DRAIN_SETTINGS = ((32, 8), (8, 8), (64, 8), (32, 4), (32, 16))
"""(part MiB, concurrency) of the tierckpt drain runs; the first is the default."""


def _upload_one(client: str, path: str, bucket: str, endpoint: str, key: str) -> None:
    if client == "obstore":
        from pathlib import Path

        import obstore
        from obstore.store import S3Store

        store = S3Store(
            bucket,
            config={
                "endpoint": endpoint,
                "virtual_hosted_style_request": False,
                "region": "us-east-1",
            },
            client_options={"allow_http": True, "timeout": "300s"},
        )
        obstore.put(store, key, Path(path), chunk_size=32 * MIB, max_concurrency=8)
    elif client == "s3torchconnector":
        from s3torchconnector import S3ClientConfig
        from s3torchconnector._s3client import S3Client

        s3c = S3Client(
            "us-east-1", endpoint=endpoint, s3client_config=S3ClientConfig(force_path_style=True)
        )
        writer = s3c.put_object(bucket, key)
        with open(path, "rb") as f:
            while chunk := f.read(32 * MIB):
                writer.write(chunk)
        writer.close()
    else:
        import boto3

        boto3.client("s3", endpoint_url=endpoint).upload_file(path, bucket, key)


def _uploader(
    client: str, path: str, bucket: str, endpoint: str, key: str, go: Any, out: Any
) -> None:
    go.wait()
    t0 = time.perf_counter()
    _upload_one(client, path, bucket, endpoint, key)
    out.put(time.perf_counter() - t0)


def upload_probe(server: Any, bucket: str, shm: str, nbytes: int) -> list[dict[str, Any]]:
    """Two processes upload ``nbytes`` each at once, per client library."""
    paths = []
    for r in range(2):
        path = os.path.join(shm, f"probe-{r}")
        with open(path, "wb") as f:
            f.write(os.urandom(nbytes))
        paths.append(path)
    ctx = mp.get_context("spawn")
    rows = []
    for client in CLIENTS:
        go, out = ctx.Event(), ctx.Queue()
        procs = [
            ctx.Process(
                target=_uploader,
                args=(client, paths[r], bucket, server.endpoint_url, f"probe/{client}{r}", go, out),
            )
            for r in range(2)
        ]
        for p in procs:
            p.start()
        time.sleep(3.0)  # imports done before the clock starts
        cpu0, t0 = server.cpu_seconds(), time.perf_counter()
        go.set()
        for _ in procs:
            out.get(timeout=600)
        wall = time.perf_counter() - t0
        cpu = server.cpu_seconds() - cpu0
        for p in procs:
            p.join()
        row = {
            "client": client,
            "wall_s": wall,
            "mib_s": 2 * nbytes / MIB / wall,
            "server_cpu_s": cpu,
        }
        rows.append(row)
        print(
            f"[{server.name}] upload 2 x {nbytes // MIB} MiB, {client:16s} "
            f"{row['mib_s']:5.0f} MiB/s  wall {wall:5.2f}s  server CPU {cpu:5.2f}s",
            flush=True,
        )
    for path in paths:
        os.remove(path)
    return rows


def _drain_rank(
    rank: int, world_size: int, bucket: str, memory_root: str, nbytes: int
) -> list[dict[str, Any]]:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from tierckpt import CheckpointConfig, TieredStorageWriter

    g = torch.Generator().manual_seed(rank)
    state = {
        f"r{rank}.t{i}": torch.randn(8 * MIB, generator=g) for i in range(nbytes // (32 * MIB))
    }
    rows = []
    for step, (part, conc) in enumerate(DRAIN_SETTINGS):
        cfg = CheckpointConfig(
            namespace="bounds",
            world_size=world_size,
            memory_root=memory_root,
            durable_base_path=f"s3://{bucket}/drain/p{part}c{conc}",
            memory_keep_last=1,
            s3_part_size=part * MIB,
            s3_max_concurrency=conc,
        )
        marks: dict[str, float] = {}
        dist.barrier()
        t0 = time.perf_counter()
        w = TieredStorageWriter(cfg, step=step, save_to_durable=True)
        dcp.save(state, storage_writer=w)
        marks["memory_commit"] = time.perf_counter() - t0
        upload = w._upload  # the rank's part upload (private: this is a probe)
        if upload is not None:
            upload.add_done_callback(
                lambda _f, marks=marks, t0=t0: marks.__setitem__(
                    "part_in_s3", time.perf_counter() - t0
                )
            )
        w.durable_done.result()
        marks["durable_done"] = time.perf_counter() - t0
        dist.barrier()
        every: list[Any] = [None] * world_size
        dist.all_gather_object(every, marks)
        rows.append({"part_mib": part, "concurrency": conc, "ranks": every})
    return rows


def drain_probe(server: Any, bucket: str, dirs: RunDirs, nbytes: int) -> list[dict[str, Any]]:
    memory_root = os.path.join(dirs.shm, f"memory-{server.name}")  # fresh per server
    rows = launch(
        _drain_rank,
        2,
        (bucket, memory_root, nbytes),
        out_dir=dirs.disk,
        threads=1,
        timeout_s=1800,
    )
    shutil.rmtree(memory_root, ignore_errors=True)
    for row in rows:
        ranks = row["ranks"]
        print(
            f"[{server.name}] tierckpt drain, 2 x {nbytes // MIB} MiB, part {row['part_mib']} MiB, "
            f"concurrency {row['concurrency']}: memory commit "
            f"{max(r['memory_commit'] for r in ranks):.2f}s, parts in S3 "
            f"{max(r.get('part_in_s3', 0.0) for r in ranks):.2f}s, durable_done "
            f"{max(r['durable_done'] for r in ranks):.2f}s",
            flush=True,
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.s3.bounds", description=__doc__)
    p.add_argument("--servers", default="moto,s3rver")
    p.add_argument("--mib", type=int, default=512, help="bytes per rank / uploader")
    args = p.parse_args(argv)
    nbytes = args.mib * MIB
    results: dict[str, Any] = {"mib_per_rank": args.mib, "loadavg_start": os.getloadavg()}
    with terminate_on_signals(), RunDirs() as dirs:
        for name in [s for s in args.servers.split(",") if s]:
            bucket = f"tierckpt-bounds-{dirs.id}"
            with serving(name, dirs.shm, bucket) as (server, _client):
                results[name] = {
                    "upload": upload_probe(server, bucket, dirs.shm, nbytes),
                    "drain": drain_probe(server, bucket, dirs, nbytes),
                }
    results["loadavg_end"] = os.getloadavg()
    os.makedirs(RESULTS_DIR, exist_ok=True)
    out = os.path.join(RESULTS_DIR, f"bounds-{args.mib}m.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"JSON: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
