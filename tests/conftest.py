"""Shared test fixtures: tiny generated image datasets (no downloads, no files from outside the tree)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def write_image(path: Path, rng: np.random.Generator, size: tuple[int, int] = (16, 16)) -> Path:
    """Write a small random RGB image; the format follows the suffix (.jpg, .png, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def write_image_folder(
    root: Path,
    classes: Sequence[str] = ("cat", "dog", "ship"),
    per_class: int = 4,
    *,
    size: tuple[int, int] = (16, 16),
    seed: int = 0,
) -> Path:
    """``root/<class>/<k>.{jpg,png}`` with ``per_class`` random images per class (JPEG and PNG mixed)."""
    rng = np.random.default_rng(seed)
    for cls in classes:
        for k in range(per_class):
            write_image(root / cls / f"{k:03d}.{'png' if k % 2 else 'jpg'}", rng, size)
    return root


@pytest.fixture
def make_image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_image_folder(name="images", classes=..., per_class=..., size=..., seed=...)`` writes an
    image folder (one sub-folder per class) under the test's tmp_path and returns its root."""

    def make(name: str = "images", **kwargs) -> Path:
        return write_image_folder(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def image_folder(make_image_folder: Callable[..., Path]) -> Path:
    """A tiny image folder: 3 classes (cat, dog, ship) x 4 random 16x16 images (JPEG and PNG)."""
    return make_image_folder()


@pytest.fixture
def cifar_like_folder(tmp_path: Path) -> Path:
    """A miniature CIFAR-10-style copy: ``cifar10-jpeg/{train,test}/<class>/NNNN.jpg``, 10 classes,
    6 train + 2 test images per class (8 per class pooled), 8x8 pixels. Returns the ``cifar10-jpeg`` dir."""
    root = tmp_path / "data" / "cifar10-jpeg"
    rng = np.random.default_rng(1)
    classes = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
    for part, n in (("train", 6), ("test", 2)):
        for cls in classes:
            for k in range(n):
                write_image(root / part / cls / f"{k:04d}.jpg", rng, (8, 8))
    return root


@pytest.fixture(autouse=True, scope="session")
def _runtime_dir(tmp_path_factory: pytest.TempPathFactory):
    """Backbone exports (hihpq.models.runtime) go to one folder per test session: exported once per session,
    never into the user's cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("HIHPQ_RUNTIME_DIR", str(tmp_path_factory.mktemp("runtimes")))
    yield
    mp.undo()


@pytest.fixture(scope="session")
def served_index(tmp_path_factory):
    """A tiny trained run on generated photos and the index of those photos (for the search service tests):
    (folder, images folder, run dir, index file). Item paths in the index are absolute."""
    from helpers import write_colour_folder, write_tiny_config
    from hihpq.cli import main

    root = tmp_path_factory.mktemp("served")
    images = write_colour_folder(root / "photos", per_class=8)
    config = write_tiny_config(  # no labels: trained as a user trains on a folder of photos (--images)
        root / "tiny.yaml",
        images,
        root / "cache",
        "served",
        features={"n_views": 2},
        train={"epochs": 4, "batch_size": 24},
        hierarchy={"levels": [4, 2], "warmup_epochs": 1},
    )
    run = root / "run"
    assert main(["train", str(config), "--images", str(images), "--out", str(run)]) == 0
    index = root / "photos.hpq"
    assert main(["encode", str(run), "--images", str(images.resolve()), "--out", str(index)]) == 0
    return root, images, run, index
