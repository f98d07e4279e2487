"""Reads out of the memory tier (``SharedRead``): the bytes asked for, the xxh3-128 of the
bytes the caller got, :class:`KeyNotFoundError` for a file shorter than asked, and the shared
lock that keeps the staging pool off the file held exactly until the handle is closed.
"""

from __future__ import annotations

import fcntl
import os

import pytest
import torch
import xxhash

from tierckpt.tiers.base import KeyNotFoundError
from tierckpt.tiers.memory import MemoryTier

SIZE = (3 << 20) + 12345  # over a huge page, not a multiple of any chunk


def _tier_with_file(root: str, payload: bytes) -> MemoryTier:
    os.makedirs(root, mode=0o700, exist_ok=True)
    with open(os.path.join(root, "blob"), "wb") as f:
        f.write(payload)
    return MemoryTier(root)


@pytest.fixture
def payload() -> bytes:
    return os.urandom(SIZE)


@pytest.mark.parametrize(
    ("offset", "length", "chunk"),
    [(0, SIZE, 1 << 20), (4097, SIZE - 4097 - 3, 1 << 20), (123, 1000, 256), (SIZE - 1, 1, 64)],
)
def test_a_read_returns_the_bytes_and_the_digest_of_what_was_returned(
    memory_root, payload, offset, length, chunk
):
    tier = _tier_with_file(memory_root, payload)
    with tier.open_shared("blob") as handle:
        buf = bytearray(length)
        digest = handle.read_into(offset, memoryview(buf), chunk)
        again, digest2 = handle.read(offset, length)  # the same handle reads twice
    expected = payload[offset : offset + length]
    assert bytes(buf) == expected and bytes(again) == expected
    assert digest == digest2 == xxhash.xxh3_128(expected).hexdigest()


def test_a_typed_multi_dimensional_target_is_filled_bytewise(memory_root):
    src = torch.randn(64, 33)
    tier = _tier_with_file(memory_root, src.numpy().tobytes())
    out = torch.zeros(64, 33)
    with tier.open_shared("blob") as handle:
        digest = handle.read_into(0, memoryview(out.numpy()))
    assert torch.equal(out, src)
    assert digest == xxhash.xxh3_128(src.numpy().tobytes()).hexdigest()


def test_an_empty_read_and_a_read_past_the_end(memory_root, payload):
    tier = _tier_with_file(memory_root, payload)
    with tier.open_shared("blob") as handle:
        assert handle.read_into(SIZE, memoryview(bytearray(0))) == xxhash.xxh3_128().hexdigest()
        with pytest.raises(KeyNotFoundError, match="shorter than expected"):
            handle.read(SIZE - 10, 11)
        buf, _ = handle.read(0, 10)  # the handle still reads after the refusal
    assert bytes(buf) == payload[:10]


def test_a_handle_holds_the_shared_lock_until_closed(memory_root, payload):
    tier = _tier_with_file(memory_root, payload)
    path = os.path.join(memory_root, "blob")
    handle = tier.open_shared("blob")
    handle.read(0, 100)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(BlockingIOError):  # a reader holds it: the pool cannot claim it
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.close()
        handle.close()  # idempotent
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released
    finally:
        os.close(fd)
