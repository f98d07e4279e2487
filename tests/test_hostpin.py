"""Page-locking staging mappings for GPU copies, the bookkeeping half (no GPU here).

The CUDA runtime is the one thing faked (``_hostpin.register``/``unregister``); the tmpfs
files, their mappings and the mapping cache are real. What is pinned down: a mapping is
registered once however many saves reuse it, it is unregistered before it is unmapped,
a refused registration leaves the buffer unpinned (its copies then synchronous), and a
registered mapping is kept even where it was first made without page tables.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tierckpt import _hostpin, staging
from tierckpt.staging import StagingBuffer, release_deleted_mappings

CAPACITY = 1 << 20


class FakeRuntime:
    """Records cudaHostRegister / cudaHostUnregister calls; refuses when told to."""

    def __init__(self) -> None:
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[str, int]] = []
        self.refuse = False

    def register(self, base: int, nbytes: int) -> bool:
        self.calls.append(("register", base))
        if self.refuse:
            return False
        assert base not in self.registered, "a mapping was registered twice"
        self.registered[base] = nbytes
        return True

    def unregister(self, base: int) -> None:
        self.calls.append(("unregister", base))
        assert self.registered.pop(base, None) is not None, "unregistered what was not"


@pytest.fixture
def runtime(memory_root: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeRuntime]:
    fake = FakeRuntime()
    monkeypatch.setattr(_hostpin, "register", fake.register)
    monkeypatch.setattr(_hostpin, "unregister", fake.unregister)
    try:
        yield fake
    finally:  # unmap this test's files while the fake still answers
        shutil.rmtree(memory_root, ignore_errors=True)
        release_deleted_mappings()
    assert fake.registered == {}, "a registration outlived its mapping"


def _buffer(path: str, **kwargs: bool) -> StagingBuffer:
    """A staging buffer over ``path`` (created empty when missing, as the pool does)."""
    if not os.path.exists(path):
        os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    return StagingBuffer(path, CAPACITY, **kwargs)


def test_a_reused_mapping_is_registered_once(memory_root: str, runtime: FakeRuntime) -> None:
    os.makedirs(memory_root, exist_ok=True)
    path = os.path.join(memory_root, "part")
    first = _buffer(path)
    first.pin()
    first.close()
    second = _buffer(path)  # the next save reuses the file and its mapping
    assert second.kind == "reused mapping"
    second.pin()
    second.close()
    assert [c for c, _ in runtime.calls] == ["register"]
    assert runtime.registered == {first._base: CAPACITY}
    assert second._pinned and second._base == first._base


def test_a_deleted_file_is_unregistered_before_its_mapping_goes(
    memory_root: str, runtime: FakeRuntime
) -> None:
    os.makedirs(memory_root, exist_ok=True)
    path = os.path.join(memory_root, "part")
    buffer = _buffer(path)
    buffer.pin()
    buffer.close()
    os.unlink(path)
    release_deleted_mappings()
    assert runtime.registered == {}
    assert [c for c, _ in runtime.calls] == ["register", "unregister"]
    assert not staging._MAPPINGS.holds(path)


def test_a_refused_registration_leaves_the_buffer_unpinned(
    memory_root: str, runtime: FakeRuntime
) -> None:
    os.makedirs(memory_root, exist_ok=True)
    runtime.refuse = True
    buffer = _buffer(os.path.join(memory_root, "part"))
    buffer.pin()
    assert not buffer._pinned
    buffer.close()
    runtime.refuse = False
    again = _buffer(os.path.join(memory_root, "part"))
    again.pin()  # a later save tries again
    assert again._pinned
    again.close()


def test_a_registered_mapping_made_without_page_tables_is_kept(
    memory_root: str, runtime: FakeRuntime
) -> None:
    os.makedirs(memory_root, exist_ok=True)
    path = os.path.join(memory_root, "part")
    fresh = _buffer(path, unwritten=True)  # new pages: mapped without MAP_POPULATE
    assert fresh.by_syscall
    fresh.pin()  # locking faults every page in
    fresh.close()
    reused = _buffer(path)  # would otherwise be mapped anew (and registered again)
    assert reused.kind == "reused mapping"
    reused.pin()
    reused.close()
    assert [c for c, _ in runtime.calls] == ["register"]
