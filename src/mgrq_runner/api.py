"""The Python API: quantize a timm ViT/DeiT/Swin that is already in memory, on calibration images in memory.

    import mgrq_runner
    qmodel = mgrq_runner.quantize(model, calib_loader, method="mgrq", w_bits=4, a_bits=4,
                                  overrides=["model.recon_iters=2000"])
    mgrq_runner.evaluate(qmodel, test_loader)   # {"top1": ..., "top5": ..., "num_images": ...}
    qmodel.export("w4a4")                       # quantized_model.safetensors + .json (onnx=True: and model.onnx)
    same = mgrq_runner.load("w4a4", model)      # the export on the FP architecture it came from

Methods, bit widths and overrides are the CLI's (``conf/``: ``method=``, ``quant.w_bits=``, any ``key=value``):
the config is composed by Hydra and checked by the CLI's own parser, and the work is the CLI pipeline's own
``run.quantize_model``, so ``mgrq-run`` and this API give the same model for the same images and seed. The
budget is the ``in_memory`` model preset's (the literature's ImageNet budget) unless overrides change it.
The caller's model, its RNG state and torch's thread count are left as they were.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mgrq_runner.deploy.safetensors_export import load_quantized
from mgrq_runner.deploy.signing import signing_key
from mgrq_runner.devices import resolve_device
from mgrq_runner.errors import ConfigError, DataError, ModelError
from mgrq_runner.models import unsupported_part
from mgrq_runner.presets import CONFIG_DIR
from mgrq_runner.results import ResultsFile, failure_recorded, model_fields, run_fields
from mgrq_runner.run import export_model, quantize_model
from mgrq_runner.rundir import results_path
from mgrq_runner.scoring import evaluate as evaluate_models
from mgrq_runner.settings import RunSettings, check_overrides, parse_settings, require_deploy

Calibration = torch.Tensor | Dataset | DataLoader | Iterable[Any]


class QuantizedModel(nn.Module):
    """The quantized model (simulated quantization: a float ``nn.Module`` whose weights and activations take
    their quantization grids' values), with the run's record.

    Attributes:
        model: the quantized timm model itself.
        record: the run's record, the fields of a CLI run's ``results.json`` that apply (no scores: the API
            evaluates nothing by itself; ``reconstruction`` holds every unit's loss terms and convergence).
    """

    def __init__(self, model: nn.Module, record: dict[str, Any], settings: RunSettings, sample: torch.Tensor) -> None:
        super().__init__()
        self.model = model
        self.record = record
        self._settings = settings
        self._sample = sample  # two calibration images: the ONNX export traces the model on them

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def export(self, directory: str | Path, onnx: bool = False, sign_key_env: str | None = None) -> dict[str, Any]:
        """Writes ``quantized_model.safetensors`` (integer weight codes) and its manifest ``quantized_model.json``
        into ``directory``; with ``onnx``, ``model.onnx`` too (needs ``pip install 'mgrq-runner[deploy]'``).
        ``mgrq_runner.load`` and ``mgrq-run mode=eval checkpoint=<directory>`` read it. Returns what was written
        (files, sizes). ``sign_key_env=NAME`` signs the manifest with the key in environment variable NAME
        (docs/deploy.md)."""
        if onnx:
            require_deploy()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        settings = replace(self._settings, export=True, export_onnx=onnx, sign_key_env=sign_key_env)
        return export_model(self.model, self._sample, self.record["data_identity"], settings, directory)


def quantize(
    model: nn.Module,
    calibration: Calibration,
    method: str = "mgrq",
    w_bits: int = 4,
    a_bits: int = 4,
    *,
    overrides: Sequence[str] | Mapping[str, Any] = (),
    seed: int = 0,
    device: str = "auto",
    progress: bool = False,
    run_dir: str | Path | None = None,
) -> QuantizedModel:
    """Quantizes a copy of ``model`` with a method preset of the CLI.

    Args:
        model: a timm ViT, DeiT or Swin (any weights, any head); not modified.
        calibration: preprocessed images (what the model takes): an ``(N, C, H, W)`` tensor, a dataset of images
            or ``(image, label)`` pairs, or a DataLoader (or any iterable) of such batches.
        method: a method preset (``mgrq``, ``qdrop``, ``brecq``, ``glfq``, ...: ``conf/method/``).
        w_bits, a_bits: weight and activation bits (``quant.w_bits``, ``quant.a_bits``).
        overrides: more CLI overrides, ``["model.recon_iters=2000", "method.loss.global_weight=0.5"]`` or the same
            as a mapping.
        seed, device, progress: the CLI's ``seed`` (mini-batches, QDrop masks), ``device`` (``auto``, ``cpu``,
            ``cuda``, ``cuda:N``) and ``progress`` (rich progress bars on the console).
        run_dir: a new directory for the run's ``results.json`` and ``recon_curves.json``; None keeps nothing on
            disk (the record is ``QuantizedModel.record``).

    Raises:
        MgrqError: one line naming the problem and the fix (a model the runner cannot quantize, an empty or
            misshapen calibration set, an unknown method or override, bits out of range).
    """
    with torch.random.fork_rng([]):  # a DataLoader draws its base seed from the CPU generator: the caller's is kept
        images = calibration_images(calibration, model)
    with _run_directory(run_dir) as directory:
        cli = {"method": method, "quant.w_bits": w_bits, "quant.a_bits": a_bits, "seed": seed, "device": device}
        cli |= {"progress": str(progress).lower(), "output_dir": directory}
        settings = compose_settings(_overrides(model, images, cli, overrides))
        fp_model = copy.deepcopy(model).eval()  # the caller's model keeps its device, mode and gradients
        identity = {"calibration_sha256": _digest(images), "num_classes": _num_classes(model), "classes": None}
        results_file = ResultsFile(results_path(directory), run_fields(settings) | {"data_identity": identity})
        with failure_recorded(results_file):
            target = resolve_device(settings.device)
            models = {"fp": fp_model.to(target)}
            results_file.update(**model_fields(fp_model, {"input_size": tuple(images.shape[1:])}, target))
            quantize_model(models, images.to(target), settings, results_file)
            finished = datetime.now(timezone.utc).isoformat(timespec="seconds")
            results_file.update(status="done", finished=finished, num_calib=len(images))
        record = dict(results_file.data)
    return QuantizedModel(models["quant"], record, settings, images[:2].to(target))


def load(
    directory: str | Path,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    sign_key_env: str | None = None,
) -> nn.Module:
    """The model a run exported into ``directory`` (``QuantizedModel.export``, or ``mgrq-run export=true``), in
    eval mode. Every file is checked against the manifest's digests and bit widths before use.

    Args:
        model: an FP model of the exported architecture (any weights; not modified), rebuilt on. None: built from
            the manifest's model name (a timm architecture or a shipped proxy, with its default arguments).
        sign_key_env: the environment variable holding the key the export must be signed with (docs/deploy.md).
    """
    key = signing_key(sign_key_env) if sign_key_env is not None else None
    return load_quantized(directory, device, architecture=model, key=key)


def evaluate(model: nn.Module, data: Any, device: str | torch.device | None = None) -> dict[str, float]:
    """Top-1 and top-5 accuracy (percent) of ``model`` on ``data``: a DataLoader (or iterable) of
    ``(images, labels)`` batches, a dataset of ``(image, label)`` pairs, or an ``(images, labels)`` pair of
    tensors. The model is scored in eval mode and left in the mode it was in."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if isinstance(data, tuple) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        batches: Iterable[Any] = zip(data[0].split(256), data[1].split(256), strict=True)
    elif isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        batches = DataLoader(data, batch_size=256)
    else:
        batches = data
    was_training = model.training
    model.eval()
    try:
        score = evaluate_models({"model": model}, batches, device)["model"]
    except ValueError as err:  # no images
        raise DataError(f"evaluate got no images ({err}). Fix: pass a non-empty loader or dataset.") from err
    finally:
        model.train(was_training)
    return {"top1": score.top1, "top5": score.top5, "num_images": score.num_images}


# ---------------------------------------------------------------------------------------------- settings


def compose_settings(overrides: list[str]) -> RunSettings:
    """The CLI's config composed with ``overrides`` and parsed by the CLI's parser. A Hydra app the caller runs
    (a training script) keeps its own Hydra state: it is set aside while composing and put back."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    outer = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except HydraException as err:
        raise ConfigError(f"{str(err).splitlines()[0]} Fix: see conf/ for the presets and their keys.") from err
    finally:
        GlobalHydra.instance().clear()
        if outer is not None:
            GlobalHydra.instance().initialize(outer)
    check_overrides(overrides, cfg)
    settings = parse_settings(cfg)
    if not isinstance(settings, RunSettings):
        raise ConfigError("mode=eval is the CLI's. Fix: drop it; mgrq_runner.load and evaluate score an export.")
    if settings.resume or settings.export or settings.dry_run:
        raise ConfigError("resume=, export= and dry_run= are the CLI's. Fix: drop them; use QuantizedModel.export.")
    return settings


def _overrides(
    model: nn.Module, images: torch.Tensor, cli: Mapping[str, Any], overrides: Sequence[str] | Mapping[str, Any]
) -> list[str]:
    """The CLI overrides of a ``quantize`` call: the in-memory model preset describing ``model`` and ``images``,
    the call's arguments (``cli``), then the caller's own ``overrides``."""
    given = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, Mapping) else list(overrides)
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in given):
        raise ConfigError(f"overrides={overrides!r}: a list of 'key=value' strings. Fix: ['method.recon.iters=200'].")
    described = {
        "model": "in_memory",
        "model.name": _architecture(model),
        "model.num_classes": _num_classes(model),
        "model.img_size": images.shape[-1],
        "calib.num_images": len(images),
    }
    return [f"{key}={value}" for key, value in (described | dict(cli)).items()] + given


def _architecture(model: nn.Module) -> str:
    """timm's architecture name of ``model`` (what ``load`` rebuilds when given no model), else its class name."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(pretrained_cfg.get("architecture") or type(model).__name__)


def _num_classes(model: nn.Module) -> int:
    return int(getattr(model, "num_classes", 0) or 0) or 1


@contextlib.contextmanager
def _run_directory(run_dir: str | Path | None) -> Iterator[Path]:
    """``run_dir`` (a new one: a directory that holds a run is refused), or a temporary one removed afterwards."""
    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="mgrq-api-") as temporary:
            yield Path(temporary)
        return
    directory = Path(run_dir)
    if results_path(directory).exists():
        raise ConfigError(f"run_dir={directory} already holds a run (results.json). Fix: give a new directory.")
    directory.mkdir(parents=True, exist_ok=True)
    yield directory


