"""Node memory has a life cycle (issue 12 item 2), and verify / durable-default fixes (item 6).

Real processes on a real tmpfs: finished jobs are rank processes that saved and exited,
a live job is a child process that keeps its writer's owner lease until told to stop.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import distworkers as w
import workers_node_memory as nm
from fixtures_dist import run_ranks
from tierckpt import CheckpointConfig, ConfigError
from tierckpt.cleanup import live_attempts
from tierckpt.leases import LEASE_DIR, sweep_leases
from tierckpt.tiers.durable import open_durable_tier
from tierckpt.tiers.memory import MemoryTier


def _cfg(memory_root: str, durable_dir: str, ns: str, **kw: Any) -> CheckpointConfig:
    kw.setdefault("memory_prefault", False)  # no spare buffer: usage is what the save wrote
    return CheckpointConfig(
        namespace=ns,
        world_size=1,
        memory_root=memory_root,
        durable_base_path="file://" + durable_dir,
        **kw,
    )


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierckpt", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _ns_bytes(root: str, ns: str) -> int:
    return sum(MemoryTier(root).list(ns).values())


def _backdate(root: str, ns: str, seconds: float) -> None:
    """Make everything in a namespace look untouched for ``seconds``."""
    when = time.time() - seconds
    top = os.path.join(root, ns)
    for dirpath, dirs, files in os.walk(top):
        for name in [*dirs, *files]:
            os.utime(os.path.join(dirpath, name), (when, when), follow_symlinks=False)
    os.utime(top, (when, when))


@contextlib.contextmanager
def _live_job(cfg: CheckpointConfig, tmp_path: Path) -> Iterator[int]:
    """A child process that saved step 1 of ``cfg`` and stays alive; yields its pid."""
    ready, stop = str(tmp_path / f"ready-{cfg.namespace}"), str(tmp_path / f"stop-{cfg.namespace}")
    p = mp.get_context("spawn").Process(target=nm.hold, args=(cfg, ready, stop))
    p.start()
    try:
        assert w.wait_for(lambda: os.path.exists(ready) or not p.is_alive(), 60)
        assert os.path.exists(ready), f"the live job died (exit {p.exitcode})"
        assert p.pid is not None
        yield p.pid
    finally:
        Path(stop).touch()
        p.join(30)
        if p.is_alive():
            p.kill()
            p.join(10)


def _line(out: str, ns: str) -> str:
    lines = [ln for ln in out.splitlines() if ln.split()[:1] == [ns]]
    assert len(lines) == 1, out
    return lines[0]


# --------------------------------------------------------------------------- item 2


def test_i2_a_dead_jobs_leftover_whose_ttl_passed_does_not_fail_a_new_jobs_first_save(
    memory_root: str, durable_dir: str
) -> None:
    old = _cfg(memory_root, durable_dir, "old-job", memory_ttl="30m")
    run_ranks(nm.w_save_and_exit, 1, old, 5)
    leftover = _ns_bytes(memory_root, "old-job")
    assert leftover > 300_000
    assert os.path.exists(os.path.join(memory_root, "old-job", ".ttl"))
    _backdate(memory_root, "old-job", 3600)  # the old job finished an hour ago

    # Room for one job's save, not for both: only releasing the leftover lets it fit.
    new = _cfg(memory_root, durable_dir, "new-job", memory_budget=int(leftover * 1.5))
    res = run_ranks(nm.w_first_save, 1, new)[0]

    assert res["errors"] is None, res["errors"]
    assert res["load"]["step"] == 1 and res["same"]
    assert not os.path.exists(os.path.join(memory_root, "old-job"))


def test_i2_a_leftover_within_its_ttl_is_kept_and_the_budget_error_names_it_and_the_fix(
    memory_root: str, durable_dir: str
) -> None:
    old = _cfg(memory_root, durable_dir, "old-job", memory_ttl="2h")
    run_ranks(nm.w_save_and_exit, 1, old, 5)
    leftover = _ns_bytes(memory_root, "old-job")
    _backdate(memory_root, "old-job", 600)  # finished 10 minutes ago: within its TTL

    new = _cfg(memory_root, durable_dir, "new-job", memory_budget=int(leftover * 1.5))
    res = run_ranks(nm.w_first_save, 1, new)[0]

    assert res["errors"], "the save fit although the leftover fills the budget"
    err = res["errors"][0]
    assert "MemoryBudgetError" in err["types"], res["errors"]
    message = err["message"]
    assert "old-job" in message and "no live owner" in message, message
    assert "tierckpt clear-memory --older-than" in message and "-n NS" in message, message
    assert "every namespace under" in message, message
    assert os.path.isdir(os.path.join(memory_root, "old-job", "step_5"))


def test_i2_ls_all_shows_every_namespace_with_a_live_owner_and_a_dead_one(
    memory_root: str, durable_dir: str, tmp_path: Path
) -> None:
    run_ranks(nm.w_save_and_exit, 1, _cfg(memory_root, durable_dir, "done-job"), 7)
    with _live_job(_cfg(memory_root, durable_dir, "running-job"), tmp_path) as pid:
        out = _cli("ls", "--all", "--memory-root", memory_root)

    assert out.returncode == 0, out.stderr
    done, running = _line(out.stdout, "done-job"), _line(out.stdout, "running-job")
    assert "no live owner" in done and "step 7 gen" in done, out.stdout
    assert f"live (pid {pid})" in running and "step 1 gen" in running, out.stdout
    assert "KiB" in done or "MiB" in done, out.stdout
    assert "NAMESPACE" in out.stdout.splitlines()[1]


def test_i2_clear_memory_older_than_removes_dead_old_namespaces_and_never_a_live_one(
    memory_root: str, durable_dir: str, tmp_path: Path
) -> None:
    run_ranks(nm.w_save_and_exit, 1, _cfg(memory_root, durable_dir, "dead-old"), 1)
    run_ranks(nm.w_save_and_exit, 1, _cfg(memory_root, durable_dir, "dead-recent"), 1)
    _backdate(memory_root, "dead-old", 3 * 3600)
    live = _cfg(memory_root, durable_dir, "alive")
    with _live_job(live, tmp_path) as pid:
        _backdate(memory_root, "alive", 3 * 3600)  # idle for hours, but its job still runs

        out = _cli("clear-memory", "--older-than", "2h", "--memory-root", memory_root)
        assert out.returncode == 0, out.stderr
        left = {n for n in os.listdir(memory_root) if not n.startswith(".")}
        assert left == {"alive", "dead-recent"}, left
        assert "removed" in out.stdout and "dead-old" in out.stdout, out.stdout

        for args in (["--older-than", "1m"], []):
            refused = _cli("clear-memory", "-n", "alive", *args, "--memory-root", memory_root)
            assert refused.returncode == 1, (args, refused.stdout, refused.stderr)
            assert "alive" in refused.stderr and f"pid {pid}" in refused.stderr, refused.stderr
        assert os.path.isdir(os.path.join(memory_root, "alive", "step_1"))

    # Once its job is gone, the namespace may be cleared by name.
    out = _cli("clear-memory", "-n", "alive", "--memory-root", memory_root)
    assert out.returncode == 0, out.stderr
    assert not os.path.exists(os.path.join(memory_root, "alive"))
    assert os.path.isdir(os.path.join(memory_root, "dead-recent", "step_1"))


def test_i2_owner_leases_name_no_attempt_and_sweeps_keep_live_ones_and_drop_dead_ones(
    memory_root: str, durable_dir: str
) -> None:
    run_ranks(nm.w_save_and_exit, 1, _cfg(memory_root, durable_dir, "dead"), 1)
    dead_dir = os.path.join(memory_root, "dead")
    assert any(n.startswith("owner-") for n in os.listdir(os.path.join(dead_dir, LEASE_DIR)))
    sweep_leases(dead_dir)
    assert not any(n.startswith("owner-") for n in os.listdir(os.path.join(dead_dir, LEASE_DIR)))

    cfg = _cfg(memory_root, durable_dir, "mine")
    w.save(cfg, w.plain_state(1), 1)  # this process now owns "mine"
    ns_dir = os.path.join(memory_root, "mine")
    owners = [n for n in os.listdir(os.path.join(ns_dir, LEASE_DIR)) if n.startswith("owner-")]
    assert len(owners) == 1 and owners[0].startswith(f"owner-{os.getpid()}-"), owners
    w.save(cfg, w.plain_state(2), 2)  # taken once per process, not once per writer
    assert [n for n in os.listdir(os.path.join(ns_dir, LEASE_DIR)) if n.startswith("owner-")] == (
        owners
    )
    sweep_leases(ns_dir)
    assert owners[0] in os.listdir(os.path.join(ns_dir, LEASE_DIR))
    assert all(not a.startswith("owner") for a in live_attempts(MemoryTier(memory_root), "mine"))


@pytest.mark.parametrize("bad", ["abc", -1, True, "2 weeks", "h"])
def test_i2_memory_ttl_is_validated_with_a_typed_error(bad: Any) -> None:
    with pytest.raises(ConfigError, match="memory_ttl"):
        CheckpointConfig(namespace="x", world_size=1, memory_root="/dev/shm/unused", memory_ttl=bad)


def test_i2_memory_ttl_accepts_seconds_and_durations() -> None:
    def ttl(v: Any) -> float | None:
        return CheckpointConfig(
            namespace="x", world_size=1, memory_root="/dev/shm/unused", memory_ttl=v
        ).memory_ttl_s

    assert ttl(None) is None
    assert ttl(90) == 90.0
    assert ttl("30m") == 1800.0 and ttl("2h") == 7200.0 and ttl("7d") == 7 * 86400.0


# --------------------------------------------------------------------------- item 6


def test_i6_verify_of_a_step_that_exists_nowhere_says_so_and_exits_1(
    memory_root: str, durable_dir: str
) -> None:
    run_ranks(nm.w_save_and_exit, 1, _cfg(memory_root, durable_dir, "job"), 3)
    where = ["-n", "job", "--memory-root", memory_root, "--durable", "file://" + durable_dir]

    missing = _cli("verify", "--step", "4", *where)
    present = _cli("verify", "--step", "3", *where)

    assert missing.returncode == 1, missing.stdout
    assert "step 4" in missing.stdout and "exists in no tier" in missing.stdout, missing.stdout
    assert present.returncode == 0, present.stdout + present.stderr


def test_i6_the_default_durable_dir_is_resolved_to_an_absolute_path_and_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    log = logging.getLogger(f"tierckpt-test-default-{tmp_path.name}")
    log.setLevel(logging.INFO)
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    log.addHandler(Keep())
    make = lambda: CheckpointConfig(  # noqa: E731
        namespace="x", world_size=1, memory_root="/dev/shm/unused", logger=log
    )
    first, second = make(), make()
    for cfg in (first, second):  # said when the default tier is first used, once
        open_durable_tier(cfg, check=False)

    expected = f"file://{tmp_path}/checkpoints"
    assert first.durable_base_path == second.durable_base_path == expected
    said = [ln for ln in lines if expected in ln]
    assert len(said) == 1, lines
    given = CheckpointConfig(
        namespace="x",
        world_size=1,
        memory_root="/dev/shm/unused",
        durable_base_path="d",
        logger=log,
    )
    assert given.durable_base_path == f"file://{tmp_path}/d"
    assert len(lines) == 1, lines
