"""The rounding registry: each ``method.recon.rounding`` name is a ``WeightRounding``, and a rounding registered
from outside the package runs through reconstruction, codes and the export manifest with no other edit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mgrq_runner.deploy.safetensors_export import export_tensors
from mgrq_runner.errors import ConfigError
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant import primitives
from mgrq_runner.quant.api import QuantConfig, quant_layers, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.quant.codes import weight_codes
from mgrq_runner.quant.quantizers import UniformQuantizer
from mgrq_runner.quant.rounding import ROUNDINGS, SteRounding, WeightRounding, register_rounding
from mgrq_runner.recon.config import LossConfig, ReconConfig
from mgrq_runner.recon.engine import reconstruct


def test_the_registry_names_what_the_config_accepts() -> None:
    assert list(ROUNDINGS) == ["adaround", "ste"]
    assert all(issubclass(cls, WeightRounding) and cls.name == name for name, cls in ROUNDINGS.items())
    with pytest.raises(ConfigError, match=r"rounding='stochastic' is unknown. Fix: one of \('adaround', 'ste'\)"):
        ReconConfig(rounding="stochastic")
    with pytest.raises(ValueError, match="'ste' is registered already"):
        register_rounding(type("SteAgain", (SteRounding,), {"name": "ste"}))


class FixedStepSte(WeightRounding):
    """STE tuning of the weight on the quantizer's own, fixed grid: a rounding this package does not ship."""

    name = "fixed_step_ste"

    def __init__(self, weight: torch.Tensor, quantizer: UniformQuantizer) -> None:
        super().__init__()
        shape = (-1,) + (1,) * (weight.dim() - 1)
        self.bits, self.hard = quantizer.bits, False
        self.variable = nn.Parameter(weight.detach().clone())
        self.register_buffer("scale", quantizer.scale.detach().reshape(shape).clone())
        self.register_buffer("zero_point", quantizer.zero_point.detach().reshape(shape).clone())
        self.register_buffer("start", self.codes(), persistent=False)

    def codes(self) -> torch.Tensor:
        with torch.no_grad():
            return primitives.quantize(self.variable, *self.grid(), self.bits)

    def forward(self) -> torch.Tensor:
        if self.hard:
            return primitives.dequantize(self.codes(), *self.grid())
        return primitives.fake_quantize(self.variable, *self.grid(), self.bits)

    def moved_share(self) -> float:
        return (self.codes() != self.start).float().mean().item()


def test_a_registered_rounding_runs_through_reconstruction_and_export(monkeypatch) -> None:
    monkeypatch.setitem(ROUNDINGS, FixedStepSte.name, FixedStepSte)
    torch.manual_seed(0)
    fp_model, images = create_proxy_model(pretrained=False).eval(), torch.randn(32, 1, 28, 28)
    model = quantize_(copy.deepcopy(fp_model), QuantConfig(w_bits=3, a_bits=4))
    calibrate(model, [images], 1, InitConfig(), torch.device("cpu"))
    recon = ReconConfig(iters=20, batch_size=8, rounding="fixed_step_ste", weight_lr=1e-2)
    reports = reconstruct(model, fp_model, images, recon, LossConfig(), seed=0)
    assert all(set(report.final) >= {"block_at_90", "block_final", "moved"} for report in reports)
    assert any(report.final["moved"] > 0 for report in reports)  # the weights did learn
    _, manifest = export_tensors(model)
    for name, layer in quant_layers(model):
        assert isinstance(layer.rounding, FixedStepSte) and layer.rounding.hard
        assert manifest["layers"][name]["fixed_step_ste"] and not manifest["layers"][name]["ste"]
        scale, zero_point = layer.rounding.grid()
        assert torch.equal(primitives.dequantize(weight_codes(layer), scale, zero_point), layer.quantized_weight())
