"""Export of integer weight codes, exact reload (``load_quantized``) and ``mode=eval``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import mgrq_runner.run as run_module
from mgrq_runner.data import load_fashion_mnist
from mgrq_runner.deploy.safetensors_export import export_quantized, load_quantized, manifest_digest
from mgrq_runner.errors import ConfigError, ModelError
from mgrq_runner.files import file_sha256
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quant_layers, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.quant.rounding import AdaRound
from mgrq_runner.run import run
from mgrq_runner.rundir import EXPORT_MANIFEST, EXPORT_WEIGHTS
from tests.conftest import FASHION_MNIST_ROOT, compose_config, needs_fashion_mnist

SMOKE = ("debug=smoke", "progress=false", "export=true")
METHODS = {
    "repq": ("method=repq",),
    "mgrq": ("method=mgrq", "method.recon.iters=5", "calib.num_images=32"),
}


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images)


@pytest.fixture(scope="module", params=list(METHODS))
def exported(request, tmp_path_factory) -> dict[str, Any]:
    """One exporting run per method; keeps the run's final in-memory quantized model."""
    run_dir = tmp_path_factory.mktemp(request.param) / "run"
    results, objects = run(compose_config(run_dir, *SMOKE, *METHODS[request.param]))
    return {"name": request.param, "run_dir": run_dir, "results": results, "model": objects["quant_model"]}


@pytest.fixture(scope="module")
def test_images() -> torch.Tensor:
    return load_fashion_mnist(FASHION_MNIST_ROOT, "test").tensors[0][:64]


@needs_fashion_mnist
def test_reloaded_model_gives_identical_logits(exported, test_images) -> None:
    loaded = load_quantized(exported["run_dir"])
    assert not any(layer.rounding is not None for _, layer in quant_layers(loaded))
    assert all(layer.frozen for _, layer in quant_layers(loaded))
    assert torch.equal(_logits(loaded, test_images), _logits(exported["model"], test_images))


@needs_fashion_mnist
def test_codes_are_integers_in_range(exported) -> None:
    tensors = load_file(str(exported["run_dir"] / EXPORT_WEIGHTS))
    manifest = json.loads((exported["run_dir"] / EXPORT_MANIFEST).read_text())
    assert manifest["method"] == exported["name"] and manifest["w_bits"] == 4 and manifest["a_bits"] == 4
    assert len(manifest["layers"]) == 4 * 4 + 2  # qkv, proj, fc1, fc2 per block; the patch embedding; the head
    for name, info in manifest["layers"].items():
        codes = tensors[f"{name}.weight_codes"]
        assert codes.dtype == torch.uint8 and list(codes.shape) == info["shape"]
        assert int(codes.max()) <= 2**4 - 1 and info["granularity"] == "per_channel" and info["enabled"]
        assert info["adaround"] == (exported["name"] == "mgrq")
        assert tensors[f"{name}.weight_quantizer.scale"].shape == (codes.shape[0],)
        assert f"{name}.weight" not in tensors and f"{name}.bias" in tensors
    assert not any(".rounding." in key for key in tensors)
    assert {"cls_token", "pos_embed", "blocks.0.norm1.weight", "norm.weight"} <= set(tensors)
    log_quantizers = manifest["granularity"]["log_sqrt2"]
    assert log_quantizers == [f"blocks.{i}.attn.matmul_av.quantizer_a" for i in range(4)]
    assert all(f"{name}.delta" in tensors for name in log_quantizers)
    assert all(q["granularity"] == "per_tensor" for q in manifest["activation_quantizers"].values())
    assert manifest["versions"]["torch"] == torch.__version__ and manifest["model"]["name"] == "proxy_vit"


@needs_fashion_mnist
def test_size_figures_are_consistent(exported) -> None:
    sizes = exported["results"]["export"]
    manifest = json.loads((exported["run_dir"] / EXPORT_MANIFEST).read_text())
    assert sizes["quantized_weights_fp32_mb"] == manifest["sizes"]["quantized_weights_fp32_mb"]
    assert sizes["quantized_weights_packed_mb"] < sizes["quantized_weights_fp32_mb"]
    assert 4 / 32 < sizes["quantized_weights_ratio"] < 4 / 32 + 0.02  # codes plus per-channel grids
    assert sizes["model_packed_mb"] < sizes["model_fp32_mb"]
    params = sum(p.numel() for p in create_proxy_model(pretrained=False).parameters())
    assert sizes["model_fp32_mb"] == pytest.approx(params * 4 / 1e6, rel=0.01)
    assert sizes["file_mb"] == pytest.approx((exported["run_dir"] / EXPORT_WEIGHTS).stat().st_size / 1e6)
    assert Path(sizes["weights"]) == exported["run_dir"] / EXPORT_WEIGHTS


