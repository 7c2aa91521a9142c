"""Benchmark datasets and their retrieval protocols (DESIGN.md section 3), seeded and reproducible.

Every protocol pools all images of a benchmark into one :class:`~hihpq.data.folders.ImageSource` and
returns a :class:`Split` of index arrays into that pool (query / database / train), so backbone features
are computed once per image and shared by all three sets.

- CIFAR-10 (I): per class 1,000 queries; the other 50,000 images are database and training set.
- CIFAR-10 (II): per class 1,000 queries; database = the other 50,000; training = 500 per class taken
  from the database. Both: a seeded permutation per class of train + test pooled (6,000 per class).
- Flickr25K: one seeded permutation; 2,000 queries, the remaining 23,000 database, 5,000 training images
  from the database. Multi-label (24 concepts).
- NUS-WIDE (21 concepts): test list = queries, train list = training, database list given by the user.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import socket
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hihpq.data.folders import ArrayImageDataset, ImageDataset, ImageSource, scan_image_folder

__all__ = [
    "CIFAR10_CLASSES",
    "DEFAULT_SEED",
    "Split",
    "cifar10_protocol_indices",
    "cifar10_split",
    "default_cache_dir",
    "find_cifar10",
    "flickr25k_split",
    "load_cifar10",
    "nuswide_split",
    "random_split_indices",
    "read_flickr25k_lists",
    "read_label_list",
]

log = logging.getLogger(__name__)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip

DEFAULT_SEED = 2021  # the authors' scripts


def default_cache_dir() -> Path:
    """``$HIHPQ_CACHE`` or ``~/.cache/hihpq``: where unpacked datasets and feature caches go."""
    env = os.environ.get("HIHPQ_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hihpq"


# ---------------------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------------------


def _hash_indices(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a, dtype=np.int64).data)
        h.update(b"|")
    return h.hexdigest()[:16]


@dataclass(frozen=True)
class Split:
    """A retrieval protocol on a pooled dataset.

    Attributes:
        name: e.g. "cifar10-II".
        dataset: the pooled images (no transform); ``dataset.labels`` holds all labels.
        query, database, train: int64 index arrays into the pool (read-only). ``query`` and ``database``
            are disjoint; ``train`` may overlap the database (it does in every standard protocol).
        seed: the permutation seed (None for fixed lists).
        params: the protocol parameters (counts), recorded in cache keys and run files.
    """

    name: str
    dataset: ImageSource
    query: np.ndarray
    database: np.ndarray
    train: np.ndarray
    seed: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.dataset)
        for attr in ("query", "database", "train"):
            arr = np.array(getattr(self, attr), dtype=np.int64)
            if arr.ndim != 1 or (arr.size and (arr.min() < 0 or arr.max() >= n)):
                raise ValueError(f"Split.{attr} must be 1-d indices in [0, {n}), got shape {arr.shape}")
            arr.setflags(write=False)
            object.__setattr__(self, attr, arr)
        if np.intersect1d(self.query, self.database).size:
            raise ValueError("query and database indices overlap")

    @property
    def labels(self) -> np.ndarray:
        """Pooled labels: (N,) int64 or (N, L) uint8."""
        return self.dataset.labels

    @property
    def multilabel(self) -> bool:
        return self.dataset.multilabel

    @property
    def query_labels(self) -> np.ndarray:
        return self.labels[self.query]

    @property
    def database_labels(self) -> np.ndarray:
        return self.labels[self.database]

    @property
    def train_labels(self) -> np.ndarray:
        return self.labels[self.train]

    def identity(self) -> dict[str, Any]:
        """JSON-able identity: dataset identity, protocol, seed, parameters, hash of the index arrays."""
        return {
            "name": self.name,
            "dataset": self.dataset.identity(),
            "seed": self.seed,
            "params": self.params,
            "indices_sha256": _hash_indices(self.query, self.database, self.train),
        }

    def without(self, pool_indices: Any, sets: tuple[str, ...] = ("query", "database", "train")) -> Split:
        """The same protocol with these pool items removed from ``sets`` (e.g. unreadable images, which would
        otherwise stay in as identical placeholders); ``params["excluded"]`` counts the pool items removed."""
        bad = np.unique(np.asarray(pool_indices, dtype=np.int64).reshape(-1))
        if not bad.size:
            return self
        kept = {s: getattr(self, s)[~np.isin(getattr(self, s), bad)] for s in sets}
        gone = np.setdiff1d(np.concatenate([getattr(self, s) for s in sets]), np.concatenate(list(kept.values())))
        params = {**self.params, "excluded": int(self.params.get("excluded", 0)) + int(gone.size)}
        return dataclasses.replace(self, **kept, params=params)

    def summary(self) -> str:
        kind = "multi-label" if self.multilabel else "single-label"
        return (
            f"{self.name}: {len(self.query)} queries, {len(self.database)} database, "
            f"{len(self.train)} training images ({kind}, pool of {len(self.dataset)}, seed {self.seed})"
            + (f"; {self.params['excluded']} unreadable images left out" if self.params.get("excluded") else "")
        )


# ---------------------------------------------------------------------------------------------------------
# Index-level protocols (pure functions of labels and seed)
# ---------------------------------------------------------------------------------------------------------


def _count(name: str, value: Any, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
        expected = "a non-negative int" + (" or None" if allow_none else "")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return int(value)


def cifar10_protocol_indices(
    labels: np.ndarray,
    protocol: str = "II",
    seed: int = DEFAULT_SEED,
    *,
    queries_per_class: int = 1000,
    train_per_class: int | None = None,
    db_per_class: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query / database / train indices of CIFAR-10 protocol (I) or (II) over pooled ``labels``.

    Per class (in sorted label order), one permutation drawn from ``np.random.default_rng(seed)``: the
    first ``queries_per_class`` are queries, the next ``db_per_class`` (default: all the rest) the
    database. Training: protocol II takes the first ``train_per_class`` (default 500) database images of
    each class; protocol I uses the whole database, or its first ``train_per_class`` per class when given
    (reduced demo runs).

    Args:
        labels: (N,) integer class ids.
        protocol: "I" or "II".
        seed: permutation seed.

    Returns:
        (query, database, train): sorted int64 index arrays.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    protocol = str(protocol).upper()
    if protocol not in ("I", "II"):
        raise ValueError(f"protocol must be 'I' or 'II', got {protocol!r}")
    nq = _count("queries_per_class", queries_per_class, allow_none=False)
    nt = _count("train_per_class", train_per_class)
    nd = _count("db_per_class", db_per_class)
    if protocol == "II" and nt is None:
        nt = 500
    rng = np.random.default_rng(seed)
    query, database, train = [], [], []
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)
        perm = members[rng.permutation(len(members))]
        db_end = len(perm) if nd is None else nq + nd
        if db_end > len(perm):
            raise ValueError(
                f"class {cls} has {len(perm)} images, fewer than queries_per_class + db_per_class = {db_end}"
            )
        q, db = perm[:nq], perm[nq:db_end]
        if nt is not None and nt > len(db):
            raise ValueError(f"train_per_class={nt} exceeds the {len(db)} database images of class {cls}")
        query.append(q)
        database.append(db)
        train.append(db if nt is None else db[:nt])
    q_all, db_all, tr_all = (np.sort(np.concatenate(a)).astype(np.int64) for a in (query, database, train))
    return q_all, db_all, tr_all


def random_split_indices(
    n: int,
    seed: int = DEFAULT_SEED,
    *,
    n_query: int = 2000,
    n_train: int = 5000,
    n_database: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One seeded permutation of ``range(n)`` (the Flickr25K protocol: 2,000 / 23,000 / 5,000).

    The first ``n_query`` are queries, the next ``n_database`` (default: all the rest) the database, and
    the first ``n_train`` of the database the training set.

    Returns:
        (query, database, train): sorted int64 index arrays.
    """
    n = _count("n", n, allow_none=False)
    nq = _count("n_query", n_query, allow_none=False)
    if nq >= n:
        raise ValueError(f"n_query={nq} queries leave no database image among the {n} images; lower n_query")
    nt = _count("n_train", n_train, allow_none=False)
    nd = _count("n_database", n_database)
    db_end = n if nd is None else nq + nd
    if db_end > n or nq > n:
        raise ValueError(f"n_query={nq} and n_database={nd} exceed the {n} images")
    if nt > db_end - nq:
        raise ValueError(f"n_train={nt} exceeds the {db_end - nq} database images")
    perm = np.random.default_rng(seed).permutation(n)
    q, db = perm[:nq], perm[nq:db_end]
    return np.sort(q).astype(np.int64), np.sort(db).astype(np.int64), np.sort(db[:nt]).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# CIFAR-10
