"""The pipeline: named stages strung together by ``run(cfg)``; the Hydra CLI only calls it.

    mode=run:  build -> quantize_and_calibrate (with the FP transform) -> reconstruct (or project) -> export -> score
    mode=eval: load_export ----------------------------------------------------------> score

``run`` parses the composed config once (``settings.parse_settings``); every stage takes the ``RunSettings`` and
the ``ResultsFile`` it reports into. ``results.json`` is rewritten after every stage with ``status: running``, so
a run that stops early leaves what it had computed and never looks complete.
"""

from __future__ import annotations

import copy
import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from mgrq_runner.allocator import keep_freed_memory
from mgrq_runner.console import print_projection, print_summary, recon_progress, track
from mgrq_runner.data import DataBundle, build_data, create_loader, resolved_data_config
from mgrq_runner.deploy.onnx_export import export_onnx, onnxruntime_models
from mgrq_runner.deploy.safetensors_export import export_quantized, load_quantized, read_manifest
from mgrq_runner.devices import resolve_device, seed_everything, set_threads
from mgrq_runner.distributed import evaluate_distributed
from mgrq_runner.errors import ConfigError, ModelError
from mgrq_runner.evaluate import EvalResult, evaluate
from mgrq_runner.files import write_text_atomic
from mgrq_runner.models import create_model
from mgrq_runner.quant.api import quantize_
from mgrq_runner.quant.calibrate import calibrate
from mgrq_runner.recon.curves import LossCurves, StepCallback
from mgrq_runner.recon.engine import reconstruct, reconstruction_summary
from mgrq_runner.recon.projection import project, projection_summary
from mgrq_runner.recon.state import ReconState, check_same_config
from mgrq_runner.results import (
    ResultsFile,
    eval_fields,
    export_info,
    failure_recorded,
    model_fields,
    run_fields,
    score_fields,
)
from mgrq_runner.resume import check_same_question, fingerprint, previous_results
from mgrq_runner.rundir import (
    CALIBRATION_LIST,
    CLASS_LIST,
    RECON_CURVES,
    RECON_STATE,
    locked,
    results_path,
)
from mgrq_runner.settings import RunSettings, parse_settings
from mgrq_runner.tracking import tracked
from mgrq_runner.transforms.pipeline import apply_fp_transforms

log = logging.getLogger(__name__)

Outcome = tuple[dict[str, Any], dict[str, Any]]  # results.json's data, and the objects built (models, data)


def run(cfg: DictConfig, on_step: StepCallback | None = None) -> Outcome:
    """Runs one job (``mode=run`` or ``mode=eval``) of a composed config.

    Args:
        cfg: the composed config; parsed and checked before any work.
        on_step: also called at every reported reconstruction step (after the loss curves and progress).

    Returns:
        The results (also in ``<run dir>/results.json``) and the objects built: ``fp_model`` and
        ``quant_model`` (each None where the job has none) and ``data`` (the ``DataBundle``).
    """
    return run_settings(parse_settings(cfg), on_step)


def run_settings(settings: RunSettings, on_step: StepCallback | None = None) -> Outcome:
    """``run`` on parsed settings."""
    keep_freed_memory()  # reconstruction's big temporaries are reused instead of faulted in afresh
    set_threads(settings.threads, settings.concurrent_jobs)
    if settings.resume:
        log.info("resume: run %s, its results are written there", settings.run_dir)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with locked(settings.run_dir):
        return _run_eval_job(settings) if settings.mode == "eval" else _run_job(settings, on_step)


# ---------------------------------------------------------------------------------------------- mode=run


def _run_job(settings: RunSettings, on_step: StepCallback | None) -> Outcome:
    """``mode=run`` in its own run directory: the done-run shortcut of a resume, the records, the pipeline."""
    assert settings.method is not None
    previous = previous_results(settings.run_dir) if settings.resume else None
    if previous is not None:
        check_same_config(fingerprint(previous["config"]), fingerprint(settings.config), results_path(settings.run_dir))
        if previous.get("status") == "done":
            check_same_question(previous["config"], dict(settings.config), settings.run_dir)
            log.info("resume: %s is done; its results are returned without recomputing", settings.run_dir)
            print_summary(previous)
            return previous, {"fp_model": None, "quant_model": None, "data": None}
    state = recon_state(settings) if settings.method.reconstructs else None
    fields = run_fields(settings)
    if state is not None and settings.resume:
        fields["resumed_units"] = state.names
    results_file = ResultsFile(results_path(settings.run_dir), fields)
    if state is not None:  # results.json says which units a resumed run would keep, until the run is done
        state.on_save = lambda names: results_file.update(
            resumable={"finished_units": names, "state_dir": str(state.directory)}
        )
        state.on_save(state.names)
    with failure_recorded(results_file), tracked(settings) as tracker:  # logger=: checked before any work
        objects = _pipeline(settings, results_file, state, on_step)
    tracker.finish()  # from the files the run wrote: results.json says done whatever the tracker does
    if results_file.data["status"] == "projected":
        return dict(results_file.data), objects
    if state is not None:
        state.clear()  # a done run is returned as it is when resumed: its units are no longer needed
    print_summary(results_file.data)
    return dict(results_file.data), objects


