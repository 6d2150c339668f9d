"""Range initialisation: observe calibration data, search clipping ranges, reparameterise, enable quantizers."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mgrq_runner.errors import ConfigError
from mgrq_runner.quant.api import activation_quantizers, quant_layers, set_quantization
from mgrq_runner.quant.primitives import choose_qparams, search_log_sqrt2_delta, search_uniform_range
from mgrq_runner.quant.quantizers import LogSqrt2Quantizer, Observer
from mgrq_runner.quant.reparam import reparam_pairs, reparameterize_
from mgrq_runner.transforms.rotation import ROTATIONS


@dataclass(frozen=True)
class InitConfig:
    """How quantizer ranges are initialised.

    Attributes:
        search: ``mse`` (percentile candidates, least squared error) or ``minmax``.
        percentiles: candidate upper percentiles for ``mse`` (1.0 = min/max).
        reparam: apply the RepQ-ViT post-LayerNorm reparameterisation.
        observer_samples: elements each activation observer keeps over the whole calibration set.
        rotation: ``hadamard``: rotate the FP model before quantization (``transforms.rotation``); ``none``.
        mlp_relu: replace every MLP's GELU by ReLU and re-train fc1/fc2 in FP first (``transforms.mlp_relu``).
    """

    search: str = "mse"
    percentiles: Sequence[float] = (0.999, 0.9999, 0.99999, 1.0)
    reparam: bool = True
    observer_samples: int = 2**21
    rotation: str = "none"
    mlp_relu: bool = False

    def __post_init__(self) -> None:
        if self.rotation not in ROTATIONS:
            raise ConfigError(f"method.init.rotation={self.rotation!r} is unknown. Fix: one of {ROTATIONS}.")
        if self.rotation != "none" and self.reparam:
            raise ConfigError(
                "method.init.rotation with method.init.reparam=true: the rotation turns a ViT's LayerNorms into "
                "RMSNorms without affine, on which the RepQ reparameterisation acts. Fix: method.init.reparam=false."
            )
        if not isinstance(self.mlp_relu, bool):
            raise ConfigError(f"method.init.mlp_relu={self.mlp_relu!r} is not true or false.")
        if self.search not in ("mse", "minmax"):
            raise ConfigError(f"method.init.search={self.search!r} is unknown. Fix: mse or minmax.")
        if not self.percentiles or not all(0.5 < p <= 1.0 for p in self.percentiles):
            raise ConfigError(f"method.init.percentiles={list(self.percentiles)} must lie in (0.5, 1].")

    @property
    def candidates(self) -> tuple[float, ...]:
        return (1.0,) if self.search == "minmax" else tuple(self.percentiles)


@torch.no_grad()
def calibrate(
    model: nn.Module, batches: Iterable[torch.Tensor], num_batches: int, init: InitConfig, device: torch.device
) -> None:
    """Initialises every quantizer of a ``quantize_``-d model from calibration images, then enables them all.

    Activations are observed in one FP pass. Post-LayerNorm inputs (with ``init.reparam``) are calibrated per
    channel and folded into per-tensor grids; weights are calibrated per output channel on the final weights.
    Afterwards the fake-quantized weights are frozen (cached) for evaluation.

    Args:
        model: a model passed through ``quantize_``, quantizers disabled.
        batches: calibration images (batches of tensors).
        num_batches: number of batches in ``batches`` (sets each observer's sampling budget).
        init: range initialisation settings.
        device: where the search runs.
    """
    reparam_targets = {
        id(linear.input_quantizer): (norm, linear) for norm, linear in (reparam_pairs(model) if init.reparam else [])
    }
    samples_per_batch = max(1, init.observer_samples // max(1, num_batches))
    for index, (_, quantizer) in enumerate(activation_quantizers(model)):
        quantizer.observer = Observer(id(quantizer) in reparam_targets, samples_per_batch, seed=index)
    model.eval()
    for images in batches:
        model(images.to(device))

    percentiles = init.candidates
    for _, quantizer in activation_quantizers(model):
        observer = quantizer.observer
        assert observer is not None
        rows = observer.rows().to(device)
        if isinstance(quantizer, LogSqrt2Quantizer):
            quantizer.set_delta(
                search_log_sqrt2_delta(rows, quantizer.bits, percentiles, observer.max, quantizer.extra_level)
            )
        elif id(quantizer) in reparam_targets:
            lo, hi = search_uniform_range(rows, quantizer.bits, percentiles, observer.min, observer.max)
            norm, linear = reparam_targets[id(quantizer)]
            quantizer.set_qparams(*reparameterize_(norm, linear, *choose_qparams(lo, hi, quantizer.bits)))
        else:
            lo, hi = search_uniform_range(rows, quantizer.bits, percentiles, observer.min, observer.max)
            quantizer.set_range(lo, hi)
        quantizer.observer = None

    for _, layer in quant_layers(model):
        rows = layer.weight.detach().reshape(layer.weight.shape[0], -1)
        lo, hi = search_uniform_range(rows, layer.weight_quantizer.bits, percentiles, rows.amin(1), rows.amax(1))
        layer.weight_quantizer.set_range(lo, hi)
    set_quantization(model, True)
    for _, layer in quant_layers(model):
        layer.freeze()
