"""The pipeline: build the FP model and data, quantize, calibrate, evaluate, write ``results.json``.

``run(cfg)`` is the whole job; the Hydra CLI only calls it. ``results.json`` is rewritten after every stage with
``status: running``, so a run that stops early leaves what it had computed and never looks complete.
"""

from __future__ import annotations

import copy
import json
import logging
import platform
import random
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
from omegaconf import DictConfig, OmegaConf

from mgrq_runner import __version__
from mgrq_runner.allocator import keep_freed_memory
from mgrq_runner.data import build_data, create_loader, resolved_data_config
from mgrq_runner.errors import ConfigError
from mgrq_runner.evaluate import evaluate
from mgrq_runner.models import create_model
from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.recon.engine import LossConfig, ReconConfig, reconstruct, reconstruction_summary
from mgrq_runner.report import LossCurves, print_summary, recon_progress, track

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here. Fix: device=auto or device=cpu.")
    return device


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


def git_revision() -> str | None:
    """The source tree's commit (with ``-dirty`` if it has uncommitted changes), or None outside git."""
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


class RunRecord:
    """The run's ``results.json``: fields, per-stage wall times, status; written after every change."""

    def __init__(self, path: Path, fields: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {**fields, "status": "running", "times": {}}
        self.write()

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.write()

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage %s", name)
        start = time.perf_counter()
        yield
        self.data["times"][name] = round(time.perf_counter() - start, 3)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.path)


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def run(cfg: DictConfig) -> dict[str, Any]:
    """Runs one job and returns its results (also written to ``<output_dir>/results.json``)."""
    keep_freed_memory()  # reconstruction's big temporaries are reused instead of faulted in afresh
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    quantize = bool(cfg.method.quantize)
    quant_config, init_config = quant_settings(cfg) if quantize else (None, None)
    recon_config, loss_config = recon_settings(cfg)
    num_calib = int(cfg.calib.num_images if cfg.calib.num_images is not None else cfg.method.calib_images)
    record = RunRecord(
        run_dir / "results.json",
        {
            "model": str(cfg.model.name),
            "preset": cfg.model.get("preset"),
            "method": str(cfg.method.name),
            "w_bits": cfg.quant.w_bits if quantize else 32,
            "a_bits": cfg.quant.a_bits if quantize else 32,
            "dataset": str(cfg.data.name),
            "eval_split": str(cfg.data.get("eval_split", "val")),
            "seed": int(cfg.seed),
            "run_dir": str(run_dir),
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "versions": library_versions(),
            "git_sha": git_revision(),
            "config": OmegaConf.to_container(cfg, resolve=True),
        },
    )
    try:
        results = _pipeline(cfg, record, quant_config, init_config, recon_config, loss_config, num_calib)
    except BaseException as err:
        record.update(status="failed", error=f"{type(err).__name__}: {err}")
        raise
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
    preprocessing = resolved_data_config(fp_model, cfg.data)
    record.update(
        param_count=round(sum(p.numel() for p in fp_model.parameters()) / 1e6, 3),
        img_size=preprocessing["input_size"][-1],
        crop_pct=preprocessing.get("crop_pct"),
        interpolation=preprocessing.get("interpolation"),
        device=str(device),
    )

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
                try:
                    reports = reconstruct(
                        models["quant"], models["fp"], images, recon_config, loss_config, int(cfg.seed), curves
                    )
                finally:  # the curves so far are kept when a unit diverges
                    curves.save(record.path.parent / "recon_curves.json")
            record.update(reconstruction=reconstruction_summary(reports))

    eval_loader = create_loader(bundle.evaluation, int(cfg.data.batch_size), int(cfg.data.workers))
    with record.stage("evaluate"):
        scores = evaluate(models, track(eval_loader, len(eval_loader), "evaluate", show), device, reference="fp")
    fp, quant = scores["fp"], scores.get("quant", scores["fp"])
    record.update(
        status="done",
        finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        top1=round(quant.top1, 3),
        top5=round(quant.top5, 3),
        top1_err=round(100 - quant.top1, 3),
        top5_err=round(100 - quant.top5, 3),
        fp_top1=round(fp.top1, 3),
        fp_top5=round(fp.top5, 3),
        fp_agreement=round(quant.agreement, 5),
        num_calib=num_calib if quant_config is not None else 0,
        num_eval=quant.num_images,
        throughput={name: round(score.images_per_second, 1) for name, score in scores.items()},
    )
    log.info("top-1 %.2f (FP %.2f), agreement %.4f", quant.top1, fp.top1, quant.agreement)
    return record.data
