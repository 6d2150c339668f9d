"""Reconstruction on the shipped proxy: loss terms, where their gradients go, and the error it removes."""

import copy

import pytest
import torch

from mgrq_runner.data import load_fashion_mnist
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quant_layers, quantize_, set_quantization
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.recon.cache import UnitTargets, capture_points, fp_outputs
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.engine import reconstruct
from mgrq_runner.recon.optimizer import Supervision, UnitOptimizer
from mgrq_runner.recon.units import model_units, run_units
from mgrq_runner.results import converged
from tests.conftest import FASHION_MNIST_ROOT, needs_fashion_mnist

pytestmark = needs_fashion_mnist


@pytest.fixture(scope="module")
def proxy() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    images = load_fashion_mnist(FASHION_MNIST_ROOT, "train").tensors[0][:64]
    fp_model = create_proxy_model().eval()
    quant_model = quantize_(copy.deepcopy(fp_model), QuantConfig(w_bits=3, a_bits=3))
    calibrate(quant_model, [images[:32]], 1, InitConfig(), torch.device("cpu"))
    return fp_model, quant_model, images


def test_units_compose_to_the_model(proxy) -> None:
    fp_model, _, images = proxy
    units = model_units(fp_model)
    assert [u.name for u in units] == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    with torch.no_grad():
        assert torch.equal(run_units(units, images), fp_model(images))


def test_global_and_local_terms(proxy) -> None:
    fp_model, quant_model, images = copy.deepcopy(proxy)
    for parameter in [*fp_model.parameters(), *quant_model.parameters()]:
        parameter.requires_grad_(False)
    quant_units, fp_units = model_units(quant_model), model_units(fp_model)
    index, unit = 2, quant_units[2]
    with torch.no_grad():
        x_fp = run_units(fp_units[:index], images)
        logits = fp_model(images)
    supervision = Supervision(fp_units, logits, ReconConfig(quant_prob=1.0), LossConfig())
    optimizer = UnitOptimizer.for_unit(unit, index, x_fp, supervision)
    assert len(optimizer.points) == 4, "qkv, proj, fc1, fc2"
    assert optimizer.remainder is not None and optimizer.targets.logits is logits
    idx = torch.arange(32)
    roundings, scales = optimizer.roundings, optimizer.scales

    set_quantization(unit.module, False)
    with torch.no_grad():
        fp_terms = optimizer.loss_terms(x_fp[idx], idx, True)
    # Zero up to float rounding (the FP model runs timm's fused attention, the unit the explicit path).
    assert fp_terms["global"].item() < 1e-6 and fp_terms["local"].item() < 1e-10

    set_quantization(unit.module, True)
    terms = optimizer.loss_terms(x_fp[idx], idx, True)
    assert terms["global"].item() > 100 * fp_terms["global"].item() and terms["local"].item() > 1e-6
    learnable = {id(p) for p in [*scales, *(r.variable for r in roundings)]}
    for name in ("global", "local"):
        for parameter in [*learnable_parameters(quant_model, fp_model, roundings)]:
            parameter.grad = None
        terms = optimizer.loss_terms(x_fp[idx], idx, True)
        terms[name].backward()
        assert all(r.variable.grad is not None and r.variable.grad.abs().sum() > 0 for r in roundings), name
        assert sum(s.grad.abs().sum() for s in scales if s.grad is not None) > 0, name
        stray = [
            p
            for p in learnable_parameters(quant_model, fp_model, roundings)
            if id(p) not in learnable and p.grad is not None
        ]
        assert not stray, f"{name} loss reached {len(stray)} parameters outside the unit's learnable set"


def learnable_parameters(quant_model, fp_model, roundings):
    return [*quant_model.parameters(), *fp_model.parameters(), *(r.variable for r in roundings)]


def block_errors(quant_model: torch.nn.Module, fp_model: torch.nn.Module, images: torch.Tensor) -> list[float]:
    outputs: dict[str, list[torch.Tensor]] = {"quant": [], "fp": []}
    hooks = [
        block.register_forward_hook(lambda _m, _i, out, key=key: outputs[key].append(out))
        for key, model in (("quant", quant_model), ("fp", fp_model))
        for block in model.blocks
    ]
    with torch.no_grad():
        quant_model(images)
        fp_model(images)
    for hook in hooks:
        hook.remove()
    return [(q - f).pow(2).sum(-1).mean().item() for q, f in zip(outputs["quant"], outputs["fp"], strict=True)]


