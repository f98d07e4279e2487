"""Fault → first resumed step: in-process recovery vs a torchrun restart (memory, durable).

One run, the same model and state (``examples/recovery/train.py``: an MLP, data parallel on
``--nproc`` CPU gloo ranks, saved to memory every step and to a ``file://`` durable tier
every ``--durable-every`` steps), rank 1 SIGKILLed in the middle of step ``--kill-at``:

- ``in-process``: ``tierckpt-run``; the healthy ranks stay, rank 1 is replaced (a warm
  spare) and filled from a live replica;
- ``restart+memory``: ``torchrun --max-restarts 1``; every worker restarts and restores
  from the memory tier;
- ``restart+durable``: the same, the restarted workers with an empty memory tier (restore
  from the durable tier).

Per phase, from the workers' own timestamps: ``detect`` (the kill → the healthy rank's
error; restarts: → the new processes' ``main``, imports included), ``abort``, ``re-form``
(the new group, once every member is there; in-process also ``wait`` for the replacement),
``restore``, ``first step``; and the work lost (steps recomputed).

    python -m benchmarks.recovery                 # 3 repetitions, ~5 min here; --json PATH

The table shows, per case, the repetition with the median total (its phases) and the
range of the totals.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "recovery" / "train.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _median(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """The repetition with the median total (its phases as measured), every total kept."""
    rs = sorted(rs, key=lambda r: r["total_s"])
    return dict(rs[len(rs) // 2], totals=[r["total_s"] for r in rs])


def run_case(name: str, a: argparse.Namespace, work: Path) -> dict[str, Any]:
    out = work / name
    out.mkdir(parents=True)
    mem = f"/dev/shm/tierckpt-bench-{uuid.uuid4().hex}"
    train = [str(TRAIN), "--out", str(out), "--memory-root", mem, "--durable",
             str(work / f"{name}-durable"), "--steps", str(a.kill_at + a.after),
             "--hidden", str(a.hidden), "--layers", str(a.layers), "--durable-every",
             str(a.durable_every), "--fault", f"kill:1:{a.kill_at}", "--step-time",
             str(a.step_time), "--hang-timeout", "30"]  # fmt: skip
    if name == "in-process":
        cmd = [sys.executable, "-m", "tierckpt.recovery.launch", f"--nproc-per-node={a.nproc}"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={a.nproc}",
               "--nnodes=1", "--max-restarts=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{_port()}", "--local-addr=127.0.0.1"]  # fmt: skip
        if name == "restart+durable":
            train.append("--fresh-memory-per-attempt")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERCKPT_", "TORCHELASTIC"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src"),
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # fmt: skip
    try:
        res = subprocess.run([*cmd, *train], env=env, capture_output=True, text=True,
                             timeout=600, check=False)  # fmt: skip
    finally:
        for p in glob.glob(mem + "*"):
            shutil.rmtree(p, ignore_errors=True)
    if res.returncode != 0:
        raise RuntimeError(f"{name}: exit {res.returncode}\n{res.stderr[-4000:]}")
    fault = float((out / "fault-time").read_text())
    outs = [json.loads(Path(p).read_text()) for p in glob.glob(str(out / "r*-l*.json"))]
    return measure(name, fault, outs, a.kill_at)


def _event(o: dict[str, Any], name: str, after: float) -> float:
    return min(t for n, t in o["events"] if n == name and t >= after)


def measure(name: str, fault: float, outs: list[dict[str, Any]], kill_at: int) -> dict[str, Any]:
    """Phases (seconds) from the workers' timestamps; the slowest rank counts."""
    ends = [min(float(t) for t in o["step_ends"].values() if float(t) > fault) for o in outs]
    first = max(ends)
    phases: dict[str, float] = {}
    if name == "in-process":
        healthy = next(o for o in outs if o["rank"] == 0)
        rec = healthy["recoveries"][0]
        t_fault_seen = _event(healthy, "joined", fault) - rec["phases"]["wait_members"]
        t_fault_seen -= rec["phases"]["abort"]
        phases["detect"] = t_fault_seen - fault
        phases["abort"] = rec["phases"]["abort"]
        phases["wait"] = rec["phases"]["wait_members"]
        resumed = rec["resumed_after"]
    else:
        starts = [o["start"] for o in outs]  # the restarted processes' main(), imports done
        phases["detect"] = max(starts) - fault
        phases["abort"] = 0.0
        resumed = (
            min(int(k) for o in outs for k, t in o["step_ends"].items() if float(t) > fault) - 1
        )
    joined = max(_event(o, "joined", fault) for o in outs)
    formed = max(_event(o, "formed", fault) for o in outs)
    filled = max(_event(o, "filled", fault) for o in outs)
    phases["re-form"] = formed - joined
    if name != "in-process":
        phases["wait"] = joined - max(o["start"] for o in outs)
    phases["restore"] = filled - formed
    phases["first step"] = first - filled
    return {"case": name, "total_s": first - fault, "phases": phases,
            "steps_lost": (kill_at - 1) - resumed}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--kill-at", type=int, default=40)
    p.add_argument("--after", type=int, default=5)
    p.add_argument("--step-time", type=float, default=0.25)
    p.add_argument("--durable-every", type=int, default=5)
    p.add_argument("--reps", type=int, default=3, help="repetitions; the median is shown")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    names = ["in-process", "restart+memory", "restart+durable"]
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    work = Path(tempfile.mkdtemp(prefix="tierckpt-bench-recovery-"))
    try:
        for rep in range(a.reps):  # rotated order: each case at several moments of the run
            for n in names[rep % 3 :] + names[: rep % 3]:
                runs[n].append(run_case(n, a, work / f"rep{rep}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rows = [_median(runs[n]) for n in names]
    cols = ["detect", "abort", "wait", "re-form", "restore", "first step"]
    print("| case | fault → first resumed step | " + " | ".join(cols) + " | steps lost |")
    print("|---|---|" + "---|" * len(cols) + "---|")
    for r in rows:
        cells = " | ".join(f"{r['phases'].get(c, 0.0):.3f}" for c in cols)
        spread = "–".join(f"{t:.2f}" for t in (r["totals"][0], r["totals"][-1]))
        print(f"| {r['case']} | {r['total_s']:.2f} s ({spread}) | {cells} | {r['steps_lost']} |")
    base = rows[2]["total_s"]
    print(f"in-process / restart+durable = {rows[0]['total_s'] / base:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"args": vars(a), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
