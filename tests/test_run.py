"""The pipeline on the shipped proxy: results.json contents, methods, and accuracy at high bit widths."""

import json

import pytest
import torch

from mgrq_runner.data import load_fashion_mnist
from mgrq_runner.devices import CPU_CORES, machine_description
from mgrq_runner.errors import ConfigError
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.run import run
from tests.conftest import FASHION_MNIST_ROOT, needs_fashion_mnist

REQUIRED = [
    "model",
    "method",
    "w_bits",
    "a_bits",
    "top1",
    "top5",
    "fp_top1",
    "fp_top5",
    "fp_agreement",
    "num_calib",
    "num_eval",
    "seed",
    "times",
    "versions",
    "git_sha",
    "status",
    "param_count",
    "img_size",
    "crop_pct",
    "interpolation",
    "top1_err",
    "top5_err",
]


@needs_fashion_mnist
def test_proxy_repq_run_writes_results(compose_cfg) -> None:
    cfg = compose_cfg("method=repq", "calib.num_images=64", "data.num_eval=500")
    results, _ = run(cfg)
    on_disk = json.loads(open(f"{cfg.output_dir}/results.json").read())
    assert on_disk == json.loads(json.dumps(results, default=str))
    assert all(key in results for key in REQUIRED)
    assert results["status"] == "done" and results["model"] == "proxy_vit" and results["method"] == "repq"
    assert results["num_calib"] == 64 and results["num_eval"] == 500
    assert set(results["times"]) == {"build_model", "data", "quantize", "load_calibration", "calibrate", "evaluate"}
    assert results["versions"]["torch"] == torch.__version__
    assert 0.0 <= results["fp_agreement"] <= 1.0 and results["top1"] <= 100.0
    assert results["fp_top1"] > 85.0, "the shipped proxy is a trained model"
    calibration_list = open(f"{cfg.output_dir}/calibration_images.txt").read().split()
    assert len(calibration_list) == 64 and calibration_list[0].startswith("train[")


@needs_fashion_mnist
def test_fp_method_is_the_fp_row(compose_cfg) -> None:
    results, objects = run(compose_cfg("method=fp", "data.num_eval=300"))
    assert objects["quant_model"] is None and objects["fp_model"] is not None
    assert results["top1"] == results["fp_top1"] and results["fp_agreement"] == 1.0
    assert results["w_bits"] == 32 and results["num_calib"] == 0 and "calibrate" not in results["times"]


def test_failed_run_keeps_what_it_computed(compose_cfg) -> None:
    cfg = compose_cfg("data.root=/nonexistent", "data.download_dir=null")
    with pytest.raises(Exception, match="dataset-fashion-mnist"):
        run(cfg)
    results = json.loads(open(f"{cfg.output_dir}/results.json").read())
    assert results["status"] == "failed" and "dataset-fashion-mnist" in results["error"]
    assert "build_model" in results["times"] and "top1" not in results


def test_model_and_data_must_agree(compose_cfg) -> None:
    with pytest.raises(ConfigError, match="predicts 1000 classes but data fashion_mnist has 10"):
        run(
            compose_cfg(
                "model=timm",
                "data=fashion_mnist",
                "model.name=deit_tiny_patch16_224.fb_in1k",
                "model.pretrained=false",
                "data.num_eval=10",
            )
        )


@pytest.mark.parametrize("proxy", ["proxy_vit", "proxy_swin"])
def test_a_timm_name_in_a_proxy_preset_says_model_timm(compose_cfg, proxy: str) -> None:
    """The proxy presets bring Fashion-MNIST: an ImageNet name there stops before any data is looked for."""
    cfg = compose_cfg(f"model={proxy}", "model.name=deit_tiny_patch16_224.fb_in1k", "data.root=/data/imagenet")
    with pytest.raises(ConfigError, match="model=timm model.name=deit_tiny_patch16_224.fb_in1k"):
        run(cfg)


@needs_fashion_mnist
def test_quantized_logit_error_falls_with_bits() -> None:
    images = load_fashion_mnist(FASHION_MNIST_ROOT, "test").tensors[0][:256]
    calibration = load_fashion_mnist(FASHION_MNIST_ROOT, "train").tensors[0][:64]
    reference = create_proxy_model().eval()
    with torch.no_grad():
        fp_logits = reference(images)
    errors = {}
    for bits in (3, 4, 8):
        model = quantize_(create_proxy_model().eval(), QuantConfig(w_bits=bits, a_bits=bits))
        calibrate(model, [calibration], 1, InitConfig(), torch.device("cpu"))
        with torch.no_grad():
            logits = model(images)
        errors[bits] = ((logits - fp_logits).norm() / fp_logits.norm()).item()
        if bits == 8:
            agreement = (logits.argmax(1) == fp_logits.argmax(1)).float().mean().item()
            assert errors[8] < 0.05 and agreement > 0.98, (errors[8], agreement)
    assert errors[3] > errors[4] > errors[8]


@needs_fashion_mnist
def test_mgrq_run_records_reconstruction(compose_cfg) -> None:
    cfg = compose_cfg("method=mgrq", "method.recon.iters=5", "calib.num_images=32", "data.num_eval=200")
    results, _ = run(cfg)
    units = [row["unit"] for row in results["reconstruction"]]
    assert units == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    assert {"block", "global", "local"} <= set(results["reconstruction"][1]) and "reconstruct" in results["times"]
    assert all({"block_soft", "block_hard", "undecided"} <= set(unit) for unit in results["reconstruction"])
    assert results["threads"] == torch.get_num_threads()
    assert results["machine"] == machine_description() and results["machine"].endswith(f"{CPU_CORES} cores")
    assert results["status"] == "done"
    curves = json.loads(open(f"{cfg.output_dir}/recon_curves.json").read())
    assert list(curves) == units
    assert curves["blocks.0"]["step"] == [0, 4]  # every 10th step and the last
    assert len(curves["blocks.0"]["global"]) == 2 and "global" not in curves["head"]  # the head has no remainder


@needs_fashion_mnist
def test_swin_proxy_preset_runs_end_to_end(compose_cfg) -> None:
    """model=proxy_swin through calibration, mgrq (every unit, patch merging included) and evaluation."""
    cfg = compose_cfg("model=proxy_swin", "model.pretrained=false", "debug=smoke", "method.recon.iters=2")
    results, objects = run(cfg)
    units = [row["unit"] for row in results["reconstruction"]]
    assert units == [
        "embed",
        "layers.0.blocks.0",
        "layers.0.blocks.1",
        "layers.1.downsample",
        "layers.1.blocks.0",
        "layers.1.blocks.1",
        "head",
    ]
    assert results["status"] == "done" and results["dataset"] == "fashion_mnist" and results["preset"] == "proxy_swin"
    assert type(objects["quant_model"]).__name__ == "SwinTransformer"
