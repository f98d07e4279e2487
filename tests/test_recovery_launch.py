"""``tierckpt-run`` keeps torchrun's environment contract and restarts only a dead worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

WORKER = """
import json, os, sys
out = sys.argv[1]
keys = ["RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
        "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE", "TIERCKPT_REPLACEMENT"]
env = {k: os.environ.get(k) for k in keys}
with open(os.path.join(out, f"r{env['RANK']}-l{env['TIERCKPT_REPLACEMENT']}-{os.getpid()}"), "w") as f:
    json.dump(env, f)
if env["RANK"] == "1" and env["TIERCKPT_REPLACEMENT"] != "1":
    sys.exit(int(sys.argv[2]))
"""


def _launch(tmp_path: Path, code: int, *opts: str) -> tuple[subprocess.CompletedProcess, list]:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TIERCKPT_", "TORCHELASTIC"))}
    env["PYTHONPATH"] = str(ROOT / "src")
    cmd = [sys.executable, "-m", "tierckpt.recovery.launch", "--nproc-per-node", "3", *opts,
           str(script), str(out), str(code)]  # fmt: skip
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    envs = [(p.name, json.loads(p.read_text())) for p in sorted(out.iterdir())]
    return res, envs


def test_workers_get_torchruns_environment_and_only_the_dead_one_is_restarted(
    tmp_path: Path,
) -> None:
    res, envs = _launch(tmp_path, 7)
    assert res.returncode == 0, res.stderr
    names = [n.rsplit("-", 1)[0] for n, _ in envs]
    assert names == ["r0-l0", "r1-l0", "r1-l1", "r2-l0"], "ranks 0 and 2 started once"
    ports = {e["MASTER_PORT"] for _, e in envs}
    assert len(ports) == 1, "one store for the whole job, replacements included"
    for _, e in envs:
        assert e["WORLD_SIZE"] == "3" and e["LOCAL_WORLD_SIZE"] == "3"
        assert e["LOCAL_RANK"] == e["RANK"] and e["GROUP_RANK"] == "0"
        assert e["MASTER_ADDR"] == "127.0.0.1" and e["TORCHELASTIC_USE_AGENT_STORE"] == "True"
    assert "rank 1 exited with 7" in res.stderr


def test_a_worker_failing_past_max_replacements_fails_the_job(tmp_path: Path) -> None:
    res, envs = _launch(tmp_path, 7, "--max-replacements", "0", "--spares", "0")
    assert res.returncode == 1
    assert "rank 1 failed (exit 7) after 0 replacements" in res.stderr
    assert [n.rsplit("-", 1)[0] for n, _ in envs].count("r1-l0") == 1
