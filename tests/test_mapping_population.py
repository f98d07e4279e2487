"""A buffer filled with write() gets its mapping's page tables filled in the background, so
the file's reuse after eviction copies into a populated mapping (no MAP_POPULATE in the save)."""

from __future__ import annotations

import os
import time

import torch

from tierckpt import staging
from tierckpt.staging import StagingBuffer

MIB = 1 << 20


def _rss_kib(address: int) -> int:
    """Resident (page-table mapped) KiB of this process's mapping that starts at ``address``."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            if "-" in line.split()[0] and not line.split()[0].endswith(":"):
                inside = int(line.split("-")[0], 16) == address
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1])
    raise AssertionError(f"no mapping at {address:#x}")


def _written_buffer(root: str, nbytes: int) -> tuple[StagingBuffer, str]:
    os.makedirs(root, mode=0o700)
    path = os.path.join(root, "data")
    buf = StagingBuffer(path, nbytes, fd=os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    assert buf.by_syscall, "a new file is filled with write()"
    buf.place_hashed(torch.arange(nbytes // 4, dtype=torch.int32))
    buf.finish(buf.used)
    buf.close()
    return buf, path


def _key(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino)


def _wait_populated(key: tuple[int, int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while key in staging._MAPPINGS._unpopulated:
        assert time.monotonic() < deadline, "the background population never finished"
        time.sleep(0.01)


def test_a_written_buffer_is_populated_in_the_background_and_reused_as_it_is(memory_root):
    buf, path = _written_buffer(memory_root, 64 * MIB)
    mm = buf._mmap
    assert mm is not None
    address = staging._address(mm)
    assert _rss_kib(address) < 8 * 1024, "write() filled the file, not the mapping"
    buf.populate_mapping_later()
    _wait_populated(_key(path))
    assert _rss_kib(address) >= 64 * 1024
    hits = staging._MAPPINGS.hits
    again = StagingBuffer(path, 64 * MIB)
    assert staging._MAPPINGS.hits == hits + 1 and again.kind == "reused mapping"
    assert again._mmap is mm
    # The bytes are untouched: the population only filled page tables.
    view = again.view(0, torch.int32, (16 * MIB,))
    assert torch.equal(view, torch.arange(16 * MIB, dtype=torch.int32))
    again.close()


def test_a_save_that_wants_the_mapping_first_stops_the_thread_and_populates_the_rest(
    memory_root, monkeypatch
):
    buf, path = _written_buffer(memory_root, 64 * MIB)
    mm = buf._mmap
    assert mm is not None
    monkeypatch.setattr(staging._Warming, "CHUNK", 1 * MIB)  # many chunks: stopped midway
    buf.populate_mapping_later()
    fd = os.open(path, os.O_RDWR)
    try:
        got = staging._MAPPINGS.get(fd, 64 * MIB, populate=True)
    finally:
        os.close(fd)
    assert got is mm, "the mapping is reused, not made anew with MAP_POPULATE"
    assert _key(path) not in staging._MAPPINGS._unpopulated
    assert _rss_kib(staging._address(mm)) >= 64 * 1024


def test_a_file_deleted_while_its_mapping_is_populated_is_unmapped(memory_root, monkeypatch):
    buf, path = _written_buffer(memory_root, 64 * MIB)
    key = _key(path)
    monkeypatch.setattr(staging._Warming, "CHUNK", 1 * MIB)
    buf.populate_mapping_later()
    os.remove(path)
    del buf
    with staging._MAPPINGS._lock:
        staging._MAPPINGS.prune()
    assert key not in staging._MAPPINGS._entries
    assert key not in staging._MAPPINGS._warming
