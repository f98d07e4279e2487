"""DCP's plan caching (``DefaultSavePlanner(enable_plan_caching=True)``) with real gloo ranks:
per-save facts (attempts, generations, the durable flag) never come from a replayed plan."""

from __future__ import annotations

from typing import Any

import pytest

import workers_plan_cache as wp
from fixtures_dist import run_ranks


def test_cached_plans_give_every_save_its_own_attempts_and_generation_and_rewinds_still_win(
    config_factory: Any,
) -> None:
    cfg = config_factory(memory_keep_last=5)
    ranks = run_ranks(wp.w_cached_plans, 2, cfg, timeout=240)
    saves = [r["saves"] for r in ranks]
    # DCP did replay cached local plans (else this test would test nothing).
    replayed = [[s["replayed"] for s in per_rank] for per_rank in saves]
    assert all(r == [False, True, False, True, True] for r in replayed), replayed
    generations = []
    for i, save in enumerate(saves[0]):
        commit = save["commit"]
        # Every rank's own attempt of this save, never an earlier save's from a cached plan.
        attempts = {entry["rank"]: entry["attempt"] for entry in commit["ranks"]}
        assert attempts == {r: saves[r][i]["attempt"] for r in range(2)}, (i, commit)
        assert commit["attempt"] == save["attempt"] and commit["step"] == save["step"]
        generations.append(commit["generation"])
        if save["durable_commit"] is not None:
            assert save["durable_commit"]["ranks"] == commit["ranks"], save["durable_commit"]
            assert save["durable_commit"]["durable"] is True
        else:
            assert commit["durable"] is False, commit
    assert generations == sorted(generations) and len(set(generations)) == len(generations)
    all_attempts = [s["attempt"] for per_rank in saves for s in per_rank]
    assert len(set(all_attempts)) == len(all_attempts)
    # Each load (of the newest save, agreed by the ranks) is bit-exact; after the rewind
    # the new step 2 wins over the higher steps 3 and 4.
    for r in range(2):
        for save, loaded in zip(saves[r], ranks[r]["loads"], strict=True):
            assert loaded["step"] == save["step"], (loaded["step"], save["step"])
            assert loaded["loaded"] == save["saved"], save["step"]


@pytest.mark.parametrize("plan_caching", [True, False])
def test_the_manager_caches_plans_by_default_and_a_changed_dtype_gets_new_metadata(
    config_factory: Any, plan_caching: bool
) -> None:
    cfg = config_factory(memory_keep_last=5)
    ranks = run_ranks(wp.w_manager_caches_plans, 2, cfg, plan_caching, timeout=240)
    for r in ranks:
        replayed = [s["replayed"] for s in r["saves"]]
        # Unchanged plans are replayed (steps 2 and 4); a new key (3) and a dtype change at
        # the same shape (5, which DCP's own comparison takes as unchanged) are planned anew.
        assert replayed == ([False, True, False, True, False] if plan_caching else [False] * 5)
        dtypes = [s["more_dtype"] for s in r["saves"]]
        assert dtypes == [None, None, "torch.float32", "torch.float32", "torch.bfloat16"]
        assert all(s["same"] and s["loaded_step"] == s["step"] for s in r["saves"]), r["saves"]
        assert r["cached_before_close"] is plan_caching
        assert r["cached_after_close"] is False
