"""The 2025-26 framework in the pipeline (method=glfq and its relatives): the FP transformation recorded, STE's
convergence report, the export reloaded with the rotated / ReLU structure (torch and onnxruntime), resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mgrq_runner.data import load_fashion_mnist
from mgrq_runner.deploy.safetensors_export import load_quantized, manifest_digest, read_manifest
from mgrq_runner.errors import ModelError
from mgrq_runner.run import run
from mgrq_runner.rundir import EXPORT_MANIFEST
from mgrq_runner.transforms.rotation import RMSNorm
from tests.conftest import FASHION_MNIST_ROOT, compose_config, needs_fashion_mnist
from tests.test_resume import stop_at

pytestmark = needs_fashion_mnist
TINY = (
    "method=glfq",
    "quant=w3a3",
    "method.recon.iters=6",
    "method.init.mlp_relu_iters=20",
    "calib.num_images=64",
    "data.num_eval=300",
)


@pytest.fixture(scope="module")
def glfq_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, torch.Tensor]:
    """A tiny glfq run with export=onnx: its dir, results and the final model's logits on 32 test images."""
    run_dir = tmp_path_factory.mktemp("glfq")
    results, objects = run(compose_config(run_dir, *TINY, "export=onnx"))
    images = load_fashion_mnist(FASHION_MNIST_ROOT, "test").tensors[0][:32]
    with torch.no_grad():
        return run_dir, results, objects["quant_model"].eval()(images)


def test_the_transformation_and_ste_are_recorded(glfq_run) -> None:
    _, results, _ = glfq_run
    transform = results["fp_transform"]
    mlps = transform["mlp_relu"]["mlps"]
    assert [m["mlp"] for m in mlps] == [f"blocks.{i}.mlp" for i in range(4)]
    assert all(m["loss_final"] < m["loss_swap"] for m in mlps), "the re-training lowered every MLP's error"
    assert transform["rotation"]["kind"] == "hadamard" and transform["rotation"]["residual"] is True
    assert 0 < results["fp_transformed_top1"] <= 100 and 0.9 < results["fp_transformed_agreement"] <= 1.0
    assert results["fp_top1"] != results["fp_transformed_top1"] or results["fp_transformed_agreement"] < 1.0
    units = results["reconstruction"]
    assert units and all({"block_at_90", "block_final", "moved"} <= set(u) for u in units)
    assert all("rounding" not in u and "block_soft" not in u for u in units)


def test_the_export_reloads_with_the_transformed_structure(glfq_run, tmp_path) -> None:
    run_dir, results, logits = glfq_run
    manifest = read_manifest(run_dir)
    assert (manifest["rotation"], manifest["mlp_relu"]) == ("hadamard", True)
    assert "RMSNorm" in results["export"]["onnx"]["float_ops"] and "ReLU" in results["export"]["onnx"]["float_ops"]
    model = load_quantized(run_dir)
    assert any(isinstance(m, RMSNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert all(isinstance(block.mlp.act, torch.nn.ReLU) for block in model.blocks)
    images = load_fashion_mnist(FASHION_MNIST_ROOT, "test").tensors[0][:32]
    with torch.no_grad():
        assert torch.equal(model(images), logits), "the export reproduces the run's model exactly"
    evaluated, _ = run(compose_config(tmp_path / "eval", "mode=eval", f"checkpoint={run_dir}", "data.num_eval=300"))
    assert evaluated["top1"] == results["top1"]
    onnx, _ = run(
        compose_config(
            tmp_path / "onnx", "mode=eval", f"checkpoint={run_dir}", "data.num_eval=300", "eval.runtime=onnxruntime"
        )
    )
    assert onnx["agreement_with_simulation"] >= 0.99


def test_a_flipped_structure_flag_is_refused(glfq_run, tmp_path) -> None:
    """The manifest's mlp_relu flag flipped and its digest recomputed: the weights file records the structure it
    was written with, so the export no longer loads (GELU in the simulation against ReLU in model.onnx before)."""
    run_dir, _, _ = glfq_run
    flipped = tmp_path / "flipped"
    shutil.copytree(run_dir, flipped)
    manifest = json.loads((flipped / EXPORT_MANIFEST).read_text())
    manifest["mlp_relu"] = False
    manifest["digest"] = manifest_digest(manifest)
    (flipped / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match=r"structure .*\"mlp_relu\": false.* is not the weights file's"):
        load_quantized(flipped)


def test_an_interrupted_glfq_run_resumes_to_the_same_model(glfq_run, tmp_path) -> None:
    """The transformation is redone on resume (it is deterministic); the finished units are loaded."""
    _, expected, _ = glfq_run
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(tmp_path, *TINY, "export=onnx"), stop_at("blocks.1", 0))
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["resumable"]["finished_units"] == ["embed", "blocks.0"]
    results, _ = run(compose_config(tmp_path, *TINY, "export=onnx", "resume=true"))
    assert results["resumed_units"] == ["embed", "blocks.0"]
    for key in ("top1", "top5", "fp_agreement", "fp_transformed_top1"):
        assert results[key] == expected[key], key
    pairs = zip(expected["reconstruction"], results["reconstruction"], strict=True)
    assert all({**old, "seconds": new["seconds"]} == new for old, new in pairs), "the same losses, unit by unit"


def test_a_dry_run_projects_the_transformed_structure_without_training_it(tmp_path) -> None:
    results, objects = run(compose_config(tmp_path, *TINY, "dry_run=true"))
    assert results["status"] == "projected" and results["projection"]["seconds"] > 0
    assert results["fp_transform"]["mlp_relu"]["swapped_only"] == 4
    assert all(isinstance(block.mlp.act, torch.nn.ReLU) for block in objects["quant_model"].blocks)
