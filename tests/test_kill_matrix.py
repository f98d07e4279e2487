"""The kill -9 matrix: a job SIGKILLed at any crash point of save, commit, drain or resume.

Every case runs a real 2-rank gloo job that saves steps 1..5 (durable every 2nd) and dies at
one named crash point (``TIERCKPT_CRASH_AT``; the other rank is SIGKILLed with it). Then:

- the last committed save is predicted from the point's semantics and read from the COMMIT
  records on disk, and the two agree;
- a restart (``step=None``) loads exactly that save, bit-exact, saves one more (durable) step
  and waits for its drains; for resume points that restart is killed too, inside the resume,
  and a second restart completes;
- debris is gone: staging files, leases and ``.filling-`` spares of the dead processes,
  uncommitted step directories, files of attempts no COMMIT names, ``.tmp-`` files;
- every step meant to be durable whose memory commit happened is committed in the durable
  tier with all its files, and loads bit-exact from the durable tier alone.

A rank's part upload starts in write_data(), before the memory COMMIT, so a crash in it
(``RACING_COMMIT``) may land before or after that COMMIT: either step is accepted as the
last committed save, and the files say which one it was. Rank processes are forked from a
forkserver that has imported torch already (``fixtures_dist.PreloadedStarts``), so the ~60
jobs of the matrix cost seconds of start-up, not minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import workers_kill as wk
from fixtures_dist import SHM, RankOutcome, launch_ranks

NS = "run-1"
LAST_STEP = 5
RANKS = [0, 1]

BEFORE_COMMIT = {
    "save.after_stage",
    "save.before_rename",
    "save.after_rename",
    "save.after_manifest",
    "save.before_metadata",
    "save.after_metadata",
}
"""Points a save reaches before its memory COMMIT is written: step k-1 stays the newest."""
AFTER_COMMIT = {
    "save.after_commit",
    "evict.mid",  # the first eviction runs in the coordinator's finish(), after the COMMIT
    "drain.before_durable_metadata",
    "drain.after_durable_metadata",
    "drain.after_durable_commit",
}
"""Points reached only once the memory COMMIT of step k is written: step k is the newest."""
RACING_COMMIT = {"drain.after_data", "drain.after_manifest", "tier.before_put_rename"}
"""A rank's part upload starts in write_data(), so its crash races the memory COMMIT of k."""


@dataclass(frozen=True)
class Case:
    point: str
    rank: int
    step: int
    """The step whose save (or drain) reaches the point at the armed hit."""
    nth: int = 1
    mode: str = "sync"
    restart_crash: str | None = None
    """A crash point armed in the first restart (inside its resume); a second one completes."""

    @property
    def spec(self) -> str:
        return f"{self.point}@{self.rank}#{self.nth}"

    def committed(self) -> set[int]:
        """The last committed save by the point's semantics."""
        if self.point in BEFORE_COMMIT:
            return {self.step - 1}
        if self.point in AFTER_COMMIT:
            return {self.step}
        assert self.point in RACING_COMMIT, self.point
        return {self.step - 1, self.step}

    @property
    def id(self) -> str:
        rc = f"-then-{self.restart_crash}" if self.restart_crash else ""
        return f"{self.spec}-{self.mode}{rc}"


def _pending_drain(restart_crash: str) -> Case:
    """Rank 0 killed once every part of durable step 4 is uploaded, before the durable
    metadata and COMMIT: the memory COMMIT of 4 is written and rank 0's part has no
    .drained marker, so the restart's resume finds the part complete in durable, marks it,
    copies the metadata and writes the durable commit. The restart is killed inside that
    resume at ``restart_crash``."""
    return Case("drain.before_durable_metadata", 0, step=4, nth=2, restart_crash=restart_crash)


