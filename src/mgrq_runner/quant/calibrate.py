"""Range initialisation: observe calibration data, search clipping ranges, reparameterise, enable quantizers."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mgrq_runner.quant.api import activation_quantizers, quant_layers, set_quantization
from mgrq_runner.quant.config import InitConfig
from mgrq_runner.quant.primitives import choose_qparams, search_log_sqrt2_delta, search_uniform_range
from mgrq_runner.quant.quantizers import LogSqrt2Quantizer, Observer
from mgrq_runner.quant.reparam import reparam_pairs, reparameterize_


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
