"""Image folders, unreadable images, protocols (CIFAR-10 I/II, Flickr25K, NUS-WIDE), transforms."""

from __future__ import annotations

import logging
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import write_image
from hihpq.data import protocols as P
from hihpq.data.folders import (
    ArrayImageDataset,
    ImageFolderDataset,
    SkipLog,
    scan_image_folder,
)
from hihpq.data.transforms import (
    AugmentConfig,
    MultiViews,
    TwoViews,
    derive_seed,
    eval_transform,
    seeded_call,
    train_transform,
)

MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


# -- image folders ---------------------------------------------------------------------------------------


def test_scan_image_folder(image_folder):
    (image_folder / "cat" / "notes.txt").write_text("not an image")
    (image_folder / "cat" / ".hidden.jpg").write_bytes(b"")
    write_image(image_folder / "dog" / "nested" / "deep.PNG", np.random.default_rng(0))
    (image_folder / ".git").mkdir()
    paths, labels, classes = scan_image_folder(image_folder)
    assert classes == ["cat", "dog", "ship"]
    assert len(paths) == 13 and labels.dtype == np.int64
    assert np.bincount(labels).tolist() == [4, 5, 4]
    assert "dog/nested/deep.PNG" in paths and not any(p.endswith((".txt", ".hidden.jpg")) for p in paths)
    assert all(p.startswith(classes[lab] + "/") for p, lab in zip(paths, labels, strict=True))


def test_scan_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan_image_folder(tmp_path / "absent")
    with pytest.raises(ValueError, match="no class sub-folders"):
        scan_image_folder(tmp_path)
    (tmp_path / "a").mkdir()
    with pytest.raises(ValueError, match="no images"):
        scan_image_folder(tmp_path)


def test_image_folder_dataset_items(image_folder):
    ds = ImageFolderDataset(image_folder, transform=eval_transform(24, MEAN, STD))
    assert len(ds) == 12 and ds.classes == ["cat", "dog", "ship"] and not ds.multilabel
    image, index, ok = ds[5]
    assert image.shape == (3, 24, 24) and index == 5 and ok is True
    raw = ds.with_transform(None)[5][0]
    assert isinstance(raw, Image.Image) and raw.mode == "RGB" and raw.size == (16, 16)
    assert ds.transform is not None  # with_transform copies


def _corrupt(folder):
    (folder / "dog" / "zz_garbage.jpg").write_bytes(b"this is not a jpeg")
    good = (folder / "ship" / "000.jpg").read_bytes()
    (folder / "ship" / "zz_truncated.jpg").write_bytes(good[: len(good) // 2])


def test_unreadable_images_are_flagged_and_counted(image_folder, caplog):
    _corrupt(image_folder)
    ds = ImageFolderDataset(image_folder, transform=eval_transform(20, MEAN, STD))
    loader = torch.utils.data.DataLoader(ds, batch_size=5)
    skip = SkipLog(describe=ds.describe)
    n = 0
    for images, idx, ok in loader:
        assert images.shape[1:] == (3, 20, 20)  # placeholders go through the same transform
        skip.update(idx, ok)
        n += len(idx)
    assert n == 14 and skip.count == 2
    bad = sorted(ds.paths[i] for i in skip.indices)
    assert bad == ["dog/zz_garbage.jpg", "ship/zz_truncated.jpg"]
    assert skip.summary().startswith("skipped 2 unreadable images: ")
    assert "zz_garbage.jpg" in skip.summary()
    with caplog.at_level(logging.WARNING):
        skip.report()
    assert "skipped 2 unreadable images" in caplog.text


def test_skiplog_truncates_examples():
    log = SkipLog(max_examples=2)
    log.update(np.arange(4), np.zeros(4, dtype=bool))
    assert log.summary() == "skipped 4 unreadable images: 0, 1, ..."
    assert SkipLog().summary() == ""
    with pytest.raises(ValueError, match="same length"):
        log.update(np.arange(3), np.ones(2, dtype=bool))


def test_file_identity_tracks_contents(image_folder):
    ds = ImageFolderDataset(image_folder)
    a = ds.identity()
    assert a == ImageFolderDataset(image_folder).identity()
    write_image(image_folder / "cat" / "000.jpg", np.random.default_rng(9), (40, 40))  # replaced file
    assert ImageFolderDataset(image_folder).identity() != a


def test_array_dataset():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 8, 8, 3), dtype=np.uint8)
    ds = ArrayImageDataset(images, np.arange(5) % 2, name="toy")
    img, i, ok = ds[3]
    assert ok and i == 3 and np.array_equal(np.asarray(img), images[3])
    ident = ds.identity()
    images2 = images.copy()
    images2[0, 0, 0, 0] ^= 1
    assert ArrayImageDataset(images2, name="toy").identity() != ident
    with pytest.raises(ValueError, match="uint8"):
        ArrayImageDataset(images.astype(np.float32))
    with pytest.raises(ValueError, match="labels"):
        ArrayImageDataset(images, np.arange(4))


