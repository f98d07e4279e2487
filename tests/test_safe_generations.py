"""Newest = newest save (generations), unknown files are never deleted, fallbacks and outages.

Issue 7 defects d01, d02, d07, d08, d12, d13; each test is named after its defect.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import socket
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

import tierckpt
import workers_generations as wg
from distworkers import committed_steps, flip_byte, w_save_plain
from fixtures_dist import launch_ranks, run_ranks
from tierckpt import CheckpointConfig, TieredStorageReader, TieredStorageWriter
from tierckpt.cli import main as cli_main

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def _dead_s3(bucket: str = "tierckpt-unreachable") -> tuple[str, str]:
    """(s3 URL, endpoint) of a loopback port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    return f"s3://{bucket}/ckpt", f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- d01


def test_d01_after_a_rewind_the_new_saves_survive_retention_and_the_next_restart_loads_the_newest_save(
    config_factory: Any,
) -> None:
    cfg = config_factory(memory_keep_last=2, durable_keep_last=1, durable_keep_every=3)
    first = run_ranks(wg.w_rewind_first_run, 2, cfg)[0]
    assert sorted(first["memory"]) == [5, 6] and sorted(first["durable"]) == [3, 6], first

    rewind = run_ranks(wg.w_rewind_and_save, 2, cfg)
    for res in rewind:
        assert res["load"]["step"] == 3 and res["loaded"] == res["expected"]
    new = rewind[0]["attempts"]
    after4, after5 = rewind[0]["after"][4], rewind[0]["after"][5]
    # The new step 4 survives its own commit in memory, and durable_keep_last keeps it.
    assert after4["memory"].get(4) == new[4], after4
    assert after4["durable"].get(4) == new[4], after4
    # The abandoned branch (old 5, 6 saved before the rewind) goes first.
    assert 6 not in after4["durable_dirs"], after4  # deleted commit first, then every file
    assert after5["memory"].get(5) == new[5] and after5["memory"].get(4) == new[4], after5
    assert 6 not in after5["memory"], after5

    for res in run_ranks(wg.w_restart_newest, 2, cfg):
        assert res["load"]["step"] == 5, res["load"]
        assert res["loaded"] == res["new_branch"][5], "loaded the abandoned branch's values"


class _HeldFinish(TieredStorageWriter):
    """A real writer whose commit waits until the test lets it go (a save in progress)."""

    reached: threading.Event
    release: threading.Event

    def finish(self, metadata: Any, results: Any) -> None:
        self.reached.set()
        assert self.release.wait(30)
        super().finish(metadata, results)


def test_d01_an_in_progress_save_of_a_lower_step_is_not_swept_as_half_written(
    memory_root: str, durable_dir: str
) -> None:
    cfg = CheckpointConfig(
        namespace="solo",
        world_size=1,
        memory_root=memory_root,
        durable_base_path="file://" + durable_dir,
    )
    dcp.save({"w": torch.full((256,), 5.0)}, storage_writer=TieredStorageWriter(cfg, step=5))
    held = _HeldFinish(cfg, step=2)
    held.reached, held.release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def rewound_save() -> None:
        try:
            dcp.save({"w": torch.full((256,), 2.0)}, storage_writer=held)
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=rewound_save)
    t.start()
    try:
        assert held.reached.wait(30), errors
        step2 = os.path.join(memory_root, "solo", "step_2")
        before = sorted(os.listdir(step2))
        # Another save commits while step 2 (lower than the newest commit) is in progress.
        dcp.save({"w": torch.full((256,), 6.0)}, storage_writer=TieredStorageWriter(cfg, step=6))
        assert sorted(os.listdir(step2)) == before, "the in-progress save's files were swept"
    finally:
        held.release.set()
        t.join(30)
    assert not errors, errors
    out = {"w": torch.zeros(256)}
    reader = TieredStorageReader(cfg, step=2)
    dcp.load(out, storage_reader=reader)
    assert reader.step == 2 and out["w"].eq(2.0).all()


# --------------------------------------------------------------------------- d02


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append((record.levelname, record.getMessage()))


@pytest.fixture
def records() -> Iterator[tuple[logging.Logger, _Records]]:
    log = logging.getLogger(f"tierckpt-test-d02-{id(object())}")
    log.setLevel(logging.DEBUG)
    log.propagate = False
    handler = _Records()
    log.addHandler(handler)
    yield log, handler
    log.removeHandler(handler)


