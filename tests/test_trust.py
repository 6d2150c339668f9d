"""Nothing read is trusted on its own word: run-dir links, the data a resumed or evaluated model was built on, the
question a done run answered, a full disk, damaged state, images that lie about their size."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image

from mgrq_runner import files
from mgrq_runner.data import ImageFiles
from mgrq_runner.errors import ConfigError, DataError, DiskFullError
from mgrq_runner.recon.state import MANIFEST
from mgrq_runner.run import run
from mgrq_runner.rundir import CALIBRATION_LIST, EXPORT_WEIGHTS, LOCK, RECON_CURVES, RECON_STATE
from tests.conftest import FASHION_MNIST_ROOT, compose_config, needs_fashion_mnist
from tests.test_resume import small_cfg, stop_at

SMOKE = ("debug=smoke", "data.num_eval=100", "method=minmax")  # Fashion-MNIST, seconds
FOLDER_SMOKE = ("debug=smoke", "method=minmax")  # with folder(root): 16 of its 40 train images, all 20 val ones
CLASSES = [f"class{i}" for i in range(10)]  # the proxy predicts 10 classes


def grey_tree(root: Path, seed: int, classes: list[str] = CLASSES) -> Path:
    """A 10-class folder data set of random 28 x 28 grey PNGs (the proxy's input), classes.txt in ``classes``."""
    generator = torch.Generator().manual_seed(seed)
    for split, count in (("train", 4), ("val", 2)):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (28, 28), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{i}.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def folder(root: Path) -> tuple[str, ...]:
    return ("data=folder", f"data.root={root}", "data.workers=0", "data.num_eval=null")


def test_run_dir_links_are_never_written_through(tmp_path: Path) -> None:
    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / LOCK).symlink_to(target)
    data = grey_tree(tmp_path / "pets", seed=0)
    with pytest.raises(ConfigError, match=rf"{LOCK} is a symbolic link.*Fix: remove"):
        run(compose_config(run_dir, *FOLDER_SMOKE, *folder(data)))
    (run_dir / LOCK).unlink()
    (run_dir / CALIBRATION_LIST).symlink_to(target)
    (run_dir / RECON_STATE).symlink_to(tmp_path)
    with pytest.raises(ConfigError, match=rf"{RECON_STATE} is a symbolic link"):
        run(compose_config(run_dir, "debug=smoke", "method=qdrop", "method.recon.iters=2", *folder(data)))
    (run_dir / RECON_STATE).unlink()
    run(compose_config(run_dir, *FOLDER_SMOKE, *folder(data)))
    assert target.read_text() == "keep me\n", "the link's target is untouched"
    assert not (run_dir / CALIBRATION_LIST).is_symlink() and len((run_dir / CALIBRATION_LIST).read_text().split()) == 16


@needs_fashion_mnist
def test_a_done_run_is_not_returned_for_another_question(tmp_path: Path) -> None:
    run(compose_config(tmp_path, *SMOKE))
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ConfigError, match=r"is done, and its scores answer another question \(data.eval_split: val"):
        run(compose_config(tmp_path, *SMOKE, "resume=true", "data.eval_split=heldout", "data.heldout_size=100"))
    with pytest.raises(ConfigError, match=r"another question \(export: False -> True\)"):
        run(compose_config(tmp_path, *SMOKE, "resume=true", "export=true"))
    with pytest.raises(ConfigError, match=rf"another question \(data.root: {FASHION_MNIST_ROOT} -> /elsewhere\)"):
        run(compose_config(tmp_path, *SMOKE, "resume=true", "data.root=/elsewhere"))
    assert (tmp_path / "results.json").read_text() == before
    results, _ = run(compose_config(tmp_path, *SMOKE, "resume=true"))  # the same question: its old answer
    assert json.dumps(results, indent=2) + "\n" == before


