"""No silent hangs (issue 12 item 3) and errors a user can catch (item 4)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap

import pytest

import workers_no_hangs as w
from fixtures_dist import run_ranks


def test_i3_a_reader_built_on_rank_0_alone_fails_within_seconds_naming_rank_1(config_factory):
    cfg = config_factory(collective_timeout_s=3)

    rank0, _ = run_ranks(w.w_reader_on_rank0_only, 2, cfg, timeout=60)

    error = rank0["error"]
    assert error is not None, "the reader must not wait for a rank that never builds one"
    assert "CollectiveTimeoutError" in error["types"]
    assert "TimeoutError" in error["types"] and "TierckptError" in error["types"]
    assert "ranks [1]" in error["message"] and "build the reader" in error["message"]
    assert 2.5 <= rank0["seconds"] < 15


def test_i3_two_async_saves_in_flight_are_serialized_and_the_second_step_loads(config_factory):
    cfg = config_factory(collective_timeout_s=30)

    results = run_ranks(w.w_two_async_saves_in_flight, 2, cfg, timeout=60)

    for res in results:
        assert res["seconds"] < 30
        assert res["step"] == 2
        assert res["loaded"] == res["expected"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


PROCESS_JOB = """
import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
import tierckpt

def main():
    dist.init_process_group("gloo")
    cfg = tierckpt.CheckpointConfig(namespace="proc", world_size=2, memory_root=sys.argv[1],
                                    durable_base_path="file://" + sys.argv[2])
    for step in (1, 2):
        sd = {"w": torch.full((4,), float(step))}
        f = tierckpt.async_save(sd, config=cfg, step=step, save_to_durable=step == 2,
                                async_checkpointer_type=AsyncCheckpointerType.PROCESS)
        f.result(timeout=60)
    tierckpt.wait_for_drains(timeout=60)
    sd = {"w": torch.zeros(4)}
    step = tierckpt.load(sd, config=cfg)
    print(f"loaded|{dist.get_rank()}|{step}|{sd['w'].tolist()}", flush=True)
    dist.destroy_process_group()

if __name__ == "__main__":
    main()
"""


def test_i3_the_process_checkpointer_works_under_torchrun(tmp_path, memory_root, durable_dir):
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(PROCESS_JOB))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--nnodes=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "--local-addr=127.0.0.1",
        str(script),
        memory_root,
        durable_dir,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(
        cmd,
        check=False,
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        start_new_session=True,
    )

    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    # The two ranks share one stdout: their lines can run together.
    lines = sorted(re.findall(r"loaded\|\d\|\d\|\[[^\]]*\]", res.stdout))
    assert lines == ["loaded|0|2|[2.0, 2.0, 2.0, 2.0]", "loaded|1|2|[2.0, 2.0, 2.0, 2.0]"]
    assert os.path.isdir(os.path.join(durable_dir, "proc", "step_2"))


def test_i4_a_shape_mismatch_on_load_is_an_integrity_error_naming_item_and_shapes(
    config_factory,
):
    results = run_ranks(w.w_load_with_other_shapes, 2, config_factory(), timeout=60)

    for error in results:
        assert error is not None, "loading into other shapes must fail"
        assert "IntegrityError" in error["types"]
        assert "w has shape (64, 32) in the checkpoint but (128, 32)" in error["message"]


def test_i4_a_corrupt_blob_only_rank_1_needs_fails_every_rank_with_rank_1s_typed_error(
    config_factory,
):
    results = run_ranks(w.w_corrupt_blob_only_rank1_needs, 2, config_factory(), timeout=60)

    for error in results:
        assert error is not None, "every rank must see that rank 1 cannot load"
        assert "StepUnloadableError" in error["types"] and "IntegrityError" in error["types"]
        assert error["failure_ranks"] == [1]
        assert error["failure_types"] == {1: "StepUnloadableError"}


@pytest.mark.parametrize("group", ["default", "own", "process"])
def test_i3_destroy_process_group_right_after_async_save_waits_and_the_step_commits(
    config_factory, group
):
    # The seed's complete example ends this way; the last save used to fail ("Connection
    # closed by peer") or hang the exit.
    cfg = config_factory(collective_timeout_s=60)

    results = run_ranks(w.w_destroy_with_an_async_save_in_flight, 2, cfg, group, timeout=180)

    for res in results:
        assert res["error"] is None, res
        assert res["committed"] == [1, 2, 3], res
        if group != "process":
            assert res["done_at_destroy"], res  # destroy waited for the save's collectives
        # ... and for nothing else: a process-based save runs its collectives elsewhere.
        assert res["destroy_s"] < 20, res
