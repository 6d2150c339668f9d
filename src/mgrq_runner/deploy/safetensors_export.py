"""Export of a quantized model as integer weight codes, and its exact reload without calibration.

``export_quantized`` writes two files into a run directory:

- ``quantized_model.safetensors``: for every quantized weight layer ``L`` the integer codes ``L.weight_codes``
  (uint8) and its per-channel grid ``L.weight_quantizer.{scale,zero_point}``; every activation quantizer's
  parameters (uniform: ``scale``, ``zero_point``; log-sqrt(2): ``delta``); and the rest of the model's state
  (biases, LayerNorms after the RepQ reparameterisation, class token, position embedding, ...).
- ``quantized_model.json``: the manifest (model, bits, method, per-layer granularity and enabled flags, library
  versions, sizes).

``load_quantized`` rebuilds the fake-quantized model from these files alone; its logits equal the exporting run's.
Tensors are read from safetensors only: nothing is unpickled.

The export is one checked unit: the manifest holds the SHA-256 of every file it names (the weights, ``model.onnx``)
and its own ``digest`` over all of its fields, so no field or file can change without the reader seeing it; every
field is then cross-checked against the others and against the tensors (bits, grids, codes, shapes). The digest is
an integrity check, not a signature: whoever rewrites the files can recompute it, and the cross-checks still apply.
``sign_key_env=NAME`` adds a keyed signature (``signing``), which a forger without the key cannot make.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file
from torch import nn

from mgrq_runner.deploy.signing import check_signature, signature
from mgrq_runner.errors import ConfigError, MgrqError, ModelError, printable
from mgrq_runner.files import cpu_copy, file_sha256, read_bytes, read_json, write_atomic, write_text_atomic
from mgrq_runner.models import create_model
from mgrq_runner.quant import primitives
from mgrq_runner.quant.api import QuantConfig, activation_quantizers, quant_layers, quantize_
from mgrq_runner.quant.codes import weight_codes, weight_grid
from mgrq_runner.quant.modules import QuantWeightLayer
from mgrq_runner.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer
from mgrq_runner.quant.rounding import ROUNDINGS
from mgrq_runner.rundir import EXPORT_MANIFEST, EXPORT_WEIGHTS, ONNX_FILE
from mgrq_runner.settings import ModelSettings
from mgrq_runner.transforms.pipeline import rebuild_structure
from mgrq_runner.transforms.rotation import ROTATIONS

FORMAT = "mgrq-quantized"
FORMAT_VERSION = 2  # 2: the manifest digest, required file checksums, data identity
STRUCTURE = "; structure "  # the weights file's metadata: the format, then the FP transforms' structure flags
MANIFEST_KEYS = ("model", "method", "w_bits", "a_bits", "quant_config", "num_calib", "layers", "activation_quantizers")
MB = 1e6  # sizes are in MB of 10**6 bytes
REEXPORT = "re-export the run with export=true"  # the fix of every damaged-export message
FP32_BYTES, SCALE_BYTES, ZERO_POINT_BYTES = 4, 4, 1  # a packed grid: fp32 scale and 8-bit zero point per channel


def _quantizer_kind(quantizer: nn.Module) -> str:
    return "log_sqrt2" if isinstance(quantizer, LogSqrt2Quantizer) else "uniform"


def export_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors to save and the per-layer / per-quantizer manifest entries of a quantized ``model``.

    Every state_dict entry is kept except the FP weights of quantized layers (replaced by their codes) and the
    AdaRound variables (folded into the codes).
    """
    tensors: dict[str, torch.Tensor] = {}
    layers: dict[str, Any] = {}
    skip: set[str] = set()
    for name, layer in quant_layers(model):
        quantizer = layer.weight_quantizer
        enabled = bool(quantizer.enabled)
        layers[name] = {
            "type": type(layer).__name__,
            "shape": list(layer.weight.shape),
            "bits": quantizer.bits,
            "granularity": "per_channel",
            "enabled": enabled,
            **{name: getattr(layer.rounding, "name", None) == name for name in ROUNDINGS},  # "adaround", "ste"
        }
        if enabled:
            scale, zero_point = weight_grid(layer)
            tensors[f"{name}.weight_codes"] = cpu_copy(weight_codes(layer))
            tensors[f"{name}.weight_quantizer.scale"] = cpu_copy(scale.reshape(-1))
            tensors[f"{name}.weight_quantizer.zero_point"] = cpu_copy(zero_point.reshape(-1))
            skip |= {f"{name}.weight", f"{name}.weight_quantizer.scale", f"{name}.weight_quantizer.zero_point"}
    activations = {
        name: {
            "kind": _quantizer_kind(quantizer),
            "bits": quantizer.bits,
            "granularity": "per_channel" if getattr(quantizer, "per_channel", False) else "per_tensor",
            "enabled": bool(quantizer.enabled),
        }
        for name, quantizer in activation_quantizers(model)
    }
    for key, value in model.state_dict().items():
        if key not in skip and ".rounding." not in key:
            tensors[key] = cpu_copy(value)
    return tensors, {"layers": layers, "activation_quantizers": activations}


