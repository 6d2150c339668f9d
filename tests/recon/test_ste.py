"""STE weight tuning (method.recon.rounding=ste): the rounding, its gradients, a unit's optimisation and report,
and the integer codes an export writes."""

import copy
import math

import pytest
import torch

from mgrq_runner.data import load_fashion_mnist
from mgrq_runner.errors import ConfigError
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quant_layers, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.quant.codes import weight_codes
from mgrq_runner.quant.primitives import dequantize, search_uniform_range
from mgrq_runner.quant.quantizers import UniformQuantizer
from mgrq_runner.quant.rounding import SteRounding
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.engine import reconstruct
from mgrq_runner.recon.units import model_units
from mgrq_runner.results import converged
from tests.conftest import FASHION_MNIST_ROOT, needs_fashion_mnist


def weight_and_quantizer(bits: int = 3) -> tuple[torch.Tensor, UniformQuantizer]:
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(0))
    quantizer = UniformQuantizer(bits, per_channel=True)
    lo, hi = search_uniform_range(weight, bits, (0.99, 1.0))
    quantizer.set_range(lo, hi)
    quantizer.enabled = True
    return weight, quantizer


def test_starts_at_round_to_nearest_and_moves_by_whole_steps() -> None:
    weight, quantizer = weight_and_quantizer()
    rounding = SteRounding(weight, quantizer)
    with torch.no_grad():
        assert torch.equal(rounding(), quantizer(weight))
    assert rounding.moved_share() == 0.0
    with torch.no_grad():  # three steps down on one weight in the middle of its channel's grid: AdaRound cannot
        codes = rounding.codes()
        row, col = (codes == 4).nonzero()[0].tolist()
        rounding.weight[row, col] -= 3 * rounding.scale[row, 0]
    assert rounding.codes()[row, col].item() == 1.0
    assert rounding.moved_share() == pytest.approx(1 / weight.numel())


def test_gradients_pass_straight_through_to_the_weight_and_the_step() -> None:
    weight, quantizer = weight_and_quantizer()
    rounding = SteRounding(weight, quantizer)
    rounding().sum().backward()
    inside = (rounding.codes() > 0) & (rounding.codes() < 7)
    assert torch.all(rounding.weight.grad[inside] == 1.0), "straight through inside the grid"
    assert torch.all(rounding.weight.grad[~inside] == 0.0), "no gradient where the code is clipped"
    assert rounding.scale.grad is not None and rounding.scale.grad.abs().sum() > 0


def test_unknown_rounding_is_refused() -> None:
    with pytest.raises(ConfigError, match="method.recon.rounding"):
        ReconConfig(rounding="stochastic")


@pytest.fixture(scope="module")
def proxy() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    if not (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("needs apt-get install dataset-fashion-mnist")
    images = load_fashion_mnist(FASHION_MNIST_ROOT, "train").tensors[0][:64]
    fp_model = create_proxy_model().eval()
    quant_model = quantize_(copy.deepcopy(fp_model), QuantConfig(w_bits=3, a_bits=3))
    calibrate(quant_model, [images[:32]], 1, InitConfig(), torch.device("cpu"))
    return fp_model, quant_model, images


@needs_fashion_mnist
def test_ste_reconstruction_reports_its_own_convergence_and_exports_its_codes(proxy) -> None:
    fp_model, quant_model, images = copy.deepcopy(proxy)
    initial = {name: layer.weight.detach().clone() for name, layer in quant_layers(quant_model)}
    torch.manual_seed(0)
    recon = ReconConfig(iters=40, batch_size=16, rounding="ste", weight_lr=1e-3, weight_scale_lr=1e-4)
    reports = reconstruct(quant_model, fp_model, images, recon, LossConfig(), seed=0)
    for report in reports:
        final = report.final
        assert set(final) >= {"block_at_90", "block_final", "moved"} and "rounding" not in final
        assert "block_soft" not in final and 0.0 < final["moved"] < 1.0
    # block_final is the tuned unit's block loss on the calibration set, computed with the exported codes
    embed = model_units(quant_model)[0]
    with torch.no_grad():
        error = (embed(images) - model_units(fp_model)[0](images)).pow(2).sum(-1).mean().item()
    assert reports[0].final["block_final"] == pytest.approx(error, rel=1e-4)
    # the criterion reads block_at_90 and block_final
    report = {"unit": "u", "block_at_90": 1.0, "block_final": 0.995, "moved": 0.1}
    assert converged(report) and not converged({**report, "block_final": 0.98})
    for name, layer in quant_layers(quant_model):
        assert torch.equal(layer.weight, initial[name]), "the FP weight is kept; the tuned copy is the rounding's"
        codes = weight_codes(layer).float()  # raises unless the codes reproduce the weight the layer computes with
        scale, zero_point = layer.rounding.step_size().detach(), layer.rounding.zero_point
        assert torch.equal(dequantize(codes, scale, zero_point), layer.quantized_weight())


@needs_fashion_mnist
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_the_weight_schedule_anneals_weights_and_steps_to_zero(proxy, schedule: str) -> None:
    from mgrq_runner.recon.optimizer import Supervision, UnitOptimizer

    fp_model, quant_model, images = copy.deepcopy(proxy)
    for parameter in [*fp_model.parameters(), *quant_model.parameters()]:
        parameter.requires_grad_(False)
    recon = ReconConfig(iters=20, batch_size=16, rounding="ste", weight_lr=1e-3, weight_scale_lr=1e-4)
    recon = ReconConfig(**{**recon.__dict__, "weight_schedule": schedule})
    losses = LossConfig(global_weight=0.0, local_weight=0.0)
    supervision = Supervision.create(model_units(fp_model), images, recon, losses)
    optimizer = UnitOptimizer.for_unit(model_units(quant_model)[0], 0, images, supervision)
    generator = torch.Generator().manual_seed(0)
    rates = []
    for step in range(recon.iters):
        rates.append([group["lr"] for group in optimizer.weight_optimizer.param_groups])
        optimizer.step(step, images, images, generator)
    assert rates[0] == [1e-3, 1e-4]
    if schedule == "constant":
        assert all(r == [1e-3, 1e-4] for r in rates)
    else:  # cosine: half way at the middle, both groups alike, near 0 at the last step
        assert rates[10] == pytest.approx([5e-4, 5e-5])
        assert rates[-1][0] == pytest.approx(1e-3 * (1 - math.cos(math.pi / 20)) / 2, rel=1e-5)
        assert all(a[0] > b[0] for a, b in zip(rates, rates[1:], strict=False))
