"""What a new user hits by default (issue 12: items 1, 5 and part of 6).

Real gloo ranks (``fixtures_dist``), a real kill -9 at a named crash point, a real moto S3
server (``fixtures_s3``), the real ``tierckpt`` CLI and real subprocesses for stderr.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

import workers_user_defaults as wu
from fixtures_dist import launch_ranks, run_ranks
from fixtures_s3 import S3Server
from tierckpt import CheckpointConfig, cli, layout

ROOT = Path(__file__).resolve().parent.parent


def _s3_objects(s3_server: S3Server, bucket: str, prefix: str) -> list[str]:
    client = s3_server.client()
    out: list[str] = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        out += [o["Key"][len(prefix) :] for o in page.get("Contents", [])]
    return sorted(out)


# --------------------------------------------------------------------------- item 1


@pytest.fixture
def killed_s3_job(
    s3_server: S3Server, s3_bucket: str, memory_root: str, tmp_path: Path, monkeypatch: Any
) -> dict[str, Any]:
    """A 1-rank job saving step 1 to ``s3://<bucket>/ckpt``, killed before its drain ends.

    The test then runs in a fresh directory without the S3 endpoint or region in its
    environment: only the record of the job's destination can lead a resume there.
    """
    ns = f"job-{uuid.uuid4().hex[:8]}"
    cfg = CheckpointConfig(
        namespace=ns,
        world_size=1,
        memory_root=memory_root,
        durable_base_path=f"s3://{s3_bucket}/ckpt",
    )
    (outcome,) = launch_ranks(wu.w_save_durable_killed_before_drain, 1, cfg, timeout=60)
    assert outcome.exitcode == -9, f"the drain was not killed: {outcome}"
    step_dir = os.path.join(memory_root, layout.step_dir(ns, 1))
    assert layout.COMMIT_NAME in os.listdir(step_dir), "step 1 was not committed in memory"
    assert layout.COMMIT_NAME not in _s3_objects(s3_server, s3_bucket, f"ckpt/{ns}/step_1/")
    monkeypatch.chdir(tmp_path)
    for k in ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(k, raising=False)
    return {"ns": ns, "root": memory_root, "bucket": s3_bucket, "cwd": tmp_path}


def test_i1_resume_without_durable_finishes_the_killed_drain_in_the_jobs_s3_bucket(
    killed_s3_job: dict[str, Any], s3_server: S3Server, capsys: Any
) -> None:
    job = killed_s3_job
    rc = cli.main(["resume", "-n", job["ns"], "--memory-root", job["root"]])
    out = capsys.readouterr()
    assert rc == 0, out
    assert "resumed steps: [1]" in out.out
    names = _s3_objects(s3_server, job["bucket"], f"ckpt/{job['ns']}/step_1/")
    assert layout.COMMIT_NAME in names, f"no durable commit in S3: {names}"
    assert not (job["cwd"] / "checkpoints").exists(), "the resume drained into ./checkpoints"
    listing = os.listdir(os.path.join(job["root"], layout.step_dir(job["ns"], 1)))
    assert any(n.endswith(".drained") for n in listing), listing
    # ls and verify look in the same place: the step is durable there.
    assert cli.main(["ls", "-n", job["ns"], "--memory-root", job["root"]]) == 0
    out = capsys.readouterr().out
    assert f"s3://{job['bucket']}/ckpt" in out and ", drained" in out, out
    assert cli.main(["verify", "-n", job["ns"], "--memory-root", job["root"], "--step", "1"]) == 0
    out = capsys.readouterr().out
    assert "durable  step 1: attempt" in out and out.rstrip().endswith("OK"), out


def test_i1_resume_with_a_durable_other_than_the_jobs_is_refused_naming_both(
    killed_s3_job: dict[str, Any], s3_server: S3Server, tmp_path: Path, capsys: Any
) -> None:
    job = killed_s3_job
    elsewhere = tmp_path / "elsewhere"
    for cmd in (["resume"], ["ls"], ["verify", "--step", "1"]):
        argv = [*cmd, "-n", job["ns"], "--memory-root", job["root"]]
        rc = cli.main([*argv, "--durable", f"file://{elsewhere}"])
        err = capsys.readouterr().err
        assert rc == 2, (cmd, err)
        assert f"s3://{job['bucket']}/ckpt" in err and f"file://{elsewhere}" in err, err
    assert not elsewhere.exists(), "the refused resume created the other destination"
    names = _s3_objects(s3_server, job["bucket"], f"ckpt/{job['ns']}/step_1/")
    assert layout.COMMIT_NAME not in names, "the refused resume drained anyway"
    listing = os.listdir(os.path.join(job["root"], layout.step_dir(job["ns"], 1)))
    assert not any(n.endswith(".drained") for n in listing), listing


def test_i1_the_recorded_destination_holds_no_credentials(
    killed_s3_job: dict[str, Any], s3_server: S3Server
) -> None:
    path = os.path.join(killed_s3_job["root"], layout.destination_key(killed_s3_job["ns"]))
    text = Path(path).read_text()
    assert s3_server.endpoint_url in text and f"s3://{killed_s3_job['bucket']}/ckpt" in text
    assert "tierckpt-test-secret" not in text and "tierckpt-test-key" not in text, text


# --------------------------------------------------------------------------- item 5

_SCRIPT = r"""
import os, sys
import torch
import torch.distributed as dist
import tierckpt

rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
if world > 1:
    dist.init_process_group("gloo", rank=rank, world_size=world)
cfg = tierckpt.CheckpointConfig(
    namespace="defaults", world_size=world, memory_root=sys.argv[1], durable_base_path=sys.argv[2]
)
sd = {f"w{rank}": torch.arange(250_000 // world, dtype=torch.float32) + rank}
tierckpt.save(sd, config=cfg, step=40, save_to_durable=True).result(timeout=60)
tierckpt.wait_for_drains(timeout=60)
target = {f"w{rank}": torch.zeros(250_000 // world)}
assert tierckpt.load(target, config=cfg) == 40
assert torch.equal(target[f"w{rank}"], sd[f"w{rank}"])
if world > 1:
    dist.barrier()
    dist.destroy_process_group()
"""


def _run_job(
    tmp_path: Path, memory_root: str, world: int, env: dict[str, str] | None = None
) -> list[subprocess.CompletedProcess[str]]:
    """Run :data:`_SCRIPT` on ``world`` processes (own gloo group); each one's output."""
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT)
    durable = f"file://{tmp_path / 'durable'}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("TIERCKPT_")}
    procs = []
    for rank in range(world):
        penv = base | {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), memory_root, durable],
                env=penv | (env or {}),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=tmp_path,
            )
        )
    out = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=90)
        finally:
            p.kill()
        out.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    for res in out:
        assert res.returncode == 0, res.stderr
    return out


_SUMMARY = [
    r"tierckpt: step 40 saved to memory in \d+\.\d{3} s \(\d+\.\d MB, \d+\.\d MB/s\)",
    r"tierckpt: step 40 durable in file:///\S+/durable \(\d+\.\d s\)",
    r"tierckpt: loaded step 40 from memory \(1\.0 MB in \d+\.\d\d s\)",
]


def test_i5_a_save_and_load_print_exactly_one_summary_line_each_by_default(
    tmp_path: Path, memory_root: str
) -> None:
    (res,) = _run_job(tmp_path, memory_root, 1)
    lines = res.stderr.splitlines()
    assert len(lines) == len(_SUMMARY), res.stderr
    for line, pattern in zip(lines, _SUMMARY, strict=True):
        assert re.fullmatch(pattern, line), (line, pattern)
    assert res.stdout == ""


def test_i5_tierckpt_log_level_warning_prints_nothing(tmp_path: Path, memory_root: str) -> None:
    (res,) = _run_job(tmp_path, memory_root, 1, {"TIERCKPT_LOG_LEVEL": "WARNING"})
    assert res.stderr == "" and res.stdout == "", res.stderr


def test_i5_debug_level_adds_the_per_rank_detail_lines(tmp_path: Path, memory_root: str) -> None:
    (res,) = _run_job(tmp_path, memory_root, 1, {"TIERCKPT_LOG_LEVEL": "DEBUG"})
    assert "[Rank 0] Step 40: In-memory write completed" in res.stderr, res.stderr
    assert "tierckpt: step 40 saved to memory" in res.stderr


def test_i5_on_two_ranks_only_rank_0_prints(tmp_path: Path, memory_root: str) -> None:
    rank0, rank1 = _run_job(tmp_path, memory_root, 2)
    lines = rank0.stderr.splitlines()
    assert len(lines) == 3, rank0.stderr
    assert lines[0].startswith("tierckpt: step 40 saved to memory")
    assert lines[1].startswith("tierckpt: step 40 durable in file://")
    assert lines[2].startswith("tierckpt: loaded step 40 from memory (0.5 MB")
    assert rank1.stderr == "", rank1.stderr


def test_i5_a_user_who_configures_logging_gets_no_second_copy(tmp_path: Path) -> None:
    code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO, format='USER %(message)s', "
        "stream=sys.stderr)\n"
        "from tierckpt import CheckpointConfig\n"
        "from tierckpt._log import logger_for, summary\n"
        f"cfg = CheckpointConfig(namespace='x', world_size=1, memory_root={str(tmp_path)!r})\n"
        "summary(logger_for(cfg), 'hello')\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERCKPT_")}
    res = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr.splitlines() == ["USER tierckpt: hello"], res.stderr


# --------------------------------------------------------------------------- item 6


def test_i6_resaving_a_durable_step_leaves_only_the_second_attempts_files_in_durable(
    config_factory: Any,
) -> None:
    cfg = config_factory(world_size=2)
    results = run_ranks(wu.w_save_step_3_durable_twice, 2, cfg)
    first = {r: res["attempts"][0] for r, res in enumerate(results)}  # each rank its own id
    second = {r: res["attempts"][1] for r, res in enumerate(results)}
    assert not set(first.values()) & set(second.values())
    after_first, after_second = results[0]["listings"]
    assert {layout.data_name(first[r], r) for r in range(2)} <= set(after_first), after_first
    stale = [n for n in after_second if layout.attempt_of(n) not in (None, *second.values())]
    assert not stale, f"the older attempt's durable files remain: {after_second}"
    assert layout.COMMIT_NAME in after_second
    assert {layout.data_name(second[r], r) for r in range(2)} <= set(after_second), after_second