# ---------------------------------------------------------------------------------------------------------


def _is_image_split_dir(d: Path) -> bool:
    return (d / "train").is_dir() and (d / "test").is_dir()


def _extract_tarball(tarball: Path, cache_dir: Path) -> Path:
    """Unpack ``tarball`` once under ``cache_dir``, atomically (a half-unpacked copy is never used)."""
    target = cache_dir / tarball.name.removesuffix(".tar.gz").removesuffix(".tgz")
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{target.name}.{os.getpid()}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    log.info("unpacking %s into %s (once)", tarball, cache_dir)
    try:
        with tarfile.open(tarball) as tar:
            # the "data" filter (Python >= 3.10.12) rejects absolute paths, links out of the tree, devices
            safe: dict[str, Any] = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **safe)
        entries = [p for p in tmp.iterdir() if not p.name.startswith(".")]
        inner = entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp
        try:
            os.replace(inner, target)
        except OSError:
            if not target.is_dir():  # else a concurrent unpacker won the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _resolve_cifar_dir(d: Path, cache_dir: Path) -> Path | None:
    """A path :func:`load_cifar10` can open, found at or inside ``d``; None when there is none."""
    if d.is_file() and d.name.endswith((".tar.gz", ".tgz")):
        return _resolve_cifar_dir(_extract_tarball(d, cache_dir), cache_dir)
    if not d.is_dir():
        return None
    if _is_image_split_dir(d) or (d / "cifar-10-batches-py").is_dir():
        return d
    if d.name == "cifar-10-batches-py":
        return d.parent
    if _is_image_split_dir(d / "cifar10-jpeg"):
        return d / "cifar10-jpeg"
    if (d / "cifar10-jpeg.tar.gz").is_file():
        return _resolve_cifar_dir(_extract_tarball(d / "cifar10-jpeg.tar.gz", cache_dir), cache_dir)
    return None


