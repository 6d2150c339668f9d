"""The wheel a user gets from `pip install .`: built from the sdist, installed into a fresh virtual environment
outside the checkout, and run there (scripts/wheel_check.sh: mgrq-run --version, a smoke run, the API example)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]


@needs_fashion_mnist
def test_the_wheel_works_without_the_repository(tmp_path: Path) -> None:
    try:
        done = subprocess.run(
            ["bash", str(ROOT / "scripts" / "wheel_check.sh"), str(tmp_path)],
            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
    finally:
        shutil.rmtree(tmp_path / "venv", ignore_errors=True)  # gigabytes (torch): not kept among pytest's tmp dirs
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"mgrq_runner from {tmp_path}/venv/" in done.stdout
    assert "mgrq-run debug=smoke: done" in done.stdout and "wheel check passed" in done.stdout
