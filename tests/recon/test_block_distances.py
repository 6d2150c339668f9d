"""The block distances of the leaders' losses, each held to a hand computation on a tiny block (outputs [B, N, C] =
[2, 3, 4], flattened token-major) and to what its statistics mean: FIMA-Q's DPLR Fisher (``dplr_fim``) and
APHQ-ViT's average perturbation Hessian (``aph``), beside the squared error (``mse``)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mgrq_runner.errors import ConfigError
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.losses import BLOCK_DISTANCES, UnitContext, create_block_distance
from mgrq_runner.recon.losses.base import kl_batchmean
from mgrq_runner.recon.losses.fisher import dplr_metric, dplr_terms, snapshot_rows
from mgrq_runner.recon.losses.hessian import aph_loss, aph_statistic, aph_weights
from mgrq_runner.recon.losses.mse import block_loss
from mgrq_runner.recon.units import Unit, fp_remainder, model_units
from tests.recon.test_families import tiny_models

N, C = 3, 4


def flat(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def context(losses: LossConfig, recon: ReconConfig | None = None, remainder: nn.Module | None = None) -> UnitContext:
    """A context whose statistics the tests set by hand (no model pass): a head when ``remainder`` is None."""
    zeros = torch.zeros(2, N, C, dtype=torch.float64)
    unit = Unit("blocks.0", nn.Identity())
    logits = torch.zeros(2, 5, dtype=torch.float64)
    return UnitContext(unit, zeros, zeros, remainder, logits, recon or ReconConfig(iters=100), losses)


# ---------------------------------------------------------------------------------------------- FIMA-Q


def f1_rows() -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.stack([torch.ones(12, dtype=torch.float64), flat([1] * 6 + [0] * 6)])
    return rows, rows.clone()  # G, Delta


def test_dplr_terms_f1_uniform_errors() -> None:
    gradients, errors = f1_rows()
    assert torch.allclose(dplr_metric(errors), flat([1 / 6, -1 / 6, -1 / 6, 1 / 3]).view(2, 2))
    output = torch.stack([torch.ones(N, C), 2 * torch.ones(N, C)]).double()
    low_rank, diagonal = dplr_terms(output, torch.zeros_like(output), gradients, dplr_metric(errors))
    assert low_rank.item() == pytest.approx(30.0) and diagonal.item() == pytest.approx(1.875)
    signs = output.clone()
    signs[0, 1, 2] *= -1  # absolute errors: a sign changes nothing
    assert dplr_terms(signs, torch.zeros_like(signs), gradients, dplr_metric(errors))[0].item() == (pytest.approx(30.0))


def test_dplr_terms_f2_checks_the_flattening_and_the_metric() -> None:
    output = torch.stack([torch.arange(1, 13, dtype=torch.float64).view(N, C) / 4, -torch.ones(N, C).double()])
    output[1, 1, :] = 0
    gradients = torch.stack([flat([1] * 4 + [2] * 4 + [0] * 4), flat([1, 0, 0, 1] * 3)])
    errors = torch.stack([torch.ones(12, dtype=torch.float64), flat([1, 0, 0, 1] * 3)])
    low_rank, diagonal = dplr_terms(output, torch.zeros_like(output), gradients, dplr_metric(errors))
    assert low_rank.item() == pytest.approx(1153 / 96) and diagonal.item() == pytest.approx(279 / 256)


def test_snapshot_rows_take_absolute_values_before_the_mean() -> None:
    gradients = torch.tensor([[[1.0, -2.0]], [[-3.0, 2.0]]])
    outputs, targets = torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]]), torch.tensor([[[0.0, 1.0]], [[2.0, 0.0]]])
    g, delta = snapshot_rows(gradients, outputs, targets)
    assert g.tolist() == [2.0, 2.0] and delta.tolist() == [1.5, 0.5]  # |mean| would give [1, 0] and [0.5, 0.5]


def test_dplr_fisher_normalises_at_every_snapshot() -> None:
    losses = LossConfig(block_distance="dplr_fim", fisher_rank=2)
    distance = create_block_distance("dplr_fim", context(losses, ReconConfig(iters=100), remainder=nn.Identity()))
    rows = iter(zip(*f1_rows(), strict=True))
    distance.snapshot = lambda: next(rows)  # the statistics of F1, one row per snapshot
    output = torch.stack([torch.ones(N, C), 2 * torch.ones(N, C)]).double()
    target = torch.zeros_like(output)
    distance.refresh(0)
    assert distance(output, target).item() == pytest.approx(2.0)  # the normalisers are this batch's values
    distance.refresh(1)  # no snapshot between 0 and 50 (iters / fisher_rank)
    assert distance(output / 2, target).item() == pytest.approx(0.5)  # each ratio is 1/4
    distance.refresh(50)  # the second snapshot: rank 2, normalisers reset
    assert distance.gradients.shape == (2, 12)
    assert distance(output / 2, target).item() == pytest.approx(2.0)


def test_dplr_fisher_snapshot_is_the_gradient_of_the_models_kl() -> None:
    torch.manual_seed(0)
    unit, rest = nn.Linear(C, C).double(), nn.Sequential(nn.Flatten(), nn.Linear(N * C, 5)).double()
    x_fp, target = torch.randn(6, N, C, dtype=torch.float64), torch.randn(6, N, C, dtype=torch.float64)
    logits = torch.randn(6, 5, dtype=torch.float64)
    losses = LossConfig(block_distance="dplr_fim", statistic_temperature=20.0)
    recon = ReconConfig(iters=10, batch_size=4)
    ctx = UnitContext(Unit("blocks.0", unit), x_fp, target, rest, logits, recon, losses)
    g, delta = create_block_distance("dplr_fim", ctx).snapshot()
    gradients = []
    for rows in (slice(0, 4), slice(4, 6)):  # batch means over recon.batch_size images
        output = unit(x_fp[rows]).detach().requires_grad_(True)
        loss = kl_batchmean(logits[rows], rest(output), 20.0)
        gradients.append(torch.autograd.grad(loss, output)[0])
    expected_g = torch.cat(gradients).abs().flatten(1).mean(0)
    expected_delta = (unit(x_fp) - target).abs().flatten(1).mean(0)
    assert torch.allclose(g, expected_g) and torch.allclose(delta, expected_delta.detach())


def test_dplr_fisher_trains_the_head_on_the_plain_kl() -> None:
    distance = create_block_distance("dplr_fim", context(LossConfig(block_distance="dplr_fim")))
    distance.refresh(0)  # the head takes no snapshot
    logits, target = torch.tensor([[0.0, 0.0, 0.0]]), torch.tensor([[3.0, 0.0, 0.0]])
    assert distance(logits, target).item() == pytest.approx(kl_batchmean(target, logits, 1.0).item())


# ---------------------------------------------------------------------------------------------- APHQ-ViT


def a1_differences() -> torch.Tensor:
    plus = torch.tensor(
        [[[2, 0, 1, 0], [0, 0, 0, 4], [1, 1, 1, 1]], [[0, 0, 1, 0], [0, 2, 0, 0], [1, 1, 1, 1]]], dtype=torch.float64
    )
    minus = torch.tensor(
        [[[0, 0, -1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], [[2, 0, 1, 0], [0, 0, 0, 0], [-1, -1, -1, -1]]],
        dtype=torch.float64,
    )
    return plus - minus


def a2_errors() -> torch.Tensor:
    errors = torch.zeros(2, N, C, dtype=torch.float64)
    errors[0, 0, 0], errors[0, 1, 3], errors[1, 2, :], errors[1, 0, 2] = 1, 2, 1, -1
    return errors


def test_aph_statistic_a1() -> None:
    hessian = aph_statistic(a1_differences())
    assert hessian.shape == (1, N, C)
    assert hessian[0].tolist() == [[2, 0, 1, 0], [0, 1, 0, 2], [1, 1, 1, 1]]


def test_aph_loss_a2_both_forms() -> None:
    hessian, errors = aph_statistic(a1_differences()), a2_errors()
    for form, expected in (("current", 0.625), ("released", 0.225)):
        assert aph_loss(errors, torch.zeros_like(errors), aph_weights(hessian, form), form).item() == pytest.approx(
            expected
        )


def test_aph_current_form_is_normalised_on_the_first_batch() -> None:
    losses = LossConfig(block_distance="aph", aph_form="current")
    distance = create_block_distance("aph", context(LossConfig(block_distance="aph")))  # a head: no statistic
    distance.weights, distance.form = aph_weights(aph_statistic(a1_differences()), "current"), losses.aph_form
    errors = a2_errors()
    assert distance(errors, torch.zeros_like(errors)).item() == pytest.approx(2.0)
    assert distance(errors / 2, torch.zeros_like(errors)).item() == pytest.approx(0.5)


@pytest.mark.parametrize("form", ["released", "current"])
def test_aph_statistic_of_a_model_finite_difference_and_exact_agree(form: str) -> None:
    torch.manual_seed(1)
    rest = nn.Sequential(nn.Flatten(), nn.Linear(N * C, 8), nn.GELU(), nn.Linear(8, 5)).double()
    target, logits = torch.randn(6, N, C, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    statistics = {}
    for how in ("finite_difference", "exact"):
        losses = LossConfig(block_distance="aph", aph_hessian=how, aph_form=form)
        unit, recon = Unit("blocks.0", nn.Identity()), ReconConfig(batch_size=4)
        ctx = UnitContext(unit, target, target, rest, logits, recon, losses)
        statistics[how] = create_block_distance("aph", ctx).hessian
    assert statistics["exact"].shape == (1, N, C) and statistics["exact"].abs().sum() > 0
    assert torch.allclose(statistics["finite_difference"], statistics["exact"], rtol=1e-4, atol=1e-12)


# ---------------------------------------------------------------------------------------------- registry


def test_the_registry_names_every_distance_and_mse_is_the_block_loss() -> None:
    assert set(BLOCK_DISTANCES) == {"mse", "dplr_fim", "aph"}
    output, target = torch.randn(2, N, C), torch.randn(2, N, C)
    distance = create_block_distance("mse", context(LossConfig()))
    assert torch.equal(distance(output, target), block_loss(output, target))


@pytest.mark.parametrize(
    ("override", "word"),
    [
        ({"block_distance": "fisher"}, "block_distance"),
        ({"aph_form": "paper"}, "aph_form"),
        ({"aph_hessian": "tf32"}, "aph_hessian"),
        ({"fisher_rank": 0}, "fisher_rank"),
    ],
)
def test_bad_loss_settings_name_the_key(override: dict, word: str) -> None:
    with pytest.raises(ConfigError, match=word):
        LossConfig(**override)


def test_aph_statistic_of_a_pre_layernorm_vit_is_rounding_noise() -> None:
    # Every read of a pre-LN ViT's residual stream goes through a LayerNorm, which removes a shift of all of a
    # token's channels: APHQ-ViT's perturbation (+-eps on every element at once) leaves the logits unchanged, so
    # g+ - g- (~ 2 eps H 1) is zero in exact arithmetic. In float64 the Hessian's product with ones is zero to
    # rounding beside its product with a random sign vector, and the finite difference is noise far above it.
    fp_model, _, images = tiny_models("deit3_layerscale")
    fp_model = fp_model.double()
    units = model_units(fp_model)
    with torch.no_grad():
        output = units[0](images.double())
        rest = fp_remainder(units, 0, pre_logits=False)
        logits = rest(output)
        assert (rest(output + 1.0) - logits).abs().max().item() < 1e-12 * logits.abs().max().item()
    targets = logits + torch.randn_like(logits)  # a KL away from its minimum: its gradient is not zero

    def hessian_product(direction: torch.Tensor) -> torch.Tensor:
        point = output.clone().requires_grad_(True)
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernel has no double backward
            (gradient,) = torch.autograd.grad(kl_batchmean(targets, rest(point), 20.0), point, create_graph=True)
            return torch.autograd.grad(gradient, point, grad_outputs=direction)[0]

    signs = torch.randint(0, 2, output.shape, generator=torch.Generator().manual_seed(0)).double() * 2 - 1
    along_ones, along_signs = hessian_product(torch.ones_like(output)), hessian_product(signs)
    assert along_ones.abs().max().item() < 1e-9 * along_signs.abs().max().item()
    statistics = {}
    for how in ("finite_difference", "exact"):
        losses = LossConfig(block_distance="aph", aph_hessian=how)
        ctx = UnitContext(units[0], images, output, rest, targets, ReconConfig(), losses)
        statistics[how] = create_block_distance("aph", ctx).hessian
    assert statistics["finite_difference"].abs().max().item() > 1e3 * statistics["exact"].abs().max().item()