def test_mgrq_lowers_every_block_error(proxy) -> None:
    fp_model, quant_model, images = copy.deepcopy(proxy)
    before = block_errors(quant_model, fp_model, images)
    torch.manual_seed(0)
    reports = reconstruct(quant_model, fp_model, images, ReconConfig(iters=100), LossConfig(), seed=0)
    assert [r.name for r in reports][-1] == "head" and all(r.final for r in reports[1:])
    after = block_errors(quant_model, fp_model, images)
    assert all(a < b for a, b in zip(after, before, strict=True)), (before, after)


def test_same_seed_same_result_on_the_same_device(proxy) -> None:
    def reconstructed_logits(seed: int) -> torch.Tensor:
        fp_model, quant_model, images = copy.deepcopy(proxy)
        torch.manual_seed(seed)  # the in-quantizer QDrop masks draw from the global generator (run.py seeds it)
        reconstruct(quant_model, fp_model, images, ReconConfig(iters=6, batch_size=16), LossConfig(), seed=seed)
        with torch.no_grad():
            return quant_model(images)

    first = reconstructed_logits(0)
    assert torch.equal(first, reconstructed_logits(0))
    assert not torch.equal(first, reconstructed_logits(1))


def test_convergence_report_measures_the_hardened_unit(proxy) -> None:
    """block_hard is the hardened unit's block loss on the calibration set; undecided counts 0.01 < h(V) < 0.99."""
    fp_model, quant_model, images = copy.deepcopy(proxy)
    torch.manual_seed(0)
    reports = reconstruct(quant_model, fp_model, images, ReconConfig(iters=20, batch_size=16), LossConfig(), seed=0)
    embed = model_units(quant_model)[0]
    with torch.no_grad():
        error = (embed(images) - model_units(fp_model)[0](images)).pow(2).sum(-1).mean().item()
    assert reports[0].final["block_hard"] == pytest.approx(error, rel=1e-4)
    soft = torch.cat([layer.rounding.soft_rounding().flatten() for _, layer in quant_layers(embed.module)])
    assert reports[0].final["undecided"] == pytest.approx(((soft > 0.01) & (soft < 0.99)).float().mean().item())
    # 20 iterations cannot decide most roundings: the report must say so.
    assert all(r.final["undecided"] > 0.02 for r in reports) and not all(
        converged({"unit": r.name, **r.final}) for r in reports
    )


def test_local_targets_in_bfloat16(proxy) -> None:
    """``local_target_dtype=bfloat16`` halves IBLS's cache; the local term stays within bf16's precision."""
    fp_model, quant_model, images = copy.deepcopy(proxy)
    for parameter in [*fp_model.parameters(), *quant_model.parameters()]:
        parameter.requires_grad_(False)
    unit, fp_units = model_units(quant_model)[2], model_units(fp_model)
    with torch.no_grad():
        x_fp = run_units(fp_units[:2], images)
    points = capture_points(unit.module, LossConfig().local_layers)
    output, layers = fp_outputs(unit, x_fp, points, batch=32)
    output_bf16, layers_bf16 = fp_outputs(unit, x_fp, points, batch=32, layer_dtype=torch.bfloat16)
    assert torch.equal(output, output_bf16) and output_bf16.dtype == torch.float32
    assert all(t.dtype == torch.bfloat16 for t in layers_bf16)
    assert sum(t.nbytes for t in layers_bf16) * 2 == sum(t.nbytes for t in layers)
    terms = {}
    for name, cached in (("float32", layers), ("bfloat16", layers_bf16)):
        losses = LossConfig(global_weight=0.0, local_target_dtype=name)
        copied = copy.deepcopy(unit)
        copied_points = capture_points(copied.module, losses.local_layers)
        targets = UnitTargets(output, cached, None)
        supervision = Supervision(fp_units, None, ReconConfig(quant_prob=1.0), losses)
        distance = supervision.block_distance(copied, 2, x_fp, output)
        optimizer = UnitOptimizer(copied, None, targets, copied_points, supervision, distance)
        idx = torch.arange(32)
        with torch.no_grad():
            terms[name] = optimizer.loss_terms(x_fp[idx], idx, False)["local"].item()
    assert terms["bfloat16"] == pytest.approx(terms["float32"], rel=0.02)
    assert terms["bfloat16"] != terms["float32"]  # the targets really were rounded
