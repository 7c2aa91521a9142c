"""Hostile but realistic input (issue 13): every bad file, value or target generated here ends in a clear message
and a refusal before work starts, or is handled; nothing is overwritten that is not ours.

The numbered comments refer to the items of the issue.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_colour_folder, write_tiny_config
from hihpq.cli import main
from hihpq.config import Config, ConfigError, load_config

# ------------------------------------------------------------------------------------- 7, 9: config values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=2.5", r"train.epochs must be an int in \[1, inf\), got 2.5"),
        ("train.epochs=true", r"train.epochs must be an int .* got True"),
        ("train.epochs=abc", r"train.epochs must be an int .* got 'abc'"),
        ("train.min_lr=-1", r"train.min_lr must be a number in \[0, inf\)"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.warmup_epochs=-3", "train.warmup_epochs"),
        ("train.momentum=1", r"train.momentum must be a number in \[0, 1\)"),
        ("train.lr=.nan", "train.lr"),
        ("hierarchy.interval=-1", r"hierarchy.interval must be an int in \[1, inf\)"),
        ("hierarchy.interval=0", "hierarchy.interval"),
        ("hierarchy.levels=[10, 2.5]", "hierarchy.levels must be a list of ints"),
        ("quantizer.tau=false", r"quantizer.tau must be a number in \(0, inf\), got False"),
        ("quantizer.learn_curvature=1", "quantizer.learn_curvature must be true or false"),
        ("projector.kind=conv", r"projector.kind must be one of \['linear', 'mlp'\]"),
        ("eval.topk=0", r"eval.topk must be an int in \[1, inf\)"),
        ("features.num_workers=-1", "features.num_workers"),
        # 9: the quantizer takes the open interval; K > 256 does not fit uint8 codes
        ("quantizer.curvature=10.0", "open interval"),
        ("quantizer.curvature=0.01", "open interval"),
        ("quantizer.n_codewords=512", r"quantizer.n_codewords must be an int in \[2, 256\]"),
        ("train.min_lr=0.5", "train.min_lr=0.5 is above train.lr"),
    ],
)
def test_bad_config_values_name_the_field_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cifar10-ii-32", [override])


def test_numbers_are_normalised_and_yaml_strings_of_floats_accepted():
    cfg = load_config("cifar10-ii-32", ["train.lr=1", "train.min_lr=1e-6"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.min_lr == 1e-6


def test_every_config_field_has_a_declared_type_and_range():
    from hihpq.config import SCHEMA, config_keys

    keys = config_keys(Config())
    assert sorted(keys) == sorted(SCHEMA), set(keys) ^ set(SCHEMA)
    # and a field added without a declaration is refused, naming it
    extended = dataclasses.make_dataclass("X", [("new_knob", int, dataclasses.field(default=1))], bases=(Config,))
    with pytest.raises(ConfigError, match="new_knob has no declared type"):
        extended().validate()


# ------------------------------------------------------------------------------------------ 13: NaN embeddings
def test_build_index_refuses_nan_embeddings():
    from hihpq.build import build_model
    from hihpq.evaluation import build_index

    cfg = load_config("cifar10-ii-16", ["quantizer.bits=8", "quantizer.n_codewords=16", "quantizer.feature_dim=8"])
    model = build_model(cfg, in_dim=12)
    emb = model.embed(torch.randn(5, 12)).detach().numpy()
    emb[3, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in 1 of 5 rows"):
        build_index(model, emb)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.quantizer.encode(torch.from_numpy(emb))


# ---------------------------------------------------------------------------------- 2, 12: write targets
def _tiny_index():
    from hihpq.index import HyperbolicPQIndex

    rng = np.random.default_rng(0)
    index = HyperbolicPQIndex(rng.normal(size=(2, 4, 3)).astype(np.float32), geometry="euclidean")
    index.add_codes(rng.integers(0, 4, size=(5, 2)))
    return index


def test_index_writer_refuses_fifo_folder_and_foreign_files(tmp_path):
    from hihpq.atomic import TargetRefused
    from hihpq.index import read_index, write_index

    fifo = tmp_path / "out.hpq"
    os.mkfifo(fifo)
    with pytest.raises(TargetRefused, match="FIFO"):
        write_index(_tiny_index(), fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(TargetRefused, match="is a folder"):
        write_index(_tiny_index(), tmp_path)
    notes = tmp_path / "notes.txt"
    notes.write_text("my thesis")
    with pytest.raises(TargetRefused, match=r"not a hihpq index file.*--force"):
        write_index(_tiny_index(), notes)
    assert notes.read_text() == "my thesis"
    write_index(_tiny_index(), notes, force=True)
    write_index(_tiny_index(), notes)  # an index may replace an index
    assert read_index(notes).ntotal == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "out.hpq"]  # no temporary left


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mknod needs root")
def test_index_writer_refuses_a_device_node(tmp_path):
    from hihpq.atomic import TargetRefused
    from hihpq.index import write_index

    dev = tmp_path / "null"
    os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a copy of /dev/null
    with pytest.raises(TargetRefused, match="character device"):
        write_index(_tiny_index(), dev)
    assert stat.S_ISCHR(os.stat(dev).st_mode)


def test_missing_output_folder_is_named(tmp_path):
    from hihpq.index import write_index

    with pytest.raises(FileNotFoundError, match=f"folder {tmp_path / 'nope'} does not exist") as err:
        write_index(_tiny_index(), tmp_path / "nope" / "x.hpq")
    assert "tmp" not in str(err.value).replace(str(tmp_path), "")


def test_model_and_json_writers_refuse_other_kinds_of_file(tmp_path):
    from hihpq.atomic import TargetRefused, atomic_path
    from hihpq.runinfo import write_json

    for name in ("model.pt", "run.json", "codes.npz"):
        target = tmp_path / name
        target.write_text("not yours")
        with pytest.raises(TargetRefused, match="refusing to overwrite"), atomic_path(target) as tmp:
            tmp.write_text("x")
        assert target.read_text() == "not yours"
    (tmp_path / "ok.json").write_text('{"a": 1}')
    write_json(tmp_path / "ok.json", {"a": 2})
    assert (tmp_path / "ok.json").read_text().strip().startswith("{")


def test_stale_temporaries_of_dead_writers_are_removed_and_umask_respected(tmp_path):
    import subprocess

    from hihpq.index import write_index

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    target = tmp_path / "big.hpq"
    stale = tmp_path / f".big.hpq.hihpq-tmp-{dead.pid}.0123abcd"
    live = tmp_path / f".big.hpq.hihpq-tmp-{os.getpid()}.0123abcd"  # a writer still running: left alone
    other = tmp_path / ".other.hpq.hihpq-tmp-1.0123abcd"
    for p in (stale, live, other):
        p.write_bytes(b"\0" * 100)
    old = os.umask(0o027)
    try:
        write_index(_tiny_index(), target)
    finally:
        os.umask(old)
    assert not stale.exists() and live.exists() and other.exists()
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640


# ------------------------------------------------------------------------------------ 5, 6, 10: image files
def test_16_bit_png_and_float_tiff_are_scaled_not_clipped(tmp_path):
    from hihpq.data import ImageDataset

    ramp = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.fromarray(ramp.astype(np.float32), mode="F").save(tmp_path / "float.tif")
    ds = ImageDataset([tmp_path / "deep.png", tmp_path / "float.tif"])
    for i in range(2):
        a = np.asarray(ds.load(i))
        assert a.shape == (64, 64, 3) and a.min() <= 2 and a.max() >= 253, (i, a.min(), a.max())
        assert abs(float(a.mean()) - 127.5) < 3  # the ramp, not a near-constant image


def test_symlink_loops_and_linked_copies_do_not_multiply_a_dataset(tmp_path):
    from hihpq.data import ImageFolderDataset

    root = write_colour_folder(tmp_path / "images", per_class=3)
    (root / "red" / "loop").symlink_to(root / "red", target_is_directory=True)
    (root / "red" / "again.png").symlink_to(root / "red" / "000.png")
    (root / "blue" / "reds").symlink_to(root / "red", target_is_directory=True)
    ds = ImageFolderDataset(root)
    assert len(ds) == 9, ds.paths
    assert list(ds.labels).count(2) == 3  # "red" (class 2) keeps its own 3 files; blue/reds adds nothing new


def test_encode_folders_follow_links_once(tmp_path):
    from hihpq.data.prepare import list_images

    root = write_colour_folder(tmp_path / "images", per_class=3)
    elsewhere = write_colour_folder(tmp_path / "more", per_class=2)
    (root / "red" / "up").symlink_to(root, target_is_directory=True)  # a loop through the top
    (root / "linked").symlink_to(elsewhere, target_is_directory=True)  # a linked folder outside: followed
    files = list_images(root)
    assert len(files) == 9 + 6 and len({f.resolve() for f in files}) == 15


def _in_thread(fn, timeout=20.0):
    import threading

    out = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as exc:
            out["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "hung"
    return out


def test_fifo_named_like_an_image_is_never_opened(tmp_path):
    from hihpq.data.folders import ImageDataset, ImageFolderDataset, UnreadableImageError

    root = write_colour_folder(tmp_path / "images", per_class=2)
    os.mkfifo(root / "red" / "x.png")
    out = _in_thread(lambda: ImageDataset([root / "red" / "x.png"])[0])
    assert "error" not in out and out["value"][2] is False  # placeholder flagged unreadable, no hang
    out = _in_thread(lambda: ImageDataset([root / "red" / "x.png"]).load(0))
    assert isinstance(out["error"], UnreadableImageError) and "not a regular file" in str(out["error"])
    assert len(ImageFolderDataset(root)) == 6  # left out of the listing


@pytest.mark.parametrize("size", [(30000, 1), (1, 5000)])
def test_extreme_aspect_ratios_are_refused_before_decoding(tmp_path, size):
    from hihpq.data.folders import ImageDataset, UnreadableImageError

    Image.new("RGB", size, (10, 20, 30)).save(tmp_path / "strip.png")
    with pytest.raises(UnreadableImageError, match="beyond the bounds"):
        ImageDataset([tmp_path / "strip.png"]).load(0)


def test_non_utf8_file_names_are_read_and_named(tmp_path):
    from hihpq.data import ImageFolderDataset

    root = write_colour_folder(tmp_path / "images", per_class=2)
    raw = os.path.join(os.fsencode(root / "red"), b"caf\xe9.png")
    with open(raw, "wb") as fh:
        Image.new("RGB", (8, 8), (200, 0, 0)).save(fh, format="PNG")
    ds = ImageFolderDataset(root)
    i = next(i for i, p in enumerate(ds.paths) if "caf" in p)
    assert ds.identity()["n"] == 7 and ds[i][2]
    assert "caf\\xe9.png" in ds.describe(i)


# ---------------------------------------------------------------------- through the command line (4, 8-11)
def _hostile_folder(root):
    """A colour folder with what a real photo folder holds too: corrupt files, a non-UTF-8 name, a FIFO, a loop."""
    write_colour_folder(root, per_class=20)
    (root / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (root / "green" / "empty.jpg").write_bytes(b"")
    with open(os.path.join(os.fsencode(root / "blue"), b"bl\xe9u.png"), "wb") as fh:
        Image.new("RGB", (32, 32), (40, 60, 200)).save(fh, format="PNG")
    os.mkfifo(root / "blue" / "pipe.png")
    (root / "blue" / "loop").symlink_to(root / "blue", target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    images = _hostile_folder(tmp / "images")
    config = write_tiny_config(
        tmp / "tiny.yaml",
        images,
        tmp / "cache",
        "tiny",
        data={"n_query": 12, "n_train": 40},
        features={"n_views": 2},
        train={"epochs": 2, "batch_size": 16},
    )
    run = tmp / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    return tmp, images, config, run


def _err(capsys) -> str:
    return capsys.readouterr().err


def test_unreadable_images_leave_every_set_and_are_counted(hostile_run):
    # 4: 63 files listed (60 + 2 corrupt + the non-UTF-8 one; the FIFO and the loop add nothing)
    import json

    from hihpq.data.prepare import prepare_features

    _, _, config, run = hostile_run
    record = json.loads((run / "run.json").read_text())
    assert record["skipped_images"] == 2
    cfg = load_config(str(config))
    prep = prepare_features(cfg, progress=False)
    split = prep.split
    assert len(split.dataset) == 63
    bad = {i for i in range(63) if split.dataset.describe(i).endswith(("broken.png", "empty.jpg"))}
    assert len(bad) == 2 and not bad & set(split.query) | bad & set(split.database)
    assert len(split.query) + len(split.database) == 61 and split.params["excluded"] == 2
    assert prep.queries.shape[0] == len(split.query) and prep.train_valid.sum() <= 40


def test_finished_run_is_not_overwritten_and_resume_must_match(hostile_run, capsys):
    tmp, _, config, run = hostile_run
    saved = (run / "config.yaml").read_bytes()
    model = (run / "model.pt").read_bytes()
    assert main(["train", str(config), "--out", str(run)]) == 2
    assert "already holds a finished run (model.pt)" in _err(capsys) and (run / "model.pt").read_bytes() == model
    assert main(["train", str(config), "--out", str(run), "--resume", "-o", "seed=7", "-o", "train.lr=0.5"]) == 2
    err = _err(capsys)
    assert "seed: 2021 in the run, 7 now" in err and "train.lr: 0.01 in the run, 0.5 now" in err
    assert (run / "config.yaml").read_bytes() == saved
    assert main(["train", str(config), "--out", str(tmp / "fresh"), "--resume"]) == 2
    assert "no checkpoint" in _err(capsys)


def test_sizes_are_checked_before_feature_extraction(hostile_run, tmp_path, capsys):
    _, images, _, _ = hostile_run
    cache = tmp_path / "cache"
    cfg = write_tiny_config(tmp_path / "c.yaml", images, cache, "c", data={"n_query": 12, "n_train": 40})
    assert main(["train", str(cfg), "--out", str(tmp_path / "a"), "-o", "hierarchy.levels=[50, 3]"]) == 2
    assert "hierarchy.levels [50, 3] asks for more clusters than the 40 training images" in _err(capsys)
    assert main(["train", str(cfg), "--out", str(tmp_path / "b"), "-o", "data.n_query=63", "-o", "data.n_train=1"]) == 2
    assert "n_query=63 queries leave no database image among the 63 images" in _err(capsys)
    assert not cache.exists()  # nothing was extracted


def test_training_set_all_unreadable_is_a_clear_error(tmp_path, capsys):
    for cls in ("a", "b"):
        (tmp_path / "img" / cls).mkdir(parents=True)
        for k in range(6):
            (tmp_path / "img" / cls / f"{k}.png").write_bytes(b"not an image")
    cfg = write_tiny_config(
        tmp_path / "c.yaml", tmp_path / "img", tmp_path / "cache", "c", data={"n_query": 2}, hierarchy={"levels": [2]}
    )
    assert main(["train", str(cfg), "--out", str(tmp_path / "run")]) == 2
    assert "the training set holds 0 usable image(s)" in _err(capsys)


def test_bad_k_and_topk_are_refused_at_parse_time(capsys):
    for argv in (["search", "x.hpq", "--query", "q.png", "-k", "0"], ["evaluate", "run", "--topk", "-1"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and "expected a positive integer" in _err(capsys)


def test_encode_targets_are_checked_before_any_work(tmp_path, capsys):
    fifo = tmp_path / "fifo.hpq"
    os.mkfifo(fifo)
    notes = tmp_path / "notes.txt"
    notes.write_text("keep me")
    cases = {
        str(tmp_path / "missing" / "x.hpq"): f"folder {tmp_path / 'missing'} does not exist",
        str(fifo): "FIFO (named pipe), not a regular file",
        str(tmp_path): "is a folder",
        str(notes): "not a hihpq index file; refusing to overwrite it (pass --force",
    }
    for out, message in cases.items():  # the model does not exist either: the target is checked first
        assert main(["encode", str(tmp_path / "no-model"), "--images", str(tmp_path), "--out", out]) == 2
        assert message in _err(capsys), out
    assert notes.read_text() == "keep me"


def test_search_and_info_say_what_a_non_index_is(tmp_path, capsys):
    for target, what in ((tmp_path, "a folder, not an index file"), ("/dev/null", "a character device, not an index")):
        assert main(["search", str(target), "--query", str(tmp_path)]) == 2
        assert what in _err(capsys)
        assert main(["index", "info", str(target)]) == 2
        assert what in _err(capsys)


def test_encode_search_verify_with_hostile_files(hostile_run, capsys):
    tmp, images, _, run = hostile_run
    index = tmp / "all.hpq"
    good = tmp / "good"
    for cls in ("red", "blue"):
        (good / cls).mkdir(parents=True)
        for k in range(4):
            (good / cls / f"{k}.png").symlink_to(images / cls / f"{k:03d}.png")
    raw = b"bl\xe9u.png"
    os.link(os.path.join(os.fsencode(images / "blue"), raw), os.path.join(os.fsencode(good / "blue"), raw))
    (good / "blue" / "again").symlink_to(good / "blue", target_is_directory=True)
    assert main(["encode", str(run), "--images", str(good), "--out", str(index)]) == 0
    assert "wrote 9 codes" in capsys.readouterr().out
    # a query folder with one bad image: skipped and reported, the others searched
    queries = tmp / "queries"
    queries.mkdir()
    (queries / "bad.png").write_bytes(b"junk")
    Image.open(images / "red" / "000.png").save(queries / "red.png")
    assert main(["search", str(index), "--query", str(queries), "-k", "3"]) == 0
    cap = capsys.readouterr()
    assert "skipped 1 unreadable query image(s)" in cap.err and "bad.png" in cap.err
    assert "query " in cap.out and "red.png" in cap.out and "Traceback" not in cap.err
    assert main(["index", "info", "--verify", str(index)]) == 0
    data = bytearray(index.read_bytes())
    data[-1] ^= 0xFF
    index.write_bytes(bytes(data))
    assert main(["index", "info", "--verify", str(index)]) == 2
    assert "checksum mismatch" in _err(capsys)


def test_escaping_exceptions_become_messages(hostile_run, tmp_path, monkeypatch, capsys):
    import hihpq.train as T

    _, _, config, run = hostile_run
    payload = torch.load(run / "model.pt", weights_only=True)
    payload["projector"]["in_dim"] += 3  # a projector of another shape than the saved weights
    (tmp_path / "bad").mkdir()
    torch.save(payload, tmp_path / "bad" / "model.pt")
    assert main(["evaluate", str(tmp_path / "bad")]) == 2
    assert "do not fit the stored architecture" in _err(capsys)

    def diverge(self, *a, **k):
        raise T.TrainingDiverged("the loss is NaN at epoch 1. Lower train.lr")

    monkeypatch.setattr(T.Trainer, "fit", diverge)
    assert main(["train", str(config), "--out", str(tmp_path / "d")]) == 2
    assert "the loss is NaN at epoch 1" in _err(capsys)

    def denied(self, *a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "e" / "log.csv"))

    monkeypatch.setattr(T.Trainer, "fit", denied)
    assert main(["train", str(config), "--out", str(tmp_path / "e")]) == 2
    assert f"permission denied: {tmp_path / 'e' / 'log.csv'}" in _err(capsys)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_refused_up_front(hostile_run, tmp_path, capsys):
    _, _, config, _ = hostile_run
    assert main(["train", str(config), "--out", str(tmp_path / "c"), "--device", "cuda"]) == 2
    assert "no CUDA device is available here; use --device cpu" in _err(capsys)


def test_service_uploads_bound_the_aspect_ratio_and_scale_16_bit():
    import io

    from hihpq.service.uploads import TooManyPixelsError, decode_image

    def png(img):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return buf.getvalue()

    with pytest.raises(TooManyPixelsError, match="aspect ratio"):
        decode_image(png(Image.new("RGB", (30000, 1))))
    ramp = (np.linspace(0, 1, 64 * 64).reshape(64, 64) * 65535).astype(np.uint16)
    a = np.asarray(decode_image(png(Image.fromarray(ramp))))
    assert a.min() <= 2 and a.max() >= 253