# -- CIFAR-10 protocols ----------------------------------------------------------------------------------


def _synthetic_cifar_labels(seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(10), 6000))


def _check_disjoint_cover(q, db, n):
    assert np.intersect1d(q, db).size == 0
    assert np.array_equal(np.union1d(q, db), np.arange(n))


def test_cifar_protocol_ii_full_counts():
    labels = _synthetic_cifar_labels()
    q, db, tr = P.cifar10_protocol_indices(labels, "II", seed=2021)
    assert (len(q), len(db), len(tr)) == (10_000, 50_000, 5_000)
    assert np.bincount(labels[q]).tolist() == [1000] * 10
    assert np.bincount(labels[db]).tolist() == [5000] * 10
    assert np.bincount(labels[tr]).tolist() == [500] * 10
    _check_disjoint_cover(q, db, 60_000)
    assert np.isin(tr, db).all()


def test_cifar_protocol_i_full_counts():
    labels = _synthetic_cifar_labels()
    q, db, tr = P.cifar10_protocol_indices(labels, "I", seed=2021)
    assert (len(q), len(db), len(tr)) == (10_000, 50_000, 50_000)
    assert np.array_equal(tr, db)
    _check_disjoint_cover(q, db, 60_000)


def test_cifar_protocol_seeding():
    labels = _synthetic_cifar_labels()
    a = P.cifar10_protocol_indices(labels, "II", seed=1)
    b = P.cifar10_protocol_indices(labels, "II", seed=1)
    c = P.cifar10_protocol_indices(labels, "II", seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0]) and not np.array_equal(a[2], c[2])
    # protocol I and II draw the same queries for one seed (same per-class permutations)
    assert np.array_equal(P.cifar10_protocol_indices(labels, "I", seed=1)[0], a[0])


def test_cifar_protocol_reduced_and_errors():
    labels = np.repeat(np.arange(3), 10)
    q, db, tr = P.cifar10_protocol_indices(labels, "ii", 0, queries_per_class=2, train_per_class=3, db_per_class=5)
    assert (len(q), len(db), len(tr)) == (6, 15, 9)
    assert np.intersect1d(q, db).size == 0 and np.isin(tr, db).all()
    q, db, tr = P.cifar10_protocol_indices(labels, "I", 0, queries_per_class=2, train_per_class=4)
    assert (len(q), len(db), len(tr)) == (6, 24, 12)
    with pytest.raises(ValueError, match="fewer than"):
        P.cifar10_protocol_indices(labels, "II", 0, queries_per_class=5, db_per_class=6)
    with pytest.raises(ValueError, match="train_per_class=500 exceeds"):
        P.cifar10_protocol_indices(labels, "II", 0, queries_per_class=2)
    with pytest.raises(ValueError, match="protocol"):
        P.cifar10_protocol_indices(labels, "III")
    with pytest.raises(ValueError, match="queries_per_class"):
        P.cifar10_protocol_indices(labels, "I", queries_per_class=-1)
    with pytest.raises(ValueError, match="1-d integer"):
        P.cifar10_protocol_indices(np.zeros((4, 2), dtype=int))


