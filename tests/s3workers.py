"""Rank workers for the S3 durable-tier tests (run by ``fixtures_dist.run_ranks``).

Every ``w_*`` function has the signature ``fn(rank, world_size, *args)`` and returns plain
data: observations that the test (in the pytest process) asserts on. A worker never raises
on an expected failure of the library; it records it, so both ranks stay in step and the
test reports what went wrong. S3 is inspected with boto3 (an independent client), through
``AWS_ENDPOINT_URL``, which the ranks inherit from the ``s3_server`` fixture.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

import tierckpt
from distworkers import blank_plain_state, capture_logs, describe_error, fingerprint, plain_state
from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter, layout

# --------------------------------------------------------------------------- helpers


def s3_keys(bucket: str, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` (relative key -> size), listed with boto3."""
    import boto3

    client = boto3.client("s3")
    out: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            out[obj["Key"][len(prefix) :]] = int(obj["Size"])
    return out


def s3_steps(bucket: str, base: str, namespace: str) -> dict[int, list[str]]:
    """``step -> sorted object names`` under ``<base>/<namespace>/`` in S3."""
    out: dict[int, list[str]] = {}
    for key in s3_keys(bucket, f"{base}/{namespace}/"):
        step_dir, _, name = key.partition("/")
        step = layout.parse_step_dir(step_dir)
        if step is not None:
            out.setdefault(step, []).append(name)
    return {s: sorted(names) for s, names in sorted(out.items())}


def memory_step(cfg: CheckpointConfig, step: int) -> str:
    return os.path.join(cfg.memory_root or "", cfg.namespace, f"step_{step}")


def memory_committed(cfg: CheckpointConfig, step: int) -> bool:
    """The step is committed in the memory tier and its data files are still there."""
    d = memory_step(cfg, step)
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return False
    return "COMMIT" in names and any(n.endswith(".data") for n in names)


def wipe_memory(cfg: CheckpointConfig) -> None:
    """Rank 0 removes the namespace from the memory tier; every rank waits for it."""
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(os.path.join(cfg.memory_root or "", cfg.namespace), ignore_errors=True)
    dist.barrier()


def wait_for(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def load_step(cfg: CheckpointConfig, step: int | None, scale: int = 1) -> dict[str, Any]:
    """Load into a blank target through a fresh reader; what was loaded and from where."""
    sd = blank_plain_state(scale)
    reader = TieredStorageReader(cfg, step=step)
    try:
        dcp.load(sd, storage_reader=reader)
    except BaseException as e:
        return {"errors": describe_error(e)}
    return {
        "step": reader.step,
        "bytes": dict(reader.bytes_read_by_tier),
        "bit_exact": fingerprint(sd)
        == fingerprint(plain_state(seed=reader.step or 0, scale=scale)),
    }


def durable_outcome(writer: TieredStorageWriter, timeout: float) -> dict[str, Any]:
    """How ``writer.durable_done`` ended: ok, or the error's types and message."""
    try:
        writer.durable_done.result(timeout=timeout)
    except BaseException as e:
        return {"ok": False, "errors": describe_error(e)}
    return {"ok": True}


def save_memory_only(cfg: CheckpointConfig, step: int, scale: int = 1) -> float:
    """Save ``plain_state(step)`` to the memory tier; seconds ``dcp.save`` took."""
    t0 = time.perf_counter()
    dcp.save(
        plain_state(seed=step, scale=scale), storage_writer=TieredStorageWriter(cfg, step=step)
    )
    return time.perf_counter() - t0


def coordinator_says(flag: bool) -> bool:
    """Rank 0's ``flag``, on every rank."""
    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, src=0)
    return bool(t.item())


# --------------------------------------------------------------------------- round trip


def _round_trip(rank: int, cfg: CheckpointConfig, scale: int) -> dict[str, Any]:
    """Steps 1 and 2 to memory and durable; wipe memory; load both from the durable tier."""
    out: dict[str, Any] = {"durable": {}}
    for step in (1, 2):
        w = TieredStorageWriter(cfg, step=step, save_to_durable=True)
        dcp.save(plain_state(seed=step, scale=scale), storage_writer=w)
        out[f"memory_committed_at_return_{step}"] = memory_committed(cfg, step)
        out["durable"][step] = durable_outcome(w, timeout=60)
    wipe_memory(cfg)
    out["latest"] = load_step(cfg, None, scale)
    out["step1"] = load_step(cfg, 1, scale)
    return out


def w_round_trips(
    rank: int, world_size: int, cfgs: dict[str, CheckpointConfig], scale: int
) -> dict[str, Any]:
    """The same save/wipe/load scenario over each durable tier (``name -> config``)."""
    return {name: _round_trip(rank, cfg, scale) for name, cfg in cfgs.items()}


# --------------------------------------------------------------------------- background drain


