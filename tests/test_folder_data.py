"""Your own data and model: ``data=folder`` trees, ``calib.list``, ``model.num_classes`` / ``img_size`` / ``kwargs``.

The equality checks write real Fashion-MNIST images as PNG folders (``scripts/fashion_mnist_to_folder.py``) and
compare them with the built-in Fashion-MNIST path, image for image.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from mgrq_runner.data import (
    CLASSES_FILE,
    ImageFiles,
    build_data,
    create_loader,
    folder_classes,
    load_fashion_mnist,
    resolved_data_config,
)
from mgrq_runner.errors import ConfigError, DataError, ModelError
from mgrq_runner.files import read_calibration_list
from mgrq_runner.models import create_model, create_proxy_model
from mgrq_runner.run import run
from mgrq_runner.scoring import evaluate
from mgrq_runner.settings import DataSettings, ModelSettings
from tests.conftest import FASHION_MNIST_ROOT, compose_config, needs_fashion_mnist

SCRIPT = Path(__file__).parents[1] / "scripts" / "fashion_mnist_to_folder.py"
CLASSES = ("cat", "dog", "owl")


@pytest.fixture(scope="module")
def fmnist_tree(tmp_path_factory) -> Path:
    """The first 300 train and 300 test images of Fashion-MNIST as a PNG folder tree."""
    root = tmp_path_factory.mktemp("fmnist")
    subprocess.run([sys.executable, str(SCRIPT), str(root), "--limit", "300"], check=True, capture_output=True)
    return root


def _index(path: str) -> int:
    return int(Path(path).stem)


@needs_fashion_mnist
def test_folder_images_and_calibration_equal_the_built_in_path(fmnist_tree: Path, tmp_path: Path) -> None:
    built_in_list = tmp_path / "built_in.txt"
    chosen = [17, 3, 250, 99, 120, 5, 42, 201]  # the list's order is kept
    built_in_list.write_text("".join(f"train[{i}]\n" for i in chosen))
    folder_list = tmp_path / "folder.txt"
    subprocess.run(
        [sys.executable, str(SCRIPT), str(fmnist_tree), "--convert-list", str(built_in_list), str(folder_list)],
        check=True,
        capture_output=True,
    )
    model = create_proxy_model()
    entries = folder_list.read_text().split()
    folder_overrides = ("data=folder", f"data.root={fmnist_tree}", "data.workers=0")
    folder_cfg = DataSettings.parse(compose_config(tmp_path / "run", *folder_overrides).data)
    folder = build_data(folder_cfg, model, 8, 0, entries)
    built_in = build_data(
        DataSettings.parse(compose_config(tmp_path / "run").data), model, 8, 0, [f"train[{i}]" for i in chosen]
    )

    assert folder.num_classes == 10 and folder.class_names[0] == "T-shirt_top"  # classes.txt's order, not sorted
    assert [_index(p) for p in folder.calibration_ids] == chosen and built_in.calibration_ids[0] == "train[17]"
    for (a, label_a), (b, label_b) in zip(folder.calibration, built_in.calibration, strict=True):
        assert torch.equal(a, b) and label_a == label_b
    test = load_fashion_mnist(FASHION_MNIST_ROOT, "test")
    assert len(folder.evaluation) == 300
    for (image, label), (path, _) in zip(folder.evaluation, folder.evaluation.samples, strict=True):
        expected_image, expected_label = test[_index(path)]
        assert torch.equal(image, expected_image) and label == int(expected_label)

    # Through the whole pipeline: the same listed images calibrate the same model, so on the same evaluation
    # images the folder run's scores are the built-in model's.
    folder_run, folder_objects = run(
        compose_config(tmp_path / "folder", "method=repq", "threads=1", *folder_overrides, f"calib.list={folder_list}")
    )
    _, built_in_objects = run(
        compose_config(
            tmp_path / "built_in", "method=repq", "threads=1", "data.num_eval=50", f"calib.list={built_in_list}"
        )
    )
    folder_state, built_in_state = (o["quant_model"].state_dict() for o in (folder_objects, built_in_objects))
    assert all(torch.equal(folder_state[k], built_in_state[k]) for k in built_in_state)
    models = {"fp": built_in_objects["fp_model"], "quant": built_in_objects["quant_model"]}
    scores = evaluate(models, create_loader(folder.evaluation, 100), torch.device("cpu"))["quant"]
    assert folder_run["num_calib"] == 8 and folder_run["num_eval"] == 300
    assert (folder_run["top1"], folder_run["top5"]) == (round(scores.top1, 3), round(scores.top5, 3))
    assert folder_run["fp_agreement"] == round(scores.agreement, 5)


def _rgb_tree(root: Path, split_names=("train", "val"), per_class: int = 4) -> Path:
    """Random 24x24 images in three class folders; one grey and one RGBA image among them."""
    generator = torch.Generator().manual_seed(0)
    for split in split_names:
        for name in CLASSES:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (24, 24, 3), generator=generator, dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    Image.new("L", (24, 24), 128).save(root / "train" / "cat" / "grey.png")
    Image.new("RGBA", (24, 24), (10, 200, 30, 90)).save(root / split_names[-1] / "owl" / "alpha.png")
    return root


TINY_VIT = (
    "model=timm",
    "model.name=vit_tiny_patch16_224",
    "model.num_classes=3",
    "model.img_size=32",
    "model.kwargs={depth:2,patch_size:8,embed_dim:32,num_heads:2}",
)


def test_own_model_and_folder_through_the_pipeline(tmp_path: Path) -> None:
    """A timm ViT with 3 classes, saved and reloaded as a checkpoint, on a 3-class folder data set (validation/
    spelling, a grey and an RGBA image): calibration, mgrq with 2 iterations per unit, evaluation."""
    root = _rgb_tree(tmp_path / "pets", ("train", "validation"))
    random_cfg = compose_config(tmp_path / "unused", *TINY_VIT, "model.pretrained=false")
    model = create_model(ModelSettings.parse(random_cfg.model))
    checkpoint = tmp_path / "finetuned.safetensors"
    save_file(model.state_dict(), str(checkpoint))
    overrides = (*TINY_VIT, f"model.checkpoint={checkpoint}", "data=folder", f"data.root={root}", "data.workers=0")
    settings = ("calib.num_images=8", "model.recon_iters=2", "method.recon.batch_size=4", "threads=1")
    results, objects = run(compose_config(tmp_path / "run", *overrides, *settings, "export=true"))
    assert results["status"] == "done" and results["num_eval"] == 13 and results["num_calib"] == 8
    assert (tmp_path / "run" / "classes.txt").read_text().split() == list(CLASSES)
    assert results["img_size"] == 32
    for key, value in model.state_dict().items():  # the checkpoint was loaded, not fresh random weights
        assert torch.equal(objects["fp_model"].state_dict()[key], value)
    # The exported integer model, evaluated on its own (mode=eval), scores what the run scored.
    evaluated, _ = run(compose_config(tmp_path / "eval", *overrides, "mode=eval", f"checkpoint={tmp_path / 'run'}"))
    assert (evaluated["top1"], evaluated["top5"], evaluated["num_eval"]) == (results["top1"], results["top5"], 13)


def test_glfq_on_own_model_and_folder(tmp_path: Path) -> None:
    """method=glfq (ReLU MLPs re-trained, rotated, STE) on a timm ViT and a folder data set: the transformation
    runs on the folder's calibration images, and the export reloads with that structure to the run's scores."""
    root = _rgb_tree(tmp_path / "pets")
    overrides = (*TINY_VIT, "model.pretrained=false", "data=folder", f"data.root={root}", "data.workers=0")
    settings = ("method=glfq", "quant=w3a3", "calib.num_images=8", "method.recon.iters=2", "threads=1")
    tiny = ("method.init.mlp_relu_iters=3", "method.init.mlp_relu_batch_size=4", "method.recon.batch_size=4")
    results, _ = run(compose_config(tmp_path / "run", *overrides, *settings, *tiny, "export=true"))
    assert results["status"] == "done" and results["num_eval"] == 13 and results["num_calib"] == 8
    mlps = results["fp_transform"]["mlp_relu"]["mlps"]
    assert [m["mlp"] for m in mlps] == ["blocks.0.mlp", "blocks.1.mlp"]
    assert results["fp_transform"]["rotation"]["kind"] == "hadamard"
    assert results["fp_transformed_top1"] is not None
    evaluated, _ = run(compose_config(tmp_path / "eval", *overrides, "mode=eval", f"checkpoint={tmp_path / 'run'}"))
    assert (evaluated["top1"], evaluated["top5"], evaluated["num_eval"]) == (results["top1"], results["top5"], 13)


def test_class_count_mismatch_names_both_numbers(tmp_path: Path) -> None:
    root = _rgb_tree(tmp_path / "pets")
    cfg = compose_config(
        tmp_path / "run",
        *TINY_VIT[:2],
        "model.num_classes=5",
        "model.img_size=32",
        "model.kwargs={depth:1,patch_size:8,embed_dim:32,num_heads:2}",
        "model.pretrained=false",
        "data=folder",
        f"data.root={root}",
        "data.workers=0",
        "method=fp",
    )
    with pytest.raises(
        ConfigError, match=r"predicts 5 classes but the folder data set .* has 3\. Fix: model.num_classes=3"
    ):
        run(cfg)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda root: (root / "val").rename(root / "test"), "has no .*val/ or .*validation/"),
        (lambda root: (root / "val" / "fox").mkdir(), "fox is not one of the data set's 3 classes"),
        (lambda root: [p.unlink() for p in (root / "train" / "dog").iterdir()], "dog holds no images"),
        (lambda root: (root / "train" / "owl" / "9.png").write_bytes(b"not a png"), "corrupt image file .*9.png"),
    ],
)
def test_folder_errors(tmp_path: Path, damage, message: str) -> None:
    root = _rgb_tree(tmp_path / "pets")
    damage(root)
    cfg = DataSettings.parse(
        compose_config(tmp_path / "run", "data=folder", f"data.root={root}", "data.workers=0").data
    )
    with pytest.raises(DataError, match=message):
        bundle = build_data(cfg, create_proxy_model(pretrained=False), 12, 0)
        [bundle.calibration[i] for i in range(len(bundle.calibration))]  # noqa: B018 (decodes every image)


def test_calibration_list_errors(tmp_path: Path) -> None:
    root = _rgb_tree(tmp_path / "pets")
    cfg = DataSettings.parse(
        compose_config(tmp_path / "run", "data=folder", f"data.root={root}", "data.workers=0").data
    )
    model = create_proxy_model(pretrained=False)
    with pytest.raises(DataError, match=r"line 2: 'train/cat/77.png' is not an image of the train split"):
        build_data(cfg, model, 2, 0, ["train/cat/0.png", "train/cat/77.png"])
    with pytest.raises(DataError, match="more than once"):
        build_data(cfg, model, 2, 0, ["train/cat/0.png", str(root / "train" / "cat" / "0.png")])
    listed = build_data(cfg, model, 2, 0, ["train/owl/1.png", str(root / "train" / "cat" / "0.png")])
    assert listed.calibration_ids == [str(root / "train" / "owl" / "1.png"), str(root / "train" / "cat" / "0.png")]
    (tmp_path / "list.txt").write_text("train/cat/0.png\n")
    with pytest.raises(ConfigError, match="calib.num_images=4 but calib.list names 1 images"):
        run(
            compose_config(
                tmp_path / "run",
                "data=folder",
                f"data.root={root}",
                f"calib.list={tmp_path / 'list.txt'}",
                "calib.num_images=4",
                "method=repq",
            )
        )


def test_model_kwargs_must_be_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.kwargs=5 is not a mapping"):
        create_model(ModelSettings.parse(compose_config(tmp_path, "model.kwargs=5").model))


def test_a_checkpoint_for_another_input_size_and_its_own_preprocessing(tmp_path: Path) -> None:
    """Position embeddings trained at 32 px are resized by timm's filter for a 48 px model; a timm config.json
    beside the checkpoint sets the preprocessing (its mean and std reach the transform)."""
    trained = create_model(
        ModelSettings.parse(compose_config(tmp_path / "a", *TINY_VIT, "model.pretrained=false").model)
    )
    folder = tmp_path / "finetuned"
    folder.mkdir()
    save_file(trained.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.5, 0.5, 0.5]}}')
    overrides = [o if o != "model.img_size=32" else "model.img_size=48" for o in TINY_VIT]
    cfg = compose_config(tmp_path / "b", *overrides, f"model.checkpoint={folder / 'model.safetensors'}")
    model = create_model(ModelSettings.parse(cfg.model))
    assert model.pos_embed.shape[1] == 1 + (48 // 8) ** 2 and trained.pos_embed.shape[1] == 1 + (32 // 8) ** 2
    assert torch.equal(model.cls_token, trained.cls_token)  # the rest of the weights as trained
    data_config = resolved_data_config(model, DataSettings.parse(cfg.data))
    assert data_config["mean"] == (0.1, 0.2, 0.3) and data_config["input_size"] == (3, 48, 48)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(
        ModelError, match=r"timm config .*config\.json is not valid JSON \(.*\)\. Fix: repair or remove it"
    ):
        create_model(ModelSettings.parse(cfg.model))


HUB_MODEL = """
import sys
import torch
from mgrq_runner.models import create_model
from mgrq_runner.settings import ModelSettings
model = create_model(ModelSettings.parse({"name": "hf-hub:me/tiny", "pretrained": True, "checkpoint": None}))
expected = torch.load(sys.argv[1])
same = all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
print(model.num_classes, same, model.pretrained_cfg["mean"])
"""


def test_a_hub_model_from_the_local_cache(tmp_path: Path) -> None:
    """``model.name=hf-hub:org/repo`` goes through timm, offline, when the hub's files are in the local cache."""
    arch = {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, **arch)
    repo = tmp_path / "hf" / "hub" / "models--me--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    pretrained_cfg = {"input_size": [3, 32, 32], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "num_classes": 3}
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 3,
        "model_args": arch,
        "pretrained_cfg": pretrained_cfg,
    }
    (snapshot / "config.json").write_text(json.dumps(config))
    save_file(model.state_dict(), str(snapshot / "model.safetensors"))
    torch.save(model.state_dict(), tmp_path / "expected.pth")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", HUB_MODEL, str(tmp_path / "expected.pth")], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    classes, same_weights, mean = done.stdout.strip().split(" ", 2)
    assert classes == "3" and same_weights == "True" and "0.4" in mean  # the hub config's preprocessing


