"""The S3 durable tier end to end: real gloo ranks, a real moto server, a real fault proxy.

Ranks (world size 2) save with ``durable_base_path="s3://<bucket>/ckpt"``; the endpoint is
the moto server (``AWS_ENDPOINT_URL``, inherited by the ranks) or the fault proxy in front
of it (``s3_endpoint_url``). Each rank launch costs seconds, so one launch serves the tests
that read the same run; every test asserts on its own part of the observations.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import uuid
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import s3workers as sw
from fixtures_dist import launch_ranks, run_ranks
from fixtures_s3 import S3Server, bucket_on, proxy_to, shm_root
from tierckpt import (
    CheckpointConfig,
    DurableUnavailableError,
    TieredStorageReader,
    TieredStorageWriter,
)

MiB = 2**20
BASE = "ckpt"
SCALE = 768
"""``plain_state(scale=768)`` holds a 6 MiB tensor: multipart uploads and ranged reads of
5 MiB parts."""


# --------------------------------------------------------------------------- fixtures


def s3_steps(server: S3Server, bucket: str, namespace: str) -> dict[int, list[str]]:
    """``step -> object names`` of a namespace in S3, listed from the test process."""
    client = server.client()
    prefix = f"{BASE}/{namespace}/"
    out: dict[int, list[str]] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            step_dir, _, name = obj["Key"][len(prefix) :].partition("/")
            out.setdefault(int(step_dir.removeprefix("step_")), []).append(name)
    return {s: sorted(v) for s, v in sorted(out.items())}


def committed(steps: dict[int, list[str]]) -> list[int]:
    return [s for s, names in steps.items() if "COMMIT" in names]


def config(namespace: str, memory_root: str, durable: str, **kw: Any) -> CheckpointConfig:
    return CheckpointConfig(
        namespace=namespace, world_size=2, memory_root=memory_root, durable_base_path=durable, **kw
    )


def error_types(outcome: dict[str, Any]) -> set[str]:
    return {t for e in outcome["errors"] for t in e["types"]}


def error_text(outcome: dict[str, Any]) -> str:
    return " | ".join(e["message"] for e in outcome["errors"])


# --------------------------------------------------------------------------- a, g: round trip


@pytest.fixture(scope="module")
def round_trips(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One launch: the same save / wipe memory / load scenario over file:// and s3://."""
    with bucket_on(s3_server) as bucket, shm_root() as mem:
        durable_dir = tmp_path_factory.mktemp("durable")
        cfgs = {
            "file": config("rt-file", mem, f"file://{durable_dir}", s3_part_size=5 * MiB),
            "s3": config("rt-s3", mem, f"s3://{bucket}/{BASE}", s3_part_size=5 * MiB),
        }
        results = run_ranks(sw.w_round_trips, 2, cfgs, SCALE, timeout=180)
        yield {"results": results, "s3": s3_steps(s3_server, bucket, "rt-s3")}


@pytest.mark.parametrize("tier", ["file", "s3"])
def test_the_same_save_wipe_memory_load_scenario_passes_on_the_durable_tier(round_trips, tier):
    for rank, res in enumerate(round_trips["results"]):
        run = res[tier]
        assert run["durable"] == {1: {"ok": True}, 2: {"ok": True}}, (rank, run["durable"])
        assert run["latest"].get("step") == 2, (rank, run["latest"])
        assert run["step1"].get("step") == 1, (rank, run["step1"])
        for load in (run["latest"], run["step1"]):
            assert load["bit_exact"], (rank, load)
            assert load["bytes"]["memory"] == 0, (rank, load)
            assert load["bytes"]["durable"] > 0, (rank, load)


