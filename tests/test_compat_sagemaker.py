"""The seed library's own examples run on ``tierckpt.compat.sagemaker``.

``tests/seed_examples/`` holds the seed README's Quick Start and its complete training
example, copied verbatim but for their import lines and the minimum CPU changes (each
marked ``# CHANGED:``). Each runs as 2 real gloo processes against the loopback moto server,
with the seed's bucket names, a unique ``TRAINING_JOB_NAME`` and a memory root under
/dev/shm. The seed's validation messages are checked on the compat classes directly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from fixtures_s3 import S3Server, empty_and_delete, shm_root
from tierckpt import ConfigError, DurableUnavailableError, InvalidStepError
from tierckpt.compat.sagemaker import (
    SageMakerCheckpointConfig,
    SageMakerTieredStorageReader,
    SageMakerTieredStorageWriter,
)

EXAMPLES = Path(__file__).parent / "seed_examples"
SEED_BUCKETS = ("my-bucket", "my-training-bucket")
EVERY_50TH = list(range(0, 1000, 50))


@dataclass
class Run:
    """What the ranks of one example run printed and how they exited."""

    returncodes: list[int | None]
    outputs: list[str]
    seconds: float

    def assert_ok(self) -> None:
        assert self.returncodes == [0, 0], self.describe()

    def describe(self) -> str:
        tails = "\n".join(f"--- rank {r}:\n{out[-4000:]}" for r, out in enumerate(self.outputs))
        return f"exit codes {self.returncodes} after {self.seconds:.1f}s\n{tails}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_example(
    script: str, job: str, memory_root: str, out_dir: Path, timeout: float = 150.0
) -> Run:
    """Run ``script`` as 2 gloo ranks (the env torchrun would give them); kill on timeout."""
    port = _free_port()
    procs, logs = [], []
    t0 = time.monotonic()
    for rank in range(2):
        env = dict(
            os.environ,
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_WORLD_SIZE="2",
            OMP_NUM_THREADS="1",
            TRAINING_JOB_NAME=job,
            TIERCKPT_MEMORY_ROOT=memory_root,
            PYTHONUNBUFFERED="1",
        )
        log = out_dir / f"{job}-{Path(script).stem}-rank{rank}.log"
        logs.append(log)
        with open(log, "wb") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(EXAMPLES / script)],
                    env=env,
                    stdout=f,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    codes: list[int | None] = []
    try:
        for p in procs:
            left = max(0.1, timeout - (time.monotonic() - t0))
            try:
                codes.append(p.wait(timeout=left))
            except subprocess.TimeoutExpired:
                codes.append(None)
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return Run(codes, [log.read_text(errors="replace") for log in logs], time.monotonic() - t0)


@pytest.fixture(scope="module")
def seed_buckets(s3_server: S3Server) -> Iterator[S3Server]:
    """The seed's buckets on the moto server, emptied and removed afterwards."""
    client = s3_server.client()
    for name in SEED_BUCKETS:
        client.create_bucket(Bucket=name)
    try:
        yield s3_server
    finally:
        for name in SEED_BUCKETS:
            empty_and_delete(client, name)


@pytest.fixture(scope="module")
def shm() -> Iterator[str]:
    with shm_root() as path:
        yield path


def durable_steps(server: S3Server, bucket: str, job: str) -> dict[int, list[str]]:
    """``step -> object names`` under ``s3://<bucket>/checkpoints/<job>/``."""
    prefix = f"checkpoints/{job}/"
    out: dict[int, list[str]] = {}
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    for page in pages:
        for obj in page.get("Contents", []):
            step_dir, _, name = obj["Key"][len(prefix) :].partition("/")
            out.setdefault(int(step_dir.removeprefix("step_")), []).append(name)
    return dict(sorted(out.items()))


def committed(steps: dict[int, list[str]]) -> list[int]:
    return [s for s, names in steps.items() if "COMMIT" in names]


# --------------------------------------------------------------------------- the examples


@pytest.fixture(scope="module")
def quick_start(seed_buckets: S3Server, shm: str, tmp_path_factory: pytest.TempPathFactory) -> Any:
    job = f"qs-{uuid.uuid4().hex[:8]}"
    run = run_example("quick_start.py", job, shm, tmp_path_factory.mktemp("qs"))
    return run, durable_steps(seed_buckets, "my-bucket", job)


