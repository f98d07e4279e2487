"""Telling whether the memory root's tmpfs has huge pages, and the hint logged when not."""

from __future__ import annotations

import logging

import pytest

from tierckpt import hugepages
from tierckpt.hugepages import TmpfsMount, huge_pages_hint, mount_of

MOUNTS = """\
/dev/root / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,relatime,size=24683568k 0 0
tmpfs /mnt/ckpt tmpfs rw,relatime,size=14680064k,huge=within_size 0 0
tmpfs /mnt/ckpt/inner tmpfs rw,relatime,huge=advise 0 0
tmpfs /mnt/with\\040space tmpfs rw,huge=always 0 0
/dev/sdb1 /data xfs rw 0 0
"""
NEVER = "always within_size advise [never] deny force"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/dev/shm/tierckpt-0", TmpfsMount("/dev/shm", "tmpfs", "never")),
        ("/mnt/ckpt/tierckpt", TmpfsMount("/mnt/ckpt", "tmpfs", "within_size")),
        ("/mnt/ckpt/inner/x", TmpfsMount("/mnt/ckpt/inner", "tmpfs", "advise")),
        ("/mnt/ckptother/x", TmpfsMount("/", "ext4", "never")),
        ("/mnt/with space/r", TmpfsMount("/mnt/with space", "tmpfs", "always")),
        ("/data/ckpt", TmpfsMount("/data", "xfs", "never")),
    ],
)
def test_the_deepest_mount_and_its_huge_option_are_found(path, expected):
    assert mount_of(path, MOUNTS, NEVER) == expected


def test_shmem_enabled_force_or_deny_overrides_every_tmpfs_mount():
    forced = mount_of("/dev/shm/x", MOUNTS, "always within_size advise never deny [force]")
    assert forced == TmpfsMount("/dev/shm", "tmpfs", "always")
    denied = mount_of("/mnt/ckpt/x", MOUNTS, "always within_size advise never [deny] force")
    assert denied == TmpfsMount("/mnt/ckpt", "tmpfs", "never")
    # Not tmpfs: the override does not apply.
    assert mount_of("/data/x", MOUNTS, "[force]") == TmpfsMount("/data", "xfs", "never")


def test_only_a_tmpfs_without_huge_pages_gets_the_hint():
    never = huge_pages_hint("/dev/shm/tierckpt-0", mount_of("/dev/shm/tierckpt-0", MOUNTS, NEVER))
    assert never is not None
    assert "/dev/shm/tierckpt-0" in never and "huge=never" in never
    assert "huge=within_size" in never and "TIERCKPT_MEMORY_ROOT" in never
    assert huge_pages_hint("/mnt/ckpt/r", mount_of("/mnt/ckpt/r", MOUNTS, NEVER)) is None
    # advise needs madvise on a mapping; tierckpt fills files with write(): no huge pages.
    assert huge_pages_hint("/mnt/ckpt/inner/r", mount_of("/mnt/ckpt/inner/r", MOUNTS, NEVER))
    assert huge_pages_hint("/data/ckpt", mount_of("/data/ckpt", MOUNTS, NEVER)) is None
    assert huge_pages_hint("/x", None) is None


def test_this_machine_dev_shm_is_found_as_tmpfs():
    mount = mount_of("/dev/shm/tierckpt-not-made-yet/ns")
    assert mount is not None
    assert mount.fstype == "tmpfs"
    assert mount.mountpoint == "/dev/shm"


def test_the_hint_is_logged_once_per_process_and_root(monkeypatch, caplog):
    monkeypatch.setattr(hugepages, "_hinted", set())
    monkeypatch.setattr(hugepages, "mount_of", lambda root: mount_of(root, MOUNTS, NEVER))
    log = logging.getLogger("tierckpt.test-hugepages")
    with caplog.at_level(logging.DEBUG, logger=log.name):
        for _ in range(3):
            hugepages.log_huge_pages_hint("/dev/shm/a", log)
        hugepages.log_huge_pages_hint("/mnt/ckpt/b", log)  # huge pages: nothing to say
        hugepages.log_huge_pages_hint("/dev/shm/c", log)
    hints = [r.getMessage() for r in caplog.records if "4 KiB pages" in r.getMessage()]
    assert len(hints) == 2
    assert "/dev/shm/a" in hints[0] and "/dev/shm/c" in hints[1]


def _writer_hints(root: str, monkeypatch, caplog) -> list[str]:
    from tierckpt import CheckpointConfig, TieredStorageWriter

    monkeypatch.setattr(hugepages, "_hinted", set())
    cfg = CheckpointConfig(namespace="hp", world_size=1, memory_root=root)
    with caplog.at_level(logging.DEBUG, logger="tierckpt"):
        TieredStorageWriter(cfg, step=1)
    return [r.getMessage() for r in caplog.records if "4 KiB pages" in r.getMessage()]


def test_a_writer_on_dev_shm_hints_exactly_when_it_has_no_huge_pages(
    memory_root, monkeypatch, caplog
):
    expected = huge_pages_hint(memory_root, mount_of(memory_root))
    assert _writer_hints(memory_root, monkeypatch, caplog) == ([expected] if expected else [])


def test_a_huge_page_tmpfs_gets_no_hint_and_saves_and_loads_bit_exact(
    huge_tmpfs, monkeypatch, caplog
):
    import torch
    import torch.distributed.checkpoint as dcp

    from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter

    root = f"{huge_tmpfs}/tierckpt"
    mount = mount_of(root)
    assert mount is not None and mount.huge_pages, mount
    assert _writer_hints(root, monkeypatch, caplog) == []
    cfg = CheckpointConfig(namespace="hp", world_size=1, memory_root=root)
    state = {"w": torch.randn(1024, 1024), "b": torch.arange(10)}  # 4 MiB: huge pages
    dcp.save(state, storage_writer=TieredStorageWriter(cfg, step=1))
    target = {"w": torch.zeros(1024, 1024), "b": torch.zeros(10, dtype=torch.int64)}
    reader = TieredStorageReader(cfg)
    dcp.load(target, storage_reader=reader)
    assert reader.step == 1
    assert all(torch.equal(state[k], target[k]) for k in state)