def test_cifar10_split_on_image_folders(cifar_like_folder):
    split = P.cifar10_split(cifar_like_folder, "II", seed=5, queries_per_class=2, train_per_class=3)
    ds = split.dataset
    assert len(ds) == 80 and ds.classes == list(P.CIFAR10_CLASSES)
    assert ds.paths[0].startswith("train/airplane/") and ds.paths[-1].startswith("test/truck/")
    assert (len(split.query), len(split.database), len(split.train)) == (20, 60, 30)
    assert np.bincount(split.query_labels).tolist() == [2] * 10
    assert np.bincount(split.train_labels).tolist() == [3] * 10
    assert split.name == "cifar10-II" and "20 queries" in split.summary()
    with pytest.raises(ValueError, match="read-only"):
        split.query[0] = 1
    again = P.cifar10_split(cifar_like_folder, "II", seed=5, queries_per_class=2, train_per_class=3)
    assert again.identity() == split.identity()
    other = P.cifar10_split(cifar_like_folder, "II", seed=6, queries_per_class=2, train_per_class=3)
    assert other.identity() != split.identity()


def test_split_rejects_overlap(image_folder):
    ds = ImageFolderDataset(image_folder)
    with pytest.raises(ValueError, match="overlap"):
        P.Split("x", ds, np.array([0, 1]), np.array([1, 2]), np.array([2]))
    with pytest.raises(ValueError, match="indices in"):
        P.Split("x", ds, np.array([0]), np.array([99]), np.array([]))