def _online(host: str, timeout: float = 3.0) -> bool:
    """True when ``host:443`` accepts a TCP connection within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def find_cifar10(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path | None:
    """Locate CIFAR-10 for :func:`load_cifar10`.

    Order: ``data_dir`` (``--data DIR``), else ``$HIHPQ_DATA``, else an earlier unpack/download in
    ``cache_dir`` (default :func:`default_cache_dir`), else a torchvision download into
    ``cache_dir/cifar10`` when ``download`` and online, else None.

    A directory qualifies when it is or contains ``cifar10-jpeg/`` (``train/<class>/`` + ``test/<class>/``),
    holds the ``train/`` + ``test/`` folders directly, or holds torchvision's ``cifar-10-batches-py``; a
    ``cifar10-jpeg.tar.gz`` (the file itself, or inside the directory) is unpacked once into ``cache_dir``.

    Raises:
        FileNotFoundError: an explicit ``data_dir`` holds no CIFAR-10.
    """
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    if data_dir is not None:
        found = _resolve_cifar_dir(Path(data_dir).expanduser(), cache)
        if found is None:
            raise FileNotFoundError(
                f"no CIFAR-10 in {data_dir}: expected cifar10-jpeg/{{train,test}}/<class>/*.jpg, train/ + "
                "test/ class folders, cifar-10-batches-py/, or cifar10-jpeg.tar.gz"
            )
        return found
    env = os.environ.get("HIHPQ_DATA")
    if env:
        found = _resolve_cifar_dir(Path(env).expanduser(), cache)
        if found is not None:
            return found
        log.info("$HIHPQ_DATA=%s holds no CIFAR-10", env)
    if _is_image_split_dir(cache / "cifar10-jpeg"):
        return cache / "cifar10-jpeg"
    if (cache / "cifar10" / "cifar-10-batches-py").is_dir():
        return cache / "cifar10"
    if download and _online("www.cs.toronto.edu"):
        from torchvision.datasets import CIFAR10

        root = cache / "cifar10"
        CIFAR10(root=str(root), train=True, download=True)  # one archive holds train and test
        return root
    return None


def load_cifar10(path: str | os.PathLike[str]) -> ImageSource:
    """Pooled CIFAR-10 (the official train images first, then test; 6,000 per class) from ``path``.

    ``path`` is an image-folder root with ``train/`` and ``test/`` (e.g. ``.../cifar10-jpeg``) or a
    torchvision root containing ``cifar-10-batches-py`` (read with ``download=False``); see
    :func:`find_cifar10`. Labels follow the sorted class names, which is the usual CIFAR-10 order.
    """
    root = Path(path).expanduser()
    if _is_image_split_dir(root):
        paths: list[str] = []
        labels = []
        classes: list[str] | None = None
        for part in ("train", "test"):
            p, lab, cls = scan_image_folder(root / part)
            if classes is not None and cls != classes:
                raise ValueError(f"{root}: train/ and test/ have different class folders: {classes} vs {cls}")
            classes = cls
            paths.extend(f"{part}/{q}" for q in p)
            labels.append(lab)
        return ImageDataset(paths, np.concatenate(labels), root=root, classes=classes)
    if (root / "cifar-10-batches-py").is_dir():
        from torchvision.datasets import CIFAR10

        parts = [CIFAR10(root=str(root), train=t, download=False) for t in (True, False)]
        images = np.concatenate([p.data for p in parts])
        targets = np.concatenate([np.asarray(p.targets, dtype=np.int64) for p in parts])
        return ArrayImageDataset(images, targets, name="cifar10-torchvision", classes=parts[0].classes)
    raise FileNotFoundError(
        f"{root} is not a CIFAR-10 root (expected train/ + test/ class folders or cifar-10-batches-py/); "
        "see find_cifar10()"
    )


def cifar10_split(
    data: str | os.PathLike[str] | ImageSource,
    protocol: str = "II",
    seed: int = DEFAULT_SEED,
    *,
    queries_per_class: int = 1000,
    train_per_class: int | None = None,
    db_per_class: int | None = None,
) -> Split:
    """CIFAR-10 protocol (I) or (II) on the pooled dataset (a path for :func:`load_cifar10`, or a source).

    Counts default to the paper's (1,000 queries per class; II: 500 training images per class); pass
    smaller ones for a quick demo. See :func:`cifar10_protocol_indices`.
    """
    dataset = data if isinstance(data, ImageSource) else load_cifar10(data)
    if dataset.multilabel:
        raise ValueError("the CIFAR-10 protocols need single-label data")
    q, db, tr = cifar10_protocol_indices(
        dataset.labels,
        protocol,
        seed,
        queries_per_class=queries_per_class,
        train_per_class=train_per_class,
        db_per_class=db_per_class,
    )
    params = {
        "protocol": str(protocol).upper(),
        "queries_per_class": queries_per_class,
        "train_per_class": train_per_class,
        "db_per_class": db_per_class,
    }
    return Split(f"cifar10-{params['protocol']}", dataset, q, db, tr, seed=seed, params=params)


# ---------------------------------------------------------------------------------------------------------
# Flickr25K and NUS-WIDE (multi-label, from list files)
# ---------------------------------------------------------------------------------------------------------


def _parse_label_rows(rows: Sequence[str], source: str) -> np.ndarray:
    """0/1 label rows (whitespace separated) -> (N, L) uint8; errors name the file and line."""
    out = []
    width = None
    for i, row in enumerate(rows):
        parts = row.split()
        width = len(parts) if width is None else width
        if len(parts) != width or width == 0:
            raise ValueError(f"{source}:{i + 1}: expected {width} labels, got {len(parts)}")
        if any(v not in ("0", "1") for v in parts):
            raise ValueError(f"{source}:{i + 1}: labels must be 0 or 1, got {row.strip()!r}")
        out.append([v == "1" for v in parts])
    return np.asarray(out, dtype=np.uint8).reshape(len(out), width or 0)


def _read_lines(path: Path) -> list[str]:
    """Non-empty lines of a text file."""
    if not path.is_file():
        raise FileNotFoundError(f"list file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def read_flickr25k_lists(
    img_list: str | os.PathLike[str], targets: str | os.PathLike[str]
) -> tuple[list[str], np.ndarray]:
    """Read the MIRFlickr-25K lists: ``img.txt`` (a file name a line) and ``targets.txt`` (0/1 rows).

    Returns:
        (names, labels): N relative file names and (N, L) uint8 labels (L = 24).
    """
    names = [line.strip() for line in _read_lines(Path(img_list))]
    labels = _parse_label_rows(_read_lines(Path(targets)), str(targets))
    if len(names) != len(labels):
        raise ValueError(f"{img_list} has {len(names)} names but {targets} has {len(labels)} label rows")
    return names, labels


def read_label_list(path: str | os.PathLike[str]) -> tuple[list[str], np.ndarray]:
    """Read a DeepHash-style list (NUS-WIDE): rows ``relative/path.jpg l1 l2 ... lL`` with 0/1 labels.

    Returns:
        (paths, labels): N relative paths and (N, L) uint8 labels.
    """
    path = Path(path)
    names, rows = [], []
    for i, line in enumerate(_read_lines(path)):
        parts = line.split(maxsplit=1)
        if len(parts) != 2:
            raise ValueError(f"{path}:{i + 1}: expected 'relative/path.jpg' then 0/1 labels, got {line!r}")
        names.append(parts[0])
        rows.append(parts[1])
    return names, _parse_label_rows(rows, str(path))


def flickr25k_split(
    list_dir: str | os.PathLike[str],
    image_root: str | os.PathLike[str],
    seed: int = DEFAULT_SEED,
    *,
    n_query: int = 2000,
    n_train: int = 5000,
    n_database: int | None = None,
    img_list: str = "img.txt",
    targets: str = "targets.txt",
) -> Split:
    """Flickr25K protocol: one seeded permutation; ``n_query`` queries, the rest database, ``n_train``
    training images from the database. The images are ``image_root/<name from img.txt>``.
    """
    list_dir = Path(list_dir)
    names, labels = read_flickr25k_lists(list_dir / img_list, list_dir / targets)
    dataset = ImageDataset(names, labels, root=image_root)
    q, db, tr = random_split_indices(len(names), seed, n_query=n_query, n_train=n_train, n_database=n_database)
    params = {"n_query": n_query, "n_train": n_train, "n_database": n_database}
    return Split("flickr25k", dataset, q, db, tr, seed=seed, params=params)


def nuswide_split(
    image_root: str | os.PathLike[str],
    query_list: str | os.PathLike[str],
    train_list: str | os.PathLike[str],
    database_list: str | os.PathLike[str],
) -> Split:
    """NUS-WIDE protocol from list files (see :func:`read_label_list`).

    Test list = queries, train list = training set, database list as given. The pool holds each distinct
    path once (training images usually also appear in the database list), so features are computed once
    per image; index arrays follow the order of the lists.

    Raises:
        ValueError: a path listed twice with different labels, or query images inside the database.
    """
    sources = (query_list, train_list, database_list)
    lists = [read_label_list(p) for p in sources]
    widths = {lab.shape[1] for _, lab in lists}
    if len(widths) != 1:
        raise ValueError(f"the three lists have different label counts: {sorted(widths)}")
    pool: dict[str, int] = {}
    paths: list[str] = []
    rows: list[np.ndarray] = []
    index_sets = []
    for (names, labels), source in zip(lists, sources, strict=True):
        idx = np.empty(len(names), dtype=np.int64)
        for j, (name, row) in enumerate(zip(names, labels, strict=True)):
            k = pool.get(name)
            if k is None:
                k = pool[name] = len(paths)
                paths.append(name)
                rows.append(row)
            elif not np.array_equal(rows[k], row):
                raise ValueError(f"{source}: {name} is listed elsewhere with different labels")
            idx[j] = k
        index_sets.append(idx)
    q, tr, db = index_sets
    both = np.intersect1d(q, db)
    if both.size:
        raise ValueError(f"{both.size} query images of {query_list} are also in the database list")
    dataset = ImageDataset(paths, np.stack(rows), root=image_root)
    params = {"lists": [Path(p).name for p in sources]}
    return Split("nuswide", dataset, q, db, tr, seed=None, params=params)
