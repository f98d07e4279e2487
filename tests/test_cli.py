"""The ``tierckpt`` command as a user runs it: a real subprocess."""

from __future__ import annotations

import subprocess
import sys

import tierckpt


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tierckpt", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_python_dash_m_tierckpt_prints_the_version():
    out = _run("--version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"tierckpt {tierckpt.__version__}"


def test_python_dash_m_tierckpt_without_a_command_shows_usage_and_fails():
    out = _run()
    assert out.returncode == 2
    assert "usage: tierckpt" in out.stderr