def test_find_cifar10_layouts(cifar_like_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("HIHPQ_DATA", raising=False)
    monkeypatch.setattr(P, "_online", lambda *a, **k: False)
    cache = tmp_path / "cache"
    parent = cifar_like_folder.parent
    assert P.find_cifar10(parent, cache_dir=cache) == cifar_like_folder
    assert P.find_cifar10(cifar_like_folder, cache_dir=cache) == cifar_like_folder
    monkeypatch.setenv("HIHPQ_DATA", str(parent))
    assert P.find_cifar10(cache_dir=cache) == cifar_like_folder
    monkeypatch.setenv("HIHPQ_DATA", str(tmp_path / "nothing"))
    assert P.find_cifar10(cache_dir=cache) is None  # offline, nothing found
    with pytest.raises(FileNotFoundError, match="no CIFAR-10"):
        P.find_cifar10(tmp_path / "nothing", cache_dir=cache)
    tv = tmp_path / "tv"
    (tv / "cifar-10-batches-py").mkdir(parents=True)
    assert P.find_cifar10(tv, cache_dir=cache) == tv
    assert P.find_cifar10(tv / "cifar-10-batches-py", cache_dir=cache) == tv


def test_find_cifar10_unpacks_tarball_once(cifar_like_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("HIHPQ_DATA", raising=False)
    monkeypatch.setattr(P, "_online", lambda *a, **k: False)
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    with tarfile.open(shipped / "cifar10-jpeg.tar.gz", "w:gz") as tar:
        tar.add(cifar_like_folder, arcname="cifar10-jpeg")
    cache = tmp_path / "cache"
    found = P.find_cifar10(shipped, cache_dir=cache)
    assert found == cache / "cifar10-jpeg"
    assert len(P.load_cifar10(found)) == 80
    assert [p.name for p in cache.iterdir()] == ["cifar10-jpeg"]  # no partial left over
    assert P.find_cifar10(cache_dir=cache) == found  # found again without --data
    assert P.find_cifar10(shipped / "cifar10-jpeg.tar.gz", cache_dir=cache) == found


def test_load_cifar10_torchvision_layout(tmp_path, monkeypatch):
    import torchvision.datasets

    class FakeCIFAR10:  # stands in for the pickled batches (torchvision checks their md5)
        classes = P.CIFAR10_CLASSES

        def __init__(self, root, train, download):
            assert download is False
            n = 6 if train else 2
            self.data = np.full((10 * n, 4, 4, 3), 200 if train else 50, dtype=np.uint8)
            self.targets = list(np.repeat(np.arange(10), n))

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    (tmp_path / "cifar-10-batches-py").mkdir()
    ds = P.load_cifar10(tmp_path)
    assert isinstance(ds, ArrayImageDataset) and len(ds) == 80
    assert np.asarray(ds[0][0])[0, 0, 0] == 200 and np.asarray(ds[79][0])[0, 0, 0] == 50  # train first
    assert np.bincount(ds.labels).tolist() == [8] * 10


def test_load_cifar10_rejects_other_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a CIFAR-10 root"):
        P.load_cifar10(tmp_path)


# -- Flickr25K and NUS-WIDE ------------------------------------------------------------------------------


def _write_flickr(dirpath, n, n_labels=24, seed=0):
    rng = np.random.default_rng(seed)
    labels = (rng.random((n, n_labels)) < 0.2).astype(int)
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / "img.txt").write_text("".join(f"im{i + 1}.jpg\n" for i in range(n)))
    (dirpath / "targets.txt").write_text("".join(" ".join(map(str, row)) + " \n" for row in labels))
    return labels


def test_flickr_protocol_full_counts():
    q, db, tr = P.random_split_indices(25_000, seed=2021)
    assert (len(q), len(db), len(tr)) == (2_000, 23_000, 5_000)
    _check_disjoint_cover(q, db, 25_000)
    assert np.isin(tr, db).all()
    assert not np.array_equal(q, P.random_split_indices(25_000, seed=2022)[0])
    with pytest.raises(ValueError, match="n_train"):
        P.random_split_indices(100, n_query=20, n_train=81)


def test_flickr_split_from_lists(tmp_path):
    labels = _write_flickr(tmp_path / "lists", 40)
    split = P.flickr25k_split(tmp_path / "lists", tmp_path / "mirflickr", seed=3, n_query=5, n_train=10)
    assert split.multilabel and split.labels.dtype == np.uint8 and split.labels.shape == (40, 24)
    assert np.array_equal(split.labels, labels)
    assert (len(split.query), len(split.database), len(split.train)) == (5, 35, 10)
    assert split.dataset.describe(0) == str((tmp_path / "mirflickr" / "im1.jpg").resolve())
    again = P.flickr25k_split(tmp_path / "lists", tmp_path / "mirflickr", seed=3, n_query=5, n_train=10)
    assert np.array_equal(again.query, split.query)


def test_flickr_list_errors(tmp_path):
    _write_flickr(tmp_path, 4)
    with open(tmp_path / "img.txt", "a") as f:
        f.write("im5.jpg\n")
    with pytest.raises(ValueError, match="5 names but"):
        P.read_flickr25k_lists(tmp_path / "img.txt", tmp_path / "targets.txt")
    (tmp_path / "targets.txt").write_text("0 1 0\n0 2 0\n")
    with pytest.raises(ValueError, match=r"targets\.txt:2: labels must be 0 or 1"):
        P.read_flickr25k_lists(tmp_path / "img.txt", tmp_path / "targets.txt")
    (tmp_path / "targets.txt").write_text("0 1 0\n0 1\n")
    with pytest.raises(ValueError, match=r"targets\.txt:2: expected 3 labels, got 2"):
        P.read_flickr25k_lists(tmp_path / "img.txt", tmp_path / "targets.txt")
    with pytest.raises(FileNotFoundError, match="absent"):
        P.read_flickr25k_lists(tmp_path / "absent.txt", tmp_path / "targets.txt")


def _write_nus(path, names, labels):
    path.write_text("".join(f"{n} {' '.join(map(str, row))}\n" for n, row in zip(names, labels, strict=True)))


def test_nuswide_split_from_lists(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"concept{i % 3}/{i:04d}_{i * 7}.jpg" for i in range(30)]
    labels = (rng.random((30, 21)) < 0.3).astype(int)
    q_ids, tr_ids, db_ids = range(0, 5), range(5, 15), range(5, 30)  # training images are in the database
    for fname, ids in (("test.txt", q_ids), ("train.txt", tr_ids), ("database.txt", db_ids)):
        _write_nus(tmp_path / fname, [names[i] for i in ids], labels[list(ids)])
    split = P.nuswide_split(tmp_path / "img", tmp_path / "test.txt", tmp_path / "train.txt", tmp_path / "database.txt")
    assert len(split.dataset) == 30  # each distinct path once
    assert (len(split.query), len(split.train), len(split.database)) == (5, 10, 25)
    assert np.isin(split.train, split.database).all()
    assert [split.dataset.paths[i] for i in split.query] == names[:5]
    assert np.array_equal(split.query_labels, labels[:5].astype(np.uint8))
    assert split.labels.shape == (30, 21)


def test_nuswide_errors(tmp_path):
    labels = np.eye(3, dtype=int)
    _write_nus(tmp_path / "q.txt", ["a.jpg"], labels[:1])
    _write_nus(tmp_path / "t.txt", ["b.jpg"], labels[1:2])
    _write_nus(tmp_path / "d.txt", ["a.jpg", "c.jpg"], labels[[0, 2]])
    with pytest.raises(ValueError, match="also in the database"):
        P.nuswide_split(tmp_path, tmp_path / "q.txt", tmp_path / "t.txt", tmp_path / "d.txt")
    _write_nus(tmp_path / "d.txt", ["b.jpg", "c.jpg"], labels[[0, 2]])  # b.jpg with other labels
    with pytest.raises(ValueError, match="different labels"):
        P.nuswide_split(tmp_path, tmp_path / "q.txt", tmp_path / "t.txt", tmp_path / "d.txt")
    (tmp_path / "bad.txt").write_text("only_a_path.jpg\n")
    with pytest.raises(ValueError, match=r"bad\.txt:1: expected"):
        P.read_label_list(tmp_path / "bad.txt")


# -- transforms ------------------------------------------------------------------------------------------


@pytest.fixture
def pil_image():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8))


