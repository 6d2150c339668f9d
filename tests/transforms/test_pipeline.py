"""The FP transform registry: applied in order for a run, and the same structure rebuilt for loading an export."""

from __future__ import annotations

import torch

from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig
from mgrq_runner.quant.calibrate import InitConfig
from mgrq_runner.settings import MethodSettings, MlpReluConfig
from mgrq_runner.transforms.pipeline import FP_TRANSFORMS, apply_fp_transforms, rebuild_structure


def _structure(model: torch.nn.Module) -> list[tuple[str, str]]:
    modules = [(name, type(module).__name__) for name, module in model.named_modules()]
    return modules + [(key, str(tuple(value.shape))) for key, value in model.state_dict().items()]


def test_a_run_and_an_export_loader_get_the_same_structure() -> None:
    assert [t.name for t in FP_TRANSFORMS] == ["mlp_relu", "rotation"]  # re-trained first, then rotated exactly
    init = InitConfig(reparam=False, rotation="hadamard", mlp_relu=True)
    method = MethodSettings("glfq", QuantConfig(), init, None, None, MlpReluConfig(iters=2, batch_size=4))
    torch.manual_seed(0)
    transformed, images = create_proxy_model(pretrained=False).eval(), torch.randn(8, 1, 28, 28)
    original = _structure(transformed)
    records = apply_fp_transforms(transformed, images, method, seed=3)
    assert list(records) == ["mlp_relu", "rotation"] and records["mlp_relu"]["iters"] == 2
    rebuilt = rebuild_structure(create_proxy_model(pretrained=False), {"mlp_relu": True, "rotation": "hadamard"})
    assert _structure(rebuilt) == _structure(transformed) != original
    untouched = rebuild_structure(create_proxy_model(pretrained=False), {"mlp_relu": False, "rotation": "none"})
    assert _structure(untouched) == original
    plain = MethodSettings("mgrq", QuantConfig(), InitConfig(), None, None)
    assert apply_fp_transforms(create_proxy_model(pretrained=False), images, plain, seed=0) == {}
