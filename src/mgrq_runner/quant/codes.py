"""A quantized layer's integer weight codes and the grid they sit on: what every deploy format writes."""

from __future__ import annotations

import torch

from mgrq_runner.quant import primitives
from mgrq_runner.quant.modules import QuantWeightLayer


def weight_grid(layer: QuantWeightLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-output-channel ``(scale, zero_point)`` the layer's fake-quantized weight uses, shaped ``[C, 1, ...]``."""
    if layer.rounding is not None:  # AdaRound keeps its own copy of the grid it was created on, STE its learned one
        return layer.rounding.grid()
    shape = (-1,) + (1,) * (layer.weight.dim() - 1)
    return layer.weight_quantizer.scale.reshape(shape), layer.weight_quantizer.zero_point.reshape(shape)


@torch.no_grad()
def weight_codes(layer: QuantWeightLayer) -> torch.Tensor:
    """The integer codes (uint8) behind the layer's fake-quantized weight.

    AdaRound layers: ``floor + 1[V >= 0] + zero_point``, clamped; STE layers: the learned weight's codes on the
    learned grid; others: ``quantize(weight)`` on the weight quantizer's grid. Raises RuntimeError if the codes do
    not reproduce the weight the layer computes with.
    """
    bits = layer.weight_quantizer.bits
    scale, zero_point = weight_grid(layer)
    rounding = layer.rounding
    if rounding is not None and not rounding.hard:
        raise RuntimeError("the rounding is not hardened: export after reconstruction has finished")
    if rounding is not None:
        codes = rounding.codes()
    else:
        codes = primitives.quantize(layer.weight, scale, zero_point, bits)
    if not torch.equal(primitives.dequantize(codes, zero_point=zero_point, scale=scale), layer.quantized_weight()):
        raise RuntimeError("the exported codes do not reproduce the layer's fake-quantized weight")
    return codes.to(torch.uint8)
