"""CheckpointManager end to end (issue 10): exact resume after kill -9, SIGTERM, policies.

Real gloo ranks (``launch_ranks``), real tmpfs, a real ``file://`` durable tier.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import managerworkers as mw
from fixtures_dist import launch_ranks, run_ranks
from tierckpt import (
    AnyOf,
    EveryNSeconds,
    EveryNSteps,
    KeepEveryM,
    KeepLastK,
    ResumableIterator,
    SaveContext,
)

STEPS, CRASH_AT = 8, 5
"""6 batches per epoch: killed mid-epoch 1, the resumed run crosses into epoch 2."""


def _losses(path: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in path.read_text().splitlines():
        step, value = line.split()
        out[int(step)] = value  # a re-run step overwrites: the resumed run's value counts
    return out


def test_a_run_killed_with_sigkill_resumes_with_a_bit_exact_loss_sequence(
    config_factory: Any, tmp_path: Path, durable_dir: str
) -> None:
    cfg = config_factory()
    ref_cfg = config_factory(namespace="reference")
    run_ranks(mw.w_exact_resume, 2, ref_cfg, str(tmp_path), STEPS, 0, "ref")

    crashed = launch_ranks(mw.w_exact_resume, 2, cfg, str(tmp_path), STEPS, CRASH_AT, "run")
    assert [o.exitcode for o in crashed] == [-signal.SIGKILL] * 2, [o.error for o in crashed]
    resumed = run_ranks(mw.w_exact_resume, 2, cfg, str(tmp_path), STEPS, 0, "run")

    for rank, res in enumerate(resumed):
        assert res["restored"] == CRASH_AT
        assert res["last_restore"]["bytes_by_tier"]["memory"] > 0
        assert res["last_restore"]["bytes_by_tier"].get("durable", 0) == 0
        ref = _losses(tmp_path / f"loss-ref-r{rank}.txt")
        run = _losses(tmp_path / f"loss-run-r{rank}.txt")
        assert sorted(ref) == list(range(1, STEPS + 1))
        assert run == ref, f"rank {rank}: losses differ after the resume"
    # keep=2: the durable tier holds the 2 newest durable saves (of 2, 4, 6, 8)
    durable = sorted(p.parent.name for p in Path(durable_dir, "run-1").glob("step_*/COMMIT"))
    assert durable == ["step_6", "step_8"]


def test_sigterm_to_one_rank_makes_every_rank_save_that_step_durable_and_exit(
    config_factory: Any, tmp_path: Path, durable_dir: str
) -> None:
    cfg = config_factory()
    box: dict[str, Any] = {}
    job = threading.Thread(
        target=lambda: box.update(out=launch_ranks(mw.w_sigterm, 2, cfg, str(tmp_path), timeout=90))
    )
    job.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        step = tmp_path / "step-r1"
        if step.exists() and step.read_text() and int(step.read_text()) >= 5:
            break
        time.sleep(0.05)
    os.kill(int((tmp_path / "pid-r1").read_text()), signal.SIGTERM)  # one rank only
    job.join(120)
    outcomes = box["out"]
    assert all(o.ok for o in outcomes), [o.error for o in outcomes]
    results = [o.result for o in outcomes]
    assert results[0]["step"] == results[1]["step"] is not None
    assert all(r["durable"] and r["code"] == 143 for r in results)
    steps = sorted(p.parent.name for p in Path(durable_dir, "run-1").glob("step_*/COMMIT"))
    assert steps == [f"step_{results[0]['step']}"]  # only the preemption save is durable


_SCRIPT = """
import sys, time, torch, tierckpt
cfg = tierckpt.CheckpointConfig(namespace="solo", world_size=1, durable_base_path=sys.argv[1])
state = {"w": torch.zeros(10)}
mgr = tierckpt.CheckpointManager(cfg, every_steps=1, grace_s=20)
for step in range(1, 100000):
    state["w"] += 1
    mgr.save(step, state)
    print(step, flush=True)
    time.sleep(0.02)
"""


def test_a_sigterm_to_a_real_process_ends_it_with_status_143_after_a_durable_save(
    memory_root: str, tmp_path: Path
) -> None:
    env = dict(os.environ, TIERCKPT_MEMORY_ROOT=memory_root, OMP_NUM_THREADS="1")
    durable = tmp_path / "durable"
    proc = subprocess.Popen(
        [sys.executable, "-c", _SCRIPT, str(durable)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if int(line) >= 3:
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert "durable; exiting for preemption" in err
    assert len(list(durable.glob("solo/step_*/COMMIT"))) == 1


def test_policies_decide_by_step_time_and_retention() -> None:
    def ctx(step: int, now: float = 100.0, last: float | None = 90.0) -> SaveContext:
        return SaveContext(step, now, step - 1, last)

    assert [s for s in range(1, 10) if EveryNSteps(3).should_save(ctx(s))] == [3, 6, 9]
    assert EveryNSeconds(5).should_save(ctx(1)) and not EveryNSeconds(20).should_save(ctx(1))
    combo = AnyOf(EveryNSteps(4), EveryNSeconds(20))
    assert not combo.deterministic and combo.should_save(ctx(8)) and not combo.should_save(ctx(7))
    steps = [2, 4, 6, 8, 10, 12]
    assert KeepLastK(2).keep(steps) == {10, 12}
    assert AnyOf(KeepLastK(1), KeepEveryM(4)).keep(steps) == {4, 8, 12}


def test_resumable_iterator_continues_with_the_exact_next_batch_across_epochs() -> None:
    def make(epoch: int) -> list[tuple[int, int]]:
        return [(epoch, i) for i in range(3)]

    it = ResumableIterator(make)
    seen = [next(it) for _ in range(4)]
    state = it.state_dict()
    expected = [next(it) for _ in range(4)]
    again = ResumableIterator(make)
    again.load_state_dict(state)
    assert seen[-1] == (1, 0) and [next(again) for _ in range(4)] == expected


@pytest.mark.parametrize("bad", [0, -1, True, "3"])
def test_a_bad_interval_is_a_config_error(bad: Any) -> None:
    import tierckpt

    with pytest.raises(tierckpt.ConfigError):
        EveryNSteps(bad)
