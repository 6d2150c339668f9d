"""The FP transforms a method asks for, applied in order, and the structure an export's transforms left.

``FP_TRANSFORMS`` names each transform once, in the order of application: the ReLU MLPs are re-trained to the
original model's function first, then the rotation (exact) turns the result. A new transform is a module of its
own in this package and one entry here; the run, the export loader and the benchmarks ask this list.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mgrq_runner.settings import MethodSettings
from mgrq_runner.transforms.mlp_relu import relu_mlps_, swap_gelu_for_relu_
from mgrq_runner.transforms.rotation import rotate_


@dataclass(frozen=True)
class FpTransform:
    """One change of the FP model before quantization.

    Attributes:
        name: its key in results.json's ``fp_transform`` and in the export manifest.
        requested: whether a method's settings ask for it.
        apply: ``(model, images, method, seed, dry_run) -> record``: changes ``model`` in place and returns what
            it did (a ``dry_run`` needs the structure only, not the values).
        rebuild: gives a model (any weights) the structure the transform leaves, to load an export into.
        in_manifest: whether an export manifest says its run applied it.
    """

    name: str
    requested: Callable[[MethodSettings], bool]
    apply: Callable[[nn.Module, torch.Tensor, MethodSettings, int, bool], Any]
    rebuild: Callable[[nn.Module], object]
    in_manifest: Callable[[dict[str, Any]], bool]


def _relu_mlps(model: nn.Module, images: torch.Tensor, method: MethodSettings, seed: int, dry_run: bool) -> Any:
    if dry_run:  # the structure the projection times, not the training
        return {"swapped_only": swap_gelu_for_relu_(model), "note": "dry_run: not re-trained"}
    config = method.mlp_relu
    assert config is not None
    mlps = relu_mlps_(model, images, config, seed)
    return {"iters": config.iters, "lr": config.lr, "batch_size": config.batch_size, "mlps": mlps}


FP_TRANSFORMS = (
    FpTransform(
        name="mlp_relu",
        requested=lambda method: method.mlp_relu is not None,
        apply=_relu_mlps,
        rebuild=swap_gelu_for_relu_,
        in_manifest=lambda manifest: bool(manifest.get("mlp_relu", False)),
    ),
    FpTransform(
        name="rotation",
        requested=lambda method: method.init is not None and method.init.rotation != "none",
        apply=lambda model, images, method, seed, dry_run: rotate_(model, seed),
        rebuild=lambda model: rotate_(model, seed=0),  # the values do not matter: the export's replace them
        in_manifest=lambda manifest: manifest.get("rotation", "none") != "none",
    ),
)


def transforms_requested(method: MethodSettings) -> bool:
    """Whether ``method`` asks for any FP transform."""
    return any(t.requested(method) for t in FP_TRANSFORMS)


def apply_fp_transforms(
    model: nn.Module, images: torch.Tensor, method: MethodSettings, seed: int, dry_run: bool = False
) -> dict[str, Any]:
    """Applies to ``model`` (in place) each transform ``method`` asks for, in order; returns their records by name
    (results.json's ``fp_transform``)."""
    return {t.name: t.apply(model, images, method, seed, dry_run) for t in FP_TRANSFORMS if t.requested(method)}


def rebuild_structure(model: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """``model`` (any weights) with the structure the exporting run's transforms left: ReLU MLPs, and the
    rotation's RMSNorms, folded LayerScales and biases."""
    for transform in FP_TRANSFORMS:
        if transform.in_manifest(manifest):
            transform.rebuild(model)
    return model