@pytest.fixture(scope="module")
def complete_example(
    seed_buckets: S3Server, shm: str, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """Three runs of one job: from scratch; again (memory intact); again after the node's
    memory tier is lost (only S3 left)."""
    job = f"ce-{uuid.uuid4().hex[:8]}"
    out = tmp_path_factory.mktemp("ce")
    first = run_example("complete_example.py", job, shm, out)
    after_first = durable_steps(seed_buckets, "my-training-bucket", job)
    second = run_example("complete_example.py", job, shm, out)
    shutil.rmtree(os.path.join(shm, job), ignore_errors=True)
    third = run_example("complete_example.py", job, shm, out)
    return {"runs": (first, second, third), "s3": after_first}


def test_the_seed_quick_start_runs_saving_every_50th_step_to_s3_and_loads_back(quick_start):
    run, steps = quick_start
    run.assert_ok()
    assert committed(steps) == EVERY_50TH, steps
    for out in run.outputs:
        assert "Failure in saving previous checkpoint" not in out, run.describe()
        assert "Checkpoint load failed" not in out, run.describe()
        assert "Durable drain failed" not in out, run.describe()


def test_the_seed_training_example_saves_every_50th_step_to_s3(complete_example):
    first = complete_example["runs"][0]
    first.assert_ok()
    for out in first.outputs:
        assert "No checkpoint found, starting from scratch" in out, first.describe()
        assert "Failure in saving previous checkpoint" not in out, first.describe()
        assert "Durable drain failed" not in out, first.describe()
    assert committed(complete_example["s3"]) == EVERY_50TH, complete_example["s3"]


def test_a_second_run_of_the_seed_training_example_resumes_from_the_newest_step(
    complete_example,
):
    second = complete_example["runs"][1]
    second.assert_ok()
    for out in second.outputs:
        assert "Resumed training from step 991" in out, second.describe()


def test_after_losing_the_memory_tier_the_seed_example_resumes_from_the_newest_s3_step(
    complete_example,
):
    third = complete_example["runs"][2]
    third.assert_ok()
    for out in third.outputs:
        assert "Resumed training from step 951" in out, third.describe()


# --------------------------------------------------------------------------- validation


def test_the_seed_message_namespace_cannot_be_empty():
    with pytest.raises(ConfigError, match="Namespace cannot be empty"):
        SageMakerCheckpointConfig(namespace="", world_size=2)


@pytest.mark.parametrize("path", ["my-bucket/checkpoints", "https://my-bucket/ckpt", "s3:/x"])
def test_the_seed_message_invalid_s3_tier_base_path(path):
    with pytest.raises(ConfigError, match="Invalid S3 tier base path"):
        SageMakerCheckpointConfig(namespace="job", world_size=2, s3_tier_base_path=path)


@pytest.mark.parametrize("step", [-1, "100", 1.5])
def test_the_seed_message_invalid_step_value_for_a_bad_step(shm, step):
    cfg = SageMakerCheckpointConfig(namespace="job", world_size=1, memory_root=shm)
    with pytest.raises(InvalidStepError, match="Invalid step value"):
        SageMakerTieredStorageWriter(checkpoint_config=cfg, step=step)
    with pytest.raises(InvalidStepError, match="Invalid step value"):
        SageMakerTieredStorageReader(checkpoint_config=cfg, step=step)


def test_the_seed_message_invalid_step_value_when_neither_step_nor_path_names_one(shm):
    cfg = SageMakerCheckpointConfig(namespace="job", world_size=1, memory_root=shm)
    with pytest.raises(BaseException, match="Invalid step value"):  # raised when built (seed)
        writer = SageMakerTieredStorageWriter(checkpoint_config=cfg, path="any/path/here")
        dcp.save({"w": torch.ones(3)}, storage_writer=writer)
    assert not os.path.exists(os.path.join(shm, "job", "step_0"))


def test_the_step_comes_from_the_path_unless_given_explicitly(shm):
    cfg = SageMakerCheckpointConfig(namespace="job", world_size=1, memory_root=shm)
    by_path = SageMakerTieredStorageWriter(checkpoint_config=cfg, path="step_42/checkpoint")
    explicit = SageMakerTieredStorageWriter(
        checkpoint_config=cfg, path="step_42/checkpoint", step=7
    )
    assert (by_path.step, explicit.step) == (42, 7)


def test_the_seed_message_unable_to_fetch_region_for_a_missing_bucket(s3_server, shm):
    cfg = SageMakerCheckpointConfig(
        namespace="job",
        world_size=1,
        memory_root=shm,
        s3_tier_base_path="s3://tierckpt-no-such-seed-bucket/checkpoints",
        save_to_s3=True,
    )
    # The writer never raises for the durable tier (a rank failing alone would hang the
    # others' collectives): the save commits in memory and its drain fails with the message.
    writer = SageMakerTieredStorageWriter(checkpoint_config=cfg, step=1)
    dcp.save({"w": torch.ones(3)}, storage_writer=writer)
    with pytest.raises(
        DurableUnavailableError,
        match="Unable to fetch region for S3 bucket tierckpt-no-such-seed-bucket",
    ):
        writer.durable_done.result(timeout=30)


def test_a_reader_for_a_missing_step_fails_in_load_where_the_seeds_try_block_catches_it(
    shm, tmp_path
):
    # The seed's Quick Start builds the reader outside its try block and wraps only load().
    cfg = SageMakerCheckpointConfig(
        namespace="job", world_size=1, memory_root=shm, durable_base_path=f"file://{tmp_path}"
    )
    reader = SageMakerTieredStorageReader(checkpoint_config=cfg, step=500)
    with pytest.raises(BaseException, match="500"):
        dcp.load({"w": torch.zeros(3)}, storage_reader=reader)
