"""The ``mgrq-run`` command: Hydra composes the config, ``run`` does the work.

The config directory is found from this file's location (an absolute path), so the installed console script
works from any working directory. A user's mistake ends with one line naming the fix and exit status 2; an
interruption (Ctrl-C, SIGTERM from a job scheduler) with 128 + the signal number, results.json saying
``interrupted`` and the finished reconstruction units kept for ``resume=true``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from mgrq_runner import console
from mgrq_runner.errors import Interrupted, MgrqError, error_message
from mgrq_runner.presets import CONFIG_DIR
from mgrq_runner.results import record_early_failure
from mgrq_runner.run import run
from mgrq_runner.rundir import RESULTS, results_path
from mgrq_runner.settings import check_overrides

ORIGINAL = "original"  # .hydra/original/: the Hydra files of the run that owns the directory
log = logging.getLogger("mgrq_runner")


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a job timeout, preemption, ``kill``) raises ``Interrupted`` in the main thread, like Ctrl-C."""

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class HydraFiles:
    """Hydra rewrites ``<run dir>/.hydra/`` at every start, even for a run that is then refused (a resume with
    another config, a run dir in use). The files of the run that owns the directory are kept in
    ``.hydra/original/`` and put back when a later start is refused."""

    def __init__(self, run_dir: Path, subdir: str | None) -> None:
        self.folder = run_dir / subdir if subdir else None
        self.results = results_path(run_dir)
        self.before = self.results.read_bytes() if self.results.exists() else None  # an earlier run's record
        self.owned = self.before is not None

    def _copy(self, source: Path, target: Path) -> None:
        target.mkdir(exist_ok=True)
        for file in source.glob("*.yaml"):
            shutil.copy2(file, target / file.name)

    def keep(self) -> None:
        """The current files become the directory's own (a first run, or a run that finished here)."""
        if self.folder is not None and self.folder.is_dir():
            self._copy(self.folder, self.folder / ORIGINAL)

    def restore(self) -> None:
        """Puts the owner's files back if this start was refused before it wrote anything of its own."""
        unchanged = self.results.exists() and self.results.read_bytes() == self.before
        if self.owned and unchanged and self.folder is not None and (self.folder / ORIGINAL).is_dir():
            self._copy(self.folder / ORIGINAL, self.folder)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Runs one job; returns top-1 so that sweepers can optimise it (None for a dry run)."""
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    hydra_files = HydraFiles(Path(cfg.output_dir), hydra_cfg.output_subdir)
    if not hydra_files.owned:
        hydra_files.keep()
    try:
        with sigterm_as_interrupt():
            check_overrides(overrides, cfg)
            results, _ = run(cfg)
        hydra_files.keep()
        return float(results["top1"]) if "top1" in results else None  # none in a dry run
    except MgrqError as err:
        hydra_files.restore()
        message = error_message(err)
        log.error("%s", message)
        console.console.print(f"[bold red]error:[/] {message}")  # via the module: main() stays picklable (joblib)
        try:
            record_early_failure(cfg, overrides, err)
        except OSError as write_error:  # e.g. an unwritable run dir: the message above already names the problem
            log.error("could not write %s: %s", RESULTS, write_error)
        if hydra_cfg.mode == RunMode.MULTIRUN:
            return None  # a sweep goes on with its other jobs; this one's results.json says failed
        sys.exit(2)
    except (KeyboardInterrupt, Interrupted) as err:
        signum = err.signum if isinstance(err, Interrupted) else int(signal.SIGINT)
        message = (
            f"interrupted by {signal.Signals(signum).name}. Finished reconstruction units are kept: rerun the same "
            f"command with hydra.run.dir={cfg.output_dir} resume=true to continue."
        )
        log.error("%s", message)
        console.console.print(f"[bold red]interrupted:[/] {message}")
        sys.exit(128 + signum)


class OutputDirCheck(Callback):
    """Refuses, with one line and exit status 2, a run or sweep directory that cannot be created or written
    (Hydra would fail on it with a traceback before the job starts)."""

    def _check(self, folder: str, key: str) -> None:
        path = Path(folder)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / f".write-test-{os.getpid()}"
            probe.touch()
            probe.unlink()
        except OSError as err:
            message = f"output dir {path} cannot be written ({err.strerror}). Fix: {key}=<a writable folder>."
            console.console.print(f"[bold red]error:[/] {message}")
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.run.dir), "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(str(config.hydra.sweep.dir), "hydra.sweep.dir")


class SweepFailures(Callback):
    """Ends a sweep with exit status 1 when any of its jobs failed (each job's results.json says which)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        failed = []
        for path in sorted(sweep_dir.rglob(RESULTS)):
            if path.stat().st_mtime < getattr(self, "started", 0.0):
                continue  # an earlier sweep's job in the same directory
            try:
                status = json.loads(path.read_text()).get("status")
            except (OSError, json.JSONDecodeError):
                status = "unreadable"
            if status not in ("done", "projected"):
                failed.append(f"{path.parent} ({status})")
        if failed:
            log.error("%d job(s) of the sweep did not finish: %s", len(failed), "; ".join(failed))
            sys.exit(1)


if __name__ == "__main__":
    main()