def test_a_resume_on_other_data_is_refused_and_a_moved_copy_resumes(tmp_path: Path) -> None:
    data_a = grey_tree(tmp_path / "a", seed=0)
    overrides = ("method=mgrq", "calib.num_images=8", "method.recon.iters=4", "method.loss.local_weight=0")
    run_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        run(compose_config(run_dir, *folder(data_a), *overrides), stop_at("blocks.1", 0))
    other = grey_tree(tmp_path / "b", seed=1)  # the same names, other pixels
    with pytest.raises(ConfigError, match=r"resume: the calibration images differ from those the units in"):
        run(compose_config(run_dir, *folder(other), *overrides, "resume=true"))
    assert json.loads((run_dir / "results.json").read_text())["status"] == "failed"
    moved = shutil.copytree(data_a, tmp_path / "moved")
    shutil.rmtree(data_a)
    results, _ = run(compose_config(run_dir, *folder(moved), *overrides, "resume=true"))
    assert results["status"] == "done" and results["resumed_units"] == ["embed", "blocks.0"]


def test_an_export_is_evaluated_only_on_its_own_classes_and_never_into_its_own_dir(tmp_path: Path) -> None:
    data = grey_tree(tmp_path / "pets", seed=0)
    exported = tmp_path / "exported"
    run(compose_config(exported, *FOLDER_SMOKE, *folder(data), "export=true"))
    reordered = shutil.copytree(data, tmp_path / "reordered")
    (reordered / "classes.txt").write_text("\n".join(reversed(CLASSES)) + "\n")
    with pytest.raises(ConfigError, match=r"classes are not those .* \(label 0: class0 there, class9 here\)"):
        run(compose_config(tmp_path / "eval", "mode=eval", f"checkpoint={exported}", *folder(reordered)))
    record = (exported / "results.json").read_text()
    with pytest.raises(ConfigError, match="mode=eval would write into its checkpoint's own run dir"):
        run(compose_config(exported, "mode=eval", f"checkpoint={exported}", *folder(data)))
    assert (exported / "results.json").read_text() == record
    results, _ = run(compose_config(tmp_path / "eval_ok", "mode=eval", f"checkpoint={exported}", *folder(data)))
    assert results["status"] == "done" and results["top1"] == json.loads(record)["top1"]


@needs_fashion_mnist
def test_a_full_disk_is_one_error_and_keeps_what_was_written(tmp_path: Path, monkeypatch) -> None:
    replace = os.replace

    def no_space_for_exports(source, target):  # noqa: ANN001, ANN202
        if Path(target).name == EXPORT_WEIGHTS:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(target))
        return replace(source, target)

    monkeypatch.setattr(files.os, "replace", no_space_for_exports)
    with pytest.raises(DiskFullError, match=rf"no space left to write .*{EXPORT_WEIGHTS}.*Fix: free disk space"):
        run(compose_config(tmp_path, *SMOKE, "export=true"))
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "failed" and results["error"].startswith("DiskFullError: no space left")
    assert "calibrate" in results["times"] and not list(tmp_path.glob("*.tmp")), "no partial file is left"


@needs_fashion_mnist
def test_saved_units_keep_their_curves_and_a_state_without_fingerprint_is_refused(tmp_path: Path) -> None:
    seen: dict[str, list[str]] = {}

    def look(unit: str, step: int, terms: dict[str, float], total: int) -> None:
        if unit == "blocks.1" and step == 0:  # embed and blocks.0 are saved: their curves must be on disk already
            seen["curves"] = list(json.loads((tmp_path / RECON_CURVES).read_text()))
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(small_cfg(tmp_path), look)
    assert seen["curves"] == ["embed", "blocks.0"]
    manifest_path = tmp_path / RECON_STATE / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    del manifest["fingerprint"]
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ConfigError, match=r"lacks its fingerprint.*Fix: delete"):
        run(small_cfg(tmp_path, "resume=true"))


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` grey pixels (and holds almost none)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_an_image_claiming_too_many_pixels_is_one_data_error(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(40_000, 40_000))
    with pytest.raises(DataError, match=r"bomb.png claims more pixels than PIL decodes.*Fix: delete or downscale"):
        ImageFiles([(str(bomb), 0)])[0]
