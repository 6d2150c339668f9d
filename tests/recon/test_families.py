"""Every reconstruction method on every model family: tiny random Swin, distilled DeiT and LayerScale ViT."""

import copy
from collections.abc import Callable

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from mgrq_runner.models import unsupported_part
from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.recon.cache import capture_points, fp_outputs
from mgrq_runner.recon.config import LOCAL_POINTS, LossConfig, ReconConfig
from mgrq_runner.recon.engine import reconstruct
from mgrq_runner.recon.units import model_units

TINY = dict(img_size=32, in_chans=3, num_classes=5)
FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    # 8x8 patches in 4x4 windows: 4 windows, the second block shifted (mask), then a patch merging.
    "swin": lambda: SwinTransformer(**TINY, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=4),
    "deit_distilled": lambda: VisionTransformerDistilled(**TINY, patch_size=8, embed_dim=32, depth=2, num_heads=2),
    "deit3_layerscale": lambda: VisionTransformer(
        **TINY, patch_size=8, embed_dim=32, depth=2, num_heads=2, init_values=0.1, no_embed_class=True
    ),
}
METHODS = {
    "brecq": (ReconConfig(iters=2, batch_size=4, quant_prob=1.0), LossConfig(global_weight=0.0, local_weight=0.0)),
    "qdrop": (ReconConfig(iters=2, batch_size=4), LossConfig(global_weight=0.0, local_weight=0.0)),
    "mgrq": (ReconConfig(iters=2, batch_size=4), LossConfig(local_layers=LOCAL_POINTS)),  # every capture point
}


def tiny_models(family: str) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    fp_model = FAMILIES[family]().eval()
    quant_model = quantize_(copy.deepcopy(fp_model), QuantConfig(w_bits=4, a_bits=4))
    images = torch.randn(12, 3, 32, 32)
    calibrate(quant_model, [images[:6], images[6:]], 2, InitConfig(), torch.device("cpu"))
    return fp_model, quant_model, images


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_supported_by_structure(family: str) -> None:
    assert unsupported_part(FAMILIES[family]()) is None


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_reconstructs_every_family(family: str, method: str) -> None:
    fp_model, quant_model, images = tiny_models(family)
    recon, losses = METHODS[method]
    reports = reconstruct(quant_model, fp_model, images, recon, losses, seed=0)
    names = [report.name for report in reports]
    assert names == [unit.name for unit in model_units(fp_model)]
    for report in reports:
        assert {"block", "block_soft", "block_hard", "undecided"} <= set(report.final), report.name
        assert 0.0 <= report.final["undecided"] <= 1.0
        if method == "mgrq" and report.name != "head":
            assert "global" in report.final
    if method == "mgrq":  # IBLS found its capture points in every block (not in the patch merging)
        blocks = [r for r in reports if ".blocks." in r.name or r.name.startswith("blocks.")]
        assert blocks and all("local" in r.final for r in blocks)
    with torch.no_grad():
        assert torch.isfinite(quant_model(images)).all()


def test_swin_local_targets_are_indexed_by_image() -> None:
    """Window tensors ([images x windows, ...]) are regrouped per image: the FP targets of a batch's images
    equal what the same images give on their own."""
    fp_model, quant_model, images = tiny_models("swin")
    unit = model_units(quant_model)[2]  # layers.0.blocks.1: the shifted, masked block
    x = torch.randn(8, 8, 8, 16)
    points = capture_points(unit.module, LOCAL_POINTS)
    assert len(points) == 6
    _, whole = fp_outputs(unit, x, points, batch=8)
    _, halves = fp_outputs(unit, x, points, batch=3)
    for together, apart in zip(whole, halves, strict=True):
        assert together.shape[0] == 8
        torch.testing.assert_close(together, apart)
    _, single = fp_outputs(unit, x[5:6], points, batch=1)
    for together, alone in zip(whole, single, strict=True):
        torch.testing.assert_close(together[5:6], alone)
