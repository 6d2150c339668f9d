"""Fake-quantizer modules and the observer that feeds their range search.

A quantizer starts disabled (it passes its input through). Calibration attaches an ``Observer``, runs data
through the FP model, and sets the quantizer's parameters from what was observed; ``enabled`` then switches
quantization on. Observers are kept apart from quantizers: a quantizer holds one only while it is calibrated.
"""

from __future__ import annotations

import torch
from torch import nn

from mgrq_runner.quant import primitives


class Observer:
    """Collects exact min/max and a random subsample of the tensors a quantizer sees.

    Args:
        per_channel: keep per-channel statistics over the last dimension (tokens x channels) instead of one
            flattened set.
        samples_per_batch: elements sampled from each observed tensor (per-channel: whole token rows, as many
            as fit in this many elements).
        seed: seed of the sampling generator.
    """

    def __init__(self, per_channel: bool = False, samples_per_batch: int = 32768, seed: int = 0) -> None:
        self.per_channel = per_channel
        self.samples_per_batch = samples_per_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.samples: list[torch.Tensor] = []
        self.min: torch.Tensor | None = None
        self.max: torch.Tensor | None = None

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        rows = x.reshape(-1, x.shape[-1]) if self.per_channel else x.reshape(1, -1)
        if self.per_channel:
            batch_min, batch_max, count = rows.amin(dim=0), rows.amax(dim=0), rows.shape[0]
        else:
            batch_min, batch_max, count = x.amin(), x.amax(), rows.shape[1]
        self.min = batch_min if self.min is None else torch.minimum(self.min, batch_min)
        self.max = batch_max if self.max is None else torch.maximum(self.max, batch_max)
        budget = self.samples_per_batch // rows.shape[1] if self.per_channel else self.samples_per_batch
        take = min(count, max(1, budget))
        # Drawn with replacement: O(take) where a permutation of every element would cost O(count) per batch.
        pick = torch.randint(0, count, (take,), generator=self.generator).to(x.device)
        self.samples.append(rows[pick].cpu() if self.per_channel else rows[0, pick].cpu())

    def rows(self) -> torch.Tensor:
        """The subsample as ``[C, N]`` (per-channel) or ``[1, N]`` (per-tensor)."""
        if not self.samples:
            raise RuntimeError("observer saw no data: the calibration pass did not reach this quantizer")
        data = torch.cat(self.samples)
        return data.t().contiguous() if self.per_channel else data[None]


def qdrop_mask(x: torch.Tensor, quant_prob: float) -> torch.Tensor | None:
    """QDrop: 1.0 where an element is quantized (chance ``quant_prob``, in steps of 1/256), 0.0 where it keeps its
    FP value; None when every element is quantized."""
    return primitives.random_mask(x, quant_prob) if quant_prob < 1.0 else None


def _qdrop(x: torch.Tensor, quantized: torch.Tensor, quant_prob: float) -> torch.Tensor:
    """``quantized``, with the elements QDrop keeps in FP taken from ``x``."""
    mask = qdrop_mask(x, quant_prob)
    return quantized if mask is None else torch.lerp(x, quantized, mask)


class UniformQuantizer(nn.Module):
    """Asymmetric uniform fake-quantizer, per tensor or per channel along dim 0.

    Args:
        bits: bit width (2..8).
        per_channel: one ``(scale, zero_point)`` per slice along dim 0 (weights' output channels).
    """

    def __init__(self, bits: int, per_channel: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.per_channel = per_channel
        self.enabled = False
        self.quant_prob = 1.0  # QDrop's p: the chance that an element is quantized (else it passes in FP)
        self.observer: Observer | None = None
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(1))

    def set_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """Sets the grid covering ``[lo, hi]`` (shape ``[C]`` per channel, scalar per tensor)."""
        scale, zero_point = primitives.choose_qparams(lo.detach().float(), hi.detach().float(), self.bits)
        self.set_qparams(scale, zero_point)

    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        self.scale = nn.Parameter(scale.reshape(-1).clone().to(self.scale.device), requires_grad=False)
        self.zero_point = zero_point.reshape(-1).clone().to(self.zero_point.device)

    def _broadcast(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (x.dim() - 1))) if self.per_channel else t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
        if not self.enabled:
            return x
        scale, zero_point = self._broadcast(self.scale, x), self._broadcast(self.zero_point, x)
        if torch.is_grad_enabled() and (x.requires_grad or self.scale.requires_grad):
            return primitives.train_fake_quantize(x, scale, zero_point, self.bits, qdrop_mask(x, self.quant_prob))
        return _qdrop(x, primitives.fake_quantize_inference(x, scale, zero_point, self.bits), self.quant_prob)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_channel={self.per_channel}, enabled={self.enabled}"


class LogSqrt2Quantizer(nn.Module):
    """Log-sqrt(2) fake-quantizer for non-negative inputs (post-softmax attention probabilities).

    Args:
        bits: bit width: ``2**bits - 1`` levels plus zero.
        extra_level: RepQ-ViT's convention instead, ``2**bits`` levels plus zero (one value more than ``bits``).
    """

    def __init__(self, bits: int, extra_level: bool = False) -> None:
        super().__init__()
        self.bits = bits
        self.extra_level = extra_level
        self.enabled = False
        self.quant_prob = 1.0
        self.observer: Observer | None = None
        self.delta = nn.Parameter(torch.ones(()), requires_grad=False)

    def set_delta(self, delta: torch.Tensor) -> None:
        self.delta = nn.Parameter(delta.detach().float().reshape(()).clone().to(self.delta.device), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer.update(x)
        if not self.enabled:
            return x
        return _qdrop(
            x, primitives.log_sqrt2_fake_quantize(x, self.delta, self.bits, self.extra_level), self.quant_prob
        )

    def extra_repr(self) -> str:
        return f"bits={self.bits}, extra_level={self.extra_level}, enabled={self.enabled}"
