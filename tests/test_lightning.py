"""Lightning's Trainer (DDP, 2 CPU processes) saves and resumes through TierckptCheckpointIO."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lightning")

SCRIPT = Path(__file__).with_name("lightning_script.py")


def test_a_lightning_ddp_trainer_saves_to_tierckpt_and_resumes_bit_exact(
    memory_root: str, durable_dir: str, tmp_path: Path
) -> None:
    ckpt_dir = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run(
        [sys.executable, str(SCRIPT), "lit", memory_root, "file://" + durable_dir, str(ckpt_dir)],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
        check=False,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    assert result == {"bit_exact": [True, True], "global_step": 12}
    # ModelCheckpoint's files are pointers; the bytes are tierckpt steps in the tiers.
    pointer = json.loads((ckpt_dir / "epoch=0-step=6.ckpt").read_text())
    assert pointer == {"format": "tierckpt-pointer/1", "namespace": "lit", "step": 6}
    assert (ckpt_dir / "last.ckpt").exists()
    assert (Path(memory_root) / "lit" / "step_6" / "COMMIT").exists()
    assert [p.parent.name for p in Path(durable_dir, "lit").glob("step_*/COMMIT")] == ["step_6"]
