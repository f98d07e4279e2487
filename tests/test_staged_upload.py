"""Uploading a rank's data file while it is staged (:mod:`tierckpt.staged_upload`).

In-process parts run a real staging buffer on the test's tmpfs root against the moto
server; the end-to-end part launches two gloo ranks whose durable saves stream their data
(``s3workers.w_staged_uploads``), one of them through the fault proxy.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import s3workers as sw
from fixtures_dist import run_ranks
from fixtures_s3 import S3Server, bucket_on, proxy_to, shm_root
from tierckpt import CheckpointConfig, ConfigError, layout
from tierckpt.saving import acquire_buffer, release_buffer
from tierckpt.staged_upload import StagedUpload, follow_buffer, staged_upload_wanted
from tierckpt.staging import StagingBuffer
from tierckpt.tiers.directory import DirectoryTier
from tierckpt.tiers.memory import open_memory_tier
from tierckpt.tiers.s3 import S3Tier

MiB = 2**20
PART = 5 * MiB
LOG = logging.getLogger("tierckpt.test.staged")


def _config(memory_root: str, durable: str, **kw: Any) -> CheckpointConfig:
    return CheckpointConfig(
        namespace=f"su-{uuid.uuid4().hex[:8]}",
        world_size=1,
        memory_root=memory_root,
        durable_base_path=durable,
        s3_part_size=PART,
        **{"durable_stream": True, **kw},
    )


def _tensors(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(10 * MiB // 4, generator=g) for _ in range(n)]


@pytest.fixture
def staged(memory_root: str, s3_server: S3Server, s3_bucket: str) -> Iterator[dict[str, Any]]:
    """A 30 MiB staging buffer of attempt ``a1`` rank 0 followed by an upload to S3."""
    cfg = _config(memory_root, f"s3://{s3_bucket}/base")
    memory = open_memory_tier(cfg)
    tier = S3Tier(f"s3://{s3_bucket}/base", endpoint_url=s3_server.endpoint_url, part_size=PART)
    buffer = acquire_buffer(memory, cfg, "a1", 0, 30 * MiB)
    upload = follow_buffer(cfg, tier, buffer, step=7, attempt="a1", rank=0, log=LOG)
    assert isinstance(upload, StagedUpload)
    client = s3_server.client()
    key = "base/" + layout.step_key(cfg.namespace, 7, layout.data_name("a1", 0))
    try:
        yield {
            "buffer": buffer,
            "upload": upload,
            "client": client,
            "key": key,
            "bucket": s3_bucket,
        }
    finally:
        upload.cancel("the test ended")
        release_buffer(memory, cfg, buffer, discard=True)


def _open_uploads(client: Any, bucket: str) -> list[dict[str, Any]]:
    return list(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def _wait_for_parts(client: Any, bucket: str, key: str, n: int, timeout_s: float = 30.0) -> int:
    """Parts of the open multipart upload of ``key`` once there are ``n`` (or the timeout)."""
    deadline = time.monotonic() + timeout_s
    parts = 0
    while time.monotonic() < deadline:
        ups = [u for u in _open_uploads(client, bucket) if u["Key"] == key]
        if ups:
            listed = client.list_parts(Bucket=bucket, Key=key, UploadId=ups[0]["UploadId"])
            parts = len(listed.get("Parts", []))
            if parts >= n:
                return parts
        time.sleep(0.05)
    return parts


def test_parts_upload_while_later_tensors_are_still_being_staged(staged):
    buffer: StagingBuffer = staged["buffer"]
    client, bucket, key = staged["client"], staged["bucket"], staged["key"]
    tensors = _tensors(3)
    for t in tensors[:2]:
        buffer.place(t)
    parts = _wait_for_parts(client, bucket, key, 2)
    assert parts >= 2, f"only {parts} parts were sent while a third of the data was unstaged"
    assert buffer.used < 30 * MiB
    buffer.place(tensors[2])
    buffer.finish(buffer.used)
    sent = staged["upload"].result()
    assert sent == buffer.used == 30 * MiB
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    with open(buffer.path, "rb") as f:
        assert body == f.read()
    assert body == b"".join(t.numpy().tobytes() for t in tensors)
    assert _open_uploads(client, bucket) == []


def test_an_abandoned_buffer_leaves_no_object_and_no_open_upload(staged):
    buffer: StagingBuffer = staged["buffer"]
    client, bucket, key = staged["client"], staged["bucket"], staged["key"]
    for t in _tensors(2):
        buffer.place(t)
    assert _wait_for_parts(client, bucket, key, 1) >= 1
    buffer.abandon("the save failed")
    assert buffer.watcher is None
    assert staged["upload"].result() is None
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert _open_uploads(client, bucket) == []


def test_an_upload_whose_save_stalls_cancels_itself(memory_root: str, tmp_path) -> None:
    cfg = _config(memory_root, f"file://{tmp_path}")
    memory = open_memory_tier(cfg)
    tier = DirectoryTier(str(tmp_path), name="durable")
    buffer = acquire_buffer(memory, cfg, "a1", 0, 20 * MiB)
    try:
        upload = StagedUpload(tier, "ns/step_1/x.data", buffer.path, idle_s=0.5, log=LOG)
        buffer.watcher = upload
        buffer.place(_tensors(1)[0])
        t0 = time.monotonic()
        assert upload.result() is None
        assert time.monotonic() - t0 < 10
        assert not os.path.exists(tmp_path / "ns" / "step_1" / "x.data")
    finally:
        release_buffer(memory, cfg, buffer, discard=True)


def test_a_short_file_fails_the_upload_instead_of_sending_less(memory_root, tmp_path) -> None:
    cfg = _config(memory_root, f"file://{tmp_path}")
    memory = open_memory_tier(cfg)
    buffer = acquire_buffer(memory, cfg, "a1", 0, 1 * MiB)
    try:
        upload = StagedUpload(
            DirectoryTier(str(tmp_path), name="durable"),
            "ns/k.data",
            buffer.path,
            idle_s=30,
            log=LOG,
        )
        upload.finish(4 * MiB)  # more than the file holds
        with pytest.raises(Exception, match="shorter"):
            upload.result()
        assert not os.path.exists(tmp_path / "ns" / "k.data")
    finally:
        release_buffer(memory, cfg, buffer, discard=True)


def test_streaming_is_opt_in(memory_root: str, s3_server: S3Server, tmp_path) -> None:
    s3 = S3Tier("s3://b/p", endpoint_url=s3_server.endpoint_url)
    directory = DirectoryTier(str(tmp_path), name="durable")
    default = CheckpointConfig(namespace="n", world_size=1, memory_root=memory_root)
    assert not staged_upload_wanted(default, s3)
    assert not staged_upload_wanted(default, directory)
    on = _config(memory_root, f"file://{tmp_path}", durable_stream=True)
    assert staged_upload_wanted(on, s3)
    assert staged_upload_wanted(on, directory)
    assert not staged_upload_wanted(on, None)
    with pytest.raises(ConfigError, match="durable_stream"):
        _config(memory_root, f"file://{tmp_path}", durable_stream="yes")


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def staged_run(s3_server: S3Server) -> Iterator[dict[str, Any]]:
    """Two ranks' durable saves with streaming data (see ``w_staged_uploads``)."""
    with bucket_on(s3_server) as bucket, shm_root() as mem, proxy_to(s3_server) as proxy:
        base = f"s3://{bucket}/ckpt"
        cfg = CheckpointConfig(
            namespace="staged",
            world_size=2,
            memory_root=mem,
            durable_base_path=base,
            s3_part_size=PART,
            durable_stream=True,
        )
        proxied = dataclasses.replace(cfg, s3_endpoint_url=proxy.url, s3_max_retries=0)
        proxy.fail_next("error500", 1, method="PUT", path_contains=".data")
        results = run_ranks(sw.w_staged_uploads, 2, cfg, proxied, bucket, timeout=240)
        client = s3_server.client()
        yield {
            "results": results,
            "failed_puts": [s for s in proxy.seen("PUT", path_contains=".data") if s.status == 500],
            "open_uploads": _open_uploads(client, bucket),
        }


def test_durable_saves_stream_their_data_and_load_bit_exact(staged_run) -> None:
    for rank, res in enumerate(staged_run["results"]):
        for step in (1, 2, 4):
            assert res[f"durable_{step}"] == {"ok": True}, (rank, step, res[f"durable_{step}"])
        assert res["loaded_1"] and res["loaded_2"] and res["loaded_4"], (rank, res)
        streamed = [m for m in res["logs"] if "uploaded while it was staged" in m]
        assert any("step_1/" in m for m in streamed), (rank, streamed)


def test_a_step_the_coordinator_keeps_out_of_s3_leaves_nothing_there(staged_run) -> None:
    for rank, res in enumerate(staged_run["results"]):
        assert res["memory_3"], (rank, res)
        assert res["step_3_objects"] == {}, (rank, res["step_3_objects"])
    assert staged_run["open_uploads"] == []


def test_a_failed_streamed_part_is_uploaded_again_whole(staged_run) -> None:
    assert staged_run["failed_puts"], "the proxy failed no data PUT"
    logs = [m for res in staged_run["results"] for m in res["logs"]]
    assert any("uploading it whole" in m for m in logs), logs
