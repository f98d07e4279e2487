"""``tierckpt-run``: start a node's workers like torchrun, restart only the one that dies.

    tierckpt-run --nproc-per-node 2 train.py --lr 0.1
    python -m tierckpt.recovery.launch --nnodes 2 --node-rank 0 --master-addr host0 ...

Workers get torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE,
GROUP_RANK, MASTER_ADDR, MASTER_PORT, TORCHELASTIC_USE_AGENT_STORE=True) and connect to the
TCPStore this launcher creates once (node 0 hosts it; every generation reuses it). When a
worker exits non-zero or is killed, the launcher moves the generation it was in on (the
healthy workers may have done so already) and starts a fresh process with the same RANK
(``TIERCKPT_REPLACEMENT`` counts them). It exits 0 once every worker exited 0, and non-zero
(after stopping the others) when a worker fails past ``--max-replacements``. Placement,
node failures and multi-node rendezvous stay torchrun / torchelastic's (or the scheduler's).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

from torch.distributed import TCPStore

from .membership import Membership
from .wrapper import SPAWNED_AT_ENV

__all__ = ["main"]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tierckpt-run", description=__doc__.split("\n")[0])
    p.add_argument("--nproc-per-node", "--nproc_per_node", type=int, default=1)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", "--node_rank", type=int, default=0)
    p.add_argument("--master-addr", "--master_addr", default="127.0.0.1")
    p.add_argument(
        "--master-port",
        "--master_port",
        type=int,
        default=0,
        help="store port; 0 picks a free one (single node only)",
    )
    p.add_argument(
        "--max-replacements",
        type=int,
        default=3,
        help="replacements per local rank before the job fails",
    )
    p.add_argument(
        "--spares",
        type=int,
        default=1,
        choices=(0, 1),
        help="keep a warm spare process (torch imported) for the next replacement",
    )
    p.add_argument("--run-id", default=None)
    p.add_argument("script")
    p.add_argument("args", nargs=argparse.REMAINDER)
    return p.parse_args(argv)


def _log(text: str) -> None:
    sys.stderr.write(f"tierckpt-run: {text}\n")
    sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    a = _parse(argv)
    if a.master_port == 0 and a.nnodes > 1:
        _log("--master-port is required with --nnodes > 1")
        return 2
    port = a.master_port or _free_port(a.master_addr)
    run_id = a.run_id or f"run-{uuid.uuid4().hex[:8]}"
    world = a.nnodes * a.nproc_per_node
    store = TCPStore(
        a.master_addr,
        port,
        world,
        is_master=(a.node_rank == 0),
        timeout=datetime.timedelta(seconds=300),
        wait_for_workers=False,
    )
    root = f"tierckpt/{run_id}/a0"
    base = dict(
        os.environ,
        MASTER_ADDR=a.master_addr,
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(a.nproc_per_node),
        GROUP_RANK=str(a.node_rank),
        ROLE_RANK="0",
        TORCHELASTIC_RUN_ID=run_id,
        TIERCKPT_RUN_ID=run_id,
        TORCHELASTIC_RESTART_COUNT="0",
        TORCHELASTIC_USE_AGENT_STORE="True",
        TORCHELASTIC_MAX_RESTARTS="0",
    )
    replaced = [0] * a.nproc_per_node
    procs: dict[int, subprocess.Popen[bytes]] = {}
    spare: list[subprocess.Popen[bytes]] = []

    def new_spare() -> None:
        if a.spares:
            spare.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tierckpt.recovery._spare"],
                    env=base,
                    stdin=subprocess.PIPE,
                    start_new_session=True,
                )
            )

    def start(local: int) -> None:
        rank = a.node_rank * a.nproc_per_node + local
        env = dict(
            base,
            RANK=str(rank),
            LOCAL_RANK=str(local),
            GLOBAL_RANK=str(rank),
            TIERCKPT_REPLACEMENT=str(replaced[local]),
            **{SPAWNED_AT_ENV: str(time.time())},
        )
        argv = [a.script, *a.args]
        if replaced[local] and spare and spare[0].poll() is None:
            p = spare.pop(0)
            assert p.stdin is not None
            p.stdin.write((json.dumps({"env": env, "argv": argv}) + "\n").encode())
            p.stdin.flush()
            procs[local] = p
            new_spare()
            return
        procs[local] = subprocess.Popen([sys.executable, *argv], env=env, start_new_session=True)

    def stop_all(sig: int = signal.SIGKILL) -> None:
        for p in [*procs.values(), *spare]:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, sig)
        for p in [*procs.values(), *spare]:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(10)

    def on_signal(signum: int, frame: object) -> None:
        stop_all()
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for local in range(a.nproc_per_node):
        start(local)
    new_spare()
    done: set[int] = set()
    try:
        while len(done) < a.nproc_per_node:
            time.sleep(0.02)
            for local, p in list(procs.items()):
                code = p.poll()
                if code is None or local in done:
                    continue
                if code == 0:
                    done.add(local)
                    continue
                rank = a.node_rank * a.nproc_per_node + local
                # Let the job know at once (the others may not have seen it yet).
                with contextlib.suppress(OSError):
                    os.killpg(p.pid, signal.SIGKILL)  # anything the worker left running
                members = Membership(store, root, rank, world)
                key = f"{root}/rank{rank}/gen"
                gen = int(store.get(key)) if store.check([key]) else members.generation()
                now = members.bump(gen, f"process exited with {code}")
                if replaced[local] >= a.max_replacements:
                    _log(
                        f"rank {rank} failed (exit {code}) after {replaced[local]} replacements "
                        f"(--max-replacements {a.max_replacements}): stopping the job"
                    )
                    stop_all()
                    return 1
                replaced[local] += 1
                _log(
                    f"rank {rank} exited with {code} in generation {gen}: starting a "
                    f"replacement (generation {now}); the other workers keep running"
                )
                start(local)
        return 0
    finally:
        stop_all()


if __name__ == "__main__":
    sys.exit(main())
