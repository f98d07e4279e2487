"""dcp.save / dcp.async_save then dcp.load through tierckpt round-trip bit-exact."""

from __future__ import annotations

import re

import pytest

import distworkers as w
from fixtures_dist import run_ranks


def _assert_round_trip(results):
    for rank, res in enumerate(results):
        assert res["loaded"] == res["saved"], f"rank {rank} did not load what it saved"
    # Every rank loads the same step.
    assert len({res["load"]["step"] for res in results}) == 1


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    """One DDP run (2 ranks): save step 5 (durable, with a log file), load into a new model."""
    import shutil
    import uuid

    from tierckpt import CheckpointConfig

    tmp = tmp_path_factory.mktemp("ddp")
    memory_root = f"/dev/shm/tierckpt-test-{uuid.uuid4().hex}"
    cfg = CheckpointConfig(
        namespace="run-1",
        world_size=2,
        memory_root=memory_root,
        durable_base_path=f"file://{tmp}/durable",
        log_file=str(tmp / "run-1.log"),
    )
    try:
        yield run_ranks(w.w_model_round_trip, 2, cfg, "ddp"), tmp / "run-1.log"
    finally:
        shutil.rmtree(memory_root, ignore_errors=True)


def test_replicated_ddp_model_adamw_and_extras_round_trip_bit_exact(ddp_run):
    results, _ = ddp_run
    _assert_round_trip(results)
    for res in results:
        assert res["differs_before"], "the load target already equalled the checkpoint"
        assert res["load"]["step"] == 5
        assert res["load"]["bytes"]["memory"] > 0
        assert res["load"]["bytes"]["durable"] == 0
        saved = res["saved"]
        assert any(k.startswith("/optim/state/") and k.endswith("/exp_avg") for k in saved)
        assert saved["/extra/blob"][0] == "bytes"
        assert saved["/extra/nested/inner/tag"] == ("str", repr("x" * 5))
        assert res["kinds"] == ["Tensor"]


def test_a_save_logs_rank_and_step_lines_with_throughput_to_the_configured_logger(ddp_run):
    results, log_file = ddp_run
    for rank, res in enumerate(results):
        lines = [msg for _, msg in res["logs"]]
        assert any(line.startswith(f"[Rank {rank}] Step 5:") for line in lines), lines
    rank0 = [msg for _, msg in results[0]["logs"]]
    assert any(re.match(r"\[Rank 0\] Step 5: .*\d MB/s", line) for line in rank0), rank0
    # The optional per-namespace log file gets the same lines.
    text = log_file.read_text()
    assert "[Rank 0] Step 5:" in text
    assert "[Rank 1] Step 5:" in text


def test_fsdp2_sharded_model_adamw_and_extras_round_trip_bit_exact_on_4_ranks(config_factory):
    cfg = config_factory(world_size=4)
    results = run_ranks(w.w_model_round_trip, 4, cfg, "fsdp2", timeout=180)
    _assert_round_trip(results)
    for res in results:
        assert res["writer_step"] == 5, "the step comes from checkpoint_id 'ckpt/step_5'"
        assert res["load"]["step"] == 5
        assert res["kinds"] == ["DTensor"]
        assert res["differs_before"]


def test_async_save_with_a_thread_checkpointer_round_trips_the_staged_state(config_factory):
    results = run_ranks(w.w_async_round_trip, 2, config_factory(), "thread")
    _assert_round_trip(results)
    for res in results:
        assert res["load"]["step"] == 3
        assert res["committed"] == [3]


def test_async_save_with_a_process_checkpointer_round_trips_and_the_subprocess_stops(
    config_factory,
):
    results = run_ranks(w.w_async_round_trip, 2, config_factory(), "process", timeout=180)
    _assert_round_trip(results)
    for res in results:
        assert res["load"]["step"] == 3
        assert res["committed"] == [3]
        assert res["checkpointer_stopped"] is True


def test_staged_dtensors_are_what_from_local_builds_over_the_staged_shards():
    results = run_ranks(w.w_staged_dtensors_match_from_local, 2)
    for rank, res in enumerate(results):
        assert len(res) == 6
        for key, facts in res.items():
            assert facts == {
                "type": "DTensor",
                "spec": True,
                "dtype": True,
                "local": True,
                "grad": True,
                "full": True,
            }, f"rank {rank}, {key}"
