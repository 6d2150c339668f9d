"""Offline orthogonal rotations of a full-precision timm model (QuaRot / SliceGPT, as GLF-Q applies them to ViTs).

Tokens are row vectors ``x`` of width C. For an orthogonal ``Q`` (``Q Q^T = I``), ``x W^T = (x Q)(W Q)^T``: a
Linear that reads ``x`` gives the same output from the rotated ``x Q`` once its weight becomes ``W Q``, and a
Linear that writes ``y = z W^T + b`` produces the rotated ``y Q`` once ``W -> Q^T W`` and ``b -> b Q``.

ViT / DeiT (``rotate_`` changes the residual stream and the heads):

1. LayerScale folds into the Linear before it (``attn.proj``, ``mlp.fc2``).
2. The centring projection ``M = I - 11^T / C`` folds into every writer of the residual stream, so the stream is
   zero-mean and every LayerNorm on it equals ``RMSNorm(x) * gamma + beta``; gamma and beta fold into the
   Linear(s) that read the norm, which leaves a plain ``RMSNorm``.
3. ``RMSNorm(x Q) = RMSNorm(x) Q``, so the whole stream can be rotated: writers get ``M Q`` on their output side
   and readers ``Q`` on their input side.
4. Per block, one orthogonal ``H`` (head_dim x head_dim) turns each head's ``q``, ``k`` and ``v`` into ``q H``,
   ``k H``, ``v H``: ``q k^T`` is unchanged, and the output projection absorbs ``H^T`` on the head's input columns.

Swin gets only step 4: its patch merging concatenates neighbouring tokens' channels before a LayerNorm, so its
residual stream and LayerNorms are left as they are.

Everything is computed in float64 on the CPU and written back once per parameter, in the parameter's own dtype
and device. The model's function is unchanged up to float rounding.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import torch
from timm.layers import Attention, LayerNormFp32, LayerScale, Mlp
from timm.layers import LayerNorm as TimmLayerNorm
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, WindowAttention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mgrq_runner.errors import ModelError

ROTATIONS = ("none", "hadamard")
MAX_RANDOM_FACTOR = 64  # largest odd factor m of a rotation's size (R_m is a dense random matrix)
FIX = "Fix: method.init.rotation=none"
# LayerNorms whose forward is exactly F.layer_norm over the last dimension (LayerNormFp32 runs it in float32).
_LAYER_NORMS = (nn.LayerNorm, TimmLayerNorm, LayerNormFp32)


class RMSNorm(nn.Module):
    """``y = x / sqrt(mean(x**2, -1) + eps)``: no affine, no mean subtraction.

    Written with plain ops (no ``F.rms_norm``) so that it exports to ONNX opset 17. Half-precision inputs are
    normalised in float32, as ``nn.LayerNorm`` does.
    """

    def __init__(self, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        work = x.to(torch.promote_types(x.dtype, torch.float32))
        return (work * torch.rsqrt(work.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


def _split_size(size: int) -> tuple[int, int]:
    """``size = 2**k * m`` with m odd: returns ``(2**k, m)``."""
    power = size & -size
    return power, size // power


def orthogonal_matrix(size: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A seeded orthogonal ``size x size`` matrix built around a Walsh-Hadamard matrix.

    With ``size = 2**k * m`` (m odd), the matrix is ``diag(s) @ kron(H / sqrt(2**k), R)``, where

    - ``H`` is the Sylvester Hadamard matrix of order ``2**k`` (``H_1 = [1]``, ``H_2n = [[H_n, H_n], [H_n, -H_n]]``),
      so ``H / sqrt(2**k)`` is orthogonal with all entries ``±1/sqrt(2**k)``;
    - ``R`` is a random ``m x m`` orthogonal matrix: the Q of a QR decomposition of a Gaussian matrix, its columns'
      signs chosen so that the diagonal of the R factor is positive (``R = [1]`` when m = 1);
    - ``s`` holds random signs ±1.

    A Kronecker product and a signed row permutation of orthogonal matrices are orthogonal. The signs and the
    Gaussian come from a ``torch.Generator`` seeded with ``seed``, so the result depends only on (size, seed).

    Raises:
        ModelError: m is larger than 64.
    """
    if size < 1:
        raise ModelError(f"a rotation needs a positive size, got {size}. {FIX}.")
    power, odd = _split_size(size)
    if odd > MAX_RANDOM_FACTOR:
        raise ModelError(
            f"cannot build a Hadamard rotation of size {size} = {power} x {odd}: its odd factor {odd} is larger "
            f"than {MAX_RANDOM_FACTOR}. {FIX}."
        )
    generator = torch.Generator().manual_seed(seed % 2**63)
    signs = torch.randint(0, 2, (size,), generator=generator).to(torch.float64) * 2 - 1
    gaussian = torch.randn(odd, odd, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    random = (q * torch.where(torch.diagonal(r) < 0, -1.0, 1.0)).contiguous()
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    while hadamard.shape[0] < power:
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    return (signs[:, None] * torch.kron(hadamard / math.sqrt(power), random)).to(dtype)


def _describe(size: int) -> str:
    power, odd = _split_size(size)
    return f"diag(signs) @ kron(H_{power} / sqrt({power}), R_{odd})"


def _block_seed(seed: int, block: int) -> int:
    """The seed of block ``block``'s head rotation, derived from the run's ``seed`` (which the residual rotation
    uses as it is) and distinct for every block."""
    return (seed * 1_000_003 + block + 1) % 2**63


def _refuse(problem: str, fix: str = "") -> NoReturn:
    raise ModelError(f"cannot rotate the model: {problem}. {FIX}{fix}.")


class _Float64Copies:
    """Float64 CPU working copies of the parameters being rewritten.

    ``copies(module, "weight")`` returns the same tensor on every call, so successive steps update it in place;
    a missing bias reads as zeros. ``commit`` writes each copy back once, in the original dtype and device (a
    missing bias becomes a new Parameter like the module's weight).
    """

    def __init__(self) -> None:
        self._copies: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor]] = {}

    def __call__(self, module: nn.Module, name: str) -> torch.Tensor:
        key = (id(module), name)
        if key not in self._copies:
            tensor = getattr(module, name)
            if tensor is None:
                tensor = torch.zeros(module.weight.shape[0])
            self._copies[key] = (module, name, tensor.detach().to("cpu", torch.float64, copy=True))
        return self._copies[key][2]

    def bias(self, layer: nn.Module) -> torch.Tensor | None:
        """The working copy of ``layer``'s bias, or None while it has none (neither real nor added by a fold)."""
        if layer.bias is None and (id(layer), "bias") not in self._copies:
            return None
        return self(layer, "bias")

    def commit(self) -> None:
        for module, name, value in self._copies.values():
            current = getattr(module, name)
            if current is None:
                weight = module.weight
                setattr(module, name, nn.Parameter(value.to(weight), requires_grad=weight.requires_grad))
            else:
                current.copy_(value)


