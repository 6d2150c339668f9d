"""A run's ``results.json``, end to end: its schema (``Results``), the builders of its fields, the record of a job
refused before it started, the writer (``ResultsFile``: atomic, rewritten after every change), the record of how a
job ended (``failure_recorded``), the one reader (``read_results``), and the convergence criterion a unit's report in
it is judged by.

No torch import at module level: ``analysis`` reads the schema without loading a model's libraries; the builders
that describe a model or a machine import what they need when called.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import platform
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict

from omegaconf import DictConfig, OmegaConf

from mgrq_runner import __version__
from mgrq_runner.errors import Interrupted, MgrqError, error_message
from mgrq_runner.files import read_json, write_text_atomic
from mgrq_runner.presets import preset_values
from mgrq_runner.rundir import RESULTS, results_path

if TYPE_CHECKING:
    import torch

    from mgrq_runner.scoring import EvalResult
    from mgrq_runner.settings import EvalSettings, RunSettings

log = logging.getLogger(__name__)


class Results(TypedDict, total=False):
    """The schema of ``results.json``: what the runner writes and ``analysis.runs`` reads back."""

    # what ran
    mode: str  # absent for mode=run; "eval" for the evaluation of an export
    checkpoint: str  # mode=eval: the exported run dir
    model: str  # timm arch.tag or proxy name
    preset: str | None  # the model preset (e.g. deit_s); tables are keyed by it
    method: str  # fp | minmax | repq | brecq | qdrop | mgrq
    method_defaults: dict[str, Any]  # the preset's loss weights, QDrop p, framework switches (presets.LABEL_KEYS)
    w_bits: int  # 32 for fp
    a_bits: int
    dataset: str
    data_identity: dict[str, Any]  # the calibration images' digest and the classes (data.DataBundle.identity)
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
    warnings: list[str]  # said about a completed run: an FP model at or below chance (labels in another order?)
    times: dict[str, float]  # seconds per stage
    resumable: dict[str, Any]  # while reconstructing: finished units and their state dir
    resumed_units: list[str]  # a resumed run: the units restored from an interrupted one
    # the model (timm results-CSV columns)
    param_count: float  # millions
    img_size: int
    crop_pct: float | None
    interpolation: str | None
    # method.init.rotation / mlp_relu: what the FP model's transformation did (each MLP's budget and losses,
    # the rotation's sizes and construction)
    fp_transform: dict[str, Any]
    # reconstruction: per unit, final loss terms, block_soft, block_hard, undecided (converged, below), seconds;
    # STE (method.recon.rounding=ste): block_at_90, block_final, moved instead of the last three
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
    fp_transformed_top1: float  # the transformed FP model (rotation, ReLU MLPs), the quantized model's start
    fp_transformed_top5: float
    fp_transformed_agreement: float  # its top-1 agreement with the original FP model
    agreement_with_simulation: float  # eval.runtime=onnxruntime: top-1 equal to the simulated model's, share
    onnx: dict[str, Any]  # eval.runtime=onnxruntime: the file, providers, kernel counts of the optimised graph,
    # the CPU's integer-kernel instruction set (cpu: isa, u8s8_pairs_in_int16) and the session config applied
    num_calib: int
    num_eval: int
    throughput: dict[str, float]  # images per second, per evaluated model


class UnreadableResults(MgrqError):
    """A results.json that cannot be read as a record; the message names the file and says why."""


def read_results(path: str | Path) -> Results:
    """A run's ``results.json`` (``path``: the file, or the run dir holding it) as read: a JSON object.

    The one reader of the format: resume, the trackers and the collector call it and decide, each for itself,
    what an unreadable record means. Raises UnreadableResults naming the file and the reason (missing, a link or
    not a file, not UTF-8 JSON, not an object): ``files.read_json``.
    """
    path = Path(path)
    if path.is_dir() and path.name != RESULTS:
        path = results_path(path)
    fix = "rerun the job that writes it (resume=true in its run dir), or remove the run dir"
    return read_json(path, RESULTS, fix, error=UnreadableResults, follow_links=False)


class ResultsFile:
    """The run's ``results.json`` (``Results``): written after every change, with per-stage wall times."""

    def __init__(self, path: Path, fields: Results) -> None:
        self.path = path
        self.data: Results = {**fields, "status": "running", "times": {}}
        self.write()

    def resumable(self, state_dir: Path) -> Callable[[list[str]], None]:
        """A reconstruction's ``on_save``: results.json says which units a resumed run would keep (``resumable``)
        until the run is scored."""
        return lambda names: self.update(resumable={"finished_units": names, "state_dir": str(state_dir)})

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


