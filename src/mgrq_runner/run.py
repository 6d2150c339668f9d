"""The pipeline: build the FP model and data, quantize, calibrate, evaluate, write ``results.json``.

``run(cfg)`` is the whole job; the Hydra CLI only calls it. ``results.json`` is rewritten after every stage with
``status: running``, so a run that stops early leaves what it had computed and never looks complete.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import random
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from mgrq_runner.allocator import keep_freed_memory
from mgrq_runner.data import build_data, create_loader, resolved_data_config
from mgrq_runner.distributed import claim_gpu, evaluate_distributed
from mgrq_runner.errors import ConfigError, ModelError
from mgrq_runner.evaluate import EvalResult, evaluate
from mgrq_runner.export import export_quantized, load_quantized, read_manifest
from mgrq_runner.models import PROXIES, create_model
from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.recon.engine import LossConfig, ReconConfig, reconstruct, reconstruction_summary
from mgrq_runner.record import RunRecord, common_fields, git_revision, library_versions
from mgrq_runner.report import LossCurves, print_summary, recon_progress, track
from mgrq_runner.resume import STATE_DIR, ReconState, check_fingerprint, fingerprint, previous_results, resume_target

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "claim":  # a GPU of this process's own, for sweeps on several local GPUs (docs/scale-out.md)
        return torch.device(claim_gpu())
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here. Fix: device=auto or device=cpu.")
    return device


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


def check_model_preset(cfg: DictConfig) -> None:
    """Refuses a timm name put into a proxy preset: the proxy presets bring Fashion-MNIST, not ImageNet."""
    preset, name = cfg.model.get("preset"), str(cfg.model.name)
    if preset in PROXIES and name not in PROXIES:
        raise ConfigError(
            f"model.name={name} replaces the {preset} proxy but keeps its data set ({cfg.data.name}). "
            f"Fix: mgrq-run model=timm model.name={name} (ImageNet data, data.root= or IMAGENET_ROOT)."
        )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs one job and returns its results (also written to ``<output_dir>/results.json``).

    With ``resume=true`` (or ``resume=<run dir>``) a run that is done returns its results as they are, and an
    interrupted one keeps the reconstruction units it had finished.
    """
    keep_freed_memory()  # reconstruction's big temporaries are reused instead of faulted in afresh
    if cfg.get("threads") is not None:
        threads = int(cfg.threads)
        if threads < 1:
            raise ConfigError(
                f"threads={threads} must be >= 1. Fix: threads=1, 2, ... or threads=null (torch's default)."
            )
        torch.set_num_threads(threads)
    mode = str(cfg.get("mode", "run"))
    if mode == "eval":
        run_dir = Path(cfg.output_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_eval(cfg, run_dir)
    if mode != "run":
        raise ConfigError(f"mode={mode!r} is unknown. Fix: mode=run, or mode=eval checkpoint=<exported run dir>.")
    run_dir, resuming = resume_target(cfg.get("resume", False), str(cfg.output_dir))
    if run_dir != Path(cfg.output_dir):
        log.info("resume: run %s, its results are written there", run_dir)
        cfg = copy.deepcopy(cfg)
        cfg.output_dir = str(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    check_model_preset(cfg)
    quantize = bool(cfg.method.quantize)
    quant_config, init_config = quant_settings(cfg) if quantize else (None, None)
    recon_config, loss_config = recon_settings(cfg)
    num_calib = int(cfg.calib.num_images if cfg.calib.num_images is not None else cfg.method.calib_images)
    config = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(config, dict)
    state = None
    if resuming:
        previous = previous_results(run_dir)
        if previous is not None:
            check_fingerprint(fingerprint(previous["config"]), fingerprint(config), run_dir / "results.json")
            if previous.get("status") == "done":
                log.info("resume: %s is done; its results are returned without recomputing", run_dir)
                print_summary(previous)
                return previous
    if recon_config is not None:
        state = ReconState(run_dir / STATE_DIR, fingerprint(config))
        if resuming:
            state.resume()
        else:
            state.clear()  # a fresh run in a used directory: nothing of an earlier run is kept
    record = RunRecord(
        run_dir / "results.json",
        {
            "model": str(cfg.model.name),
            "preset": cfg.model.get("preset"),
            "method": str(cfg.method.name),
            "w_bits": cfg.quant.w_bits if quantize else 32,
            "a_bits": cfg.quant.a_bits if quantize else 32,
            **common_fields(cfg, run_dir),
            "config": config,
            **({"resumed_units": state.names} if state is not None and resuming else {}),
        },
    )
    if state is not None:  # results.json says which units a resumed run would keep, until the run is done
        state.on_save = lambda names: record.update(
            resumable={"finished_units": names, "state_dir": str(state.directory)}
        )
        state.on_save(state.names)
    try:
        results = _pipeline(cfg, record, quant_config, init_config, recon_config, loss_config, num_calib, state)
    except BaseException as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    if state is not None:
        state.clear()  # a done run is returned as it is when resumed: its units are no longer needed
    print_summary(results)
    return results


def _pipeline(
    cfg: DictConfig,
    record: RunRecord,
    quant_config: QuantConfig | None,
    init_config: InitConfig | None,
    recon_config: ReconConfig | None,
    loss_config: LossConfig | None,
    num_calib: int,
    state: ReconState | None = None,
) -> dict[str, Any]:
    seed_everything(int(cfg.seed))
    device = resolve_device(str(cfg.device))
    show = bool(cfg.progress)

    with record.stage("build_model"):
        fp_model = create_model(cfg.model)
    with record.stage("data"):
        bundle = build_data(cfg.data, fp_model, max(num_calib, 1), int(cfg.seed))
    if fp_model.num_classes != bundle.num_classes:
        raise ConfigError(
            f"model {cfg.model.name} predicts {fp_model.num_classes} classes but data "
            f"{cfg.data.name} has {bundle.num_classes}. Fix: pick the model with a preset of its "
            f"data set (model=deit_s model.name=<timm arch.tag> for ImageNet, model=proxy_vit for "
            f"Fashion-MNIST), or override data=."
        )
    record.update(**_model_fields(fp_model, cfg, device))

    models = {"fp": fp_model.to(device)}
    if quant_config is not None and init_config is not None:
        (record.path.parent / "calibration_images.txt").write_text("\n".join(bundle.calibration_ids) + "\n")
        with record.stage("quantize"):
            models["quant"] = quantize_(copy.deepcopy(fp_model), quant_config)
        calib_loader = create_loader(bundle.calibration, int(cfg.calib.batch_size), int(cfg.data.workers))
        with record.stage("load_calibration"):
            images = torch.cat([batch[0] for batch in track(calib_loader, len(calib_loader), "load", show)])
            images = images.to(device)
        batches = images.split(int(cfg.calib.batch_size))
        with record.stage("calibrate"):
            calibrate(
                models["quant"], track(batches, len(batches), "calibrate", show), len(batches), init_config, device
            )
        if recon_config is not None and loss_config is not None:
            with record.stage("reconstruct"), recon_progress(show) as on_step:
                curves = LossCurves(forward_to=on_step)
                curves_path = record.path.parent / "recon_curves.json"
                if state is not None and state.units:  # a resumed run keeps its restored units' curves
                    curves.curves = restored_curves(curves_path, state.names)
                try:
                    reports = reconstruct(
                        models["quant"], models["fp"], images, recon_config, loss_config, int(cfg.seed), curves, state
                    )
                finally:  # the curves so far are kept when a unit diverges
                    curves.save(curves_path)
            record.update(reconstruction=reconstruction_summary(reports))
    if cfg.get("export", False):  # before evaluation: a failure there still leaves the export
        if quant_config is None:
            log.warning("export=true: method %s does not quantize, nothing to export", cfg.method.name)
        else:
            with record.stage("export"):
                info = export_info(cfg, quant_config, num_calib)
                record.update(export=export_quantized(models["quant"], record.path.parent, info))

    with record.stage("evaluate"):
        scores = _evaluate(models, bundle.evaluation, cfg, device, show)
    fp, quant = scores["fp"], scores.get("quant", scores["fp"])
    record.data.pop("resumable", None)
    record.update(
        **_score_fields(scores, fp),
        fp_agreement=round(quant.agreement, 5),
        num_calib=num_calib if quant_config is not None else 0,
    )
    log.info("top-1 %.2f (FP %.2f), agreement %.4f", quant.top1, fp.top1, quant.agreement)
    return record.data


def _model_fields(model: torch.nn.Module, cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Size and preprocessing of the evaluated model (timm results-CSV columns), and the device."""
    preprocessing = resolved_data_config(model, cfg.data)
    return {
        "param_count": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "img_size": preprocessing["input_size"][-1],
        "crop_pct": preprocessing.get("crop_pct"),
        "interpolation": preprocessing.get("interpolation"),
        "device": str(device),
    }


def _evaluate(
    models: dict[str, torch.nn.Module], dataset: Any, cfg: DictConfig, device: torch.device, show: bool
) -> dict[str, EvalResult]:
    """Scores ``models`` on ``dataset``: in this process, or on ``eval.world_size`` spawned ranks."""
    batch_size, workers = int(cfg.data.batch_size), int(cfg.data.workers)
    world_size = int(cfg.eval.world_size)
    if world_size > 1:  # torch.distributed ranks; the same scores as one process
        backend = str(cfg.eval.backend)
        backend = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        return evaluate_distributed(models, dataset, batch_size, world_size, backend, next(iter(models)), workers)
    loader = create_loader(dataset, batch_size, workers)
    return evaluate(models, track(loader, len(loader), "evaluate", show), device)


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


def restored_curves(path: Path, units: list[str]) -> dict[str, dict[str, list[float]]]:
    """The loss curves an interrupted run recorded for ``units`` (empty where it has none)."""
    try:
        curves = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {unit: curves[unit] for unit in units if unit in curves}


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


def run_eval(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """``mode=eval``: evaluates the model exported in ``checkpoint`` on the current config's data."""
    if cfg.get("checkpoint") is None:
        raise ConfigError("mode=eval needs a checkpoint. Fix: add checkpoint=<run dir of a run made with export=true>.")
    checkpoint = Path(str(cfg.checkpoint)).expanduser().resolve()
    manifest = read_manifest(checkpoint)
    if manifest["model"]["name"] != str(cfg.model.name):
        raise ModelError(
            f"checkpoint {checkpoint} holds model {manifest['model']['name']} but the config names "
            f"{cfg.model.name}. Fix: add model=<its preset> (or model.name={manifest['model']['name']})."
        )
    record = RunRecord(
        run_dir / "results.json",
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
    try:
        results = _eval_pipeline(cfg, record, checkpoint, int(manifest["num_calib"]))
    except BaseException as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
    print_summary(results)
    return results


def _eval_pipeline(cfg: DictConfig, record: RunRecord, checkpoint: Path, num_calib: int) -> dict[str, Any]:
    seed_everything(int(cfg.seed))
    device = resolve_device(str(cfg.device))
    show = bool(cfg.progress)
    with record.stage("load_checkpoint"):
        model = load_quantized(checkpoint, device)
    with record.stage("data"):  # the exporting run's num_calib: data.eval_split=heldout excludes those images
        bundle = build_data(cfg.data, model, max(num_calib, 1), int(cfg.seed))
    if model.num_classes != bundle.num_classes:
        raise ConfigError(
            f"model {cfg.model.name} predicts {model.num_classes} classes but data {cfg.data.name} has "
            f"{bundle.num_classes}. Fix: drop the data= override, or pick the checkpoint's data set."
        )
    record.update(**_model_fields(model, cfg, device))
    with record.stage("evaluate"):
        scores = _evaluate({"quant": model}, bundle.evaluation, cfg, device, show)
    record.update(**_score_fields(scores, None), fp_agreement=None, num_calib=num_calib)  # no FP model in an export
    log.info("top-1 %.2f of checkpoint %s", scores["quant"].top1, checkpoint)
    return record.data