def test_eval_transform(pil_image):
    tf = eval_transform(112, MEAN, STD)
    x = tf(pil_image)
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0  # [0, 1] normalised with mean = std = 0.5
    torch.testing.assert_close(x, tf(pil_image))
    wide = Image.new("RGB", (60, 30), (255, 0, 0))
    y = eval_transform(16, MEAN, STD, crop_ratio=0.5)(wide)  # shorter side -> 32, centre crop 16
    assert y.shape == (3, 16, 16)
    torch.testing.assert_close(y[0], torch.ones(16, 16))
    with pytest.raises(ValueError, match="crop_ratio"):
        eval_transform(16, MEAN, STD, crop_ratio=1.5)
    with pytest.raises(ValueError, match="resolution"):
        eval_transform(4, MEAN, STD)


def test_train_transform_views(pil_image):
    cfg = AugmentConfig(resolution=40)
    tf = train_transform(cfg, MEAN, STD)
    v1, v2 = TwoViews(tf)(pil_image)
    assert v1.shape == v2.shape == (3, 40, 40)
    assert not torch.equal(v1, v2)
    views = MultiViews(tf, 3)(pil_image)
    assert len(views) == 3
    assert cfg.to_dict()["jitter"] == [0.4, 0.4, 0.4, 0.1] and cfg.to_dict()["crop_scale"] == [0.5, 1.0]


def test_augment_identity_when_disabled(pil_image):
    # all randomness off, full-image crop: the augmentation must reduce to a plain resize + normalise
    cfg = AugmentConfig(resolution=32, crop_scale=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=0, blur_p=0)
    x = train_transform(cfg, MEAN, STD)(pil_image)
    torch.testing.assert_close(x, eval_transform(32, MEAN, STD)(pil_image))
    flip = AugmentConfig(resolution=32, crop_scale=(1.0, 1.0), flip_p=1, jitter_p=0, grayscale_p=0, blur_p=0)
    torch.testing.assert_close(train_transform(flip, MEAN, STD)(pil_image), x.flip(-1))
    gray = AugmentConfig(resolution=32, crop_scale=(1.0, 1.0), flip_p=0, jitter_p=0, grayscale_p=1, blur_p=0)
    g = train_transform(gray, MEAN, STD)(pil_image)
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2])


def test_augment_config_validation():
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="jitter_p"):
        AugmentConfig(jitter_p=1.5)
    with pytest.raises(ValueError, match="blur_kernel"):
        AugmentConfig(blur_kernel=4)
    with pytest.raises(ValueError, match="jitter"):
        AugmentConfig(jitter=(0.4, 0.4, 0.4))
    assert AugmentConfig(crop_scale=[0.5, 1]).crop_scale == (0.5, 1.0)  # lists from YAML
    with pytest.raises(TypeError):
        train_transform({"resolution": 32}, MEAN, STD)


