"""The pipeline: named stages strung together by ``run(cfg)``; the Hydra CLI only calls it.

    mode=run:  build -> quantize_and_calibrate -> reconstruct -> export -> score
    mode=eval: load_export ------------------------------------------------> score

Each stage takes what it needs and returns what it built. ``results.json`` is rewritten after every stage with
``status: running``, so a run that stops early leaves what it had computed and never looks complete.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from mgrq_runner.allocator import keep_freed_memory
from mgrq_runner.console import print_projection, print_summary, recon_progress, track
from mgrq_runner.data import DataBundle, build_data, create_loader, read_calibration_list, resolved_data_config
from mgrq_runner.devices import CPU_CORES, cpu_threads, resolve_device, warn_if_cpu_busy
from mgrq_runner.distributed import evaluate_distributed
from mgrq_runner.errors import ConfigError, Interrupted, ModelError, error_message
from mgrq_runner.evaluate import EvalResult, evaluate
from mgrq_runner.export import export_quantized, file_sha256, load_quantized, read_manifest
from mgrq_runner.models import PROXIES, create_model
from mgrq_runner.onnx_export import OnnxRuntimeModel, export_onnx, integer_kernels
from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.recon import (
    LossConfig,
    LossCurves,
    ReconConfig,
    ReconState,
    StepCallback,
    check_same_config,
    reconstruct,
    reconstruction_summary,
)
from mgrq_runner.recon.projection import project, projection_summary
from mgrq_runner.results import ResultsFile, common_fields, git_revision, library_versions
from mgrq_runner.resume import fingerprint, list_sha256, previous_results, resume_target
from mgrq_runner.rundir import CALIBRATION_LIST, CLASS_LIST, RECON_CURVES, RECON_STATE, locked, results_path
from mgrq_runner.validate import check_values

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """A run's validated settings (``quant`` is None for the FP method, ``recon`` for methods that don't
    reconstruct)."""

    quant: QuantConfig | None
    init: InitConfig | None
    recon: ReconConfig | None
    losses: LossConfig | None
    num_calib: int
    calib_list: list[str] | None = None  # calib.list: the calibration images by name, in order


def quant_settings(cfg: DictConfig) -> tuple[QuantConfig, InitConfig]:
    """Validates the quantization settings before any heavy work."""
    init = cfg.method.init
    quant = QuantConfig(
        w_bits=cfg.quant.w_bits,
        a_bits=cfg.quant.a_bits,
        input_bits=cfg.quant.input_bits,
        softmax_quantizer=init.softmax_quantizer,
    )
    return quant, InitConfig(
        search=init.search,
        percentiles=tuple(init.percentiles),
        reparam=init.reparam,
        observer_samples=init.observer_samples,
    )


def recon_settings(cfg: DictConfig) -> tuple[ReconConfig, LossConfig] | tuple[None, None]:
    """The reconstruction settings of methods that reconstruct (brecq, qdrop, mgrq), validated."""
    if cfg.method.get("recon") is None:
        return None, None
    loss = OmegaConf.to_container(cfg.method.loss, resolve=True)
    assert isinstance(loss, dict)
    loss["local_layers"] = tuple(loss["local_layers"])
    return ReconConfig(**OmegaConf.to_container(cfg.method.recon, resolve=True)), LossConfig(**loss)


def settings(cfg: DictConfig) -> Settings:
    """Every setting of a ``mode=run`` job, validated before any work."""
    check_model_preset(cfg)
    quantize = bool(cfg.method.quantize)
    quant, init = quant_settings(cfg) if quantize else (None, None)
    recon, losses = recon_settings(cfg)
    num_calib = int(cfg.calib.num_images if cfg.calib.num_images is not None else cfg.method.calib_images)
    calib_list = read_calibration_list(cfg.calib.list) if cfg.calib.get("list") is not None else None
    if calib_list is not None:
        if cfg.calib.num_images is not None and int(cfg.calib.num_images) != len(calib_list):
            raise ConfigError(
                f"calib.num_images={cfg.calib.num_images} but calib.list names {len(calib_list)} images. "
                "Fix: drop calib.num_images (the list decides), or list that many images."
            )
        num_calib = len(calib_list)
    if cfg.get("dry_run", False) and recon is None:
        raise ConfigError(
            f"dry_run=true projects a reconstruction, but method {cfg.method.name} does not reconstruct. "
            "Fix: method=brecq, qdrop or mgrq, or drop dry_run."
        )
    return Settings(quant, init, recon, losses, num_calib, calib_list)


def check_model_preset(cfg: DictConfig) -> None:
    """Refuses a timm name put into a proxy preset: the proxy presets bring Fashion-MNIST, not ImageNet."""
    preset, name = cfg.model.get("preset"), str(cfg.model.name)
    if preset in PROXIES and name not in PROXIES:
        raise ConfigError(
            f"model.name={name} replaces the {preset} proxy but keeps its data set ({cfg.data.name}). "
            f"Fix: mgrq-run model=timm model.name={name} (ImageNet data, data.root= or IMAGENET_ROOT)."
        )


def set_threads(cfg: DictConfig) -> None:
    """``threads=N``, else the cores shared among the jobs the launcher runs at once (``cpu_threads``)."""
    requested = cfg.get("threads")
    hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
    threads = cpu_threads(None if requested is None else int(requested), launcher_jobs(hydra_cfg))
    torch.set_num_threads(threads)
    warn_if_cpu_busy(threads)


def launcher_jobs(hydra_cfg: DictConfig | None) -> int:
    """How many jobs the Hydra launcher runs at once: joblib's ``n_jobs`` (-1: one per core); else 1."""
    if hydra_cfg is None or hydra_cfg.mode != RunMode.MULTIRUN:
        return 1
    n_jobs = hydra_cfg.launcher.get("n_jobs")
    if not isinstance(n_jobs, int) or n_jobs == 0:
        return 1
    return n_jobs if n_jobs > 0 else max(1, CPU_CORES + 1 + n_jobs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig, on_step: StepCallback | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Runs one job (``mode=run`` or ``mode=eval``).

    Args:
        cfg: the composed config.
        on_step: also called at every reported reconstruction step (after the loss curves and progress).

    Returns:
        The results (also in ``<output_dir>/results.json``) and the objects built: ``fp_model`` and
        ``quant_model`` (each None where the job has none) and ``data`` (the ``DataBundle``).
    """
    check_values(cfg)
    keep_freed_memory()  # reconstruction's big temporaries are reused instead of faulted in afresh
    set_threads(cfg)
    if cfg.mode == "eval":
        return run_eval(cfg)
    run_dir, resuming = resume_target(cfg.get("resume", False), str(cfg.output_dir))
    if run_dir != Path(cfg.output_dir):
        log.info("resume: run %s, its results are written there", run_dir)
        cfg = copy.deepcopy(cfg)
        cfg.output_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked(run_dir):
        return _run_job(cfg, run_dir, resuming, on_step)


def _run_job(
    cfg: DictConfig, run_dir: Path, resuming: bool, on_step: StepCallback | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``mode=run`` in its own run directory: the done-run shortcut of a resume, the records, the pipeline."""
    job = settings(cfg)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    if job.calib_list is not None:  # the list's contents, for the record and for resume's check
        config["calib"]["list_sha256"] = list_sha256(job.calib_list)
    previous = previous_results(run_dir) if resuming else None
    if previous is not None:
        check_same_config(fingerprint(previous["config"]), fingerprint(config), results_path(run_dir))
        if previous.get("status") == "done":
            log.info("resume: %s is done; its results are returned without recomputing", run_dir)
            print_summary(previous)
            return previous, {"fp_model": None, "quant_model": None, "data": None}
    state = recon_state(run_dir, config, resuming) if job.recon is not None else None
    results_file = ResultsFile(
        results_path(run_dir),
        {
            "model": str(cfg.model.name),
            "preset": cfg.model.get("preset"),
            "method": str(cfg.method.name),
            "w_bits": job.quant.w_bits if job.quant else 32,
            "a_bits": job.quant.a_bits if job.quant else 32,
            **common_fields(cfg, run_dir),
            "config": config,
            **({"resumed_units": state.names} if state is not None and resuming else {}),
        },
    )
    if state is not None:  # results.json says which units a resumed run would keep, until the run is done
        state.on_save = lambda names: results_file.update(
            resumable={"finished_units": names, "state_dir": str(state.directory)}
        )
        state.on_save(state.names)
    with failure_recorded(results_file):
        objects = _pipeline(cfg, job, results_file, state, on_step)
    if results_file.data["status"] == "projected":
        return results_file.data, objects
    if state is not None:
        state.clear()  # a done run is returned as it is when resumed: its units are no longer needed
    print_summary(results_file.data)
    return results_file.data, objects


def recon_state(run_dir: Path, config: dict[str, Any], resuming: bool) -> ReconState:
    """The reconstruction's saved units: an interrupted run's when resuming, else none (an earlier run's are
    dropped)."""
    state = ReconState(run_dir / RECON_STATE, fingerprint(config))
    if resuming:
        state.resume()
    else:
        state.clear()
    return state


@contextmanager
def failure_recorded(results_file: ResultsFile) -> Iterator[None]:
    """Marks results.json ``failed`` (or ``interrupted`` by Ctrl-C or SIGTERM), with the reason, when the block
    raises; the exception goes on."""
    try:
        yield
    except (KeyboardInterrupt, Interrupted) as err:
        reason = f"signal {err.signum}" if isinstance(err, Interrupted) else "KeyboardInterrupt"
        results_file.update(status="interrupted", error=f"interrupted ({reason}); resume with resume=true")
        raise
    except BaseException as err:
        results_file.update(status="failed", error=f"{type(err).__name__}: {error_message(err)}")
        raise


def _pipeline(
    cfg: DictConfig, job: Settings, results_file: ResultsFile, state: ReconState | None, on_step: StepCallback | None
) -> dict[str, Any]:
    seed_everything(int(cfg.seed))
    device = resolve_device(str(cfg.device))
    fp_model, bundle = build(cfg, results_file, job, device)
    models = {"fp": fp_model.to(device)}
    if job.quant is not None and job.init is not None:
        models["quant"], images = quantize_and_calibrate(fp_model, bundle, cfg, job, results_file, device)
        if cfg.get("dry_run", False):
            projection_stage(models, images, cfg, job, results_file)
            return {"fp_model": models["fp"], "quant_model": models["quant"], "data": bundle}
        if job.recon is not None and job.losses is not None:
            reconstruct_stage(models, images, cfg, job, results_file, state, on_step)
        if cfg.get("export", False):  # before evaluation: a failure there still leaves the export
            with results_file.stage("export"):
                export_stage(models["quant"], images, cfg, job, results_file)
    elif cfg.get("export", False):
        log.warning("export=true: method %s does not quantize, nothing to export", cfg.method.name)
    score(models, bundle, cfg, results_file, device)
    results_file.update(num_calib=job.num_calib if job.quant is not None else 0)
    return {"fp_model": models["fp"], "quant_model": models.get("quant"), "data": bundle}


def build(
    cfg: DictConfig, results_file: ResultsFile, job: Settings, device: torch.device
) -> tuple[torch.nn.Module, DataBundle]:
    """Stage ``build_model`` and ``data``: the FP model (on the CPU) and the calibration and evaluation sets."""
    with results_file.stage("build_model"):
        fp_model = create_model(cfg.model)
    with results_file.stage("data"):
        bundle = build_data(cfg.data, fp_model, max(job.num_calib, 1), int(cfg.seed), job.calib_list)
    if bundle.class_names is not None:
        (results_file.path.parent / CLASS_LIST).write_text("\n".join(bundle.class_names) + "\n")
    check_classes(fp_model, bundle, cfg)
    results_file.update(**_model_fields(fp_model, cfg, device))
    return fp_model, bundle


def check_classes(model: torch.nn.Module, bundle: DataBundle, cfg: DictConfig) -> None:
    if model.num_classes != bundle.num_classes and cfg.data.name == "folder":
        raise ConfigError(
            f"model {cfg.model.name} predicts {model.num_classes} classes but the folder data set {cfg.data.root} "
            f"has {bundle.num_classes}. Fix: model.num_classes={bundle.num_classes} with model.checkpoint=<the "
            f"checkpoint fine-tuned on these classes>, or check data.root (classes: {CLASS_LIST} in the run dir)."
        )
    if model.num_classes != bundle.num_classes:
        raise ConfigError(
            f"model {cfg.model.name} predicts {model.num_classes} classes but data {cfg.data.name} has "
            f"{bundle.num_classes}. Fix: pick the model with a preset of its data set (model=deit_s, "
            f"model=timm model.name=<timm arch.tag> for ImageNet; model=proxy_vit for Fashion-MNIST), "
            f"or override data=."
        )


def quantize_and_calibrate(
    fp_model: torch.nn.Module,
    bundle: DataBundle,
    cfg: DictConfig,
    job: Settings,
    results_file: ResultsFile,
    device: Any,
) -> tuple[torch.nn.Module, torch.Tensor]:
    """Stages ``quantize``, ``load_calibration``, ``calibrate``: the calibrated quantized model and the
    calibration images (on the device)."""
    assert job.quant is not None and job.init is not None
    show = bool(cfg.progress)
    (results_file.path.parent / CALIBRATION_LIST).write_text("\n".join(bundle.calibration_ids) + "\n")
    with results_file.stage("quantize"):
        quant_model = quantize_(copy.deepcopy(fp_model), job.quant)
    calib_loader = create_loader(bundle.calibration, int(cfg.calib.batch_size), int(cfg.data.workers))
    with results_file.stage("load_calibration"):
        images = torch.cat([batch[0] for batch in track(calib_loader, len(calib_loader), "load", show)])
        images = images.to(device)
    batches = images.split(int(cfg.calib.batch_size))
    with results_file.stage("calibrate"):
        calibrate(quant_model, track(batches, len(batches), "calibrate", show), len(batches), job.init, device)
    return quant_model, images


def reconstruct_stage(
    models: dict[str, torch.nn.Module],
    images: torch.Tensor,
    cfg: DictConfig,
    job: Settings,
    results_file: ResultsFile,
    state: ReconState | None,
    on_step: StepCallback | None,
) -> None:
    """Stage ``reconstruct``: block-wise reconstruction of ``models["quant"]`` in place; loss curves saved."""
    assert job.recon is not None and job.losses is not None
    curves_path = results_file.path.parent / RECON_CURVES
    with results_file.stage("reconstruct"), recon_progress(bool(cfg.progress)) as progress:
        curves = LossCurves(forward_to=_both(progress, on_step))
        if state is not None and state.units:  # a resumed run keeps its restored units' curves
            curves.restore(curves_path, state.names)
        try:
            reports = reconstruct(
                models["quant"], models["fp"], images, job.recon, job.losses, int(cfg.seed), curves, state
            )
        finally:  # the curves so far are kept when a unit diverges
            curves.save(curves_path)
    results_file.update(reconstruction=reconstruction_summary(reports))


def projection_stage(
    models: dict[str, torch.nn.Module], images: torch.Tensor, cfg: DictConfig, job: Settings, results_file: ResultsFile
) -> None:
    """``dry_run=true``: the projected reconstruction instead of the reconstruction (status ``projected``)."""
    assert job.recon is not None and job.losses is not None
    with results_file.stage("projection"):
        projection = project(models["quant"], models["fp"], images, job.recon, job.losses, int(cfg.seed))
    results_file.update(
        status="projected",
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        projection=projection_summary(projection),
    )
    print_projection(projection)


def _both(first: StepCallback | None, second: StepCallback | None) -> StepCallback | None:
    if first is None or second is None:
        return first or second

    def both(unit: str, step: int, terms: dict[str, float], total: int) -> None:
        first(unit, step, terms, total)
        second(unit, step, terms, total)

    return both


def score(
    models: dict[str, torch.nn.Module],
    bundle: DataBundle,
    cfg: DictConfig,
    results_file: ResultsFile,
    device: torch.device,
) -> dict[str, EvalResult]:
    """Stage ``evaluate``: top-1/top-5 of every model; the last one's are the run's, the FP model's beside them."""
    with results_file.stage("evaluate"):
        scores = _evaluate(models, bundle.evaluation, cfg, device)
    fp, final = scores.get("fp"), list(scores.values())[-1]
    results_file.data.pop("resumable", None)
    results_file.update(
        **_score_fields(scores, fp),
        fp_agreement=round(final.agreement, 5) if fp is not None else None,  # no FP model in an export
    )
    if fp is not None:
        log.info("top-1 %.2f (FP %.2f), agreement %.4f", final.top1, fp.top1, final.agreement)
    else:
        log.info("top-1 %.2f", final.top1)
    return scores


def _model_fields(model: torch.nn.Module, cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Size and preprocessing of the evaluated model (timm results-CSV columns), and the device."""
    preprocessing = resolved_data_config(model, cfg.data)
    return {
        "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "img_size": preprocessing["input_size"][-1],
        "crop_pct": preprocessing.get("crop_pct"),
        "interpolation": preprocessing.get("interpolation"),
        "device": str(device),
        **({"gpu": torch.cuda.get_device_name(device)} if device.type == "cuda" else {}),
    }


def _evaluate(
    models: dict[str, torch.nn.Module], dataset: Any, cfg: DictConfig, device: torch.device
) -> dict[str, EvalResult]:
    """Scores ``models`` on ``dataset``: in this process, or on ``eval.world_size`` spawned ranks."""
    batch_size, workers = int(cfg.data.batch_size), int(cfg.data.workers)
    world_size = int(cfg.eval.world_size)
    if world_size > 1:  # torch.distributed ranks; the same scores as one process
        backend = str(cfg.eval.backend)
        backend = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        return evaluate_distributed(models, dataset, batch_size, world_size, backend, next(iter(models)), workers)
    loader = create_loader(dataset, batch_size, workers)
    return evaluate(models, track(loader, len(loader), "evaluate", bool(cfg.progress)), device)


def _score_fields(scores: dict[str, EvalResult], fp: EvalResult | None) -> dict[str, Any]:
    """The final results.json fields of the last model in ``scores`` (and of the FP one, when evaluated)."""
    quant = list(scores.values())[-1]
    return {
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
    }


def export_stage(
    model: torch.nn.Module, images: torch.Tensor, cfg: DictConfig, job: Settings, results_file: ResultsFile
) -> None:
    """Stage ``export``: the integer codes (safetensors) and, with ``export=onnx``, ``model.onnx`` first (the
    manifest records it)."""
    assert job.quant is not None
    run_dir = results_file.path.parent
    info = export_info(cfg, job.quant, job.num_calib)
    if cfg.export == "onnx":
        info["onnx"] = export_onnx(model, run_dir, images[:2])
    exported = export_quantized(model, run_dir, info)
    if "onnx" in info:
        exported["onnx"] = info["onnx"]
    results_file.update(export=exported)


def export_info(cfg: DictConfig, quant_config: QuantConfig, num_calib: int) -> dict[str, Any]:
    """The run's description in an export manifest."""
    return {
        "model": OmegaConf.to_container(cfg.model, resolve=True),
        "arch": str(cfg.model.name).split(".")[0],
        "method": str(cfg.method.name),
        "w_bits": quant_config.w_bits,
        "a_bits": quant_config.a_bits,
        "quant_config": dataclasses.asdict(quant_config),
        "reparam": bool(cfg.method.init.reparam),
        "dataset": str(cfg.data.name),
        "num_calib": num_calib,
        "seed": int(cfg.seed),
        "source_run_dir": str(cfg.output_dir),
        "versions": library_versions(),
        "git_sha": git_revision(),
    }


def onnxruntime_models(
    model: torch.nn.Module, manifest: dict[str, Any], checkpoint: Path, device: torch.device, results_file: ResultsFile
) -> dict[str, torch.nn.Module]:
    """``eval.runtime=onnxruntime``: the FP model (when its weights can be reloaded), the simulated model and the
    export's ``model.onnx`` under onnxruntime, evaluated in one pass (the last one's scores are the run's)."""
    if "onnx" not in manifest:
        raise ModelError(f"{checkpoint} holds no ONNX export. Fix: re-run that job with export=onnx.")
    path = checkpoint / manifest["onnx"]["file"]
    if not path.is_file() or file_sha256(path) != manifest["onnx"]["sha256"]:
        raise ModelError(
            f"{path} is missing or does not match the checksum in its manifest. Fix: re-run that job with export=onnx."
        )
    models: dict[str, torch.nn.Module] = {}
    model_cfg = manifest["model"]
    if model_cfg.get("pretrained") or model_cfg.get("checkpoint"):  # the FP weights the run started from
        models["fp"] = create_model(OmegaConf.create(model_cfg)).to(device).eval()
    models["simulation"] = model
    models["onnxruntime"] = runtime = OnnxRuntimeModel(path, device)
    results_file.update(onnx={"file": str(path), "providers": runtime.providers, "kernels": integer_kernels(path)})
    return models


def run_eval(cfg: DictConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``mode=eval``: evaluates the model exported in ``checkpoint`` on the current config's data."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with locked(run_dir):
        return _run_eval_job(cfg, run_dir)


def _run_eval_job(cfg: DictConfig, run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if cfg.get("checkpoint") is None:
        raise ConfigError("mode=eval needs a checkpoint. Fix: add checkpoint=<run dir of a run made with export=true>.")
    checkpoint = Path(str(cfg.checkpoint)).expanduser().resolve()
    manifest = read_manifest(checkpoint)
    if manifest["model"]["name"] != str(cfg.model.name):
        raise ModelError(
            f"checkpoint {checkpoint} holds model {manifest['model']['name']} but the config names "
            f"{cfg.model.name}. Fix: add model=<its preset> (or model.name={manifest['model']['name']})."
        )
    results_file = ResultsFile(
        results_path(run_dir),
        {
            "mode": "eval",
            "checkpoint": str(checkpoint),
            "model": manifest["model"]["name"],
            "preset": manifest["model"].get("preset"),
            "method": manifest["method"],
            "w_bits": manifest["w_bits"],
            "a_bits": manifest["a_bits"],
            **common_fields(cfg, run_dir),
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
    )
    num_calib = int(manifest["num_calib"])
    with failure_recorded(results_file):
        seed_everything(int(cfg.seed))
        device = resolve_device(str(cfg.device))
        with results_file.stage("load_checkpoint"):
            model = load_quantized(checkpoint, device)
            models = {"quant": model}
            if cfg.eval.runtime == "onnxruntime":
                models = onnxruntime_models(model, manifest, checkpoint, device, results_file)
        with results_file.stage("data"):  # the exporting run's num_calib: data.eval_split=heldout excludes those images
            bundle = build_data(cfg.data, model, max(num_calib, 1), int(cfg.seed))
        check_classes(model, bundle, cfg)
        results_file.update(**_model_fields(model, cfg, device))
        scores = score(models, bundle, cfg, results_file, device)
        if "onnxruntime" in scores:
            same = scores["onnxruntime"].predictions == scores["simulation"].predictions
            results_file.update(agreement_with_simulation=round(float(same.float().mean()), 5))
        results_file.update(num_calib=num_calib)
    print_summary(results_file.data)
    return results_file.data, {"fp_model": None, "quant_model": model, "data": bundle}
