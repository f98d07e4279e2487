"""A rank's data file read by several threads at once (runs of neighbouring blobs).

Real saves and loads through DCP in this process, real tmpfs and a real durable directory;
the split size and thread count are lowered so a small state is split. What is pinned
down: the runs cover every blob once in offset order, a split load is bit-exact and uses
several threads, and a corrupt blob in one run is read from the durable tier while the
other runs still come from memory.
"""

from __future__ import annotations

import glob
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tierckpt
from tierckpt import fetch
from tierckpt.fetch import Blob, split_blobs

MIB = 1 << 20


def _blobs(lengths: list[int]) -> list[Blob]:
    out, offset = [], 0
    for n in lengths:
        out.append(Blob(offset, n, "x"))
        offset += n
    return list(reversed(out))  # not in offset order: the split sorts


def test_runs_cover_every_blob_once_in_offset_order_with_about_equal_bytes() -> None:
    blobs = _blobs([4 * MIB] * 16)
    runs = split_blobs(blobs, 4, min_bytes=MIB)
    assert len(runs) == 4
    flat = [i for run in runs for i in run]
    assert sorted(flat) == list(range(16))
    assert [blobs[i].offset for i in flat] == sorted(b.offset for b in blobs)
    assert {sum(blobs[i].length for i in run) for run in runs} == {16 * MIB}


def test_small_or_single_blob_files_are_not_split() -> None:
    assert split_blobs(_blobs([MIB] * 8), 4, min_bytes=64 * MIB) == [list(range(7, -1, -1))]
    assert len(split_blobs(_blobs([256 * MIB]), 8, min_bytes=MIB)) == 1
    assert split_blobs([], 4) == []


@pytest.fixture
def split_small(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Split at 1 MiB into 4 threads; the names of the threads that read runs."""
    monkeypatch.setattr(fetch, "SPLIT_MIN_BYTES", MIB)
    monkeypatch.setattr(fetch, "read_threads", lambda local_ranks: 4)
    used: list[str] = []
    original: Callable[..., Any] = fetch.Fetcher.fetch_file

    def recording(self: fetch.Fetcher, fname: str, blobs: list[Blob]) -> Any:
        used.append(threading.current_thread().name)
        return original(self, fname, blobs)

    monkeypatch.setattr(fetch.Fetcher, "fetch_file", recording)
    return used


def _state() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(7)
    return {"model": {f"w{i}": torch.randn(128, 1024, generator=gen) for i in range(24)}}


def _zeros(state: dict[str, Any]) -> dict[str, Any]:
    return {"model": {k: torch.zeros_like(v) for k, v in state["model"].items()}}


def test_a_split_load_is_bit_exact_and_uses_several_threads(
    config_factory: Callable[..., Any], split_small: list[str]
) -> None:
    config = config_factory(world_size=1, memory_prefault=False)
    state = _state()
    dcp.save(state, storage_writer=tierckpt.TieredStorageWriter(config, step=1))
    out = _zeros(state)
    dcp.load(out, storage_reader=tierckpt.TieredStorageReader(config))
    for k, v in state["model"].items():
        assert torch.equal(out["model"][k], v), k
    assert len(split_small) == 4
    assert len(set(split_small)) >= 2


def test_a_corrupt_blob_in_one_run_comes_from_durable_and_the_rest_from_memory(
    config_factory: Callable[..., Any], split_small: list[str]
) -> None:
    config = config_factory(world_size=1, memory_prefault=False)
    state = _state()
    writer = tierckpt.TieredStorageWriter(config, step=1, save_to_durable=True)
    dcp.save(state, storage_writer=writer)
    assert tierckpt.wait_for_drains(60)
    (data,) = glob.glob(os.path.join(config.memory_root, config.namespace, "step_1", "*.data"))
    with open(data, "r+b") as f:  # a byte in the middle of the file: one run's blob
        f.seek(os.path.getsize(data) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    out = _zeros(state)
    reader = tierckpt.TieredStorageReader(config)
    dcp.load(out, storage_reader=reader)
    for k, v in state["model"].items():
        assert torch.equal(out["model"][k], v), k
    assert reader.bytes_read_by_tier["durable"] == 128 * 1024 * 4  # the one blob
    assert reader.bytes_read_by_tier["memory"] == 23 * 128 * 1024 * 4


def test_reader_threads_are_this_ranks_share_of_the_cpus() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert fetch.read_threads(1) == min(fetch.READ_THREADS, cpus)
    assert fetch.read_threads(cpus) == 1
    assert fetch.read_threads(4 * cpus) == 1  # more ranks than CPUs: still one each
    assert fetch.read_threads(0) == min(fetch.READ_THREADS, cpus)


def test_a_load_asks_for_threads_for_the_configs_ranks_on_this_node(
    config_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without torchrun's LOCAL_WORLD_SIZE the reader divides by the config's local ranks
    (one node: world_size), not by 1: two ranks on two cores read with one thread each."""
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    asked: list[int] = []
    real = fetch.read_threads

    def recording(local_ranks: int) -> int:
        asked.append(local_ranks)
        return real(local_ranks)

    monkeypatch.setattr(fetch, "read_threads", recording)
    config = config_factory(world_size=1, memory_prefault=False, local_world_size=1)
    state = _state()
    dcp.save(state, storage_writer=tierckpt.TieredStorageWriter(config, step=1))
    dcp.load(_zeros(state), storage_reader=tierckpt.TieredStorageReader(config))
    assert asked == [config.local_world_size] == [1]
    two = tierckpt.CheckpointConfig(namespace="x", world_size=2, memory_root=config.memory_root)
    assert two.local_world_size == 2  # what a 2-rank job started without torchrun reads with
