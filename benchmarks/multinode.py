"""Multi-node costs on simulated nodes: the training stall of peer replication, and the
restore of a lost node from peers vs from the durable tier.

    python -m benchmarks.multinode                    # 2 nodes x 1 rank, 256 MiB per rank
    python -m benchmarks.multinode --mib 512 --trials 5

Each node is its own memory root and node id (as ``TIERCKPT_NODE_ID`` / ``GROUP_RANK`` /
``LOCAL_WORLD_SIZE`` would make it on a cluster); peers talk over loopback.

1. *Stall*: a loop of ``--steps`` steps (a fixed matmul load per step) that saves every step
   with ``dcp.async_save``, once with ``peer_replicas=0`` and once with ``peer_replicas=1``,
   alternating, ``--trials`` times each; stall = median(peers on) / median(peers off) - 1.
2. *Node-loss restore*: node 1's memory root is deleted; a fresh job loads the newest save:
   rank 1's part comes from node 0's replica (peer) — or, with every replica removed too,
   from the durable directory (the same bytes, drained to ``file://``). Ratio = peer / durable.
Results go to ``benchmarks/results/multinode.json`` with the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import sys
import time
from typing import Any

from ._launch import RunDirs, launch, terminate_on_signals

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "multinode.json")


def _as_node(rank: int, roots: list[str]) -> None:
    os.environ.update(
        {
            "TIERCKPT_MEMORY_ROOT": roots[rank],
            "TIERCKPT_NODE_ID": f"node{rank}",
            "GROUP_RANK": str(rank),
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
        }
    )


def _state(rank: int, mib: int, seed: int) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed * 100 + rank)
    n = mib * 2**20 // 4
    return {f"shard{rank}": torch.randn(n, generator=g)}


def rank_loop(
    rank: int,
    world: int,
    roots: list[str],
    durable: str,
    mib: int,
    steps: int,
    replicas: int,
    duty: float = 0.25,
) -> dict[str, Any]:
    """Train ``steps`` steps, async-saving every step; seconds per step (median)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from tierckpt import CheckpointConfig, TieredStorageWriter, wait_for_drains

    _as_node(rank, roots)
    cfg = CheckpointConfig(
        namespace=f"stall{replicas}",
        world_size=world,
        durable_base_path=durable,
        peer_replicas=replicas,
        peer_duty_cycle=duty,
    )
    sd = _state(rank, mib, 0)
    a = torch.randn(384, 384)
    times = []
    fut = None
    for step in range(steps):
        t0 = time.perf_counter()
        for _ in range(40):
            a = torch.tanh(a @ a) * 0.5
        key = f"shard{rank}"
        sd[key].add_(1e-3)
        if fut is not None:
            fut.result()
        writer = TieredStorageWriter(cfg, step=step)
        fut = dcp.async_save(sd, storage_writer=writer)
        times.append(time.perf_counter() - t0)
    if fut is not None:
        fut.result()
    wait_for_drains(timeout=120)  # this rank's replications are done...
    import torch.distributed as dist

    dist.barrier()  # ...and every rank's, before any service goes away
    return {"step_s": statistics.median(times[2:]), "first_s": times[0], "worst_s": max(times)}