def size_figures(model: nn.Module, layers: dict[str, Any], file_bytes: int) -> dict[str, float]:
    """FP32 vs packed sizes (MB) of the quantized layers' weights and of the whole model.

    Packed: ``bits / 8`` bytes per code plus an fp32 scale and an 8-bit zero point per output channel; the rest of
    the model (biases, norms, embeddings, activation quantizer parameters) counts as FP32 in both figures.
    """
    quantized = {f"{name}.weight" for name, info in layers.items() if info["enabled"]}
    fp32_weights = packed_weights = other = 0.0
    for key, value in model.state_dict().items():
        if ".rounding." in key:
            continue
        if key in quantized:
            bits = layers[key.removesuffix(".weight")]["bits"]
            fp32_weights += value.numel() * FP32_BYTES
            packed_weights += value.numel() * bits / 8 + value.shape[0] * (SCALE_BYTES + ZERO_POINT_BYTES)
        elif not key.endswith(("weight_quantizer.scale", "weight_quantizer.zero_point")):
            other += value.numel() * value.element_size()
    return {
        "quantized_weights_fp32_mb": round(fp32_weights / MB, 6),
        "quantized_weights_packed_mb": round(packed_weights / MB, 6),
        "quantized_weights_ratio": round(packed_weights / max(fp32_weights, 1.0), 6),
        "model_fp32_mb": round((fp32_weights + other) / MB, 6),
        "model_packed_mb": round((packed_weights + other) / MB, 6),
        "model_ratio": round((packed_weights + other) / max(fp32_weights + other, 1.0), 6),
        "file_mb": round(file_bytes / MB, 6),
    }