# ---------------------------------------------------------------------------------------------- field builders


def library_versions() -> dict[str, str]:
    import hydra
    import omegaconf
    import timm
    import torch
    import torchvision

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


def common_fields(dataset: str, eval_split: str, seed: int, run_dir: Path) -> Results:
    """results.json fields every kind of run starts with."""
    import torch

    from mgrq_runner.devices import machine_description

    return {
        "dataset": dataset,
        "eval_split": eval_split,
        "seed": seed,
        "run_dir": str(run_dir),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "git_sha": git_revision(),
        "threads": torch.get_num_threads(),  # CPU float reductions depend on it: keep it fixed across a table
        "machine": machine_description(),  # and on the CPU: mgrq-collect flags tables that mix machines
    }


def run_fields(settings: RunSettings) -> Results:
    """The first fields of a ``mode=run`` job's results.json: what runs, where, with what."""
    quant = settings.method.quant
    return {
        "model": settings.model.name,
        "preset": settings.model.preset,
        "method": settings.method.name,
        "method_defaults": preset_values(settings.method.name),
        "w_bits": quant.w_bits if quant else 32,
        "a_bits": quant.a_bits if quant else 32,
        **common_fields(settings.data.name, settings.data.eval_split, settings.seed, settings.run_dir),
        "config": dict(settings.config),
    }


def eval_fields(settings: EvalSettings, manifest: Mapping[str, Any]) -> Results:
    """The first fields of a ``mode=eval`` job's results.json: the export it scores, from its manifest."""
    return {
        "mode": "eval",
        "checkpoint": str(settings.checkpoint),
        "model": manifest["model"]["name"],
        "preset": manifest["model"].get("preset"),
        "method": manifest["method"],
        "w_bits": manifest["w_bits"],
        "a_bits": manifest["a_bits"],
        **common_fields(settings.data.name, settings.data.eval_split, settings.seed, settings.run_dir),
        "config": dict(settings.config),
    }


def model_fields(model: torch.nn.Module, preprocessing: Mapping[str, Any], device: torch.device) -> Results:
    """Size and preprocessing of the evaluated model (timm results-CSV columns), and the device."""
    import torch

    return {
        "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "img_size": preprocessing["input_size"][-1],
        "crop_pct": preprocessing.get("crop_pct"),
        "interpolation": preprocessing.get("interpolation"),
        "device": str(device),
        **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
    }


def score_fields(scores: Mapping[str, EvalResult]) -> Results:
    """The final fields: the last model's scores are the run's, the FP model's beside them when it was scored."""
    quant, fp = list(scores.values())[-1], scores.get("fp")
    return (
        {
            "status": "done",
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "top1": round(quant.top1, 3),
            "top5": round(quant.top5, 3),
            "top1_err": round(100 - quant.top1, 3),
            "top5_err": round(100 - quant.top5, 3),
            "fp_top1": round(fp.top1, 3) if fp is not None else None,
            "fp_top5": round(fp.top5, 3) if fp is not None else None,
            "num_eval": quant.num_images,
            "throughput": {name: round(score.images_per_second, 1) for name, score in scores.items()},
            "fp_agreement": round(quant.agreement, 5) if fp is not None else None,  # no FP model in an export
        }
        | transformed_fields(scores)
        | runtime_fields(scores)
    )


def runtime_fields(scores: Mapping[str, EvalResult]) -> Results:
    """``eval.runtime=onnxruntime``: the share of images on which ``model.onnx`` predicts what the simulation does."""
    if "onnxruntime" not in scores:
        return {}
    same = scores["onnxruntime"].predictions == scores["simulation"].predictions
    return {"agreement_with_simulation": round(float(same.float().mean()), 5)}


def transformed_fields(scores: Mapping[str, EvalResult]) -> Results:
    """The transformed FP model's own scores (``method.init.rotation`` / ``mlp_relu``), when it was scored: the
    quantized model's starting point, beside the original FP model's ``fp_top1``."""
    transformed = scores.get("fp_transformed")
    if transformed is None:
        return {}
    return {
        "fp_transformed_top1": round(transformed.top1, 3),
        "fp_transformed_top5": round(transformed.top5, 3),
        "fp_transformed_agreement": round(transformed.agreement, 5),
    }


