"""Benchmark report: the paper-style table, the plots, the Poincare-disk view and ``hihpq bench`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import write_colour_folder
from hihpq.benchmark import METHODS, curve_ks
from hihpq.build import build_model
from hihpq.config import load_config
from hihpq.evaluation import evaluate_prepared
from hihpq.geometry import lorentz as L
from hihpq.geometry.lorentz import to_poincare
from hihpq.hierarchy import HierarchicalClustering
from hihpq.metrics import pr_curve
from hihpq.quantizer import ProductQuantizer
from hihpq.report import write_report
from hihpq.report_plots import (
    plot_map_vs_bits,
    plot_poincare,
    plot_pr_curves,
    plot_precision_at_k,
    plot_training,
    poincare_view,
)
from hihpq.report_tables import METHOD_NAMES, aggregate, claims_table, markdown_table, paired_differences

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG


def _rec(method: str, bits: int, value: float, seed: int = 0) -> dict:
    return {"method": method, "bits": bits, "map_at_1000": value, "seed": seed}


def _cells(table: str) -> dict[str, list[str]]:
    """Row name -> cells of a Markdown table (header and separator dropped)."""
    rows = [ln for ln in table.strip().splitlines()[2:]]
    out = {}
    for row in rows:
        parts = [p.strip() for p in row.strip().strip("|").split("|")]
        out[parts[0]] = parts[1:]
    return out


RECORDS = [
    _rec("hihpq", 16, 0.60, 1),
    _rec("hihpq", 16, 0.62, 2),
    _rec("hihpq", 16, 0.64, 3),
    _rec("hihpq", 32, 0.70, 1),
    _rec("pq", 16, 0.50, 1),
    _rec("pq", 16, 0.55, 2),
    _rec("opq", 32, 0.71, 1),
    _rec("float", 40960, 0.80, 1),
]


# ------------------------------------------------------------------------------------------------------ table
def test_method_names_follow_the_benchmark_methods():
    assert tuple(METHOD_NAMES) == METHODS


def test_table_cells_against_hand_computed_numbers():
    table = markdown_table(RECORDS, bits=(16, 32, 64))
    lines = table.strip().splitlines()
    assert lines[0] == "| Method | 16 bits | 32 bits | 64 bits |"
    cells = _cells(table)
    # Rows in benchmark order, readable names; the float row names its size.
    assert list(cells) == ["HiHPQ", "PCA+PQ", "PCA+OPQ", "Float (cosine), 1280-d float32, 40960 bits"]
    # hihpq 16: mean 62, sample std sqrt((4 + 0 + 4) / 2) = 2; it beats pq (52.5) -> bold.
    assert cells["HiHPQ"][0] == "**62.00 ± 2.00 (3)**"
    # A single run has no spread: "mean (1)"; opq's 71 beats hihpq's 70 at 32 bits.
    assert cells["HiHPQ"][1] == "70.00 (1)"
    assert cells["PCA+OPQ"][1] == "**71.00 (1)**"
    # pq 16: mean 52.5, std sqrt(2 * 2.5^2 / 1) = 3.5355 -> 3.54; no 32-bit record -> "-".
    assert cells["PCA+PQ"] == ["52.50 ± 3.54 (2)", "-", "-"]
    assert cells["PCA+OPQ"][0] == "-"
    assert cells["HiHPQ"][2] == "-"
    # Float features beat every code but do not compete for bold; same figure in every column.
    assert cells["Float (cosine), 1280-d float32, 40960 bits"] == ["80.00 (1)"] * 3


def test_aggregate_matches_numpy():
    stats = aggregate(RECORDS)
    mean, std, n = stats["pq", 16]
    assert n == 2 and mean == pytest.approx(0.525) and std == pytest.approx(np.std([0.5, 0.55], ddof=1))
    assert math.isnan(stats["opq", 32][1])


def test_paired_differences_pair_by_seed_against_hand_computed_numbers():
    records = [
        _rec("hihpq", 32, 0.50, seed=1), _rec("hihpq", 32, 0.54, seed=2), _rec("hihpq", 32, 0.60, seed=3),
        _rec("full-euclidean", 32, 0.49, seed=1), _rec("full-euclidean", 32, 0.51, seed=2),  # no seed 3
        _rec("full-euclidean", 32, 0.10, seed=4), _rec("hihpq", 16, 0.90, seed=1),  # unpaired seed, other bits
    ]  # fmt: skip
    # pairs: seed 1 +0.01, seed 2 +0.03 -> mean 0.02, std sqrt(2 * 0.01^2 / 1) = 0.014142
    mean, std, n = paired_differences(records, "hihpq", "full-euclidean", 32)
    assert n == 2 and mean == pytest.approx(0.02) and std == pytest.approx(0.0141421356)
    assert paired_differences(records, "hihpq", "full-euclidean", 64)[2] == 0
    one = paired_differences([*records, _rec("full-euclidean", 16, 0.80, seed=1)], "hihpq", "full-euclidean", 16)
    assert one[0] == pytest.approx(0.10) and math.isnan(one[1]) and one[2] == 1
    with pytest.raises(ValueError, match="two records of hihpq"):
        paired_differences([*records, _rec("hihpq", 32, 0.4, seed=1)], "hihpq", "full-euclidean", 32)
    table = claims_table(records, bits=(16, 32))
    row = next(line for line in table.splitlines() if line.startswith("| Hyperbolic - Euclidean, Full"))
    assert row == "| Hyperbolic - Euclidean, Full | - | +2.00 ± 1.41 (2) |"
    assert "Vanilla" not in table  # rows without any pair are left out
    assert claims_table([_rec("pq", 32, 0.5, seed=1)]) is None


def test_table_ties_are_all_bold_and_rows_can_be_chosen():
    recs = [_rec("pq", 16, 0.5), _rec("opq", 16, 0.5), _rec("itq", 16, 0.4)]
    cells = _cells(markdown_table(recs, bits=(16,)))
    assert cells["PCA+PQ"] == ["**50.00 (1)**"] and cells["PCA+OPQ"] == ["**50.00 (1)**"]
    assert cells["ITQ"] == ["40.00 (1)"]
    chosen = _cells(markdown_table(recs, bits=(16,), methods=["itq"], names={"itq": "Binary"}))
    assert chosen == {"Binary": ["**40.00 (1)**"]}  # best of the rows shown


def test_table_refuses_bad_records():
    with pytest.raises(ValueError, match="lacks"):
        markdown_table([{"method": "pq", "bits": 16}])
    with pytest.raises(ValueError, match="finite number"):
        markdown_table([_rec("pq", 16, float("nan"))])
    with pytest.raises(TypeError, match="list of dicts"):
        markdown_table({"method": "pq"})


# ------------------------------------------------------------------------------------------------------ plots
def _curve():
    rng = np.random.default_rng(0)
    db_labels = rng.integers(0, 3, 60)
    q_labels = rng.integers(0, 3, 8)
    ranked = np.stack([rng.permutation(60)[:30] for _ in range(8)])
    return pr_curve(ranked, q_labels, db_labels, curve_ks(30))


def _history(n: int = 4, curvature: bool = True) -> list[dict]:
    return [
        {
            "epoch": e + 1,
            "loss": 3.0 - 0.3 * e,
            "aug": 2.5 - 0.2 * e,
            "prot": 0.0 if e == 0 else 0.4,
            "ins": 0.0,
            "quant_error": 0.5 / (e + 1),
            "curvature": [1.0 + 0.1 * e, 1.0 - 0.05 * e] if curvature else [1.0, 1.0],
        }
        for e in range(n)
    ]


def test_curve_cutoffs_are_a_few_dozen_in_range():
    ks = curve_ks(1000)
    assert 20 <= len(ks) <= 40 and ks[0] == 1 and ks[-1] == 1000 and np.all(np.diff(ks) > 0)
    assert curve_ks(1).tolist() == [1]


def test_plots_write_png(tmp_path):
    assert _is_png(plot_map_vs_bits(RECORDS, tmp_path / "map.png"))
    curve = _curve()
    as_dict = {"ks": curve.ks.tolist(), "precision": curve.precision.tolist(), "recall": curve.recall.tolist()}
    assert _is_png(plot_pr_curves({"HiHPQ": curve, "PCA+PQ": as_dict}, tmp_path / "pr.png"))
    assert _is_png(plot_precision_at_k({"HiHPQ": curve, "PCA+PQ": as_dict}, tmp_path / "pk.png"))
    hist = {"HiHPQ": _history(), "Vanilla-Euclidean": _history(curvature=False)}
    assert _is_png(plot_training(hist, tmp_path / "train.png"))


def test_plots_refuse_bad_input(tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        plot_pr_curves({}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="differ in length"):
        plot_pr_curves({"a": {"precision": [1, 0.5], "recall": [0.1]}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="'ks' or 'k'"):
        plot_precision_at_k({"a": {"precision": [1.0]}}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="PNG"):
        plot_map_vs_bits(RECORDS, tmp_path / "x.pdf")
    with pytest.raises(ValueError, match="at least one epoch"):
        plot_training({"a": []}, tmp_path / "x.png")


# ---------------------------------------------------------------------------------------------- Poincare disk
@settings(max_examples=60, deadline=None)
@given(
    d=st.integers(2, 6),
    c=st.floats(0.01, 10.0),
    r=st.floats(0.0, 4.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_to_poincare_is_tanh_of_half_the_distance(d, c, r, seed):
    direction = np.random.default_rng(seed).normal(size=d)
    direction /= np.linalg.norm(direction)
    v = torch.from_numpy(np.concatenate([[0.0], r * direction]))  # tangent vector at the origin
    x = L.expmap0(v, c=c)
    p = to_poincare(x, c)
    # Hand formula: a point at geodesic distance r from the origin lands at radius tanh(sqrt(c) r / 2).
    expected = math.tanh(math.sqrt(c) * r / 2)
    assert np.linalg.norm(p) < 1.0
    np.testing.assert_allclose(np.linalg.norm(p), expected, rtol=1e-9, atol=1e-12)
    if r > 1e-6:
        np.testing.assert_allclose(p / np.linalg.norm(p), direction, atol=1e-6)
    # The ball of curvature -c has radius 1 / sqrt(c): p = x_space / (1 + sqrt(c) x0) there.
    raw = to_poincare(x, c, unit=False)
    np.testing.assert_allclose(raw, x[1:].numpy() / (1 + math.sqrt(c) * x[0].item()), rtol=1e-9, atol=1e-15)
    assert np.linalg.norm(raw) < 1 / math.sqrt(c)


@pytest.mark.parametrize("c", [0.1, 1.0, 7.5])
def test_origin_maps_to_the_centre(c):
    o = L.origin(5, c=c, dtype=torch.float64)
    np.testing.assert_array_equal(to_poincare(o, c), np.zeros(4))


def test_to_poincare_refuses_bad_input():
    with pytest.raises(ValueError, match="upper sheet"):
        to_poincare(np.array([[-1.0, 0.0, 0.0]]), 1.0)
    with pytest.raises(ValueError, match="positive"):
        to_poincare(np.array([[1.0, 0.0, 0.0]]), 0.0)
    with pytest.raises(ValueError, match="D >= 2"):
        to_poincare(np.array([1.0]), 1.0)


def _model(geometry: str = "lorentz", feature_dim: int = 16, in_dim: int = 12):
    """A tiny untrained HiHPQ head: 16 bits, K = 16 -> M = 4 subspaces of D = feature_dim / 4."""
    cfg = load_config(
        "cifar10-ii-16",
        [
            "quantizer.n_codewords=16",
            f"quantizer.feature_dim={feature_dim}",
            f"quantizer.geometry={geometry}",
            "projector.hidden=32",
        ],
    )
    return build_model(cfg, in_dim)


def _features(n: int = 120, in_dim: int = 12):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), n // 3)
    centres = rng.normal(size=(3, in_dim)) * 3
    return (centres[labels] + rng.normal(size=(n, in_dim))).astype(np.float32), labels


def test_poincare_view_without_reduction_is_the_direct_map():
    model = _model(feature_dim=12)  # D = 3: a 2-d hyperbolic subspace, drawn as is
    x, _ = _features()
    view = poincare_view(model, x, subspace=2, levels=None)
    assert not view.reduced and view.dim == 2 and view.prototypes == []
    assert model.training  # the view ran in eval mode and restored the mode
    model.eval()
    with torch.no_grad():
        h = model.embed(torch.from_numpy(x))[:, 2]
        cw = model.quantizer.codebooks()[2]
    c = float(model.quantizer.curvature[2].detach())
    np.testing.assert_allclose(view.points, to_poincare(h, c), atol=1e-6)
    np.testing.assert_allclose(view.codewords, to_poincare(cw, c), atol=1e-6)


def test_poincare_view_draws_a_one_dimensional_subspace_on_the_diameter(tmp_path):
    model = _model(feature_dim=8)  # D = 2: 1-d hyperbolic subspaces
    x, labels = _features()
    view = poincare_view(model, x, subspace=0, levels=(6, 3))
    assert not view.reduced and view.dim == 1
    assert view.points.shape == (len(x), 2) and view.codewords.shape == (16, 2)
    for arr in (view.points, view.codewords, *view.prototypes):
        assert np.all(arr[:, 1] == 0) and np.all(np.abs(arr[:, 0]) < 1.0)
    model.eval()
    with torch.no_grad():
        h = model.embed(torch.from_numpy(x))[:, 0]
    np.testing.assert_allclose(
        view.points[:, 0], to_poincare(h, float(model.quantizer.curvature[0].detach()))[:, 0], atol=1e-6
    )
    assert _is_png(plot_poincare(model, x, labels, tmp_path / "line.png", levels=(6, 3)))


def test_poincare_view_reduces_in_the_tangent_space():
    model = _model(feature_dim=16)  # D = 4: 3-d hyperbolic subspaces, reduced to 2-d
    x, _ = _features()
    view = poincare_view(model, x, subspace=1, levels=(6, 3))
    assert view.reduced and view.dim == 3 and 0 < view.kept <= 1
    assert view.points.shape == (len(x), 2) and view.codewords.shape == (16, 2)
    assert [len(p) for p in view.prototypes] == [6, 3]
    for arr in (view.points, view.codewords, *view.prototypes):
        assert np.all(np.linalg.norm(arr, axis=1) < 1.0)
    # The projection is orthogonal through the origin: no point moves away from the centre.
    model.eval()
    with torch.no_grad():
        full = to_poincare(model.embed(torch.from_numpy(x))[:, 1], float(model.quantizer.curvature[1].detach()))
    assert np.all(np.linalg.norm(view.points, axis=1) <= np.linalg.norm(full, axis=1) + 1e-9)


def test_poincare_view_keeps_the_origin_at_the_centre():
    q = ProductQuantizer(2, 8, 5, clip_r=1.0, generator=torch.Generator().manual_seed(0))
    z = torch.randn(50, 10, generator=torch.Generator().manual_seed(1))
    z[7] = 0.0
    view = poincare_view(q, z, subspace=0, levels=None)
    np.testing.assert_allclose(view.points[7], 0.0, atol=1e-12)
    assert np.all(np.linalg.norm(view.points, axis=1) < 1.0)


def test_poincare_view_uses_a_given_hierarchy_and_checks_it():
    model = _model()
    x, _ = _features()
    with torch.no_grad():
        t = model.tangent(torch.from_numpy(x)).flatten(1)
    hc = HierarchicalClustering(levels=(8, 4, 2), seed=0).fit(t)
    from_fit = poincare_view(model, x, hierarchy=hc)
    from_list = poincare_view(model, x, hierarchy=list(hc.prototypes_))
    assert [len(p) for p in from_fit.prototypes] == [8, 4, 2]
    for a, b in zip(from_fit.prototypes, from_list.prototypes, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="M\\*D"):
        poincare_view(model, x, hierarchy=[np.zeros((3, 5), np.float32)])
    with pytest.raises(ValueError, match="subspace"):
        poincare_view(model, x, subspace=4)


def test_euclidean_twin_gets_the_centred_pca_plane():
    model = _model("euclidean")
    x, _ = _features()
    view = poincare_view(model, x, levels=(6,))
    assert view.geometry == "euclidean" and view.reduced
    np.testing.assert_allclose(view.points.mean(0), 0.0, atol=1e-9)


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_plot_poincare_writes_png(tmp_path, geometry):
    model = _model(geometry)
    x, labels = _features()
    path = plot_poincare(model, x, labels, tmp_path / "disk.png", levels=(6, 3), max_points=50)
    assert _is_png(path)
    multi = np.eye(3, dtype=np.uint8)[labels]  # multi-label input is coloured by the first label
    assert _is_png(plot_poincare(model, x, multi, tmp_path / "multi.png", levels=None))
    with pytest.raises(ValueError, match="labels"):
        plot_poincare(model, x, labels[:-1], tmp_path / "bad.png")


# ----------------------------------------------------------------------------------------------------- report
def test_write_report_writes_tables_and_plots(tmp_path):
    curve = _curve()
    c = {"ks": curve.ks.tolist(), "precision": curve.precision.tolist(), "recall": curve.recall.tolist()}
    records = [*RECORDS, _rec("vanilla-euclidean", 16, 0.58, 1), _rec("vanilla-euclidean", 16, 0.6, 2)]
    details = [
        {**r, "scores": {"pr_curve": c, "precision_curve": c, **({"history": _history()} if r["seed"] < 3 else {})}}
        for r in records
    ]
    paths = write_report(tmp_path / "rep", records, details, title="tiny")
    names = {p.name for p in paths}
    assert {"table.md", "map_vs_bits.png", "pr_curves-16bits.png", "precision_at_k-16bits.png"} <= names
    assert {"training-16bits.png", "pr_curves-32bits.png"} <= names
    assert all(_is_png(p) for p in paths if p.suffix == ".png")
    text = (tmp_path / "rep" / "table.md").read_text()
    assert text.startswith("# tiny") and "Table 1" in text and "Table 2" in text
    ablation = _cells(text.split("## Ablation")[1].split("\n\n", 2)[2].split("\n\n")[0])
    assert ablation["Vanilla-Euclidean"][0] == "59.00 ± 1.41 (2)"
    assert ablation["Full-Hyperbolic (HiHPQ)"][0] == "**62.00 ± 2.00 (3)**"


# ---------------------------------------------------------------------------------------------- hihpq bench
def test_benchmark_evaluation_matches_the_library_one():
    """The benchmark evaluates from the library's pieces to keep the ranked lists: same figures as
    evaluation.evaluate_prepared, and curves that agree with its precision@k."""
    from types import SimpleNamespace

    from hihpq.benchmark import evaluate_learned

    model = _model()
    x, labels = _features(150)
    prep = SimpleNamespace(
        queries=x[:30], database=x[30:], split=SimpleNamespace(query_labels=labels[:30], database_labels=labels[30:])
    )
    ours = evaluate_learned(model, prep, topk=25)
    ref = evaluate_prepared(model, prep, 25)
    assert ours["map_at_25"] == ref["map_at_25"] and ours["precision_at"] == ref["precision_at"]
    ks, prec = ours["precision_curve"]["ks"], ours["precision_curve"]["precision"]
    assert ks == ours["pr_curve"]["ks"] and ks[-1] == 25
    for k, p in ref["precision_at"].items():
        assert prec[ks.index(k)] == pytest.approx(p, abs=1e-12)


def _tiny_bench(tmp_path) -> list[str]:
    """Overrides that make a bench run of a generated folder take seconds."""
    images = write_colour_folder(tmp_path / "images")
    return [
        "data.dataset=folder",
        f"data.root={images}",
        "data.n_query=15",
        "data.n_train=75",
        "backbone.resolution=32",
        "features.n_views=2",
        "features.batch_size=32",
        "features.num_workers=0",
        f"features.cache_dir={tmp_path / 'cache'}",
        "quantizer.n_codewords=16",
        "quantizer.feature_dim=16",
        "projector.hidden=64",
        "hierarchy.levels=[6,3]",
        "hierarchy.warmup_epochs=1",
        "train.epochs=2",
        "train.batch_size=32",
        "eval.topk=20",
    ]


def test_bench_end_to_end(tmp_path, capsys):
    from hihpq.cli import main

    tiny = _tiny_bench(tmp_path)
    out = tmp_path / "grid" / "results.json"
    argv = ["bench", "--protocol", "cifar10-ii", "--methods", "hihpq", "itq", "--bits", "16", "--seeds", "2021"]
    argv += ["--out", str(out), "--quiet"] + [a for o in tiny for a in ("-o", o)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| Method | 16 bits |" in printed and "| HiHPQ |" in printed and "| ITQ |" in printed

    records = json.loads(out.read_text())
    assert [(r["method"], r["bits"], r["seed"]) for r in records] == [("hihpq", 16, 2021), ("itq", 16, 2021)]
    for r in records:
        assert set(r) == {"method", "bits", "map_at_20", "seed", "wall_s", "command", "commit"}
        assert f"{100 * r['map_at_20']:.2f} (1)" in printed

    folder = out.with_suffix("")
    for method in ("hihpq", "itq"):
        detail = json.loads((folder / f"{method}-16-2021.json").read_text())
        assert detail["environment"]["cpu"]["capability"] and detail["environment"]["versions"]["torch"]
        scores = detail["scores"]
        pk, pr = scores["precision_curve"], scores["pr_curve"]
        assert pk["ks"][0] == 1 and pk["ks"][-1] == 20 and len(pr["recall"]) == len(pk["ks"])
        assert np.all(np.diff(pr["recall"]) >= 0)
        # The stored curve agrees with the precision@k computed by the evaluation itself.
        for k, p in scores["precision_at"].items():
            assert pk["precision"][pk["ks"].index(int(k))] == pytest.approx(p, abs=1e-12)
    for name in ("table.md", "map_vs_bits.png", "pr_curves-16bits.png", "precision_at_k-16bits.png"):
        assert (folder / name).is_file(), name
    assert _is_png(folder / "training-16bits.png")
    assert _is_png(folder / "poincare-hihpq-16-2021.png")

    # `hihpq report` rewrites the table from the records alone (here: one record dropped), keeping the title.
    title = (folder / "table.md").read_text().splitlines()[0]
    out.write_text(json.dumps(records[:1]))
    (folder / "table.md").unlink()
    (folder / "table.md").write_text(f"{title}\n")
    assert main(["report", str(out)]) == 0
    table = (folder / "table.md").read_text()
    assert table.splitlines()[0] == title and "| HiHPQ |" in table and "| ITQ |" not in table
    assert main(["report", str(tmp_path / "missing.json")]) == 2
    assert "no results file" in capsys.readouterr().err


def test_bench_trains_each_bit_length_on_the_views_its_config_asks(tmp_path, monkeypatch):
    """A bit length whose config caches another number of views gets features of its own, not the first bit
    length's (a silently different training set)."""
    import hihpq.benchmark as bench
    from hihpq.cli import main

    real_config, real_run = bench.method_config, bench.run_learned
    trained = []

    def method_config(protocol, method, bits, seed, overrides):
        return real_config(protocol, method, bits, seed, [*overrides, *(["features.n_views=3"] if bits == 32 else [])])

    def run_learned(cfg, prep, *args, **kwargs):
        trained.append((cfg.quantizer.bits, cfg.features.n_views, prep.views.shape[1]))
        return real_run(cfg, prep, *args, **kwargs)

    monkeypatch.setattr(bench, "method_config", method_config)
    monkeypatch.setattr(bench, "run_learned", run_learned)
    argv = ["bench", "--protocol", "cifar10-ii", "--methods", "hihpq", "--bits", "16", "32", "--seeds", "1"]
    argv += ["--out", str(tmp_path / "grid.json"), "--quiet"] + [a for o in _tiny_bench(tmp_path) for a in ("-o", o)]
    assert main(argv) == 0
    assert trained == [(16, 2, 2), (32, 3, 3)]


