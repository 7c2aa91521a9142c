"""Test data shared by several test modules (imported as ``helpers``; pytest puts tests/ on sys.path)."""

from __future__ import annotations

import importlib.util
import socket
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import yaml
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench_script(name: str) -> ModuleType:
    """The module of ``bench/<name>.py`` (bench scripts are not a package), executed once per call. bench/ goes on
    sys.path, as when the script runs, so that scripts can import each other."""
    if str(BENCH) not in sys.path:
        sys.path.append(str(BENCH))
    spec = importlib.util.spec_from_file_location(f"{name}_script", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


def write_tiny_config(path: Path, images: Path, cache: Path, name: str, **sections: dict) -> Path:
    """YAML config of a run small enough for a test on a colour folder: 8-bit codes (M = 2, K = 16), 32-px backbone
    input, a 2-level hierarchy after one epoch; ``sections`` ({"train": {...}, ...}) add to or override it."""
    cfg: dict = {
        "base": "cifar10-ii-16",
        "name": name,
        "data": {"dataset": "folder", "root": str(images)},
        "backbone": {"resolution": 32},
        "features": {"batch_size": 32, "num_workers": 0, "cache_dir": str(cache)},
        "quantizer": {"bits": 8, "n_codewords": 16, "feature_dim": 8},
        # no feature dropout: a few epochs on a few dozen images are too short to average its noise out
        "projector": {"hidden": 64, "dropout": 0.0},
        "hierarchy": {"levels": [6, 3], "warmup_epochs": 1},
        "eval": {"topk": 20},
    }
    for section, values in sections.items():
        cfg[section] = {**cfg.get(section, {}), **values}
    path.write_text(yaml.safe_dump(cfg))
    return path


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server or a torchrun rendezvous started by a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_head_config(*overrides: str):
    """cifar10-ii-16 shrunk to an 8-bit, 16-codeword head that trains on small synthetic features in seconds."""
    from hihpq.config import load_config

    base = [
        "quantizer.n_codewords=16",
        "quantizer.bits=8",
        "quantizer.feature_dim=8",
        "projector.hidden=32",
        "projector.dropout=0",  # as write_tiny_config: runs of seconds
        "train.batch_size=32",
        "hierarchy.levels=[8, 4]",
        "hierarchy.warmup_epochs=1",
    ]
    return load_config("cifar10-ii-16", [*base, *overrides])


def noisy_views(n: int = 96, dim: int = 24, n_views: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Synthetic cached features: (n, dim) clean rows and (n, n_views, dim) noisy copies, float16 as the cache."""
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(n, dim))
    views = clean[:, None, :] + 0.3 * rng.normal(size=(n, n_views, dim))
    return clean.astype(np.float16), views.astype(np.float16)


def tiny_head_trainer(tmp_path: Path, *overrides: str, out_dir: Path | None = None, in_dim: int = 24):
    """A Trainer of :func:`tiny_head_config` (with ``overrides``) for features of width ``in_dim``, seeded."""
    import torch

    from hihpq.build import build_loss, build_model, train_settings
    from hihpq.train import Trainer

    cfg = tiny_head_config(f"features.cache_dir={tmp_path}", *overrides)
    torch.manual_seed(0)
    return Trainer(build_model(cfg, in_dim), build_loss(cfg), train_settings(cfg, progress=False), out_dir=out_dir)


def resume_matches_uninterrupted(make_trainer, source, tmp_path: Path, monkeypatch):
    """Train ``make_trainer(out_dir)`` through, and again with Ctrl-C then resume (:func:`resumed_after_ctrl_c`);
    assert the two models are bit-identical. Returns (uninterrupted, resumed) trainers."""
    import torch

    whole = make_trainer(tmp_path / "whole")
    whole.fit(source)
    rest = resumed_after_ctrl_c(lambda: make_trainer(tmp_path / "part"), source, monkeypatch)
    for a, b in zip(rest.model.state_dict().values(), whole.model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    return whole, rest


def resumed_after_ctrl_c(make_trainer, source, monkeypatch, epoch: int = 2):
    """Train ``make_trainer()`` until Ctrl-C in epoch index ``epoch``, then a fresh ``make_trainer()`` resumes
    from its checkpoint to the end: the resumed trainer (make_trainer must give both the same out_dir)."""
    import pytest

    from hihpq.train import Trainer

    original = Trainer._train_step

    def interrupt(self, *args):
        if self.epoch == epoch:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", interrupt)
    with pytest.raises(KeyboardInterrupt):
        make_trainer().fit(source)
    monkeypatch.setattr(Trainer, "_train_step", original)
    resumed = make_trainer()
    resumed.fit(source, resume=True)
    return resumed