def w_drain_in_background(
    rank: int, world_size: int, cfg: CheckpointConfig, slow_step: int
) -> dict[str, Any]:
    """Save ``slow_step`` durably (its uploads are slowed by the proxy), then keep saving
    memory-only steps while its drain runs; record, after each save, whether the drain was
    done and whether ``slow_step`` was still committed in memory."""
    w = TieredStorageWriter(cfg, step=slow_step, save_to_durable=True)
    t0 = time.perf_counter()
    dcp.save(plain_state(seed=slow_step), storage_writer=w)
    out: dict[str, Any] = {
        "save_s": time.perf_counter() - t0,
        "done_at_return": w.durable_done.done(),
        "memory_committed_at_return": memory_committed(cfg, slow_step),
        "observations": [],
    }
    step = slow_step + 1
    while step < slow_step + 80:
        took = save_memory_only(cfg, step)
        out["observations"].append(
            {
                "saved": step,
                "save_s": took,
                "saved_committed": memory_committed(cfg, step),
                "drain_done": w.durable_done.done(),
                "pending_in_memory": memory_committed(cfg, slow_step),
            }
        )
        step += 1
        if coordinator_says(w.durable_done.done()):
            break
        time.sleep(0.15)
    out["durable"] = durable_outcome(w, timeout=cfg.durable_commit_timeout_s + 10)
    dist.barrier()
    # Once the drain is done, the next save may evict the step (memory_keep_last=1).
    save_memory_only(cfg, step)
    out["evicted_after_drain"] = not os.path.exists(memory_step(cfg, slow_step))
    return out


# --------------------------------------------------------------------------- faults


def w_retention_and_faults(
    rank: int,
    world_size: int,
    keep: CheckpointConfig,
    ok: CheckpointConfig,
    fail: CheckpointConfig,
    retention_steps: int,
) -> dict[str, Any]:
    """Durable retention with failing deletes; a drain through 503s and resets; a drain
    whose retries are exhausted. Each scenario on its own namespace."""
    out: dict[str, Any] = {}

    # Retention: every step durable; rank 0 lets each commit's sweep finish before the next.
    handler = capture_logs(keep, "tierckpt-test-retention")
    outcomes = {}
    for step in range(1, retention_steps + 1):
        w = TieredStorageWriter(keep, step=step, save_to_durable=True)
        dcp.save(plain_state(seed=step), storage_writer=w)
        outcomes[step] = durable_outcome(w, timeout=60)
        out.setdefault("drains_idle", []).append(tierckpt.wait_for_drains(timeout=60))
        dist.barrier()
    out["retention"] = {"durable": outcomes, "logs": handler.records}

    # Throttling and resets during the drain: retried, then committed.
    w = TieredStorageWriter(ok, step=1, save_to_durable=True)
    dcp.save(plain_state(seed=1), storage_writer=w)
    ok_result = {"durable": durable_outcome(w, timeout=60)}
    wipe_memory(ok)
    ok_result["load"] = load_step(ok, None)
    out["retried"] = ok_result

    # Retries exhausted (s3_max_retries=0, persistent 503): a typed error; memory still loads.
    w = TieredStorageWriter(fail, step=1, save_to_durable=True)
    t0 = time.perf_counter()
    dcp.save(plain_state(seed=1), storage_writer=w)
    exhausted: dict[str, Any] = {"save_s": time.perf_counter() - t0}
    exhausted["durable"] = durable_outcome(w, timeout=60)
    dist.barrier()
    exhausted["load"] = load_step(fail, None)
    out["exhausted"] = exhausted
    return out


# --------------------------------------------------------------------------- kill -9


class _KillAfterPartUploaded(TieredStorageWriter):
    """Fault injection: the real writer, SIGKILLed once this rank's part of the step is in
    S3 but before the step's memory commit (an attempt abandoned after its upload)."""

    bucket = ""
    base = ""

    def write_data(self, plan: Any, planner: Any) -> Any:
        fut = super().write_data(plan, planner)
        assert self.step is not None
        manifest = layout.manifest_name(self.attempt, self.rank)
        prefix = f"{self.base}/{self.config.namespace}/step_{self.step}/"
        wait_for(lambda: manifest in s3_keys(self.bucket, prefix), timeout=30)
        os.kill(os.getpid(), signal.SIGKILL)
        return fut


def w_die_mid_drain(
    rank: int, world_size: int, cfg: CheckpointConfig, bucket: str, base: str, proxy_url: str
) -> None:
    """Step 1 durable; step 2 durable with rank 1's uploads stalled (rank 1 talks to S3
    through the proxy); step 3's parts uploaded, then every rank is SIGKILLed before
    step 3's memory commit, while step 2's drain is still waiting for rank 1."""
    if rank == 1:
        cfg.s3_endpoint_url = proxy_url
    w = TieredStorageWriter(cfg, step=1, save_to_durable=True)
    dcp.save(plain_state(seed=1), storage_writer=w)
    w.durable_done.result(timeout=60)
    dist.barrier()
    w = TieredStorageWriter(cfg, step=2, save_to_durable=True)
    dcp.save(plain_state(seed=2), storage_writer=w)
    if rank == 0:  # rank 0's part of step 2 is in S3 before anyone dies
        mine = layout.manifest_name(w.attempt, 0)
        wait_for(lambda: mine in s3_keys(bucket, f"{base}/{cfg.namespace}/step_2/"), 30)
    dist.barrier()
    killer = _KillAfterPartUploaded(cfg, step=3, save_to_durable=True)
    killer.bucket, killer.base = bucket, base
    dcp.save(plain_state(seed=3), storage_writer=killer)
    raise AssertionError("not reached: the rank is killed inside dcp.save")


