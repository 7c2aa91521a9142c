"""Image transforms: the paper's two-view augmentation and the clean (evaluation) transform.

Both map a PIL RGB image to a float tensor (3, res, res) normalised with the backbone's mean/std.
Augmentation (paper / authors' code): RandomResizedCrop(res, scale=(0.5, 1)), horizontal flip,
ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.7, grayscale with p = 0.2, Gaussian blur with p = 0.5 (kernel
3 px as in the authors' code, sigma in [0.1, 2]). The randomness comes from torch's global generator, so
:func:`seeded_call` makes one draw reproducible without disturbing the caller's random stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

__all__ = [
    "AUGMENT_IMPL",
    "Augment",
    "AugmentConfig",
    "MultiViews",
    "TwoViews",
    "clean_draft_size",
    "derive_seed",
    "eval_transform",
    "eval_transform_config",
    "seeded_call",
    "train_transform",
    "view_draft_size",
]


def _pair(name: str, value: Sequence[float], lo: float, hi: float) -> tuple[float, float]:
    if len(value) != 2 or not lo <= value[0] <= value[1] <= hi:
        raise ValueError(f"{name} must be (a, b) with {lo} <= a <= b <= {hi}, got {tuple(value)}")
    return (float(value[0]), float(value[1]))


def _prob(name: str, p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {p}")
    return float(p)


def _resolution(res: Any) -> int:
    if isinstance(res, bool) or not isinstance(res, int | np.integer) or res < 8:
        raise ValueError(f"resolution must be an int >= 8 (pixels), got {res!r}")
    return int(res)


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of the two-view augmentation (defaults: the paper's, at 224 px).

    Attributes:
        resolution: output side length (224 as the paper; 112 is the fast CPU default).
        crop_scale: RandomResizedCrop area range.
        flip_p: horizontal flip probability.
        jitter: ColorJitter (brightness, contrast, saturation, hue).
        jitter_p: probability of the colour jitter.
        grayscale_p: probability of converting to grey.
        blur_p: probability of a Gaussian blur.
        blur_kernel: odd blur kernel size in pixels (authors' code: 3).
        blur_sigma: blur sigma range.
    """

    resolution: int = 224
    crop_scale: tuple[float, float] = (0.5, 1.0)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.7
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)

    def __post_init__(self) -> None:
        # frozen dataclass: normalise fields (lists from YAML -> tuples) through object.__setattr__
        object.__setattr__(self, "resolution", _resolution(self.resolution))
        object.__setattr__(self, "crop_scale", _pair("crop_scale", self.crop_scale, 1e-6, 1.0))
        object.__setattr__(self, "blur_sigma", _pair("blur_sigma", self.blur_sigma, 1e-6, float("inf")))
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p"):
            object.__setattr__(self, name, _prob(name, getattr(self, name)))
        jitter = tuple(float(v) for v in self.jitter)
        if len(jitter) != 4 or min(jitter) < 0 or jitter[3] > 0.5:
            raise ValueError(f"jitter must be 4 numbers >= 0 with hue <= 0.5, got {tuple(self.jitter)}")
        object.__setattr__(self, "jitter", jitter)
        k = self.blur_kernel
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"blur_kernel must be a positive odd int, got {k!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able parameters (for cache keys and run records)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def _normalize(mean: Sequence[float], std: Sequence[float]) -> T.Normalize:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std must be 3 numbers each with std > 0, got {mean}, {std}")
    return T.Normalize([float(m) for m in mean], [float(s) for s in std])


#: Identity of :class:`Augment`'s order of operations (cache keys): the same random draws as the torchvision
#: Compose of the module doc, but colour operations run at the crop's own size when that is smaller than the
#: output, and the blur on the float tensor; the views differ from the Compose's by rounding and resampling order.
AUGMENT_IMPL = "crop-colour-resize-v1"


