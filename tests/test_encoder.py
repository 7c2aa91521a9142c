"""Your own photos: training on an unlabelled folder, the Encoder, model files (format 2), index fingerprints and
index updates."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.functional import to_tensor

from helpers import write_colour_folder, write_tiny_config
from hihpq import Encoder
from hihpq.cli import main
from hihpq.config import load_config
from hihpq.index import read_index, write_index
from hihpq.models.io import ModelFileError, load_model
from hihpq.runs import train_run


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """An unlabelled, nested photo tree (colour images, one corrupt file) and a model trained on it."""
    tmp = tmp_path_factory.mktemp("photos")
    images = write_colour_folder(tmp / "photos" / "2024" / "trip", per_class=12)  # nested: no class layout
    (images / "red" / "broken.jpg").write_bytes(b"not an image")
    config = write_tiny_config(
        tmp / "photos.yaml",
        tmp / "photos",
        tmp / "cache",
        "photos",
        data={"dataset": "images"},
        features={"n_views": 2},
        hierarchy={"levels": []},  # sizes from the number of images
        train={"epochs": 2, "batch_size": 16},
    )
    run = train_run(load_config(str(config)), tmp / "run", progress=False)
    return tmp, tmp / "photos", run, config


def test_unlabelled_folder_trains_on_every_image_without_evaluation(photos):
    _, _, run, _ = photos
    record = json.loads((run / "run.json").read_text())
    assert "eval" not in record  # no labels, nothing held out
    assert record["skipped_images"] == 1  # the corrupt file, counted
    cfg = load_config(str(run / "config.yaml"))
    assert cfg.data.dataset == "images" and cfg.hierarchy.levels == [2]  # 37 images: N/50 clipped to 2
    assert (run / "model.pt").is_file()


def test_encoder_agrees_on_paths_pil_arrays_tensors_and_features(photos):
    _, root, run, _ = photos
    enc = Encoder.load(run)
    paths = sorted((root / "2024" / "trip" / "blue").glob("*.png"))[:5]
    pil = [Image.open(p).convert("RGB") for p in paths]
    ref = enc.embed(paths)
    assert ref.shape == (5, enc.M, enc.D) and ref.dtype == np.float32
    np.testing.assert_array_equal(enc.embed([str(p) for p in paths]), ref)
    np.testing.assert_array_equal(enc.embed(pil), ref)
    np.testing.assert_array_equal(enc.embed([np.asarray(im) for im in pil]), ref)
    np.testing.assert_array_equal(enc.embed([to_tensor(im) for im in pil]), ref)
    batched = enc.embed(torch.stack([to_tensor(im) for im in pil]), batch_size=2)
    np.testing.assert_allclose(batched, ref, atol=1e-5)  # other batch sizes: other float summation orders
    with torch.inference_mode():  # backbone features, rounded as the feature cache stores them
        x = torch.stack([enc.transform(im) for im in pil])
        feats = enc._backbone(x).half().float().numpy()
    np.testing.assert_allclose(enc.embed(feats), ref, atol=1e-6)
    codes = enc.encode(paths)
    assert codes.dtype == np.uint8 and codes.shape == (5, enc.M)
    assert len(enc.fingerprint) == 64 and enc.device == torch.device("cpu") and enc.resolution == 32


def test_encoder_runs_a_frozen_backbone_in_the_fast_runtime_with_pytorchs_embeddings(photos):
    from hihpq.models.runtime import CompiledBackbone

    _, root, run, _ = photos
    paths = sorted((root / "2024" / "trip" / "red").glob("*.png"))[:6]
    fast, reference = Encoder.load(run), Encoder.load(run, runtime="torch")
    assert isinstance(fast._backbone, CompiledBackbone)  # openvino is a dependency: "auto" must find it
    assert not isinstance(reference._backbone, CompiledBackbone)
    assert fast.fingerprint == reference.fingerprint  # the same model, another engine
    np.testing.assert_allclose(fast.embed(paths), reference.embed(paths), atol=2e-3)


def test_encoder_names_unreadable_images_or_skips_them(photos):
    _, root, run, _ = photos
    enc = Encoder.load(run)
    good = sorted((root / "2024" / "trip" / "red").glob("*.png"))[:2]
    broken = root / "2024" / "trip" / "red" / "broken.jpg"
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        enc.embed([good[0], broken, good[1]])
    with pytest.raises(ValueError, match=r"not found.*nothere\.png"):
        enc.embed([good[0], root / "nothere.png"])
    emb = enc.embed([good[0], broken, good[1]], on_error="skip")
    assert len(emb) == 2 and enc.skipped == [str(broken)]
    np.testing.assert_array_equal(emb, enc.embed(good))


def test_model_file_stores_component_args_not_the_config(photos):
    _, _, run, _ = photos
    payload = torch.load(run / "model.pt", weights_only=True)
    assert payload["format"] == "hihpq-model/2" and "config" not in payload
    assert payload["quantizer"]["n_subspaces"] == 2 and payload["quantizer"]["n_codewords"] == 16
    assert payload["projector"]["in_dim"] == 1280 and payload["projector"]["kind"] == "mlp"
    bb = payload["backbone"]
    assert bb["name"] == "efficientnet-lite0" and bb["resolution"] == 32 and bb["trainable"] == "none"
    assert not bb["stored"] and len(bb["weights_sha256"]) == 64  # rebuilt from the package, checked
    assert not any(k.startswith("backbone.") for k in payload["state_dict"])


def test_flipped_byte_in_a_weight_is_refused(photos, tmp_path):
    _, _, run, _ = photos
    data = bytearray((run / "model.pt").read_bytes())
    weight = torch.load(run / "model.pt", weights_only=True)["state_dict"]["projector.net.0.weight"]
    raw = weight.contiguous().numpy().tobytes()[:64]
    at = bytes(data).find(raw)
    assert at > 0
    data[at + 17] ^= 0x01
    (tmp_path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="damaged"):
        load_model(tmp_path / "model.pt")


def test_other_backbone_weights_are_refused(photos, tmp_path):
    _, _, run, _ = photos
    payload = torch.load(run / "model.pt", weights_only=True)
    payload["backbone"]["weights_sha256"] = "0" * 64
    torch.save(payload, tmp_path / "model.pt")  # tensors untouched: their checksum still holds
    with pytest.raises(ModelFileError, match="not the ones the model was trained with"):
        load_model(tmp_path / "model.pt")


def test_format_1_file_written_by_the_old_code_path_is_converted(photos, tmp_path, caplog):
    _, root, run, config = photos
    loaded = load_model(run)
    cfg = load_config(str(config), ["hierarchy.levels=[2]"])
    old = {  # the layout of hihpq-model/1: the whole config, in_dim and the head's state_dict
        "format": "hihpq-model/1",
        "config": cfg.to_dict(),
        "in_dim": 1280,
        "state_dict": loaded.model.state_dict(),
        "extra": {},
    }
    torch.save(old, tmp_path / "model.pt")
    with caplog.at_level(logging.WARNING, logger="hihpq"):
        converted = Encoder.load(tmp_path)
    assert "hihpq-model/1 converted" in caplog.text
    paths = sorted((root / "2024" / "trip" / "green").glob("*.png"))[:4]
    np.testing.assert_array_equal(converted.embed(paths), Encoder.load(run).embed(paths))
    assert converted.fingerprint == Encoder.load(run).fingerprint  # the same model, whatever the file format


def test_device_follows_the_module(photos, monkeypatch):
    """Below the entry points, inputs go to the device of the module they are given (here: meta)."""
    from hihpq.evaluation import embed, encode_embeddings

    loaded = load_model(photos[2])
    model = loaded.model.to("meta")
    seen = []

    def record(x):
        seen.append(x.device.type)
        return torch.zeros(len(x), model.quantizer.n_subspaces, model.quantizer.subspace_dim)

    monkeypatch.setattr(model, "embed", record)
    embed(model, np.zeros((3, 1280), np.float32))
    q = model.quantizer

    def encode(h):
        seen.append(h.device.type)
        return torch.zeros(len(h), q.n_subspaces, dtype=torch.uint8)

    monkeypatch.setattr(q, "encode", encode)
    encode_embeddings(q, np.zeros((3, q.n_subspaces, q.subspace_dim), np.float32))
    assert seen == ["meta", "meta"]


def test_index_records_the_model_and_search_refuses_another(photos, tmp_path, capsys):
    _, root, _, config = photos
    run = tmp_path / "run"
    train_run(load_config(str(config), ["train.epochs=1"]), run, progress=False)
    index = tmp_path / "photos.hpq"
    assert main(["encode", str(run), "--images", str(root), "--out", str(index)]) == 0
    assert "skipped 1 unreadable" in capsys.readouterr().out  # the corrupt file
    assert read_index(index).ntotal == 36
    meta = read_index(index).user_metadata
    assert meta["model_fingerprint"] == Encoder.load(run).fingerprint and meta["model"] == str(
        (run / "model.pt").resolve()
    )
    query = next((root / "2024" / "trip" / "red").glob("*.png"))
    assert main(["search", str(index), "--query", str(query), "-k", "3"]) == 0
    capsys.readouterr()
    # retrain into the same run folder: the old index no longer matches the model there
    train_run(load_config(str(config), ["train.epochs=1", "train.lr=0.05"]), run, progress=False)
    assert main(["search", str(index), "--query", str(query), "-k", "3"]) == 2
    err = capsys.readouterr().err
    assert "encoded by model" in err and meta["model_fingerprint"][:16] in err
    assert Encoder.load(run).fingerprint[:16] in err and "Re-encode" in err
    assert main(["index", "add", str(index), "--images", str(query)]) == 2


def test_index_add_skips_present_paths_and_remove_is_by_path_or_id(photos, tmp_path, capsys):
    from hihpq.index_update import add_images, remove_items

    _, root, run, _ = photos
    enc = Encoder.load(run)
    red = sorted((root / "2024" / "trip" / "red").glob("*.png"))
    blue = sorted((root / "2024" / "trip" / "blue").glob("*.png"))
    path = tmp_path / "i.hpq"
    write_index(enc.index([p.absolute() for p in red[:4]]), path)
    extra = [red[2], red[3], *red[4:6], *blue[:3]]  # the first two are in the index already
    counts = add_images(path, extra, progress=False)
    assert counts == {"added": 5, "already_present": 2, "unreadable": 0}
    after = read_index(path)
    names = after.get_metadata(after.ids)
    assert after.ntotal == 9 and len(set(names)) == 9
    assert after.user_metadata["model_fingerprint"] == enc.fingerprint
    rows = [names.index(str(p.absolute())) for p in extra[2:]]  # the added images, under their own codes
    np.testing.assert_array_equal(after.codes[rows], enc.encode(extra[2:]))
    assert add_images(path, extra, progress=False)["added"] == 0  # all present: nothing duplicated
    assert read_index(path).ntotal == 9
    assert main(["index", "remove", str(path), "--paths", str(red[0].absolute())]) == 0
    assert main(["index", "remove", str(path), "--ids", "1", "2"]) == 0
    left = read_index(path)
    assert left.ntotal == 6 and str(red[0].absolute()) not in left.get_metadata(left.ids)
    with pytest.raises(ValueError, match="not in"):
        remove_items(path, paths=[str(red[0])])
    assert main(["index", "remove", str(path), "--ids", "1"]) == 2  # removed already: refused, nothing changes
    assert read_index(path).ntotal == 6


def test_item_metadata_extend_and_take_keep_bytes(monkeypatch):
    """Appending to / selecting from a file-backed name list copies bytes: no stored name is decoded (adding
    10,000 items to an index of a million paths does not decode the million)."""
    from hihpq.index.pq_index import _ItemMetadata

    offsets, blob = _ItemMetadata(["a/1.jpg", "b/\u00e9.png", "c.gif"]).to_buffers()
    stored = _ItemMetadata(offsets=offsets, blob=blob)

    def no_decoding(*args):
        raise AssertionError("stored names were decoded")

    with monkeypatch.context() as m:
        m.setattr(_ItemMetadata, "get", no_decoding)
        m.setattr(_ItemMetadata, "as_list", no_decoding)
        grown = stored.extend(["d.jpg", "e/\u00fc.jpg"])
        taken = grown.take(np.array([4, 0, 2]))
        present = stored.contains(["c.gif", "x.gif", "b/\u00e9.png"])
        rows = grown.positions_of(["d.jpg", "x.gif", "a/1.jpg"])
    assert grown._strings is None and taken._strings is None
    assert grown.as_list() == ["a/1.jpg", "b/\u00e9.png", "c.gif", "d.jpg", "e/\u00fc.jpg"]
    assert taken.as_list() == ["e/\u00fc.jpg", "a/1.jpg", "c.gif"]
    assert present.tolist() == [True, False, True] and rows.tolist() == [3, -1, 0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_evaluate_encode_search_on_cuda(tmp_path, capsys):
    images = write_colour_folder(tmp_path / "images", per_class=12)
    config = write_tiny_config(
        tmp_path / "c.yaml",
        images,
        tmp_path / "cache",
        "cuda",
        data={"n_query": 6, "n_train": 30},
        features={"n_views": 2},
        train={"epochs": 2, "batch_size": 16},
    )
    run = tmp_path / "run"
    assert main(["train", str(config), "--out", str(run), "--device", "cuda"]) == 0
    assert main(["evaluate", str(run), "--device", "cuda"]) == 0
    index = tmp_path / "i.hpq"
    assert main(["encode", str(run), "--images", str(images), "--out", str(index), "--device", "cuda"]) == 0
    query = next((images / "red").glob("*.png"))
    assert main(["search", str(index), "--query", str(query), "-k", "3", "--device", "cuda"]) == 0
    assert str(query) in capsys.readouterr().out
    enc = Encoder.load(run, device="cuda")
    np.testing.assert_allclose(enc.embed([query]), Encoder.load(run).embed([query]), atol=1e-3)


def test_images_split_labels_from_csv_or_class_folders(tmp_path):
    from hihpq.data.prepare import auto_levels, images_split

    assert auto_levels(10_000) == [200, 100, 50] and auto_levels(300) == [6, 3, 2] and auto_levels(36) == [2]
    flat = tmp_path / "flat"
    write_colour_folder(flat / "a" / "b", per_class=4)  # nested deeper than root/<class>/<image>: unlabelled
    split = images_split(flat)
    assert len(split.train) == 12 and len(split.query) == 0 and len(split.database) == 12
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "path,label\n" + "".join(f"a/b/red/{k:03d}.png,warm\n" for k in range(4)) + "a/b/blue/000.png,cold\n"
    )
    split = images_split(flat, eval_labels=str(labels), n_query=2)
    assert len(split.train) == 12 and len(split.query) == 2 and len(split.database) == 3  # labelled ones only
    classes = write_colour_folder(tmp_path / "classes", per_class=5)  # root/<class>/<image>: labelled
    split = images_split(classes)
    assert len(split.query) == 1 and len(split.database) == 14 and sorted(set(split.labels.tolist())) == [0, 1, 2]
    labels.write_text("a/b/red/999.png,warm\n")
    with pytest.raises(ValueError, match="not an image under"):
        images_split(flat, eval_labels=str(labels))


def test_train_needs_a_config_or_images(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "x")]) == 2
    assert "give a config" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert main(["train", "--images", str(tmp_path / "none"), "--out", str(tmp_path / "y")]) == 2
    assert "does not exist" in capsys.readouterr().err
