"""Explicit attention for timm ViT/DeiT ``Attention`` and Swin ``WindowAttention``.

timm's fused path (``scaled_dot_product_attention``) hides ``q @ k^T``, the softmax and ``attn @ v``. These
modules take over a timm attention module's parameters and run the three steps explicitly, so that each
matmul operand passes a quantizer. With the quantizers disabled they compute exactly what timm computes.
"""

from __future__ import annotations

import torch
from timm.layers import Attention
from timm.models.swin_transformer import WindowAttention
from torch import nn

from mgrq_runner.quant.modules import QuantLinear, QuantMatMul
from mgrq_runner.quant.quantizers import LogSqrt2Quantizer, UniformQuantizer

# log_sqrt2_repq: RepQ-ViT's own convention, 2**bits levels plus zero (one value more than the bit width holds).
SOFTMAX_QUANTIZERS = ("log_sqrt2", "log_sqrt2_repq", "uniform")


def _softmax_quantizer(kind: str, bits: int) -> UniformQuantizer | LogSqrt2Quantizer:
    if kind in ("log_sqrt2", "log_sqrt2_repq"):
        return LogSqrt2Quantizer(bits, extra_level=kind == "log_sqrt2_repq")
    if kind == "uniform":
        return UniformQuantizer(bits)
    raise ValueError(f"unknown softmax quantizer {kind!r} ({', '.join(SOFTMAX_QUANTIZERS)})")


class QuantViTAttention(nn.Module):
    """timm ``Attention`` (ViT, DeiT) with quantized ``qkv``, ``proj`` and attention matmuls."""

    def __init__(self, attn: Attention, w_bits: int, a_bits: int, softmax_quantizer: str) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.attn_dim = getattr(attn, "attn_dim", attn.num_heads * attn.head_dim)
        self.qkv = QuantLinear(attn.qkv, w_bits, a_bits)
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.norm = getattr(attn, "norm", nn.Identity())
        self.gate = QuantLinear(attn.gate, w_bits, a_bits) if getattr(attn, "gate", None) is not None else None
        self.attn_drop = attn.attn_drop
        self.matmul_qk = QuantMatMul(UniformQuantizer(a_bits), UniformQuantizer(a_bits))
        self.matmul_av = QuantMatMul(_softmax_quantizer(softmax_quantizer, a_bits), UniformQuantizer(a_bits))
        self.proj = QuantLinear(attn.proj, w_bits, a_bits)
        self.proj_drop = attn.proj_drop

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        batch, tokens, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        scores = self.matmul_qk(q * self.scale, k.transpose(-2, -1))
        if is_causal:
            scores = scores + scores.new_full((tokens, tokens), float("-inf")).triu_(1)
        elif attn_mask is not None:
            scores = (
                scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
            )
        probs = self.attn_drop(scores.softmax(dim=-1))
        out = self.matmul_av(probs, v).transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        out = self.norm(out)
        if gate is not None:
            out = out * gate
        return self.proj_drop(self.proj(out))


class QuantWindowAttention(nn.Module):
    """timm Swin ``WindowAttention`` with quantized matmuls, relative position bias and shifted-window mask."""

    def __init__(self, attn: WindowAttention, w_bits: int, a_bits: int, softmax_quantizer: str) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.window_area = attn.window_area
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.register_buffer("relative_position_index", attn.relative_position_index, persistent=False)
        self.qkv = QuantLinear(attn.qkv, w_bits, a_bits)
        self.attn_drop = attn.attn_drop
        self.matmul_qk = QuantMatMul(UniformQuantizer(a_bits), UniformQuantizer(a_bits))
        self.matmul_av = QuantMatMul(_softmax_quantizer(softmax_quantizer, a_bits), UniformQuantizer(a_bits))
        self.proj = QuantLinear(attn.proj, w_bits, a_bits)
        self.proj_drop = attn.proj_drop

    def relative_position_bias(self) -> torch.Tensor:
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(self.window_area, self.window_area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        windows_batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(windows_batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        scores = self.matmul_qk(q * self.scale, k.transpose(-2, -1)) + self.relative_position_bias()
        if mask is not None:
            num_windows = mask.shape[0]
            scores = scores.view(-1, num_windows, self.num_heads, tokens, tokens) + mask.unsqueeze(1).unsqueeze(0)
            scores = scores.view(-1, self.num_heads, tokens, tokens)
        probs = self.attn_drop(scores.softmax(dim=-1))
        out = self.matmul_av(probs, v).transpose(1, 2).reshape(windows_batch, tokens, -1)
        return self.proj_drop(self.proj(out))
