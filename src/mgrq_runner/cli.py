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
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mgrq_runner import console
from mgrq_runner.errors import DataError, Interrupted, MgrqError, error_message
from mgrq_runner.files import read_bytes, read_json, write_atomic, write_text_atomic
from mgrq_runner.presets import CONFIG_DIR
from mgrq_runner.results import record_early_failure
from mgrq_runner.run import run
from mgrq_runner.rundir import RESULTS, SWEEP_JOBS, results_path
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
        self.before = self._record()  # an earlier run's record
        self.owned = self.before is not None

    def _record(self) -> bytes | None:
        """The run dir's results.json as it is, or None where there is none (or something else stands there: the
        run refuses that itself, in one line)."""
        try:
            return read_bytes(self.results, RESULTS, "remove it", follow_links=False)
        except DataError:
            return None

    def _copy(self, source: Path, target: Path) -> None:
        """Each file replaced whole (a full disk leaves the previous copy, never a truncated one)."""
        target.mkdir(exist_ok=True)
        for file in source.glob("*.yaml"):
            write_atomic(target / file.name, lambda tmp, file=file: shutil.copy2(file, tmp))

    def keep(self) -> None:
        """The current files become the directory's own (a first run, or a run that finished here)."""
        if self.folder is not None and self.folder.is_dir():
            self._copy(self.folder, self.folder / ORIGINAL)

    def restore(self) -> None:
        """Puts the owner's files back if this start was refused before it wrote anything of its own."""
        unchanged = self.before is not None and self._record() == self.before
        if self.owned and unchanged and self.folder is not None and (self.folder / ORIGINAL).is_dir():
            try:
                self._copy(self.folder / ORIGINAL, self.folder)
            except (OSError, MgrqError) as err:  # the refusal itself is what the user must see
                log.error("could not restore %s: %s", self.folder, err)


SWEEP_ID = "MGRQ_SWEEP_ID"  # set by SweepFailures for the sweep's jobs (launcher workers inherit the environment)


def sweep_records(sweep_dir: str) -> Path:
    """Where this sweep's jobs record what they did: ``<sweep dir>/.sweep_jobs/<sweep id>/``. Keyed by the sweep,
    so that two sweeps sharing a sweep dir (at once, or one after the other) count only their own jobs."""
    return Path(sweep_dir) / SWEEP_JOBS / os.environ.get(SWEEP_ID, "unnamed")


class SweepJob:
    """In a sweep, what this job did in it: ``sweep_records(...)/<job number>.json`` says ``started`` when the job
    begins and its outcome when it ends, so that ``SweepFailures`` counts a job by this sweep's attempt, not by a
    results.json an earlier sweep left in the same place (a refused job keeps that one). Outside a sweep: nothing."""

    def __init__(self, hydra_cfg: DictConfig, run_dir: str) -> None:
        in_sweep = hydra_cfg.mode == RunMode.MULTIRUN
        self.path = sweep_records(str(hydra_cfg.sweep.dir)) / f"{hydra_cfg.job.num}.json" if in_sweep else None
        self.run_dir = run_dir

    def record(self, status: str, error: str | None = None) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps({"status": status, "run_dir": self.run_dir, "error": error}))
        except (OSError, MgrqError) as err:  # the sweep then counts this job as not finished
            log.error("could not record the job's outcome in %s: %s", self.path, err)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Runs one job; returns top-1 so that sweepers can optimise it (None for a dry run)."""
    hydra_cfg = HydraConfig.get()
    overrides = [str(o) for o in OmegaConf.to_container(hydra_cfg.overrides.task, resolve=False)]  # as typed
    job = SweepJob(hydra_cfg, str(cfg.output_dir))
    job.record("started")
    hydra_files = HydraFiles(Path(cfg.output_dir), hydra_cfg.output_subdir)
    try:
        with sigterm_as_interrupt():
            if not hydra_files.owned:
                hydra_files.keep()
            check_overrides(overrides, cfg)
            results, _ = run(cfg)
        hydra_files.keep()
        job.record(str(results.get("status")))
        return float(results["top1"]) if "top1" in results else None  # none in a dry run
    except MgrqError as err:
        hydra_files.restore()
        message = error_message(err)
        job.record("failed", message)
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
        job.record("interrupted", message)
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
        self._refuse_links(hydra_files(Path(str(config.hydra.run.dir)), config))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        self._check(str(sweep_dir), "hydra.sweep.dir")
        jobs = [path for path in sorted(sweep_dir.iterdir()) if path.is_dir() and not path.is_symlink()]
        self._refuse_links([sweep_dir / "multirun.yaml", *(f for job in jobs for f in hydra_files(job, config))])

    @staticmethod
    def _refuse_links(files: list[Path]) -> None:
        """Hydra writes its files through whatever is there: a link planted where it writes would have them
        written to its target. Refused, with one line, before Hydra writes anything."""
        links = [str(path) for path in files if path.is_symlink()]
        if links:
            message = f"{', '.join(links)} is a symbolic link, which Hydra would write through. Fix: remove it."
            console.console.print(f"[bold red]error:[/] {message}")
            sys.exit(2)


def hydra_files(run_dir: Path, config: DictConfig) -> list[Path]:
    """What Hydra writes in a job's dir: ``<job>.log``, the output subdir (``.hydra``) and its three YAML files."""
    subdir = config.hydra.output_subdir
    hydra_dir = run_dir / str(subdir) if subdir else None
    files = [run_dir / f"{config.hydra.job.name}.log"]
    if hydra_dir is not None:
        files += [hydra_dir, *(hydra_dir / f"{name}.yaml" for name in ("config", "hydra", "overrides"))]
    return files


