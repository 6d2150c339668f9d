"""AdaRound: learn, per weight, whether to round down or up (Nagel et al., 2020).

The weight's grid (scale, zero point per output channel) stays fixed. Each weight gets a variable ``V`` whose
rectified sigmoid ``h(V)`` in [0, 1] is added to ``floor(W / scale)``; a regulariser pushes every ``h`` to 0 or 1,
and hardening replaces ``h(V)`` with ``1[V >= 0]``.
"""

from __future__ import annotations

import torch
from torch import nn

from mgrq_runner.quant.primitives import qmax
from mgrq_runner.quant.quantizers import UniformQuantizer
from mgrq_runner.quant.rounding.base import WeightRounding, register_rounding

ZETA, GAMMA = 1.1, -0.1


@register_rounding
class AdaRound(WeightRounding):
    """Learned rounding of one weight tensor on the grid of ``quantizer`` (per output channel)."""

    name = "adaround"
    relaxed = True
    derived = ("floor",)

    def __init__(self, weight: torch.Tensor, quantizer: UniformQuantizer) -> None:
        super().__init__()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.bits = quantizer.bits
        self.register_buffer("scale", quantizer.scale.detach().reshape(shape).clone())
        self.register_buffer("zero_point", quantizer.zero_point.detach().reshape(shape).clone())
        scaled = weight.detach() / self.scale
        self.register_buffer("floor", scaled.floor())
        rest = (scaled - self.floor).clamp(1e-4, 1 - 1e-4)
        # V such that h(V) equals the fractional part: the soft weights start at the FP weights (clipped).
        self.variable = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.hard = False

    def soft_rounding(self) -> torch.Tensor:
        """``h(V)``: the rectified sigmoid, in [0, 1]."""
        return torch.clamp(torch.sigmoid(self.variable) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def forward(self) -> torch.Tensor:
        rounding = (self.variable >= 0).to(self.floor) if self.hard else self.soft_rounding()
        codes = torch.clamp(self.floor + rounding + self.zero_point, 0, qmax(self.bits))
        return (codes - self.zero_point) * self.scale

    @torch.no_grad()
    def codes(self) -> torch.Tensor:
        """``floor + 1[V >= 0] + zero_point``, clamped to the grid: the hardened weight's codes."""
        return torch.clamp(self.floor + (self.variable >= 0).to(self.floor) + self.zero_point, 0, qmax(self.bits))

    def regularizer(self, beta: float) -> torch.Tensor:
        """``sum(1 - |2 h(V) - 1|^beta)``: zero once every weight is rounded firmly down or up."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()


def rounding_beta(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """The regulariser's beta at ``step``: None (off) during the warm-up, then linear from ``start`` to ``end``."""
    warmup_steps = int(warmup * total)
    if step < warmup_steps:
        return None
    progress = (step - warmup_steps) / max(1, total - warmup_steps)
    return start + (end - start) * progress
