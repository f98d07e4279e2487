"""In-process recovery (issue 11): real worker processes under ``tierckpt-run``, real faults.

Each job trains ``examples/recovery/train.py`` (a data-parallel MLP on 2 gloo ranks,
saved to the memory tier every step) and injects faults in the middle of a step: a
SIGKILL, an exception in the user's code, a hang, the coordinator's rank killed, a second
kill during recovery. The healthy process must stay the same process, every step's loss
must equal an uninterrupted run's bit for bit (computed here in one process: a 2-rank
gloo sum is ``g0 + g1``) and so must the final parameters.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ROOT / "examples" / "recovery" / "train.py"
STEPS = 14


def _train_module() -> Any:
    spec = importlib.util.spec_from_file_location("recovery_train", TRAIN)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def reference() -> tuple[dict[int, str], str]:
    """Losses by step (float.hex) and the final parameters' hash of an uninterrupted run."""
    train = _train_module()
    torch.set_num_threads(1)
    model, optim = train.build(64, 2)
    losses: dict[int, str] = {}
    for step in range(STEPS):
        grads, totals = [], []
        for rank in range(2):
            optim.zero_grad()
            x, y = train.make_batch(step, rank)
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            totals.append(loss.detach().clone())
        for p, g0, g1 in zip(model.parameters(), *grads, strict=True):
            p.grad = g0 + g1
            p.grad /= 2
        optim.step()
        losses[step] = ((totals[0] + totals[1]) / 2).item().hex()
    return losses, train.params_hash(model)


def launch(
    out: Path, memory_root: str, durable_dir: str, *args: str, torchrun: bool = False
) -> tuple[str, dict]:
    """Run the job under ``python -m tierckpt.recovery.launch`` (or plain torchrun, no
    restarts); (stderr, outputs by (rank, life))."""
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERCKPT_", "TORCHELASTIC"))}
    env |= {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    env.pop("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", None)  # workers use torchrun's agent store
    launcher = ["tierckpt.recovery.launch"]
    if torchrun:
        launcher = ["torch.distributed.run", "--nnodes", "1", "--max-restarts", "0",
                    "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{_free_port()}",
                    "--local-addr", "127.0.0.1"]  # fmt: skip
    cmd = [sys.executable, "-m", *launcher, "--nproc-per-node", "2", str(TRAIN), "--out", str(out), "--memory-root", memory_root,
           "--durable", durable_dir, "--steps", str(STEPS), *args]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150, check=False)
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout}\n{res.stderr}"
    outputs = {}
    for p in out.glob("r*-l*.json"):
        d = json.loads(p.read_text())
        outputs[(d["rank"], d["life"])] = d
    return res.stderr, outputs


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def check_against(reference: tuple[dict[int, str], str], outputs: dict, survivor: int) -> None:
    losses, final = reference
    alive = [o for (r, _), o in outputs.items() if r == survivor]
    assert len(alive) == 1, "the healthy rank was never replaced: one process, start to end"
    got = {int(k): v for k, v in alive[0]["losses"].items()}
    assert got == losses, "the loss of every step equals the uninterrupted run's, bit-exact"
    assert {o["final"] for o in outputs.values()} == {final}
    for o in outputs.values():
        for r in o["recoveries"]:
            if r["source"] == "failed":  # a generation that failed while recovering
                continue
            assert r["phases"]["reform"] < 1.0 and r["phases"]["restore"] < 5.0, r


def test_kill_9_an_exception_and_a_hang_recover_in_place_with_the_uninterrupted_losses(
    tmp_path: Path, memory_root: str, durable_dir: str, reference: Any
) -> None:
    cache = f"{memory_root}-cache"
    try:
        stderr, outputs = launch(
            tmp_path / "out", memory_root, durable_dir,
            "--fault", "kill:1:3",      # rank 1 SIGKILLed mid-step (life 0)
            "--fault", "raise:0:6",     # rank 0's own code raises (stays alive)
            "--fault", "hang:1:10:1",   # rank 1's replacement hangs
            "--hang-timeout", "2", "--cache-dir", cache,
        )  # fmt: skip
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert set(outputs) == {(0, 0), (1, 2)}, stderr  # rank 1: killed, then hung and replaced
    check_against(reference, outputs, survivor=0)
    recs = outputs[(0, 0)]["recoveries"]
    assert [r["resumed_after"] for r in recs] == [2, 5, 9], recs
    assert [r["source"] for r in recs] == ["live", "replica:1", "live"]
    assert all(r["steps_lost"] == 0 for r in recs)
    assert all(r["phases"]["reform"] < 1.0 for r in recs)
    assert "hung in step 10" in stderr
    last = outputs[(1, 2)]
    assert last["recoveries"][0]["source"] == "replica:0"
    assert last["cache_hits"] > 0, "the replaced rank read its next batches from the tmpfs cache"


def test_a_killed_coordinator_and_a_kill_during_its_recovery_restore_from_the_memory_tier(
    tmp_path: Path, memory_root: str, durable_dir: str, reference: Any
) -> None:
    stderr, outputs = launch(
        tmp_path / "out", memory_root, durable_dir,
        "--fault", "kill:0:5", "--fault", "recovery-kill:0",  # rank 0 twice
        "--no-replica", "--manager",  # checkpoints through CheckpointManager (reformed)
    )  # fmt: skip
    assert set(outputs) == {(0, 2), (1, 0)}, stderr
    check_against(reference, outputs, survivor=1)
    rec = outputs[(1, 0)]["recoveries"][-1]
    assert rec["source"].startswith(("checkpoint:", "live+checkpoint:")), rec
    assert rec["resumed_after"] in (3, 4) and rec["steps_lost"] <= 1
    assert "from memory" in stderr


def test_an_exception_in_one_rank_recovers_in_place_under_plain_torchrun(
    tmp_path: Path, memory_root: str, durable_dir: str, reference: Any
) -> None:
    stderr, outputs = launch(
        tmp_path / "out", memory_root, durable_dir, "--fault", "raise:1:5", torchrun=True
    )
    assert set(outputs) == {(0, 0), (1, 0)}, "no process restarted (--max-restarts 0)"
    check_against(reference, outputs, survivor=0)
    check_against(reference, outputs, survivor=1)
    assert outputs[(1, 0)]["recoveries"][0]["source"] == "replica:0"
