"""Image collections: files in folders (one sub-folder per class) or in-memory arrays, robust to bad files.

Loading never raises for an unreadable or corrupt image: ``source[i]`` returns ``(image, index, ok)``; a
bad file gives a grey placeholder run through the same transform and ``ok = False``. The flag travels
through DataLoader workers (a counter inside a worker process would be lost), and :class:`SkipLog` turns
the flags into a count and a summary such as ``skipped 3 unreadable images: a.jpg, b.jpg, c.jpg``.

Labels are used only for evaluation: (N,) int64 class ids, or (N, L) uint8 multi-hot rows.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import stat
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = [
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "ImageDataset",
    "ImageFolderDataset",
    "ImageSource",
    "SkipLog",
    "UnreadableImageError",
    "readable_images",
    "scan_image_folder",
    "walk_image_files",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class UnreadableImageError(OSError):
    """An image file could not be opened or decoded."""


def _check_labels(labels: Any, n: int) -> np.ndarray:
    """Labels as (N,) int64 or (N, L) uint8; None -> all -1 (unlabelled)."""
    if labels is None:
        return np.full(n, -1, dtype=np.int64)
    arr = np.asarray(labels)
    if arr.ndim not in (1, 2) or arr.shape[0] != n:
        raise ValueError(f"labels must have shape ({n},) or ({n}, L), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise TypeError(f"labels must be integers (class ids or 0/1 multi-hot), got dtype {arr.dtype}")
    return arr.astype(np.int64 if arr.ndim == 1 else np.uint8, copy=False)


class ImageSource(torch.utils.data.Dataset):
    """Base class: N images with labels; ``source[i] -> (transform(image), i, ok)``.

    Subclasses implement :meth:`load`, :meth:`describe` and :meth:`identity`.
    """

    #: size of the grey placeholder substituted for an unreadable image (before the transform)
    placeholder_size: tuple[int, int] = (32, 32)
    #: decode JPEG files at a reduced scale keeping both sides >= this (PIL draft; much faster on photos); None: full
    draft_size: int | None = None

    def __init__(self, labels: np.ndarray, transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> Image.Image:
        """The RGB image ``index``; raises :class:`UnreadableImageError` when it cannot be decoded."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """A human-readable name of item ``index`` (its path, for files)."""
        return f"item {index}"

    def identity(self) -> dict[str, Any]:
        """JSON-able fields identifying the images (for cache keys): equal identities, equal images."""
        raise NotImplementedError

    @property
    def multilabel(self) -> bool:
        return self.labels.ndim == 2

    def with_transform(self, transform: Callable[[Image.Image], Any] | None) -> ImageSource:
        """A shallow copy with another transform (the image list is shared)."""
        other = copy.copy(self)
        other.transform = transform
        return other

    def __getitem__(self, index: int) -> tuple[Any, int, bool]:
        index = int(index)
        try:
            image, ok = self.load(index), True
        except UnreadableImageError as exc:
            log.debug("unreadable image %s: %s", self.describe(index), exc)
            image, ok = Image.new("RGB", self.placeholder_size, (128, 128, 128)), False
        if self.transform is not None:
            image = self.transform(image)
        return image, index, ok


#: Images are refused (skipped and counted, like unreadable ones) above this many pixels or this aspect ratio:
#: PIL's bomb check stops at 179 M pixels, but a 1 x 1,000,000 strip passes it and its resize takes ~37 GB.
MAX_PIXELS = 64_000_000
MAX_ASPECT = 100.0


def _open_rgb(path: Path, draft_size: int | None = None) -> Image.Image:
    """Decode an image file to 8-bit RGB in memory; every problem becomes UnreadableImageError.

    Only regular files are opened (a FIFO named x.png would block forever), without blocking; images over
    :data:`MAX_PIXELS` or :data:`MAX_ASPECT` are refused before decoding; 16-bit and float images are scaled to
    8 bits (PIL's own conversion clips them to near-constant images). ``draft_size``: JPEGs are decoded at a
    reduced scale (1/2, 1/4 or 1/8) no smaller than this.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise UnreadableImageError(f"{_name(path)}: {exc.strerror}") from exc
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise UnreadableImageError(f"{_name(path)}: not a regular file")
        try:
            with warnings.catch_warnings():
                # PIL warns about odd but readable files (palette transparency, EXIF); they load fine
                warnings.simplefilter("ignore")
                with Image.open(fh) as img:
                    w, h = img.size
                    if w * h > MAX_PIXELS or max(w, h) > MAX_ASPECT * max(min(w, h), 1):
                        raise UnreadableImageError(
                            f"{_name(path)}: {w} x {h} pixels is beyond the bounds "
                            f"({MAX_PIXELS:,} pixels, aspect ratio {MAX_ASPECT:g})"
                        )
                    if draft_size and img.format == "JPEG":
                        img.draft("RGB", (draft_size, draft_size))  # JPEG scaled decoding: 1/2, 1/4 or 1/8
                    img.load()
                    if img.mode == "P" and "transparency" in img.info:
                        return img.convert("RGBA").convert("RGB")
                    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
                        return to_8bit_rgb(img)
                    return img.convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            if isinstance(exc, UnreadableImageError):
                raise
            raise UnreadableImageError(f"{_name(path)}: {exc}") from exc


def to_8bit_rgb(img: Image.Image) -> Image.Image:
    """A 16-bit integer or float single-channel image scaled to 8-bit RGB: 16-bit by its full range (/257), floats
    in [0, 1] by 255, anything else by its own min-max range."""
    a = np.asarray(img, dtype=np.float64)
    a = np.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)
    if img.mode.startswith("I;16") or (img.mode == "I" and a.min(initial=0) >= 0 and a.max(initial=0) <= 65535):
        a = a / 257.0 if a.max(initial=0) > 255 or img.mode.startswith("I;16") else a
    elif img.mode == "F" and a.min(initial=0) >= 0 and a.max(initial=0) <= 1:
        a = a * 255.0
    else:
        lo, hi = a.min(initial=0), a.max(initial=0)
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8)).convert("RGB")


