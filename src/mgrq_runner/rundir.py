"""The files of a run directory and the schema of its ``results.json``: one definition of each, used by the
runner that writes them (``results.ResultsFile``, ...) and by the tools that read them (``analysis.runs``).

A run directory holds ``.hydra/`` (Hydra's), ``cli.log`` and the files named below.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, TypedDict

from mgrq_runner.errors import ConfigError

RESULTS = "results.json"  # metrics, times, versions, status: results.ResultsFile writes it, analysis reads it
CALIBRATION_LIST = "calibration_images.txt"  # the calibration images' ids, one a line
CLASS_LIST = "classes.txt"  # data=folder: the class names in label order
RECON_CURVES = "recon_curves.json"  # per unit, the loss terms every 10 steps (recon.curves.LossCurves)
RECON_STATE = "recon_state"  # a folder: the finished units of an unfinished reconstruction (recon.state)
EXPORT_WEIGHTS = "quantized_model.safetensors"  # integer weight codes and quantizer parameters (export.py)
EXPORT_MANIFEST = "quantized_model.json"  # what the export holds: bits, method, versions, sizes
LOCK = ".lock"  # held (flock) while a run is active: the pid and start time of its owner


def results_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / RESULTS


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """Owns ``run_dir`` for the block: a second run there is refused, naming the owner. The lock is an ``flock``,
    so it ends with the process however that ends."""
    path = run_dir / LOCK
    handle = path.open("a+")
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


class Results(TypedDict, total=False):
    """The schema of ``results.json``: what the runner writes and ``analysis.runs`` reads back."""

    # what ran
    mode: str  # absent for mode=run; "eval" for the evaluation of an export
    checkpoint: str  # mode=eval: the exported run dir
    model: str  # timm arch.tag or proxy name
    preset: str | None  # the model preset (e.g. deit_s); tables are keyed by it
    method: str  # fp | minmax | repq | brecq | qdrop | mgrq
    w_bits: int  # 32 for fp
    a_bits: int
    dataset: str
    eval_split: str  # val | heldout (tuning on train images)
    seed: int
    config: dict[str, Any]  # the resolved Hydra config
    overrides: list[str]  # a job that failed before it started: its command-line overrides
    # where and with what
    run_dir: str
    started: str
    finished: str
    versions: dict[str, str]
    git_sha: str | None
    threads: int  # torch CPU threads: float reductions depend on it
    machine: str  # the CPU (model, vector instructions, cores): float results depend on it too
    device: str
    gpu: str  # a CUDA run: the GPU's name
    # progress
    status: str  # running | done | failed | interrupted | projected (dry_run=true)
    error: str  # failed: the error's type and message
    times: dict[str, float]  # seconds per stage
    resumable: dict[str, Any]  # while reconstructing: finished units and their state dir
    resumed_units: list[str]  # a resumed run: the units restored from an interrupted one
    # the model (timm results-CSV columns)
    param_count: float  # millions
    img_size: int
    crop_pct: float | None
    interpolation: str | None
    # reconstruction: per unit, final loss terms, block_soft, block_hard, undecided (recon.convergence), seconds
    reconstruction: list[dict[str, Any]]
    export: dict[str, Any]  # export=true: file paths and sizes
    projection: dict[str, Any]  # dry_run=true: projected seconds (in all, per unit), peak memory
    # scores
    top1: float
    top5: float
    top1_err: float
    top5_err: float
    fp_top1: float | None
    fp_top5: float | None
    fp_agreement: float | None  # share of evaluation images whose top-1 class equals the FP model's
    agreement_with_simulation: float  # eval.runtime=onnxruntime: top-1 equal to the simulated model's, share
    onnx: dict[str, Any]  # eval.runtime=onnxruntime: the file, providers, kernel counts of the optimised graph
    num_calib: int
    num_eval: int
    throughput: dict[str, float]  # images per second, per evaluated model
