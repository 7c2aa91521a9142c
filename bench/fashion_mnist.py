"""Write Debian's Fashion-MNIST (package ``dataset-fashion-mnist``) as an image folder for ``data.dataset=folder``.

The second dataset of the defaults study (defaults are chosen on training data and a dataset other than the
benchmark's). Reads the four idx files (gzip) that ``apt-get install -y dataset-fashion-mnist`` puts under
/usr/share/datasets/fashion-mnist (``dpkg -L dataset-fashion-mnist`` lists them), checks their headers, and writes
all 70,000 28x28 greyscale images as PNG into one sub-folder per class (train and test pooled: the folder protocol
draws its own seeded queries / training set):

    <out>/<NN-class name>/<split>-<NNNNN>.png      default out: ~/.cache/hihpq/fashion-mnist

Then the second-dataset grid (configs fashion-mnist-16/32/64; README: Benchmarks):

    hihpq bench --protocol fashion-mnist --methods pq opq itq float hihpq --bits 16 32 64 --seeds 1 2 3 \
        --data ~/.cache/hihpq/fashion-mnist --out bench/results/fashion_mnist_lite0.json

Files are written to a temporary folder beside ``out`` and renamed into place at the end, so an interrupted run
leaves no half-written dataset; an existing complete folder is left alone unless ``--force``.
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import struct
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
DEFAULT_OUT = Path("~/.cache/hihpq/fashion-mnist").expanduser()
CLASSES = ("t-shirt-top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot")
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10000),
}


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (optionally gzip): magic 0x0000 08 <ndim>, big-endian int32 sizes, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: too short for an idx header ({len(data)} bytes)")
    zero, dtype, got_ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype != 0x08 or got_ndim != ndim:
        raise ValueError(f"{path}: not a uint8 idx file with {ndim} dimensions (header {data[:4].hex()})")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(f"{path}: {body.size} data bytes for shape {shape} (truncated or damaged file)")
    return body.reshape(shape)


def load_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    images_name, labels_name, n = FILES[split]
    images, labels = read_idx(source / images_name, 3), read_idx(source / labels_name, 1)
    if images.shape != (n, 28, 28) or labels.shape != (n,):
        raise ValueError(f"{split}: expected {n} images of 28x28 and {n} labels, got {images.shape} / {labels.shape}")
    if labels.max() >= len(CLASSES):
        raise ValueError(f"{split}: label {labels.max()} outside the 10 Fashion-MNIST classes")
    return images, labels


def write_folder(source: Path, out: Path, *, force: bool = False) -> int:
    """Write every image as PNG into class folders under ``out``; returns the number of images written."""
    missing = [name for imgs, lbls, _ in FILES.values() for name in (imgs, lbls) if not (source / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{source} lacks {', '.join(missing)}: install Debian's dataset with "
            "`apt-get install -y dataset-fashion-mnist` (`dpkg -L dataset-fashion-mnist` shows where it is) "
            "or pass --source DIR"
        )
    if out.exists():
        if not force:
            print(f"{out} exists; leaving it (pass --force to rewrite it)")
            return 0
    splits = {split: load_split(source, split) for split in FILES}  # all checked before anything is written
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        folders = [tmp / f"{k:02d}-{name}" for k, name in enumerate(CLASSES)]
        for folder in folders:
            folder.mkdir()
        n = 0
        for split, (images, labels) in splits.items():
            for i, (img, label) in enumerate(zip(images, labels, strict=True)):
                Image.fromarray(img).save(folders[label] / f"{split}-{i:05d}.png", optimize=False)
                n += 1
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help=f"idx files (default {DEFAULT_SOURCE})")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"image folder to write (default {DEFAULT_OUT})")
    ap.add_argument("--force", action="store_true", help="rewrite an existing output folder")
    args = ap.parse_args(argv)
    try:
        n = write_folder(args.source, args.out.expanduser(), force=args.force)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if n:
        print(f"wrote {n} images in {len(CLASSES)} class folders under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
