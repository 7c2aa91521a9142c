"""bench/fashion_mnist.py: idx files -> class folders of PNG images that the folder dataset reads back."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from helpers import load_bench_script
from hihpq.data import ImageFolderDataset


@pytest.fixture
def fm(monkeypatch):
    mod = load_bench_script("fashion_mnist")
    monkeypatch.setattr(
        mod,
        "FILES",
        {"train": ("tr-img.gz", "tr-lbl.gz", 6), "test": ("te-img.gz", "te-lbl.gz", 3)},
    )
    return mod


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def _source(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    src = tmp_path / "idx"
    src.mkdir()
    data = {}
    for split, n in (("tr", 6), ("te", 3)):
        imgs = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 3 + (0 if split == "tr" else 7)
        _write_idx(src / f"{split}-img.gz", imgs)
        _write_idx(src / f"{split}-lbl.gz", labels)
        data[split] = (imgs, labels)
    return src, data


def test_writes_class_folders_that_the_folder_dataset_reads_back(tmp_path, fm):
    src, data = _source(tmp_path)
    out = tmp_path / "out"
    assert fm.write_folder(src, out) == 9
    ds = ImageFolderDataset(out)
    assert len(ds) == 9
    png = out / f"08-{fm.CLASSES[8]}" / "test-00001.png"  # label 7 + 1 % 3 = 8
    from PIL import Image

    np.testing.assert_array_equal(np.asarray(Image.open(png)), data["te"][0][1])
    assert sorted(p.name for p in out.iterdir()) == [f"{k:02d}-{c}" for k, c in enumerate(fm.CLASSES)]
    assert fm.write_folder(src, out) == 0  # an existing folder is left alone without --force
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out-")]  # no temporary left behind


def test_missing_or_damaged_files_are_clear_errors(tmp_path, fm):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist"):
        fm.write_folder(tmp_path, tmp_path / "out")
    src, _ = _source(tmp_path)
    raw = gzip.decompress((src / "tr-img.gz").read_bytes())
    (src / "tr-img.gz").write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match="truncated"):
        fm.write_folder(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()