def _tree(root: str) -> dict[str, list[str]]:
    base = os.path.join(root, "solo")
    return {
        d: sorted(os.listdir(os.path.join(base, d)))
        for d in sorted(os.listdir(base))
        if d.startswith("step_")
    }


def test_d02_retention_leaves_foreign_steps_unreadable_commits_and_unknown_files_in_place_and_reports_them(
    memory_root: str,
    durable_dir: str,
    records: tuple[logging.Logger, _Records],
    capsys: pytest.CaptureFixture[str],
) -> None:
    from torch.distributed.checkpoint import FileSystemWriter

    log, handler = records
    cfg = CheckpointConfig(
        namespace="solo",
        world_size=1,
        memory_root=memory_root,
        durable_base_path="file://" + durable_dir,
        memory_keep_last=1,
        durable_keep_last=1,
        logger=log,
    )
    # A DCP FileSystemWriter checkpoint the user keeps in step_1/ of both tiers.
    for root in (memory_root, durable_dir):
        dcp.save(
            {"w": torch.ones(8)},
            storage_writer=FileSystemWriter(os.path.join(root, "solo", "step_1")),
        )
    foreign = {r: _tree(r)["step_1"] for r in (memory_root, durable_dir)}

    def save(step: int, config: CheckpointConfig = cfg) -> None:
        w = TieredStorageWriter(config, step=step, save_to_durable=True)
        dcp.save({"w": torch.full((64,), float(step))}, storage_writer=w)
        w.durable_done.result(timeout=30)
        assert tierckpt.wait_for_drains(timeout=30)

    setup = dataclasses.replace(cfg, memory_keep_last=3, durable_keep_last=None)
    save(2, setup)
    save(3, setup)
    for root in (memory_root, durable_dir):
        # Step 2's COMMIT is of a newer format; step 3 (retention evicts it) holds a user's file.
        path = os.path.join(root, "solo", "step_2", "COMMIT")
        with open(path) as f:
            record = json.load(f)
        record["format"] = 99
        with open(path, "w") as f:
            json.dump(record, f)
        with open(os.path.join(root, "solo", "step_3", "notes.txt"), "w") as f:
            f.write("mine")
    unreadable = {r: _tree(r)["step_2"] for r in (memory_root, durable_dir)}
    for step in (4, 5, 6):
        save(step)

    for root in (memory_root, durable_dir):
        tree = _tree(root)
        assert tree.get("step_1") == foreign[root], (root, tree)
        assert tree.get("step_2") == unreadable[root], (root, tree)
        assert tree.get("step_3") == ["notes.txt"], (root, tree)  # evicted: ours only
        assert "step_4" not in tree and "COMMIT" in tree["step_6"], (root, tree)
    warned = [m for level, m in handler.lines if level == "WARNING"]
    for step in (1, 2):
        about = [
            m
            for m in warned
            if f"step {step} in the memory tier" in m.lower() and "left in place" in m
        ]
        assert len(about) == 1, (step, warned)  # once per step per process, not every save

    assert (
        cli_main(["ls", "-n", "solo", "--memory-root", memory_root, "--durable", durable_dir]) == 0
    )
    listing = capsys.readouterr().out
    for line in [ln for ln in listing.splitlines() if "step        1" in ln]:
        assert "foreign" in line, listing
    for line in [ln for ln in listing.splitlines() if "step        2" in ln]:
        assert "unreadable commit" in line, listing
    args = ["--memory-root", memory_root, "--durable", durable_dir]
    cli_main(["verify", "-n", "solo", "--step", "1", *args])
    assert "foreign" in capsys.readouterr().out
    assert cli_main(["verify", "-n", "solo", "--step", "2", *args]) == 1
    assert "unreadable commit" in capsys.readouterr().out


# --------------------------------------------------------------------------- d07


def test_d07_a_resaved_step_loads_its_newest_attempt_from_memory_never_the_older_durable_one(
    config_factory: Any,
) -> None:
    # No pooled buffers (no prefault, nothing evicted): every save writes fresh files, so the
    # mtime-based superseded-file sweep (issue 7 d04) cannot race these re-saves.
    cfg = config_factory(memory_prefault=False)
    for res in run_ranks(wg.w_resave_until_older_id, 2, cfg):
        assert res["memory_attempt"] < res["durable_attempt"], res["tries"]
        for name in ("latest", "step5"):
            got = res[name]
            assert got["load"]["step"] == 5
            assert got["loaded"] == res["new"], f"{name}: loaded the older attempt"
            assert got["load"]["bytes"]["durable"] == 0, f"{name}: mixed attempts"


# --------------------------------------------------------------------------- d08