def export_quantized(
    model: nn.Module, run_dir: str | Path, info: dict[str, Any], key: bytes | None = None
) -> dict[str, Any]:
    """Writes ``quantized_model.safetensors`` and ``quantized_model.json`` for ``model`` into ``run_dir``.

    Args:
        model: the final quantized model (calibrated, reconstructed); it is not modified.
        run_dir: the run directory.
        info: manifest fields describing the run: ``model`` (the resolved model config), ``quant_config``
            (QuantConfig fields), ``method``, ``versions`` and any others to record.
        key: signs the manifest (``signing``: an HMAC of its digest) when given.

    Returns:
        What results.json records: the paths and the size figures.
    """
    run_dir = Path(run_dir)
    tensors, entries = export_tensors(model)
    weights_path = run_dir / EXPORT_WEIGHTS

    def write(tmp: Path) -> None:
        # one metadata key: two keys made an export's bytes (and checksum) change from run to run (map order)
        save_file(tensors, str(tmp), metadata={"format": f"{FORMAT} {FORMAT_VERSION}{STRUCTURE}{_structure(info)}"})
        tmp.chmod(0o644)  # safetensors writes 0600; the run dir's other files are world-readable

    write_atomic(weights_path, write)
    sizes = size_figures(model, entries["layers"], weights_path.stat().st_size)
    manifest = {
        "weights_sha256": file_sha256(weights_path),
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "weights_file": EXPORT_WEIGHTS,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **info,
        "timm_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "granularity": {
            "weights": "per_channel",
            "activations": "per_tensor",
            "log_sqrt2": [name for name, q in entries["activation_quantizers"].items() if q["kind"] == "log_sqrt2"],
        },
        "size_unit": "MB = 10**6 bytes",
        "sizes": sizes,
        **entries,
    }
    manifest = json.loads(json.dumps(manifest, default=str))  # as it will read back
    manifest["digest"] = manifest_digest(manifest)
    if key is not None:
        manifest["signature"] = signature(manifest["digest"], key)
    manifest_path = run_dir / EXPORT_MANIFEST
    write_text_atomic(manifest_path, json.dumps(manifest, indent=2) + "\n")
    return {"weights": str(weights_path), "manifest": str(manifest_path), **sizes}


def _structure(description: dict[str, Any]) -> str:
    """The FP transforms' structure an export was made with (what ``rebuild_structure`` reads from the manifest),
    as the weights file's metadata also records it: a manifest whose flag was flipped no longer matches."""
    flags = {"rotation": description.get("rotation", "none"), "mlp_relu": bool(description.get("mlp_relu", False))}
    return json.dumps(flags, sort_keys=True)


def _check_structure(raw: bytes, manifest: dict[str, Any], run_dir: Path) -> None:
    """The manifest's structure flags are the ones the weights file (``raw``, its bytes) was written with (an export
    made before the file recorded them has nothing to compare: only its digest covers the flags)."""
    recorded = safetensors_metadata(raw).get("format", "")
    written = recorded.split(STRUCTURE, 1)[1] if STRUCTURE in recorded else None
    if written is not None and written != _structure(manifest):
        raise _mismatch(run_dir, f"the manifest's structure {_structure(manifest)} is not the weights file's {written}")


def safetensors_metadata(raw: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (its header: a little-endian u64 length, then JSON);
    empty when it has none. Only called on bytes whose checksum matched the manifest's."""
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    return header.get("__metadata__") or {}


def manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of every field of the manifest but ``digest`` and ``signature`` (made from it), keys sorted."""
    fields = {key: value for key, value in manifest.items() if key not in ("digest", "signature")}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def check_export_model(manifest: dict[str, Any], checkpoint: Path, name: str) -> None:
    """The export holds the model the config names (``mode=eval`` rebuilds that model to load it into)."""
    if manifest["model"]["name"] != name:
        raise ModelError(
            f"checkpoint {checkpoint} holds model {printable(manifest['model']['name'])} but the config names "
            f"{name}. Fix: add model=<its preset> (or model.name={printable(manifest['model']['name'])})."
        )


def read_manifest(run_dir: str | Path, key: bytes | None = None) -> dict[str, Any]:
    """The manifest of an exported run, checked (and its signature, when a ``key`` is given); raises ConfigError /
    ModelError naming the fix."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(
            f"checkpoint {run_dir} is not a directory. Fix: checkpoint=<the run dir of a run made with export=true>."
        )
    path = run_dir / EXPORT_MANIFEST
    if not path.exists() and not path.is_symlink():
        raise ModelError(
            f"{run_dir} has no {EXPORT_MANIFEST}. Fix: re-run that job with export=true, or point checkpoint at "
            f"a run dir that holds {EXPORT_MANIFEST} and {EXPORT_WEIGHTS}."
        )
    manifest = read_json(path, "export manifest", REEXPORT, error=ModelError, follow_links=False)
    if manifest.get("format") != FORMAT:
        raise ModelError(f"{path} is not an mgrq-runner export manifest. Fix: {REEXPORT}.")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ModelError(
            f"{path} has format version {manifest.get('format_version')}, this mgrq-runner reads "
            f"{FORMAT_VERSION}. Fix: re-export the run with this version (export=true)."
        )
    missing = [key for key in (*MANIFEST_KEYS, "weights_sha256", "digest") if key not in manifest]
    if missing:
        raise ModelError(f"{path} lacks {', '.join(missing)}. Fix: {REEXPORT}.")
    if manifest["digest"] != manifest_digest(manifest):
        raise ModelError(
            f"{path} was changed after it was written (its fields do not match its digest). Fix: re-export the run "
            "with export=true."
        )
    if key is not None:
        check_signature(manifest, key, path)
    check_fields(manifest, path)
    return manifest