# ---------------------------------------------------------------------------------------------- calibration input


def calibration_images(calibration: Calibration, model: nn.Module) -> torch.Tensor:
    """The calibration images as one ``(N, C, H, W)`` float tensor on the CPU, checked against ``model``: a
    model the runner supports, a non-empty set, the model's channel count and input size, finite values."""
    unsupported = unsupported_part(model)
    if unsupported is not None:
        raise ModelError(f"the runner cannot quantize this model: {unsupported}. Fix: use a timm ViT, DeiT or Swin.")
    images = _as_tensor(calibration)
    if images.dim() != 4 or images.shape[0] == 0:
        raise DataError(
            f"calibration gives images of shape {list(images.shape)}: an empty set or not (N, C, H, W). "
            "Fix: pass a non-empty (N, C, H, W) tensor, a dataset of (C, H, W) images or a loader of batches."
        )
    if not images.is_floating_point() or not torch.isfinite(images).all():
        raise DataError("calibration images must be finite floats (preprocessed). Fix: apply the model's transform.")
    patch_embed = model.patch_embed  # unsupported_part checked that there is one
    channels = patch_embed.proj.in_channels
    if images.shape[1] != channels:
        raise DataError(
            f"calibration images have {images.shape[1]} channels, the model takes {channels}. Fix: preprocess them "
            "with the model's transform (timm.data.create_transform)."
        )
    expected = tuple(getattr(patch_embed, "img_size", None) or ())
    if expected and getattr(patch_embed, "strict_img_size", True) and tuple(images.shape[2:]) != expected:
        raise DataError(
            f"calibration images are {images.shape[2]} x {images.shape[3]}, the model takes {expected[0]} x "
            f"{expected[1]}. Fix: resize them (the model's transform), or build the model with that img_size."
        )
    return images.detach().cpu()


