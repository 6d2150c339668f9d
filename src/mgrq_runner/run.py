"""The pipeline: named stages strung together by ``run(cfg)``; the Hydra CLI only calls it.

    mode=run:  build -> load_calibration -> quantize_model (transform, quantize, calibrate, reconstruct or project)
               -> export -> score
    mode=eval: load_export ----------------------------------------------------------> score

``run`` parses the composed config once (``settings.parse_settings``); every stage takes the job's settings
(``RunSettings`` or ``EvalSettings``) and the ``ResultsFile`` it reports into. ``results.json`` is rewritten after
every stage with ``status: running``, so a run that stops early leaves what it had computed and never looks
complete.
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
from mgrq_runner.data import (
    DataBundle,
    build_data,
    check_classes,
    check_export_classes,
    create_loader,
    resolved_data_config,
)
from mgrq_runner.deploy.onnx_export import export_onnx, onnxruntime_models
from mgrq_runner.deploy.safetensors_export import check_export_model, export_quantized, load_quantized, read_manifest
from mgrq_runner.devices import resolve_device, seed_everything, set_threads
from mgrq_runner.distributed import evaluate_models
from mgrq_runner.files import write_text_atomic
from mgrq_runner.models import create_model
from mgrq_runner.quant.api import quantize_
from mgrq_runner.quant.calibrate import calibrate
from mgrq_runner.recon.curves import LossCurves, StepCallback, chain
from mgrq_runner.recon.engine import reconstruct, reconstruction_summary
from mgrq_runner.recon.projection import project, projection_summary
from mgrq_runner.recon.state import ReconState
from mgrq_runner.results import (
    ResultsFile,
    eval_fields,
    export_info,
    failure_recorded,
    model_fields,
    run_fields,
    score_fields,
)
from mgrq_runner.resume import fingerprint, finished_run
from mgrq_runner.rundir import CALIBRATION_LIST, CLASS_LIST, RECON_CURVES, locked, results_path
from mgrq_runner.settings import EvalSettings, JobSettings, RunSettings, parse_settings
from mgrq_runner.tracking import tracked
from mgrq_runner.transforms.pipeline import apply_fp_transforms, transforms_requested

log = logging.getLogger(__name__)

Outcome = tuple[dict[str, Any], dict[str, Any]]  # results.json's data, and the objects built (models, data)
Models = dict[str, torch.nn.Module]  # "fp", "fp_transformed", "quant" (mode=run); "quant", "onnxruntime" (eval)


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


def run_settings(settings: RunSettings | EvalSettings, on_step: StepCallback | None = None) -> Outcome:
    """``run`` on parsed settings."""
    keep_freed_memory()  # reconstruction's big temporaries are reused instead of faulted in afresh
    set_threads(settings.threads, settings.concurrent_jobs)
    if settings.resume:
        log.info("resume: run %s, its results are written there", settings.run_dir)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    with locked(settings.run_dir):
        if isinstance(settings, EvalSettings):
            return _eval_job(settings)
        return _run_job(settings, on_step)


# ---------------------------------------------------------------------------------------------- mode=run


def _run_job(settings: RunSettings, on_step: StepCallback | None) -> Outcome:
    """``mode=run`` in its own run directory: the done-run shortcut of a resume, the records, the pipeline."""
    previous = finished_run(settings.run_dir, dict(settings.config)) if settings.resume else None
    if previous is not None:
        log.info("resume: %s is done; its results are returned without recomputing", settings.run_dir)
        print_summary(previous)
        return previous, {"fp_model": None, "quant_model": None, "data": None}
    state = None
    if settings.method.reconstructs:
        state = ReconState.for_run(settings.run_dir, fingerprint(settings.config), settings.resume)
    resumed = {"resumed_units": state.names} if state is not None and settings.resume else {}
    results_file = ResultsFile(results_path(settings.run_dir), run_fields(settings) | resumed)
    if state is not None:
        state.on_save = results_file.resumable(state.directory)
        state.on_save(state.names)
    with failure_recorded(results_file), tracked(settings) as tracker:  # logger=: checked before any work
        objects = _pipeline(settings, results_file, state, on_step)
    tracker.finish()  # from the files the run wrote: results.json says done whatever the tracker does
    if results_file.data["status"] != "projected":
        if state is not None:
            state.clear()  # a done run is returned as it is when resumed: its units are no longer needed
        print_summary(results_file.data)
    return dict(results_file.data), objects


def _pipeline(
    settings: RunSettings, results_file: ResultsFile, state: ReconState | None, on_step: StepCallback | None
) -> dict[str, Any]:
    seed_everything(settings.seed)
    device = resolve_device(settings.device)
    fp_model, bundle = build(settings, results_file, device)
    if state is not None:  # a resumed run's units were built on the same calibration images and classes, or none
        state.use_data(bundle.identity)
    models: Models = {"fp": fp_model.to(device)}
    method = settings.method
    if method.quant is not None:
        images = load_calibration(bundle, settings, results_file, device)
        quantize_model(models, images, settings, results_file, state, on_step)
        if settings.dry_run:
            return {"fp_model": models["fp"], "quant_model": models["quant"], "data": bundle}
        if settings.export:  # before evaluation: a failure there still leaves the export
            with results_file.stage("export"):
                exported = export_model(models["quant"], images, bundle.identity, settings, settings.run_dir)
            results_file.update(export=exported)
    elif settings.export:
        log.warning("export=true: method %s does not quantize, nothing to export", method.name)
    score(models, bundle, settings, results_file, device)
    results_file.update(num_calib=settings.calib.num_images if method.quant is not None else 0)
    return {"fp_model": models["fp"], "quant_model": models.get("quant"), "data": bundle}


def build(settings: RunSettings, results_file: ResultsFile, device: torch.device) -> tuple[torch.nn.Module, DataBundle]:
    """Stages ``build_model`` and ``data``: the FP model (on the CPU) and the calibration and evaluation sets."""
    calib = settings.calib
    with results_file.stage("build_model"):
        fp_model = create_model(settings.model)
    with results_file.stage("data"):
        bundle = build_data(settings.data, fp_model, max(calib.num_images, 1), settings.seed, calib.entries)
    if bundle.class_names is not None:
        write_text_atomic(settings.run_dir / CLASS_LIST, "\n".join(bundle.class_names) + "\n")
    check_classes(fp_model, settings.model.name, bundle, settings.data)
    results_file.update(
        data_identity=bundle.identity, **model_fields(fp_model, resolved_data_config(fp_model, settings.data), device)
    )
    return fp_model, bundle


def load_calibration(
    bundle: DataBundle, settings: RunSettings, results_file: ResultsFile, device: torch.device
) -> torch.Tensor:
    """Stage ``load_calibration``: the calibration images, on the device; their identifiers listed in the run dir."""
    write_text_atomic(settings.run_dir / CALIBRATION_LIST, "\n".join(bundle.calibration_ids) + "\n")
    calib_loader = create_loader(bundle.calibration, settings.calib.batch_size, settings.data.workers)
    with results_file.stage("load_calibration"):
        images = torch.cat([batch[0] for batch in track(calib_loader, len(calib_loader), "load", settings.progress)])
        return images.to(device)


def quantize_model(
    models: Models,
    images: torch.Tensor,
    settings: RunSettings,
    results_file: ResultsFile,
    state: ReconState | None = None,
    on_step: StepCallback | None = None,
) -> None:
    """The method on ``models["fp"]`` and the calibration ``images``: ``calibrated_model``, then stage
    ``reconstruct`` (or, with ``dry_run``, ``projection``). The CLI's pipeline and the Python API
    (``mgrq_runner.quantize``) both call it, so the two cannot drift."""
    calibrated_model(models, images, settings, results_file)
    if settings.dry_run:
        projection_stage(models, images, settings, results_file)
    elif settings.method.reconstructs:
        reconstruct_stage(models, images, settings, results_file, state, on_step)


def calibrated_model(models: Models, images: torch.Tensor, settings: RunSettings, results_file: ResultsFile) -> None:
    """Stages ``transform`` (when the method rotates the FP model or re-trains its MLPs: the transformed FP model
    joins ``models`` as ``fp_transformed``), ``quantize`` and ``calibrate``: the calibrated model joins ``models``
    as ``quant``. A ``dry_run``'s transform swaps the MLPs' activations without re-training them: the projection
    times the reconstruction of that structure."""
    method, show = settings.method, settings.progress
    assert method.quant is not None and method.init is not None
    if transforms_requested(method):  # ReLU MLPs re-trained, a rotation: on a copy, recorded in fp_transform
        with results_file.stage("transform"):
            models["fp_transformed"] = transformed = copy.deepcopy(models["fp"])
            dry_run = settings.dry_run  # the ReLU swap without re-training: the projection needs the structure only
            results_file.update(fp_transform=apply_fp_transforms(transformed, images, method, settings.seed, dry_run))
            transformed.eval()
    with results_file.stage("quantize"):
        models["quant"] = quantize_(copy.deepcopy(teacher(models)), method.quant)
    batches = images.split(settings.calib.batch_size)
    with results_file.stage("calibrate"):
        calibrate(
            models["quant"], track(batches, len(batches), "calibrate", show), len(batches), method.init, images.device
        )


def teacher(models: Models) -> torch.nn.Module:
    """The FP model the quantized one is made from and reconstructed against: the transformed one, if any."""
    return models.get("fp_transformed", models["fp"])


def reconstruct_stage(
    models: Models,
    images: torch.Tensor,
    settings: RunSettings,
    results_file: ResultsFile,
    state: ReconState | None,
    on_step: StepCallback | None,
) -> None:
    """Stage ``reconstruct``: block-wise reconstruction of ``models["quant"]`` in place; loss curves saved."""
    method = settings.method
    assert method.recon is not None and method.losses is not None
    with results_file.stage("reconstruct"), recon_progress(settings.progress) as progress:
        curves = LossCurves(settings.run_dir / RECON_CURVES, forward_to=chain(progress, on_step))
        if state is not None and state.units:  # a resumed run keeps its restored units' curves
            curves.restore(state.names)
        try:
            reports = reconstruct(
                models["quant"], teacher(models), images, method.recon, method.losses, settings.seed, curves, state
            )
        finally:  # the curves so far are kept when a unit diverges
            curves.save()
    results_file.update(reconstruction=reconstruction_summary(reports))


def projection_stage(models: Models, images: torch.Tensor, settings: RunSettings, results_file: ResultsFile) -> None:
    """``dry_run=true``: the projected reconstruction instead of the reconstruction (status ``projected``)."""
    method = settings.method
    assert method.recon is not None and method.losses is not None
    with results_file.stage("projection"):
        projection = project(models["quant"], teacher(models), images, method.recon, method.losses, settings.seed)
    results_file.update(
        status="projected",
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        projection=projection_summary(projection),
    )
    print_projection(projection)


def export_model(
    model: torch.nn.Module, sample: torch.Tensor, data_identity: dict[str, Any], settings: RunSettings, directory: Path
) -> dict[str, Any]:
    """Stage ``export`` (and ``QuantizedModel.export``): the integer codes (safetensors) into ``directory`` and,
    with ``export=onnx``, ``model.onnx`` first, traced on two ``sample`` images (the manifest records it, and the
    data the model was calibrated on: ``mode=eval`` checks its classes). Returns what was written."""
    info = {**export_info(settings), "data_identity": data_identity}
    if settings.export_onnx:
        info["onnx"] = export_onnx(model, directory, sample[:2], settings.onnx_int8_weights)
    exported = export_quantized(model, directory, info, settings.signing_key())
    if "onnx" in info:
        exported["onnx"] = info["onnx"]
    return exported


# ---------------------------------------------------------------------------------------------- both modes


def score(
    models: Models, bundle: DataBundle, settings: JobSettings, results_file: ResultsFile, device: torch.device
) -> None:
    """Stage ``evaluate``: top-1/top-5 of every model; the last one's are the run's, the FP model's beside them."""
    with results_file.stage("evaluate"):
        scores = evaluate_models(models, bundle.evaluation, settings, device)
    results_file.data.pop("resumable", None)
    results_file.update(**score_fields(scores))
    final, fp = list(scores.values())[-1], scores.get("fp")
    log.info("top-1 %.2f%s", final.top1, f" (FP {fp.top1:.2f}), agreement {final.agreement:.4f}" if fp else "")
    warning = chance_warning(fp.top1 if fp is not None else final.top1, bundle.num_classes, fp is not None)
    if warning is not None:
        log.warning(warning)
        results_file.update(warnings=[warning])