def test_a_deeper_proxy_with_its_own_checkpoint(tmp_path: Path) -> None:
    """``model.kwargs`` reaches the proxy's constructor too: a 6-block proxy loads its own weights, and the
    shipped 4-block weights are refused for it with the fix named."""
    deeper = create_proxy_model(pretrained=False, depth=6)
    save_file(deeper.state_dict(), str(tmp_path / "deeper.safetensors"))
    cfg = compose_config(
        tmp_path / "run", "model.kwargs={depth:6}", f"model.checkpoint={tmp_path / 'deeper.safetensors'}"
    )
    model = create_model(ModelSettings.parse(cfg.model))
    assert len(model.blocks) == 6 and torch.equal(model.blocks[5].mlp.fc2.weight, deeper.blocks[5].mlp.fc2.weight)
    with pytest.raises(ModelError, match=r"do not fit proxy_vit with \{'depth': 6\}.*Fix: model.checkpoint="):
        create_model(ModelSettings.parse(compose_config(tmp_path / "run", "model.kwargs={depth:6}").model))


def test_the_users_text_files_are_read_strictly(tmp_path: Path) -> None:
    # calib.list and classes.txt: a byte-order mark is dropped; a directory, a named pipe or bytes that are not
    # UTF-8 are one DataError naming the file and what it is, never a traceback or "does not exist".
    listed = tmp_path / "list.txt"
    listed.write_bytes("\ufefftrain/cat/0.png\n\ntrain/dog/1.png\n".encode())
    assert read_calibration_list(listed) == ["train/cat/0.png", "train/dog/1.png"]
    folder, pipe, latin = tmp_path / "folder", tmp_path / "pipe", tmp_path / "latin.txt"
    folder.mkdir()
    os.mkfifo(pipe)
    latin.write_bytes("caf\xe9\n".encode("latin-1"))
    for path, message in (
        (folder, "is a directory, not a file"),
        (pipe, "is a named pipe, not a file"),
        (latin, r"is not UTF-8 text \(byte 3: b'\\xe9'\)"),
        (tmp_path / "none.txt", "does not exist"),
    ):
        with pytest.raises(DataError, match=rf"calib.list {re.escape(str(path))} {message}\. Fix: "):
            read_calibration_list(path)
    root = _rgb_tree(tmp_path / "pets")
    names = folder_classes(root)
    (root / CLASSES_FILE).write_bytes(("\ufeff" + "\n".join(names) + "\n").encode())
    assert folder_classes(root) == names  # the BOM is not part of the first class's name
    (root / CLASSES_FILE).unlink()
    (root / CLASSES_FILE).mkdir()
    with pytest.raises(DataError, match="classes.txt .* is a directory, not a file"):
        folder_classes(root)