@needs_fashion_mnist
def test_eval_mode_reproduces_top1(exported, tmp_path) -> None:
    results, _ = run(compose_config(tmp_path / "eval", "debug=smoke", "mode=eval", f"checkpoint={exported['run_dir']}"))
    original = exported["results"]
    assert results["status"] == "done" and results["mode"] == "eval"
    assert results["checkpoint"] == str(exported["run_dir"].resolve())
    assert (results["top1"], results["top5"], results["num_eval"]) == (
        original["top1"],
        original["top5"],
        original["num_eval"],
    )
    assert results["method"] == exported["name"] and "calibrate" not in results["times"]
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["top1"] == original["top1"]


@needs_fashion_mnist
def test_export_survives_a_failed_evaluation(tmp_path, monkeypatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("evaluation broke")

    monkeypatch.setattr(run_module, "evaluate_models", broken)
    cfg = compose_config(tmp_path / "run", *SMOKE, "method=minmax")
    with pytest.raises(RuntimeError, match="evaluation broke"):
        run(cfg)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "export" in results["times"]
    assert (tmp_path / "run" / EXPORT_WEIGHTS).is_file() and (tmp_path / "run" / EXPORT_MANIFEST).is_file()


def test_random_calibration_and_adaround_round_trip(tmp_path) -> None:
    """No data needed: calibrate on random images, harden random AdaRound variables on two layers."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(8, 1, 28, 28, generator=generator)
    config = QuantConfig(w_bits=3, a_bits=4)
    model = quantize_(create_proxy_model(pretrained=False), config)
    calibrate(model, [images], 1, InitConfig(percentiles=(0.999, 1.0)), torch.device("cpu"))
    for _, layer in list(quant_layers(model))[1:3]:
        layer.unfreeze()
        layer.rounding = AdaRound(layer.weight.detach(), layer.weight_quantizer)
        layer.rounding.variable.data.normal_(generator=generator)
        layer.rounding.hard = True
        layer.freeze()
    info = {"model": {"name": "proxy_vit", "preset": "proxy_vit"}, "method": "test", "w_bits": 3, "a_bits": 4}
    export_quantized(model, tmp_path, {**info, "quant_config": vars(config), "num_calib": 8})
    loaded = load_quantized(tmp_path)
    assert torch.equal(_logits(loaded, images), _logits(model, images))
    codes = load_file(str(tmp_path / EXPORT_WEIGHTS))["blocks.0.attn.qkv.weight_codes"]
    assert int(codes.max()) <= 7
    # the same export, written again and again, is the same bytes: its checksum identifies its content
    checksums = set()
    for attempt in range(12):
        again = tmp_path / f"again_{attempt}"
        again.mkdir()
        export_quantized(model, again, {**info, "quant_config": vars(config), "num_calib": 8})
        checksums.add(file_sha256(again / EXPORT_WEIGHTS))
    assert checksums == {file_sha256(tmp_path / EXPORT_WEIGHTS)}


def test_bad_checkpoints_give_clear_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="mode=eval needs a checkpoint. Fix: add checkpoint="):
        run(compose_config(tmp_path / "a", "mode=eval"))
    with pytest.raises(ConfigError, match="is not a directory. Fix: checkpoint="):
        run(compose_config(tmp_path / "b", "mode=eval", f"checkpoint={tmp_path / 'nowhere'}"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=f"has no {EXPORT_MANIFEST}. Fix: re-run that job with export=true"):
        load_quantized(tmp_path / "empty")
    with pytest.raises(ConfigError, match="mode='bogus' is unknown"):
        run(compose_config(tmp_path / "c", "mode=bogus"))


def test_broken_exports_give_clear_errors(tmp_path) -> None:
    images = torch.randn(4, 1, 28, 28)
    model = quantize_(create_proxy_model(pretrained=False), QuantConfig())
    calibrate(model, [images], 1, InitConfig(percentiles=(1.0,)), torch.device("cpu"))
    info = {"model": {"name": "proxy_vit"}, "method": "test", "w_bits": 4, "a_bits": 4, "num_calib": 4}
    good = tmp_path / "good"
    good.mkdir()
    export_quantized(model, good, {**info, "quant_config": vars(QuantConfig())})

    no_weights = tmp_path / "no_weights"
    shutil.copytree(good, no_weights)
    (no_weights / EXPORT_WEIGHTS).unlink()
    with pytest.raises(ModelError, match=f"export weights {no_weights / EXPORT_WEIGHTS} does not exist. Fix: "):
        load_quantized(no_weights)
    for name in (EXPORT_WEIGHTS, EXPORT_MANIFEST):  # an export's files are read, never followed through a link
        linked = tmp_path / f"linked_{name}"
        shutil.copytree(good, linked)
        (linked / name).unlink()
        (linked / name).symlink_to(good / name)
        with pytest.raises(ModelError, match=f"{linked / name} is a symbolic link"):
            load_quantized(linked)

    other_model = tmp_path / "other_model"
    shutil.copytree(good, other_model)
    with pytest.raises(ModelError, match="holds model proxy_vit but the config names deit_tiny"):
        run(compose_config(tmp_path / "d", "mode=eval", f"checkpoint={other_model}", "model=deit_t"))

    def tampered(name: str, change_tensors=None, change_manifest=None, checksum: bool = True) -> Path:
        """A copy of the good export with its tensors or manifest changed and, with ``checksum``, the weights'
        checksum and the manifest's digest made to fit: what a careful tamperer would do. The cross-checks must
        still refuse it."""
        where = tmp_path / name
        shutil.copytree(good, where)
        if change_tensors is not None:
            tensors = load_file(str(where / EXPORT_WEIGHTS))
            change_tensors(tensors)
            save_file(tensors, str(where / EXPORT_WEIGHTS))
        manifest = json.loads((where / EXPORT_MANIFEST).read_text())
        if checksum:
            manifest["weights_sha256"] = file_sha256(where / EXPORT_WEIGHTS)
        if change_manifest is not None:
            change_manifest(manifest)
        if checksum:
            manifest["digest"] = manifest_digest(manifest)
        (where / EXPORT_MANIFEST).write_text(json.dumps(manifest))
        return where

    def drop_codes(tensors):
        del tensors["blocks.1.mlp.fc2.weight_codes"]

    def resize(tensors):
        tensors["pos_embed"] = torch.zeros(1, 3, 96)

    def code_too_big(tensors):
        tensors["blocks.0.attn.qkv.weight_codes"][0, 0] = 16  # 4 bits hold 0..15

    def zero_point_off_grid(tensors):
        tensors["blocks.0.mlp.fc1.weight_quantizer.zero_point"][3] = 17.0

    def negative_scale(tensors):
        tensors["blocks.0.attn.qkv.input_quantizer.scale"][0] = -0.1

    def wrong_bits(manifest):  # quant_config too: the layers' entries still say 4
        manifest["w_bits"] = manifest["quant_config"]["w_bits"] = 3

    def no_model(manifest):
        del manifest["model"]

    def unknown_key(manifest):
        manifest["quant_config"]["group_size"] = 128

    def no_checksum(manifest):
        del manifest["weights_sha256"]

    def activations_raised(manifest):  # only quant_config: 8-bit activation quantizers would load
        manifest["quant_config"]["a_bits"] = 8

    def all_bits_raised(manifest):  # the top-level field too: the per-quantizer entries still say 4
        manifest["a_bits"] = manifest["quant_config"]["a_bits"] = 8

    def words_for_numbers(manifest):
        manifest["num_calib"] = "many"

    def onnx_elsewhere(manifest):
        manifest["onnx"] = {"file": "../../elsewhere/model.onnx", "sha256": "0" * 64}

    cases = [
        (tampered("unchecked", code_too_big, checksum=False), "does not match the checksum"),
        (tampered("truncated", drop_codes), "blocks.1.mlp.fc2.weight_codes is missing"),
        (tampered("resized", resize), "does not fit its model .pos_embed: saved shape"),
        (tampered("code", code_too_big), r"damaged \(blocks.0.attn.qkv: a weight code of 16 does not fit 4 bits"),
        (tampered("zero_point", zero_point_off_grid), "blocks.0.mlp.fc1: a zero point is not an integer from 0 to 15"),
        (tampered("scale", negative_scale), "blocks.0.attn.qkv.input_quantizer: a scale is not a finite positive"),
        (tampered("bits", change_manifest=wrong_bits), "4-bit weights but the manifest says w_bits=3"),
        (tampered("no_model", change_manifest=no_model), "lacks model. Fix: re-export"),
        (tampered("unknown_key", change_manifest=unknown_key), r"unknown keys \['group_size'\]"),
        (tampered("unsigned", change_manifest=wrong_bits, checksum=False), "was changed after it was written"),
        (tampered("no_checksum", change_manifest=no_checksum), "lacks weights_sha256"),
        (tampered("a_bits", change_manifest=activations_raised), r"a_bits=4 but quant_config.a_bits=8"),
        (tampered("all_bits", change_manifest=all_bits_raised), r"input_quantizer has 4 bits but .* a_bits=8"),
        (tampered("words", change_manifest=words_for_numbers), r"num_calib='many' is not an integer"),
        (tampered("onnx_path", change_manifest=onnx_elsewhere), r"its onnx entry must name model.onnx in the run dir"),
    ]
    for where, message in cases:
        with pytest.raises(ModelError, match=message):
            load_quantized(where)

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / EXPORT_WEIGHTS).write_bytes(b"\x80\x04 not safetensors")
    manifest = json.loads((corrupt / EXPORT_MANIFEST).read_text())
    manifest["weights_sha256"] = file_sha256(corrupt / EXPORT_WEIGHTS)  # its checksum made to fit
    manifest["digest"] = manifest_digest(manifest)
    (corrupt / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="cannot be read"):
        load_quantized(corrupt)


@needs_fashion_mnist
def test_signed_exports(exported, tmp_path, monkeypatch) -> None:
    """sign_key_env: an export signed with the key is scored; with a key set, an unsigned export, one signed with
    another key, and a forgery whose every checksum and digest were recomputed are refused."""
    if exported["name"] != "repq":
        pytest.skip("one method is enough")
    monkeypatch.setenv("MGRQ_TEST_KEY", "a shared secret of enough length 0123456789")
    signed = tmp_path / "signed"
    run(compose_config(signed, *SMOKE, *METHODS["repq"], "sign_key_env=MGRQ_TEST_KEY"))
    manifest = json.loads((signed / EXPORT_MANIFEST).read_text())
    assert manifest["signature"]["algorithm"] == "hmac-sha256"
    assert "a shared secret" not in (signed / EXPORT_MANIFEST).read_text() + (signed / "results.json").read_text()
    checked = ("debug=smoke", "mode=eval", "sign_key_env=MGRQ_TEST_KEY")
    results, _ = run(compose_config(tmp_path / "eval_signed", *checked, f"checkpoint={signed}"))
    assert results["status"] == "done" and results["top1"] == exported["results"]["top1"]
    with pytest.raises(ModelError, match="is not signed, and sign_key_env asks"):
        run(compose_config(tmp_path / "eval_unsigned", *checked, f"checkpoint={exported['run_dir']}"))

    forged = tmp_path / "forged"
    shutil.copytree(signed, forged)
    manifest["method"] = "mgrq"  # a claim changed, the digest recomputed: only the signature can tell
    manifest["digest"] = manifest_digest(manifest)
    (forged / EXPORT_MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ModelError, match="not signed with this key"):
        run(compose_config(tmp_path / "eval_forged", *checked, f"checkpoint={forged}"))
    load_quantized(forged)  # without a key the digest is all there is: the forgery passes (docs/deploy.md)

    monkeypatch.setenv("MGRQ_TEST_KEY", "another key")
    with pytest.raises(ModelError, match="not signed with this key"):
        run(compose_config(tmp_path / "eval_other_key", *checked, f"checkpoint={signed}"))
    monkeypatch.delenv("MGRQ_TEST_KEY")
    with pytest.raises(ConfigError, match="MGRQ_TEST_KEY is not set or empty"):
        run(compose_config(tmp_path / "eval_no_key", *checked, f"checkpoint={signed}"))