def _as_tensor(calibration: Calibration) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        return calibration
    if isinstance(calibration, Dataset) and not isinstance(calibration, torch.utils.data.IterableDataset):
        items: Iterable[Any] = (calibration[i] for i in range(len(calibration)))  # type: ignore[arg-type]
        return _stack([_image(item) for item in items], stack=True)
    if isinstance(calibration, Iterable):
        return _stack([_image(batch) for batch in calibration], stack=False)
    raise DataError(
        f"calibration is a {type(calibration).__name__}. Fix: pass a tensor, a dataset or a DataLoader of images."
    )


def _image(item: Any) -> torch.Tensor:
    """The image of a dataset item or the images of a batch: the item itself, or the first of a pair."""
    value = item[0] if isinstance(item, tuple | list) else item
    if not isinstance(value, torch.Tensor):
        raise DataError(f"calibration yields a {type(value).__name__}, not a tensor. Fix: add a ToTensor transform.")
    return value


def _stack(tensors: list[torch.Tensor], stack: bool) -> torch.Tensor:
    if not tensors:
        return torch.empty(0)
    try:
        return torch.stack(tensors) if stack else torch.cat(tensors)
    except RuntimeError as err:
        raise DataError(f"calibration images differ in shape ({err}). Fix: resize them to one size.") from err


def _digest(images: torch.Tensor) -> str:
    """The calibration images' identity (an export's manifest keeps it)."""
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


__all__ = ["QuantizedModel", "calibration_images", "compose_settings", "evaluate", "load", "quantize"]
