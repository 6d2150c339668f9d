"""``quantize_(model, config)``: swap a timm ViT/DeiT/Swin's layers for quantized ones, in place.

After ``quantize_`` every quantizer is disabled, so the model still computes its FP function (through the
explicit attention path). ``calibrate`` then sets the ranges and enables them.
"""

from __future__ import annotations

from collections.abc import Iterator

from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from mgrq_runner.errors import ModelError
from mgrq_runner.quant.attention import QuantViTAttention, QuantWindowAttention
from mgrq_runner.quant.config import QuantConfig
from mgrq_runner.quant.modules import QuantConv2d, QuantLinear, QuantWeightLayer
from mgrq_runner.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Puts ``new`` in place of ``model``'s submodule ``name``."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def quantize_(model: nn.Module, config: QuantConfig) -> nn.Module:
    """Replaces attention, Linear and patch-embedding layers of ``model`` with quantized ones (in place).

    Returns:
        ``model`` itself, for chaining.
    """
    bits = config.w_bits, config.a_bits
    for name, module in list(model.named_modules()):
        if isinstance(module, Attention):
            replace_module(model, name, QuantViTAttention(module, *bits, config.softmax_quantizer))
        elif isinstance(module, WindowAttention):
            replace_module(model, name, QuantWindowAttention(module, *bits, config.softmax_quantizer))
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear:
            replace_module(model, name, QuantLinear(module, *bits))
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is None or not isinstance(getattr(patch_embed, "proj", None), nn.Conv2d):
        raise ModelError(
            f"{type(model).__name__} has no patch_embed.proj convolution. Fix: use a timm ViT, DeiT or Swin model."
        )
    patch_embed.proj = QuantConv2d(patch_embed.proj, config.w_bits, config.input_bits)
    leftover = [
        n
        for n, m in model.named_modules()
        if "Attention" in type(m).__name__ and not isinstance(m, QuantViTAttention | QuantWindowAttention)
    ]
    if leftover:
        raise ModelError(
            f"unsupported attention layer {type(model.get_submodule(leftover[0])).__name__} at "
            f"{leftover[0]}. Fix: use a plain ViT, DeiT or Swin architecture."
        )
    return model.to(patch_embed.proj.weight.device)  # the new quantizers join the model's device


def quant_layers(model: nn.Module) -> Iterator[tuple[str, QuantWeightLayer]]:
    """All quantized Linear and Conv2d layers, in module order."""
    for name, module in model.named_modules():
        if isinstance(module, QuantWeightLayer):
            yield name, module


def quantizers(model: nn.Module) -> Iterator[tuple[str, UniformQuantizer | LogSqrt2Quantizer]]:
    """Every quantizer of ``model`` (weights and activations), in module order."""
    for name, module in model.named_modules():
        if isinstance(module, UniformQuantizer | LogSqrt2Quantizer):
            yield name, module


def activation_quantizers(model: nn.Module) -> Iterator[tuple[str, UniformQuantizer | LogSqrt2Quantizer]]:
    """Quantizers of activations (everything but the weight quantizers)."""
    for name, quantizer in quantizers(model):
        if not name.endswith("weight_quantizer"):
            yield name, quantizer


def set_quantization(model: nn.Module, enabled: bool) -> None:
    """Switches every quantizer on or off; cached (frozen) weights are dropped, as they may no longer apply."""
    for _, quantizer in quantizers(model):
        quantizer.enabled = enabled
    for _, layer in quant_layers(model):
        layer.unfreeze()