class SweepFailures(Callback):
    """Ends a sweep with exit status 1 when any of its jobs did not finish in it: failed, refused, interrupted, or
    killed before it could say (``SweepJob``'s records; each job's results.json says more)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_ID] = uuid.uuid4().hex  # this sweep's records, apart from any other sweep's in the dir

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        records = sweep_records(str(config.hydra.sweep.dir))
        failed = []
        for path in sorted(records.glob("*.json"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
            try:
                record = read_json(path, "sweep record", "rerun the sweep", follow_links=False)
            except DataError:
                record = {"status": "unreadable", "run_dir": path}
            if record.get("status") not in ("done", "projected"):
                failed.append(f"{record.get('run_dir')} ({record.get('status')})")
        shutil.rmtree(records, ignore_errors=True)  # counted: a later sweep in this dir has records of its own
        if failed:
            log.error("%d job(s) of the sweep did not finish: %s", len(failed), "; ".join(failed))
            sys.exit(1)


def version() -> str:
    """``mgrq-run --version``: this package's version and the libraries its results depend on."""
    from importlib.metadata import version as installed

    from mgrq_runner import __version__

    libraries = ", ".join(f"{name} {installed(name)}" for name in ("torch", "timm", "hydra-core"))
    return f"mgrq-run (mgrq-runner) {__version__}; {libraries}"


def check_override_syntax(arguments: list[str]) -> None:
    """Each override is valid Hydra syntax; else one line naming it and exit status 2 (Hydra's parser would name
    a token of its grammar, not the override)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    for argument in arguments:
        if argument.startswith("-") or "=" not in argument:  # a flag, or a flag's value (--cfg job)
            continue
        try:
            parser.parse_overrides([argument])
        except OverrideParseException as err:
            reason = str(err).splitlines()[0]
            message = (
                f"the override {argument!r} is not valid Hydra syntax ({reason}). Fix: key=value, or key=a,b,c "
                "for a sweep with -m (no empty value; quote values with spaces or special characters)."
            )
            console.console.print(f"[bold red]error:[/] {message}")
            sys.exit(2)


class JobStarted(Callback):
    """Marks that Hydra composed the config and started the run or the sweep (``entry`` tells Hydra's own refusals
    of the command line, which exit 1, from a sweep that ran and failed)."""

    started = False

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        JobStarted.started = True

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        JobStarted.started = True


def entry() -> None:
    """The ``mgrq-run`` command: ``--version`` answers here (Hydra's own flag would print Hydra's version), anything
    else goes to Hydra. A command line Hydra cannot compose (an unknown preset such as ``experiment=nope``, a bad
    override) exits 2 like every other mistake of the user's; a sweep that ran keeps its own status."""
    if "--version" in sys.argv[1:]:
        print(version())
        return
    check_override_syntax(sys.argv[1:])
    from mgrq_runner import cli  # Hydra's callback sets the flag there (under python -m this file is __main__)

    try:
        main()
    except SystemExit as exit_:
        if exit_.code == 1 and not cli.JobStarted.started:
            sys.exit(2)
        raise
    except BrokenPipeError:  # the reader stopped early (mgrq-run --help | head): no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        sys.exit(1 if cli.JobStarted.started else 0)  # a job cut off by it did not finish


if __name__ == "__main__":
    entry()