def _f64(tensor: torch.Tensor | None, size: int, fill: float) -> torch.Tensor:
    """``tensor`` as a float64 CPU tensor, or ``fill`` repeated when there is none (a LayerNorm without affine)."""
    if tensor is None:
        return torch.full((size,), fill, dtype=torch.float64)
    return tensor.detach().to("cpu", torch.float64)


def _transform_output(copies: _Float64Copies, layer: nn.Linear | nn.Conv2d, transform: torch.Tensor) -> None:
    """``layer``'s output ``y`` becomes ``y @ transform``: weight ``W -> transform^T W`` (output channels first),
    bias ``b -> b @ transform``."""
    weight = copies(layer, "weight")
    weight.copy_((transform.T @ weight.flatten(1)).view_as(weight))
    bias = copies.bias(layer)
    if bias is not None:
        bias.copy_(bias @ transform)


def _fold_norm(copies: _Float64Copies, norm: nn.LayerNorm, readers: list[nn.Linear], rotation: torch.Tensor) -> None:
    """``norm``'s gamma and beta, and the stream's rotation, move into the Linears that read it: with
    ``LN(x) = RMSNorm(x Q) Q^T diag(gamma) + beta``, a reader's ``W -> W diag(gamma) Q`` and ``c -> c + W beta``."""
    size = rotation.shape[0]
    gamma, beta = _f64(norm.weight, size, 1.0), _f64(norm.bias, size, 0.0)
    for reader in readers:
        weight, bias = copies(reader, "weight"), copies(reader, "bias")
        bias.add_(weight @ beta)
        weight.copy_((weight * gamma) @ rotation)


