"""The manager in one real process, then the ``tierckpt`` command and the metrics it left.

One subprocess saves with a :class:`CheckpointManager` (memory every step, durable every
2nd) and writes the Prometheus text and the dict snapshot; the CLI then lists, inspects and
garbage-collects what it saved, as a user would run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tierckpt.cli import main

_SCRIPT = """
import json, sys, torch, tierckpt
cfg = tierckpt.CheckpointConfig(namespace="cli", world_size=1, durable_base_path=sys.argv[1],
                                memory_budget="1GiB")
model = torch.nn.Linear(8, 4)
optim = torch.optim.SGD(model.parameters(), lr=0.1)
state = tierckpt.TrainingState(model, optim, epoch=0)
with tierckpt.CheckpointManager(cfg, every_steps=1, durable_every_steps=2) as mgr:
    assert mgr.restore(state) is None
    for step in range(1, 7):
        model(torch.randn(2, 8)).sum().backward()
        optim.step()
        assert mgr.save(step, state)
    mgr.wait(durable=True)
out = tierckpt.CheckpointManager(cfg).restore(state)
assert out == 6, out
open(sys.argv[2], "w").write(tierckpt.metrics.prometheus_text())
json.dump(tierckpt.metrics.snapshot(), open(sys.argv[3], "w"))
"""


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_manager_saves_then_ls_inspect_gc_and_metrics_show_them(
    memory_root: str, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = dict(os.environ, TIERCKPT_MEMORY_ROOT=memory_root, OMP_NUM_THREADS="1")
    durable = tmp_path / "durable"
    prom, snap = tmp_path / "metrics.txt", tmp_path / "snapshot.json"
    _run(sys.executable, "-c", _SCRIPT, str(durable), str(prom), str(snap), env=env)

    text = prom.read_text()
    assert 'tierckpt_operations_total{namespace="cli",op="save"} 6.0' in text, text
    assert 'tierckpt_operations_total{namespace="cli",op="drain"} 3.0' in text, text
    assert 'tierckpt_read_bytes_total{namespace="cli",tier="memory"}' in text
    assert 'tierckpt_gauge{namespace="cli",what="memory_budget_bytes"} 1.073741824e+09' in text
    assert 'tierckpt_failures_total{namespace="cli",op="save"} 0.0' in text
    data = json.loads(snap.read_text())["cli"]
    assert data["save"]["count"] == 6 and data["bytes_written"]["durable"] > 0
    assert (
        data["gauges"]["drain_backlog_parts"] == 0 and data["gauges"]["memory_namespace_bytes"] > 0
    )

    monkeypatch.setenv("TIERCKPT_MEMORY_ROOT", memory_root)

    def cli(*args: str) -> str:
        assert main(list(args)) == 0
        return str(capsys.readouterr().out)

    listing = json.loads(cli("ls", "-n", "cli", "--json"))
    steps = {r["step"]: r for r in listing["steps"]}
    assert sorted(steps) == [2, 4, 5, 6]  # memory keeps the 3 newest, durable every 2nd
    assert steps[6]["tiers"] == ["memory", "durable"] and steps[6]["drain"] == "drained"
    assert steps[2]["tiers"] == ["durable"] and steps[2]["drain"] == "durable"
    assert steps[5]["drain"] == "-" and steps[5]["peers"] == "-"
    header = cli("ls", "-n", "cli").splitlines()[1]
    assert header.split() == ["STEP", "SAVED", "SIZE", "TIERS", "DRAIN", "PEERS", "AGE", "NOTES"]

    items = json.loads(cli("inspect", "-n", "cli", "6", "--json"))["items"]
    by_name = {i["name"]: i for i in items}
    weight = by_name["app.model.weight"]
    assert weight["shape"] == [4, 8] and weight["dtype"] == "float32" and weight["bytes"] == 128
    assert by_name["epoch"]["kind"] == "object"
    rows = [line.split() for line in cli("inspect", "-n", "cli", "6").splitlines()]
    assert ["app.model.weight", "tensor", "float32", "(4,", "8)", "128", "B"] in rows, rows

    dry = cli("gc", "-n", "cli", "--keep-last", "1")
    assert "would delete step 2" in dry and "would delete step 4" in dry and "dry run" in dry
    assert len(list(durable.glob("cli/step_*/COMMIT"))) == 3  # nothing deleted
    cli("gc", "-n", "cli", "--keep-last", "1", "--apply")
    assert [p.parent.name for p in durable.glob("cli/step_*/COMMIT")] == ["step_6"]

    for cmd in ("ls", "inspect", "gc", "verify", "resume", "clear-memory"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        assert "examples:\n  tierckpt " + cmd in capsys.readouterr().out, cmd


def test_a_file_durable_drain_reports_byte_progress_while_its_one_data_file_copies(
    tmp_path: Any, memory_root: str, monkeypatch: Any
) -> None:
    """A rank's part is one data file: its drain still logs progress within it (issue 10)."""
    import logging

    import torch

    import tierckpt
    from tierckpt.tiers import directory

    monkeypatch.setenv("TIERCKPT_PROGRESS_S", "0")
    monkeypatch.setattr(directory, "COPY_CHUNK", 2**20)
    cfg = tierckpt.CheckpointConfig(
        namespace="progress", world_size=1, memory_root=memory_root,
        durable_base_path=f"file://{tmp_path}/durable",
    )  # fmt: skip
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler = Keep(level=logging.INFO)
    log = logging.getLogger("tierckpt")
    log.addHandler(handler)
    old = log.level
    log.setLevel(logging.INFO)
    try:
        state = {"w": torch.arange(2**21, dtype=torch.float32)}  # 8 MiB: 8 chunks
        tierckpt.save(state, config=cfg, step=1, save_to_durable=True)
        assert tierckpt.wait_for_drains(timeout=60)
    finally:
        log.removeHandler(handler)
        log.setLevel(old)
    lines = [m for m in seen if "step 1 drain (rank 0)" in m]
    assert len(lines) >= 4, seen  # one per chunk of the single data file, not one per file
    assert all("MB/s" in m and "ETA" in m for m in lines), lines
