"""A run's ``results.json``: the fields every run records, per-stage wall times and status, written atomically."""

from __future__ import annotations

import functools
import json
import logging
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
import omegaconf
import timm
import torch
import torchvision
from omegaconf import DictConfig

from mgrq_runner import __version__
from mgrq_runner.devices import machine_description
from mgrq_runner.files import write_text_atomic
from mgrq_runner.rundir import Results

log = logging.getLogger(__name__)


def library_versions() -> dict[str, str]:
    return {
        "mgrq_runner": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "hydra": hydra.__version__,
        "omegaconf": omegaconf.__version__,
    }


@functools.cache  # the code this process loaded: a later commit in the checkout must not relabel its runs
def git_revision() -> str | None:
    """The source tree's commit (with ``-dirty`` if it has uncommitted changes) when first asked, or None."""
    source = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=source, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=source,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha


class ResultsFile:
    """The run's ``results.json`` (``Results``): written after every change, with per-stage wall times."""

    def __init__(self, path: Path, fields: Results) -> None:
        self.path = path
        self.data: Results = {**fields, "status": "running", "times": {}}
        self.write()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)  # type: ignore[typeddict-item]
        self.write()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage %s", name)
        start = time.perf_counter()
        yield
        self.data["times"][name] = round(time.perf_counter() - start, 3)
        self.write()

    def write(self) -> None:
        write_text_atomic(self.path, json.dumps(self.data, indent=2, default=str) + "\n")


def common_fields(cfg: DictConfig, run_dir: Path) -> Results:
    """results.json fields every kind of run starts with."""
    return {
        "dataset": str(cfg.data.name),
        "eval_split": str(cfg.data.get("eval_split", "val")),
        "seed": int(cfg.seed),
        "run_dir": str(run_dir),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "git_sha": git_revision(),
        "threads": torch.get_num_threads(),  # CPU float reductions depend on it: keep it fixed across a table
        "machine": machine_description(),  # and on the CPU: mgrq-collect flags tables that mix machines
    }
