"""End to end through the command line on generated images (real backbone, tiny resolution)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import write_colour_folder, write_tiny_config
from hihpq.cli import main
from hihpq.metrics import map_at_k


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    images = write_colour_folder(tmp / "images", per_class=30)
    config = write_tiny_config(
        tmp / "tiny.yaml",
        images,
        tmp / "cache",
        "tiny",
        data={"n_query": 15, "n_train": 75},
        features={"n_views": 2},
        train={"epochs": 6, "batch_size": 32},
    )
    run = tmp / "run"
    assert main(["train", str(config), "--out", str(run)]) == 0
    return tmp, images, run


def test_train_writes_model_log_and_run_record(trained_run):
    _, _, run = trained_run
    for name in ("model.pt", "checkpoint.pt", "log.csv", "log.json", "config.yaml", "run.json"):
        assert (run / name).is_file(), name
    record = json.loads((run / "run.json").read_text())
    assert record["seed"] == 2021 and record["config"]["quantizer"]["bits"] == 8
    assert record["versions"]["torch"] and "commit" in record
    assert record["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability() and record["cpu"]["name"]
    log = json.loads((run / "log.json").read_text())
    assert len(log) == 6 and log[-1]["aug"] < log[0]["aug"]
    # 3 colour classes, 25 database images each: random ranking scores about 1/3.
    assert record["eval"]["map_at_20"] > 0.6


def test_evaluate_encode_search_and_info(trained_run, capsys):
    tmp, images, run = trained_run
    assert main(["evaluate", str(run)]) == 0
    assert "mAP@20" in capsys.readouterr().out

    index = tmp / "colours.hpq"
    assert main(["encode", str(run), "--images", str(images), "--out", str(index)]) == 0
    assert main(["index", "info", str(index)]) == 0
    info = capsys.readouterr().out
    assert "90" in info  # ntotal

    query = images / "red" / "000.png"
    assert main(["search", str(index), "--query", str(query), "-k", "10"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "id=" in ln]
    assert len(lines) == 10
    red = sum("/red/" in ln for ln in lines)
    assert red >= 8, lines  # the neighbours of a red image are red images
    assert str(query) in lines[0]  # an image finds itself first


def _independent_map(saved) -> float:
    """mAP@K from the saved codes with NumPy in float64: nothing from hihpq but the file."""
    q, w, c = saved["queries"].astype(np.float64), saved["codewords"].astype(np.float64), saved["curvature"]
    codes, k = saved["codes"], int(saved["topk"])
    inner = -q[:, :, None, 0] * w[None, :, :, 0] + np.einsum("qmd,mkd->qmk", q[..., 1:], w[..., 1:])
    table = np.arccosh(np.maximum(-c[None, :, None] * inner, 1.0)) / np.sqrt(c)[None, :, None]  # (n_q, M, K)
    dist = sum(table[:, m, codes[:, m]] for m in range(codes.shape[1]))  # (n_q, n_db)
    ranked = np.argsort(dist, axis=1, kind="stable")[:, :k]
    rel = saved["database_labels"][ranked] == saved["query_labels"][:, None]
    hits = np.cumsum(rel, axis=1)
    ap = [(hits[i][rel[i]] / (np.flatnonzero(rel[i]) + 1)).sum() / max(hits[i, -1], 1) for i in range(len(rel))]
    return float(np.mean(ap))


def test_saved_codes_give_the_same_map_independently(trained_run, tmp_path, capsys):
    _, _, run = trained_run
    assert main(["evaluate", str(run), "--save-codes", str(tmp_path / "codes.npz")]) == 0
    reported = float(capsys.readouterr().out.split("mAP@20 = ")[1].split()[0])
    saved = np.load(tmp_path / "codes.npz")
    assert saved["codes"].dtype == np.uint8 and saved["codes"].shape[1] == 2 and str(saved["geometry"]) == "lorentz"
    assert abs(_independent_map(saved) - float(saved["map"])) < 1e-6
    assert abs(float(saved["map"]) - reported) < 1e-4  # printed with 4 decimals


def test_codes_beat_random_on_the_protocol(trained_run):
    _tmp, _, run = trained_run
    from hihpq.config import from_dict
    from hihpq.data.prepare import prepare_features
    from hihpq.evaluation import evaluate_model
    from hihpq.models.io import load_model

    loaded = load_model(run)
    model, cfg = loaded.model, from_dict(loaded.provenance["config"])
    prep = prepare_features(cfg, progress=False)
    scores = evaluate_model(
        model, prep.queries, prep.database, prep.split.query_labels, prep.split.database_labels, topk=20
    )
    rng = np.random.default_rng(0)
    n_db = len(prep.split.database)
    random_map = map_at_k(
        np.stack([rng.permutation(n_db)[:20] for _ in range(15)]),
        prep.split.query_labels,
        prep.split.database_labels,
        k=20,
    )
    assert scores["map_at_20"] > random_map + 0.2


def test_bad_config_is_refused_before_any_work(tmp_path, capsys):
    assert main(["train", "cifar10-ii-32", "-o", "quantizer.bits=30", "--out", str(tmp_path / "x")]) == 2
    assert "not a multiple of log2" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_configs_lists_paper_settings(capsys):
    assert main(["configs"]) == 0
    names = capsys.readouterr().out.split()
    assert {"cifar10-ii-32", "flickr25k-64", "nuswide-16", "cifar10-ii-32-vanilla-euclidean"} <= set(names)
