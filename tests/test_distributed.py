"""Distributed evaluation: shards cover every image once; 2 gloo ranks score exactly as one process does."""

from __future__ import annotations

import copy
import fcntl
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mgrq_runner import devices
from mgrq_runner.data import create_loader, load_fashion_mnist
from mgrq_runner.devices import claim_gpu
from mgrq_runner.distributed import DistributedEvalError, evaluate_distributed, shard_ranges
from mgrq_runner.errors import ConfigError, NumericalError
from mgrq_runner.models import create_proxy_model
from mgrq_runner.quant.api import QuantConfig, quantize_
from mgrq_runner.quant.calibrate import InitConfig, calibrate
from mgrq_runner.scoring import evaluate
from tests.conftest import FASHION_MNIST_ROOT, needs_fashion_mnist


@pytest.mark.parametrize(
    ("num_images", "batch_size", "world_size"), [(999, 100, 2), (999, 100, 3), (7, 2, 4), (5, 8, 1)]
)
def test_shards_are_whole_batches_covering_every_image_once(num_images: int, batch_size: int, world_size: int) -> None:
    shards = shard_ranges(num_images, batch_size, world_size)
    assert [i for shard in shards for i in shard] == list(range(num_images))
    assert all(len(shard) > 0 and shard.start % batch_size == 0 for shard in shards)
    sizes = [-(-len(shard) // batch_size) for shard in shards]
    assert max(sizes) - min(sizes) <= 1


def test_bad_arguments_are_refused() -> None:
    models = {"fp": nn.Linear(2, 3)}
    data = TensorDataset(torch.zeros(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="backend 'mpi' is unknown"):
        evaluate_distributed(models, data, 2, 2, backend="mpi")
    with pytest.raises(ConfigError, match="must be positive"):
        evaluate_distributed(models, data, 2, 0)
    with pytest.raises(ConfigError, match="reference model 'quant'"):
        evaluate_distributed(models, data, 2, 2, reference="quant")


@needs_fashion_mnist
def test_two_gloo_ranks_match_single_process_evaluate() -> None:
    test = load_fashion_mnist(FASHION_MNIST_ROOT, "test")
    data = TensorDataset(test.tensors[0][:999], test.tensors[1][:999])  # odd: uneven shards, a short last batch
    calibration = load_fashion_mnist(FASHION_MNIST_ROOT, "train").tensors[0][:32]
    fp = create_proxy_model().eval()
    quant = quantize_(copy.deepcopy(fp), QuantConfig(w_bits=4, a_bits=4))
    calibrate(quant, [calibration], 1, InitConfig(), torch.device("cpu"))
    models = {"fp": fp, "quant": quant}

    single = evaluate(models, create_loader(data, 100), torch.device("cpu"), reference="fp")
    spread = evaluate_distributed(models, data, batch_size=100, world_size=2, backend="gloo", reference="fp")

    assert set(spread) == {"fp", "quant"}
    for name in models:
        one, many = single[name], spread[name]
        assert (many.top1, many.top5, many.agreement, many.num_images) == (
            one.top1,
            one.top5,
            one.agreement,
            one.num_images,
        )
        assert torch.equal(many.predictions, one.predictions)
        assert many.images_per_second > 0
    assert spread["quant"].num_images == 999 and spread["quant"].agreement < 1.0


def nan_model() -> nn.Module:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    nn.init.constant_(model[1].weight, float("nan"))
    return model


def test_worker_errors_surface_in_the_parent() -> None:
    data = TensorDataset(torch.randn(6, 4), torch.zeros(6, dtype=torch.long))
    fine = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(
        NumericalError,
        match=r"^distributed evaluation, rank \d of 2, images \d-\d: model 'bad' produced NaN/inf logits",
    ):
        evaluate_distributed({"fine": fine, "bad": nan_model()}, data, batch_size=3, world_size=2)
    with pytest.raises(DistributedEvalError, match=r"rank \d of 2 failed: RuntimeError: mat1 and mat2(.|\n)*Worker"):
        evaluate_distributed({"wrong": nn.Linear(5, 3)}, data, batch_size=3, world_size=2)


def test_claim_gpu_skips_claimed_gpus_and_keeps_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices, "_claimed_gpu", None)
    with open(tmp_path / "gpu-0.lock", "a+") as other:  # another job holds GPU 0
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert claim_gpu(tmp_path) == "cuda:1"
        assert claim_gpu(tmp_path) == "cuda:1"
        devices._claimed_gpu[1].close()
        monkeypatch.setattr(devices, "_claimed_gpu", None)
        with open(tmp_path / "gpu-1.lock", "a+") as third:
            fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
            with pytest.raises(ConfigError, match="all 2 visible GPUs are claimed"):
                claim_gpu(tmp_path)