def _rotate_heads(copies: _Float64Copies, qkv: nn.Linear, proj: nn.Linear, num_heads: int, head: torch.Tensor) -> None:
    """Each head's q, k and v become ``q H``, ``k H``, ``v H`` (rows of ``qkv`` laid out as [3, heads, head_dim]);
    the output projection's input columns of each head get ``@ H`` so that ``(o H) (P H)^T = o P^T``."""
    head_dim = head.shape[0]
    weight = copies(qkv, "weight")
    weight.copy_((head.T @ weight.view(3, num_heads, head_dim, -1)).view_as(weight))
    bias = copies.bias(qkv)
    if bias is not None:
        bias.copy_((bias.view(3, num_heads, head_dim) @ head).view_as(bias))
    out_weight = copies(proj, "weight")
    out_weight.copy_((out_weight.view(out_weight.shape[0], num_heads, head_dim) @ head).view_as(out_weight))


def _check_norm(norm: nn.Module, where: str, width: int) -> None:
    if type(norm) not in _LAYER_NORMS or tuple(norm.normalized_shape) != (width,):
        _refuse(f"{where} is a {type(norm).__name__}, not a LayerNorm over the {width} channels")


def _check_linear(layer: nn.Module, where: str, in_features: int | None = None, out_features: int | None = None):
    """``layer`` must be a plain nn.Linear (not yet quantized) with the given widths, where they are given."""
    if type(layer) is not nn.Linear:
        hint = " (rotate the FP model before quantize_)" if "Quant" in type(layer).__name__ else ""
        _refuse(f"{where} is a {type(layer).__name__}, not an nn.Linear{hint}")
    if in_features not in (None, layer.in_features) or out_features not in (None, layer.out_features):
        _refuse(f"{where} maps {layer.in_features} -> {layer.out_features} channels, not the stream's width")


def _check_vit_block(block: nn.Module, index: int, width: int) -> None:
    where = f"blocks.{index}"
    if type(block) is not Block:
        _refuse(f"{where} is a {type(block).__name__}; only timm's pre-norm Block is supported")
    attn, mlp = block.attn, block.mlp
    _check_norm(block.norm1, f"{where}.norm1", width)
    _check_norm(block.norm2, f"{where}.norm2", width)
    if type(attn) is not Attention:
        _refuse(f"{where}.attn is a {type(attn).__name__}; only timm's Attention is supported")
    if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)):
        _refuse(f"{where}.attn normalises q and k (qk_norm), which a head rotation would change", " or qk_norm=False")
    if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
        _refuse(f"{where}.attn.norm normalises the attention output (scale_attn_norm)")
    if getattr(attn, "gate", None) is not None:
        _refuse(f"{where}.attn has an elementwise output gate, which does not commute with a head rotation")
    attn_dim = attn.num_heads * attn.head_dim
    _check_linear(attn.qkv, f"{where}.attn.qkv", width, 3 * attn_dim)
    _check_linear(attn.proj, f"{where}.attn.proj", attn_dim, width)
    for name in ("ls1", "ls2"):
        scale = getattr(block, name)
        if not isinstance(scale, nn.Identity) and type(scale) is not LayerScale:
            _refuse(f"{where}.{name} is a {type(scale).__name__}, not a LayerScale")
    if type(mlp) is not Mlp:
        _refuse(f"{where}.mlp is a {type(mlp).__name__} (e.g. a GLU MLP); only timm's Mlp is supported")
    _check_linear(mlp.fc1, f"{where}.mlp.fc1", in_features=width)
    _check_linear(mlp.fc2, f"{where}.mlp.fc2", out_features=width)


