"""Quantized layers: Linear and Conv2d with an input and a weight quantizer, and a quantized matmul.

Each layer owns the original FP parameters. ``freeze()`` caches the fake-quantized weight for fast evaluation;
anything that changes the weights or the weight quantizer afterwards must call ``unfreeze()`` first.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from mgrq_runner.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer

if TYPE_CHECKING:
    from mgrq_runner.quant.rounding import WeightRounding


class QuantWeightLayer(nn.Module):
    """Shared parts of QuantLinear and QuantConv2d."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def __init__(self, w_bits: int, a_bits: int) -> None:
        super().__init__()
        self.input_quantizer = UniformQuantizer(a_bits)
        self.weight_quantizer = UniformQuantizer(w_bits, per_channel=True)
        self.rounding: WeightRounding | None = None  # during and after reconstruction (quant/rounding)
        self._frozen_weight: torch.Tensor | None = None

    def quantized_weight(self) -> torch.Tensor:
        if not self.weight_quantizer.enabled:
            return self.weight
        if self._frozen_weight is not None:
            return self._frozen_weight
        if self.rounding is not None:
            return self.rounding()
        return self.weight_quantizer(self.weight)

    @torch.no_grad()
    def freeze(self) -> None:
        """Caches the fake-quantized weight (evaluation only: no gradient reaches the weight afterwards)."""
        self._frozen_weight = None
        self._frozen_weight = self.quantized_weight().detach()

    def unfreeze(self) -> None:
        self._frozen_weight = None

    @property
    def frozen(self) -> bool:
        return self._frozen_weight is not None


class QuantLinear(QuantWeightLayer):
    """``nn.Linear`` with an A-bit per-tensor input quantizer and a W-bit per-output-channel weight quantizer."""

    def __init__(self, linear: nn.Linear, w_bits: int, a_bits: int) -> None:
        super().__init__(w_bits, a_bits)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.input_quantizer(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class QuantConv2d(QuantWeightLayer):
    """``nn.Conv2d`` (the patch embedding) with an input quantizer and a per-output-channel weight quantizer."""

    def __init__(self, conv: nn.Conv2d, w_bits: int, input_bits: int) -> None:
        super().__init__(w_bits, input_bits)
        self.weight = conv.weight
        self.bias = conv.bias
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        if conv.padding_mode != "zeros":
            raise ValueError(f"padding_mode {conv.padding_mode!r} is not supported")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self.input_quantizer(x),
            self.quantized_weight(),
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )


class QuantMatMul(nn.Module):
    """``a @ b`` with each operand quantized (the two attention matmuls)."""

    def __init__(self, quantizer_a: UniformQuantizer | LogSqrt2Quantizer, quantizer_b: UniformQuantizer) -> None:
        super().__init__()
        self.quantizer_a = quantizer_a
        self.quantizer_b = quantizer_b

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.quantizer_a(a) @ self.quantizer_b(b)