def export_info(settings: RunSettings) -> dict[str, Any]:
    """The run's description in an export manifest."""
    method, calib = settings.method, settings.calib
    assert method.quant is not None and method.init is not None
    return {
        "model": dict(settings.model.record),
        "arch": settings.model.name.split(".")[0],
        "method": method.name,
        "w_bits": method.quant.w_bits,
        "a_bits": method.quant.a_bits,
        "quant_config": dataclasses.asdict(method.quant),
        "reparam": bool(method.init.reparam),
        "rotation": method.init.rotation,  # a rotated / ReLU-MLP model is rebuilt with that structure on load
        "mlp_relu": method.mlp_relu is not None,
        "dataset": settings.data.name,
        "num_calib": calib.num_images,
        "seed": settings.seed,
        "source_run_dir": str(settings.run_dir),
        "versions": library_versions(),
        "git_sha": git_revision(),
    }


# ---------------------------------------------------------------------------------------------- refused jobs

# results.json fields of a job refused before it started, and where its config holds them
EARLY_FIELDS = {
    "model": "model.name",
    "preset": "model.preset",
    "method": "method.name",
    "w_bits": "quant.w_bits",
    "a_bits": "quant.a_bits",
    "seed": "seed",
}


def record_early_failure(cfg: DictConfig, overrides: list[str], err: MgrqError) -> None:
    """A job refused before it wrote its own results.json still leaves one, read from the raw config (the
    settings could not be parsed): a sweep and ``mgrq-collect`` list the job."""
    path = results_path(cfg.output_dir)
    if path.exists():  # the run's own record (it says failed), or an earlier run's that must stay
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fields: dict[str, Any] = {"overrides": overrides}
    for key, where in EARLY_FIELDS.items():
        fields[key] = OmegaConf.select(cfg, where, default=None, throw_on_resolution_failure=False)
    try:
        data = cfg.data
        fields.update(common_fields(str(data.name), str(data.get("eval_split", "val")), int(cfg.seed), path.parent))
    except Exception:  # the config is what failed: keep what could be read
        pass
    error = f"{type(err).__name__}: {error_message(err)}"
    ResultsFile(path, fields).update(status="failed", error=error)  # type: ignore[arg-type]


@contextmanager
def failure_recorded(results_file: ResultsFile) -> Iterator[None]:
    """Marks results.json ``failed`` (or ``interrupted`` by Ctrl-C or SIGTERM), with the reason, when the block
    raises; the exception goes on."""
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as err:
        reason = f"signal {err.signum}" if isinstance(err, Interrupted) else "KeyboardInterrupt"
        _record_ending(results_file, status="interrupted", error=f"interrupted ({reason}); resume with resume=true")
        raise
    except BaseException as err:
        _record_ending(results_file, status="failed", error=f"{type(err).__name__}: {error_message(err)}")
        raise


def _record_ending(results_file: ResultsFile, **fields: Any) -> None:
    """Records how the run ended, if the disk still lets it: the error that ended it is the one reported."""
    try:
        results_file.update(**fields)
    except (OSError, MgrqError) as err:
        log.error("could not record status %s in %s: %s", fields.get("status"), results_file.path, err)


# -- convergence: the criterion a unit's report is judged by (docs/method.md section 5) --------------------------
#
# The engine reports, per unit, ``block_soft`` and ``block_hard`` (the block loss on the calibration set just before
# and just after hardening the rounding) and ``undecided`` (the share of rounding variables with 0.01 < h(V) < 0.99).
# A unit tuned by STE (``method.recon.rounding=ste``) has nothing to harden; it reports ``block_at_90`` and
# ``block_final``, the same calibration block loss at 90 % and at 100 % of its budget, and counts as converged when
# the last tenth of the budget lowered it by less than ``STE_PLATEAU`` (the loss has flattened). The runner's console
# and the collector both judge by these functions.

HARDENING_JUMP_LIMIT = 1.2  # block_hard / block_soft of a converged unit
UNDECIDED_LIMIT = 0.02  # share of rounding variables still between 0.01 and 0.99 at the end
STE_PLATEAU = 0.01  # STE: largest relative drop of the block loss over the last 10 % of the budget


def converged(unit: Mapping[str, Any]) -> bool:
    """Whether one unit's report meets the criterion (a unit without rounding variables always does)."""
    if "block_final" in unit:
        return unit["block_final"] >= (1.0 - STE_PLATEAU) * unit["block_at_90"]
    if "block_hard" not in unit:
        return True
    return unit["block_hard"] <= HARDENING_JUMP_LIMIT * unit["block_soft"] and unit["undecided"] < UNDECIDED_LIMIT


def unconverged_units(reconstruction: Sequence[Mapping[str, Any]]) -> list[str]:
    """Names of the units of a run's ``reconstruction`` list that miss the criterion."""
    return [str(unit.get("unit")) for unit in reconstruction if not converged(unit)]