def rank_save(rank: int, world: int, roots: list[str], durable: str, mib: int) -> None:
    """One save, replicated and drained to durable; wait for both."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from tierckpt import CheckpointConfig, TieredStorageWriter

    _as_node(rank, roots)
    cfg = CheckpointConfig(namespace="restore", world_size=world, durable_base_path=durable)
    writer = TieredStorageWriter(cfg, step=1, save_to_durable=True)
    dcp.save(_state(rank, mib, 1), storage_writer=writer)
    writer.peer_done.result(timeout=300)
    writer.durable_done.result(timeout=300)
    dist.barrier()


def rank_restore(rank: int, world: int, roots: list[str], durable: str, mib: int) -> dict[str, Any]:
    """A fresh process restores the newest save; seconds and bytes per tier of each rank."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from tierckpt import CheckpointConfig, TieredStorageReader

    _as_node(rank, roots)
    cfg = CheckpointConfig(namespace="restore", world_size=world, durable_base_path=durable)
    sd = {f"shard{rank}": torch.empty(mib * 2**20 // 4)}
    dist.barrier()
    t0 = time.perf_counter()
    reader = TieredStorageReader(cfg)
    dcp.load(sd, storage_reader=reader)
    seconds = time.perf_counter() - t0
    assert torch.equal(sd[f"shard{rank}"], _state(rank, mib, 1)[f"shard{rank}"])
    out: list[Any] = [None] * world
    dist.all_gather_object(out, {"s": seconds, "bytes": reader.bytes_read_by_tier})
    return {"ranks": out}


def _drop_replicas(root: str) -> None:
    """Remove every replica a node holds (so a restore must use the durable tier)."""
    step = os.path.join(root, "restore", "step_1")
    for name in os.listdir(step):
        if "-r1." in name:
            os.unlink(os.path.join(step, name))


def _clear_shm(shm: str) -> None:
    for name in os.listdir(shm):
        shutil.rmtree(os.path.join(shm, name), ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--mib", type=int, default=256, help="state per rank (MiB)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument(
        "--durable",
        choices=("moto", "s3rver", "file"),
        default="moto",
        help="the durable tier: an S3 server on loopback (default moto) or a local directory",
    )
    p.add_argument("--duty", type=float, default=0.25, help="CheckpointConfig.peer_duty_cycle")
    p.add_argument("--only", choices=("stall", "restore"), default=None, help="one part only")
    args = p.parse_args(argv)
    terminate_on_signals()
    dirs = RunDirs()
    roots = [os.path.join(dirs.shm, f"node{i}") for i in range(2)]
    durable = "file://" + os.path.join(dirs.disk, "durable")
    if args.durable != "file":
        from .s3.servers import start_server

        server = start_server(args.durable, dirs.disk)
        os.environ.update(server.env())
        server.client().create_bucket(Bucket="tierckpt-bench")
        durable = "s3://tierckpt-bench/multinode"
    opts = {"out_dir": dirs.disk, "threads": 1, "timeout_s": args.timeout}
    stall: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(args.trials if args.only != "restore" else 0):
        for replicas in (0, 1):
            res = launch(
                rank_loop, 2, (roots, durable, args.mib, args.steps, replicas, args.duty), **opts
            )
            stall[replicas].append(res["step_s"])
            dirs.clear() if args.durable == "file" else _clear_shm(dirs.shm)
    restore: dict[str, list[float]] = {"peer": [], "durable": []}
    for _ in range(args.trials if args.only != "stall" else 0):
        for source in ("peer", "durable"):
            launch(rank_save, 2, (roots, durable, args.mib), **opts)
            shutil.rmtree(roots[1])  # node 1 is lost
            if source == "durable":
                _drop_replicas(roots[0])
            res = launch(rank_restore, 2, (roots, durable, args.mib), **opts)
            lost = res["ranks"][1]
            assert lost["bytes"][source] > 0, lost
            restore[source].append(max(r["s"] for r in res["ranks"]))
            dirs.clear() if args.durable == "file" else _clear_shm(dirs.shm)
    nan = [float("nan")]
    off, on = statistics.median(stall[0] or nan), statistics.median(stall[1] or nan)
    peer = statistics.median(restore["peer"] or nan)
    dur = statistics.median(restore["durable"] or nan)
    stall = {k: v or nan for k, v in stall.items()}
    restore = {k: v or nan for k, v in restore.items()}
    result = {
        "command": "python -m benchmarks.multinode " + shlex.join(argv or sys.argv[1:]),
        "mib_per_rank": args.mib,
        "durable": args.durable,
        "peer_duty_cycle": args.duty,
        "step_s_peers_off": stall[0],
        "step_s_peers_on": stall[1],
        "stall": on / off - 1,
        "restore_s_peer": restore["peer"],
        "restore_s_durable": restore["durable"],
        "restore_ratio_peer_vs_durable": peer / dur,
    }
    print(f"{'measure':38} {'median':>9} {'worst':>9}")
    print(f"{'step, peers off (s)':38} {off:9.3f} {max(stall[0]):9.3f}")
    print(f"{'step, peers on (s)':38} {on:9.3f} {max(stall[1]):9.3f}")
    print(f"{'stall of replication':38} {on / off - 1:+9.1%}")
    print(f"{'node-loss restore from peers (s)':38} {peer:9.3f} {max(restore['peer']):9.3f}")
    print(f"{'same restore from durable (s)':38} {dur:9.3f} {max(restore['durable']):9.3f}")
    print(f"{'peer / durable':38} {peer / dur:9.2f}")
    os.makedirs(os.path.dirname(RESULTS), exist_ok=True)
    out = RESULTS if args.only is None else RESULTS.replace(".json", f"-{args.only}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