def test_bench_refuses_bad_arguments_before_any_work(tmp_path, capsys):
    from hihpq.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--methods", "nope"])
    out = tmp_path / "r.json"
    assert main(["bench", "--protocol", "nowhere", "--out", str(out)]) == 2
    assert "no config named" in capsys.readouterr().err
    assert not out.exists()


def test_run_learned_sizes_an_empty_hierarchy_from_the_training_set():
    """`hierarchy.levels=[]` in a grid: the level sizes follow the number of training images (auto_levels), as in
    `hihpq train`, instead of reaching the trainer empty."""
    from helpers import tiny_head_config
    from hihpq.benchmark import run_learned
    from hihpq.data import ArrayImageDataset, Split
    from hihpq.data.prepare import PreparedFeatures, auto_levels

    rng = np.random.default_rng(0)
    labels = np.arange(360) % 3
    centres = rng.normal(size=(3, 24))
    clean = (centres[labels] + 0.3 * rng.normal(size=(360, 24))).astype(np.float16)
    train = np.arange(60, 360)
    views = (clean[train][:, None, :] + 0.1 * rng.normal(size=(300, 2, 24))).astype(np.float16)
    ds = ArrayImageDataset(np.zeros((360, 2, 2, 3), np.uint8), labels)
    prep = PreparedFeatures(Split("toy", ds, np.arange(60), train, train), clean, np.arange(360), views, 0)
    cfg = tiny_head_config("train.epochs=2", "hierarchy.levels=[]", "eval.topk=30")
    scores = run_learned(cfg, prep, progress=False)
    assert cfg.hierarchy.levels == auto_levels(300) == [6, 3, 2]
    assert 0.0 <= scores["map_at_30"] <= 1.0
