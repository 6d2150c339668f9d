"""Offline rotations: the rotation matrices are orthogonal and seeded, a rotated FP model computes what it
computed before (ViT/DeiT with centred, rotated residual stream and rotated heads; Swin with rotated heads),
what cannot be rotated exactly is refused, and a rotated model still quantizes and exports."""

import copy
import io
import json
from collections.abc import Callable
from functools import partial

import onnx
import onnxruntime
import pytest
import timm
import torch
from timm.layers import GluMlp, LayerScale
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import ResPostBlock, VisionTransformer
from torch import nn

from mgrq_runner.errors import ModelError
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.transforms.rotation import ROTATIONS, RMSNorm, orthogonal_matrix, rotate_

torch.set_num_threads(1)

FMNIST = (1, 28, 28)
TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3, num_classes=10)


def relative_error(expected: torch.Tensor, actual: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


@torch.no_grad()
def randomise_(model: nn.Module, seed: int = 1) -> nn.Module:
    """Random LayerNorm affines, LayerScales, biases and tokens: timm initialises them to 1, 0 or ~0, which would
    hide a fold that forgets one of them."""
    generator = torch.Generator().manual_seed(seed)

    def randn(tensor: torch.Tensor) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)

    for module in model.modules():
        if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
            module.weight.copy_(1 + 0.5 * randn(module.weight))
            module.bias.copy_(0.5 * randn(module.bias))
        elif isinstance(module, LayerScale):
            module.gamma.copy_(0.1 + randn(module.gamma).abs())
        elif isinstance(module, nn.Linear | nn.Conv2d) and module.bias is not None:
            module.bias.copy_(0.1 * randn(module.bias))
    for name in ("cls_token", "dist_token", "reg_token", "pos_embed"):
        tokens = getattr(model, name, None)
        if tokens is not None:
            tokens.copy_(0.3 + 0.5 * randn(tokens))  # a mean across channels far from zero
    return model


# name -> (builder, input shape of one image)
MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "proxy_vit": (lambda: create_proxy_model("proxy_vit", True), FMNIST),
    "proxy_swin": (lambda: create_proxy_model("proxy_swin", True), FMNIST),
    "deit_tiny": (lambda: timm.create_model("deit_tiny_patch16_224", pretrained=False), (3, 224, 224)),
    "deit_tiny_distilled": (
        lambda: timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False),
        (3, 224, 224),
    ),
    "layerscale_registers": (lambda: VisionTransformer(**TINY_VIT, init_values=0.1, reg_tokens=2), (3, 32, 32)),
    "no_embed_class": (
        lambda: VisionTransformer(**TINY_VIT, init_values=0.1, reg_tokens=2, no_embed_class=True),
        (3, 32, 32),
    ),
    # fc_norm after average pooling, no class token, Linears without bias (the folds must add them)
    "avg_pool_fc_norm": (
        lambda: VisionTransformer(
            **{**TINY_VIT, "embed_dim": 64, "num_heads": 2},
            global_pool="avg",
            class_token=False,
            qkv_bias=False,
            proj_bias=False,
        ),
        (3, 32, 32),
    ),
    "layer_norm_without_affine": (
        lambda: VisionTransformer(**TINY_VIT, norm_layer=partial(nn.LayerNorm, eps=1e-5, elementwise_affine=False)),
        (3, 32, 32),
    ),
    # images larger than the model's: timm resamples pos_embed to the 6x5 grid
    "dynamic_img_size": (lambda: VisionTransformer(**TINY_VIT, dynamic_img_size=True), (3, 48, 40)),
    "swin": (
        lambda: SwinTransformer(
            img_size=56, patch_size=4, embed_dim=32, depths=(2, 2), num_heads=(2, 4), window_size=7, num_classes=10
        ),
        (3, 56, 56),
    ),
}


def _layer_norms(model: nn.Module) -> list[nn.LayerNorm]:
    return [module for module in model.modules() if isinstance(module, nn.LayerNorm)]


@pytest.mark.parametrize("size", [32, 64, 96, 192, 384, 768])
def test_orthogonal_matrix_is_orthogonal(size: int) -> None:
    matrix = orthogonal_matrix(size, seed=0)
    assert matrix.shape == (size, size) and matrix.dtype == torch.float64
    identity = torch.eye(size, dtype=torch.float64)
    assert (matrix @ matrix.T - identity).abs().max().item() < 1e-10
    assert (matrix.T @ matrix - identity).abs().max().item() < 1e-10


