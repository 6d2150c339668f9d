"""Resuming an interrupted reconstruction: the same final model as an uninterrupted run, done runs, config checks."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import mgrq_runner.run as run_module
from mgrq_runner.cli import CONFIG_DIR
from mgrq_runner.data import load_fashion_mnist
from mgrq_runner.errors import ConfigError, NumericalError
from mgrq_runner.recon import engine
from mgrq_runner.resume import MANIFEST, STATE_DIR
from mgrq_runner.run import run
from tests.conftest import FASHION_MNIST_ROOT, needs_fashion_mnist

pytestmark = needs_fashion_mnist
SMALL = ("method=mgrq", "method.recon.iters=4", "calib.num_images=32", "data.num_eval=300")


def small_cfg(output_dir: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"output_dir={output_dir}", "progress=false", *SMALL, *overrides])


def run_with_logits(cfg: DictConfig, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, Any], torch.Tensor]:
    """Runs ``cfg``; also returns the final quantized model's logits on 64 test images."""
    captured = {}
    evaluate = run_module.evaluate

    def capturing(models: dict[str, torch.nn.Module], *args: Any, **kwargs: Any) -> Any:
        captured["model"] = models["quant"]
        return evaluate(models, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "evaluate", capturing)
        results = run(cfg)
    images = load_fashion_mnist(FASHION_MNIST_ROOT, "test").tensors[0][:64]
    with torch.no_grad():
        return results, captured["model"].eval()(images)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], torch.Tensor]:
    """An uninterrupted run: its directory, results and logits."""
    output_dir = tmp_path_factory.mktemp("reference")
    with pytest.MonkeyPatch.context() as monkeypatch:
        results, logits = run_with_logits(small_cfg(output_dir), monkeypatch)
    return output_dir, results, logits


def stop_before(unit_name: str) -> Callable[..., Any]:
    """``fp_outputs`` that raises KeyboardInterrupt when reconstruction reaches ``unit_name``."""
    fp_outputs = engine.fp_outputs

    def stopping(unit: engine.Unit, *args: Any, **kwargs: Any) -> Any:
        if unit.name == unit_name:
            raise KeyboardInterrupt
        return fp_outputs(unit, *args, **kwargs)

    return stopping


def stop_at_step(unit_name: str, step: int) -> Callable[..., Any]:
    """``loss_terms`` that raises KeyboardInterrupt at ``step`` of ``unit_name``'s optimisation."""
    loss_terms = engine.loss_terms
    calls = {"n": 0}

    def stopping(unit: engine.Unit, *args: Any, **kwargs: Any) -> Any:
        if unit.name == unit_name:
            if calls["n"] == step:
                raise KeyboardInterrupt
            calls["n"] += 1
        return loss_terms(unit, *args, **kwargs)

    return stopping


INTERRUPTIONS = {
    "after_blocks.0": ("fp_outputs", stop_before("blocks.1"), ["embed", "blocks.0"]),
    "after_blocks.2": ("fp_outputs", stop_before("blocks.3"), ["embed", "blocks.0", "blocks.1", "blocks.2"]),
    "inside_blocks.1": ("loss_terms", stop_at_step("blocks.1", 2), ["embed", "blocks.0"]),
}


@pytest.mark.parametrize("point", list(INTERRUPTIONS))
def test_interrupted_run_resumes_to_the_same_model(point: str, reference, tmp_path, monkeypatch) -> None:
    _, expected, expected_logits = reference
    target, stopping, finished = INTERRUPTIONS[point]
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(engine, target, stopping)
        run(small_cfg(tmp_path))
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["status"] == "failed" and partial["error"].startswith("KeyboardInterrupt")
    assert partial["resumable"] == {"finished_units": finished, "state_dir": str(tmp_path / STATE_DIR)}
    assert "top1" not in partial

    results, logits = run_with_logits(small_cfg(tmp_path, "resume=true"), monkeypatch)
    assert results["status"] == "done" and results["resumed_units"] == finished and "resumable" not in results
    for key in ("top1", "top5", "fp_agreement"):
        assert results[key] == expected[key], key
    assert torch.equal(logits, expected_logits)
    units = [row["unit"] for row in results["reconstruction"]]
    assert units == [row["unit"] for row in expected["reconstruction"]]
    for row, expected_row in zip(results["reconstruction"], expected["reconstruction"], strict=True):
        assert {k: v for k, v in row.items() if k != "seconds"} == {
            k: v for k, v in expected_row.items() if k != "seconds"
        }
    assert list(json.loads((tmp_path / "recon_curves.json").read_text())) == units
    assert not (tmp_path / STATE_DIR).exists(), "a done run drops its state"


def test_resuming_a_done_run_returns_its_results(reference, tmp_path, monkeypatch, caplog) -> None:
    run_dir, expected, _ = reference
    monkeypatch.setattr(run_module, "_pipeline", lambda *args: pytest.fail("a done run was recomputed"))
    with caplog.at_level("INFO"):
        results = run(small_cfg(tmp_path, f"resume={run_dir}"))
    assert results == json.loads((run_dir / "results.json").read_text())
    assert results["top1"] == expected["top1"] and "without recomputing" in caplog.text


def test_resume_with_another_config_is_refused(tmp_path, monkeypatch) -> None:
    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(engine, "fp_outputs", stop_before("blocks.0"))
        run(small_cfg(tmp_path))
    before = (tmp_path / "results.json").read_text()
    message = r"resume: .* different config \(method.recon.iters: 4 -> 5, seed: 0 -> 1\)\. Fix: "
    with pytest.raises(ConfigError, match=message):
        run(small_cfg(tmp_path, "resume=true", "method.recon.iters=5", "seed=1"))
    assert (tmp_path / "results.json").read_text() == before, "the refused run changed nothing"
    (tmp_path / "results.json").unlink()  # the state's own manifest is checked too
    with pytest.raises(ConfigError, match=rf"{STATE_DIR} was made with a different config \(seed: 0 -> 1\)"):
        run(small_cfg(tmp_path, "resume=true", "seed=1"))


def test_diverging_unit_keeps_the_finished_units(tmp_path, monkeypatch) -> None:
    loss_terms = engine.loss_terms

    def diverging(unit: engine.Unit, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        terms = loss_terms(unit, *args, **kwargs)
        if unit.name == "blocks.1":
            terms["block"] = terms["block"] * float("nan")
        return terms

    monkeypatch.setattr(engine, "loss_terms", diverging)
    with pytest.raises(NumericalError, match="unit blocks.1 diverged at step 0: the block loss"):
        run(small_cfg(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["resumable"]["finished_units"] == ["embed", "blocks.0"]
    manifest = json.loads((tmp_path / STATE_DIR / MANIFEST).read_text())
    assert [unit["name"] for unit in manifest["units"]] == ["embed", "blocks.0"]
    assert all((tmp_path / STATE_DIR / unit["file"]).is_file() for unit in manifest["units"])
