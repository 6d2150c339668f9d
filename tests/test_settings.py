"""The settings boundary: the composed config is parsed once into frozen objects, and nothing past it reads the
raw config; the collector reads records without torch and labels runs by their own recorded preset defaults."""

from __future__ import annotations

import ast
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mgrq_runner.analysis.runs import load_run
from mgrq_runner.errors import ConfigError
from mgrq_runner.settings import RunSettings, parse_settings
from tests.conftest import compose_config

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "mgrq_runner"
# Where the raw DictConfig may still be taken: the parser, the Hydra entry point and its callbacks, run(cfg) (which
# parses first), and the record of a job refused before its settings could be parsed.
RAW_CONFIG_ALLOWED = {"settings.py", "cli.py", "run.py:run", "results.py:record_early_failure"}


def test_settings_are_parsed_once_into_frozen_objects(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path / "run", "method=qdrop", "quant=w3a3", "seed=3", "export=onnx", "threads=1")
    settings = parse_settings(cfg)
    assert isinstance(settings, RunSettings) and settings.mode == "run" and settings.seed == 3
    assert settings.export and settings.export_onnx and settings.threads == 1
    assert settings.method is not None and settings.method.quant is not None
    assert (settings.method.quant.w_bits, settings.method.recon.quant_prob) == (3, 0.5)
    assert settings.calib is not None and settings.calib.num_images == 1024  # the method's own default
    assert settings.run_dir == tmp_path / "run" and settings.config["seed"] == 3  # the record: the resolved config
    for frozen in (settings, settings.model, settings.data, settings.eval, settings.calib, settings.method):
        with pytest.raises(dataclasses.FrozenInstanceError):
            frozen.seed = 1  # type: ignore[misc]


def test_unresolvable_values_are_one_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MGRQ_TEST_UNSET", raising=False)
    with pytest.raises(ConfigError, match=r"^model.name is required but not set. Fix: add model.name=<value>"):
        parse_settings(compose_config(tmp_path / "run", "model=timm"))
    with pytest.raises(ConfigError, match=r"^data.root cannot be resolved .*MGRQ_TEST_UNSET.* Fix: set it"):
        parse_settings(compose_config(tmp_path / "run", "data.root=${oc.env:MGRQ_TEST_UNSET}"))


def test_only_the_boundary_takes_the_raw_config() -> None:
    """No stage, builder or model code takes a DictConfig: a setting read as ``cfg.x`` past the boundary leaks."""
    leaks = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = str(path.relative_to(PACKAGE))
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            annotations = [ast.unparse(a.annotation) for a in node.args.args if a.annotation is not None]
            if any("DictConfig" in a for a in annotations) and not {name, f"{name}:{node.name}"} & RAW_CONFIG_ALLOWED:
                leaks.append(f"{name}:{node.name}")
    assert leaks == []


def test_the_collector_imports_neither_torch_nor_timm() -> None:
    code = "import sys, mgrq_runner.analysis.collect, mgrq_runner.analysis.plots; print(sorted(sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = set(ast.literal_eval(loaded))
    assert "mgrq_runner.analysis.runs" in modules and "mgrq_runner.results" in modules
    assert not {"torch", "timm", "mgrq_runner.recon.engine"} & modules