CASES = [
    # save: staging, data rename, manifest, metadata, commit (sync and async paths)
    Case("save.after_stage", 0, step=4, nth=4, mode="async"),
    Case("save.after_stage", 1, step=3, nth=3, mode="async"),
    Case("save.before_rename", 0, step=4, nth=4),
    Case("save.before_rename", 1, step=4, nth=4, mode="async"),
    Case("save.after_rename", 0, step=3, nth=3, mode="async"),
    Case("save.after_rename", 1, step=4, nth=4),
    Case("save.after_manifest", 0, step=4, nth=4),
    Case("save.after_manifest", 1, step=4, nth=4, mode="async"),
    Case("save.before_metadata", 0, step=4, nth=4),
    Case("save.after_metadata", 0, step=4, nth=4),
    Case("save.after_metadata", 0, step=3, nth=3, mode="async"),
    Case("save.after_commit", 0, step=4, nth=4),
    Case("save.after_commit", 0, step=3, nth=3, mode="async"),
    Case("evict.mid", 0, step=4, nth=1),
    # drain: part uploads (both ranks), durable metadata and commit (coordinator)
    Case("drain.after_data", 0, step=4, nth=2),
    Case("drain.after_data", 1, step=4, nth=2),
    Case("drain.after_manifest", 0, step=4, nth=2),
    Case("drain.after_manifest", 1, step=2, nth=1, mode="async"),
    Case("tier.before_put_rename", 1, step=4, nth=2),
    Case("drain.before_durable_metadata", 0, step=4, nth=2),
    Case("drain.after_durable_metadata", 0, step=4, nth=2),
    Case("drain.after_durable_commit", 0, step=4, nth=2),
    Case("drain.after_durable_commit", 0, step=2, nth=1, mode="async"),
    # resume: the restart is killed inside its resume of the interrupted drain of step 4
    _pending_drain("resume.after_upload@0"),
    # rank 1 died between its data and its manifest: its part is surely pending (after a
    # crash of rank 0 alone, rank 1's small upload may already have finished)
    Case("drain.after_data", 1, step=4, nth=2, restart_crash="resume.after_upload@1"),
    # every part is complete in durable, so the resume's first file copy is the metadata
    _pending_drain("tier.before_put_rename@0#1"),
    # rank 0 died between its data and its manifest: the resume re-uploads its data file first
    Case("drain.after_data", 0, step=4, nth=2, restart_crash="tier.before_put_rename@0#1"),
    _pending_drain("drain.after_durable_metadata@0"),
    # rank 1 died mid-upload of its part (so its part is surely pending; a crash of rank 0
    # after its commit raced rank 1's small upload to completion): it dies again resuming it
    Case("tier.before_put_rename", 1, step=4, nth=2, restart_crash="resume.after_upload@1"),
]


# --------------------------------------------------------------------------- files


def _walk(root: str) -> set[str]:
    """Relative paths of every file under ``root``."""
    out = set()
    for dirpath, _, files in os.walk(root):
        for f in files:
            out.add(os.path.relpath(os.path.join(dirpath, f), root))
    return out


def _step_dirs(root: str) -> dict[int, set[str]]:
    base = os.path.join(root, NS)
    out: dict[int, set[str]] = {}
    if os.path.isdir(base):
        for name in os.listdir(base):
            if name.startswith("step_") and name[5:].isdigit():
                out[int(name[5:])] = set(os.listdir(os.path.join(base, name)))
    return out


def _commits(root: str) -> dict[int, dict]:
    """step -> COMMIT record (JSON) of every committed step in a tier root."""
    out = {}
    for step, files in _step_dirs(root).items():
        if "COMMIT" in files:
            with open(os.path.join(root, NS, f"step_{step}", "COMMIT"), "rb") as f:
                out[step] = json.loads(f.read())
    return out


def _attempts(record: dict) -> set[str]:
    return {record["attempt"]} | {r["attempt"] for r in record["ranks"]}


def _needed(record: dict) -> dict[str, int]:
    """File -> size (-1: any) of every file the record names."""
    out = {record["metadata"]: -1}
    for r in record["ranks"]:
        out[r["manifest"]] = -1
        out.update(r["files"])
    return out


def _dead_debris(memory_root: str) -> set[str]:
    """Files of the processes just killed that only a later run can clean up."""
    ns = os.path.join(memory_root, NS)
    found = set()
    for path in _walk(ns):
        top, _, name = path.partition("/")
        if top in (".staging", ".leases") or (top == ".pool" and name.startswith(".filling-")):
            found.add(path)
    return found


# --------------------------------------------------------------------------- assertions


def _describe(outcomes: list[RankOutcome]) -> str:
    return "\n".join(
        f"rank {o.rank}: exit {o.exitcode}, result {o.result!r}, timeout {o.killed_at_timeout}"
        f"\n{o.error or ''}{o.stacks[-3000:]}"
        for o in outcomes
    )


def _job(fn: Any, cfg: Any, marks: str, *args: Any) -> list[RankOutcome]:
    shutil.rmtree(marks, ignore_errors=True)
    os.makedirs(marks)
    return launch_ranks(fn, 2, cfg, marks, *args, timeout=90)


def _assert_killed_at(outcomes: list[RankOutcome], marks: str, spec: str) -> None:
    """The armed rank died by SIGKILL at the point; the job died with it (nothing finished)."""
    rank = int(spec.partition("@")[2].partition("#")[0])
    assert not any(o.ok for o in outcomes), f"{spec} was never reached:\n{_describe(outcomes)}"
    crashed = outcomes[rank]
    assert crashed.exitcode == -signal.SIGKILL and crashed.error is None, _describe(outcomes)
    followed = os.path.exists(os.path.join(marks, f"rank{rank}.followed"))
    assert not followed, f"rank {rank} died with the job, not at {spec}:\n{_describe(outcomes)}"
    assert not any(o.killed_at_timeout for o in outcomes), _describe(outcomes)


