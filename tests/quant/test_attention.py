"""With quantizers off, the explicit attention path equals timm's own forward (random weights)."""

import copy

import pytest
import timm
import torch

from mgrq_runner.quant.api import QuantConfig, quantize_, quantizers
from mgrq_runner.quant.attention import QuantViTAttention, QuantWindowAttention


@pytest.mark.parametrize(
    ("name", "attention_type"),
    [
        ("deit_tiny_patch16_224", QuantViTAttention),
        ("vit_small_patch16_224", QuantViTAttention),
        ("swin_tiny_patch4_window7_224", QuantWindowAttention),
    ],
)
def test_explicit_attention_matches_timm(name: str, attention_type: type) -> None:
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False).eval()
    model = quantize_(copy.deepcopy(reference), QuantConfig(w_bits=4, a_bits=4))
    attentions = [m for m in model.modules() if isinstance(m, attention_type)]
    assert len(attentions) == (12 if "swin" in name else len(reference.blocks))
    assert not any(q.enabled for _, q in quantizers(model))
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected, actual = reference(images), model(images)
    assert torch.allclose(actual, expected, rtol=1e-4, atol=1e-5), (actual - expected).abs().max()


def test_every_linear_is_quantized() -> None:
    model = quantize_(timm.create_model("deit_tiny_patch16_224", pretrained=False), QuantConfig())
    assert not [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert type(model.patch_embed.proj).__name__ == "QuantConv2d"
    assert model.patch_embed.proj.input_quantizer.bits == 8


def test_quantizers_follow_the_model_device() -> None:
    # The meta device stands in for a GPU: quantizers created by quantize_ must land beside the weights.
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False).to("meta")
    quantize_(model, QuantConfig())
    devices = {t.device.type for t in [*model.parameters(), *model.buffers()]}
    assert devices == {"meta"}
