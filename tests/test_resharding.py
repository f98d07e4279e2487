"""A checkpoint saved by 2 ranks loads on 1, and one saved by 1 rank loads on 2."""

from __future__ import annotations

import shutil

import distworkers as w
from fixtures_dist import run_ranks


def test_a_sharded_2_rank_checkpoint_loads_on_1_rank_and_a_1_rank_one_on_2_ranks(
    config_factory, memory_root
):
    full = run_ranks(w.w_reshard_save_sharded, 2, config_factory(world_size=2))[0]
    shutil.rmtree(memory_root)  # 2 → 1 comes from the durable tier only

    one = config_factory(world_size=1)
    other = config_factory(world_size=1, namespace="one-rank")
    (res,) = run_ranks(w.w_reshard_load_plain_then_save, 1, one, other)

    assert res["load"]["step"] == 1
    assert res["load"]["bytes"]["memory"] == 0
    assert res["load"]["bytes"]["durable"] > 0
    assert res["loaded"] == full

    # 1 → 2, with the step in both tiers.
    two = config_factory(world_size=2, namespace="one-rank")
    results = run_ranks(w.w_reshard_load_sharded, 2, two)

    for res in results:
        assert res["load"]["step"] == 1
        assert res["loaded_full"] == res["expected"]
    # Uneven shards: w has 7 rows, v has 10 elements.
    assert results[0]["local_shapes"] == {"w": (4, 5), "v": (5,)}
    assert results[1]["local_shapes"] == {"w": (3, 5), "v": (5,)}
