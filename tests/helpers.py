"""Test data shared by several test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}


def write_colour_folder(root: Path, per_class: int = 30) -> Path:
    """Classes that a pretrained backbone can tell apart: noisy 32x32 images of one dominant colour each."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        for k in range(per_class):
            img = np.clip(np.array(rgb) + rng.normal(0, 40, size=(32, 32, 3)), 0, 255).astype(np.uint8)
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / name / f"{k:03d}.png")
    return root