def test_the_settings_layer_imports_neither_torch_nor_timm() -> None:
    # The method's config objects are built (and checked) lazily only when parse_settings runs; importing the
    # typed boundary, and the config classes it builds, loads no tensor library.
    code = (
        "import sys, mgrq_runner.settings, mgrq_runner.quant.config, mgrq_runner.recon.config, "
        "mgrq_runner.transforms.config; print(sorted(sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    modules = set(ast.literal_eval(loaded))
    assert {"mgrq_runner.settings", "mgrq_runner.recon.config", "hydra", "omegaconf"} <= modules
    assert not {"torch", "timm"} & modules


def _record(
    tmp_path: Path, name: str, quant_prob: float, method_defaults: dict | None, method: str = "mgrq", **method_cfg: dict
) -> Path:
    """A finished proxy_vit W4A4 run's results.json with QDrop p ``quant_prob`` and more ``method_cfg`` sections."""
    method_cfg = {"loss": {"global_weight": 1.0, "local_weight": 1.0}, **method_cfg}
    method_cfg["recon"] = {"quant_prob": quant_prob, **method_cfg.get("recon", {})}
    results = {
        "model": "proxy_vit",
        "preset": "proxy_vit",
        "method": method,
        "w_bits": 4,
        "a_bits": 4,
        "status": "done",
        "top1": 90.0,
        "config": {"method": method_cfg},
    }
    if method_defaults is not None:
        results["method_defaults"] = method_defaults
    (tmp_path / name).mkdir()
    (tmp_path / name / "results.json").write_text(json.dumps(results))
    return tmp_path / name


def test_labels_follow_the_preset_defaults_a_run_recorded(tmp_path: Path) -> None:
    """A run labels what it changed from its method preset as the preset stood when it ran: if mgrq's preset had
    p=1, an mgrq run at p=1 is plain mgrq; an older record without the field is read against today's preset."""
    then = {"loss.global_weight": 1.0, "loss.local_weight": 1.0, "recon.quant_prob": 1.0}
    assert load_run(_record(tmp_path, "then", 1.0, then)).method == "mgrq"
    assert load_run(_record(tmp_path, "old", 1.0, None)).method == "mgrq (p=1)"  # today's mgrq preset: p=0.5
    assert load_run(_record(tmp_path, "drop", 0.5, then)).method == "mgrq (p=0.5)"


def test_a_run_records_its_method_preset_defaults(tmp_path: Path) -> None:
    from mgrq_runner.results import run_fields

    fields = run_fields(parse_settings(compose_config(tmp_path / "run", "method=mgrq_no_global")))
    # the label is measured against the preset named by method.name (mgrq), not the ablation file
    assert fields["method"] == "mgrq"
    assert fields["method_defaults"] == {
        "loss.global_weight": 1.0,
        "loss.local_weight": 1.0,
        "recon.quant_prob": 0.5,
        "init.reparam": True,
        "init.rotation": "none",
        "init.mlp_relu": False,
        "init.softmax_quantizer": "log_sqrt2",
        "recon.rounding": "adaround",
        "recon.weight_schedule": "constant",
        "loss.block_distance": "mse",
    }
    glfq = run_fields(parse_settings(compose_config(tmp_path / "glfq", "method=glfq")))["method_defaults"]
    assert (glfq["init.reparam"], glfq["init.rotation"], glfq["recon.rounding"]) == (False, "hadamard", "ste")


def test_a_framework_switch_changed_from_the_preset_is_in_the_label(tmp_path: Path) -> None:
    """A framework run with another softmax quantizer (or without the rotation) is not its preset's row; the same
    switch set by the preset itself (glfq_no_rotation) is not labelled; a record from before the switches were recorded
    is read against today's preset for them."""
    glfq = {"rotation": "hadamard", "mlp_relu": True, "softmax_quantizer": "uniform"}
    then = {"loss.global_weight": 1.0, "loss.local_weight": 1.0, "recon.quant_prob": 0.5}  # recorded no switches

    def label(name: str, method: str, init: dict, recorded: dict | None) -> str:
        return load_run(_record(tmp_path, name, 0.5, recorded, method, init=init, recon={"rounding": "ste"})).method

    assert label("plain", "mgrq_glfq", glfq, then) == "mgrq_glfq"
    assert label("sm", "mgrq_glfq", {**glfq, "softmax_quantizer": "log_sqrt2"}, then) == "mgrq_glfq (softmax=log_sqrt2)"
    two = {**glfq, "rotation": "none", "mlp_relu": False}
    assert label("two", "mgrq_glfq", two, None) == "mgrq_glfq (rotation=none, mlp_relu=false)"
    no_rotation = load_run(_record(tmp_path, "ablation", 0.5, None, "glfq_no_rotation", init={"rotation": "none"}))
    assert no_rotation.method == "glfq_no_rotation (λG=1, λL=1)"  # the weights differ from glfq's, the switch not