def _name(path: os.PathLike[str] | str) -> str:
    """A path for messages: undecodable bytes of the file name shown as escapes, never an encoding error."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def readable_images(paths: Sequence[str | os.PathLike[str]]) -> tuple[list, list[str]]:
    """(the paths that decode, "name: problem" of those that do not): for a few query images, read twice."""
    good, bad = [], []
    for p in paths:
        try:
            _open_rgb(Path(p))
            good.append(p)
        except UnreadableImageError as exc:
            bad.append(str(exc))
    return good, bad


class ImageDataset(ImageSource):
    """Images stored as files.

    Args:
        paths: N file paths, relative to ``root`` (or absolute / relative to the cwd when root is None).
        labels: (N,) int class ids, (N, L) 0/1 multi-hot rows, or None (unlabelled).
        root: the directory the paths are relative to.
        transform: applied to the PIL RGB image.
        classes: class names (label id -> name), if known.
    """

    def __init__(
        self,
        paths: Sequence[str | os.PathLike[str]],
        labels: Any = None,
        *,
        root: str | os.PathLike[str] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        self.paths = [os.fspath(p) for p in paths]
        super().__init__(_check_labels(labels, len(self.paths)), transform)
        self.root = Path(root).expanduser().resolve() if root is not None else None
        self.classes = list(classes) if classes is not None else None
        self._identity: dict[str, Any] | None = None

    def full_path(self, index: int) -> Path:
        p = Path(self.paths[index])
        return self.root / p if self.root is not None else p

    def describe(self, index: int) -> str:
        return _name(self.full_path(index))

    def load(self, index: int) -> Image.Image:
        return _open_rgb(self.full_path(index), self.draft_size)

    def identity(self) -> dict[str, Any]:
        """Root + hash of the path list and the file sizes (a replaced file changes the identity).

        Computed once per dataset object (a stat per file: about 0.5 s for 60,000 files).
        """
        if self._identity is not None:
            return self._identity
        h = hashlib.sha256()
        for i, p in enumerate(self.paths):
            try:
                size = self.full_path(i).stat().st_size
            except OSError:
                size = -1
            h.update(f"{p}\0{size}\n".encode("utf-8", "surrogateescape"))  # non-UTF-8 names
        self._identity = {
            "kind": "files",
            "root": str(self.root) if self.root is not None else None,
            "n": len(self.paths),
            "files_sha256": h.hexdigest(),
        }
        return self._identity


class ArrayImageDataset(ImageSource):
    """Images held in memory as a uint8 array (N, H, W, 3), e.g. torchvision's CIFAR-10 batches.

    Args:
        images: (N, H, W, 3) uint8 RGB.
        labels: (N,) or (N, L) labels, or None.
        transform: applied to the PIL image.
        name: a name for messages and cache identities.
        classes: class names, if known.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: Any = None,
        *,
        transform: Callable[[Image.Image], Any] | None = None,
        name: str = "array",
        classes: Sequence[str] | None = None,
    ) -> None:
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be a uint8 array (N, H, W, 3), got {images.dtype} {images.shape}")
        self.images = images
        super().__init__(_check_labels(labels, len(images)), transform)
        self.name = name
        self.classes = list(classes) if classes is not None else None
        self._identity: dict[str, Any] | None = None

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def describe(self, index: int) -> str:
        return f"{self.name}[{index}]"

    def identity(self) -> dict[str, Any]:
        """Name + content hash of the pixels (computed once)."""
        if self._identity is None:
            digest = hashlib.sha256(np.ascontiguousarray(self.images).data).hexdigest()
            self._identity = {"kind": "array", "name": self.name, "n": len(self.images), "sha256": digest}
        return self._identity


