"""From a Config to the data of a run: the retrieval protocol's split, cached frozen-backbone features, or the
augmenting image source of end-to-end training; and listing loose image files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hihpq.config import Config

__all__ = [
    "DataNotFoundError",
    "PreparedFeatures",
    "PreparedOnline",
    "auto_levels",
    "images_split",
    "list_images",
    "make_split",
    "prepare_features",
    "prepare_online",
    "resolve_levels",
    "validation_split",
]


# ----------------------------------------------------------------------------------------- data and features
class DataNotFoundError(FileNotFoundError):
    """The configured dataset is not on this machine (and could not be downloaded)."""


def make_split(cfg: Config, data_dir: str | None = None):
    """The retrieval protocol of ``cfg.data`` (queries / database / training indices into a pooled dataset)."""
    from hihpq.data import (
        ArrayImageDataset,
        ImageFolderDataset,
        Split,
        cifar10_split,
        find_cifar10,
        flickr25k_split,
        nuswide_split,
        random_split_indices,
    )

    d = cfg.data
    root = data_dir or d.root
    if d.dataset == "cifar10":
        found = find_cifar10(root)
        if found is None:
            raise DataNotFoundError(
                "CIFAR-10 not found: pass --data DIR (a folder with cifar10-jpeg/ or cifar-10-batches-py/), "
                "set $HIHPQ_DATA, or connect to the internet so torchvision can download it"
            )
        kw = {
            "queries_per_class": d.queries_per_class or 1000,
            "train_per_class": d.train_per_class,
            "db_per_class": d.database_per_class,
        }
        return cifar10_split(found, d.protocol, d.split_seed, **kw)
    if d.dataset == "digits":  # scikit-learn's bundled 8x8 digits: the offline fallback of the demo
        from sklearn.datasets import load_digits

        digits = load_digits()
        img = (digits.images / 16.0 * 255).astype(np.uint8)
        img = np.repeat(img[..., None], 3, axis=-1)
        ds = ArrayImageDataset(img, digits.target.astype(np.int64), name="sklearn-digits")
        q, db, tr = random_split_indices(len(img), d.split_seed, n_query=d.n_query or 297, n_train=d.n_train or 1000)
        return Split("digits", ds, q, db, tr, seed=d.split_seed, params={"n_query": len(q), "n_train": len(tr)})
    if root is None:
        raise DataNotFoundError(f"data.root (or --data DIR) must point at the {d.dataset} images")
    if d.dataset == "images":
        return images_split(root, eval_labels=d.eval_labels, n_query=d.n_query, seed=d.split_seed)
    if d.dataset == "folder":
        ds = ImageFolderDataset(root)
        nq = d.n_query or max(1, len(ds) // 10)
        nd = d.n_database or len(ds) - nq
        q, db, tr = random_split_indices(
            len(ds), d.split_seed, n_query=nq, n_train=d.n_train or nd, n_database=d.n_database
        )
        params = {"n_query": nq, "n_train": len(tr)}
        if d.n_database is not None:  # only when given: the cache keys of earlier folder runs stay valid
            params["n_database"] = len(db)
        return Split("folder", ds, q, db, tr, seed=d.split_seed, params=params)
    if d.lists is None:
        raise DataNotFoundError(f"data.lists must point at the folder with the {d.dataset} list files")
    if d.dataset == "flickr25k":
        n_query, n_train = d.n_query or 2000, d.n_train or 5000
        return flickr25k_split(d.lists, root, d.split_seed, n_query=n_query, n_train=n_train, n_database=d.n_database)
    lists = Path(d.lists)
    if d.database_list is None:
        raise DataNotFoundError("nuswide needs data.database_list (the database list file of the protocol)")
    return nuswide_split(root, lists / "test.txt", lists / "train_10500.txt", d.database_list)


def _read_label_csv(path: Path, root: Path, paths: list[Path]) -> np.ndarray:
    """Labels (N,) int64 of ``paths`` from a CSV of ``path,label`` lines (paths relative to ``root`` or absolute;
    a header line is allowed); -1 for images it does not name."""
    import csv

    if not path.is_file():
        raise FileNotFoundError(f"evaluation labels file {path} does not exist (expected CSV lines path,label)")
    where = {p.resolve(): i for i, p in enumerate(paths)}
    labels = np.full(len(paths), -1, np.int64)
    names: dict[str, int] = {}
    with open(path, newline="", encoding="utf-8") as fh:
        for n, row in enumerate(csv.reader(fh), 1):
            if not row or (n == 1 and row[0].strip().lower() == "path"):
                continue
            if len(row) != 2:
                raise ValueError(f"{path}, line {n}: expected 'path,label', got {row!r}")
            file = Path(row[0].strip())
            i = where.get((file if file.is_absolute() else root / file).resolve())
            if i is None:
                raise ValueError(f"{path}, line {n}: {row[0]!r} is not an image under {root}")
            labels[i] = names.setdefault(row[1].strip(), len(names))
    if (labels >= 0).sum() < 2:
        raise ValueError(f"{path} labels fewer than 2 images of {root}: nothing to evaluate")
    return labels


def _folder_labels(root: Path, paths: list[Path]) -> np.ndarray | None:
    """Class ids from the sub-folder names when every image sits exactly one folder below ``root`` and there are
    at least two such folders (the layout root/<class>/<image>); else None (unlabelled)."""
    parts = [p.relative_to(root).parts for p in paths]
    if any(len(q) != 2 for q in parts):
        return None
    classes = sorted({q[0] for q in parts})
    if len(classes) < 2:
        return None
    ids = {c: i for i, c in enumerate(classes)}
    return np.array([ids[q[0]] for q in parts], np.int64)


def images_split(root, *, eval_labels: str | None = None, n_query: int | None = None, seed: int = 2021):
    """Every image below ``root`` (any tree, flat or nested) is a training image: nothing is held out.

    Evaluation needs labels: ``eval_labels`` (a CSV of path,label) or class sub-folders (every image exactly one
    folder below ``root``, at least two folders). With labels, ``n_query`` (default a tenth) labelled images drawn
    with ``seed`` are the queries and the other labelled images the database; without, there are no queries
    (``split.query`` is empty) and the database is every image.
    """
    from hihpq.data import ImageDataset, Split

    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataNotFoundError(f"image folder {root} does not exist or is not a directory")
    paths = list_images(root)
    labels = _read_label_csv(Path(eval_labels), root, paths) if eval_labels else _folder_labels(root, paths)
    ds = ImageDataset([p.relative_to(root).as_posix() for p in paths], labels, root=root)
    everything = np.arange(len(paths), dtype=np.int64)
    if labels is None:
        query, database = np.zeros(0, np.int64), everything
    else:
        labelled = np.flatnonzero(labels >= 0)
        nq = n_query or max(1, len(labelled) // 10)
        if not 0 < nq < len(labelled):
            raise ValueError(f"data.n_query={nq} must be in [1, {len(labelled)}) (the labelled images)")
        perm = np.random.default_rng(seed).permutation(labelled)
        query, database = np.sort(perm[:nq]), np.sort(perm[nq:])
    params = {"n_query": len(query), "n_train": len(everything), "labelled": labels is not None}
    return Split("images", ds, query, database, everything, seed=seed, params=params)


def resolve_levels(cfg: Config, n_train: int) -> None:
    """Set ``cfg.hierarchy.levels`` from :func:`auto_levels` when the config gives none (``levels: []``)."""
    if not cfg.hierarchy.levels:
        cfg.hierarchy.levels = auto_levels(n_train)


def auto_levels(n_train: int) -> list[int]:
    """Hierarchy level sizes when a config gives none: [N/50, N/100, N/200] for N training images, each at least 2
    and below N, duplicates dropped (coarsest last)."""
    sizes = [max(2, min(n_train // d, n_train - 1)) for d in (50, 100, 200)]
    return sorted(set(sizes), reverse=True)


def validation_split(split, n_query: int, seed: int = 0, n_fit: int | None = None, train_valid=None):
    """(the split of :meth:`PreparedFeatures.validation_fold`, positions of its training images in ``split.train``).

    Its queries, database and training images are all training images of ``split`` (``train_valid``: False for
    unreadable ones, which are left out); usable before any feature is computed.
    """
    from hihpq.data import Split

    pos = np.arange(len(split.train)) if train_valid is None else np.flatnonzero(train_valid)
    if not 0 < n_query < len(pos):
        raise ValueError(f"n_query={n_query}: the validation fold needs 0 < n_query < {len(pos)} training images")
    n_db = len(pos) - n_query
    if n_fit is not None and not 0 < n_fit <= n_db:
        raise ValueError(f"n_fit={n_fit}: the validation fold trains on 1 to {n_db} of its database images")
    perm = np.random.default_rng(seed).permutation(pos)
    q_pos, db_pos = np.sort(perm[:n_query]), np.sort(perm[n_query:])
    fit_pos = db_pos if n_fit is None else np.sort(perm[n_query : n_query + n_fit])
    train = split.train
    params = {"n_query": int(n_query), "n_database": len(db_pos), "n_train": len(fit_pos), "of": split.name}
    fold = Split(
        f"{split.name}-validation", split.dataset, train[q_pos], train[db_pos], train[fit_pos], seed=seed, params=params
    )
    return fold, fit_pos


@dataclass
class PreparedFeatures:
    """Frozen-backbone features of one protocol: the clean view of every used image, V views of each training one."""

    split: Any
    clean: np.ndarray  # (n_used, F) float16, rows follow ``used``
    used: np.ndarray  # sorted pool indices with a clean row
    views: np.ndarray  # (n_train, V, F) float16, rows follow split.train
    n_skipped: int  # unreadable images (left out of every set: split.without, train_valid)
    train_valid: np.ndarray | None = None  # (n_train,) False for unreadable training images
    backbone: torch.nn.Module | None = None  # the frozen backbone that made the features

    def clean_of(self, pool_idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.clean[np.searchsorted(self.used, pool_idx)], dtype=np.float32)

    @property
    def queries(self) -> np.ndarray:
        return self.clean_of(self.split.query)

    @property
    def database(self) -> np.ndarray:
        return self.clean_of(self.split.database)

    def validation_fold(self, n_query: int, seed: int = 0, n_fit: int | None = None) -> PreparedFeatures:
        """A protocol made of training images only, for choosing settings without touching the test queries.

        ``n_query`` seeded training images become the queries and the other training images the database. The
        training set is the whole database (default), or ``n_fit`` of its images, so that part of the database
        was never trained on, as in the benchmark protocols (where 90% of the database is unseen): a fold
        whose database is its training set rewards settings that memorise the training images.
        Unreadable training images are left out.
        """
        split, fit_pos = validation_split(self.split, n_query, seed, n_fit, self.train_valid)
        return PreparedFeatures(split, self.clean, self.used, np.asarray(self.views[fit_pos]), 0, None, self.backbone)

    def train_source(self):
        from hihpq.train import CachedViews

        rows = np.searchsorted(self.used, self.split.train)
        if self.train_valid is None or self.train_valid.all():
            return CachedViews(self.views, self.clean[rows])
        keep = np.flatnonzero(self.train_valid)
        return CachedViews(np.asarray(self.views[keep]), np.asarray(self.clean[rows[keep]]))


def prepare_features(
    cfg: Config,
    split=None,
    *,
    data_dir: str | None = None,
    progress: bool = True,
    backbone: torch.nn.Module | None = None,
    views: bool = True,
) -> PreparedFeatures:
    """Compute (or read from the cache) backbone features for a frozen-backbone run.

    ``backbone``: the frozen backbone to use (a loaded model's; it stays on its device), else the config's one is
    built on ``cfg.train.device``. ``views=False`` skips the augmented training views (evaluation only).
    """
    from hihpq.data import AugmentConfig, FeatureCache, extract_clean_features, extract_view_features
    from hihpq.models import frozen_backbone

    if cfg.backbone.trainable and backbone is None:
        raise ValueError("the feature cache needs a frozen backbone (backbone.trainable=false)")
    split = split if split is not None else make_split(cfg, data_dir)
    if backbone is None:  # in the fastest allowed runtime (hihpq.models.runtime)
        b = cfg.backbone
        device = cfg.train.device
        backbone = frozen_backbone(b.name, b.weights, b.resolution, b.runtime, b.precision, device)
    else:
        # a compiled backbone (hihpq.models.runtime) has no parameters and runs on the CPU
        device = next(backbone.parameters(), torch.empty(0)).device
    cache = FeatureCache(cfg.features.cache_dir)
    used = np.unique(np.concatenate([split.query, split.database, split.train]))
    common = {"batch_size": cfg.features.batch_size, "device": device, "cache": cache, "progress": progress}
    if cfg.features.num_workers is not None:
        common["num_workers"] = cfg.features.num_workers
    clean = extract_clean_features(backbone, split.dataset, used, resolution=cfg.backbone.resolution, **common)
    if not views:
        empty = np.zeros((0, cfg.features.n_views, clean.features.shape[1]), np.float16)
        split = split.without(used[~clean.valid], sets=("query", "database"))  # as below
        return PreparedFeatures(split, clean.features, used, empty, clean.n_skipped, None, backbone)
    aug = AugmentConfig(resolution=cfg.backbone.resolution)
    viewed = extract_view_features(
        backbone,
        split.dataset,
        split.train,
        n_views=cfg.features.n_views,
        augment=aug,
        seed=cfg.features.seed,
        **common,
    )
    train_valid = viewed.valid & clean.valid[np.searchsorted(used, split.train)]
    # issue 13: unreadable images leave the query and database sets (training ones are masked by train_valid)
    split = split.without(used[~clean.valid], sets=("query", "database"))
    return PreparedFeatures(split, clean.features, used, viewed.features, clean.n_skipped, train_valid, backbone)


# ------------------------------------------------------------------------------------- online (end to end)
@dataclass
class PreparedOnline:
    """What an end-to-end run needs: the protocol, the backbone to train and the augmenting view source."""

    split: Any
    backbone: torch.nn.Module
    source: Any  # hihpq.train.ImageViews over split.train

    @property
    def in_dim(self) -> int:
        return int(self.backbone.feature_dim)

    @property
    def n_skipped(self) -> int:
        return self.source.n_skipped


def prepare_online(cfg: Config, split=None, data_dir: str | None = None) -> PreparedOnline:
    """Build the backbone (``cfg.backbone.trainable`` set trainable) and the view source of the training images.

    No feature is computed: every training step augments images and runs them through the backbone.
    """
    from hihpq.data import AugmentConfig, eval_transform, train_transform
    from hihpq.models import build_backbone
    from hihpq.train import ImageViews

    split = split if split is not None else make_split(cfg, data_dir)
    bb = cfg.backbone
    backbone = build_backbone(bb.name, weights=bb.weights, trainable=bb.trainable)
    res = bb.resolution
    workers = cfg.features.num_workers
    source = ImageViews(
        split.dataset,
        split.train,
        train_transform(AugmentConfig(resolution=res), backbone.mean, backbone.std),
        eval_transform(res, backbone.mean, backbone.std),
        num_workers=4 if workers is None else workers,
        clean_batch_size=cfg.features.batch_size,
    )
    return PreparedOnline(split, backbone, source)


# ------------------------------------------------------------------------------------------- loose images
def list_images(path: str | Path) -> list[Path]:
    """One image file, or every image file below a folder (sorted)."""
    from hihpq.data.folders import IMAGE_EXTENSIONS, walk_image_files

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither an image file nor a folder")
    files = walk_image_files(path)  # issue 13: links followed once per real file, FIFOs left out
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    return files