def recon_state(settings: RunSettings) -> ReconState:
    """The reconstruction's saved units: an interrupted run's when resuming, else none (an earlier run's are
    dropped)."""
    state = ReconState(settings.run_dir / RECON_STATE, fingerprint(settings.config))
    if settings.resume:
        state.resume()
    else:
        state.clear()
    return state


def _pipeline(
    settings: RunSettings, results_file: ResultsFile, state: ReconState | None, on_step: StepCallback | None
) -> dict[str, Any]:
    assert settings.method is not None and settings.calib is not None
    seed_everything(settings.seed)
    device = resolve_device(settings.device)
    fp_model, bundle = build(settings, results_file, device)
    if state is not None:  # a resumed run's units were built on the same calibration images and classes, or none
        state.use_data(bundle.identity)
    models = {"fp": fp_model.to(device)}
    if settings.method.quant is not None:
        models["quant"], images = quantize_and_calibrate(models, bundle, settings, results_file, device)
        if settings.dry_run:
            projection_stage(models, images, settings, results_file)
            return {"fp_model": models["fp"], "quant_model": models["quant"], "data": bundle}
        if settings.method.reconstructs:
            reconstruct_stage(models, images, settings, results_file, state, on_step)
        if settings.export:  # before evaluation: a failure there still leaves the export
            with results_file.stage("export"):
                export_stage(models["quant"], images, bundle, settings, results_file)
    elif settings.export:
        log.warning("export=true: method %s does not quantize, nothing to export", settings.method.name)
    score(models, bundle, settings, results_file, device)
    results_file.update(num_calib=settings.calib.num_images if settings.method.quant is not None else 0)
    return {"fp_model": models["fp"], "quant_model": models.get("quant"), "data": bundle}


def build(settings: RunSettings, results_file: ResultsFile, device: torch.device) -> tuple[torch.nn.Module, DataBundle]:
    """Stages ``build_model`` and ``data``: the FP model (on the CPU) and the calibration and evaluation sets."""
    assert settings.calib is not None
    calib = settings.calib
    with results_file.stage("build_model"):
        fp_model = create_model(settings.model)
    with results_file.stage("data"):
        bundle = build_data(settings.data, fp_model, max(calib.num_images, 1), settings.seed, calib.entries)
    if bundle.class_names is not None:
        write_text_atomic(settings.run_dir / CLASS_LIST, "\n".join(bundle.class_names) + "\n")
    check_classes(fp_model, bundle, settings)
    results_file.update(
        data_identity=bundle.identity, **model_fields(fp_model, resolved_data_config(fp_model, settings.data), device)
    )
    return fp_model, bundle


def check_classes(model: torch.nn.Module, bundle: DataBundle, settings: RunSettings) -> None:
    name, data = settings.model.name, settings.data
    if model.num_classes != bundle.num_classes and data.name == "folder":
        raise ConfigError(
            f"model {name} predicts {model.num_classes} classes but the folder data set {data.root} "
            f"has {bundle.num_classes}. Fix: model.num_classes={bundle.num_classes} with model.checkpoint=<the "
            f"checkpoint fine-tuned on these classes>, or check data.root (classes: {CLASS_LIST} in the run dir)."
        )
    if model.num_classes != bundle.num_classes:
        raise ConfigError(
            f"model {name} predicts {model.num_classes} classes but data {data.name} has "
            f"{bundle.num_classes}. Fix: pick the model with a preset of its data set (model=deit_s, "
            f"model=timm model.name=<timm arch.tag> for ImageNet; model=proxy_vit for Fashion-MNIST), "
            f"or override data=."
        )