@needs_fashion_mnist
def test_labels_in_another_order_are_said(fmnist_tree: Path, tmp_path: Path) -> None:
    """A classes.txt in another order than the model's classes completes, but results.json and the log say that
    the FP model scores no better than chance; the right order says nothing."""
    tree = tmp_path / "tree"
    shutil.copytree(fmnist_tree, tree)
    names = (tree / CLASSES_FILE).read_text().split()
    (tree / CLASSES_FILE).write_text("\n".join(names[1:] + names[:1]) + "\n")  # every label shifted by one
    folder = ("method=fp", "data=folder", "data.workers=0", "data.num_eval=200")
    shifted, _ = run(compose_config(tmp_path / "shifted", *folder, f"data.root={tree}"))
    assert shifted["status"] == "done" and shifted["fp_top1"] <= 10.0
    assert "no better than chance (10.00 % for 10 classes)" in shifted["warnings"][0]
    right, _ = run(compose_config(tmp_path / "right", *folder, f"data.root={fmnist_tree}"))
    assert right["fp_top1"] > 50.0 and "warnings" not in right


def test_an_image_that_is_not_a_file_is_refused_by_kind(tmp_path: Path) -> None:
    """A named pipe or a folder with an image's name is refused in one line naming it (opening a pipe as an image
    would wait for a writer forever)."""
    pipe, folder = tmp_path / "0.png", tmp_path / "1.png"
    os.mkfifo(pipe)
    folder.mkdir()
    for path, kind in ((pipe, "a named pipe"), (folder, "a directory")):
        with pytest.raises(DataError, match=rf"image file {re.escape(str(path))} is {kind}, not a file\. Fix: "):
            ImageFiles([(str(path), 0)])[0]
