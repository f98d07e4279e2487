"""A save survives another rank's sweep running at its worst moment.

Retention removes step directories it finds empty (nothing proves an owner), and attempt
leases a killed writer left half-taken. Each test lets the real sweep (or its ``rmdir``)
run at the exact moment that once lost a save: between a step directory's creation and
the first file in it, and before a lease's private name is locked. Seen in CI as
``FileNotFoundError`` on the staging buffer's rename into ``step_960/`` and as a
``.leases/<attempt>-r1.new-<token>`` left behind by a kill -9.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from tierckpt import TieredStorageReader, TieredStorageWriter
from tierckpt.catalog import StepCatalog
from tierckpt.leases import LEASE_DIR, AttemptLease, is_live, sweep_leases
from tierckpt.manifest import checksum
from tierckpt.peer import PeerClient, PeerService
from tierckpt.peer._files import Root
from tierckpt.retention import sweep
from tierckpt.tiers.directory import DirectoryTier, in_made_dir
from tierckpt.tiers.memory import MemoryTier

LOG = logging.getLogger("test_concurrent_sweeps")


def _sweep_after_first_makedirs(monkeypatch: pytest.MonkeyPatch, action: Any) -> list[str]:
    """Run ``action(path)`` once per step directory, right after ``os.makedirs`` made it."""
    real = os.makedirs
    hit: list[str] = []

    def makedirs(path: Any, *args: Any, **kwargs: Any) -> None:
        existed = os.path.isdir(path)
        real(path, *args, **kwargs)
        name = os.path.basename(os.fspath(path))
        if not existed and name.startswith("step_") and path not in hit:
            hit.append(os.fspath(path))
            action(os.fspath(path))

    monkeypatch.setattr(os, "makedirs", makedirs)
    return hit


def test_a_save_commits_when_another_ranks_sweep_removes_its_new_empty_step_directory(
    config_factory: Any, memory_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config_factory(namespace="race", world_size=1)
    dcp.save({"w": torch.full((1024,), 1.0)}, storage_writer=TieredStorageWriter(cfg, step=1))
    memory = MemoryTier(memory_root)

    def other_ranks_sweep(path: str) -> None:
        assert os.listdir(path) == []  # the window: made, nothing in it yet
        sweep(StepCatalog(memory, "race", LOG), cfg.memory_keep_last, LOG)
        assert not os.path.exists(path), "the sweep left the empty step directory"

    hit = _sweep_after_first_makedirs(monkeypatch, other_ranks_sweep)
    dcp.save({"w": torch.full((1024,), 2.0)}, storage_writer=TieredStorageWriter(cfg, step=2))
    monkeypatch.undo()

    assert [os.path.basename(p) for p in hit] == ["step_2"]
    assert "COMMIT" in os.listdir(os.path.join(memory_root, "race", "step_2"))
    out = {"w": torch.zeros(1024)}
    dcp.load(out, storage_reader=TieredStorageReader(cfg))
    assert torch.equal(out["w"], torch.full((1024,), 2.0))


def test_a_directory_tier_write_lands_when_its_new_directory_is_removed_before_the_file(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    tier = DirectoryTier(str(tmp_path), name="durable")
    hit = _sweep_after_first_makedirs(monkeypatch, os.rmdir)
    tier.write("ns/step_3/COMMIT", [b"committed"])
    tier.put_file("ns/step_4/a.data", __file__)
    monkeypatch.undo()

    assert [os.path.basename(p) for p in hit] == ["step_3", "step_4"]
    assert bytes(tier.read("ns/step_3/COMMIT")) == b"committed"
    with open(__file__, "rb") as f:
        assert bytes(tier.read("ns/step_4/a.data")) == f.read()


def test_a_rename_whose_source_is_missing_still_fails_at_once(tmp_path: Any) -> None:
    tier = DirectoryTier(str(tmp_path), name="durable")
    target = os.path.join(tier.root, "ns", "step_1", "x.data")
    calls = []

    def rename() -> None:
        calls.append(1)
        os.rename(os.path.join(tier.root, "missing"), target)

    with pytest.raises(FileNotFoundError):
        in_made_dir(target, rename)
    assert calls == [1], "a missing source was retried as if the directory had gone"


@pytest.fixture
def peer_root() -> Iterator[str]:
    path = os.path.join("/dev/shm", f"tierckpt-test-peer-{uuid.uuid4().hex}")
    os.makedirs(os.path.join(path, "node"), mode=0o700)
    try:
        yield os.path.join(path, "node")
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_a_replica_lands_when_the_receivers_sweep_removes_its_new_step_directory(
    peer_root: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_walk = Root._walk
    removed: list[int] = []

    def walk(self: Root, parts: list[str], *, create: bool) -> int:
        fd = real_walk(self, parts, create=create)
        if create and parts and parts[-1].startswith("step_") and len(removed) < 2:
            # The receiving node's sweep found the new step directory empty.
            os.rmdir(os.path.join(self.path, *parts))
            removed.append(fd)
        return fd

    monkeypatch.setattr(Root, "_walk", walk)
    secret = b"k" * 32
    service = PeerService(peer_root, secret, timeout_s=5)
    try:
        with PeerClient(service.address, secret, timeout_s=5) as client:
            client.put_bytes("ns/step_7/r0.manifest.json", b"{}")  # PUTB
            data = os.urandom(3 << 20)
            local = os.path.join(os.path.dirname(peer_root), "local.data")
            with open(local, "wb") as f:
                f.write(data)
            client.put_file(local, "ns/step_8/r0.data", [(0, len(data), checksum(data))])  # PUT
    finally:
        service.close()
    assert len(removed) == 2
    with open(os.path.join(peer_root, "ns/step_7/r0.manifest.json"), "rb") as f:
        assert f.read() == b"{}"
    with open(os.path.join(peer_root, "ns/step_8/r0.data"), "rb") as f:
        assert f.read() == data


def test_a_lease_half_taken_by_a_killed_writer_is_swept_and_a_live_one_never(
    tmp_path: Any,
) -> None:
    ns = str(tmp_path)
    live = AttemptLease(ns, "aaaaaaaaaaaa-r0")
    lease_dir = os.path.join(ns, LEASE_DIR)
    # A writer killed between creating its private name and the rename into place.
    orphan = os.path.join(lease_dir, "bbbbbbbbbbbb-r1.new-0badf00d")
    os.close(os.open(orphan, os.O_RDWR | os.O_CREAT, 0o600))
    # One being taken right now: created and locked, not yet renamed.
    taking = os.path.join(lease_dir, "cccccccccccc-r0.new-0ddba11a")
    fd = os.open(taking, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        assert sweep_leases(ns) == 1
        assert sorted(os.listdir(lease_dir)) == sorted(
            ["aaaaaaaaaaaa-r0", "cccccccccccc-r0.new-0ddba11a"]
        )
        assert is_live(ns, "aaaaaaaaaaaa-r0")
    finally:
        os.close(fd)
        live.release()


def test_a_lease_whose_private_name_a_sweep_removed_first_is_taken_under_a_new_one(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    ns = str(tmp_path)
    real_flock = fcntl.flock
    swept = []

    def flock(fd: int, op: int) -> None:
        if op == fcntl.LOCK_EX and not swept:
            swept.append(sweep_leases(ns))  # between the private name's creation and its lock
        real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    lease = AttemptLease(ns, "dddddddddddd-r0")
    monkeypatch.undo()
    try:
        assert swept == [1]
        assert os.listdir(os.path.join(ns, LEASE_DIR)) == ["dddddddddddd-r0"]
        assert is_live(ns, "dddddddddddd-r0")
    finally:
        lease.release()
    assert os.listdir(os.path.join(ns, LEASE_DIR)) == []