def _check_vit(model: VisionTransformer) -> tuple[str, list[nn.Linear]]:
    """Refuses what cannot be rotated exactly; returns the final norm's attribute name and the head Linears."""
    width = model.embed_dim
    patch_embed = model.patch_embed
    proj = getattr(patch_embed, "proj", None)
    if type(proj) is not nn.Conv2d:
        hint = " (rotate the FP model before quantize_)" if "Quant" in type(proj).__name__ else ""
        _refuse(f"patch_embed.proj is a {type(proj).__name__}, not an nn.Conv2d{hint}")
    if proj.out_channels != width:
        _refuse(f"patch_embed.proj writes {proj.out_channels} channels into a stream of {width}")
    if not isinstance(getattr(patch_embed, "norm", nn.Identity()), nn.Identity):
        _refuse("patch_embed.norm normalises the patch embedding (embed_norm_layer)")
    if not isinstance(model.norm_pre, nn.Identity):
        _refuse("model.norm_pre (pre_norm=True) writes a normalised, uncentred stream")
    if getattr(model, "attn_pool", None) is not None:
        _refuse(f"the attention pooling head (global_pool={model.global_pool!r}) is not supported")
    if model.global_pool not in ("token", "avg", ""):
        _refuse(f"global_pool={model.global_pool!r} takes a channel-wise max, which a rotation changes")
    for index, block in enumerate(model.blocks):
        _check_vit_block(block, index, width)
    distilled = type(model) is VisionTransformerDistilled
    heads = ["head", "head_dist"] if distilled else ["head"]
    final = [name for name in ("norm", "fc_norm") if not isinstance(getattr(model, name), nn.Identity)]
    # The distilled head reads tokens 0 and 1 straight after model.norm (it skips pooling and fc_norm).
    if len(final) != 1 or (distilled and final != ["norm"]):
        _refuse("the stream does not end in exactly one final LayerNorm (model.norm or model.fc_norm) before the head")
    _check_norm(getattr(model, final[0]), f"model.{final[0]}", width)
    for name in heads:
        if isinstance(getattr(model, name), nn.Identity):
            _refuse(f"model.{name} is missing (num_classes=0): the final norm's affine has no Linear to fold into")
        _check_linear(getattr(model, name), f"model.{name}", in_features=width)
    return final[0], [getattr(model, name) for name in heads]


