"""Resuming an interrupted reconstruction: the same final model as an uninterrupted run, done runs, config checks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig

from mgrq_runner.data import load_fashion_mnist
from mgrq_runner.errors import ConfigError, NumericalError
from mgrq_runner.recon.curves import StepCallback
from mgrq_runner.recon.optimizer import UnitOptimizer
from mgrq_runner.recon.state import MANIFEST
from mgrq_runner.run import run
from mgrq_runner.rundir import RECON_STATE
from tests.conftest import FASHION_MNIST_ROOT, compose_config, needs_fashion_mnist

pytestmark = needs_fashion_mnist
SMALL = ("method=mgrq", "method.recon.iters=4", "calib.num_images=32", "data.num_eval=300")


def small_cfg(output_dir: Path, *overrides: str) -> DictConfig:
    return compose_config(output_dir, *SMALL, *overrides)


def run_with_logits(cfg: DictConfig, on_step: StepCallback | None = None) -> tuple[dict[str, Any], torch.Tensor]:
    """Runs ``cfg``; also returns the final quantized model's logits on 64 test images."""
    results, objects = run(cfg, on_step)
    images = load_fashion_mnist(FASHION_MNIST_ROOT, "test").tensors[0][:64]
    with torch.no_grad():
        return results, objects["quant_model"].eval()(images)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any], torch.Tensor]:
    """An uninterrupted run: its directory, results and logits."""
    output_dir = tmp_path_factory.mktemp("reference")
    results, logits = run_with_logits(small_cfg(output_dir))
    return output_dir, results, logits


def stop_at(unit_name: str, step: int) -> StepCallback:
    """A step callback that raises KeyboardInterrupt once ``unit_name`` has reported ``step`` (0 or the last, 3)."""

    def stopping(unit: str, reported: int, terms: dict[str, float], total: int) -> None:
        if unit == unit_name and reported == step:
            raise KeyboardInterrupt

    return stopping


INTERRUPTIONS = {  # where: (the step callback that stops the run, the units finished by then)
    "start_of_blocks.1": (stop_at("blocks.1", 0), ["embed", "blocks.0"]),
    "end_of_blocks.1": (stop_at("blocks.1", 3), ["embed", "blocks.0"]),  # its last step, before hardening
    "start_of_blocks.3": (stop_at("blocks.3", 0), ["embed", "blocks.0", "blocks.1", "blocks.2"]),
}


@pytest.mark.parametrize("point", list(INTERRUPTIONS))
def test_interrupted_run_resumes_to_the_same_model(point: str, reference, tmp_path) -> None:
    _, expected, expected_logits = reference
    stopping, finished = INTERRUPTIONS[point]
    with pytest.raises(KeyboardInterrupt):
        run(small_cfg(tmp_path), stopping)
    partial = json.loads((tmp_path / "results.json").read_text())
    assert partial["status"] == "interrupted" and "resume=true" in partial["error"]
    assert partial["resumable"] == {"finished_units": finished, "state_dir": str(tmp_path / RECON_STATE)}
    assert "top1" not in partial

    results, logits = run_with_logits(small_cfg(tmp_path, "resume=true"))
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
    assert not (tmp_path / RECON_STATE).exists(), "a done run drops its state"


def test_resuming_a_done_run_returns_its_results(reference, tmp_path, caplog) -> None:
    run_dir, expected, _ = reference
    with caplog.at_level("INFO"):
        results, objects = run(small_cfg(tmp_path, f"resume={run_dir}"))
    assert objects == {"fp_model": None, "quant_model": None, "data": None}, "a done run was recomputed"
    assert results == json.loads((run_dir / "results.json").read_text())
    assert results["top1"] == expected["top1"] and "without recomputing" in caplog.text


def test_resume_with_another_config_is_refused(tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        run(small_cfg(tmp_path), stop_at("blocks.0", 0))
    before = (tmp_path / "results.json").read_text()
    message = r"resume: .* different config \(method.recon.iters: 4 -> 5, seed: 0 -> 1\)\. Fix: "
    with pytest.raises(ConfigError, match=message):
        run(small_cfg(tmp_path, "resume=true", "method.recon.iters=5", "seed=1"))
    assert (tmp_path / "results.json").read_text() == before, "the refused run changed nothing"
    (tmp_path / "results.json").unlink()  # the state's own manifest is checked too
    with pytest.raises(ConfigError, match=rf"{RECON_STATE} was made with a different config \(seed: 0 -> 1\)"):
        run(small_cfg(tmp_path, "resume=true", "seed=1"))


def test_a_calibration_list_counts_by_its_contents(tmp_path) -> None:
    """The same calib.list moved elsewhere resumes; the list edited in place is refused."""
    listed = tmp_path / "calib.txt"
    listed.write_text("".join(f"train[{i}]\n" for i in range(32)))
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(small_cfg(run_dir, f"calib.list={listed}"), stop_at("blocks.0", 0))
    recorded = json.loads((run_dir / "results.json").read_text())["config"]["calib"]["list_sha256"]
    assert len(recorded) == 64

    listed.write_text("".join(f"train[{i}]\n" for i in range(1, 33)))  # one image swapped
    with pytest.raises(ConfigError, match=rf"different config \(calib.list_sha256: '{recorded}' -> '[0-9a-f]{{64}}'\)"):
        run(small_cfg(run_dir, f"calib.list={listed}", "resume=true"))

    moved = tmp_path / "elsewhere.txt"
    moved.write_text("".join(f"train[{i}]\n" for i in range(32)) + "\n")  # the same images (a blank line more)
    results, _ = run(small_cfg(run_dir, f"calib.list={moved}", "resume=true"))
    assert results["status"] == "done" and results["resumed_units"] == ["embed"]


def test_diverging_unit_keeps_the_finished_units(tmp_path, monkeypatch) -> None:
    loss_terms = UnitOptimizer.loss_terms

    def diverging(optimizer: UnitOptimizer, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        terms = loss_terms(optimizer, *args, **kwargs)
        if optimizer.unit.name == "blocks.1":
            terms["block"] = terms["block"] * float("nan")
        return terms

    monkeypatch.setattr(UnitOptimizer, "loss_terms", diverging)
    with pytest.raises(NumericalError, match="unit blocks.1 diverged at step 0: the block loss"):
        run(small_cfg(tmp_path))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["resumable"]["finished_units"] == ["embed", "blocks.0"]
    manifest = json.loads((tmp_path / RECON_STATE / MANIFEST).read_text())
    assert [unit["name"] for unit in manifest["units"]] == ["embed", "blocks.0"]
    assert all((tmp_path / RECON_STATE / unit["file"]).is_file() for unit in manifest["units"])
