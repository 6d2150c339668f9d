"""Pure quantization functions: choose parameters, quantize, dequantize, fake-quantize, search ranges.

Nothing here holds state. Uniform quantization is asymmetric: integer codes ``0 .. 2**bits - 1``, real value
``(code - zero_point) * scale``. The log-sqrt(2) quantizer (for softmax outputs, which lie in [0, 1]) has levels
``delta * 2**(-k / 2)`` for codes ``k = 0 .. 2**bits - 2`` and reserves code ``2**bits - 1`` for zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SCALE_EPS = 1e-8


def qmax(bits: int) -> int:
    """Largest integer code of an unsigned ``bits``-bit quantizer."""
    return 2**bits - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Rounds to nearest (ties to even) with a straight-through gradient."""
    return (x.round() - x).detach() + x


def choose_qparams(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point of the asymmetric grid covering ``[lo, hi]`` (widened to include 0).

    Args:
        lo: lower clipping bound, any shape (one value per channel for per-channel quantizers).
        hi: upper clipping bound, same shape as ``lo``.
        bits: bit width.

    Returns:
        ``(scale, zero_point)``; the zero point is a float tensor holding integers in ``[0, 2**bits - 1]``.
    """
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    scale = torch.clamp((hi - lo) / qmax(bits), min=SCALE_EPS)
    zero_point = torch.clamp(torch.round(-lo / scale), 0, qmax(bits))
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as a float tensor) of ``x`` on the grid ``(scale, zero_point)``."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, qmax(bits))


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Real values of integer ``codes``."""
    return (codes - zero_point) * scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize(quantize(x))`` with a straight-through gradient for the rounding (LSQ-style for ``scale``)."""
    codes = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax(bits))
    return (codes - zero_point) * scale


def log_sqrt2_zero_code(bits: int, extra_level: bool = False) -> int:
    """The log-sqrt(2) code meaning zero: codes below it are the levels ``delta * 2**(-k/2)``.

    Strictly ``bits`` bits: ``2**bits - 1`` levels plus zero. ``extra_level`` is RepQ-ViT's convention,
    ``2**bits`` levels plus zero (one value more than ``bits`` bits hold), for comparing with its numbers.
    """
    return qmax(bits) + int(extra_level)


def log_sqrt2_quantize(x: torch.Tensor, delta: torch.Tensor, bits: int, extra_level: bool = False) -> torch.Tensor:
    """Codes ``k`` of non-negative ``x`` on the levels ``delta * 2**(-k/2)``; ``log_sqrt2_zero_code`` means zero."""
    zero = float(log_sqrt2_zero_code(bits, extra_level))
    codes = torch.round(-2.0 * torch.log2(x / delta))
    return torch.clamp(torch.nan_to_num(codes, nan=zero, posinf=zero), 0, zero)


def log_sqrt2_dequantize(
    codes: torch.Tensor, delta: torch.Tensor, bits: int, extra_level: bool = False
) -> torch.Tensor:
    """Real values of log-sqrt(2) ``codes``."""
    values = delta * torch.exp2(-codes / 2.0)
    return torch.where(codes >= log_sqrt2_zero_code(bits, extra_level), torch.zeros_like(values), values)


def log_sqrt2_fake_quantize(x: torch.Tensor, delta: torch.Tensor, bits: int, extra_level: bool = False) -> torch.Tensor:
    """``log_sqrt2_dequantize(log_sqrt2_quantize(x))``, computed in place where no gradient needs the steps.

    Gradients: ``delta`` gets the level values; ``x`` gets a straight-through gradient.
    """
    with torch.no_grad():
        levels = torch.log2(x).sub_(torch.log2(delta)).mul_(-2.0).round_().clamp_(min=0)
        zero = log_sqrt2_zero_code(bits, extra_level)
        levels.masked_fill_(levels >= zero, float("inf")).mul_(-0.5).exp2_()  # 2**(-k/2); zero code -> 0
    out = levels * delta
    return out + (x - x.detach()) if x.requires_grad and torch.is_grad_enabled() else out


def fake_quantize_inference(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """``fake_quantize`` without autograd, in five in-place passes (evaluation speed).

    ``round(x / s) + z`` clamped to ``[0, qmax]`` equals ``round(x / s)`` clamped to ``[-z, qmax - z]``, plus ``z``.
    """
    # Two one-sided clamps: on the CPU ``clamp_`` with tensor bounds takes a slow path, about 10x slower than
    # ``clamp_min_`` then ``clamp_max_`` (the same values: ``clamp(x, lo, hi) = min(max(x, lo), hi)``).
    return torch.div(x, scale).round_().clamp_min_(-zero_point).clamp_max_(qmax(bits) - zero_point).mul_(scale)


def random_mask(like: torch.Tensor, prob: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A tensor shaped and typed like ``like``: 1.0 with probability ``prob`` (in steps of 1/256), else 0.0.

    Drawn as random bytes, eight per 64-bit word: on the CPU a quarter of the cost of ``torch.rand``.
    """
    words = torch.empty((like.numel() + 7) // 8, dtype=torch.int64, device=like.device)
    words.random_(-(2**63), 2**63 - 1, generator=generator)
    random_bytes = words.view(torch.uint8)[: like.numel()].view(like.shape)
    return torch.empty_like(like).copy_(random_bytes).lt_(round(prob * 256))


class _TrainFakeQuantize(torch.autograd.Function):
    """``fake_quantize`` under autograd with QDrop, in few passes over memory (reconstruction's hot path).

    Forward: ``fake_quantize_inference``, then ``x`` where the mask is 0. Backward recomputes the codes rather than
    keeping autograd's intermediates: ``x`` gets a straight-through gradient except where a quantized element is
    clipped; ``scale`` the LSQ gradient, ``round(x/s) - x/s`` inside the range and the clipped code outside.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, bits, quantized):  # type: ignore[override]
        out = fake_quantize_inference(x, scale, zero_point, bits)
        if quantized is not None:
            out = torch.lerp(x, out, quantized)
        ctx.bits = bits
        ctx.save_for_backward(x, scale, zero_point, quantized)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, scale, zero_point, quantized = ctx.saved_tensors
        scaled = x / scale
        rounded = scaled.round()
        clipped = rounded.clamp_min(-zero_point).clamp_max_(qmax(ctx.bits) - zero_point)  # see above: not clamp
        clipped_off = rounded.ne_(clipped)  # 1.0 where the code was clipped (float masks: bool ones are slow)
        if quantized is not None:
            clipped_off.mul_(quantized)  # dropped elements pass x through unchanged
        grad_x = grad_scale = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.addcmul(grad, grad, clipped_off, value=-1.0)
        if ctx.needs_input_grad[1]:
            # clipped - scaled * (1 - clipped_off): round(x/s) - x/s inside, the clipped code outside
            lsq = torch.addcmul(clipped.sub_(scaled), scaled, clipped_off)
            if quantized is not None:
                lsq.mul_(quantized)
            grad_scale = lsq.mul_(grad).sum_to_size(scale.shape)
        return grad_x, grad_scale, None, None, None


def train_fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int, quantized: torch.Tensor | None = None
) -> torch.Tensor:
    """``fake_quantize`` with its gradients where the 0/1 mask ``quantized`` is 1 (everywhere when None), ``x``
    where it is 0 (QDrop). Faster and leaner than ``fake_quantize`` under autograd."""
    return _TrainFakeQuantize.apply(x, scale, zero_point, bits, quantized)


def _quantiles(rows: torch.Tensor, percentiles: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Lower and upper quantiles of each row for every percentile: two ``[P, C]`` tensors."""
    probs = torch.tensor(list(percentiles), dtype=rows.dtype, device=rows.device)
    hi = torch.quantile(rows, probs, dim=1)
    lo = torch.quantile(rows, 1.0 - probs, dim=1)
    return lo, hi


def search_uniform_range(
    rows: torch.Tensor,
    bits: int,
    percentiles: Sequence[float],
    row_min: torch.Tensor | None = None,
    row_max: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row clipping range minimising the squared fake-quantization error, among percentile candidates.

    Each row (a weight's output channel, an activation channel, or the whole flattened tensor as one row) gets
    candidates ``[quantile(1 - p), quantile(p)]`` for every ``p`` in ``percentiles``; ``p = 1`` means min/max.
    All rows and candidates are evaluated at once (no loop over channels).

    Args:
        rows: ``[C, N]`` samples, one row per quantization group.
        bits: bit width.
        percentiles: candidate upper percentiles, each in ``(0.5, 1]``.
        row_min: exact per-row minima (``[C]``) to use for ``p = 1`` when ``rows`` is a subsample.
        row_max: exact per-row maxima, likewise.

    Returns:
        ``(lo, hi)``, each ``[C]``.
    """
    lo, hi = _quantiles(rows, percentiles)
    if row_min is not None and row_max is not None:
        exact = torch.tensor([p >= 1.0 for p in percentiles], device=rows.device)
        lo = torch.where(exact[:, None], row_min[None].to(lo), lo)
        hi = torch.where(exact[:, None], row_max[None].to(hi), hi)
    if len(percentiles) == 1:
        return lo[0], hi[0]
    scale, zero_point = choose_qparams(lo, hi, bits)  # [P, C]
    errors = torch.stack(
        [
            (fake_quantize(rows, scale[i, :, None], zero_point[i, :, None], bits) - rows).pow(2).mean(dim=1)
            for i in range(len(percentiles))
        ]
    )  # [P, C]
    best = errors.argmin(dim=0)
    columns = torch.arange(rows.shape[0], device=rows.device)
    return lo[best, columns], hi[best, columns]


def search_log_sqrt2_delta(
    samples: torch.Tensor,
    bits: int,
    percentiles: Sequence[float],
    sample_max: torch.Tensor | None = None,
    extra_level: bool = False,
) -> torch.Tensor:
    """The log-sqrt(2) ``delta`` (largest level) minimising squared error, among percentile candidates."""
    flat = samples.flatten()
    candidates = torch.quantile(flat, torch.tensor(list(percentiles), dtype=flat.dtype, device=flat.device))
    if sample_max is not None:
        candidates = torch.where(torch.tensor(percentiles, device=flat.device) >= 1.0, sample_max.to(flat), candidates)
    candidates = torch.clamp(candidates, min=SCALE_EPS)
    errors = torch.stack(
        [(log_sqrt2_fake_quantize(flat, d, bits, extra_level) - flat).pow(2).mean() for d in candidates]
    )
    return candidates[errors.argmin()]
