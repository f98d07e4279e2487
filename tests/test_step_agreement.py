"""All ranks load the same step: the newest one every rank can restore from some tier."""

from __future__ import annotations

import glob
import os

import distworkers as w
from fixtures_dist import run_ranks


def test_a_memory_only_step_that_lost_a_file_is_passed_over_by_every_rank(
    config_factory, memory_root
):
    cfg = config_factory()
    saved = run_ranks(w.w_save_sharded_steps, 2, cfg, [(1, True), (2, False)])
    # Rank 1's shard of step 2 exists nowhere now; rank 0 alone could still restore its part.
    (lost,) = glob.glob(os.path.join(memory_root, "run-1", "step_2", "*-r1.data"))
    os.remove(lost)

    results = run_ranks(w.w_load_sharded, 2, cfg)

    assert [res["load"]["step"] for res in results] == [1, 1]
    for rank, res in enumerate(results):
        assert res["loaded"] == saved[rank][1]
        assert res["loaded"] == res["expected"]


def test_ranks_with_different_memory_tiers_agree_on_the_newest_step_all_can_restore(
    config_factory,
):
    # One memory root per rank, like one node per rank: step 2 is memory-only, so its commit
    # exists only on rank 0's node; rank 1 can restore step 1 (durable) only.
    results = run_ranks(w.w_nodes_agree, 2, config_factory())

    assert results[0]["own_memory_commits"] == [1, 2], "rank 0's node holds both steps"
    assert [res["load"]["step"] for res in results] == [1, 1]
    for res in results:
        assert res["loaded"] == res["step1"]
