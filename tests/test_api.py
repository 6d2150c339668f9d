"""The Python API (mgrq_runner.quantize, load, evaluate): the CLI's path and results, its refusals, the caller's
model left alone, export and reload, and the example script."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import mgrq_runner
from mgrq_runner.errors import ConfigError, DataError, MgrqError, ModelError
from mgrq_runner.models import create_model
from mgrq_runner.quant.modules import QuantLinear
from mgrq_runner.run import run
from mgrq_runner.settings import parse_settings
from tests.conftest import compose_config, needs_fashion_mnist

ROOT = Path(__file__).resolve().parents[1]
FAST = ["method.recon.iters=20", "calib.batch_size=16", "method.recon.batch_size=16"]


def tiny_vit(**kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    arguments = {"num_classes": 5, "img_size": 32, "patch_size": 8, "depth": 2, **kwargs}
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **arguments).eval()


def images(count: int = 32, size: int = 32, channels: int = 3) -> torch.Tensor:
    return torch.randn(count, channels, size, size, generator=torch.Generator().manual_seed(1))


@needs_fashion_mnist
def test_api_and_cli_give_the_same_model(tmp_path: Path) -> None:
    """One config both ways (the proxy, the CLI's calibration images, seed 1): the same quantized tensors, the
    same unit reports and the same top-1, bit for bit."""
    overrides = ["debug=smoke", "threads=1", "seed=1", "method.recon.iters=20", "method.recon.weight_lr=0.03"]
    cfg = compose_config(tmp_path / "cli", *overrides)
    results, objects = run(cfg)
    bundle = objects["data"]
    fp_model = create_model(parse_settings(cfg).model)
    torch.manual_seed(123)  # whatever the caller drew before: the result does not depend on it
    quantized = mgrq_runner.quantize(
        fp_model, bundle.calibration, "mgrq", 4, 4, seed=1, device="cpu", overrides=overrides[-2:]
    )
    cli_state, api_state = objects["quant_model"].state_dict(), quantized.model.state_dict()
    assert cli_state.keys() == api_state.keys()
    differing = [k for k in cli_state if not torch.equal(cli_state[k], api_state[k])]
    assert differing == []
    without_time = [{k: v for k, v in unit.items() if k != "seconds"} for unit in results["reconstruction"]]
    assert without_time == [{k: v for k, v in u.items() if k != "seconds"} for u in quantized.record["reconstruction"]]
    assert quantized.record["data_identity"]["num_classes"] == 10
    loader = DataLoader(bundle.evaluation, batch_size=100)
    assert mgrq_runner.evaluate(quantized, loader)["top1"] == pytest.approx(results["top1"], abs=0.0005)


def test_quantize_leaves_the_callers_model_and_rng(tmp_path: Path) -> None:
    model = tiny_vit().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    threads = torch.get_num_threads()
    loader = DataLoader(TensorDataset(images(), torch.zeros(32, dtype=torch.long)), batch_size=16)
    quantized = mgrq_runner.quantize(model, loader, "qdrop", 4, 4, overrides=FAST, run_dir=tmp_path / "run")
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state()) and torch.get_num_threads() == threads
    assert (tmp_path / "run" / "results.json").is_file() and quantized.record["status"] == "done"
    assert quantized.record["model"] == "vit_tiny_patch16_224" and quantized.record["num_calib"] == 32
    assert any(isinstance(m, QuantLinear) for m in quantized.modules())
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(ConfigError, match="already holds a run"):
        mgrq_runner.quantize(model, loader, "qdrop", 4, 4, overrides=FAST, run_dir=tmp_path / "run")


def test_export_and_load_score_the_same(tmp_path: Path) -> None:
    model = tiny_vit()
    test = (images(64), torch.randint(0, 5, (64,), generator=torch.Generator().manual_seed(2)))
    quantized = mgrq_runner.quantize(model, images(), "mgrq", 4, 4, overrides=FAST)
    exported = quantized.export(tmp_path / "export")
    assert Path(exported["weights"]) == tmp_path / "export" / "quantized_model.safetensors"
    reloaded = mgrq_runner.load(tmp_path / "export", model)
    with torch.no_grad():
        assert torch.equal(reloaded(test[0]), quantized.eval()(test[0]))
    assert mgrq_runner.evaluate(reloaded, test) == mgrq_runner.evaluate(quantized, test)
    with pytest.raises(ModelError):  # the manifest names vit_tiny_patch16_224, whose defaults are another shape
        mgrq_runner.load(tmp_path / "export")


def test_signed_export_through_the_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MGRQ_API_KEY", "0123456789abcdef0123456789abcdef")
    model = tiny_vit()
    quantized = mgrq_runner.quantize(model, images(), "qdrop", 4, 4, overrides=FAST)
    quantized.export(tmp_path / "signed", sign_key_env="MGRQ_API_KEY")
    quantized.export(tmp_path / "unsigned")
    reloaded = mgrq_runner.load(tmp_path / "signed", model, sign_key_env="MGRQ_API_KEY")
    with torch.no_grad():
        assert torch.equal(reloaded(images(4)), quantized.eval()(images(4)))
    with pytest.raises(ModelError, match="is not signed"):
        mgrq_runner.load(tmp_path / "unsigned", model, sign_key_env="MGRQ_API_KEY")


@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda m: mgrq_runner.quantize(torch.nn.Linear(3, 3), images()), ModelError, "cannot quantize"),
        (lambda m: mgrq_runner.quantize(m, images()[:0]), DataError, "empty set"),
        (lambda m: mgrq_runner.quantize(m, images(channels=1)), DataError, "1 channels, the model takes 3"),
        (lambda m: mgrq_runner.quantize(m, images(size=28)), DataError, "28 x 28, the model takes 32 x 32"),
        (lambda m: mgrq_runner.quantize(m, images() * float("nan")), DataError, "finite"),
        (lambda m: mgrq_runner.quantize(m, [1, 2]), DataError, "not a tensor"),
        (lambda m: mgrq_runner.quantize(m, images(), w_bits=1), ConfigError, "w_bits"),
        (lambda m: mgrq_runner.quantize(m, images(), method="nope"), ConfigError, "nope"),
        (lambda m: mgrq_runner.quantize(m, images(), overrides=["+method.recon.iterz=3"]), ConfigError, "iterz"),
        (lambda m: mgrq_runner.quantize(m, images(), overrides="seed=1"), ConfigError, "key=value"),
        (lambda m: mgrq_runner.quantize(m, images(), overrides=["export=true"]), ConfigError, "export="),
    ],
)
def test_bad_input_is_one_clear_error(call, error, words) -> None:  # noqa: ANN001
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error) as caught:
        call(model)
    message = str(caught.value)
    assert words in message and "Fix:" in message and "\n" not in message
    assert isinstance(caught.value, MgrqError)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_evaluate_refuses_no_images() -> None:
    with pytest.raises(DataError, match="no images"):
        mgrq_runner.evaluate(tiny_vit(), [])


def test_the_cli_refuses_the_in_memory_presets(tmp_path: Path) -> None:
    from mgrq_runner.data import build_data

    with pytest.raises(ConfigError, match="Python API"):
        build_data(parse_settings(compose_config(tmp_path, "data=in_memory")).data, tiny_vit(), 4, 0)


def test_example_script_runs(tmp_path: Path) -> None:
    """examples/quantize_timm_model.py as a user runs it, outside the checkout: it quantizes, scores, exports,
    reloads and checks that the reloaded model scores the same (it exits non-zero otherwise)."""
    script = ROOT / "examples" / "quantize_timm_model.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path / "out"), "--iters", "10", "--train-steps", "20"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "top-1 after export and reload" in done.stdout
    assert (tmp_path / "out" / "export" / "quantized_model.json").is_file()
