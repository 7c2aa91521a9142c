"""Decoding and augmentation that keep up with a fast backbone: JPEG draft decoding, the cheap augmentation
order, and their place in the feature-cache keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from hihpq.data import AugmentConfig, FeatureCache, ImageFolderDataset, extract_clean_features, extract_view_features
from hihpq.data.transforms import Augment, clean_draft_size, seeded_call, view_draft_size
from hihpq.models import build_backbone

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def _torchvision_reference(c: AugmentConfig) -> T.Compose:
    """The augmentation as a plain torchvision Compose (the order of the paper's code)."""
    return T.Compose(
        [
            T.RandomResizedCrop(c.resolution, scale=c.crop_scale, interpolation=T.InterpolationMode.BILINEAR),
            T.RandomHorizontalFlip(p=c.flip_p),
            T.RandomApply([T.ColorJitter(*c.jitter)], p=c.jitter_p),
            T.RandomGrayscale(p=c.grayscale_p),
            T.RandomApply([T.GaussianBlur(c.blur_kernel, sigma=c.blur_sigma)], p=c.blur_p),
            T.ToTensor(),
            T.Normalize(MEAN, STD),
        ]
    )


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    """A smooth 96x80 RGB image (gradients: resampling differences stay small)."""
    y, x = np.mgrid[0:80, 0:96]
    pixels = np.stack([x * 2.5, y * 3.0, (x + y) * 1.4], axis=-1).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def test_augment_draws_the_same_views_as_torchvision(photo):
    """Crops larger than the output: only the blur moves (onto the float tensor); same random draws."""
    c = AugmentConfig(resolution=24)
    fast, ref = Augment(c, MEAN, STD), _torchvision_reference(c)
    for seed in range(12):
        a, b = seeded_call(fast, seed, photo), seeded_call(ref, seed, photo)
        assert a.shape == b.shape == (3, 24, 24)
        assert float((a - b).abs().max()) <= 2.5 / 255 / 0.5, seed  # uint8 rounding of the blur, normalised


def test_augment_colours_small_crops_before_upscaling(photo):
    """Crops smaller than the output get their colour jitter before the resize: close to torchvision's view
    (the jitter commutes with resizing up to rounding), same draws, and reproducible."""
    c = AugmentConfig(resolution=160, blur_p=0.0)
    fast, ref = Augment(c, MEAN, STD), _torchvision_reference(c)
    for seed in range(6):
        a, b = seeded_call(fast, seed, photo), seeded_call(ref, seed, photo)
        assert float((a - b).abs().mean()) < 0.03, seed
        torch.testing.assert_close(seeded_call(fast, seed, photo), a, rtol=0, atol=0)


def _jpeg(path, size=(640, 480)):
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x % 256, y % 256, (x * y) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(pixels).save(path, quality=90)
    return path


def test_draft_decodes_jpegs_smaller_but_never_below_the_target(tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    _jpeg(tmp_path / "photos" / "a" / "0.jpg")
    ds = ImageFolderDataset(tmp_path / "photos")
    assert ds.load(0).size == (640, 480)
    ds.draft_size = 112
    assert ds.load(0).size == (160, 120)  # 1/4 scale: both sides still >= 112
    ds.draft_size = 200
    assert ds.load(0).size == (320, 240)
    assert clean_draft_size(112) == 112 and clean_draft_size(224, 0.875) == 256
    assert view_draft_size(AugmentConfig(resolution=112)) == 183  # smallest crop keeps 112 px a side


def test_draft_is_part_of_the_feature_cache_key(tmp_path):
    (tmp_path / "photos" / "a").mkdir(parents=True)
    for k in range(3):
        _jpeg(tmp_path / "photos" / "a" / f"{k}.jpg", (256 + 64 * k, 192))
    ds = ImageFolderDataset(tmp_path / "photos")
    backbone = build_backbone("efficientnet-lite0")  # pretrained (packaged): random-init features are all 0
    cache = FeatureCache(tmp_path / "features")
    kw = {"resolution": 32, "cache": cache, "num_workers": 0, "progress": False, "batch_size": 2}
    drafted = extract_clean_features(backbone, ds, **kw)
    full = extract_clean_features(backbone, ds, jpeg_draft=False, **kw)
    assert drafted.computed and full.computed and drafted.path != full.path
    assert not extract_clean_features(backbone, ds, **kw).computed
    assert not np.array_equal(drafted.features, full.features)  # the draft did change the decoded pixels
    kw.pop("resolution")
    vkw = {"n_views": 2, "augment": AugmentConfig(resolution=32), "seed": 3, **kw}
    views = extract_view_features(backbone, ds, [0, 2], **vkw)
    views_full = extract_view_features(backbone, ds, [0, 2], jpeg_draft=False, **vkw)
    assert views.path != views_full.path
    # reproducible: recomputed without the cache, the drafted views give the cached features again
    again = extract_view_features(backbone, ds, [0, 2], **{**vkw, "cache": None})
    np.testing.assert_array_equal(again.features, views.features)
