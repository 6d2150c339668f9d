"""Quantization primitives on exact integers, error monotonicity, and the vectorised range search."""

import pytest
import torch

from mgrq_runner.quant import primitives


def test_choose_qparams_exact() -> None:
    # [-1, 2] at 2 bits: 4 levels, step 1, zero at code 1.
    scale, zero_point = primitives.choose_qparams(torch.tensor(-1.0), torch.tensor(2.0), bits=2)
    assert scale.item() == 1.0 and zero_point.item() == 1.0
    # The range is widened to include zero: [1, 16] becomes [0, 16], 16 levels of 16/15.
    scale, zero_point = primitives.choose_qparams(torch.tensor(1.0), torch.tensor(16.0), bits=4)
    assert torch.isclose(scale, torch.tensor(16 / 15)) and zero_point.item() == 0.0


def test_quantize_dequantize_exact_codes() -> None:
    scale, zero_point = torch.tensor(0.5), torch.tensor(3.0)
    x = torch.tensor([-10.0, -1.5, -0.2, 0.0, 0.3, 0.74, 1.0, 2.0, 100.0])
    codes = primitives.quantize(x, scale, zero_point, bits=3)
    # round(x / 0.5) + 3, clamped to 0..7 (ties to even: 0.3 / 0.5 = 0.6 -> 1, -0.2 / 0.5 = -0.4 -> 0).
    assert codes.tolist() == [0, 0, 3, 3, 4, 4, 5, 7, 7]
    assert primitives.dequantize(codes, scale, zero_point).tolist() == [-1.5, -1.5, 0, 0, 0.5, 0.5, 1.0, 2.0, 2.0]
    assert torch.equal(
        primitives.fake_quantize(x, scale, zero_point, 3), primitives.dequantize(codes, scale, zero_point)
    )


def test_grid_points_are_fixed_points() -> None:
    scale, zero_point = primitives.choose_qparams(torch.tensor(-3.0), torch.tensor(5.0), bits=4)
    grid = primitives.dequantize(torch.arange(16.0), scale, zero_point)
    assert torch.equal(primitives.quantize(grid, scale, zero_point, 4), torch.arange(16.0))


def test_per_channel_broadcast() -> None:
    weight = torch.tensor([[0.0, 1.0, 3.0], [-8.0, 0.0, 8.0]])
    scale, zero_point = primitives.choose_qparams(weight.amin(1), weight.amax(1), bits=2)
    assert torch.allclose(scale, torch.tensor([1.0, 16 / 3])) and zero_point.tolist() == [0.0, 2.0]
    out = primitives.fake_quantize(weight, scale[:, None], zero_point[:, None], 2)
    assert out[0].tolist() == [0.0, 1.0, 3.0]
    assert torch.allclose(out[1], torch.tensor([-32 / 3, 0.0, 16 / 3]))


def test_fake_quantize_gradient_is_straight_through() -> None:
    x = torch.tensor([0.26, 0.9, 5.0], requires_grad=True)
    primitives.fake_quantize(x, torch.tensor(0.5), torch.tensor(0.0), bits=2).sum().backward()
    # Inside the range the gradient passes straight through; past the top code (1.5) it is clipped.
    assert x.grad.tolist() == [1.0, 1.0, 0.0]


def test_log_sqrt2_codes_exact() -> None:
    delta = torch.tensor(1.0)
    x = torch.tensor([1.0, 2**-0.5, 0.5, 2**-1.5, 0.25, 2.0, 0.0, 1e-9])
    codes = primitives.log_sqrt2_quantize(x, delta, bits=3)
    # Level k is 2^(-k/2); values above delta clip to code 0; code 7 (2^3 - 1) is zero.
    assert codes.tolist() == [0, 1, 2, 3, 4, 0, 7, 7]
    values = primitives.log_sqrt2_dequantize(codes, delta, bits=3)
    assert torch.allclose(values, torch.tensor([1.0, 2**-0.5, 0.5, 2**-1.5, 0.25, 1.0, 0.0, 0.0]))
    assert torch.equal(primitives.log_sqrt2_fake_quantize(x, delta, 3), values)


