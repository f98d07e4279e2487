"""Saves and loads pause Python's cyclic garbage collector, and always let it run again."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import workers_gcpause as wg
from fixtures_dist import run_ranks
from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter
from tierckpt._gcpause import PauseSlot, pause_gc, paused_count
from tierckpt.fetch import Fetcher


@pytest.fixture(autouse=True)
def _collector_on() -> Iterator[None]:
    was = gc.isenabled()
    gc.enable()
    try:
        yield
    finally:
        assert paused_count() == 0, "a test left a pause open"
        if not was:
            gc.disable()


def test_overlapping_pauses_turn_the_collector_back_on_only_after_the_last():
    first = pause_gc("a save", 60)
    second = pause_gc("a load", 60)
    assert not gc.isenabled() and paused_count() == 2
    first.end()
    first.end()  # idempotent
    assert not gc.isenabled()
    second.end()
    assert gc.isenabled() and paused_count() == 0


def test_a_collector_the_user_turned_off_stays_off():
    gc.disable()
    with pause_gc("a load", 60):
        pass
    assert not gc.isenabled()


def test_a_pause_never_ended_is_ended_by_the_watchdog_with_a_warning(caplog):
    slot = PauseSlot()
    with caplog.at_level(logging.WARNING, logger="tierckpt"):
        slot.start(True, "step 9 load", 0.2)
        assert not gc.isenabled()
        deadline = time.monotonic() + 10
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert gc.isenabled() and paused_count() == 0
    assert any("step 9 load" in r.getMessage() for r in caplog.records), caplog.records
    slot.end()  # after expiry: nothing left to end


def test_a_slot_ends_its_previous_pause_when_started_again():
    slot = PauseSlot()
    slot.start(True, "save 1", 60)
    slot.start(True, "save 2", 60)
    assert paused_count() == 1
    slot.end()
    slot.start(False, "off", 60)
    assert gc.isenabled() and paused_count() == 0


def _cfg(memory_root: str, **kw: object) -> CheckpointConfig:
    return CheckpointConfig(namespace="gc", world_size=1, memory_root=memory_root, **kw)


def test_a_failed_read_ends_the_load_pause(memory_root, monkeypatch):
    cfg = _cfg(memory_root)
    state = {"w": torch.randn(64, 64)}
    dcp.save(state, storage_writer=TieredStorageWriter(cfg, step=1))
    assert gc.isenabled()

    def broken(self, files):  # type: ignore[no-untyped-def]
        assert not gc.isenabled(), "reads run with the collector paused"
        raise OSError("injected read failure")

    monkeypatch.setattr(Fetcher, "fetch_all", broken)
    with pytest.raises(CheckpointException) as failed:
        dcp.load({"w": torch.zeros(64, 64)}, storage_reader=TieredStorageReader(cfg))
    assert "injected read failure" in repr(failed.value.failures)
    assert gc.isenabled() and paused_count() == 0


def test_pause_gc_false_never_touches_the_collector(memory_root, monkeypatch):
    cfg = _cfg(memory_root, pause_gc=False)
    seen: list[bool] = []
    real = Fetcher.fetch_all

    def spy(self, files):  # type: ignore[no-untyped-def]
        seen.append(gc.isenabled())
        return real(self, files)

    monkeypatch.setattr(Fetcher, "fetch_all", spy)
    state = {"w": torch.randn(64, 64)}
    dcp.save(state, storage_writer=TieredStorageWriter(cfg, step=1))
    target = {"w": torch.zeros(64, 64)}
    dcp.load(target, storage_reader=TieredStorageReader(cfg))
    assert seen == [True] and torch.equal(target["w"], state["w"])


def test_two_ranks_save_and_load_with_the_collector_paused_and_on_again_after(config_factory):
    cfg = config_factory()
    ranks = run_ranks(wg.w_save_and_load, 2, cfg, timeout=180)
    for rank, out in enumerate(ranks):
        assert out["exact"]
        for step in (1, 2):
            seen, enabled_after, open_after = out[f"save{step}"]
            # Rank 0 (the coordinator) is paused through finish; rank 1 through write_data.
            expected = ["_write_data", "_finish"] if rank == 0 else ["_write_data"]
            assert [name for name, _ in seen] == expected, (rank, seen)
            assert not any(on for _, on in seen), (rank, step, seen)
            assert enabled_after and open_after == 0, (rank, step)
        seen, enabled_after, open_after = out["load"]
        assert [name for name, _ in seen] == ["prepare_local_plan", "_read_data"], seen
        assert not any(on for _, on in seen) and enabled_after and open_after == 0, (rank, seen)


def test_a_failed_save_ends_the_save_pause(memory_root, monkeypatch):
    cfg = _cfg(memory_root)

    def broken(self, plan, planner):  # type: ignore[no-untyped-def]
        assert not gc.isenabled(), "the write runs with the collector paused"
        raise OSError("injected write failure")

    monkeypatch.setattr(TieredStorageWriter, "_write_data", broken)
    with pytest.raises(CheckpointException) as failed:
        dcp.save({"w": torch.randn(8)}, storage_writer=TieredStorageWriter(cfg, step=1))
    assert "injected write failure" in repr(failed.value.failures)
    assert gc.isenabled() and paused_count() == 0


def test_an_async_save_pauses_in_its_background_and_ends_when_committed(memory_root):
    cfg = _cfg(memory_root)
    state = {"w": torch.randn(128, 128)}
    res = dcp.async_save(state, storage_writer=TieredStorageWriter(cfg, step=4))
    getattr(res, "upload_completion", res).result(timeout=60)
    assert gc.isenabled() and paused_count() == 0
    target = {"w": torch.zeros(128, 128)}
    dcp.load(target, storage_reader=TieredStorageReader(cfg))
    assert torch.equal(target["w"], state["w"])
