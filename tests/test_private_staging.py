"""A part staged wholly in private memory and written into a buffer claimed earlier.

This is how a GPU save stages while its memory-tier buffer is not page-locked yet (a new
buffer): every tensor goes to a reused pinned buffer, and the write copies them into the
claimed buffer. CI has no GPU, so the CPU half of that path is what is pinned down here,
on a real tmpfs: the bytes and checksums land in the claimed buffer's region, which is
not grown (no second allocation of the state's size), and an item that does not fit is
still stored past it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from typing import Any

import torch
import xxhash

from tierckpt import layout
from tierckpt.dcp._stage import stage_into
from tierckpt.leases import AttemptLease, lease_name
from tierckpt.saving import RankPart, _unstaged_bytes, acquire_buffer, write_rank_part
from tierckpt.staging import PrivateBuffer, align, tensor_bytes
from tierckpt.tiers.memory import MemoryTier, open_memory_tier


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    return {f"t{i}": torch.randn(257 * (i + 1), generator=gen) for i in range(6)}


def _setup(config_factory: Callable[..., Any]) -> tuple[Any, MemoryTier, dict[str, Any], int]:
    """(config, its memory tier, a state, the aligned bytes of the state)."""
    config = config_factory(world_size=1, memory_prefault=False)
    memory = open_memory_tier(config, create=True)
    memory.ensure_root(config.namespace)
    state = _state()
    return config, memory, state, sum(align(tensor_bytes(t)) for t in state.values())


def test_items_that_fit_the_claimed_region_need_no_room_past_it(
    config_factory: Callable[..., Any],
) -> None:
    config, memory, state, need = _setup(config_factory)
    buffer = acquire_buffer(memory, config, layout.new_attempt_id(), 0, need)
    try:
        items: list[Any] = list(state.values())
        assert _unstaged_bytes(items, buffer) == 0
        extra = io.BytesIO(b"x" * (buffer.capacity + 1))  # cannot fit: stored past it
        assert _unstaged_bytes([*items, extra], buffer) == align(buffer.capacity + 1)
    finally:
        buffer.close()


def test_a_privately_staged_part_is_written_into_the_claimed_buffer_in_place(
    config_factory: Callable[..., Any],
) -> None:
    config, memory, state, need = _setup(config_factory)
    attempt = layout.new_attempt_id()
    # The writer's lease on its attempt: without it a sweep takes the buffer for abandoned.
    lease = AttemptLease(memory.path(config.namespace), lease_name(attempt, 0))
    buffer = acquire_buffer(memory, config, attempt, 0, need)
    capacity = buffer.capacity
    private = PrivateBuffer(need)
    staged = stage_into(state, None, private, cuda=False)
    assert all(buffer.offset_of(t) is None for t in staged.values())  # not in the tier yet
    part = RankPart(1, attempt, 0, False, list(staged.values()), buffer, private)
    try:
        written = write_rank_part(memory, config, part)
    finally:
        lease.release()
    path = memory.path(layout.step_key(config.namespace, 1, layout.data_name(attempt, 0)))
    assert os.path.getsize(path) <= capacity  # filled in place, never grown
    with open(path, "rb") as f:
        data = f.read()
    for tensor, blob in zip(state.values(), written.blobs, strict=True):
        raw = tensor.numpy().tobytes()
        assert data[blob.offset : blob.offset + blob.length] == raw
        assert blob.checksum == xxhash.xxh3_128_hexdigest(raw)