def test_log_sqrt2_repq_convention_has_one_level_more() -> None:
    """Strictly 2 bits: levels 2^0, 2^-0.5, 2^-1 and zero. RepQ-ViT's convention adds 2^-1.5 (5 values)."""
    delta = torch.tensor(1.0)
    x = torch.tensor([1.0, 2**-0.5, 0.5, 2**-1.5, 2**-2, 0.0])
    strict = primitives.log_sqrt2_fake_quantize(x, delta, 2)
    repq = primitives.log_sqrt2_fake_quantize(x, delta, 2, extra_level=True)
    assert torch.allclose(strict, torch.tensor([1.0, 2**-0.5, 0.5, 0.0, 0.0, 0.0]))
    assert torch.allclose(repq, torch.tensor([1.0, 2**-0.5, 0.5, 2**-1.5, 0.0, 0.0]))
    assert len(set(strict.tolist())) == 4 and len(set(repq.tolist())) == 5
    codes = primitives.log_sqrt2_quantize(x, delta, 2, extra_level=True)
    assert codes.tolist() == [0, 1, 2, 3, 4, 4]
    assert torch.equal(primitives.log_sqrt2_dequantize(codes, delta, 2, extra_level=True), repq)


def test_error_decreases_with_bits() -> None:
    x = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    uniform_errors, log_errors = [], []
    probs = torch.rand(10_000, generator=torch.Generator().manual_seed(1)).pow(4)
    for bits in range(2, 9):
        scale, zero_point = primitives.choose_qparams(x.min(), x.max(), bits)
        uniform_errors.append((primitives.fake_quantize(x, scale, zero_point, bits) - x).pow(2).mean().item())
        log_errors.append(
            (primitives.log_sqrt2_fake_quantize(probs, torch.tensor(1.0), bits) - probs).pow(2).mean().item()
        )
    assert all(a > b for a, b in zip(uniform_errors[:-1], uniform_errors[1:], strict=True))
    assert all(a >= b for a, b in zip(log_errors[:-1], log_errors[1:], strict=True)) and log_errors[0] > log_errors[-1]


def test_search_clips_outliers_and_matches_per_row_loop() -> None:
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(6, 20_000, generator=generator)
    rows[:3, 0] = 20.0  # an outlier in half of the rows
    percentiles = (0.999, 0.9999, 1.0)
    lo, hi = primitives.search_uniform_range(rows, 4, percentiles)
    assert (hi[:3] < 10).all(), "the min/max candidate must lose to a clipped one when an outlier dominates"
    for i in range(rows.shape[0]):
        lo_i, hi_i = primitives.search_uniform_range(rows[i : i + 1], 4, percentiles)
        assert torch.allclose(lo[i], lo_i[0]) and torch.allclose(hi[i], hi_i[0])


def test_search_minmax_uses_exact_extremes() -> None:
    rows = torch.tensor([[0.0, 1.0, 2.0]])
    lo, hi = primitives.search_uniform_range(rows, 4, (1.0,), row_min=torch.tensor([-5.0]), row_max=torch.tensor([7.0]))
    assert lo.item() == -5.0 and hi.item() == 7.0


def test_log_delta_search_prefers_low_error() -> None:
    probs = torch.rand(50_000, generator=torch.Generator().manual_seed(0)).pow(8) * 0.5
    delta = primitives.search_log_sqrt2_delta(probs, 4, (0.5001, 0.999, 1.0))
    error = (primitives.log_sqrt2_fake_quantize(probs, delta, 4) - probs).pow(2).mean()
    for candidate in torch.quantile(probs, torch.tensor([0.5001, 0.999, 1.0])):
        assert error <= (primitives.log_sqrt2_fake_quantize(probs, candidate, 4) - probs).pow(2).mean() + 1e-12


