"""AdaRound: initialisation, hardening, regulariser and beta schedule; QDrop switches."""

import pytest
import torch

from mgrq_runner.quant.primitives import search_uniform_range
from mgrq_runner.quant.quantizers import UniformQuantizer
from mgrq_runner.quant.rounding import AdaRound, rounding_beta
from mgrq_runner.recon.optimizer import qdrop_input


def weight_and_quantizer(bits: int = 4) -> tuple[torch.Tensor, UniformQuantizer]:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    quantizer = UniformQuantizer(bits, per_channel=True)
    lo, hi = search_uniform_range(weight, bits, (0.99, 1.0))
    quantizer.set_range(lo, hi)
    return weight, quantizer


def test_soft_weights_start_at_the_clipped_fp_weights() -> None:
    weight, quantizer = weight_and_quantizer()
    rounding = AdaRound(weight, quantizer)
    scale, zero_point = quantizer.scale[:, None], quantizer.zero_point[:, None]
    clipped = torch.clamp(weight, -zero_point * scale, (15 - zero_point) * scale)
    assert torch.allclose(rounding(), clipped, atol=float(scale.max()) * 2e-4)


def test_hardened_weights_are_floor_or_ceil() -> None:
    weight, quantizer = weight_and_quantizer()
    rounding = AdaRound(weight, quantizer)
    with torch.no_grad():
        rounding.variable.normal_(generator=torch.Generator().manual_seed(1))
    rounding.hard = True
    scale, zero_point = quantizer.scale[:, None], quantizer.zero_point[:, None]
    codes = rounding() / scale
    inside = (weight / scale + zero_point >= 0) & (weight / scale + zero_point <= 14)
    floor = (weight / scale).floor()
    assert torch.allclose(codes.round(), codes, atol=1e-4), "hard weights lie on the grid"
    is_floor = torch.isclose(codes, floor, atol=1e-4)
    is_ceil = torch.isclose(codes, floor + 1, atol=1e-4)
    assert (is_floor | is_ceil)[inside].all()
    assert is_floor[inside].any() and is_ceil[inside].any()


def test_regularizer_and_beta_schedule() -> None:
    weight, quantizer = weight_and_quantizer()
    rounding = AdaRound(weight, quantizer)
    with torch.no_grad():
        rounding.variable.fill_(100.0)  # h = 1 everywhere: firmly rounded up
    assert rounding.regularizer(2.0).item() == 0.0
    with torch.no_grad():
        rounding.variable.fill_(0.0)  # h = 0.5: as undecided as can be
    assert rounding.regularizer(2.0).item() == pytest.approx(weight.numel())
    assert rounding_beta(0, 1000) is None and rounding_beta(199, 1000) is None
    assert rounding_beta(200, 1000) == 20.0
    assert rounding_beta(600, 1000) == pytest.approx(11.0)
    assert rounding_beta(1000, 1000) == pytest.approx(2.0)


def test_qdrop_extremes() -> None:
    generator = torch.Generator().manual_seed(0)
    x_q, x_fp = torch.zeros(4, 10, 8), torch.ones(4, 10, 8)
    assert torch.equal(qdrop_input(x_q, x_fp, 1.0, generator), x_q)
    assert torch.equal(qdrop_input(x_q, x_fp, 0.0, generator), x_fp)
    mixed = qdrop_input(x_q, x_fp, 0.5, generator)
    assert 0.4 < mixed.mean().item() < 0.6
    quantizer = UniformQuantizer(2)
    quantizer.set_range(torch.tensor(-1.0), torch.tensor(1.0))
    quantizer.enabled = True
    x = torch.linspace(-1, 1, 101)
    quantized = quantizer(x)
    quantizer.quant_prob = 0.0  # p = 0: every element passes through in FP
    assert torch.equal(quantizer(x), x)
    quantizer.quant_prob = 1.0  # p = 1: the plain quantizer
    assert torch.equal(quantizer(x), quantized)