def quantize_and_calibrate(
    models: dict[str, torch.nn.Module],
    bundle: DataBundle,
    settings: RunSettings,
    results_file: ResultsFile,
    device: Any,
) -> tuple[torch.nn.Module, torch.Tensor]:
    """Stages ``load_calibration``, ``transform`` (when the method rotates the FP model or re-trains its MLPs:
    the transformed FP model joins ``models`` as ``fp_transformed``), ``quantize``, ``calibrate``: the calibrated
    quantized model and the calibration images (on the device)."""
    method, calib, show = settings.method, settings.calib, settings.progress
    assert method is not None and method.quant is not None and method.init is not None and calib is not None
    write_text_atomic(settings.run_dir / CALIBRATION_LIST, "\n".join(bundle.calibration_ids) + "\n")
    calib_loader = create_loader(bundle.calibration, calib.batch_size, settings.data.workers)
    with results_file.stage("load_calibration"):
        images = torch.cat([batch[0] for batch in track(calib_loader, len(calib_loader), "load", show)])
        images = images.to(device)
    if method.init.rotation != "none" or method.mlp_relu is not None:
        with results_file.stage("transform"):
            models["fp_transformed"] = transform_fp_model(models["fp"], images, settings, results_file)
    with results_file.stage("quantize"):
        quant_model = quantize_(copy.deepcopy(teacher(models)), method.quant)
    batches = images.split(calib.batch_size)
    with results_file.stage("calibrate"):
        calibrate(quant_model, track(batches, len(batches), "calibrate", show), len(batches), method.init, device)
    return quant_model, images


def teacher(models: dict[str, torch.nn.Module]) -> torch.nn.Module:
    """The FP model the quantized one is made from and reconstructed against: the transformed one, if any."""
    return models.get("fp_transformed", models["fp"])


def transform_fp_model(
    fp_model: torch.nn.Module, images: torch.Tensor, settings: RunSettings, results_file: ResultsFile
) -> torch.nn.Module:
    """A copy of ``fp_model`` with its MLPs' GELU replaced by ReLU and re-trained (``method.init.mlp_relu``), then
    rotated (``method.init.rotation``); what each did goes to results.json's ``fp_transform``. A ``dry_run`` swaps
    the activations without re-training: the projection times the reconstruction of that structure only."""
    method = settings.method
    assert method is not None and method.init is not None
    model = copy.deepcopy(fp_model)
    results_file.update(fp_transform=apply_fp_transforms(model, images, method, settings.seed, settings.dry_run))
    return model.eval()


def reconstruct_stage(
    models: dict[str, torch.nn.Module],
    images: torch.Tensor,
    settings: RunSettings,
    results_file: ResultsFile,
    state: ReconState | None,
    on_step: StepCallback | None,
) -> None:
    """Stage ``reconstruct``: block-wise reconstruction of ``models["quant"]`` in place; loss curves saved."""
    method = settings.method
    assert method is not None and method.recon is not None and method.losses is not None
    with results_file.stage("reconstruct"), recon_progress(settings.progress) as progress:
        curves = LossCurves(settings.run_dir / RECON_CURVES, forward_to=_both(progress, on_step))
        if state is not None and state.units:  # a resumed run keeps its restored units' curves
            curves.restore(state.names)
        try:
            reports = reconstruct(
                models["quant"], teacher(models), images, method.recon, method.losses, settings.seed, curves, state
            )
        finally:  # the curves so far are kept when a unit diverges
            curves.save()
    results_file.update(reconstruction=reconstruction_summary(reports))


def projection_stage(
    models: dict[str, torch.nn.Module], images: torch.Tensor, settings: RunSettings, results_file: ResultsFile
) -> None:
    """``dry_run=true``: the projected reconstruction instead of the reconstruction (status ``projected``)."""
    method = settings.method
    assert method is not None and method.recon is not None and method.losses is not None
    with results_file.stage("projection"):
        projection = project(models["quant"], teacher(models), images, method.recon, method.losses, settings.seed)
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


def export_stage(
    model: torch.nn.Module, images: torch.Tensor, bundle: DataBundle, settings: RunSettings, results_file: ResultsFile
) -> None:
    """Stage ``export``: the integer codes (safetensors) and, with ``export=onnx``, ``model.onnx`` first (the
    manifest records it, and the data the model was calibrated on: ``mode=eval`` checks its classes)."""
    info = {**export_info(settings), "data_identity": bundle.identity}
    if settings.export_onnx:
        info["onnx"] = export_onnx(model, settings.run_dir, images[:2], settings.onnx_int8_weights)
    exported = export_quantized(model, settings.run_dir, info)
    if "onnx" in info:
        exported["onnx"] = info["onnx"]
    results_file.update(export=exported)


# ---------------------------------------------------------------------------------------------- both modes


