"""`make demo-recovery`: a rank is SIGKILLed and the job goes on in place.

Runs ``examples/recovery/train.py`` under ``tierckpt-run --nproc-per-node 2``: a small
data-parallel MLP trains for 40 steps, saving every step to the memory tier. At step 20
rank 1 SIGKILLs itself; the launcher starts a replacement (a warm spare) for rank 1 only,
rank 0 stays the same process, aborts and re-forms its process group, and the new rank 1
is filled from rank 0's live state. The demo prints each rank's per-phase recovery times
and checks that the final parameters equal an uninterrupted run's (computed here).
Exits non-zero if anything went wrong.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TRAIN = HERE / "recovery" / "train.py"
STEPS, KILL_AT = 40, 20


def reference_hash() -> str:
    """The final parameters of the same training, uninterrupted, in one process."""
    spec = importlib.util.spec_from_file_location("recovery_train", TRAIN)
    assert spec is not None and spec.loader is not None
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    torch.set_num_threads(1)
    model, optim = train.build(64, 2)
    for step in range(STEPS):
        grads = []
        for rank in range(2):
            optim.zero_grad()
            x, y = train.make_batch(step, rank)
            torch.nn.functional.mse_loss(model(x), y).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
            p.grad = g0 + g1
            p.grad /= 2
        optim.step()
    return str(train.params_hash(model))


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="tierckpt-demo-recovery-"))
    mem = f"/dev/shm/tierckpt-demo-{uuid.uuid4().hex}"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent / "src"), env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "tierckpt.recovery.launch", "--nproc-per-node", "2",
           str(TRAIN), "--out", str(work), "--memory-root", mem, "--durable",
           str(work / "durable"), "--steps", str(STEPS), "--fault", f"kill:1:{KILL_AT}",
           "--step-time", "0.2"]  # fmt: skip
    print(f"demo: {' '.join(cmd[2:5])} ... train.py --fault kill:1:{KILL_AT}", flush=True)
    try:
        res = subprocess.run(cmd, env=env, timeout=300, check=False, stderr=subprocess.PIPE,
                             text=True)  # fmt: skip
        for line in res.stderr.splitlines():
            if line.startswith(("tierckpt-run:", "tierckpt: rank", "tierckpt: generation")):
                print(line[:240])
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            print(f"demo: FAILED, the job exited with {res.returncode}")
            return 1
        outs = [json.loads(Path(p).read_text()) for p in glob.glob(str(work / "r*-l*.json"))]
        lives = sorted((o["rank"], o["life"]) for o in outs)
        want = reference_hash()
        ok = lives == [(0, 0), (1, 1)] and all(o["final"] == want for o in outs)
        for o in sorted(outs, key=lambda o: o["rank"]):
            for r in o["recoveries"]:
                times = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in r["phases"].items())
                print(f"demo: rank {o['rank']} (pid {o['pid']}): state from {r['source']}, "
                      f"resumed after step {r['resumed_after']}, {r['steps_lost']} steps "
                      f"lost; {times}")  # fmt: skip
        print(
            "demo: rank 0 stayed the same process; final parameters "
            + ("equal the uninterrupted run's: OK" if ok else f"DIFFER ({lives}): FAILED")
        )
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(mem, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