def test_orthogonal_matrix_is_seeded_hadamard() -> None:
    assert torch.equal(orthogonal_matrix(96, seed=3), orthogonal_matrix(96, seed=3))
    assert not torch.allclose(orthogonal_matrix(96, seed=3), orthogonal_matrix(96, seed=4))
    assert not torch.allclose(orthogonal_matrix(64, seed=3), orthogonal_matrix(64, seed=4))  # the signs differ
    assert orthogonal_matrix(96, seed=3, dtype=torch.float32).dtype == torch.float32
    # A power of two is a signed Walsh-Hadamard matrix: every entry is +-1/sqrt(n).
    assert torch.allclose(orthogonal_matrix(64, seed=0).abs(), torch.full((64, 64), 1 / 8, dtype=torch.float64))
    # 96 = 32 x 3: each 3x3 tile is the random factor R_3 times +-1/sqrt(32), so tiles agree up to sign.
    tiles = orthogonal_matrix(96, seed=0).view(32, 3, 32, 3).permute(0, 2, 1, 3).abs()
    assert torch.allclose(tiles, tiles[:1, :1].expand_as(tiles))
    assert not torch.allclose(tiles[0, 0], torch.full((3, 3), 1 / 3**0.5 / 32**0.5, dtype=torch.float64))


def test_orthogonal_matrix_refuses_a_large_odd_factor() -> None:
    with pytest.raises(ModelError, match="odd factor 67"):
        orthogonal_matrix(2 * 67, seed=0)


@pytest.mark.parametrize("name", list(MODELS))
def test_rotation_keeps_the_fp_function(name: str) -> None:
    build, image_shape = MODELS[name]
    torch.manual_seed(0)
    reference = randomise_(build().eval())
    model = copy.deepcopy(reference)
    info = rotate_(model, seed=0)
    images = torch.randn(2, *image_shape)
    with torch.no_grad():
        expected, actual = reference(images), model(images)
    assert relative_error(expected, actual) < 1e-5
    json.dumps(info)  # goes into results.json as it is
    assert info["kind"] == "hadamard" and info["heads"]
    first_attn = "blocks.0.attn" if isinstance(model, VisionTransformer) else "layers.0.blocks.0.attn"
    for layer in ("qkv", "proj"):
        rotated = model.get_submodule(f"{first_attn}.{layer}").weight
        assert not torch.allclose(rotated, reference.get_submodule(f"{first_attn}.{layer}").weight, atol=1e-3)
    if isinstance(model, VisionTransformer):
        assert info["residual"]
        assert not _layer_norms(model), "a LayerNorm left on the rotated stream would subtract its mean"
        assert not any(isinstance(module, LayerScale) for module in model.modules())
        rms_norms = [module for module in model.modules() if isinstance(module, RMSNorm)]
        assert len(rms_norms) == info["norms_to_rmsnorm"] == 2 * len(model.blocks) + 1
        assert all(norm.eps == reference.blocks[0].norm1.eps for norm in rms_norms)
    else:  # Swin: LayerNorms untouched, only the heads turn
        assert not info["residual"]
        norms_before, norms_after = _layer_norms(reference), _layer_norms(model)
        assert len(norms_after) == len(norms_before) > 0
        assert all(torch.equal(a.weight, b.weight) for a, b in zip(norms_before, norms_after, strict=True))


def test_rotated_stream_is_the_centred_stream_times_q() -> None:
    """Between blocks the rotated model carries exactly ``x (I - 11^T/C) Q`` of the original ``x``."""
    torch.manual_seed(0)
    reference = randomise_(VisionTransformer(**TINY_VIT, init_values=0.1, reg_tokens=2).eval())
    model = copy.deepcopy(reference)
    rotate_(model, seed=5)
    streams: dict[str, torch.Tensor] = {}
    reference.blocks[0].register_forward_hook(lambda m, i, o: streams.__setitem__("reference", o))
    model.blocks[0].register_forward_hook(lambda m, i, o: streams.__setitem__("rotated", o))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reference(images), model(images)
    width = reference.embed_dim
    centred = streams["reference"].double() - streams["reference"].double().mean(-1, keepdim=True)
    rotation = orthogonal_matrix(width, seed=5)
    assert relative_error(centred @ rotation, streams["rotated"].double()) < 1e-5
    # Rotated back, the stream is zero-mean (rotated, it is not: Q does not keep the all-ones direction).
    assert (streams["rotated"].double() @ rotation.T).mean(-1).abs().max().item() < 1e-5
    assert streams["rotated"].mean(-1).abs().max().item() > 1e-3