def test_a_durable_save_to_s3_returns_at_the_memory_commit_and_leaves_every_object_in_s3(
    round_trips,
):
    for rank, res in enumerate(round_trips["results"]):
        run = res["s3"]
        assert run["memory_committed_at_return_1"], rank
        assert run["memory_committed_at_return_2"], rank
    steps = round_trips["s3"]
    assert committed(steps) == [1, 2], steps
    for step, names in steps.items():
        assert sum(n.endswith(".data") for n in names) >= 1, (step, names)
        assert sum(n.endswith(".metadata") for n in names) == 1, (step, names)
        for rank in (0, 1):
            assert any(re.fullmatch(rf"[0-9a-f]{{12}}-r{rank}\.manifest\.json", n) for n in names)


# --------------------------------------------------------------------------- b: background drain

SLOW_STEP = 10
SLOW_PUT_S = 1.0


@pytest.fixture(scope="module")
def slow_drain(s3_server: S3Server) -> Any:
    """One launch: every PUT of step 10 stalls 1 s at the proxy while later steps are saved."""
    with bucket_on(s3_server) as bucket, shm_root() as mem, proxy_to(s3_server) as proxy:
        proxy.fail_next(
            "slow",
            1000,
            method="PUT",
            path_contains=f"/b-drain/step_{SLOW_STEP}/",
            delay_s=SLOW_PUT_S,
        )
        cfg = config(
            "b-drain",
            mem,
            f"s3://{bucket}/{BASE}",
            s3_endpoint_url=proxy.url,
            memory_keep_last=1,
            durable_commit_timeout_s=20.0,  # a failed drain is reported in seconds
        )
        results = run_ranks(sw.w_drain_in_background, 2, cfg, SLOW_STEP, timeout=180)
        yield {
            "results": results,
            "s3": s3_steps(s3_server, bucket, "b-drain"),
            "slowed": proxy.seen("PUT", path_contains=f"/step_{SLOW_STEP}/"),
        }


def test_a_durable_save_returns_before_its_slow_upload_and_later_steps_save_meanwhile(
    slow_drain,
):
    assert len([s for s in slow_drain["slowed"] if s.fault == "slow"]) >= 4
    for rank, res in enumerate(slow_drain["results"]):
        assert res["memory_committed_at_return"], rank
        assert not res["done_at_return"], (rank, res)
        meanwhile = [o for o in res["observations"] if not o["drain_done"]]
        assert len(meanwhile) >= 2, (rank, res["observations"])
        # Each returned, committed in memory, while step 10's drain was still under way.
        assert all(o["saved_committed"] for o in meanwhile), (rank, meanwhile)
        assert res["durable"] == {"ok": True}, (rank, res["durable"])
    assert SLOW_STEP in committed(slow_drain["s3"]), slow_drain["s3"]


def test_retention_keeps_a_memory_step_until_its_durable_drain_is_done(slow_drain):
    # memory_keep_last=1: every later save would evict the slow step, were it not pending.
    coordinator = slow_drain["results"][0]
    evicted_early = [
        o for o in coordinator["observations"] if not o["drain_done"] and not o["pending_in_memory"]
    ]
    assert not evicted_early, f"evicted while its drain was pending: {evicted_early}"
    assert coordinator["durable"] == {"ok": True}, coordinator["durable"]
    assert coordinator["evicted_after_drain"]


# --------------------------------------------------------------------------- d, e: faults

RETENTION_STEPS = 6  # keep_last=2 and keep_every=3 keep steps 3, 5 and 6


