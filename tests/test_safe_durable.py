"""The durable drain made safe (issue 7: d03, d11, d13, d14, d17, d20).

Real gloo ranks (``fixtures_dist``), real kill -9 at named crash points, a real file://
durable directory, and a real moto S3 server behind the fault proxy for the outage.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tierckpt
import workers_durable as wd
from distworkers import ListHandler, durable_root, step_dirs, wait_for
from faultproxy import FaultProxy
from fixtures_dist import launch_ranks, run_ranks
from fixtures_s3 import S3Server
from tierckpt import (
    CheckpointConfig,
    DurableTierError,
    TieredStorageReader,
    TieredStorageWriter,
)

MiB = 2**20


@pytest.fixture
def two_roots() -> Iterator[list[str]]:
    """Two memory roots: each rank its own "node"."""
    roots = [f"/dev/shm/tierckpt-test-{uuid.uuid4().hex}-node{i}" for i in range(2)]
    try:
        yield roots
    finally:
        for r in roots:
            shutil.rmtree(r, ignore_errors=True)


def _types(outcome: dict[str, Any]) -> set[str]:
    return {t for e in outcome.get("errors", []) for t in e["types"]}


def _text(outcome: dict[str, Any]) -> str:
    return " | ".join(e["message"] for e in outcome.get("errors", []))


def _tmp_files(root: str) -> list[str]:
    return sorted(
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root)
        for f in files
        if ".tmp-" in f
    )


# --------------------------------------------------------------------------- d03


def test_d03_a_drain_killed_on_two_nodes_is_resumed_by_both_and_loads_from_durable_alone(
    config_factory: Any, durable_dir: str, two_roots: list[str]
) -> None:
    cfg = config_factory(durable_commit_timeout_s=15.0)
    outcomes = launch_ranks(wd.w_two_nodes_die_mid_drain, 2, cfg, two_roots, timeout=120)
    assert [o.exitcode for o in outcomes] == [-signal.SIGKILL] * 2, outcomes
    # Node 1 never received step 2's commit: only the coordinator's node has it.
    assert "COMMIT" in step_dirs(two_roots[0], "run-1")[2]
    assert "COMMIT" not in step_dirs(two_roots[1], "run-1")[2]
    durable = step_dirs(durable_dir, "run-1")
    assert "COMMIT" not in durable[2] and not any(n.endswith(".json") for n in durable[2])

    results = run_ranks(wd.w_two_nodes_resume_then_load_from_durable, 2, cfg, two_roots)

    for rank, res in enumerate(results):
        assert res["resume"]["ok"], (rank, res["resume"])
        assert res.get("loaded_step") == 2 and res["bit_exact"], (rank, res)
        assert res["bytes"]["memory"] == 0 and res["bytes"]["durable"] > 0, (rank, res)
    assert "COMMIT" in step_dirs(durable_dir, "run-1")[2]


# --------------------------------------------------------------------------- d11


def test_d11_saves_go_on_through_a_durable_outage_and_the_newest_drain_completes_when_it_ends(
    s3_server: S3Server, s3_bucket: str, fault_proxy: FaultProxy, memory_root: str
) -> None:
    log = logging.getLogger(f"tierckpt-test-d11-{uuid.uuid4().hex[:6]}")
    log.propagate = False
    handler = ListHandler()
    log.addHandler(handler)
    cfg = CheckpointConfig(
        namespace="d11",
        world_size=1,
        memory_root=memory_root,
        durable_base_path=f"s3://{s3_bucket}/ckpt",
        s3_endpoint_url=fault_proxy.url,
        s3_max_retries=0,
        s3_timeout_s=5.0,
        memory_keep_last=1,
        memory_budget=int(3.5 * MiB),  # 3 steps of 1 MiB; pinned failed drains would fill it
        memory_prefault=False,
        logger=log,
        durable_max_pending_steps=1,
        durable_retry_initial_s=0.2,
        durable_retry_max_s=0.5,
    )
    fault_proxy.fail_next("error500", 1_000_000)  # the outage: every request fails

    def sd(step: int) -> dict[str, torch.Tensor]:
        return {"w": torch.full((MiB // 4,), float(step))}

    for step in range(1, 6):
        w = TieredStorageWriter(cfg, step=step, save_to_durable=True)  # never raises
        dcp.save(sd(step), storage_writer=w)
        assert os.path.exists(os.path.join(memory_root, "d11", f"step_{step}", "COMMIT"))
        with pytest.raises(DurableTierError):
            w.durable_done.result(timeout=30)

    # Pinned bytes are bounded (one pending step) and reported; the newest save is kept.
    assert wait_for(lambda: [p.step for p in tierckpt.pending_drains(cfg)] == [5], 10), (
        tierckpt.pending_drains(cfg)
    )
    assert tierckpt.pending_drains(cfg)[0].nbytes >= MiB
    unpinned = [m for lvl, m in handler.records if lvl == "ERROR" and "unpinned" in m]
    for step in (1, 2, 3, 4):
        assert any(f"Step {step}:" in m for m in unpinned), handler.records

    fault_proxy.clear_faults()  # the durable tier is back: no restart, the retry drains it
    client = s3_server.client()

    def committed_in_s3() -> bool:
        key = "ckpt/d11/step_5/COMMIT"
        listing = client.list_objects_v2(Bucket=s3_bucket, Prefix=key)
        return bool(listing.get("Contents"))

    assert wait_for(committed_in_s3, 30)
    assert wait_for(lambda: tierckpt.pending_drains(cfg) == [], 10)
    shutil.rmtree(os.path.join(memory_root, "d11"))
    out = {"w": torch.zeros(MiB // 4)}
    reader = TieredStorageReader(cfg)
    dcp.load(out, storage_reader=reader)
    assert reader.step == 5 and torch.equal(out["w"], sd(5)["w"])
    assert reader.bytes_read_by_tier["durable"] > 0


# --------------------------------------------------------------------------- d13


def test_d13_one_rank_without_its_durable_tier_saves_to_memory_with_the_others_and_fails_typed(
    config_factory: Any, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    cfg = config_factory(durable_commit_timeout_s=5.0)
    outcomes = launch_ranks(
        wd.w_one_rank_cannot_reach_durable, 2, cfg, f"file://{blocker}/ckpt", timeout=60
    )
    assert all(o.ok for o in outcomes), outcomes
    for o in outcomes:
        res = o.result
        assert "save_errors" not in res, (o.rank, res)
        assert res["save_s"] < 10 and res["memory_committed"], (o.rank, res)
    durable = outcomes[1].result["durable"]
    assert not durable["ok"] and "DurableUnavailableError" in _types(durable), durable
    assert str(blocker) in _text(durable), durable


# --------------------------------------------------------------------------- d14


def test_d14_a_failed_upload_on_another_rank_ends_the_coordinators_wait_at_once_naming_it(
    config_factory: Any,
) -> None:
    cfg = config_factory(durable_commit_timeout_s=30.0, durable_retry_initial_s=60.0)
    coordinator, other = run_ranks(wd.w_rank1_upload_fails, 2, cfg, timeout=120)
    assert not other["durable"]["ok"], other
    durable = coordinator["durable"]
    assert not durable["ok"] and "DurableTierError" in _types(durable), durable
    assert "rank 1" in _text(durable), durable
    assert durable["s"] < 5, f"the coordinator waited {durable['s']:.1f}s for a failed rank"
    assert coordinator["drains_idle"] and coordinator["exit_wait_s"] < 5, coordinator


def test_d14_at_exit_the_wait_for_a_commit_that_cannot_finish_is_bounded_and_logged(
    config_factory: Any,
) -> None:
    cfg = config_factory(durable_commit_timeout_s=600.0, durable_exit_wait_s=2.0)
    outcomes = launch_ranks(wd.w_rank1_dies_before_upload, 2, cfg, timeout=60)
    assert outcomes[1].exitcode == -signal.SIGKILL, outcomes
    res = outcomes[0].result
    assert res is not None, outcomes[0]
    assert res["finished"] is False and 1.5 < res["s"] < 6, res
    abandoned = [m for lvl, m in res["logs"] if lvl == "ERROR" and "abandon" in m]
    assert any("Step 1" in m and "resume" in m for m in abandoned), res["logs"]


# --------------------------------------------------------------------------- d17


def test_d17_a_drain_killed_before_its_rename_is_resumed_and_leaves_no_temporary_files(
    config_factory: Any, durable_dir: str
) -> None:
    cfg = config_factory()
    outcomes = launch_ranks(wd.w_die_before_put_rename, 2, cfg, timeout=120)
    assert [o.exitcode for o in outcomes] == [-signal.SIGKILL] * 2, outcomes
    assert _tmp_files(durable_dir), "the crash should have left temporary files"

    results = run_ranks(wd.w_resume, 2, cfg)

    for rank, res in enumerate(results):
        assert res["resume"]["ok"], (rank, res)
    assert "COMMIT" in step_dirs(durable_dir, "run-1")[1]
    assert _tmp_files(durable_dir) == []


# --------------------------------------------------------------------------- d20


def test_d20_one_damaged_manifest_is_logged_and_every_other_pending_step_resumes(
    memory_root: str, durable_dir: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    log = logging.getLogger(f"tierckpt-test-d20-{uuid.uuid4().hex[:6]}")
    log.propagate = False
    handler = ListHandler()
    log.addHandler(handler)
    common: dict[str, Any] = {
        "namespace": "d20",
        "world_size": 1,
        "memory_root": memory_root,
        "memory_keep_last": 5,
        "logger": log,
    }
    down = CheckpointConfig(
        **common,
        durable_base_path=f"file://{blocker}/ckpt",
        durable_retry_initial_s=3600.0,
        durable_retry_max_s=3600.0,
        durable_max_pending_steps=5,
    )
    for step in (1, 2, 3):  # the durable tier is unreachable: three pending drains
        w = TieredStorageWriter(down, step=step, save_to_durable=True)
        dcp.save({"w": torch.full((64,), float(step))}, storage_writer=w)
        with pytest.raises(DurableTierError):
            w.durable_done.result(timeout=30)
    step2 = os.path.join(memory_root, "d20", "step_2")
    (manifest,) = [n for n in os.listdir(step2) if n.endswith(".manifest.json")]
    with open(os.path.join(step2, manifest), "wb") as f:
        f.write(b"{damaged")

    up = CheckpointConfig(**common, durable_base_path=f"file://{durable_dir}")
    resumed = tierckpt.resume_pending(up).result(timeout=60)

    assert sorted(resumed) == [1, 3]
    durable = step_dirs(durable_dir, "d20")
    assert "COMMIT" in durable[1] and "COMMIT" in durable[3]
    assert "COMMIT" not in durable.get(2, [])
    errors = [m for lvl, m in handler.records if lvl == "ERROR" and "Step 2:" in m]
    assert any(manifest in m for m in errors), handler.records
    with open(os.path.join(durable_dir, "d20", "step_3", "COMMIT")) as f:
        assert json.load(f)["step"] == 3


@pytest.mark.parametrize(
    "bad",
    [
        {"durable_retry_initial_s": -1},
        {"durable_retry_max_s": "soon"},
        {"durable_retry_initial_s": 10.0, "durable_retry_max_s": 1.0},
        {"durable_max_pending_steps": 0},
        {"durable_max_pending_steps": True},
        {"durable_exit_wait_s": -0.5},
    ],
)
def test_d11_the_retry_pinning_and_exit_knobs_are_validated_with_a_typed_error(
    bad: dict[str, Any],
) -> None:
    with pytest.raises(tierckpt.ConfigError, match=next(iter(bad))):
        CheckpointConfig(namespace="knobs", world_size=1, **bad)


# --------------------------------------------------------------------------- store signals


def test_the_durable_commit_is_woken_through_the_job_store_not_by_polling_the_tier(
    config_factory: Any,
) -> None:
    cfg = config_factory()
    coordinator, other = run_ranks(wd.w_drain_woken_through_the_store, 2, cfg, 2.0, False)
    for res in (coordinator, other):
        assert res["durable"]["ok"], res["durable"]
        assert res["drains_idle"], res
    # rank 1 uploads 2 s late: polling would list the tier ~10 times meanwhile (20 ms,
    # growing 1.5x); woken by the store each waiter lists it once to confirm.
    assert coordinator["listings"] <= 2, coordinator["listings"]
    assert other["listings"] <= 2, other["listings"]
    assert coordinator["durable"]["s"] > 1.5, coordinator["durable"]
    assert other["durable"]["s"] < coordinator["durable"]["s"] + 1.0, (other, coordinator)
    commits = [m for _lvl, m in coordinator["logs"] if "Durable commit written" in m]
    assert commits and "signalled through the job store" in commits[0], commits
    assert os.path.exists(os.path.join(durable_root(cfg), cfg.namespace, "step_1", "COMMIT"))


def test_drains_that_outlive_destroy_process_group_still_commit(config_factory: Any) -> None:
    cfg = config_factory()
    coordinator, other = run_ranks(wd.w_drain_woken_through_the_store, 2, cfg, 0.5, True)
    for res in (coordinator, other):
        assert res["durable"]["ok"], res["durable"]
        assert res["drains_idle"], res
    assert os.path.exists(os.path.join(durable_root(cfg), cfg.namespace, "step_1", "COMMIT"))
