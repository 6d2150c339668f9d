"""STE weight tuning: learn the weight itself and its per-channel step, rounding to nearest with a straight-through
gradient (the weight tuning of GLF-Q and its predecessors; docs/method.md section 9).

Where AdaRound keeps the FP weight and learns only whether each weight rounds down or up on a fixed grid, STE
tuning learns a copy ``W`` of the weight (initialised from FP) and the step ``s`` of every output channel, and
computes with ``s * (clamp(round(W / s) + z, 0, 2^b - 1) - z)``; the rounding passes gradients straight through.
A weight may move by any number of grid steps. There is no regulariser and nothing to harden: the weight the unit
computes with during optimisation is, up to float rounding of the straight-through form, the one it keeps.
"""

from __future__ import annotations

import torch
from torch import nn

from mgrq_runner.quant import primitives
from mgrq_runner.quant.quantizers import UniformQuantizer
from mgrq_runner.quant.rounding.base import WeightRounding, register_rounding


@register_rounding
class SteRounding(WeightRounding):
    """A learned weight and per-output-channel step on the grid of ``quantizer`` (its zero point stays fixed).

    Attributes:
        weight: the learned weight, initialised from the FP weight.
        scale: the learned step per output channel, shaped ``[C, 1, ...]``, initialised from the quantizer's.
        reference: the FP weight, kept to report how many codes moved away from its round-to-nearest.
    """

    name = "ste"
    learns_step = True

    def __init__(self, weight: torch.Tensor, quantizer: UniformQuantizer) -> None:
        super().__init__()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.bits = quantizer.bits
        self.weight = nn.Parameter(weight.detach().clone())
        self.scale = nn.Parameter(quantizer.scale.detach().reshape(shape).clone())
        self.register_buffer("zero_point", quantizer.zero_point.detach().reshape(shape).clone())
        self.register_buffer("reference", weight.detach().clone(), persistent=False)
        self.hard = False

    @property
    def variable(self) -> nn.Parameter:
        """What the weight optimiser learns (AdaRound's name for it)."""
        return self.weight

    def step_size(self) -> torch.Tensor:
        return self.scale.clamp(min=primitives.SCALE_EPS)

    def codes(self) -> torch.Tensor:
        """The integer codes (as floats) of the learned weight on the learned grid."""
        with torch.no_grad():
            return primitives.quantize(self.weight, self.step_size(), self.zero_point, self.bits)

    def forward(self) -> torch.Tensor:
        if self.hard or not torch.is_grad_enabled():  # exact codes: what the export writes
            return primitives.dequantize(self.codes(), self.step_size(), self.zero_point)
        return primitives.fake_quantize(self.weight, self.step_size(), self.zero_point, self.bits)

    @torch.no_grad()
    def moved_share(self) -> float:
        """The share of weights whose code differs from the FP weight's round-to-nearest on the same (learned)
        grid: how far the tuning moved weights, apart from the change of step."""
        start = primitives.quantize(self.reference, self.step_size(), self.zero_point, self.bits)
        return (self.codes() != start).float().mean().item()