def check_fields(manifest: dict[str, Any], path: Path) -> None:
    """Every field has its type, and the fields agree with each other (bits, quant_config, layers, the ONNX file)."""

    def bad(what: str) -> ModelError:
        return ModelError(f"{path}: {what}. Fix: {REEXPORT}.")

    def is_int(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if not isinstance(manifest["model"], dict) or not isinstance(manifest["model"].get("name"), str):
        raise bad("its model entry has no name")
    for key in ("w_bits", "a_bits", "num_calib"):
        if not is_int(manifest[key]):
            raise bad(f"{key}={manifest[key]!r} is not an integer")
    quant = manifest["quant_config"]
    if not isinstance(quant, dict):
        raise bad("quant_config is not a mapping")
    unknown = sorted(set(quant) - {f.name for f in dataclasses.fields(QuantConfig)})
    if unknown:
        raise bad(f"quant_config has unknown keys {unknown}")
    for key in ("w_bits", "a_bits", "input_bits"):
        if key in quant and not is_int(quant[key]):
            raise bad(f"quant_config.{key}={quant[key]!r} is not an integer")
    for key in ("w_bits", "a_bits"):
        if quant.get(key) != manifest[key]:
            raise bad(f"{key}={manifest[key]} but quant_config.{key}={quant.get(key)!r}")
    if not isinstance(manifest["layers"], dict) or not isinstance(manifest["activation_quantizers"], dict):
        raise bad("layers and activation_quantizers must be mappings")
    for name, layer in manifest["layers"].items():
        if not isinstance(layer, dict) or not is_int(layer.get("bits")) or not isinstance(layer.get("enabled"), bool):
            raise bad(f"layer {printable(name)} has no integer bits or no enabled flag")
        if layer["enabled"] and layer["bits"] != manifest["w_bits"]:
            bits = f"{layer['bits']}-bit weights but the manifest says w_bits={manifest['w_bits']}"
            raise bad(f"layer {printable(name)} has {bits}")
    activation_bits = {manifest["a_bits"], quant.get("input_bits", manifest["a_bits"])}
    for name, entry in manifest["activation_quantizers"].items():
        if not isinstance(entry, dict) or not is_int(entry.get("bits")) or not isinstance(entry.get("enabled"), bool):
            raise bad(f"activation quantizer {printable(name)} has no integer bits or no enabled flag")
        if entry["enabled"] and entry["bits"] not in activation_bits:
            bits = f"{entry['bits']} bits but the manifest says a_bits={manifest['a_bits']}"
            raise bad(f"activation quantizer {printable(name)} has {bits}")
    if manifest.get("rotation", "none") not in ROTATIONS or not isinstance(manifest.get("mlp_relu", False), bool):
        raise bad(f"rotation={manifest.get('rotation')!r} or mlp_relu={manifest.get('mlp_relu')!r} is unknown")
    onnx = manifest.get("onnx")
    if onnx is not None and (not isinstance(onnx, dict) or onnx.get("file") != ONNX_FILE or "sha256" not in onnx):
        raise bad(f"its onnx entry must name {ONNX_FILE} in the run dir, with its sha256")


def check_codes(name: str, codes: torch.Tensor, bits: int, run_dir: Path) -> None:
    """Every saved weight code of layer ``name`` fits ``bits`` bits."""
    top = primitives.qmax(bits)
    if int(codes.max()) > top:
        raise _tampered(run_dir, f"{name}: a weight code of {int(codes.max())} does not fit {bits} bits (max {top})")


def check_qparams(name: str, scale: torch.Tensor, zero_point: torch.Tensor | None, bits: int, run_dir: Path) -> None:
    """Scales (or a log-sqrt(2) delta) finite and positive; zero points integers on the ``bits``-bit grid."""
    if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
        raise _tampered(run_dir, f"{name}: a scale is not a finite positive number")
    if zero_point is None:
        return
    top = primitives.qmax(bits)
    if not (torch.equal(zero_point, zero_point.round()) and bool(((zero_point >= 0) & (zero_point <= top)).all())):
        raise _tampered(run_dir, f"{name}: a zero point is not an integer from 0 to {top}")


def _tampered(run_dir: Path, what: str) -> ModelError:
    return ModelError(f"the export in {run_dir} is damaged ({what}). Fix: {REEXPORT}.")


def _read_tensors(run_dir: Path, sha256: str) -> tuple[dict[str, torch.Tensor], bytes]:
    """The export's tensors and the file's bytes, read once (a link or anything but a file is refused) and checked
    against the manifest's checksum before they are parsed."""
    path = run_dir / EXPORT_WEIGHTS
    raw = read_bytes(path, "export weights", "re-run that job with export=true", error=ModelError, follow_links=False)
    if hashlib.sha256(raw).hexdigest() != sha256:
        raise _tampered(run_dir, f"{EXPORT_WEIGHTS} does not match the checksum in {EXPORT_MANIFEST}")
    try:
        return safetensors_load(raw), raw
    except (SafetensorError, ValueError) as err:
        raise ModelError(f"{path} cannot be read ({err}). Fix: re-run that job with export=true.") from err


def _mismatch(run_dir: Path, what: str) -> ModelError:
    return ModelError(
        f"the export in {run_dir} does not fit its model ({what}). Fix: re-export the run with this mgrq-runner "
        "(export=true)."
    )


@torch.no_grad()
def _assign(model: nn.Module, key: str, value: torch.Tensor, run_dir: Path) -> None:
    """Copies a saved parameter or buffer into ``model`` (a bias the reparameterisation added is created)."""
    module_name, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise _mismatch(run_dir, f"no module {module_name!r}") from None
    current = getattr(module, attr, None)
    if current is None and attr == "bias" and isinstance(module, QuantWeightLayer):
        module.bias = nn.Parameter(value.clone(), requires_grad=False)
    elif isinstance(current, torch.Tensor) and current.shape == value.shape:
        current.copy_(value)
    else:
        got = "nothing" if current is None else f"shape {list(getattr(current, 'shape', []))}"
        raise _mismatch(run_dir, f"{key}: saved shape {list(value.shape)}, model has {got}")


def load_quantized(
    run_dir: str | Path,
    device: str | torch.device = "cpu",
    architecture: nn.Module | None = None,
    key: bytes | None = None,
) -> nn.Module:
    """Rebuilds an exported run's fake-quantized model (eval mode, frozen weights) without any calibration, on
    the manifest's model (built by name) or on a copy of ``architecture`` (an FP model of that architecture); with a
    ``key``, only a manifest signed with it is accepted."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir, key)
    tensors, raw = _read_tensors(run_dir, manifest["weights_sha256"])
    _check_structure(raw, manifest, run_dir)
    try:  # the manifest's model and quant_config, checked as a command's would be
        model_settings = ModelSettings.parse({**manifest["model"], "pretrained": False, "checkpoint": None})
        fp_model = create_model(model_settings) if architecture is None else copy.deepcopy(architecture).cpu().eval()
        model = quantize_(rebuild_structure(fp_model, manifest), QuantConfig(**manifest["quant_config"]))
    except MgrqError as err:  # ConfigError, ModelError: named after the export, not the command
        raise _mismatch(run_dir, f"its fields do not build a model: {err}") from None
    layers, activations = dict(quant_layers(model)), dict(activation_quantizers(model))
    if set(layers) != set(manifest["layers"]) or set(activations) != set(manifest["activation_quantizers"]):
        raise _mismatch(run_dir, "its quantized layers differ from the manifest's")
    built = {**{n: q.weight_quantizer for n, q in layers.items()}, **activations}
    entries = {**manifest["layers"], **manifest["activation_quantizers"]}
    for name, quantizer in built.items():  # quant_config decides every quantizer: it must be the entry's
        if quantizer.bits != entries[name]["bits"]:
            raise _mismatch(
                run_dir, f"{name}: quant_config gives it {quantizer.bits} bits, its entry {entries[name]['bits']}"
            )
        if name in activations and _quantizer_kind(quantizer) != entries[name].get("kind"):
            raise _mismatch(run_dir, f"{name}: quant_config gives it a {_quantizer_kind(quantizer)} quantizer")
    handled: set[str] = set()
    try:
        for name, layer in layers.items():
            grid = f"{name}.weight_quantizer.scale", f"{name}.weight_quantizer.zero_point"
            scale, zero_point = tensors[grid[0]], tensors[grid[1]]
            layer.weight_quantizer.set_qparams(scale, zero_point)
            handled |= set(grid)
            if not manifest["layers"][name]["enabled"]:
                continue  # its FP weight is saved as such
            codes = tensors[f"{name}.weight_codes"]
            if codes.shape != layer.weight.shape or scale.numel() != codes.shape[0]:
                raise _mismatch(run_dir, f"{name}: codes {list(codes.shape)}, weight {list(layer.weight.shape)}")
            check_codes(name, codes, layer.weight_quantizer.bits, run_dir)
            check_qparams(name, scale, zero_point, layer.weight_quantizer.bits, run_dir)
            shape = (-1,) + (1,) * (codes.dim() - 1)
            with torch.no_grad():
                layer.weight.copy_(
                    primitives.dequantize(codes.float(), scale.reshape(shape), zero_point.reshape(shape))
                )
            handled |= {f"{name}.weight_codes", f"{name}.weight"}
        for name, quantizer in activations.items():
            if isinstance(quantizer, UniformQuantizer):
                scale, zero_point = tensors[f"{name}.scale"], tensors[f"{name}.zero_point"]
                if manifest["activation_quantizers"][name]["enabled"]:
                    check_qparams(name, scale, zero_point, quantizer.bits, run_dir)
                quantizer.set_qparams(scale, zero_point)
                handled |= {f"{name}.scale", f"{name}.zero_point"}
            else:
                if manifest["activation_quantizers"][name]["enabled"]:
                    check_qparams(name, tensors[f"{name}.delta"], None, quantizer.bits, run_dir)
                quantizer.set_delta(tensors[f"{name}.delta"])
                handled.add(f"{name}.delta")
    except KeyError as err:
        raise _mismatch(run_dir, f"{err.args[0]} is missing") from None
    for key, value in tensors.items():
        if key not in handled:
            _assign(model, key, value, run_dir)
    missing = [key for key in model.state_dict() if key not in tensors and key not in handled]
    if missing:
        raise _mismatch(run_dir, f"{missing[0]} is missing")
    for name, layer in layers.items():
        layer.weight_quantizer.enabled = bool(manifest["layers"][name]["enabled"])
    for name, quantizer in activations.items():
        quantizer.enabled = bool(manifest["activation_quantizers"][name]["enabled"])
    model = model.to(device).eval()
    for layer in layers.values():
        layer.freeze()
    return model