@pytest.fixture(scope="module")
def fault_runs(s3_server: S3Server) -> Any:
    """One launch through the proxy: durable retention with failing deletes (f-keep), a drain
    through 503s and resets (f-retry), a drain whose retries run out (f-fail)."""
    with bucket_on(s3_server) as bucket, shm_root() as mem, proxy_to(s3_server) as proxy:
        s3 = f"s3://{bucket}/{BASE}"
        keep = config(
            "f-keep",
            mem,
            s3,
            s3_endpoint_url=proxy.url,
            s3_max_retries=2,
            durable_keep_last=2,
            durable_keep_every=3,
        )
        ok = config("f-retry", mem, s3, s3_endpoint_url=proxy.url)
        fail = config("f-fail", mem, s3, s3_endpoint_url=proxy.url, s3_max_retries=0)
        # Two delete calls fail (3 requests each with s3_max_retries=2); obstore deletes even
        # a single key with a DeleteObjects POST, so DELETE is covered in case that changes.
        proxy.fail_next("error500", 6, method="POST", path_contains="?delete")
        proxy.fail_next("error500", 6, method="DELETE", path_contains="/f-keep/")
        proxy.fail_next("slowdown", 2, method="PUT", path_contains="/f-retry/")
        proxy.fail_next("reset", 2, method="PUT", path_contains="/f-retry/")
        proxy.fail_next("slowdown", 10_000, method="PUT", path_contains="/f-fail/")
        results = run_ranks(
            sw.w_retention_and_faults, 2, keep, ok, fail, RETENTION_STEPS, timeout=240
        )
        yield {
            "results": results,
            "bucket": bucket,
            "requests": proxy.requests,
            "s3": {ns: s3_steps(s3_server, bucket, ns) for ns in ("f-keep", "f-retry", "f-fail")},
        }


def test_durable_retention_keeps_the_last_k_and_every_mth_step_and_logs_failed_deletes(
    fault_runs,
):
    for rank, res in enumerate(fault_runs["results"]):
        durable = res["retention"]["durable"]
        assert all(o == {"ok": True} for o in durable.values()), (rank, durable)
        assert all(res["drains_idle"]), rank
    steps = fault_runs["s3"]["f-keep"]
    assert committed(steps) == [3, 5, 6], steps
    assert set(steps) == {3, 5, 6}, f"objects of deleted steps remain: {steps}"
    failed = [
        s
        for s in fault_runs["requests"]
        if s.status == 500 and (s.method == "DELETE" or "?delete" in s.path)
    ]
    assert len(failed) >= 6, failed
    warnings = [
        msg
        for level, msg in fault_runs["results"][0]["retention"]["logs"]
        if level == "WARNING" and "Durable retention could not clean step" in msg
    ]
    assert warnings, fault_runs["results"][0]["retention"]["logs"]
    assert all("step 1" in w and "HTTP 500" in w and "after 2 retries" in w for w in warnings)


def test_throttling_and_resets_during_a_drain_are_retried_and_the_step_commits_in_s3(
    fault_runs,
):
    retry_puts = [s for s in fault_runs["requests"] if "/f-retry/" in s.path and s.method == "PUT"]
    assert [s.status for s in retry_puts if s.fault == "slowdown"] == [503, 503], retry_puts
    assert [s.status for s in retry_puts if s.fault == "reset"] == [None, None], retry_puts
    assert committed(fault_runs["s3"]["f-retry"]) == [1]
    for rank, res in enumerate(fault_runs["results"]):
        run = res["retried"]
        assert run["durable"] == {"ok": True}, (rank, run)
        assert run["load"].get("step") == 1 and run["load"]["bit_exact"], (rank, run)
        assert run["load"]["bytes"]["durable"] > 0, (rank, run)


def test_a_drain_out_of_retries_fails_typed_naming_the_object_and_memory_still_loads(
    fault_runs,
):
    bucket = fault_runs["bucket"]
    obj = re.compile(
        rf"s3://{bucket}/{BASE}/f-fail/step_1/[0-9a-f]{{12}}-r\d\.(data|manifest\.json)"
    )
    assert committed(fault_runs["s3"]["f-fail"]) == []
    for rank, res in enumerate(fault_runs["results"]):
        run = res["exhausted"]
        assert not run["durable"]["ok"], (rank, run)
        assert "DurableTierError" in error_types(run["durable"]), (rank, run)
        text = error_text(run["durable"])
        assert obj.search(text), (rank, text)
        assert "503" in text, (rank, text)
        load = run["load"]
        assert load.get("step") == 1 and load["bit_exact"], (rank, load)
        assert load["bytes"]["memory"] > 0 and load["bytes"]["durable"] == 0, (rank, load)


# --------------------------------------------------------------------------- c: kill -9