def _corrupt_shard(memory_root: str, namespace: str, step: int, rank: int) -> None:
    (data,) = glob.glob(os.path.join(memory_root, namespace, f"step_{step}", f"*-r{rank}.data"))
    with open(data.replace(".data", ".manifest.json"), "rb") as f:
        blobs = json.loads(f.read())["files"][os.path.basename(data)]["blobs"]
    offset, length = max((b[0], b[1]) for b in blobs if b[1] >= 1024)
    flip_byte(data, offset + length // 2)


def test_d08_a_corrupt_newest_memory_only_step_falls_back_collectively_and_later_restarts_skip_it(
    config_factory: Any, memory_root: str
) -> None:
    cfg = config_factory()
    saved = run_ranks(wg.w_save_sharded, 2, cfg, [1, 2, 3])
    _corrupt_shard(memory_root, "run-1", 3, rank=1)

    for rank, res in enumerate(run_ranks(wg.w_load_with_fallback, 2, cfg)):
        assert "errors" not in res, res
        assert res["step"] == 2, res
        assert res["loaded"] == saved[rank][2], "the fallback load is not bit-exact"
        assert any("skipping step 3" in m.lower() for m in res["warnings"]), res["warnings"]

    # A second restart skips the bad step at once, also through a raw dcp.load.
    for rank, res in enumerate(run_ranks(wg.w_raw_load_twice, 2, cfg)):
        for name in ("first", "second"):
            assert res[name].get("step") == 2, res[name]
            assert res[name]["loaded"] == saved[rank][2]
        assert any("skipping step 3" in m.lower() for m in res["warnings"]), res["warnings"]


def test_d08_a_raw_dcp_load_of_an_unloadable_step_says_it_is_marked_and_the_next_load_falls_back(
    config_factory: Any, memory_root: str
) -> None:
    cfg = config_factory()
    saved = run_ranks(wg.w_save_sharded, 2, cfg, [1, 2])
    _corrupt_shard(memory_root, "run-1", 2, rank=1)

    for rank, res in enumerate(run_ranks(wg.w_raw_load_twice, 2, cfg)):
        errors = res["first"].get("errors")
        assert errors, res["first"]
        text = " ".join(e["message"] for e in errors)
        assert "IntegrityError" in {t for e in errors for t in e["types"]}, errors
        assert "marked" in text and "falls back" in text, text
        assert res["second"].get("step") == 1, res["second"]
        assert res["second"]["loaded"] == saved[rank][1]


# --------------------------------------------------------------------------- d12 / d13


def test_d12_a_complete_memory_step_loads_while_the_durable_tier_is_unreachable(
    config_factory: Any, s3_server: Any
) -> None:
    run_ranks(w_save_plain, 2, config_factory(), [1], False)  # memory only
    url, endpoint = _dead_s3()
    cfg = config_factory(durable_base_path=url, s3_endpoint_url=endpoint, s3_max_retries=1)
    for res in run_ranks(wg.w_load_elapsed, 2, cfg):
        assert "errors" not in res, res
        assert res["load"]["step"] == 1 and res["loaded"] == res["expected"], res
        assert res["load"]["bytes"]["durable"] == 0
        unreachable = [m for m in res["warnings"] if "unreachable" in m]
        assert len(unreachable) == 1, res["warnings"]
        assert res["elapsed"] < 15, res["elapsed"]


def test_d13_one_rank_with_an_unreachable_durable_tier_makes_every_rank_raise_the_same_typed_error_promptly(
    config_factory: Any, memory_root: str, s3_server: Any
) -> None:
    cfg = config_factory()
    run_ranks(wg.w_per_node_save, 2, cfg)
    url, endpoint = _dead_s3()
    unreachable = {"durable_base_path": url, "s3_endpoint_url": endpoint}
    outcomes = launch_ranks(wg.w_rank1_lost_memory_and_durable, 2, cfg, unreachable, timeout=45)
    assert all(o.ok for o in outcomes), [(o.error, o.killed_at_timeout) for o in outcomes]
    results = [o.result for o in outcomes]
    kinds = []
    for res in results:
        assert "errors" in res, res
        (err,) = res["errors"]
        assert "DurableUnavailableError" in err["types"], err
        assert "rank 1" in err["message"] and "tierckpt-unreachable" in err["message"], err
        assert res["elapsed"] < 15, res["elapsed"]
        kinds.append(err["types"][0])
    assert kinds[0] == kinds[1]
    assert committed_steps(os.path.join(memory_root, "node0"), "run-1") == [1]
