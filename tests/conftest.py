"""Shared fixtures: composing the real config, a generated ImageNet-layout tree, the proxy's test data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, settings
from omegaconf import DictConfig
from PIL import Image

from mgrq_runner.cli import CONFIG_DIR
from mgrq_runner.data import imagenet_wnids

# Hypothesis (tests/test_fuzz_readers.py): make test runs "ci", the same 30 examples a reader every time
# (derandomized, no example database: a test run never depends on the last one); make fuzz runs "fuzz", 1500 fresh
# random examples a reader. No deadline: a reader's speed is not what they test, and a busy machine must not fail.
QUIET = [HealthCheck.too_slow]
settings.register_profile(
    "ci", max_examples=30, deadline=None, derandomize=True, database=None, suppress_health_check=QUIET
)
settings.register_profile("fuzz", max_examples=1500, deadline=None, database=None, suppress_health_check=QUIET)
settings.load_profile("ci")

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists(),
    reason="needs apt-get install dataset-fashion-mnist",
)


def compose_config(output_dir: str | Path, *overrides: str, hydra: bool = False) -> DictConfig:
    """The project's real config composed with ``overrides`` (no progress bars), writing into ``output_dir``;
    ``hydra`` also returns the ``hydra`` node (sweeper, launcher)."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        overrides = (f"output_dir={output_dir}", "progress=false", *overrides)
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``compose_config`` writing outputs under ``tmp_path / "run"``."""
    return lambda *overrides: compose_config(tmp_path / "run", *overrides)


def make_imagenet_tree(root: Path, classes: list[int], per_class: int = 2, size: int = 48) -> Path:
    """Writes ``root/{train,val}/<wnid>/*.JPEG`` with random images for the given class indices."""
    wnids = imagenet_wnids()
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for index in classes:
            folder = root / split / wnids[index]
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (size, size, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{wnids[index]}_{i}.JPEG")
    return root


@pytest.fixture
def imagenet_tree(tmp_path: Path) -> Path:
    return make_imagenet_tree(tmp_path / "imagenet", classes=[0, 7, 999])
