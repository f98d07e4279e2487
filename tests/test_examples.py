"""Every quick example in examples/ runs as the README says (issue 12 item 6).

``demo.py`` and its worker ``train.py`` are left to ``make demo``; every other
``examples/*.py`` is run here, as a user would, in a fresh directory.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SLOW = {"demo.py", "train.py", "recovery_demo.py"}
"""Run by ``make demo`` and ``make demo-recovery``."""
QUICK = sorted(p.name for p in EXAMPLES.glob("*.py") if p.name not in SLOW)


def test_i6_examples_holds_a_quick_runnable_example() -> None:
    assert "quickstart.py" in QUICK


@pytest.mark.parametrize("name", QUICK)
def test_i6_each_quick_example_runs_to_completion(
    name: str, tmp_path: Path, memory_root: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERCKPT_")}
    env |= {"TIERCKPT_MEMORY_ROOT": memory_root, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    if name == "quickstart.py":
        assert "restored step 10 bit-exact" in res.stdout
        assert (tmp_path / "checkpoints" / "quickstart" / "step_10" / "COMMIT").exists()