def test_kill_9_mid_drain_leaves_the_step_invisible_in_s3_until_new_ranks_resume_it(
    s3_server: S3Server,
):
    ns = "c-kill"
    with bucket_on(s3_server) as bucket, shm_root() as mem, proxy_to(s3_server) as proxy:
        # Rank 1 talks to S3 through the proxy: its uploads of step 2 never get through.
        proxy.fail_next("slow", 1000, method="PUT", path_contains=f"/{ns}/step_2/", delay_s=120)
        cfg = config(ns, mem, f"s3://{bucket}/{BASE}")
        outcomes = launch_ranks(sw.w_die_mid_drain, 2, cfg, bucket, BASE, proxy.url, timeout=120)
        assert [o.exitcode for o in outcomes] == [-signal.SIGKILL] * 2, outcomes

        after_kill = s3_steps(s3_server, bucket, ns)
        assert committed(after_kill) == [1], after_kill
        # Step 2 partly uploaded (rank 0's part only) and invisible: no COMMIT.
        assert any(n.endswith("-r0.manifest.json") for n in after_kill[2]), after_kill
        assert not any(n.endswith("-r1.manifest.json") for n in after_kill[2]), after_kill
        # Step 3: an abandoned attempt (uploaded, never committed anywhere).
        assert after_kill[3] and "COMMIT" not in after_kill[3], after_kill
        assert "COMMIT" in os.listdir(os.path.join(mem, ns, "step_2"))
        assert "COMMIT" not in os.listdir(os.path.join(mem, ns, "step_3"))

        proxy.clear_faults()
        results = run_ranks(sw.w_resume_after_kill, 2, cfg, bucket, BASE, timeout=180)
        end = s3_steps(s3_server, bucket, ns)

    for rank, res in enumerate(results):
        assert res["reader_step"] == 2, (rank, res)
        assert res["resumed"], (rank, res["s3_after_resume"])
        for load in (res["load_latest"], res["load_2"]):
            assert load.get("step") == 2 and load["bit_exact"], (rank, load)
            assert load["bytes"]["memory"] == 0 and load["bytes"]["durable"] > 0, (rank, load)
        assert res["step4"] == {"ok": True}, (rank, res["step4"])
    resumed = results[0]["s3_after_resume"]
    assert any(n.endswith("-r1.manifest.json") for n in resumed[2]), resumed
    assert 3 in resumed, "the abandoned attempt was removed before a later durable commit"
    assert results[0]["drains_idle"]
    assert committed(end) == [1, 2, 4], end
    assert 3 not in end, f"stray objects of the abandoned attempt remain: {end[3]}"


# --------------------------------------------------------------------------- f: missing bucket


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("build", ["writer", "reader"])
@pytest.mark.parametrize("problem", ["missing bucket", "unreachable endpoint"])
def test_a_missing_or_unreachable_bucket_fails_fast_with_an_error_naming_it(
    s3_server: S3Server, build: str, problem: str
):
    bucket = f"tierckpt-absent-{uuid.uuid4().hex[:8]}"
    extra: dict[str, Any] = {}
    if problem == "unreachable endpoint":
        extra["s3_endpoint_url"] = f"http://127.0.0.1:{_closed_port()}"
    with shm_root() as mem:
        cfg = CheckpointConfig(
            namespace="f-missing",
            world_size=1,
            memory_root=mem,
            durable_base_path=f"s3://{bucket}/{BASE}",
            **extra,
        )
        t0 = time.monotonic()
        with pytest.raises(DurableUnavailableError, match=bucket) as info:
            if build == "writer":
                # A writer never raises for the durable tier: the save commits in memory and
                # its drain fails, typed and fast.
                w = TieredStorageWriter(cfg, step=1, save_to_durable=True)
                dcp.save({"w": torch.ones(16)}, storage_writer=w)
                w.durable_done.result(timeout=30)
            else:
                TieredStorageReader(cfg)
        elapsed = time.monotonic() - t0
    assert elapsed < 5.0, f"took {elapsed:.1f}s: {info.value}"
    if problem == "missing bucket":
        assert "no such bucket" in str(info.value)
