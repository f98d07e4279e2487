"""Reads fall through memory → durable on a bad or missing copy; never return wrong bytes."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import stat

import distworkers as w
from fixtures_dist import run_ranks


def _data_file(root: str, step: int, rank: int) -> str:
    (path,) = glob.glob(os.path.join(root, "run-1", f"step_{step}", f"*-r{rank}.data"))
    return path


def _middle_of_largest_blob(data_file: str) -> int:
    """An offset inside the largest blob of a data file, from its rank's manifest."""
    (manifest,) = glob.glob(data_file.replace(".data", ".manifest.json"))
    with open(manifest, "rb") as f:
        entry = json.loads(f.read())["files"][os.path.basename(data_file)]
    blobs = [
        (b["offset"], b["length"]) if isinstance(b, dict) else tuple(b[:2]) for b in entry["blobs"]
    ]
    offset, length = max(blobs, key=lambda b: b[1])
    return offset + length // 2


def test_a_corrupt_memory_copy_is_read_from_durable_and_corrupt_everywhere_raises_typed(
    config_factory, memory_root, durable_dir
):
    cfg = config_factory()
    saved = run_ranks(w.w_save_plain, 2, cfg, [1], True)
    mem_file = _data_file(memory_root, 1, 0)
    dur_file = _data_file(durable_dir, 1, 0)
    offset = _middle_of_largest_blob(mem_file)
    w.flip_byte(mem_file, offset)

    results = run_ranks(w.w_load_plain_then_break_durable, 2, cfg, dur_file, offset)

    name = os.path.basename(mem_file)
    for rank, res in enumerate(results):
        first = res["first"]
        assert first["load"]["step"] == 1
        assert first["loaded"] == saved[rank][1], "the fallback load is not bit-exact"
        # Every rank loads every replicated value, so each one met the bad blob (read from
        # durable) and good ones (read from memory).
        assert first["load"]["bytes"]["durable"] > 0
        assert first["load"]["bytes"]["memory"] > 0
        warnings = [msg for level, msg in first["logs"] if level == "WARNING"]
        assert warnings, "reading from the durable tier after a bad memory copy was not logged"

        errors = res["second"]["errors"]
        typed = [
            e
            for e in errors
            if "IntegrityError" in e["types"] or "CheckpointNotFoundError" in e["types"]
        ]
        assert typed, errors
        for e in typed:
            assert re.search(r"step[ _]?1\b", e["message"], re.IGNORECASE), e["message"]
            assert name in e["message"], e["message"]


def test_a_wiped_memory_tier_loads_from_durable_and_is_recreated_private_on_save(
    config_factory, memory_root
):
    cfg = config_factory()
    saved = run_ranks(w.w_save_plain, 2, cfg, [1], True)
    shutil.rmtree(memory_root)  # a node reboot

    results = run_ranks(w.w_load_plain_then_save, 2, cfg, 2)

    for rank, res in enumerate(results):
        assert res["load"]["step"] == 1
        assert res["loaded"] == saved[rank][1]
        assert res["load"]["bytes"]["memory"] == 0
        assert res["load"]["bytes"]["durable"] > 0
    assert stat.S_IMODE(os.stat(memory_root).st_mode) == 0o700
    assert w.committed_steps(memory_root, "run-1") == [2]
