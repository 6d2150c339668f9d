"""Shared fixtures: composing the real config, a generated ImageNet-layout tree, the proxy's test data."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image

from mgrq_runner.cli import CONFIG_DIR
from mgrq_runner.data import imagenet_wnids

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists(),
    reason="needs apt-get install dataset-fashion-mnist",
)


@pytest.fixture
def compose_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """Composes the project's config with overrides, writing outputs under ``tmp_path``."""

    def _compose(*overrides: str) -> DictConfig:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose("config", overrides=[f"output_dir={tmp_path / 'run'}", "progress=false", *overrides])

    return _compose


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