def test_fast_paths_agree_with_the_reference() -> None:
    generator = torch.Generator().manual_seed(0)
    probs = torch.randn(64, 50, 50, generator=generator).softmax(-1)
    delta = torch.tensor(0.7)
    for bits in (2, 4, 8):
        reference = primitives.log_sqrt2_dequantize(primitives.log_sqrt2_quantize(probs, delta, bits), delta, bits)
        assert torch.allclose(primitives.log_sqrt2_fake_quantize(probs, delta, bits), reference, rtol=1e-6, atol=0)
    x = torch.randn(100_000, generator=generator) * 3
    scale, zero_point = primitives.choose_qparams(x.min(), x.max(), 4)
    inference = primitives.fake_quantize_inference(x, scale, zero_point, 4)
    assert torch.equal(
        inference, primitives.dequantize(primitives.quantize(x, scale, zero_point, 4), scale, zero_point)
    )


def test_log_sqrt2_gradients() -> None:
    probs = torch.tensor([0.9, 0.3, 0.01, 0.0], requires_grad=True)
    delta = torch.tensor(1.0, requires_grad=True)
    primitives.log_sqrt2_fake_quantize(probs, delta, 3).sum().backward()
    assert probs.grad.tolist() == [1.0, 1.0, 1.0, 1.0], "straight-through for the input"
    codes = primitives.log_sqrt2_quantize(probs.detach(), delta.detach(), 3)
    assert torch.isclose(delta.grad, primitives.log_sqrt2_dequantize(codes, torch.tensor(1.0), 3).sum())


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("drop", [False, True])
def test_train_fake_quantize_values_and_gradients(per_channel: bool, drop: bool) -> None:
    torch.manual_seed(0)
    x = torch.randn(6, 50, 8) * 3  # wide enough that some elements clip at 3 bits
    lo, hi = (x.amin((1, 2)) / 2, x.amax((1, 2)) / 2) if per_channel else (torch.tensor(-2.0), torch.tensor(1.5))
    scale, zero_point = primitives.choose_qparams(lo, hi, bits=3)
    if per_channel:
        scale, zero_point = scale[:, None, None], zero_point[:, None, None]
    quantized = primitives.random_mask(x, 0.5, torch.Generator().manual_seed(1)) if drop else torch.ones_like(x)
    upstream = torch.randn_like(x)
    x_, scale_ = x.clone().requires_grad_(True), scale.clone().requires_grad_(True)
    out = primitives.train_fake_quantize(x_, scale_, zero_point, 3, quantized if drop else None)
    (out * upstream).sum().backward()

    fake = primitives.fake_quantize(x, scale, zero_point, 3)
    assert torch.equal(out.detach(), torch.where(quantized.bool(), fake, x))
    # By hand: the code round(x/s) is inside [-z, qmax - z] or clipped to its end.
    rounded = (x / scale).round()
    clipped = torch.clamp(rounded, -zero_point, 7 - zero_point)
    inside = rounded == clipped
    assert (~inside & quantized.bool()).any() and inside.any()  # both branches are exercised
    expected_x = torch.where(inside | ~quantized.bool(), upstream, torch.zeros_like(upstream))
    assert torch.equal(x_.grad, expected_x)
    lsq = torch.where(inside, rounded - x / scale, clipped) * quantized  # LSQ; dropped elements give nothing
    expected_scale = (upstream * lsq).sum_to_size(scale.shape)
    assert scale_.grad.shape == scale.shape
    assert torch.allclose(scale_.grad, expected_scale, rtol=1e-5, atol=1e-4)


def test_random_mask_probability_and_determinism() -> None:
    like = torch.empty(200, 500)
    for prob in (0.0, 0.25, 0.5, 1.0):
        mask = primitives.random_mask(like, prob, torch.Generator().manual_seed(0))
        assert mask.dtype == like.dtype and mask.shape == like.shape
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        assert abs(mask.mean().item() - prob) < 0.01
    first = primitives.random_mask(like, 0.5, torch.Generator().manual_seed(3))
    assert torch.equal(first, primitives.random_mask(like, 0.5, torch.Generator().manual_seed(3)))
    assert not torch.equal(first, primitives.random_mask(like, 0.5, torch.Generator().manual_seed(4)))