def _debris(memory_root: str, durable_dir: str, dead: set[str]) -> list[str]:
    """What a completed restart should have cleaned up but did not (empty when clean)."""
    problems = []
    left = dead & _dead_debris(memory_root)
    if left:
        problems.append(
            f"staging files / leases / spares of killed processes remain: {sorted(left)}"
        )
    for tier, root in (("memory", memory_root), ("durable", durable_dir)):
        tmp = sorted(p for p in _walk(root) if ".tmp-" in os.path.basename(p))
        if tmp:
            problems.append(f"temporary files remain in the {tier} tier: {tmp}")
        commits = _commits(root)
        for step, files in sorted(_step_dirs(root).items()):
            if step not in commits:
                problems.append(
                    f"uncommitted step directory step_{step} remains in the {tier} tier: "
                    f"{sorted(files)}"
                )
                continue
            lacking = sorted(n for n in _needed(commits[step]) if n not in files)
            if lacking:
                problems.append(
                    f"committed step {step} of the {tier} tier lacks files its COMMIT names: "
                    f"{lacking}"
                )
            live = _attempts(commits[step])
            stray = sorted(f for f in files if f != "COMMIT" and _attempt_of(f) not in live)
            if stray:
                problems.append(
                    f"files of attempts no COMMIT names remain in committed step {step} of the "
                    f"{tier} tier: {stray} (COMMIT names {sorted(live)})"
                )
    return problems


def _attempt_of(name: str) -> str:
    return name.split("-", 1)[0].split(".", 1)[0]


def _durable_gaps(durable_dir: str, steps: list[int], memory_commits: dict[int, dict]) -> list[str]:
    """Steps not committed in durable with every file they name, as memory committed them."""
    problems = []
    commits = _commits(durable_dir)
    for step in steps:
        if step not in commits:
            problems.append(
                f"durable step {step} was committed in memory but never in the durable tier "
                f"(durable commits: {sorted(commits)})"
            )
            continue
        record = commits[step]
        if step in memory_commits and record["attempt"] != memory_commits[step]["attempt"]:
            problems.append(
                f"durable step {step} commits attempt {record['attempt']}, memory committed "
                f"{memory_commits[step]['attempt']}"
            )
        folder = os.path.join(durable_dir, NS, f"step_{step}")
        have = {name: os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder)}
        for name, size in _needed(record).items():
            if name not in have:
                problems.append(f"durable step {step} lacks {name}: has {sorted(have)}")
            elif size >= 0 and have[name] != size:
                problems.append(f"durable step {step}: {name} has {have[name]} bytes, not {size}")
    return problems


# --------------------------------------------------------------------------- the matrix


@pytest.fixture
def wiped_root() -> Iterator[str]:
    """An empty memory root: the node's memory tier lost."""
    path = os.path.join(SHM, f"tierckpt-test-{uuid.uuid4().hex}")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kill_9_anywhere_leaves_the_last_committed_save_loadable_bit_exact_and_debris_cleaned(
    case, config_factory, memory_root, durable_dir, wiped_root, tmp_path
):
    cfg = config_factory(durable_commit_timeout_s=30.0)
    marks = str(tmp_path / "marks")

    # Phase 1: the job dies at the point.
    outcomes = _job(wk.w_train_until_killed, cfg, marks, case.spec, case.mode, LAST_STEP)
    _assert_killed_at(outcomes, marks, case.spec)
    memory_commits = _commits(memory_root)
    on_disk = max(memory_commits, default=None)
    assert on_disk in case.committed(), (
        f"the newest memory COMMIT is step {on_disk}; the semantics of {case.spec} "
        f"(step {case.step}) say {sorted(case.committed())}"
    )
    assert on_disk is not None
    dead = _dead_debris(memory_root)
    next_step = on_disk + 1

    # A restart killed inside its resume commits nothing new.
    if case.restart_crash:
        outcomes = _job(wk.w_restart, cfg, marks, case.restart_crash, next_step)
        _assert_killed_at(outcomes, marks, case.restart_crash)
        assert max(_commits(memory_root)) == on_disk
        dead |= _dead_debris(memory_root)

    # The restart that completes: loads exactly the last committed save, bit-exact.
    outcomes = _job(wk.w_restart, cfg, marks, None, next_step)
    assert all(o.ok for o in outcomes), _describe(outcomes)
    results = [o.result for o in outcomes]
    for res in results:
        assert res["step"] == on_disk, res["step"]
        assert res["loaded"] == res["expected"], f"step {on_disk} did not load bit-exact"
        assert res["drains_done"]

    problems = _debris(memory_root, durable_dir, dead)
    durable_steps = [s for s in range(1, on_disk + 1) if wk.is_durable(s)] + [next_step]
    problems += _durable_gaps(durable_dir, durable_steps, memory_commits)

    # The durable tier alone (memory lost) restores every durable step, bit-exact.
    alone = config_factory(memory_root=wiped_root, durable_commit_timeout_s=30.0)
    for step in [None, *durable_steps]:
        want = next_step if step is None else step
        got = wk.try_load_alone(alone, step, RANKS)
        if "error" in got:
            problems.append(f"durable alone, step={step}: {got['error']}")
        elif got["step"] != want or got["bytes"]["memory"]:
            problems.append(
                f"durable alone, step={step}: loaded step {got['step']}, {got['bytes']}"
            )
        elif got["loaded"] != wk.expected_alone(want, RANKS):
            problems.append(f"durable alone: step {want} does not load bit-exact")
    assert not problems, f"last committed save: step {on_disk}\n" + "\n".join(problems)
