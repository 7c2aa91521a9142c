"""Sharded encoding: a folder encoded as 3 shards and merged is the index of one pass; bad merges are refused."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import write_colour_folder, write_tiny_config
from hihpq.build import build_model
from hihpq.cli import main
from hihpq.config import load_config
from hihpq.index import read_index
from hihpq.index.shards import merge_index_files, parse_shard, shard_path
from hihpq.models import build_backbone
from hihpq.models.io import save_model


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """An untrained model (its codes are as deterministic as a trained one's), a 3 x 7 image folder, the one-pass
    index and the 3 shard files."""
    tmp = tmp_path_factory.mktemp("shards")
    images = write_colour_folder(tmp / "images", per_class=7)
    cfg = load_config(str(write_tiny_config(tmp / "tiny.yaml", images, tmp / "cache", "tiny-shards")))
    backbone = build_backbone(cfg.backbone.name)
    for name, seed in (("run", cfg.seed), ("other", cfg.seed + 1)):
        cfg.seed = seed
        model = build_model(cfg, backbone.feature_dim)
        save_model(tmp / name / "model.pt", model, backbone=backbone, resolution=cfg.backbone.resolution)
    one = tmp / "one.hpq"
    assert main(["encode", str(tmp / "run"), "--images", str(images), "--out", str(one)]) == 0
    out = tmp / "db.hpq"
    for i in range(3):
        assert main(["encode", str(tmp / "run"), "--images", str(images), "--out", str(out), "--shard", f"{i}/3"]) == 0
    return tmp, images, one, [shard_path(out, parse_shard(f"{i}/3", 21)) for i in range(3)]


def test_three_shards_merged_equal_one_pass(encoded, capsys):
    tmp, images, one, shards = encoded
    assert [p.name for p in shards] == [f"db-0000{i}-of-00003.hpq" for i in range(3)]
    assert [read_index(p).ntotal for p in shards] == [7, 7, 7]
    merged = tmp / "merged.hpq"
    assert main(["index", "merge", str(merged), *map(str, reversed(shards))]) == 0  # any order of arguments
    a, meta_a = read_index(one, return_metadata=True)
    b, meta_b = read_index(merged, return_metadata=True)
    np.testing.assert_array_equal(b.codes, a.codes)
    np.testing.assert_array_equal(b.ids, a.ids)
    assert list(meta_b["item_names"]) == list(meta_a["item_names"])
    assert meta_b["metadata"] == meta_a["metadata"] and b.next_id == a.next_id == 21
    # the same search results, through the command line
    capsys.readouterr()
    query = str(images / "red" / "003.png")
    results = []
    for index in (one, merged):
        assert main(["search", str(index), "--query", query, "-k", "8"]) == 0
        results.append([ln for ln in capsys.readouterr().out.splitlines() if "id=" in ln])
    assert len(results[0]) == 8 and results[0] == results[1]


def test_bad_merges_are_refused(encoded):
    tmp, images, _, shards = encoded
    out = tmp / "bad.hpq"
    with pytest.raises(ValueError, match=r"missing \[1\]"):
        merge_index_files(out, [shards[0], shards[2]])
    with pytest.raises(ValueError, match=r"repeated \[2\]"):
        merge_index_files(out, [shards[0], shards[2], shards[2]])
    other = tmp / "other-db.hpq"
    assert main(["encode", str(tmp / "other"), "--images", str(images), "--out", str(other), "--shard", "1/3"]) == 0
    with pytest.raises(ValueError, match="codebooks"):  # another model's shard
        merge_index_files(out, [shards[0], shard_path(other, parse_shard("1/3", 21)), shards[2]])
    with pytest.raises(ValueError, match="ids present in more than one"):  # not shards, but overlapping ids
        merge_index_files(out, [tmp / "one.hpq", tmp / "one.hpq"])
    assert not out.exists()


def test_shard_specs():
    assert [parse_shard(f"{i}/4", 10).bounds for i in range(4)] == [(0, 3), (3, 6), (6, 8), (8, 10)]
    for bad in ("3", "4/4", "-1/4", "a/b", "0/0", "0/11"):
        with pytest.raises(ValueError, match="--shard"):
            parse_shard(bad, 10)


def test_shard_auto_follows_torchrun(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert parse_shard("auto", 9).bounds == (6, 9)
