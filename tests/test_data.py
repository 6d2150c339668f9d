"""Data sets: the fixed wnid map, Fashion-MNIST files, calibration sampling and the errors for bad data."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from mgrq_runner.data import (
    ImageNetFolder,
    build_data,
    imagenet_wnids,
    load_fashion_mnist,
    resolve_imagenet_root,
    seeded_subset,
)
from mgrq_runner.errors import ConfigError, DataError
from mgrq_runner.models import create_proxy_model
from mgrq_runner.settings import DataSettings
from tests.conftest import FASHION_MNIST_ROOT, needs_fashion_mnist


def test_wnid_map_is_the_fixed_1000_class_order() -> None:
    wnids = imagenet_wnids()
    assert len(wnids) == 1000 and len(set(wnids)) == 1000
    assert wnids[0] == "n01440764" and wnids[999] == "n15075141" and wnids == sorted(wnids)


def test_partial_tree_keeps_global_class_indices(imagenet_tree: Path) -> None:
    dataset = ImageNetFolder(imagenet_tree, "val")
    assert sorted({label for _, label in dataset.samples}) == [0, 7, 999]
    image, label = dataset[len(dataset) - 1]
    assert label == 999 and image.size == (48, 48)


def test_corrupt_image_is_named(imagenet_tree: Path) -> None:
    bad = next((imagenet_tree / "val").glob("*/*.JPEG"))
    bad.write_bytes(b"not a jpeg")
    dataset = ImageNetFolder(imagenet_tree, "val")
    index = [path for path, _ in dataset.samples].index(str(bad))
    with pytest.raises(DataError, match=f"corrupt image file {bad}"):
        dataset[index]


def test_unknown_class_folder_is_rejected(imagenet_tree: Path) -> None:
    (imagenet_tree / "val" / "cats").mkdir()
    with pytest.raises(DataError, match="not an ImageNet-1k class folder"):
        ImageNetFolder(imagenet_tree, "val")


def test_missing_split_and_empty_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        ImageNetFolder(tmp_path, "val")
    (tmp_path / "val" / "n01440764").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found"):
        ImageNetFolder(tmp_path, "val")


def test_seeded_subset_is_reproducible_and_bounded() -> None:
    data = list(range(100))
    _, first = seeded_subset(data, 10, seed=3, what="calib.num_images")
    _, again = seeded_subset(data, 10, seed=3, what="calib.num_images")
    _, other = seeded_subset(data, 10, seed=4, what="calib.num_images")
    assert first == again and first != other and len(set(first)) == 10
    with pytest.raises(DataError, match="asks for 101 images but the split holds only 100"):
        seeded_subset(data, 101, seed=0, what="calib.num_images")


def test_imagenet_bundle_uses_model_preprocessing(imagenet_tree: Path) -> None:
    import timm

    model = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    cfg = DataSettings(name="imagenet", root=str(imagenet_tree))
    bundle = build_data(cfg, model, num_calib=4, seed=0)
    image, _ = bundle.evaluation[0]
    assert image.shape == (3, 224, 224) and len(bundle.calibration) == 4
    assert all("/train/" in path for path in bundle.calibration_ids)
    with pytest.raises(DataError, match="holds only 6"):
        build_data(cfg, model, num_calib=7, seed=0)
    with pytest.raises(DataError, match="no ImageNet root given"):
        build_data(replace(cfg, root=None), model, num_calib=4, seed=0)
    heldout = build_data(replace(cfg, eval_split="heldout", heldout_size=2), model, 3, seed=0)
    heldout_paths = {heldout.evaluation.dataset.samples[i][0] for i in heldout.evaluation.indices}
    assert len(heldout_paths) == 2 and all("/train/" in path for path in heldout_paths)
    assert not heldout_paths & set(heldout.calibration_ids)
    with pytest.raises(DataError, match="heldout_size=4 but the train split has 3 images besides"):
        build_data(replace(cfg, eval_split="heldout", heldout_size=4), model, 3, seed=0)
    with pytest.raises(ConfigError, match="data.eval_split='test'"):
        DataSettings.parse({"name": "imagenet", "root": str(imagenet_tree), "eval_split": "test"})


@needs_fashion_mnist
def test_fashion_mnist_heldout_slice_is_train_outside_calibration() -> None:
    cfg = DataSettings(name="fashion_mnist", root=str(FASHION_MNIST_ROOT), eval_split="heldout", heldout_size=500)
    model = create_proxy_model()
    train_images = load_fashion_mnist(FASHION_MNIST_ROOT, "train").tensors[0]
    bundles = [build_data(cfg, model, num_calib=64, seed=seed) for seed in (0, 0, 1)]
    for bundle in bundles:
        indices = bundle.evaluation.indices
        calibration = {int(name[6:-1]) for name in bundle.calibration_ids}  # "train[i]"
        assert len(indices) == 500 and not set(indices) & calibration
        assert torch.equal(bundle.evaluation[0][0], train_images[indices[0]])
    assert bundles[0].evaluation.indices == bundles[1].evaluation.indices  # one fixed slice per calibration set
    # Another seed's calibration set moves only the few held-out images it takes.
    assert len(set(bundles[0].evaluation.indices) & set(bundles[2].evaluation.indices)) > 480


@needs_fashion_mnist
def test_fashion_mnist_real_files() -> None:
    test = load_fashion_mnist(FASHION_MNIST_ROOT, "test")
    images, labels = test.tensors
    assert images.shape == (10_000, 1, 28, 28) and labels.shape == (10_000,)
    assert torch.bincount(labels).tolist() == [1000] * 10
    assert abs(images.mean().item()) < 0.05, "normalised with the data set's own mean and std"


def test_fashion_mnist_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path, "test")
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="corrupt Fashion-MNIST file"):
        load_fashion_mnist(tmp_path, "test")


def test_proxy_input_matches_fashion_mnist() -> None:
    model = create_proxy_model(pretrained=False)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_tool_leftovers_are_skipped_and_a_file_root_is_named(imagenet_tree: Path, tmp_path: Path) -> None:
    count = len(ImageNetFolder(imagenet_tree, "val"))
    for leftover in (".ipynb_checkpoints", "__MACOSX"):
        (imagenet_tree / "val" / leftover).mkdir()
        (imagenet_tree / "val" / leftover / "junk.JPEG").write_bytes(b"not an image")
    (sorted((imagenet_tree / "val").glob("n*"))[0] / ".hidden.JPEG").write_bytes(b"not an image")
    assert len(ImageNetFolder(imagenet_tree, "val")) == count
    root_file = tmp_path / "imagenet.tar"
    root_file.write_bytes(b"")
    with pytest.raises(DataError, match="is a file, not a folder"):
        resolve_imagenet_root(str(root_file))
