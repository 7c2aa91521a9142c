"""On-disk cache of frozen-backbone features: computed once, stored as float16 ``.npy`` memmaps.

Layout under the cache root::

    <name>-<key>/manifest.json     key fields, array shapes/dtypes, extraction info (complete entries)
    <name>-<key>/<array>.npy       features.npy (N, F) or (N, V, F) float16, valid.npy (N,) bool
    .<name>-<key>.partial/         an entry being computed: arrays, progress.json, lock (never an entry)

The key is the SHA-256 of the canonical JSON of the key fields (dataset identity, backbone + weights,
resolution, augmentation, number of views, seed, ...) and :data:`CACHE_FORMAT_VERSION`: any changed
setting gives another entry, so a stale one is never reused. An entry is written in its ``.partial``
directory and renamed into place only when complete, so a crash never leaves a half-written entry that
looks valid; the progress file lets an interrupted extraction resume where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision
from tqdm.auto import tqdm

from hihpq.data.folders import ImageSource, SkipLog
from hihpq.data.protocols import default_cache_dir
from hihpq.data.transforms import (
    AUGMENT_IMPL,
    AugmentConfig,
    clean_draft_size,
    derive_seed,
    eval_transform,
    eval_transform_config,
    train_transform,
    view_draft_size,
)

__all__ = [
    "CACHE_FORMAT_VERSION",
    "CacheBusyError",
    "CacheEntry",
    "CacheWriter",
    "ExtractedFeatures",
    "FeatureCache",
    "cache_key",
    "extract_clean_features",
    "extract_view_features",
]

log = logging.getLogger(__name__)

#: Bump when the layout or the meaning of cached arrays changes: old entries then stop matching.
CACHE_FORMAT_VERSION = 1

_FLOAT16_MAX = float(np.finfo(np.float16).max)

#: Shapes and dtypes of the arrays of an entry: {name: (shape, dtype)}; the first axis is the row axis.
ArraySpec = Mapping[str, tuple[tuple[int, ...], Any]]


def _canonical(fields: Mapping[str, Any]) -> Any:
    """Key fields after a JSON round trip (tuples -> lists), so stored and fresh fields compare equal."""
    try:
        return json.loads(json.dumps(fields, sort_keys=True))
    except TypeError as exc:
        raise TypeError(f"cache key fields must be JSON-serialisable: {exc}") from exc


def cache_key(fields: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``fields`` and the cache format version."""
    payload = json.dumps({"format": CACHE_FORMAT_VERSION, "fields": _canonical(fields)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class CacheBusyError(RuntimeError):
    """Another live process is computing the same cache entry."""


@dataclass
class CacheEntry:
    """A complete cache entry: its directory, manifest, and read-only memmaps of its arrays."""

    path: Path
    key: str
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    @property
    def info(self) -> dict[str, Any]:
        """Extraction info recorded by the compute function (e.g. unreadable images)."""
        return self.manifest.get("info", {})


def _write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file, fsync, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    except OSError:
        return False
    return True


@dataclass
class CacheWriter:
    """Handed to a compute function: the arrays to fill, and where to start (rows already done).

    Rows are the first axis of every array. The compute function fills rows ``[start, n_rows)`` in order
    and may call :meth:`commit` with the number of rows done, so that an interruption resumes there.
    ``info`` (JSON-able) is saved with the progress and ends up in the manifest.
    """

    arrays: dict[str, np.ndarray]
    n_rows: int
    start: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    progress_path: Path | None = None
    key: str = ""
    _last_commit: float = field(default=float("-inf"), repr=False)

    def commit(self, n_done: int, *, min_interval_s: float = 0.0) -> None:
        """Flush the arrays and record rows ``[0, n_done)`` as final.

        Skipped when the previous commit is less than ``min_interval_s`` seconds old (cheap to call often).
        """
        if not 0 <= n_done <= self.n_rows:
            raise ValueError(f"n_done must be in [0, {self.n_rows}], got {n_done}")
        now = time.monotonic()
        if now - self._last_commit < min_interval_s:
            return
        for arr in self.arrays.values():
            if isinstance(arr, np.memmap):
                arr.flush()
        if self.progress_path is not None:
            _write_json(self.progress_path, {"key": self.key, "n_done": int(n_done), "info": self.info})
        self._last_commit = now


class FeatureCache:
    """A directory of cache entries keyed by a hash of their settings.

    Args:
        root: the cache directory (default ``default_cache_dir()/features``); created on first write.
    """

    def __init__(self, root: str | os.PathLike[str] | None = None) -> None:
        self.root = Path(root).expanduser() if root is not None else default_cache_dir() / "features"

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r})"

    @staticmethod
    def key(fields: Mapping[str, Any]) -> str:
        """The key of ``fields`` (see :func:`cache_key`)."""
        return cache_key(fields)

    def _dirs(self, fields: Mapping[str, Any], name: str) -> tuple[str, Path, Path]:
        if not name or "/" in name or os.sep in name or name.startswith("."):
            raise ValueError(f"entry name must be a plain non-empty file name, got {name!r}")
        key = cache_key(fields)
        return key, self.root / f"{name}-{key[:24]}", self.root / f".{name}-{key[:24]}.partial"

    def lookup(self, fields: Mapping[str, Any], name: str = "features") -> CacheEntry | None:
        """The complete entry for ``fields``, or None. An entry that fails validation is deleted."""
        key, final, _ = self._dirs(fields, name)
        if not final.is_dir():
            return None
        entry = self._open(final, key, _canonical(fields))
        if entry is None:
            log.warning("removing invalid feature-cache entry %s", final)
            shutil.rmtree(final, ignore_errors=True)
        return entry

    @staticmethod
    def _open(path: Path, key: str, fields: Any) -> CacheEntry | None:
        """Open and validate an entry directory (manifest key/fields, array shapes and dtypes)."""
        manifest = _read_json(path / "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("key") != key or manifest.get("fields") != fields:
            return None
        arrays = {}
        for arr_name, spec in manifest.get("arrays", {}).items():
            try:
                arr = np.load(path / f"{arr_name}.npy", mmap_mode="r")
            except (OSError, ValueError):
                return None
            if list(arr.shape) != spec["shape"] or str(arr.dtype) != spec["dtype"]:
                return None
            arrays[arr_name] = arr
        return CacheEntry(path, key, manifest, arrays)

    def get_or_compute(
        self,
        fields: Mapping[str, Any],
        compute_fn: Callable[[CacheWriter], None],
        arrays: ArraySpec,
        *,
        name: str = "features",
        resume: bool = True,
    ) -> tuple[CacheEntry, bool]:
        """The cached entry for ``fields``, computed first when absent.

        Args:
            fields: JSON-able key fields: every setting that changes the arrays' contents.
            compute_fn: ``compute_fn(writer)`` fills ``writer.arrays[...]`` rows ``[writer.start,
                n_rows)``; called only when no complete entry exists.
            arrays: ``{name: (shape, dtype)}``, all with the same first dimension (rows).
            name: entry name prefix (e.g. "clean", "views").
            resume: continue an interrupted computation of the same key (else start over).

        Returns:
            (entry, computed): the complete entry (read-only memmaps), and whether compute_fn ran.

        Raises:
            CacheBusyError: another live process is computing this entry. Whatever ``compute_fn`` raises:
            no entry is then created, and the committed progress is kept for a resume.
        """
        if not arrays:
            raise ValueError("arrays must name at least one array")
        specs = {k: (tuple(int(s) for s in shape), np.dtype(dt)) for k, (shape, dt) in arrays.items()}
        rows = {shape[0] if shape else None for shape, _ in specs.values()}
        if len(rows) != 1 or None in rows:
            raise ValueError(f"all arrays need the same first dimension (rows), got {specs}")
        n_rows = int(rows.pop())  # type: ignore[arg-type]
        entry = self.lookup(fields, name)
        if entry is not None:
            return entry, False
        key, final, partial = self._dirs(fields, name)
        self.root.mkdir(parents=True, exist_ok=True)
        spec_json = {k: {"shape": list(s), "dtype": str(d)} for k, (s, d) in specs.items()}
        lock = self._acquire(partial)  # before touching the partial: another process may be writing it
        try:
            writer = self._open_partial(partial, key, specs, n_rows, resume)
            # On an exception the progress file keeps the last committed row: a later call resumes there.
            compute_fn(writer)
            for arr in writer.arrays.values():
                if isinstance(arr, np.memmap):
                    arr.flush()
            writer.arrays.clear()  # release the memmaps before the rename
            manifest = {
                "key": key,
                "format": CACHE_FORMAT_VERSION,
                "fields": _canonical(fields),
                "arrays": spec_json,
                "info": writer.info,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            _write_json(partial / "manifest.json", manifest)
            (partial / "progress.json").unlink(missing_ok=True)
            try:
                # the lock moves along, so no other process can take the partial before the rename
                os.rename(partial, final)
            except OSError:
                if not final.is_dir():
                    raise
                shutil.rmtree(partial, ignore_errors=True)  # a concurrent writer finished first
            (final / "lock").unlink(missing_ok=True)
        finally:
            lock.unlink(missing_ok=True)
            if not resume:
                shutil.rmtree(partial, ignore_errors=True)
        entry = self._open(final, key, _canonical(fields))
        if entry is None:
            raise RuntimeError(f"feature-cache entry {final} is invalid right after writing it")
        return entry, True

    @staticmethod
    def _acquire(partial: Path) -> Path:
        """Create ``partial/lock`` exclusively (pid + host); the lock of a dead local process is taken."""
        partial.mkdir(parents=True, exist_ok=True)
        lock = partial / "lock"
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                owner = _read_json(lock) or {}
                pid, host = owner.get("pid"), owner.get("host")
                if isinstance(pid, int) and (host != me["host"] or _pid_alive(pid)):
                    raise CacheBusyError(
                        f"another process (pid {pid} on {host}) is computing {partial}; wait for it, "
                        f"or delete {lock} if that process is gone"
                    ) from None
                lock.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return lock
        raise CacheBusyError(f"could not lock {lock}")

    @staticmethod
    def _open_partial(
        partial: Path,
        key: str,
        specs: dict[str, tuple[tuple[int, ...], np.dtype]],
        n_rows: int,
        resume: bool,
    ) -> CacheWriter:
        """Reopen a matching partial entry (resume), or create fresh arrays."""
        progress_path = partial / "progress.json"
        progress = _read_json(progress_path) if resume else None
        arrays: dict[str, np.ndarray] = {}
        start, info = 0, {}
        if isinstance(progress, dict) and progress.get("key") == key:
            try:
                for k, (shape, dtype) in specs.items():
                    arr = np.load(partial / f"{k}.npy", mmap_mode="r+")
                    if arr.shape != shape or arr.dtype != dtype:
                        raise ValueError(f"{k}: shape or dtype changed")
                    arrays[k] = arr
                start = int(progress.get("n_done", 0))
                info = dict(progress.get("info") or {})
                if start:
                    log.info("resuming %s at row %d of %d", partial.name, start, n_rows)
            except (OSError, ValueError):
                arrays, start, info = {}, 0, {}
        if not arrays:
            for k, (shape, dtype) in specs.items():
                path = partial / f"{k}.npy"
                arrays[k] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
        writer = CacheWriter(arrays, n_rows, start, info, progress_path, key)
        _write_json(progress_path, {"key": key, "n_done": start, "info": info})
        return writer

    def entries(self) -> list[Path]:
        """The complete entry directories under the root."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and (p / "manifest.json").is_file())


# ---------------------------------------------------------------------------------------------------------
# Backbone feature extraction
# ---------------------------------------------------------------------------------------------------------


@dataclass
class ExtractedFeatures:
    """Backbone features of a list of images.

    Attributes:
        features: (N, F) clean or (N, V, F) view features, float16 (a read-only memmap when cached).
        valid: (N,) bool; False for unreadable images (their rows hold features of a grey placeholder).
        indices: (N,) the dataset indices of the rows.
        skipped: the paths (descriptions) of the first unreadable images.
        path: the cache entry directory, or None when computed without a cache.
        computed: whether the features were computed by this call (False: read from the cache).
    """

    features: np.ndarray
    valid: np.ndarray
    indices: np.ndarray
    skipped: list[str]
    path: Path | None
    computed: bool

    @property
    def n_skipped(self) -> int:
        """How many images were unreadable."""
        return int(len(self.valid) - np.count_nonzero(self.valid))


class _CleanItems(torch.utils.data.Dataset):
    """Row j -> (clean image tensor (3, H, W), dataset index, ok) of dataset image ``indices[j]``."""

    def __init__(self, source: ImageSource, indices: np.ndarray) -> None:
        self.source, self.indices = source, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int, bool]:
        return self.source[int(self.indices[j])]


class _ViewItems(torch.utils.data.Dataset):
    """Row j -> (V augmented views (V, 3, H, W), dataset index i, ok) of image i = ``indices[j]``.

    View v of image i is drawn with seed ``derive_seed(seed, i, v)``: independent of batching, workers
    and the resume point. The image is decoded once for all its views. ``first``: the number of the first
    view (views ``first .. first + V - 1``: more views added to a cached set are those a larger set holds).
    """

    def __init__(
        self,
        source: ImageSource,
        indices: np.ndarray,
        transform: Callable[..., torch.Tensor],
        n_views: int,
        seed: int,
        draft_size: int | None = None,
        first: int = 0,
    ) -> None:
        self.source, self.indices = source.with_transform(None), indices
        self.source.draft_size = draft_size
        self.transform, self.n_views, self.seed, self.first = transform, n_views, seed, first

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int, bool]:
        image, i, ok = self.source[int(self.indices[j])]
        views = []
        # one save/restore of the caller's generator per image, a fresh seed per view
        with torch.random.fork_rng(devices=[]):
            for v in range(self.first, self.first + self.n_views):
                torch.manual_seed(derive_seed(self.seed, i, v))
                views.append(self.transform(image))
        return torch.stack(views), i, ok


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers only decode and augment; the backbone keeps the cores


def _check_indices(dataset: ImageSource, indices: Any) -> np.ndarray:
    if indices is None:
        return np.arange(len(dataset), dtype=np.int64)
    idx = np.asarray(indices)
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"indices must be a 1-d integer array, got {idx.dtype} {idx.shape}")
    if idx.size and (idx.min() < 0 or idx.max() >= len(dataset)):
        raise ValueError(f"indices must lie in [0, {len(dataset)}), got [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64)


def _indices_hash(indices: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(indices, dtype=np.int64).data).hexdigest()[:24]


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def _backbone_fields(backbone: torch.nn.Module) -> dict[str, Any]:
    for attr in ("name", "weights_id", "feature_dim", "mean", "std", "default_resolution"):
        if not hasattr(backbone, attr):
            raise TypeError(f"backbone must be a hihpq Backbone (no attribute {attr!r})")
    fields = {
        "name": backbone.name,
        "weights": backbone.weights_id,
        "feature_dim": int(backbone.feature_dim),
        "mean": list(backbone.mean),
        "std": list(backbone.std),
    }
    # An inference runtime (hihpq.models.runtime) computes slightly different numbers: its name, version and
    # precision key its own entries. The PyTorch reference has none, so its existing entries stay valid.
    runtime_id = getattr(backbone, "runtime_id", None)
    if runtime_id is not None:
        fields["runtime"] = dict(runtime_id)
    return fields


def _run_extraction(
    backbone: torch.nn.Module,
    items: torch.utils.data.Dataset,
    writer: CacheWriter,
    skip: SkipLog,
    *,
    images_per_batch: int,
    device: torch.device,
    num_workers: int,
    progress: bool,
    desc: str,
) -> None:
    """Fill ``writer.arrays['features']`` and ``['valid']``, rows [writer.start, N), batch by batch."""
    feats, valid = writer.arrays["features"], writer.arrays["valid"]
    start = writer.start
    n_batches = -(-(writer.n_rows - start) // images_per_batch)
    # workers only pay off when they can prepare one batch while the backbone runs another
    workers = min(num_workers, max(n_batches - 1, 0))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(items, range(start, writer.n_rows)),
        batch_size=images_per_batch,
        shuffle=False,
        num_workers=workers,
        worker_init_fn=_worker_init if workers > 0 else None,
    )
    row = start
    t0 = time.perf_counter()
    was_training = backbone.training
    backbone.eval()  # restored below: no hidden mode change for the caller
    # a frozen backbone may offer a faster equivalent (e.g. BatchNorm folded into the convolutions)
    model = backbone.for_inference() if hasattr(backbone, "for_inference") else backbone
    bar = tqdm(total=writer.n_rows, initial=start, desc=desc, unit="img", disable=not progress, leave=False)
    try:
        with torch.inference_mode():
            for images, idx, ok in loader:
                b = images.shape[0]
                x = images.to(device).flatten(0, images.ndim - 4)  # (B, 3, H, W) or (B * V, 3, H, W)
                out = model(x).float().reshape(b, *feats.shape[1:]).cpu().numpy()
                if not np.isfinite(out).all() or np.abs(out).max(initial=0.0) > _FLOAT16_MAX:
                    raise ValueError(f"{desc}: backbone features are non-finite or exceed the float16 range")
                feats[row : row + b] = out.astype(np.float16)
                valid[row : row + b] = ok.numpy()
                skip.update(idx, ok)
                row += b
                writer.info["skipped"] = skip.indices[:100]
                writer.commit(row, min_interval_s=10.0)
                bar.update(b)
    finally:
        bar.close()
        backbone.train(was_training)
    elapsed = time.perf_counter() - t0
    if row > start:
        rate = (row - start) / max(elapsed, 1e-9)
        log.info("%s: %d images in %.1f s (%.1f img/s)", desc, row - start, elapsed, rate)


def _extract(
    backbone: torch.nn.Module,
    dataset: ImageSource,
    indices: np.ndarray,
    items: torch.utils.data.Dataset,
    fields: dict[str, Any],
    row_shape: tuple[int, ...],
    *,
    name: str,
    images_per_batch: int,
    device: str | torch.device,
    cache: FeatureCache | None,
    num_workers: int,
    progress: bool,
    desc: str,
) -> ExtractedFeatures:
    """Shared driver of the clean/view extraction, with or without a cache."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ValueError(f"num_workers must be a non-negative int, got {num_workers!r}")
    if cache is not None and not getattr(backbone, "is_frozen", False):
        raise ValueError(
            "the feature cache needs a frozen backbone (its features must not change during training); "
            "build it with trainable=False, or pass cache=None"
        )
    n = len(indices)
    specs = {"features": ((n, *row_shape), np.float16), "valid": ((n,), np.bool_)}
    skip = SkipLog(describe=dataset.describe)

    def compute(writer: CacheWriter) -> None:
        skip.indices[:] = [int(i) for i in writer.info.get("skipped", [])]  # from a resumed run
        _run_extraction(
            backbone,
            items,
            writer,
            skip,
            images_per_batch=images_per_batch,
            device=torch.device(device),
            num_workers=num_workers,
            progress=progress,
            desc=desc,
        )
        writer.info["n_skipped"] = int(n - np.count_nonzero(writer.arrays["valid"]))
        writer.info["skipped_examples"] = [dataset.describe(i) for i in skip.indices[:20]]

    if cache is None:
        arrays = {k: np.zeros(shape, dtype=dt) for k, (shape, dt) in specs.items()}
        writer = CacheWriter(arrays, n)
        compute(writer)
        features, valid, info, path, computed = arrays["features"], arrays["valid"], writer.info, None, True
    else:
        entry, computed = cache.get_or_compute(fields, compute, specs, name=name)
        features, valid, info, path = entry["features"], entry["valid"], entry.info, entry.path
    skipped = [str(s) for s in info.get("skipped_examples", [])]
    result = ExtractedFeatures(features, valid, indices, skipped, path, computed)
    if result.n_skipped:
        more = ", ..." if result.n_skipped > 5 else ""
        log.warning(
            "%s: skipped %d unreadable images: %s%s",
            desc,
            result.n_skipped,
            ", ".join(result.skipped[:5]),
            more,
        )
    return result


def extract_clean_features(
    backbone: torch.nn.Module,
    dataset: ImageSource,
    indices: Any = None,
    *,
    resolution: int | None = None,
    crop_ratio: float = 1.0,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    cache: FeatureCache | None = None,
    num_workers: int = 1,
    progress: bool = True,
    jpeg_draft: bool = True,
) -> ExtractedFeatures:
    """Backbone features of the clean (evaluation) view of ``dataset[indices]``: (N, F) float16.

    Args:
        backbone: a :class:`~hihpq.models.backbones.Backbone` (frozen when ``cache`` is given), already on
            ``device``.
        dataset: the images (its own transform is ignored).
        indices: dataset indices, in row order (default: all).
        resolution: input side (default ``backbone.default_resolution``).
        crop_ratio: see :func:`~hihpq.data.transforms.eval_transform`.
        batch_size: images per forward pass.
        device: where the inputs go.
        cache: a :class:`FeatureCache` to reuse / store the result; None computes in memory.
        num_workers: DataLoader worker processes decoding while the backbone runs (0 = decode in this
            process). 1 was fastest for 32 px CIFAR JPEGs on 2 shared cores.
        progress: show a tqdm bar.
        jpeg_draft: decode JPEG files at a reduced scale that keeps the resize target (PIL draft): several
            times faster on photos, slightly different pixels (part of the cache key); no effect on images
            already smaller than the target (CIFAR).

    Returns:
        :class:`ExtractedFeatures`: ``features`` (N, F) float16, ``valid`` (N,) bool, ...
    """
    idx = _check_indices(dataset, indices)
    backbone_fields = _backbone_fields(backbone)
    res = int(resolution if resolution is not None else backbone.default_resolution)
    transform = eval_transform(res, backbone.mean, backbone.std, crop_ratio)
    source = dataset.with_transform(transform)
    source.draft_size = clean_draft_size(res, crop_ratio) if jpeg_draft else None
    fields = {
        "kind": "clean",
        "dataset": dataset.identity(),
        "indices_sha256": _indices_hash(idx),
        "n": len(idx),
        "backbone": backbone_fields,
        "transform": eval_transform_config(res, crop_ratio),
        "jpeg_draft": source.draft_size,
    }
    return _extract(
        backbone,
        dataset,
        idx,
        _CleanItems(source, idx),
        fields,
        (int(backbone.feature_dim),),
        name="clean",
        images_per_batch=_positive_int("batch_size", batch_size),
        device=device,
        cache=cache,
        num_workers=num_workers,
        progress=progress,
        desc=f"{backbone.name} clean features",
    )


def extract_view_features(
    backbone: torch.nn.Module,
    dataset: ImageSource,
    indices: Any,
    *,
    n_views: int,
    augment: AugmentConfig,
    seed: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    cache: FeatureCache | None = None,
    num_workers: int = 2,
    progress: bool = True,
    jpeg_draft: bool = True,
) -> ExtractedFeatures:
    """Backbone features of ``n_views`` augmented views of each image of ``dataset[indices]``.

    View v of dataset image i is drawn with seed ``derive_seed(seed, i, v)``, so the views are
    reproducible and independent of batch size, workers and resumption. The training loop draws two
    different views per image per step from the result. When the cache holds fewer views of the same images
    (the same settings otherwise), only the missing views are computed and appended to them.

    Args:
        n_views: V, views per image.
        augment: the augmentation; its ``resolution`` is the input side. Normalised with the backbone's
            mean/std.
        seed: the augmentation seed (a non-negative int).
        batch_size: views per forward pass (whole images: ``max(1, batch_size // n_views)`` images).
        num_workers: DataLoader worker processes decoding and augmenting while the backbone runs (the
            augmentation costs 2-3 ms of CPU per view at 112 px); 2 was fastest on 2 shared cores.
        jpeg_draft: decode JPEG files at a reduced scale that keeps ``resolution`` pixels across the smallest
            crop the augmentation draws (see :func:`~hihpq.data.transforms.view_draft_size`; part of the key).
        Others: as :func:`extract_clean_features`.

    Returns:
        :class:`ExtractedFeatures` with ``features`` (N, V, F) float16.
    """
    idx = _check_indices(dataset, indices)
    backbone_fields = _backbone_fields(backbone)
    v = _positive_int("n_views", n_views)
    if not isinstance(augment, AugmentConfig):
        raise TypeError(f"augment must be an AugmentConfig, got {type(augment).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    fields = {
        "kind": "views",
        "dataset": dataset.identity(),
        "indices_sha256": _indices_hash(idx),
        "n": len(idx),
        "backbone": backbone_fields,
        "augment": augment.to_dict(),
        "n_views": v,
        "seed": int(seed),
        # the transforms' random streams belong to torchvision: another version may draw other views
        "torchvision": torchvision.__version__.split("+")[0],
        "augment_impl": AUGMENT_IMPL,
        "jpeg_draft": view_draft_size(augment) if jpeg_draft else None,
    }
    transform = train_transform(augment, backbone.mean, backbone.std)
    per_batch = _positive_int("batch_size", batch_size)

    def views(first: int, n: int, cache: FeatureCache | None) -> ExtractedFeatures:
        block = {**fields, "n_views": n, **({"first_view": first} if first else {})}
        return _extract(
            backbone,
            dataset,
            idx,
            _ViewItems(dataset, idx, transform, n, int(seed), fields["jpeg_draft"], first),
            block,
            (n, int(backbone.feature_dim)),
            name="views",
            images_per_batch=max(1, per_batch // n),
            device=device,
            cache=cache,
            num_workers=num_workers,
            progress=progress,
            desc=f"{backbone.name} {n} views" if not first else f"{backbone.name} views {first + 1}-{first + n}",
        )

    fewer = _fewer_cached_views(cache, fields) if cache is not None else None
    if fewer is None:
        return views(0, v, cache)
    held = fewer["features"].shape[1]
    added = views(held, v - held, None)  # (in memory: the composed entry below is what the cache keeps)

    def compose(writer: CacheWriter) -> None:
        writer.arrays["features"][:, :held] = fewer["features"]
        writer.arrays["features"][:, held:] = added.features
        writer.arrays["valid"][:] = fewer["valid"] & added.valid
        writer.info.update(fewer.info, n_skipped=int(len(idx) - np.count_nonzero(writer.arrays["valid"])))

    specs = {"features": ((len(idx), v, int(backbone.feature_dim)), np.float16), "valid": ((len(idx),), np.bool_)}
    entry, _ = cache.get_or_compute(fields, compose, specs, name="views")
    skipped = [str(x) for x in entry.info.get("skipped_examples", [])]
    return ExtractedFeatures(entry["features"], entry["valid"], idx, skipped, entry.path, True)


def _fewer_cached_views(cache: FeatureCache, fields: dict[str, Any]) -> CacheEntry | None:
    """The cached entry of the most views below ``fields["n_views"]`` of the same images and settings, when
    the entry of ``fields`` itself is not cached."""
    if cache.lookup(fields, "views") is not None:
        return None
    for n in range(fields["n_views"] - 1, 0, -1):
        entry = cache.lookup({**fields, "n_views": n}, "views")
        if entry is not None:
            return entry
    return None