def test_seeded_call_is_reproducible_and_restores_rng(pil_image):
    tf = train_transform(AugmentConfig(resolution=24), MEAN, STD)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a = seeded_call(tf, 7, pil_image)
    assert torch.equal(torch.rand(3), expected_next)  # caller's stream untouched
    b = seeded_call(tf, 7, pil_image)
    c = seeded_call(tf, 8, pil_image)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_derive_seed():
    seeds = {derive_seed(0, i, v) for i in range(50) for v in range(4)}
    assert len(seeds) == 200 and all(0 <= s < 2**63 for s in seeds)
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3) != derive_seed(1, 3, 2)


def test_folder_protocol_database_size(tmp_path):
    """data.n_database bounds the folder protocol's database; without it the database is every non-query image
    and the split parameters (part of feature-cache keys) stay as before."""
    from helpers import write_colour_folder
    from hihpq.config import load_config
    from hihpq.data.prepare import make_split

    root = write_colour_folder(tmp_path / "images", per_class=20)  # 60 images
    base = ["data.dataset=folder", f"data.root={root}", "data.n_query=10"]
    full = make_split(load_config("cifar10-ii-16", base))
    assert (len(full.query), len(full.database), len(full.train)) == (10, 50, 50)
    assert full.params == {"n_query": 10, "n_train": 50}
    part = make_split(load_config("cifar10-ii-16", [*base, "data.n_database=30", "data.n_train=12"]))
    assert (len(part.query), len(part.database), len(part.train)) == (10, 30, 12)
    assert part.params["n_database"] == 30
    assert set(part.train) <= set(part.database) and not set(part.query) & set(part.database)
    with pytest.raises(ValueError, match="exceed"):
        make_split(load_config("cifar10-ii-16", [*base, "data.n_database=51"]))


def test_validation_fold_uses_training_images_only():
    """PreparedFeatures.validation_fold: queries, database and training set all come from the training images,
    queries never in the database, views follow the training rows they belong to."""
    from hihpq.data.prepare import PreparedFeatures, validation_split

    labels = np.arange(100) % 5
    ds = ArrayImageDataset(np.zeros((100, 4, 4, 3), np.uint8), labels)
    split = P.Split("toy", ds, np.arange(0, 20), np.arange(20, 100), np.arange(40, 90))
    used = np.arange(100)
    clean = np.arange(100, dtype=np.float16)[:, None].repeat(3, 1)
    views = np.arange(40, 90, dtype=np.float16)[:, None, None] + np.zeros((1, 2, 3), np.float16)
    valid = np.ones(50, bool)
    valid[7] = False  # pool image 47 is unreadable
    prep = PreparedFeatures(split, clean, used, views, 1, valid)
    fold = prep.validation_fold(10, seed=3)
    q, db, tr = fold.split.query, fold.split.database, fold.split.train
    assert len(q) == 10 and len(db) == 39 and np.array_equal(db, tr)
    assert not set(q) & set(db) and set(q) | set(db) == set(range(40, 90)) - {47}
    assert np.array_equal(fold.views[:, 0, 0].astype(int), tr)  # each view row is its training image's
    assert np.array_equal(fold.queries[:, 0].astype(int), q)
    assert not np.array_equal(prep.validation_fold(10, seed=4).split.query, q)
    with pytest.raises(ValueError, match="n_query"):
        prep.validation_fold(49)

    # n_fit: the training set is part of the database only, the rest of it never trained on
    held = prep.validation_fold(10, seed=3, n_fit=15)
    assert np.array_equal(held.split.query, q) and np.array_equal(held.split.database, db)
    assert len(held.split.train) == 15 and set(held.split.train) < set(db)
    assert np.array_equal(held.views[:, 0, 0].astype(int), held.split.train)
    assert held.split.params["n_train"] == 15 and held.split.params["n_database"] == 39
    for bad in (0, 40):
        with pytest.raises(ValueError, match="n_fit"):
            prep.validation_fold(10, seed=3, n_fit=bad)

    # the same fold before any feature exists (to compute features for the fold's images only)
    early, fit_pos = validation_split(split, 10, seed=3, n_fit=15, train_valid=valid)
    for name in ("query", "database", "train"):
        assert np.array_equal(getattr(early, name), getattr(held.split, name))
    assert np.array_equal(split.train[fit_pos], held.split.train)