def _iter_image_files(root: Path, exts: tuple[str, ...], odd: list[str]):
    """(path, (device, inode), real) of the image files below ``root``, links followed, every real folder
    entered once; ``real``: no link on the way from ``root``. Non-regular files go to ``odd``."""
    real_root = os.path.realpath(root)
    visited: set[tuple[int, int]] = set()
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            log.warning("cannot list %s: %s", _name(folder), exc.strerror)
            continue
        if (st.st_dev, st.st_ino) in visited:
            continue
        visited.add((st.st_dev, st.st_ino))
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                est = entry.stat()  # follows links; a dangling link is an OSError
            except OSError:
                continue
            if stat.S_ISDIR(est.st_mode):
                stack.append(Path(entry.path))
            elif entry.name.lower().endswith(exts):
                if not stat.S_ISREG(est.st_mode):
                    odd.append(_name(entry.path))
                    continue
                real = os.path.realpath(entry.path) == os.path.join(real_root, os.path.relpath(entry.path, root))
                yield Path(entry.path), (est.st_dev, est.st_ino), real


def _report_odd(odd: list[str]) -> None:
    if odd:
        more = ", ..." if len(odd) > 5 else ""
        log.warning("skipped %d image name(s) that are not regular files: %s%s", len(odd), ", ".join(odd[:5]), more)


def _keep(chosen: dict, key, value, real: bool) -> None:
    """One entry per real file: the first one found, replaced by one reached without a link."""
    if key not in chosen or (real and not chosen[key][-1]):
        chosen[key] = (*value, real)


def walk_image_files(root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[Path]:
    """Image files below ``root`` (sorted), hidden names left out.

    Symbolic links are followed, but every real folder is entered once and every real file listed once, by its
    path without links when it has one (a link loop or a linked copy does not multiply a dataset). Files that are
    not regular files (FIFOs, devices, sockets) are left out with a warning: reading them would block or never end.
    """
    exts = tuple(e.lower() for e in extensions)
    odd: list[str] = []
    chosen: dict = {}
    for path, key, real in _iter_image_files(Path(root), exts, odd):
        _keep(chosen, key, (path,), real)
    _report_odd(odd)
    return sorted(v[0] for v in chosen.values())


def scan_image_folder(
    root: str | os.PathLike[str], extensions: Sequence[str] = IMAGE_EXTENSIONS
) -> tuple[list[str], np.ndarray, list[str]]:
    """Scan ``root/<class>/**/<image>``: one sub-folder per class, ids from the sorted class names.

    Links are followed once per real folder and file (see :func:`walk_image_files`): a file reachable from two
    classes is listed once, in the class holding it without a link (else the first class reaching it).

    Returns:
        paths: image paths relative to ``root`` (POSIX separators), sorted by class, then path.
        labels: (N,) int64 class ids.
        classes: the sorted class names.

    Raises:
        FileNotFoundError: ``root`` is not a directory. ValueError: no class folder or no image.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist or is not a directory")
    exts = tuple(e.lower() for e in extensions)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders (expected {root}/<class>/<image>)")
    odd: list[str] = []
    chosen: dict = {}
    for label, cls in enumerate(classes):
        for path, key, real in _iter_image_files(root / cls, exts, odd):
            real = real and os.path.realpath(root / cls) == os.path.join(os.path.realpath(root), cls)
            _keep(chosen, key, (label, path.relative_to(root).as_posix()), real)
    _report_odd(odd)
    items = sorted((label, rel) for label, rel, _ in chosen.values())
    if not items:
        raise ValueError(f"image folder {root} has no images with extensions {list(exts)}")
    paths = [rel for _, rel in items]
    labels = np.asarray([label for label, _ in items], dtype=np.int64)
    return paths, labels, classes


class ImageFolderDataset(ImageDataset):
    """All images under ``root/<class>/``, labelled by sorted class name (see :func:`scan_image_folder`)."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        transform: Callable[[Image.Image], Any] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        paths, labels, classes = scan_image_folder(root, extensions)
        super().__init__(paths, labels, root=root, transform=transform, classes=classes)


@dataclass
class SkipLog:
    """Collects the ``ok`` flags of ``(image, index, ok)`` batches: how many images were unreadable.

    Call ``update(indices, ok)`` per batch, then read ``count`` / ``summary()`` or call ``report()``.
    """

    describe: Callable[[int], str] = str
    max_examples: int = 5
    indices: list[int] = field(default_factory=list)

    def update(self, indices: Any, ok: Any) -> None:
        """Record one batch: ``indices`` and ``ok`` are equal-length tensors or arrays."""
        idx = np.asarray(indices).reshape(-1)
        good = np.asarray(ok, dtype=bool).reshape(-1)
        if idx.shape != good.shape:
            raise ValueError(f"indices and ok must have the same length, got {idx.shape} and {good.shape}")
        self.indices.extend(int(i) for i in idx[~good])

    @property
    def count(self) -> int:
        return len(self.indices)

    def examples(self) -> list[str]:
        return [self.describe(i) for i in self.indices[: self.max_examples]]

    def summary(self) -> str:
        """``skipped 3 unreadable images: a.jpg, b.jpg, c.jpg`` (empty string when none)."""
        if not self.indices:
            return ""
        more = ", ..." if self.count > self.max_examples else ""
        noun = "image" if self.count == 1 else "images"
        return f"skipped {self.count} unreadable {noun}: {', '.join(self.examples())}{more}"

    def report(self, logger: logging.Logger = log) -> None:
        """Log the summary as a warning (nothing when every image was readable)."""
        if self.indices:
            logger.warning("%s", self.summary())