def w_resume_after_kill(
    rank: int, world_size: int, cfg: CheckpointConfig, bucket: str, base: str
) -> dict[str, Any]:
    """New ranks: a reader resumes the interrupted drain; then load from S3 alone; then a
    later durable commit sweeps the abandoned attempt's objects."""
    out: dict[str, Any] = {}
    ns = cfg.namespace
    reader = TieredStorageReader(cfg)  # resumes pending drains of this namespace
    out["reader_step"] = reader.step
    out["resumed"] = wait_for(lambda: "COMMIT" in s3_steps(bucket, base, ns).get(2, []), 60)
    dist.barrier()
    out["s3_after_resume"] = s3_steps(bucket, base, ns)
    wipe_memory(cfg)
    out["load_latest"] = load_step(cfg, None)
    out["load_2"] = load_step(cfg, 2)
    dist.barrier()
    w = TieredStorageWriter(cfg, step=4, save_to_durable=True)
    dcp.save(plain_state(seed=4), storage_writer=w)
    out["step4"] = durable_outcome(w, timeout=60)
    out["drains_idle"] = tierckpt.wait_for_drains(timeout=60)
    dist.barrier()
    out["s3_at_end"] = s3_steps(bucket, base, ns)
    return out


# --------------------------------------------------------------------------- staged uploads


def _big_sharded_state(seed: int, world_size: int) -> dict[str, Any]:
    """Three float32 DTensors sharded on dim 0: 6 MiB of each per rank (multipart at 5 MiB)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world_size,))
    g = torch.Generator().manual_seed(seed)
    rows = 6 * 2**20 // 4 // 1024 * world_size
    return {
        f"t{i}": distribute_tensor(torch.randn(rows, 1024, generator=g), mesh, [Shard(0)])
        for i in range(3)
    }


def _load_sharded(cfg: CheckpointConfig, step: int, world_size: int) -> bool:
    """Load ``step`` into a blank target; True when it equals what was saved."""
    target = _big_sharded_state(seed=0, world_size=world_size)
    dcp.load(target, storage_reader=TieredStorageReader(cfg, step=step))
    return fingerprint(target) == fingerprint(_big_sharded_state(step, world_size))


def w_staged_uploads(
    rank: int, world_size: int, cfg: CheckpointConfig, proxied: CheckpointConfig, bucket: str
) -> dict[str, Any]:
    """Durable saves whose data uploads while it is staged: ``async_save`` of shards (step
    1), ``dcp.save`` (step 2), a save the coordinator keeps out of the durable tier although
    rank 1 asks for it (step 3), and one through the proxy whose first data PUT fails
    (step 4: redone whole). Then memory is wiped and steps 1, 2 and 4 load from S3."""
    logs = capture_logs(cfg)
    proxied.logger = cfg.logger
    out: dict[str, Any] = {}
    w = TieredStorageWriter(cfg, step=1, save_to_durable=True)
    dcp.async_save(_big_sharded_state(1, world_size), storage_writer=w).result(timeout=60)
    out["durable_1"] = durable_outcome(w, timeout=60)
    w = TieredStorageWriter(cfg, step=2, save_to_durable=True)
    dcp.save(plain_state(seed=2, scale=768), storage_writer=w)
    out["durable_2"] = durable_outcome(w, timeout=60)
    w = TieredStorageWriter(cfg, step=3, save_to_durable=rank == 1)
    dcp.async_save(_big_sharded_state(3, world_size), storage_writer=w).result(timeout=60)
    out["memory_3"] = memory_committed(cfg, 3)
    w = TieredStorageWriter(proxied, step=4, save_to_durable=True)
    dcp.save(_big_sharded_state(4, world_size), storage_writer=w)
    out["durable_4"] = durable_outcome(w, timeout=60)
    dist.barrier()
    out["step_3_objects"] = s3_keys(bucket, f"{_base_of(cfg)}/{cfg.namespace}/step_3/")
    wipe_memory(cfg)
    out["loaded_1"] = _load_sharded(cfg, 1, world_size)
    out["loaded_2"] = load_step(cfg, 2, scale=768)
    out["loaded_4"] = _load_sharded(cfg, 4, world_size)
    out["logs"] = [m for _, m in logs.records]
    return out


def _base_of(cfg: CheckpointConfig) -> str:
    """The key prefix of ``cfg``'s durable tier in its bucket (``s3://bucket/<prefix>``)."""
    return (cfg.durable_base_path or "").split("/", 3)[3]
