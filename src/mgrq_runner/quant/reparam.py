"""RepQ-ViT post-LayerNorm scale reparameterisation.

A post-LayerNorm activation varies wildly across channels, so it wants per-channel quantization, which a
matmul cannot use. Folding per-channel factors into the LayerNorm affine and the next Linear's weights puts
every channel on one common grid: per-tensor quantization then equals the per-channel one, and the FP function
is unchanged.
"""

from __future__ import annotations

import torch
from timm.models.swin_transformer import PatchMerging, SwinTransformerBlock
from timm.models.vision_transformer import Block
from torch import nn

from mgrq_runner.quant.modules import QuantLinear


def reparam_pairs(model: nn.Module) -> list[tuple[nn.LayerNorm, QuantLinear]]:
    """(LayerNorm, following Linear) pairs to reparameterise: ``norm1 -> qkv``, ``norm2 -> fc1``, Swin
    ``norm -> reduction``."""
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for module in model.modules():
        if isinstance(module, Block | SwinTransformerBlock):
            pairs += [(module.norm1, module.attn.qkv), (module.norm2, module.mlp.fc1)]
        elif isinstance(module, PatchMerging):
            pairs.append((module.norm, module.reduction))
    return [
        (norm, linear)
        for norm, linear in pairs
        if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and isinstance(linear, QuantLinear)
    ]


@torch.no_grad()
def reparameterize_(
    norm: nn.LayerNorm, linear: QuantLinear, channel_scale: torch.Tensor, channel_zero_point: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Folds per-channel activation grids into ``norm`` and ``linear`` (in place).

    Channel ``c`` was calibrated to ``(s_c, z_c)``, i.e. its range starts at ``l_c = -z_c * s_c``. With targets
    ``s~ = mean(s)`` and ``z~ = round(mean(z))``, ``r_c = s_c / s~`` and ``b_c = l_c / r_c + z~ * s~``, the
    activation becomes ``X'_c = X_c / r_c - b_c``, whose grid is ``(s~, z~)`` for every channel.

    Args:
        norm: the LayerNorm producing the activation (its affine is rescaled).
        linear: the Linear consuming it (its weight columns and bias absorb the change).
        channel_scale: ``[C]`` per-channel scales.
        channel_zero_point: ``[C]`` per-channel integer zero points.

    Returns:
        The per-tensor ``(scale, zero_point)`` to give the Linear's input quantizer.
    """
    if linear.weight_quantizer.enabled or linear.frozen:
        raise RuntimeError("reparameterise before the weight quantizer is initialised")
    scale = channel_scale.to(norm.weight)
    zero_point = channel_zero_point.to(norm.weight)
    target_scale = scale.mean()
    target_zero_point = zero_point.mean().round()
    ratio = scale / target_scale
    shift = (-zero_point * scale) / ratio + target_zero_point * target_scale

    norm.weight.div_(ratio)
    norm.bias.div_(ratio).sub_(shift)
    linear.weight.mul_(ratio[None, :])
    bias_shift = linear.weight @ shift
    if linear.bias is None:
        linear.bias = nn.Parameter(bias_shift)
    else:
        linear.bias.add_(bias_shift)
    return target_scale.reshape(1), target_zero_point.reshape(1)
