"""Writes Fashion-MNIST out as an image-folder data set (``data=folder``), and translates calibration lists.

    python scripts/fashion_mnist_to_folder.py /tmp/fmnist                       # train/ and val/ as PNG
    python scripts/fashion_mnist_to_folder.py /tmp/fmnist --convert-list RUN/calibration_images.txt cal.txt

The tree: ``train/<class>/<i>.png`` for train image ``i`` (60 000) and ``val/<class>/<i>.png`` for test image
``i`` (10 000), 8-bit grey PNG (lossless), class folders named after the Fashion-MNIST classes, and
``classes.txt`` listing them in label order (sorted folder names would number them differently).
``--convert-list`` turns a built-in run's ``calibration_images.txt`` (``train[i]``) into the same images' paths
in the tree, for ``calib.list=`` of a ``data=folder`` run: both runs then calibrate on the same images.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ["T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle_boot"]
SPLITS = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "val": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def image_path(out: Path, split: str, label: int, index: int) -> Path:
    return out / split / CLASSES[label] / f"{index:05d}.png"


def write_tree(source: Path, out: Path, limit: int | None = None) -> None:
    for split, (image_file, label_file) in SPLITS.items():
        images, labels = read_idx(source / image_file)[:limit], read_idx(source / label_file)[:limit]
        for name in CLASSES:
            (out / split / name).mkdir(parents=True, exist_ok=True)
        for index, (pixels, label) in enumerate(zip(images, labels, strict=True)):
            Image.fromarray(pixels, mode="L").save(image_path(out, split, int(label), index))
        print(f"{split}: {len(images)} images")
    (out / "classes.txt").write_text("\n".join(CLASSES) + "\n")


def convert_list(source: Path, out: Path, built_in: Path, target: Path) -> None:
    labels = read_idx(source / SPLITS["train"][1])
    lines = []
    for entry in built_in.read_text().split():
        if not (entry.startswith("train[") and entry.endswith("]")):
            raise SystemExit(f"{built_in}: {entry!r} is not a built-in Fashion-MNIST id (train[i])")
        index = int(entry[len("train[") : -1])
        lines.append(str(image_path(out, "train", int(labels[index]), index)))
    target.write_text("\n".join(lines) + "\n")
    print(f"{target}: {len(lines)} images")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the data set folder to write (or that was written)")
    parser.add_argument("--source", type=Path, default=ROOT, help="the Fashion-MNIST *-ubyte.gz files")
    parser.add_argument("--convert-list", nargs=2, type=Path, metavar=("BUILT_IN", "TARGET"))
    parser.add_argument("--limit", type=int, help="write only the first LIMIT images of each split (tests)")
    args = parser.parse_args()
    out = args.out.resolve()
    if args.convert_list:
        convert_list(args.source, out, *args.convert_list)
    else:
        write_tree(args.source, out, args.limit)


if __name__ == "__main__":
    main()
