"""Memory-tier retention: keep-last, a byte budget, and typed errors when a step can't fit."""

from __future__ import annotations

import os

import distworkers as w
from fixtures_dist import run_ranks


def test_the_memory_tier_keeps_the_3_newest_steps_by_default_and_memory_keep_last_if_set(
    config_factory,
):
    res = run_ranks(w.w_keep_last, 2, config_factory())[0]

    assert sorted(res["default"]) == [3, 4, 5]
    assert all("COMMIT" in files for files in res["default"].values())
    assert res["load"]["step"] == 5
    assert res["loaded"] == res["expected"]
    assert sorted(res["keep_two"]) == [3, 4]


def test_a_memory_budget_evicts_the_oldest_steps_and_never_the_newest_committed(
    config_factory,
):
    res = run_ranks(w.w_budget_evicts_oldest, 2, config_factory())[0]

    budget = res["budget"]
    assert res["one_step"] > 100_000
    for h in res["history"]:
        assert h["usage"] <= budget, h
        assert h["saved"] in h["committed"], f"the newest step was evicted: {h}"
    assert res["history"][-1]["committed"] == [3, 4]
    assert sorted(res["steps"]) == [3, 4]
    assert res["load"]["step"] == 4
    assert res["loaded"] == res["expected"]


def _assert_step_1_survives_a_typed_failure_of_step_2(res, error_type):
    errors = res["error"]
    assert errors, "a save larger than the room left did not fail"
    assert any(error_type in e["types"] for e in errors), errors
    assert "COMMIT" not in res["steps_after_failure"].get(2, [])
    assert "COMMIT" in res["steps_after_failure"][1]
    assert res["load"]["step"] == 1
    assert res["loaded"] == res["expected"]
    # The failed attempt left no debris that blocks later (small) saves.
    later = res["later_small_save_error"]
    assert later is None, (
        "a later small save failed: "
        + " | ".join(e["message"] for e in later)
        + f"\nmemory tier: {res['files_at_end']}"
    )
    assert "COMMIT" in res["steps_at_end"][3]


def test_a_step_larger_than_the_memory_budget_fails_typed_and_earlier_steps_stay_loadable(
    config_factory,
):
    # plain_state(scale=1) is ~9 kB; scale=64 is ~525 kB.
    cfg = config_factory(memory_budget=200_000)
    res = run_ranks(w.w_save_too_big, 2, cfg, 64)[0]
    _assert_step_1_survives_a_typed_failure_of_step_2(res, "MemoryBudgetError")


def test_a_full_tmpfs_fails_the_save_typed_and_earlier_steps_stay_loadable(
    config_factory, tiny_tmpfs
):
    # A 2 MiB tmpfs; step 2 (scale=512) needs ~4.2 MB.
    cfg = config_factory(memory_root=os.path.join(tiny_tmpfs, "root"))
    res = run_ranks(w.w_save_too_big, 2, cfg, 512)[0]
    _assert_step_1_survives_a_typed_failure_of_step_2(res, "TierFullError")