@torch.no_grad()
def _rotate_vit(model: VisionTransformer, seed: int) -> dict[str, Any]:
    final_norm, head_layers = _check_vit(model)
    width, blocks = model.embed_dim, list(model.blocks)
    rotation = orthogonal_matrix(width, seed)
    writer = (torch.eye(width, dtype=torch.float64) - 1.0 / width) @ rotation  # centre, then rotate
    heads = [orthogonal_matrix(block.attn.head_dim, _block_seed(seed, i)) for i, block in enumerate(blocks)]

    # Everything is checked and built: from here on nothing refuses, so a refusal leaves the model untouched.
    copies = _Float64Copies()
    # timm concatenates the class / distillation / register tokens with the patch tokens and adds pos_embed
    # (before or after the concatenation, resampled for a dynamic image size): all act per token and linearly,
    # so each of them takes the writer transform on its own.
    _transform_output(copies, model.patch_embed.proj, writer)
    for name in ("cls_token", "dist_token", "reg_token", "pos_embed"):
        if getattr(model, name, None) is not None:
            tokens = copies(model, name)
            tokens.copy_(tokens @ writer)
    layer_scales = 0
    for block, head in zip(blocks, heads, strict=True):
        for scale, layer in ((block.ls1, block.attn.proj), (block.ls2, block.mlp.fc2)):
            if isinstance(scale, LayerScale):
                gamma = _f64(scale.gamma, width, 1.0)
                copies(layer, "weight").mul_(gamma[:, None])
                bias = copies.bias(layer)
                if bias is not None:
                    bias.mul_(gamma)
                layer_scales += 1
            _transform_output(copies, layer, writer)
        _fold_norm(copies, block.norm1, [block.attn.qkv], rotation)
        _fold_norm(copies, block.norm2, [block.mlp.fc1], rotation)
        _rotate_heads(copies, block.attn.qkv, block.attn.proj, block.attn.num_heads, head)
    _fold_norm(copies, getattr(model, final_norm), head_layers, rotation)
    copies.commit()

    norms = 0
    for parent, name in [(b, n) for b in blocks for n in ("norm1", "norm2")] + [(model, final_norm)]:
        old = getattr(parent, name)
        setattr(parent, name, RMSNorm(old.eps).train(old.training))
        norms += 1
    for block in blocks:
        for name in ("ls1", "ls2"):
            setattr(block, name, nn.Identity())
    head_dims = sorted({block.attn.head_dim for block in blocks})
    return {
        "kind": "hadamard",
        "seed": seed,
        "residual": True,
        "width": width,
        "residual_matrix": _describe(width),
        "heads": True,
        "head_dims": head_dims,
        "head_matrices": [_describe(size) for size in head_dims],
        "blocks": len(blocks),
        "layer_scales_folded": layer_scales,
        "norms_to_rmsnorm": norms,
        "final_norm": final_norm,
    }


@torch.no_grad()
def _rotate_swin(model: SwinTransformer, seed: int) -> dict[str, Any]:
    blocks = [module for module in model.modules() if isinstance(module, SwinTransformerBlock)]
    plan = []
    for index, block in enumerate(blocks):
        attn = block.attn
        if type(block) is not SwinTransformerBlock or type(attn) is not WindowAttention:
            _refuse(f"Swin block {index} ({type(block).__name__} with {type(attn).__name__}) is not timm's own")
        _check_linear(attn.qkv, f"Swin block {index} attn.qkv")
        _check_linear(attn.proj, f"Swin block {index} attn.proj")
        attn_dim = attn.proj.in_features
        if attn.qkv.out_features != 3 * attn_dim or attn_dim % attn.num_heads:
            _refuse(f"Swin block {index} has qkv -> {attn.qkv.out_features} and proj <- {attn_dim} channels")
        plan.append((attn, orthogonal_matrix(attn_dim // attn.num_heads, _block_seed(seed, index))))
    copies = _Float64Copies()
    for attn, head in plan:
        _rotate_heads(copies, attn.qkv, attn.proj, attn.num_heads, head)
    copies.commit()
    head_dims = sorted({head.shape[0] for _, head in plan})
    return {
        "kind": "hadamard",
        "seed": seed,
        "residual": False,
        "heads": True,
        "head_dims": head_dims,
        "head_matrices": [_describe(size) for size in head_dims],
        "blocks": len(blocks),
        "note": "Swin keeps its residual stream and LayerNorms: patch merging mixes neighbouring tokens' channels",
    }


def rotate_(model: nn.Module, seed: int) -> dict[str, Any]:
    """Rotates a full-precision timm ViT/DeiT (residual stream and heads) or Swin (heads only) in place.

    Call it on the FP model, before any quantization; its function is unchanged up to float error. After it, a
    ViT's LayerNorms on the stream are ``RMSNorm`` and its LayerScales are folded away.

    Returns:
        A JSON-able description of what was rotated (for results.json).

    Raises:
        ModelError: the model holds something a rotation cannot carry exactly (it is then left untouched).
    """
    if type(model) in (VisionTransformer, VisionTransformerDistilled):
        return _rotate_vit(model, seed)
    if type(model) is SwinTransformer:
        return _rotate_swin(model, seed)
    _refuse(f"{type(model).__name__} is not a timm VisionTransformer, VisionTransformerDistilled or SwinTransformer")
