"""How a step is laid out in both tiers, and that a step without its COMMIT is invisible."""

from __future__ import annotations

import json
import os
import re
import stat

import pytest
import xxhash

import distworkers as w
from fixtures_dist import run_ranks
from tierckpt import layout
from tierckpt.errors import InvalidStepError

ATTEMPT = r"[0-9a-f]{12}"
NAMES = re.compile(rf"^(COMMIT|{ATTEMPT}\.metadata|{ATTEMPT}-r\d+\.(data|manifest\.json|drained))$")

# --------------------------------------------------------------------------- names


def test_step_files_are_named_by_attempt_and_rank():
    a = layout.new_attempt_id()
    assert re.fullmatch(ATTEMPT, a)
    assert layout.step_dir("ns", 5) == "ns/step_5"
    assert layout.data_name(a, 3) == f"{a}-r3.data"
    assert layout.manifest_name(a, 3) == f"{a}-r3.manifest.json"
    assert layout.metadata_name(a) == f"{a}.metadata"
    assert layout.step_key("ns", 5, layout.COMMIT_NAME) == "ns/step_5/COMMIT"
    assert layout.attempt_of(layout.data_name(a, 0)) == a
    assert layout.attempt_of("COMMIT") is None


def test_every_save_attempt_gets_a_fresh_id():
    assert len({layout.new_attempt_id() for _ in range(1000)}) == 1000


def test_step_is_parsed_from_step_dirs_and_paths_only_when_well_formed():
    assert layout.parse_step_dir("step_12") == 12
    assert layout.parse_step_dir("step_x") is None
    assert layout.parse_step_dir("step_1.tmp") is None
    assert layout.step_from_path("ckpt/step_3/model") == 3
    assert layout.step_from_path("step_3") == 3
    assert layout.step_from_path("mystep_3") is None
    assert layout.step_from_path(None) is None


def test_invalid_step_values_are_rejected():
    assert layout.parse_step(0) == 0
    for bad in (-1, "3", 2.0, None, False):
        with pytest.raises(InvalidStepError, match="Invalid step value"):
            layout.parse_step(bad)


# --------------------------------------------------------------------------- on disk


def _blobs(entry):
    """(offset, length, checksum) of every blob listed for one file of a manifest."""
    for b in entry["blobs"]:
        if isinstance(b, dict):
            yield b["offset"], b["length"], b["checksum"]
        else:
            offset, length, digest = b
            yield offset, length, digest


def _check_step_dir(path, step, world_size, durable):
    files = sorted(os.listdir(path))
    assert all(NAMES.match(f) for f in files), files
    assert "COMMIT" in files
    with open(os.path.join(path, "COMMIT"), "rb") as f:
        commit = json.loads(f.read())
    assert commit["step"] == step
    assert re.fullmatch(ATTEMPT, commit["attempt"])
    assert commit["world_size"] == world_size
    assert commit["durable"] is durable
    assert commit["metadata"] in files and commit["metadata"].endswith(".metadata")
    assert sorted(r["rank"] for r in commit["ranks"]) == list(range(world_size))

    # The COMMIT is written last: nothing the step needs is newer than it.
    commit_mtime = os.stat(os.path.join(path, "COMMIT")).st_mtime_ns
    needed = [f for f in files if not f.endswith(".drained")]
    assert all(os.stat(os.path.join(path, f)).st_mtime_ns <= commit_mtime for f in needed)

    checked_blobs = 0
    for r in commit["ranks"]:
        assert r["manifest"] in files
        with open(os.path.join(path, r["manifest"]), "rb") as f:
            manifest = json.loads(f.read())
        assert manifest["rank"] == r["rank"]
        assert manifest["attempt"] == r["attempt"]
        assert manifest["step"] == step
        assert manifest["files"], f"rank {r['rank']} of a sharded state wrote no data file"
        for name, entry in manifest["files"].items():
            assert name == f"{r['attempt']}-r{r['rank']}.data"
            with open(os.path.join(path, name), "rb") as f:
                data = f.read()
            assert entry["size"] == len(data)
            end = 0
            for offset, length, digest in sorted(_blobs(entry)):
                # Blobs lie inside the file and do not overlap (padding between is allowed).
                assert end <= offset and offset + length <= len(data)
                end = offset + length
                assert re.fullmatch(r"[0-9a-f]{32}", digest)
                assert xxhash.xxh3_128_hexdigest(data[offset : offset + length]) == digest
                checked_blobs += 1
    assert checked_blobs > 0
    return commit


def test_a_saved_step_is_laid_out_with_checksummed_manifests_and_a_commit_in_both_tiers(
    config_factory, memory_root, durable_dir
):
    cfg = config_factory()
    run_ranks(w.w_save_two_sharded_steps, 2, cfg)

    assert stat.S_IMODE(os.stat(memory_root).st_mode) == 0o700
    for root in (memory_root, durable_dir):
        entries = os.listdir(os.path.join(root, "run-1"))
        # Hidden entries (e.g. a staging buffer pool) may sit beside the steps.
        assert sorted(e for e in entries if not e.startswith(".")) == ["step_1", "step_2"]
        for step in (1, 2):
            _check_step_dir(os.path.join(root, "run-1", f"step_{step}"), step, 2, durable=True)


def test_a_step_without_its_commit_is_invisible_to_readers(
    config_factory, memory_root, durable_dir
):
    cfg = config_factory()
    saved = run_ranks(w.w_save_two_sharded_steps, 2, cfg)
    for root in (memory_root, durable_dir):
        os.remove(os.path.join(root, "run-1", "step_2", "COMMIT"))

    results = run_ranks(w.w_load_then_lose_all_commits, 2, cfg)

    for rank, res in enumerate(results):
        assert res["load"]["step"] == 1
        assert res["loaded"] == saved[rank][1]
        errors = res["after"]["errors"]
        assert any("CheckpointNotFoundError" in e["types"] for e in errors), errors