def chance_warning(top1: float, num_classes: int, is_fp: bool) -> str | None:
    """A model that scores no better than chance on a data set of its own classes most likely reads the labels in
    another order (a permuted classes.txt, renamed class folders): said, though the run completes."""
    chance = 100.0 / max(num_classes, 1)
    if num_classes < 2 or top1 > chance:
        return None
    return (
        f"the {'FP' if is_fp else 'exported'} model scores {top1:.2f} % top-1, no better than chance ({chance:.2f} % "
        f"for {num_classes} classes): the labels are likely not in the model's class order. Fix: check classes.txt "
        "(or the class folders' names) against the order the model was trained with."
    )


# ---------------------------------------------------------------------------------------------- mode=eval


def _eval_job(settings: EvalSettings) -> Outcome:
    """``mode=eval``: evaluates the model exported in ``checkpoint`` on the current config's data."""
    manifest = read_manifest(settings.checkpoint, settings.signing_key())
    check_export_model(manifest, settings.checkpoint, settings.model.name)
    results_file = ResultsFile(results_path(settings.run_dir), eval_fields(settings, manifest))
    num_calib = int(manifest["num_calib"])
    with failure_recorded(results_file), tracked(settings) as tracker:
        seed_everything(settings.seed)
        device = resolve_device(settings.device)
        model, models = load_export(manifest, settings, results_file, device)
        with results_file.stage("data"):  # the exporting run's num_calib: data.eval_split=heldout excludes those images
            bundle = build_data(settings.data, model, max(num_calib, 1), settings.seed)
        check_classes(model, settings.model.name, bundle, settings.data)
        check_export_classes(manifest, bundle, settings.checkpoint)
        results_file.update(**model_fields(model, resolved_data_config(model, settings.data), device))
        score(models, bundle, settings, results_file, device)  # onnxruntime: and its agreement with the simulation
        results_file.update(num_calib=num_calib)
    tracker.finish()
    print_summary(results_file.data)
    return dict(results_file.data), {"fp_model": None, "quant_model": model, "data": bundle}


def load_export(
    manifest: dict[str, Any], settings: EvalSettings, results_file: ResultsFile, device: torch.device
) -> tuple[torch.nn.Module, Models]:
    """Stage ``load_checkpoint``: the exported model, and the models to score: that one (``quant``), or with
    ``eval.runtime=onnxruntime`` the FP model, the simulation and ``model.onnx`` under onnxruntime."""
    with results_file.stage("load_checkpoint"):
        model = load_quantized(settings.checkpoint, device, key=settings.signing_key())
        if settings.eval.runtime != "onnxruntime":
            return model, {"quant": model}
        models, onnx_record = onnxruntime_models(model, manifest, settings.checkpoint, device)
        results_file.update(onnx=onnx_record)
        return model, models
