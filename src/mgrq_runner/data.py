"""Data sets: ImageNet folders with the fixed 1000-class map, your own class folders, Fashion-MNIST, calibration
sampling (seeded, or a list of images), transforms.

Every data set here yields ``(image_tensor, label)`` pairs. Calibration sets are seeded random subsets of the
train split; their identifiers (file paths or indices) are returned so a run can save them.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import logging
import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from mgrq_runner.errors import ConfigError, DataError
from mgrq_runner.files import file_sha256, read_bytes, read_text
from mgrq_runner.rundir import CLASS_LIST

if TYPE_CHECKING:
    from mgrq_runner.settings import DataSettings

log = logging.getLogger(__name__)

FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")  # torchvision's


@dataclass
class DataBundle:
    """What the pipeline needs from a data set.

    Attributes:
        calibration: the calibration images (a seeded subset of the train split).
        evaluation: the evaluation split (or a seeded subset of it).
        calibration_ids: one identifier per calibration image (file path or split index).
        num_classes: number of classes of the data set.
        class_names: ``data=folder``: the class names in label order.
        calibration_digest: computes the calibration images' identity (``_calibration_digest``) when ``identity``
            is first asked for: a run's record and resume need it, ``mode=eval`` does not read the files for it.
    """

    calibration: Dataset
    evaluation: Dataset
    calibration_ids: list[str]
    num_classes: int
    class_names: list[str] | None = None  # a folder data set's classes in label order (saved in the run dir)
    calibration_digest: Callable[[], str] | None = field(default=None, repr=False)

    @functools.cached_property
    def identity(self) -> dict[str, Any]:
        """What the calibration set and the labels are, for results.json, resume and export manifests."""
        return {
            "calibration_sha256": self.calibration_digest() if self.calibration_digest is not None else None,
            "num_classes": self.num_classes,
            "classes": self.class_names,
        }


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path) -> torch.Tensor:
    """Reads one gzip-compressed IDX file (the MNIST format) into a uint8 tensor."""
    fix = "reinstall it (apt-get install --reinstall dataset-fashion-mnist) or point data.root at a good copy"
    compressed = read_bytes(path, "Fashion-MNIST file", fix)  # a folder or a pipe there: refused by kind
    try:
        raw = gzip.decompress(compressed)
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
        data = torch.frombuffer(bytearray(raw[4 + 4 * ndim :]), dtype=torch.uint8)
        return data.reshape(dims)
    except (OSError, EOFError, zlib.error, ValueError, RuntimeError, struct.error) as err:
        raise DataError(f"corrupt Fashion-MNIST file {path}: {err}. Fix: {fix}.") from err


def _download_fashion_mnist(cache_dir: Path) -> Path:
    """Downloads Fashion-MNIST with torchvision (needs a network); returns the folder of the .gz files."""
    from torchvision.datasets import FashionMNIST

    try:
        FashionMNIST(str(cache_dir), train=True, download=True)
        FashionMNIST(str(cache_dir), train=False, download=True)
    except Exception as err:  # any network or file failure means: not available here
        raise DataError(
            f"Fashion-MNIST was not found and could not be downloaded ({type(err).__name__}). "
            "Fix: apt-get install dataset-fashion-mnist (files in /usr/share/datasets/fashion-mnist/), "
            "or set data.root to a folder holding train-images-idx3-ubyte.gz and the three other files."
        ) from err
    return cache_dir / "FashionMNIST" / "raw"


def load_fashion_mnist(root: str | Path, split: str, download_dir: str | Path | None = None) -> TensorDataset:
    """Loads a Fashion-MNIST split as normalised ``[N, 1, 28, 28]`` float images and int64 labels.

    Args:
        root: folder holding the four ``*-ubyte.gz`` files (the Debian package's layout).
        split: ``train`` (60 000 images) or ``test`` (10 000 images).
        download_dir: where torchvision may download the files when ``root`` lacks them; ``None`` disables it.
    """
    if split not in FASHION_MNIST_FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}. Fix: use 'train' or 'test'.")
    folder = Path(root)
    image_file, label_file = FASHION_MNIST_FILES[split]
    if not (folder / image_file).exists():
        if download_dir is None:
            raise DataError(
                f"Fashion-MNIST files not found in {folder}. Fix: apt-get install dataset-fashion-mnist, "
                "or set data.root to the folder holding the *-ubyte.gz files."
            )
        folder = _download_fashion_mnist(Path(download_dir).expanduser())
    images = _read_idx(folder / image_file)
    labels = _read_idx(folder / label_file).long()
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise DataError(
            f"malformed Fashion-MNIST files in {folder}: images {tuple(images.shape)}, labels "
            f"{tuple(labels.shape)}. Fix: reinstall dataset-fashion-mnist."
        )
    mean, std = FASHION_MNIST_MEAN[0], FASHION_MNIST_STD[0]
    normalised = (images.float().div_(255.0).sub_(mean).div_(std)).unsqueeze(1)
    return TensorDataset(normalised, labels)


# ---------------------------------------------------------------------------------------------- ImageNet


def imagenet_wnids() -> list[str]:
    """The 1000 ImageNet-1k WordNet ids in class-index order (the order every timm model was trained with)."""
    from timm.data import ImageNetInfo

    return list(ImageNetInfo("imagenet-1k").label_names())


IGNORED_FOLDERS = ("__MACOSX",)  # besides hidden ones (.ipynb_checkpoints, .DS_Store ...): tools leave these


def _listing(folder: Path) -> list[Path]:
    try:
        return sorted(folder.iterdir())
    except OSError as err:
        raise DataError(
            f"folder {folder} cannot be listed ({err.strerror}). Fix: make it readable (chmod a+rx)."
        ) from err


def class_folders(split_dir: Path) -> list[Path]:
    """The class folders of a split, in name order; hidden folders and tool leftovers are skipped."""
    return [
        p for p in _listing(split_dir) if p.is_dir() and not p.name.startswith(".") and p.name not in IGNORED_FOLDERS
    ]


def image_files(class_dir: Path) -> list[Path]:
    """The images of a class folder (by extension), in name order; hidden files are skipped."""
    return [p for p in _listing(class_dir) if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")]


class ImageFiles(Dataset):
    """Labelled image files, decoded to ``mode`` (``RGB`` or ``L``: grey, RGBA and palette images converted),
    then ``transform``."""

    def __init__(self, samples: list[tuple[str, int]], transform: Any = None, mode: str = "RGB") -> None:
        self.samples, self.transform, self.mode = samples, transform, mode

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        raw = read_bytes(Path(path), "image file", "make it a readable image file, or delete it")  # kind checked
        try:
            with Image.open(io.BytesIO(raw)) as img:
                image = img.convert(self.mode)
        except Image.DecompressionBombError as err:  # a header claiming more pixels than PIL will allocate
            raise DataError(
                f"image file {path} claims more pixels than PIL decodes ({err}). Fix: delete or downscale that file."
            ) from err
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DataError(f"corrupt image file {path} ({err}). Fix: delete or replace that file.") from err
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class ImageNetFolder(ImageFiles):
    """One split of an ImageNet tree, ``root/<split>/<wnid>/*.JPEG``, labelled with the fixed wnid map.

    Unlike ``torchvision.datasets.ImageFolder``, class indices come from the full 1000-class list, so a folder
    holding only some classes still scores against the right logits.
    """

    def __init__(self, root: str | Path, split: str, transform: Any = None) -> None:
        self.split_dir = Path(root) / split
        if not self.split_dir.is_dir():
            raise DataError(
                f"ImageNet split folder {self.split_dir} does not exist. Fix: data.root (or IMAGENET_ROOT) must "
                f"hold train/<wnid>/*.JPEG and val/<wnid>/*.JPEG."
            )
        class_index = {wnid: i for i, wnid in enumerate(imagenet_wnids())}
        samples: list[tuple[str, int]] = []
        for class_dir in class_folders(self.split_dir):
            if class_dir.name not in class_index:
                raise DataError(
                    f"{class_dir} is not an ImageNet-1k class folder (expected a wnid such as n01440764). "
                    "Fix: arrange the split as <split>/<wnid>/*.JPEG (val too: use a script that sorts val "
                    "images into wnid folders)."
                )
            label = class_index[class_dir.name]
            samples += [(str(p), label) for p in image_files(class_dir)]
        if not samples:
            raise DataError(
                f"no images found under {self.split_dir}. Fix: the layout must be {self.split_dir}/<wnid>/*.JPEG."
            )
        super().__init__(samples, transform)


# ---------------------------------------------------------------------------------------------- your own folders

CLASSES_FILE = "classes.txt"  # optional, at a folder data set's root: the class names in label order
EVAL_SPLIT_NAMES = ("val", "validation")


def folder_classes(root: Path) -> list[str]:
    """A folder data set's classes in label order: ``classes.txt`` (one name per line) when present, else the
    train split's class folders sorted by name (torchvision's ``ImageFolder`` order)."""
    listed = root / CLASSES_FILE
    if listed.exists() or listed.is_symlink():
        text = read_text(listed, CLASSES_FILE, f"one class name per line in label order, or remove {listed}")
        names = [line.strip() for line in text.splitlines() if line.strip()]
        if len(set(names)) != len(names) or not names:
            raise DataError(
                f"{listed} must list each class once, one per line. Fix: remove the repeated or empty list."
            )
        return names
    return [p.name for p in class_folders(folder_split_dir(root, "train"))]


def folder_split_dir(root: Path, split: str) -> Path:
    """``root/train``, or for the evaluation split ``root/val`` (or ``root/validation``)."""
    names = EVAL_SPLIT_NAMES if split == "val" else (split,)
    for name in names:
        if (root / name).is_dir():
            return root / name
    wanted = " or ".join(f"{root / n}/" for n in names)
    raise DataError(
        f"folder data set {root} has no {wanted}. Fix: data.root must hold train/<class>/* and val/<class>/*."
    )


class ImageFolder(ImageFiles):
    """One split of your own data set, ``root/<split>/<class>/<image>``, labelled by ``classes`` (their order).

    Args:
        root: the data set's folder (``train/``, ``val/`` or ``validation/``, optional ``classes.txt``).
        split: ``train`` or ``val``.
        classes: class names in label order (``folder_classes``).
        transform: applied to each decoded image.
        mode: ``RGB`` for 3-channel models, ``L`` for grey ones.
    """

    def __init__(self, root: Path, split: str, classes: list[str], transform: Any = None, mode: str = "RGB") -> None:
        split_dir = folder_split_dir(root, split)
        index = {name: i for i, name in enumerate(classes)}
        samples: list[tuple[str, int]] = []
        for class_dir in class_folders(split_dir):
            if class_dir.name not in index:
                raise DataError(
                    f"{class_dir} is not one of the data set's {len(classes)} classes ({_where_classes(root)}). "
                    f"Fix: rename or remove it, or list it in {root / CLASSES_FILE}."
                )
            files = image_files(class_dir)
            if not files:
                raise DataError(
                    f"class folder {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)}). Fix: add images "
                    "or remove the folder."
                )
            samples += [(str(p), index[class_dir.name]) for p in files]
        if not samples:
            raise DataError(f"no class folders under {split_dir}. Fix: the layout must be {split_dir}/<class>/<image>.")
        super().__init__(samples, transform, mode)


def _where_classes(root: Path) -> str:
    return f"listed in {CLASSES_FILE}" if (root / CLASSES_FILE).is_file() else "the train split's class folders"


def resolve_folder_root(root: str | None) -> Path:
    """Checks ``data.root`` of ``data=folder``."""
    if not root:
        raise DataError(
            "data=folder needs data.root. Fix: data.root=/path/to/dataset (train/<class>/*, val/<class>/*)."
        )
    path = Path(os.path.expanduser(str(root)))
    if not path.is_dir():
        what = "is a file, not a folder" if path.exists() else "does not exist"
        raise DataError(f"data.root {path} {what}. Fix: data.root=/path/to/dataset (train/<class>/*, val/<class>/*).")
    return path


def resolve_imagenet_root(root: str | None) -> Path:
    """Checks the ImageNet root given by ``data.root`` or ``IMAGENET_ROOT``."""
    if not root:
        raise DataError(
            "no ImageNet root given. Fix: pass data.root=/path/to/imagenet or set the IMAGENET_ROOT environment "
            "variable (layout train/<wnid>/*.JPEG, val/<wnid>/*.JPEG)."
        )
    path = Path(os.path.expanduser(root))
    if path.exists() and not path.is_dir():
        raise DataError(f"ImageNet root {path} is a file, not a folder. Fix: data.root=/path/to/imagenet (the folder).")
    if not path.is_dir():
        raise DataError(f"ImageNet root {path} does not exist. Fix: data.root=/path/to/imagenet or IMAGENET_ROOT.")
    return path


def resolved_data_config(model: torch.nn.Module, data: DataSettings) -> dict[str, Any]:
    """timm's preprocessing config for ``model`` (input size, crop_pct, interpolation, mean, std); the data
    settings that are not ``None`` override the model's own."""
    from timm.data import resolve_data_config

    overrides: dict[str, Any] = {
        key: getattr(data, key)
        for key in ("interpolation", "crop_pct", "mean", "std")
        if getattr(data, key) is not None
    }
    if data.img_size is not None:
        channels = resolve_data_config({}, model=model)["input_size"][0]
        overrides["input_size"] = (channels, data.img_size, data.img_size)
    return dict(resolve_data_config(overrides, model=model))


def create_transform(model: torch.nn.Module, data: DataSettings, training: bool = False) -> Any:
    """timm's transform for the preprocessing ``resolved_data_config`` gives."""
    from timm.data import create_transform as timm_create_transform

    return timm_create_transform(**resolved_data_config(model, data), is_training=training)


# ---------------------------------------------------------------------------------------------- sampling


def seeded_subset(dataset: Dataset, num: int, seed: int, what: str) -> tuple[Subset, list[int]]:
    """A random subset of ``num`` items drawn with ``seed``; indices sorted for reproducible file order."""
    total = len(dataset)  # type: ignore[arg-type]
    if num > total:
        raise DataError(
            f"{what} asks for {num} images but the split holds only {total}. Fix: lower the count (at most {total})."
        )
    if num <= 0:
        raise DataError(f"{what} must be positive, got {num}.")
    generator = torch.Generator().manual_seed(seed)
    indices = sorted(torch.randperm(total, generator=generator)[:num].tolist())
    return Subset(dataset, indices), indices


def listed_subset(train: Dataset, keys: list[str], entries: Sequence[str], key_of: Any) -> tuple[Subset, list[int]]:
    """The train images ``entries`` name, in the list's order: ``key_of(entry)`` must equal one of ``keys`` (one
    per train image)."""
    position = {key: i for i, key in enumerate(keys)}
    indices = []
    for line, entry in enumerate(entries, start=1):
        index = position.get(key_of(entry))
        if index is None:
            raise DataError(
                f"calib.list line {line}: {entry!r} is not an image of the train split. Fix: list train images "
                "(file paths, absolute or relative to data.root; train[i] or i for Fashion-MNIST)."
            )
        indices.append(index)
    if len(set(indices)) != len(indices):
        raise DataError("calib.list names an image more than once. Fix: list each calibration image once.")
    return Subset(train, indices), indices


def _fashion_key(entry: str) -> str:
    return entry if entry.startswith("train[") else f"train[{entry}]"


def _path_key(root: Path) -> Any:
    def key(entry: str) -> str:
        path = Path(os.path.expanduser(entry))
        if not path.is_absolute() and not path.exists():
            path = root / path
        return os.path.realpath(path)

    return key


HELDOUT_SEED = 20240613  # one fixed slice of train for every run, so that tuning trials compare like with like


def heldout_subset(train: Dataset, size: int, calibration: list[int]) -> Subset:
    """``size`` train images outside the calibration set: a slice for tuning that is never the evaluation split."""
    calibration_set = set(calibration)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(HELDOUT_SEED)).tolist()  # type: ignore[arg-type]
    candidates = [i for i in order if i not in calibration_set]
    if not 0 < size <= len(candidates):
        raise DataError(
            f"data.heldout_size={size} but the train split has {len(candidates)} images besides the calibration set. "
            f"Fix: 0 < data.heldout_size <= {len(candidates)}."
        )
    return Subset(train, sorted(candidates[:size]))


def build_data(
    data: DataSettings, model: torch.nn.Module, num_calib: int, seed: int, calib_list: Sequence[str] | None = None
) -> DataBundle:
    """Builds the calibration and evaluation sets named by ``data`` for ``model``.

    Calibration: ``num_calib`` train images drawn with ``seed``, or exactly the images of ``calib_list``
    (``files.read_calibration_list``), in its order. ``data.eval_split``: ``val`` evaluates on the data set's evaluation
    split (ImageNet val, Fashion-MNIST test, a folder's val/); ``heldout`` on ``data.heldout_size`` train images
    outside the calibration set (for tuning loss weights).
    """
    if data.name == "in_memory":
        raise ConfigError(
            "data=in_memory is the Python API's (mgrq_runner.quantize is handed its images); mgrq-run has no files "
            "to read there. Fix: data=imagenet, data=folder or data=fashion_mnist."
        )
    heldout = data.eval_split == "heldout"
    class_names = None
    if data.name == "fashion_mnist":
        train: Dataset = load_fashion_mnist(data.root, "train", data.download_dir)
        evaluation: Dataset = train if heldout else load_fashion_mnist(data.root, "test", data.download_dir)
        train_keys, key_of = lambda: [f"train[{i}]" for i in range(len(train))], _fashion_key  # type: ignore[arg-type]
        num_classes = 10
    else:
        calib_transform = create_transform(model, data, training=data.calib_transform == "train")
        eval_transform = create_transform(model, data)
        if data.name == "imagenet":
            root = resolve_imagenet_root(data.root)
            train = ImageNetFolder(root, "train", calib_transform)
            evaluation = ImageNetFolder(root, "train" if heldout else "val", eval_transform)
            num_classes = 1000
        else:
            root = resolve_folder_root(data.root)
            class_names = folder_classes(root)
            mode = "L" if resolved_data_config(model, data)["input_size"][0] == 1 else "RGB"
            train = ImageFolder(root, "train", class_names, calib_transform, mode)
            evaluation = ImageFolder(root, "train" if heldout else "val", class_names, eval_transform, mode)
            num_classes = len(class_names)
        train_keys, key_of = lambda: [os.path.realpath(path) for path, _ in train.samples], _path_key(root)
    if calib_list is None:
        calibration, indices = seeded_subset(train, num_calib, seed, "calib.num_images")
    else:
        calibration, indices = listed_subset(train, train_keys(), calib_list, key_of)  # keys only when listed
    ids = [f"train[{i}]" for i in indices] if data.name == "fashion_mnist" else [train.samples[i][0] for i in indices]
    digest = functools.partial(_calibration_digest, train, indices, None if data.name == "fashion_mnist" else root)
    if heldout:
        evaluation = heldout_subset(evaluation, data.heldout_size, indices)
    if data.num_eval is not None:
        evaluation, _ = seeded_subset(evaluation, data.num_eval, seed, "data.num_eval")
    return DataBundle(calibration, evaluation, ids, num_classes, class_names, digest)


def _calibration_digest(train: Dataset, indices: list[int], root: Path | None) -> str:
    """SHA-256 over the calibration images in order: each one's name and bytes (an image file's name relative to
    ``root``; a Fashion-MNIST image's split index and pixels). A moved copy of the same tree gives the same digest;
    another tree, or the same names with other contents, does not."""
    digest = hashlib.sha256()
    for index in indices:
        if root is None:
            image, label = train[index]
            digest.update(f"train[{index}]:{int(label)}\n".encode())
            digest.update(image.numpy().tobytes())
        else:
            path, label = train.samples[index]  # type: ignore[attr-defined]
            digest.update(f"{os.path.relpath(path, root)}:{label}\n".encode())
            try:
                digest.update(file_sha256(Path(path)).encode())
            except OSError as err:
                raise DataError(f"image file {path} cannot be read ({err.strerror}). Fix: check the file.") from err
    return digest.hexdigest()


def create_loader(dataset: Dataset, batch_size: int, workers: int = 0) -> DataLoader:
    """A deterministic (unshuffled) loader; ``workers`` decoding processes, at most one per core."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=min(workers, os.cpu_count() or 1),
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )


def check_classes(model: torch.nn.Module, name: str, bundle: DataBundle, data: DataSettings) -> None:
    """The model ``name`` predicts the data set's classes (a folder data set: as many as it has)."""
    if model.num_classes != bundle.num_classes and data.name == "folder":
        raise ConfigError(
            f"model {name} predicts {model.num_classes} classes but the folder data set {data.root} "
            f"has {bundle.num_classes}. Fix: model.num_classes={bundle.num_classes} with model.checkpoint=<the "
            f"checkpoint fine-tuned on these classes>, or check data.root (classes: {CLASS_LIST} in the run dir)."
        )
    if model.num_classes != bundle.num_classes:
        raise ConfigError(
            f"model {name} predicts {model.num_classes} classes but data {data.name} has "
            f"{bundle.num_classes}. Fix: pick the model with a preset of its data set (model=deit_s, "
            f"model=timm model.name=<timm arch.tag> for ImageNet; model=proxy_vit for Fashion-MNIST), "
            f"or override data=."
        )


def check_export_classes(manifest: dict[str, Any], bundle: DataBundle, checkpoint: Path) -> None:
    """The evaluation data's classes, in label order, are the ones the export was calibrated with (a folder data
    set numbers its classes by its own folders or classes.txt: another order scores at chance)."""
    exported, mine = (manifest.get("data_identity") or {}).get("classes"), bundle.class_names
    if exported is None or mine is None or exported == mine:  # a built-in data set's labels carry no names
        return
    first = next(i for i in range(max(len(exported), len(mine))) if exported[i : i + 1] != mine[i : i + 1])
    there, here = (names[first] if first < len(names) else "none" for names in (exported, mine))
    raise ConfigError(
        f"the data's classes are not those {checkpoint} was exported with (label {first}: {there} there, {here} "
        f"here). Fix: data.root=<the tree it was made on>, or put the export's {CLASS_LIST} (in {checkpoint}) at "
        "the data root."
    )
