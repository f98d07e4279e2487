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


@pytest.mark.parametrize("slot_bytes", [4096, 1 << 20, 8 << 20])
def test_a_read_through_a_slot_ring_delivers_the_bytes_and_their_digest(
    memory_root, payload, slot_bytes
):
    """The GPU load path (pinned slots) on CPU: slot boundaries inside blobs, any offset."""
    from tierckpt._device_copy import PinnedRing

    tier = _tier_with_file(memory_root, payload)
    ring = PinnedRing(torch.device("cpu"), slot_bytes=slot_bytes, slots=3)
    offset, length = 4097, SIZE - 4097 - 5
    target = torch.zeros(length, dtype=torch.uint8)
    with tier.open_shared("blob") as handle:
        digest = handle.read_to_device(offset, target, ring, chunk=3000)
    ring.finish()
    assert bytes(target.numpy()) == payload[offset : offset + length]
    assert digest == xxhash.xxh3_128_hexdigest(payload[offset : offset + length])


def test_readers_sharing_a_slot_ring_each_get_their_own_bytes(memory_root, payload):
    from concurrent.futures import ThreadPoolExecutor

    from tierckpt._device_copy import PinnedRing

    tier = _tier_with_file(memory_root, payload)
    ring = PinnedRing(torch.device("cpu"), slot_bytes=64 << 10, slots=2)
    pieces = [(i * (SIZE // 4), SIZE // 4) for i in range(4)]
    targets = [torch.zeros(n, dtype=torch.uint8) for _, n in pieces]

    def read(i: int) -> str:
        with tier.open_shared("blob") as handle:
            return handle.read_to_device(pieces[i][0], targets[i], ring)

    with ThreadPoolExecutor(4) as pool:
        digests = list(pool.map(read, range(4)))
    ring.finish()
    for (off, n), target, digest in zip(pieces, targets, digests, strict=True):
        assert bytes(target.numpy()) == payload[off : off + n]
        assert digest == xxhash.xxh3_128_hexdigest(payload[off : off + n])


def test_a_short_file_read_through_a_slot_ring_raises(memory_root, payload):
    from tierckpt._device_copy import PinnedRing

    tier = _tier_with_file(memory_root, payload)
    ring = PinnedRing(torch.device("cpu"), slot_bytes=1 << 20)
    target = torch.zeros(1 << 20, dtype=torch.uint8)
    with tier.open_shared("blob") as handle, pytest.raises(KeyNotFoundError):
        handle.read_to_device(SIZE - 100, target, ring)
