"""Reconstruction units: a timm ViT/DeiT/Swin split into the modules that OBWR optimises one at a time.

The units, applied in order, compute the model's forward: the patch embedding first, then every transformer
block (and each Swin patch-merging layer as a unit of its own), then the head. The same split of the FP model
gives the frozen FP remainder used by the global supervision.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mgrq_runner.errors import ModelError


class _ViTEmbed(nn.Module):
    """Patch embedding, position embedding (and class token), pre-norm of a timm ViT."""

    def __init__(self, model: VisionTransformer) -> None:
        super().__init__()
        self.patch_embed = model.patch_embed  # registered: its quantized conv belongs to this unit
        self.model = [model]  # a list keeps the parent (and every other block) out of this unit's modules

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        model = self.model[0]
        return model.norm_pre(model.patch_drop(model._pos_embed(self.patch_embed(x))))


class _Head(nn.Module):
    """Final norm, pooling and classifier (and DeiT's distillation classifier) of a timm ViT or Swin."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.head  # registered: the classifier's quantized Linear belongs to this unit
        self.head_dist = getattr(model, "head_dist", None)  # a distilled DeiT's second classifier, or None
        self.model = [model]

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        model = self.model[0]
        return model.forward_head(model.norm(x), pre_logits=pre_logits)


@dataclass
class Unit:
    """One reconstruction unit: a name for logs and results, and the module that computes it."""

    name: str
    module: nn.Module

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def model_units(model: nn.Module) -> list[Unit]:
    """The model as a list of units whose composition equals ``model(x)`` (eval mode)."""
    if isinstance(model, VisionTransformer):
        units = [Unit("embed", _ViTEmbed(model))]
        units += [Unit(f"blocks.{i}", block) for i, block in enumerate(model.blocks)]
    elif isinstance(model, SwinTransformer):
        units = [Unit("embed", model.patch_embed)]
        for i, stage in enumerate(model.layers):
            if not isinstance(stage.downsample, nn.Identity):
                units.append(Unit(f"layers.{i}.downsample", stage.downsample))
            units += [Unit(f"layers.{i}.blocks.{j}", block) for j, block in enumerate(stage.blocks)]
    else:
        raise ModelError(
            f"reconstruction supports timm VisionTransformer and SwinTransformer, not "
            f"{type(model).__name__}. Fix: use a ViT, DeiT or Swin model."
        )
    return [*units, Unit("head", _Head(model))]


def run_units(units: list[Unit], x: torch.Tensor) -> torch.Tensor:
    for unit in units:
        x = unit(x)
    return x


def fp_remainder(fp_units: list[Unit], index: int, pre_logits: bool) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """EBGS's frozen FP remainder after unit ``index``: its output -> logits (or the pre-head feature with
    ``pre_logits``); None for the head, whose own output already is the logits."""
    if index == len(fp_units) - 1:
        return None
    return functools.partial(run_remainder, fp_units[index + 1 :], pre_logits)


def run_remainder(fp_units: list[Unit], pre_logits: bool, x: torch.Tensor) -> torch.Tensor:
    """FP ``fp_units`` (the last one the head) applied to ``x``: logits, or the pre-head feature."""
    x = run_units(fp_units[:-1], x)
    return fp_units[-1].module(x, pre_logits=pre_logits)