def score(
    models: dict[str, torch.nn.Module],
    bundle: DataBundle,
    settings: RunSettings,
    results_file: ResultsFile,
    device: torch.device,
) -> dict[str, EvalResult]:
    """Stage ``evaluate``: top-1/top-5 of every model; the last one's are the run's, the FP model's beside them."""
    with results_file.stage("evaluate"):
        scores = _evaluate(models, bundle.evaluation, settings, device)
    results_file.data.pop("resumable", None)
    results_file.update(**score_fields(scores))
    final, fp = list(scores.values())[-1], scores.get("fp")
    if fp is not None:
        log.info("top-1 %.2f (FP %.2f), agreement %.4f", final.top1, fp.top1, final.agreement)
    else:
        log.info("top-1 %.2f", final.top1)
    return scores


def _evaluate(
    models: dict[str, torch.nn.Module], dataset: Any, settings: RunSettings, device: torch.device
) -> dict[str, EvalResult]:
    """Scores ``models`` on ``dataset``: in this process, or on ``eval.world_size`` spawned ranks."""
    batch_size, workers, world_size = settings.data.batch_size, settings.data.workers, settings.eval.world_size
    if world_size > 1:  # torch.distributed ranks; the same scores as one process
        backend = settings.eval.backend
        backend = ("nccl" if device.type == "cuda" else "gloo") if backend == "auto" else backend
        return evaluate_distributed(models, dataset, batch_size, world_size, backend, next(iter(models)), workers)
    loader = create_loader(dataset, batch_size, workers)
    return evaluate(models, track(loader, len(loader), "evaluate", settings.progress), device)


# ---------------------------------------------------------------------------------------------- mode=eval


def _run_eval_job(settings: RunSettings) -> Outcome:
    """``mode=eval``: evaluates the model exported in ``checkpoint`` on the current config's data."""
    checkpoint = settings.checkpoint
    assert checkpoint is not None
    manifest = read_manifest(checkpoint)
    if manifest["model"]["name"] != settings.model.name:
        raise ModelError(
            f"checkpoint {checkpoint} holds model {manifest['model']['name']} but the config names "
            f"{settings.model.name}. Fix: add model=<its preset> (or model.name={manifest['model']['name']})."
        )
    results_file = ResultsFile(results_path(settings.run_dir), eval_fields(settings, manifest))
    num_calib = int(manifest["num_calib"])
    with failure_recorded(results_file), tracked(settings) as tracker:
        seed_everything(settings.seed)
        device = resolve_device(settings.device)
        with results_file.stage("load_checkpoint"):
            model = load_quantized(checkpoint, device)
            models = {"quant": model}
            if settings.eval.runtime == "onnxruntime":
                models, onnx_record = onnxruntime_models(model, manifest, checkpoint, device)
                results_file.update(onnx=onnx_record)
        with results_file.stage("data"):  # the exporting run's num_calib: data.eval_split=heldout excludes those images
            bundle = build_data(settings.data, model, max(num_calib, 1), settings.seed)
        check_classes(model, bundle, settings)
        check_export_classes(manifest, bundle, checkpoint)
        results_file.update(**model_fields(model, resolved_data_config(model, settings.data), device))
        scores = score(models, bundle, settings, results_file, device)
        if "onnxruntime" in scores:
            same = scores["onnxruntime"].predictions == scores["simulation"].predictions
            results_file.update(agreement_with_simulation=round(float(same.float().mean()), 5))
        results_file.update(num_calib=num_calib)
    tracker.finish()
    print_summary(results_file.data)
    return dict(results_file.data), {"fp_model": None, "quant_model": model, "data": bundle}


def check_export_classes(manifest: dict[str, Any], bundle: DataBundle, checkpoint: Path) -> None:
    """The evaluation data's classes, in label order, are the ones the export was calibrated with (a folder data
    set numbers its classes by its own folders or classes.txt: another order scores at chance)."""
    exported, mine = (manifest.get("data_identity") or {}).get("classes"), bundle.class_names
    if exported is None or mine is None or exported == mine:  # a built-in data set's labels carry no names
        return
    first = next(i for i in range(max(len(exported), len(mine))) if exported[i : i + 1] != mine[i : i + 1])
    there, here = (names[first] if first < len(names) else "none" for names in (exported, mine))
    raise ConfigError(
        f"the data's classes are not those {checkpoint} was exported with (label {first}: {there} there, {here} "
        f"here). Fix: data.root=<the tree it was made on>, or put the export's {CLASS_LIST} (in {checkpoint}) at "
        "the data root."
    )