def test_rotation_is_deterministic_per_seed_and_exact_in_float64() -> None:
    reference = randomise_(create_proxy_model("proxy_vit", True).eval()).double()
    rotated = [copy.deepcopy(reference) for _ in range(3)]
    for model, seed in zip(rotated, (7, 7, 8), strict=True):
        rotate_(model, seed=seed)
    first, again, other = (model.state_dict() for model in rotated)
    assert all(torch.equal(first[key], again[key]) for key in first)
    assert not torch.allclose(first["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])
    assert first["blocks.0.attn.qkv.weight"].dtype == torch.float64
    images = torch.randn(3, *FMNIST, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(reference(images), rotated[0](images)) < 1e-12


def _tiny_vit(**kwargs) -> nn.Module:
    return VisionTransformer(**{**TINY_VIT, "depth": 1, **kwargs}).eval()


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _tiny_vit(qk_norm=True), "qk_norm"),
        (lambda: _tiny_vit(pre_norm=True), "norm_pre"),
        (lambda: _tiny_vit(global_pool="map"), "attention pooling"),
        (lambda: _tiny_vit(global_pool="max", class_token=False), "max"),
        (lambda: _tiny_vit(final_norm=False), "final LayerNorm"),
        (lambda: _tiny_vit(num_classes=0), "num_classes=0"),
        (lambda: _tiny_vit(block_fn=ResPostBlock), "ResPostBlock"),
        (lambda: _tiny_vit(mlp_layer=GluMlp), "GluMlp"),
        (lambda: _tiny_vit(scale_attn_norm=True), "scale_attn_norm"),
        (lambda: quantize_(_tiny_vit(), QuantConfig()), "before quantize_"),
        (lambda: nn.Sequential(nn.Linear(4, 4)), "Sequential"),
    ],
)
def test_refuses_what_it_cannot_rotate_exactly(build: Callable[[], nn.Module], message: str) -> None:
    model = build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ModelError, match=message) as refusal:
        rotate_(model, seed=0)
    assert "Fix: method.init.rotation=none" in str(refusal.value) and "\n" not in str(refusal.value)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[key], before[key]) for key in before)


@pytest.mark.parametrize("name", ["proxy_vit", "proxy_swin"])
def test_rotated_proxy_still_quantizes(name: str) -> None:
    torch.manual_seed(0)
    reference = randomise_(create_proxy_model(name, True).eval())
    model = copy.deepcopy(reference)
    rotate_(model, seed=0)
    quantize_(model, QuantConfig())  # leaves every quantizer disabled: the explicit FP path
    images = torch.randn(4, *FMNIST)
    with torch.no_grad():
        assert relative_error(reference(images), model(images)) < 1e-5


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the legacy (TorchScript) exporter says it is legacy
def test_rmsnorm_matches_its_formula_and_exports_to_onnx() -> None:
    norm = RMSNorm(eps=1e-5).eval()
    x = torch.randn(2, 5, 16)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(norm(x), expected, atol=1e-6)
    assert norm(x.half()).dtype == torch.float16
    assert "hadamard" in ROTATIONS and "none" in ROTATIONS
    # The legacy exporter at opset 17, and the torch.export one at the project's opset 21 (deploy/onnx_export).
    for dynamo, opset in ((False, 17), (True, 21)):
        buffer = io.BytesIO()
        torch.onnx.export(norm, (x,), buffer, opset_version=opset, dynamo=dynamo, input_names=["x"], verbose=False)
        proto = onnx.load_from_string(buffer.getvalue())
        onnx.checker.check_model(proto)
        assert not {node.op_type for node in proto.graph.node} & {"RMSNormalization", "LayerNormalization"}
        session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
        (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        assert torch.allclose(torch.from_numpy(output), expected, atol=1e-5)
