"""A save killed half-way leaves the previous step loadable; re-saves never mix attempts."""

from __future__ import annotations

import os
import re
import signal

import distworkers as w
from fixtures_dist import launch_ranks, run_ranks


def test_kill_9_of_every_rank_mid_save_leaves_the_previous_step_loadable_and_is_cleaned_up(
    config_factory, memory_root, durable_dir
):
    cfg = config_factory()
    outcomes = launch_ranks(w.w_save_then_die_mid_save, 2, cfg, timeout=120)
    assert [o.exitcode for o in outcomes] == [-signal.SIGKILL] * 2, outcomes

    mem = w.step_dirs(memory_root, "run-1")
    assert "COMMIT" in mem[1]
    # The crash happened after step 2's data was written and before its commit.
    assert any(f.endswith(".data") for f in mem[2]), mem
    assert "COMMIT" not in mem[2]
    assert w.committed_steps(durable_dir, "run-1") == [1]

    results = run_ranks(w.w_load_plain_then_save, 2, cfg, 3)

    for res in results:
        assert res["load"]["step"] == 1
        assert res["loaded"] == res["expected"]
    # The next save swept the half-written step.
    steps = results[0]["memory_steps"]
    assert 2 not in steps, steps
    assert "COMMIT" in steps[3]
    assert w.committed_steps(durable_dir, "run-1") == [1]


def _attempts(commit):
    return {commit["attempt"]} | {r["attempt"] for r in commit["ranks"]}


def _referenced(commit):
    names = {commit["metadata"]}
    for r in commit["ranks"]:
        names.add(r["manifest"])
        names.update(r.get("files", {}))
    return names


def test_resaving_a_step_loads_only_the_second_attempt_and_its_commit_names_no_old_file(
    config_factory, memory_root, durable_dir
):
    results = run_ranks(w.w_resave_same_step, 2, config_factory())

    for res in results:
        assert res["load"]["step"] == 1
        assert res["loaded"] == res["expected"]
        assert res["loaded"] != res["first_values"]
    res = results[0]
    for root in (memory_root, durable_dir):
        first, second = res["first"][root], res["second"][root]
        old = _attempts(first)
        assert not old & _attempts(second), (first, second)
        for name in _referenced(second):
            assert not any(name.startswith(a) for a in old), name
            assert re.match(r"[0-9a-f]{12}", name)
            assert os.path.exists(os.path.join(root, "run-1", "step_1", name)), name
