"""RepQ-ViT reparameterisation: the FP function is unchanged, and per-tensor quantization after it equals
per-channel quantization before it."""

import copy

import pytest
import timm
import torch
from torch import nn

from mgrq_runner.quant import primitives
from mgrq_runner.quant.api import QuantConfig, quant_layers, quantize_, set_quantization
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.quant.modules import QuantLinear
from mgrq_runner.quant.reparam import reparam_pairs, reparameterize_


@pytest.mark.parametrize(
    ("name", "num_pairs"),
    [("deit_tiny_patch16_224", 24), ("vit_small_patch16_224", 24), ("swin_tiny_patch4_window7_224", 27)],
)
def test_reparam_keeps_fp_function(name: str, num_pairs: int) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    model = quantize_(copy.deepcopy(reference), QuantConfig(w_bits=4, a_bits=4))
    assert len(reparam_pairs(model)) == num_pairs
    norms_before = [norm.weight.clone() for norm, _ in reparam_pairs(model)]
    calibrate(model, [torch.randn(2, 3, 224, 224)], 1, InitConfig(observer_samples=2**14), torch.device("cpu"))
    assert any(not torch.equal(a, norm.weight) for a, (norm, _) in zip(norms_before, reparam_pairs(model), strict=True))
    set_quantization(model, False)
    for _, layer in quant_layers(model):
        layer.unfreeze()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, actual = reference(images), model(images)
    relative_error = ((actual - expected).norm() / expected.norm()).item()
    assert relative_error < 1e-5


def test_per_tensor_after_reparam_equals_per_channel_before() -> None:
    torch.manual_seed(0)
    channels, bits = 16, 4
    norm = nn.LayerNorm(channels)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels) * 5 + 0.1)  # channel ranges differ by up to 50x
        norm.bias.copy_(torch.randn(channels) * 2)
    linear = QuantLinear(nn.Linear(channels, 8), w_bits=8, a_bits=bits)
    tokens = torch.randn(256, channels)
    with torch.no_grad():
        activation = norm(tokens)
        scale, zero_point = primitives.choose_qparams(activation.amin(0), activation.amax(0), bits)
        expected = nn.functional.linear(
            primitives.fake_quantize(activation, scale, zero_point, bits), linear.weight, linear.bias
        )
        target_scale, target_zero_point = reparameterize_(norm, linear, scale, zero_point)
        reparam_activation = norm(tokens)
        actual = nn.functional.linear(
            primitives.fake_quantize(reparam_activation, target_scale, target_zero_point, bits),
            linear.weight,
            linear.bias,
        )
    assert torch.allclose(actual, expected, atol=1e-4, rtol=1e-4)
    codes = primitives.quantize(reparam_activation, target_scale, target_zero_point, bits)
    assert codes.min() == 0 and codes.max() == 2**bits - 1, "every channel now spans the common grid"
