"""Feature cache: keying, reuse, atomicity, resume, float16 memmaps, clean and augmented extraction."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from hihpq.data.feature_cache import (
    CacheBusyError,
    CacheWriter,
    FeatureCache,
    cache_key,
    extract_clean_features,
    extract_view_features,
)
from hihpq.data.folders import ImageFolderDataset
from hihpq.data.transforms import AugmentConfig, eval_transform
from hihpq.models import build_backbone
from hihpq.models.backbones import Backbone


def _clean(*args, **kwargs):
    """extract_clean_features decoding in-process (workers are tested once, below)."""
    kwargs.setdefault("num_workers", 0)
    return extract_clean_features(*args, **kwargs)


def _views(*args, **kwargs):
    kwargs.setdefault("num_workers", 0)
    return extract_view_features(*args, **kwargs)


SPEC = {"features": ((6, 4), np.float16), "valid": ((6,), np.bool_)}


class TinyBackbone(Backbone):
    """A frozen 3->5 conv + global pool: (B, 3, H, W) -> (B, 5); counts forward calls."""

    name = "tiny"
    feature_dim = 5
    mean = (0.5, 0.5, 0.5)
    std = (0.25, 0.25, 0.25)
    default_resolution = 16

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 5, 3)
        self.weights_id = f"tiny:{seed}"
        self.calls = 0
        self.set_trainable(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(x).relu().mean(dim=(2, 3))


def _fill(value: float):
    """A compute function that writes rows with ``value + row`` and records how it was called."""
    calls = []

    def compute(writer: CacheWriter) -> None:
        calls.append(writer.start)
        feats = writer.arrays["features"]
        for row in range(writer.start, writer.n_rows):
            feats[row] = value + row + np.linspace(0, 1, feats.shape[1])
            writer.arrays["valid"][row] = True
            writer.commit(row + 1)
        writer.info["note"] = "done"

    compute.calls = calls
    return compute


# -- keying ----------------------------------------------------------------------------------------------


def test_cache_key_is_canonical_and_sensitive():
    base = {"dataset": {"root": "/x", "n": 3}, "resolution": 112, "views": 4, "scale": (0.5, 1.0)}
    same = {"scale": [0.5, 1.0], "views": 4, "resolution": 112, "dataset": {"n": 3, "root": "/x"}}
    assert cache_key(base) == cache_key(same)  # key order and tuple/list do not matter
    for change in (
        {"resolution": 224},
        {"views": 5},
        {"scale": (0.4, 1.0)},
        {"dataset": {"root": "/y", "n": 3}},
    ):
        assert cache_key({**base, **change}) != cache_key(base)
    with pytest.raises(TypeError, match="JSON"):
        cache_key({"x": object()})


# -- get_or_compute: reuse, recompute, memmap round trip -------------------------------------------------


def test_reuse_without_calling_compute(tmp_path):
    cache = FeatureCache(tmp_path)
    fields = {"what": "test", "seed": 1}
    compute = _fill(10.0)
    entry, computed = cache.get_or_compute(fields, compute, SPEC, name="t")
    assert computed and compute.calls == [0]
    assert isinstance(entry["features"], np.memmap) and entry["features"].dtype == np.float16
    expected = (10.0 + np.arange(6)[:, None] + np.linspace(0, 1, 4)).astype(np.float16)
    np.testing.assert_array_equal(entry["features"], expected)  # float16 round trip is exact
    assert entry["valid"].all() and entry.info == {"note": "done"}
    assert not entry["features"].flags.writeable

    again, computed = cache.get_or_compute(fields, _fail_if_called, SPEC, name="t")
    assert not computed and again.path == entry.path
    np.testing.assert_array_equal(again["features"], expected)
    assert [p.name for p in tmp_path.iterdir()] == [entry.path.name]  # no partial/lock left
    manifest = json.loads((entry.path / "manifest.json").read_text())
    assert manifest["fields"] == fields and manifest["arrays"]["features"] == {
        "shape": [6, 4],
        "dtype": "float16",
    }


def _fail_if_called(writer):
    raise AssertionError("compute_fn must not be called for a cached entry")


def test_changed_setting_recomputes(tmp_path):
    cache = FeatureCache(tmp_path)
    first = _fill(0.0)
    cache.get_or_compute({"seed": 1}, first, SPEC)
    second = _fill(100.0)
    entry, computed = cache.get_or_compute({"seed": 2}, second, SPEC)
    assert computed and second.calls == [0] and entry["features"][0, 0] == 100.0
    assert len(cache.entries()) == 2
    assert cache.lookup({"seed": 1})["features"][0, 0] == 0.0


def test_corrupt_entry_is_recomputed(tmp_path):
    cache = FeatureCache(tmp_path)
    entry, _ = cache.get_or_compute({"k": 1}, _fill(0.0), SPEC)
    path = entry.path / "features.npy"
    del entry
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated file
    assert cache.lookup({"k": 1}) is None
    compute = _fill(0.0)
    _, computed = cache.get_or_compute({"k": 1}, compute, SPEC)
    assert computed and compute.calls == [0]


def test_array_spec_validation(tmp_path):
    cache = FeatureCache(tmp_path)
    with pytest.raises(ValueError, match="same first dimension"):
        cache.get_or_compute({}, _fill(0), {"a": ((3, 2), np.float16), "b": ((4,), np.bool_)})
    with pytest.raises(ValueError, match="entry name"):
        cache.get_or_compute({}, _fill(0), SPEC, name="../x")


# -- atomicity and resume --------------------------------------------------------------------------------


def test_exception_leaves_no_entry_and_resumes(tmp_path):
    cache = FeatureCache(tmp_path)
    fields = {"k": "resume"}

    def crash_after_three(writer):
        for row in range(writer.start, 3):
            writer.arrays["features"][row] = row
            writer.arrays["valid"][row] = True
            writer.commit(row + 1)
        writer.info["partial"] = True
        raise KeyboardInterrupt  # e.g. the user pressed Ctrl-C

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_compute(fields, crash_after_three, SPEC)
    assert cache.lookup(fields) is None and cache.entries() == []
    partial = [p for p in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].name.endswith(".partial")
    assert not (partial[0] / "lock").exists()  # released

    compute = _fill(0.0)
    entry, computed = cache.get_or_compute(fields, compute, SPEC)
    assert computed and compute.calls == [3]  # resumed after the three committed rows
    np.testing.assert_array_equal(entry["features"][:3], np.repeat(np.arange(3.0), 4).reshape(3, 4))
    assert entry["features"][5, 0] == 5.0


def test_no_resume_starts_over(tmp_path):
    cache = FeatureCache(tmp_path)

    def crash(writer):
        writer.commit(2)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_compute({"k": 2}, crash, SPEC, resume=False)
    assert list(tmp_path.iterdir()) == []  # resume=False leaves nothing behind
    with pytest.raises(RuntimeError, match="boom"):
        cache.get_or_compute({"k": 2}, crash, SPEC)
    compute = _fill(0.0)
    cache.get_or_compute({"k": 2}, compute, SPEC, resume=False)
    assert compute.calls == [0]


def test_busy_and_stale_locks(tmp_path):
    cache = FeatureCache(tmp_path)
    fields = {"k": "lock"}
    _, _, partial = cache._dirs(fields, "features")
    partial.mkdir(parents=True)
    import socket

    host = socket.gethostname()
    (partial / "lock").write_text(json.dumps({"pid": os.getpid(), "host": host}))  # a live owner
    with pytest.raises(CacheBusyError, match="another process"):
        cache.get_or_compute(fields, _fill(0.0), SPEC)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (partial / "lock").write_text(json.dumps({"pid": int(dead.stdout), "host": host}))  # its owner is gone
    _, computed = cache.get_or_compute(fields, _fill(0.0), SPEC)
    assert computed and cache.lookup(fields) is not None


# -- extraction ------------------------------------------------------------------------------------------


@pytest.fixture
def folder_dataset(image_folder):
    return ImageFolderDataset(image_folder)


def test_clean_features_cached_and_reused(folder_dataset, tmp_path):
    model = TinyBackbone()
    cache = FeatureCache(tmp_path / "cache")
    idx = np.array([0, 5, 7, 11, 2])
    a = _clean(model, folder_dataset, idx, batch_size=2, cache=cache, progress=False)
    assert a.computed and a.features.shape == (5, 5) and a.features.dtype == np.float16
    assert a.valid.all() and a.n_skipped == 0 and np.array_equal(a.indices, idx)
    assert model.calls == 3  # ceil(5 / 2) batches
    # the rows are the features of the listed images, in order (reference: one image at a time)
    plain = _clean(model, folder_dataset, idx[::-1], batch_size=1, progress=False)
    np.testing.assert_allclose(plain.features[::-1], a.features, rtol=2e-3, atol=1e-3)
    calls = model.calls
    b = _clean(model, folder_dataset, idx, batch_size=4, cache=cache, progress=False)
    assert not b.computed and model.calls == calls and b.path == a.path
    np.testing.assert_array_equal(a.features, b.features)
    # any change of setting is another entry
    c = _clean(model, folder_dataset, idx, resolution=20, cache=cache, progress=False)
    d = _clean(TinyBackbone(seed=1), folder_dataset, idx, cache=cache, progress=False)
    e = _clean(model, folder_dataset, idx[:4], cache=cache, progress=False)
    assert c.computed and d.computed and e.computed and len({a.path, c.path, d.path, e.path}) == 4


def test_unreadable_image_is_skipped_counted_and_remembered(image_folder, tmp_path, caplog):
    (image_folder / "dog" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = ImageFolderDataset(image_folder)
    bad = ds.paths.index("dog/zz_broken.jpg")
    cache = FeatureCache(tmp_path / "cache")
    with caplog.at_level("WARNING"):
        out = _clean(TinyBackbone(), ds, cache=cache, batch_size=4, progress=False)
    assert out.n_skipped == 1 and not out.valid[bad] and out.valid.sum() == len(ds) - 1
    assert out.skipped == [str(image_folder.resolve() / "dog" / "zz_broken.jpg")]
    assert "skipped 1 unreadable images" in caplog.text and "zz_broken.jpg" in caplog.text
    again = _clean(TinyBackbone(), ds, cache=cache, progress=False)
    assert not again.computed and again.n_skipped == 1 and again.skipped == out.skipped


def test_view_features_deterministic(folder_dataset):
    model = TinyBackbone()
    aug = AugmentConfig(resolution=16)
    idx = np.arange(0, 12, 2)
    kw = {"n_views": 3, "augment": aug, "progress": False}
    a = _views(model, folder_dataset, idx, seed=0, batch_size=6, **kw)
    assert a.features.shape == (6, 3, 5) and a.features.dtype == np.float16
    b = _views(model, folder_dataset, idx, seed=0, batch_size=1, **kw)  # one image a batch
    np.testing.assert_allclose(a.features.astype(np.float32), b.features, rtol=2e-3, atol=1e-3)
    # view v of image i depends on (seed, i, v) only: a subset in another order gives the same rows
    sub = _views(model, folder_dataset, idx[[3, 1]], seed=0, **kw)
    np.testing.assert_allclose(sub.features.astype(np.float32), a.features[[3, 1]], rtol=2e-3, atol=1e-3)
    c = _views(model, folder_dataset, idx, seed=1, **kw)
    assert not np.allclose(a.features, c.features, atol=1e-2)
    assert not np.allclose(a.features[:, 0], a.features[:, 1], atol=1e-2)  # views differ


def test_view_features_same_with_workers(folder_dataset, tmp_path):
    model = TinyBackbone()
    kw = {"n_views": 2, "augment": AugmentConfig(resolution=16), "seed": 4, "progress": False}
    a = _views(model, folder_dataset, np.arange(8), num_workers=0, **kw)
    b = _views(model, folder_dataset, np.arange(8), num_workers=2, batch_size=4, **kw)
    np.testing.assert_allclose(a.features.astype(np.float32), b.features, rtol=2e-3, atol=1e-3)


def test_view_cache_keys(folder_dataset, tmp_path):
    model = TinyBackbone()
    cache = FeatureCache(tmp_path)
    kw = {"augment": AugmentConfig(resolution=16), "cache": cache, "progress": False}
    a = _views(model, folder_dataset, np.arange(4), n_views=2, seed=0, **kw)
    again = _views(model, folder_dataset, np.arange(4), n_views=2, seed=0, **kw)
    assert a.computed and not again.computed
    others = [
        _views(model, folder_dataset, np.arange(4), n_views=3, seed=0, **kw),
        _views(model, folder_dataset, np.arange(4), n_views=2, seed=1, **kw),
        _views(
            model,
            folder_dataset,
            np.arange(4),
            n_views=2,
            seed=0,
            cache=cache,
            progress=False,
            augment=AugmentConfig(resolution=16, blur_p=0.0),
        ),
    ]
    assert all(o.computed for o in others)
    assert len({a.path, *(o.path for o in others)}) == 4


class CountingBackbone(TinyBackbone):
    """Counts the views it encodes."""

    def __init__(self) -> None:
        super().__init__()
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return super().forward(x)


def test_more_views_extend_the_cached_ones(image_folder, tmp_path):
    """Asking for more views of cached images computes only the missing ones: the result is the views a fresh
    run gives (view v of image i depends on (seed, i, v) only), unreadable images stay invalid, and the larger
    set is cached for the next call."""
    (image_folder / "dog" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    ds = ImageFolderDataset(image_folder)
    idx = np.arange(len(ds))
    bad = ds.paths.index("dog/zz_broken.jpg")
    cache, model = FeatureCache(tmp_path / "cache"), CountingBackbone()
    kw = {"augment": AugmentConfig(resolution=16), "seed": 3, "progress": False, "batch_size": 6}
    two = _views(model, ds, idx, n_views=2, cache=cache, **kw)
    model.images = 0
    five = _views(model, ds, idx, n_views=5, cache=cache, **kw)
    assert five.computed and five.features.shape == (len(ds), 5, 5)
    assert model.images == 3 * len(ds)  # views 3-5 only
    fresh = _views(CountingBackbone(), ds, idx, n_views=5, **kw)
    np.testing.assert_allclose(five.features.astype(np.float32), fresh.features, rtol=2e-3, atol=1e-3)
    np.testing.assert_array_equal(five.features[:, :2], two.features)
    assert not five.valid[bad] and five.n_skipped == 1 and five.skipped == two.skipped
    again = _views(model, ds, idx, n_views=5, cache=cache, **kw)
    assert not again.computed and again.path == five.path
    np.testing.assert_array_equal(again.features, five.features)
    model.images = 0
    _views(model, ds, idx, n_views=6, cache=cache, **kw)
    assert model.images == len(ds)  # from the five views, the largest set cached
    other = _views(model, ds, idx[:-1], n_views=7, cache=cache, **kw)  # other images: nothing to extend
    assert other.computed and model.images == len(ds) * (1 + 7) - 7


def test_extraction_keeps_mode_and_needs_frozen_backbone(folder_dataset, tmp_path):
    model = TinyBackbone()
    model.train()
    _clean(model, folder_dataset, [0, 1], progress=False)
    assert model.training  # no hidden mode change
    model.set_trainable(True)
    with pytest.raises(ValueError, match="frozen backbone"):
        _clean(model, folder_dataset, [0, 1], cache=FeatureCache(tmp_path), progress=False)
    with pytest.raises(ValueError, match="indices"):
        _clean(model, folder_dataset, [0, 99], progress=False)
    with pytest.raises(ValueError, match="n_views"):
        _views(model, folder_dataset, [0], n_views=0, augment=AugmentConfig(), seed=0)


def test_efficientnet_extraction_end_to_end(folder_dataset, tmp_path):
    model = build_backbone("efficientnet-lite0")
    cache = FeatureCache(tmp_path)
    out = _clean(model, folder_dataset, [0, 4, 8], resolution=32, cache=cache, progress=False)
    assert out.features.shape == (3, 1280) and np.isfinite(out.features).all()
    tf = eval_transform(32, model.mean, model.std)
    x = torch.stack([tf(folder_dataset.load(i)) for i in (0, 4, 8)])
    with torch.inference_mode():
        reference = model(x).numpy()
    np.testing.assert_allclose(out.features.astype(np.float32), reference, rtol=1e-2, atol=1e-2)
    fields = json.loads((out.path / "manifest.json").read_text())["fields"]
    assert fields["backbone"]["weights"] == "package:efficientnet-lite0-57934424.pth"
    assert fields["transform"] == {"kind": "eval", "resolution": 32, "crop_ratio": 1.0}


def test_interrupted_extraction_resumes_with_identical_result(folder_dataset, tmp_path):
    class Crashing(TinyBackbone):
        def forward(self, x):
            if self.calls == 2:
                raise RuntimeError("killed")
            return super().forward(x)

    cache = FeatureCache(tmp_path)
    kw = {"n_views": 2, "augment": AugmentConfig(resolution=16), "seed": 3, "progress": False}
    with pytest.raises(RuntimeError, match="killed"):
        _views(Crashing(), folder_dataset, np.arange(12), batch_size=4, cache=cache, **kw)
    assert cache.entries() == []
    model = TinyBackbone()
    resumed = _views(model, folder_dataset, np.arange(12), batch_size=4, cache=cache, **kw)
    assert resumed.computed and model.calls == 5  # 6 batches of 2 images; the first was committed
    reference = _views(TinyBackbone(), folder_dataset, np.arange(12), batch_size=4, **kw)
    np.testing.assert_allclose(resumed.features.astype(np.float32), reference.features, rtol=2e-3, atol=1e-3)