class Augment:
    """The augmentation (see the module doc): PIL RGB image -> (3, res, res) normalised float tensor.

    Cheap order: crop at the source resolution, then flip and colour jitter / grayscale on whichever is smaller,
    the crop or the output (a 32 px CIFAR crop is 49x fewer pixels than a 224 px view), then resize, then the
    blur on the tensor (torchvision blurs a PIL image through a tensor round trip). The random draws come in
    the order of the torchvision Compose, so a seed picks the same crop, flip, jitter and blur.
    """

    def __init__(self, config: AugmentConfig, mean: Sequence[float], std: Sequence[float]) -> None:
        if not isinstance(config, AugmentConfig):
            raise TypeError(f"config must be an AugmentConfig, got {type(config).__name__}")
        c = self.config = config
        self.crop = T.RandomResizedCrop(c.resolution, scale=c.crop_scale, interpolation=T.InterpolationMode.BILINEAR)
        self.flip = T.RandomHorizontalFlip(p=c.flip_p)
        self.colour = T.Compose(
            [T.RandomApply([T.ColorJitter(*c.jitter)], p=c.jitter_p), T.RandomGrayscale(p=c.grayscale_p)]
        )
        self.blur = T.RandomApply([T.GaussianBlur(c.blur_kernel, sigma=c.blur_sigma)], p=c.blur_p)
        self.normalize = _normalize(mean, std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        res = self.config.resolution
        top, left, h, w = self.crop.get_params(image, self.crop.scale, self.crop.ratio)
        patch = self.flip(image.crop((left, top, left + w, top + h)))
        small = h * w < res * res
        if small:
            patch = self.colour(patch)
        patch = patch.resize((res, res), Image.Resampling.BILINEAR)
        if not small:
            patch = self.colour(patch)
        return self.normalize(self.blur(TF.to_tensor(patch)))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def train_transform(
    config: AugmentConfig, mean: Sequence[float], std: Sequence[float]
) -> Callable[[Image.Image], torch.Tensor]:
    """The augmentation: PIL RGB image -> (3, res, res) float tensor normalised with ``mean``/``std``."""
    return Augment(config, mean, std)


def view_draft_size(config: AugmentConfig) -> int:
    """Side to decode JPEGs at (PIL draft, both sides >= it) for augmented views: the smallest crop the
    augmentation can draw (area ``crop_scale[0]``, aspect 3/4) still has ``resolution`` pixels per side."""
    return math.ceil(config.resolution / math.sqrt(config.crop_scale[0] * 3 / 4))


def clean_draft_size(resolution: int, crop_ratio: float = 1.0) -> int:
    """Side to decode JPEGs at for :func:`eval_transform`: its resize target, the shorter side."""
    return round(_resolution(resolution) / crop_ratio)


def eval_transform(
    resolution: int, mean: Sequence[float], std: Sequence[float], crop_ratio: float = 1.0
) -> Callable[[Image.Image], torch.Tensor]:
    """The clean transform: PIL RGB image -> (3, resolution, resolution) normalised float tensor.

    Resizes the shorter side to ``resolution / crop_ratio`` (bilinear), centre-crops ``resolution`` and
    normalises. With ``crop_ratio = 1`` a square image (CIFAR) is simply resized; 0.875 is the classic
    resize-256 / crop-224 of the authors' Flickr and NUS pipelines.
    """
    res = _resolution(resolution)
    if not 0.0 < crop_ratio <= 1.0:
        raise ValueError(f"crop_ratio must be in (0, 1], got {crop_ratio}")
    return T.Compose(
        [
            T.Resize(round(res / crop_ratio), interpolation=T.InterpolationMode.BILINEAR),
            T.CenterCrop(res),
            T.ToTensor(),
            _normalize(mean, std),
        ]
    )


def eval_transform_config(resolution: int, crop_ratio: float = 1.0) -> dict[str, Any]:
    """JSON-able description of :func:`eval_transform` (for cache keys)."""
    return {"kind": "eval", "resolution": _resolution(resolution), "crop_ratio": float(crop_ratio)}


class MultiViews:
    """Apply a random transform ``n`` times: image -> tuple of ``n`` independent views."""

    def __init__(self, transform: Callable[[Image.Image], Any], n: int = 2) -> None:
        if not callable(transform):
            raise TypeError(f"transform must be callable, got {type(transform).__name__}")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        self.transform, self.n = transform, n

    def __call__(self, image: Image.Image) -> tuple[Any, ...]:
        return tuple(self.transform(image) for _ in range(self.n))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n={self.n}, transform={self.transform!r})"


class TwoViews(MultiViews):
    """The two augmented views of an image for the contrastive loss: image -> (view1, view2)."""

    def __init__(self, transform: Callable[[Image.Image], Any]) -> None:
        super().__init__(transform, 2)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers, e.g. (seed, image index, view), by numpy's SeedSequence."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return ((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def seeded_call(fn: Callable[..., Any], seed: int, *args: Any) -> Any:
    """``fn(*args)`` with torch's CPU generator seeded to ``seed``; the generator is restored afterwards.

    torchvision's transforms draw from the global generator; this makes a draw reproducible without
    touching the caller's random stream.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(*args)
