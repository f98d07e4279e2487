"""A job's first saves copy into resident pages: ``tierckpt.prefault`` and the spare fill.

A page's first touch is most of a fresh buffer's cost (benchmarks/README.md, "First
saves"); the spare is filled in the background and the save takes it over, also mid-fill.
"""

from __future__ import annotations

import os
from typing import Any

import workers_prefault as wp
from fixtures_dist import run_ranks


def test_prefault_fills_a_spare_that_the_first_save_writes_into(config_factory):
    cfg = config_factory()
    for rank, res in enumerate(run_ranks(wp.w_prefault_then_save, 2, cfg, timeout=120)):
        assert res["started"] and not res["again"] and not res["after_fill"], res
        assert res["spare_size"] >= res["part"], res
        assert res["used_spare"].endswith(f"-r{rank}.data"), f"the save wrote a new file: {res}"
        assert res["exact"], res


def test_a_save_during_the_fill_stops_it_and_takes_the_spare_as_it_is(config_factory):
    cfg = config_factory(memory_prefault=False)  # only the spare this test starts
    for rank, res in enumerate(run_ranks(wp.w_save_takes_over_a_fill, 2, cfg, timeout=120)):
        assert not res["fill_alive"], "the fill went on after the save took its file"
        assert res["used_spare"].endswith(f"-r{rank}.data"), f"the save wrote a new file: {res}"
        assert res["used_size"] < 64 << 20, f"the 512 MiB spare was not trimmed: {res}"
        assert not [n for n in res["pooled_after"] if n.startswith(".filling-")], res
        assert res["exact"], res


def test_manager_restore_on_a_fresh_job_prefaults_the_first_save(config_factory):
    cfg = config_factory(world_size=1)
    res = run_ranks(wp.w_manager_restore_prefaults, 1, cfg, timeout=120)[0]
    assert res["restored"] is None, res
    assert res["optim_state_before_training"] == 0, "restore() stepped the optimizer"
    # Model (2 x 1 MiB + biases) and an AdamW estimate of two moments per parameter.
    assert res["spare_size"] >= 3 * 2 * 512 * 512 * 4, res
    assert res["used_spare"].endswith("-r0.data"), f"the first save wrote a new file: {res}"


def _pool_in_a_namespace(memory_root: str) -> Any:
    """A ``StagingPool`` of the namespace ``fills``, made under a fresh memory root."""
    from tierckpt.staging import StagingPool
    from tierckpt.tiers.memory import MemoryTier

    tier = MemoryTier(memory_root)
    tier.check_trusted("fills", create=True)
    os.makedirs(os.path.join(memory_root, "fills"), mode=0o700, exist_ok=True)
    return StagingPool(tier, "fills")


def test_a_finished_fill_leaves_no_entry_in_the_process_registry(memory_root):
    from tierckpt import staging

    pool = _pool_in_a_namespace(memory_root)
    thread = pool.prefault_spare(1 << 20, None, rank=3)
    assert thread is not None
    thread.join(30)
    assert not thread.is_alive()
    assert (pool.pool_dir, 3) not in staging._FILLS
    assert [n for n in os.listdir(pool.pool_dir) if n.endswith(".spare")], "no spare was made"


def test_a_fill_whose_namespace_is_removed_meanwhile_does_not_bring_it_back(
    memory_root, monkeypatch
):
    # Seen after a CI run: an empty `<root>/job/.leases` left in /dev/shm after the test's
    # root was removed. The fill made its pool directory, then the root went (clear-memory,
    # a finished job or test) before the fill took its lease, and the lease re-created it.
    import shutil

    from tierckpt import leases, staging

    pool = _pool_in_a_namespace(memory_root)

    def root_removed_first(*args, **kwargs):
        shutil.rmtree(memory_root)
        return leases.AttemptLease(*args, **kwargs)

    monkeypatch.setattr(staging, "AttemptLease", root_removed_first)
    thread = pool.prefault_spare(1 << 20, None, rank=0)
    assert thread is not None
    thread.join(30)
    assert not thread.is_alive()
    assert not os.path.exists(memory_root), sorted(
        os.path.relpath(os.path.join(d, n), memory_root)
        for d, dirs, files in os.walk(memory_root)
        for n in dirs + files
    )


def test_a_lease_that_may_not_create_its_namespace_fails_on_a_missing_one(tmp_path):
    from tierckpt.leases import AttemptLease

    ns = tmp_path / "gone"
    try:
        AttemptLease(str(ns), "x-r0", create=False)
    except FileNotFoundError:
        pass
    else:
        raise AssertionError("a lease was taken in a namespace that does not exist")
    assert not ns.exists()
    ns.mkdir()
    lease = AttemptLease(str(ns), "x-r0", create=False)  # the namespace exists: it works
    assert (ns / ".leases" / "x-r0").exists()
    lease.release()
    assert not (ns / ".leases" / "x-r0").exists()
