"""The files of a run directory: every name defined once, used by the runner that writes them and by the tools
that read them (``analysis``). No torch import: the collector uses it.

A run directory holds ``.hydra/`` (Hydra's), ``cli.log`` and the files named below; ``results.json``'s fields are
``results.Results``.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

from mgrq_runner.errors import ConfigError

RESULTS = "results.json"  # metrics, times, versions, status: results.ResultsFile writes it, analysis reads it
CALIBRATION_LIST = "calibration_images.txt"  # the calibration images' ids, one a line
CLASS_LIST = "classes.txt"  # data=folder: the class names in label order
RECON_CURVES = "recon_curves.json"  # per unit, the loss terms every 10 steps (recon.curves.LossCurves)
RECON_STATE = "recon_state"  # a folder: the finished units of an unfinished reconstruction (recon.state)
EXPORT_WEIGHTS = "quantized_model.safetensors"  # integer weight codes, quantizer parameters (deploy.safetensors_export)
EXPORT_MANIFEST = "quantized_model.json"  # what the export holds: bits, method, versions, sizes
ONNX_FILE = "model.onnx"  # export=onnx: the model with QuantizeLinear/DequantizeLinear (deploy.onnx_export)
LOCK = ".lock"  # held (flock) while a run is active: the pid and start time of its owner
SWEEP_JOBS = ".sweep_jobs"  # in a sweep dir: <sweep id>/<job number>.json, what each job did (cli.SweepJob)
TRACKING_RUN = "tracking_run.json"  # logger=mlflow: the store, experiment and run id this run logs to (tracking)
TENSORBOARD_DIR = "tensorboard"  # logger=tensorboard: the run's event files

# Outside run directories: logger=mlflow's default store, relative to the working directory (Makefile: mlflow-ui)
MLFLOW_STORE = "outputs/mlflow.db"  # sqlite:///<cwd>/outputs/mlflow.db unless MLFLOW_TRACKING_URI names another
MLFLOW_ARTIFACTS = "mlartifacts"  # beside a SQLite store: the artifacts of the experiments the runner creates there


def results_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESULTS


def held(run_dir: Path) -> bool | None:
    """Whether a process holds ``run_dir``'s lock (``locked``) right now; None when there is no lock file to ask
    (a run dir written before the lock existed, or copied without it). Asks with a shared lock, released at once."""
    try:
        descriptor = os.open(run_dir / LOCK, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(descriptor) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Owns ``run_dir`` for the block: a second run there is refused, naming the owner. The lock is an ``flock``,
    so it ends with the process however that ends. A symbolic link in the lock's place is refused, not followed."""
    path = run_dir / LOCK
    try:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        if err.errno != errno.ELOOP:
            raise
        raise ConfigError(
            f"{path} is a symbolic link: a run writes its own files, never through a link. Fix: remove {path}."
        ) from None
    handle = os.fdopen(descriptor, "r+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            raise ConfigError(
                f"run dir {run_dir} is in use by {owner}. Fix: wait until it ends, or give this run its own "
                "hydra.run.dir."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, started {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n")
        handle.flush()
        yield
    finally:
        handle.close()
