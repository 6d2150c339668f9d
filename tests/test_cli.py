"""The ``mgrq-run`` command end to end on a generated ImageNet tree, and its answers to bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_fashion_mnist


def mgrq_run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "mgrq_runner.cli",
        f"hydra.run.dir={tmp_path / 'run'}",
        "progress=false",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def imagenet_overrides(root: Path, *extra: str) -> list[str]:
    return [
        "model=deit_t",
        "model.pretrained=false",
        "method=repq",  # the data path is under test here, not reconstruction
        f"data.root={root}",
        "data.workers=0",
        "data.batch_size=4",
        "calib.num_images=4",
        *extra,
    ]


def test_imagenet_tree_end_to_end(tmp_path: Path, imagenet_tree: Path) -> None:
    done = mgrq_run(tmp_path, *imagenet_overrides(imagenet_tree, "quant=w8a8"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "done" and results["model"] == "deit_tiny_patch16_224.fb_in1k"
    assert results["num_eval"] == 6 and results["num_calib"] == 4 and results["dataset"] == "imagenet"
    assert results["img_size"] == 224 and results["crop_pct"] == 0.875 and results["interpolation"] == "bicubic"
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists()
    calibration = (tmp_path / "run" / "calibration_images.txt").read_text().split()
    assert len(calibration) == 4 and all("/train/" in path for path in calibration)


def assert_clear_error(done: subprocess.CompletedProcess, *phrases: str) -> None:
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for phrase in phrases:
        assert phrase in output, output[-3000:]


@pytest.mark.parametrize(
    ("overrides", "phrases"),
    [
        (["data.root=/no/such/imagenet"], ["ImageNet root /no/such/imagenet does not exist", "data.root="]),
        (["quant.w_bits=9"], ["quant.w_bits=9 is outside 2..8"]),
        (["quant.a_bits=1"], ["quant.a_bits=1 is outside 2..8"]),
        (["model.name=deit_nano_patch16_224.fb_in1k"], ["unknown timm model", "Fix:"]),
        (["calib.num_images=50"], ["asks for 50 images but the split holds only 6"]),
    ],
)
def test_bad_input_is_one_clear_message(tmp_path: Path, imagenet_tree: Path, overrides, phrases) -> None:
    assert_clear_error(mgrq_run(tmp_path, *imagenet_overrides(imagenet_tree), *overrides), *phrases)


def test_malformed_root_and_corrupt_image(tmp_path: Path, imagenet_tree: Path) -> None:
    (imagenet_tree / "val" / "misc").mkdir()
    assert_clear_error(mgrq_run(tmp_path, *imagenet_overrides(imagenet_tree)), "not an ImageNet-1k class folder")
    (imagenet_tree / "val" / "misc").rmdir()
    bad = sorted((imagenet_tree / "val").glob("*/*.JPEG"))[-1]
    bad.write_bytes(b"\xff\xd8 truncated")
    # Through a DataLoader worker too: the message must still be the one sentence naming the file.
    done = mgrq_run(tmp_path, *imagenet_overrides(imagenet_tree, "data.workers=1"))
    assert_clear_error(done, f"corrupt image file {bad}")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "failed" and "calibrate" in results["times"]
    assert (
        results["error"] == f"DataError: {results['error'].split(': ', 1)[1]}" and "Traceback" not in results["error"]
    )
    assert str(bad) in results["error"]


def test_no_imagenet_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IMAGENET_ROOT", raising=False)
    done = mgrq_run(tmp_path, "model=deit_t", "model.pretrained=false")
    assert_clear_error(done, "no ImageNet root given", "IMAGENET_ROOT")


def test_unknown_preset_lists_the_options(tmp_path: Path) -> None:
    done = mgrq_run(tmp_path, "model=deit_xl")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "Could not find 'model/deit_xl'" in done.stderr and "deit_s" in done.stderr


@pytest.mark.slow
def test_default_job(tmp_path: Path) -> None:
    """The README's default job, end to end: the shipped proxy, W4A4, the whole Fashion-MNIST test split."""
    done = mgrq_run(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["status"] == "done" and results["num_eval"] == 10_000 and results["num_calib"] == 1024
    assert results["fp_top1"] >= 88.0, "the shipped proxy must reach 88 % top-1"
    assert results["method"] == "mgrq" and len(results["reconstruction"]) == 6  # embed, 4 blocks, head
    assert results["fp_top1"] - results["top1"] < 1.5, "mgrq at W4A4 stays within 1.5 points of FP on the proxy"


def test_help_and_version_introduce_the_app(tmp_path: Path) -> None:
    helped = subprocess.run([sys.executable, "-m", "mgrq_runner.cli", "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and helped.stdout.startswith("mgrq-run: post-training quantization")
    assert "Usage: mgrq-run [--multirun]" in helped.stdout and "mgrq-run mode=eval checkpoint=" in helped.stdout
    assert "method: aphq, brecq, fimaq, fp, glfq, glfq_adaround" in helped.stdout
    assert ", mgrq, mgrq_brecq," in helped.stdout
    assert "powered by Hydra" not in helped.stdout
    versioned = subprocess.run([sys.executable, "-m", "mgrq_runner.cli", "--version"], capture_output=True, text=True)
    from importlib.metadata import version

    from mgrq_runner import __version__

    assert versioned.returncode == 0
    assert versioned.stdout.strip().startswith(f"mgrq-run (mgrq-runner) {__version__}; torch {version('torch')}")


def test_help_into_a_closed_pipe_is_no_traceback() -> None:
    """mgrq-run --help | head -2: the reader has gone before the help is written (here: the pipe's read end is
    closed before the command starts, so every write fails); the command exits 0 without a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        helped = subprocess.run(
            [sys.executable, "-m", "mgrq_runner.cli", "--help"], stdout=write_end, stderr=subprocess.PIPE, text=True
        )
    finally:
        os.close(write_end)
    assert helped.returncode == 0 and "Traceback" not in helped.stderr and "BrokenPipe" not in helped.stderr


@needs_fashion_mnist
def test_a_sweep_through_submitit_runs_and_collects(tmp_path: Path) -> None:
    """The cluster path executed: hydra/launcher=submitit_local runs each job through submitit's executor (the
    same job function and pickling as SLURM, in local processes); mgrq-collect then tables the sweep."""
    sweep = tmp_path / "sweep"
    overrides = ["hydra/launcher=submitit_local", "progress=false", "debug=smoke", "data.num_eval=100"]
    command = [sys.executable, "-m", "mgrq_runner.cli", "-m", *overrides, "method=minmax", "seed=0,1"]
    done = subprocess.run([*command, f"hydra.sweep.dir={sweep}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(sweep.glob(".submitit/*/*_submitted.pkl"))) == 2, "each job went through submitit"
    statuses = [json.loads(p.read_text())["status"] for p in sorted(sweep.glob("*/results.json"))]
    assert statuses == ["done", "done"]
    from mgrq_runner.analysis.collect import main as collect

    assert collect([str(sweep)]) == 0
    summary = (sweep / "summary.md").read_text()
    assert "| minmax |" in summary and "from 2 runs" in summary


@pytest.mark.parametrize(
    ("arguments", "named"),
    [(["experiment=nope"], "experiment/nope"), (["method=nope"], "method/nope"), (["-m", "seed=0,"], "'seed=0,'")],
)
def test_a_command_line_hydra_refuses_exits_2_and_names_it(tmp_path: Path, arguments: list[str], named: str) -> None:
    command = [sys.executable, "-m", "mgrq_runner.cli", *arguments, f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert named in done.stdout + done.stderr
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "outputs").exists()  # nothing started
