"""Grids of (method x bits x seed) on one protocol, on cached frozen-backbone features.

Methods: ``hihpq`` (the full model), the Table 2 variants (``vanilla-euclidean`` ... ``prototype-hyperbolic``,
``full-euclidean``; as in the paper, Instance has lambda2 = 1 and Euclidean is the MeCoQ-style cosine quantizer),
their alternatives (``*-euclidean-l2``: our L2 twin; ``*-lambda2-0.1``: the authors' code's instance weight), and
the shallow baselines ``pq``, ``opq``, ``itq``, ``float``. Every record carries its
figure, seed, wall time, command and commit; the list is merged into a JSON file so that grids can be resumed.
Per-run details (scores with precision@K and precision-recall curves, training history, config) go to a folder
beside it, with the report of :mod:`hihpq.report` (table.md, plots, a Poincare-disk view of a HiHPQ model).
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hihpq.build import build_loss, build_model, train_settings
from hihpq.config import Config, load_config
from hihpq.data.prepare import PreparedFeatures, prepare_features, resolve_levels
from hihpq.evaluation import rank_database, retrieval_scores
from hihpq.runinfo import environment, git_commit, seed_everything, write_json
from hihpq.train import Trainer

VARIANTS = (
    "vanilla-euclidean",
    "vanilla-hyperbolic",
    "instance-euclidean",
    "instance-hyperbolic",
    "prototype-euclidean",
    "prototype-hyperbolic",
    "full-euclidean",
)
# Alternatives to the paper's definitions of Table 2 (config cifar10-ii-<bits>-<name>).
ALTERNATIVES = (
    "vanilla-euclidean-l2",
    "instance-euclidean-l2",
    "prototype-euclidean-l2",
    "full-euclidean-l2",
    "instance-hyperbolic-lambda2-0.1",
    "instance-euclidean-lambda2-0.1",
    "instance-euclidean-l2-lambda2-0.1",
)
BASELINES = ("pq", "opq", "itq", "float")
METHODS = ("hihpq", *VARIANTS, *ALTERNATIVES, *BASELINES)


def method_config(protocol: str, method: str, bits: int, seed: int, overrides: list[str]) -> Config:
    """The config of a learned method: the paper setting, or its Table 2 variant."""
    name = f"{protocol}-{bits}" if method == "hihpq" else f"{protocol}-{bits}-{method}"
    return load_config(name, [*overrides, f"seed={seed}"])


def curve_ks(topk: int, n: int = 40) -> np.ndarray:
    """About ``n`` cut-offs in [1, topk] for the stored curves: log-spaced (the head) plus evenly spaced."""
    head = np.geomspace(1, topk, n // 2)
    tail = np.linspace(topk / (n // 2), topk, n // 2)
    return np.unique(np.clip(np.round(np.concatenate([head, tail])), 1, topk).astype(np.int64))


def curve_scores(ranked: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray) -> dict[str, Any]:
    """Precision@K and the precision-recall curve by rank over the ranked lists (n_q, topk) (metrics.py)."""
    from hihpq.metrics import pr_curve

    curve = pr_curve(ranked, query_labels, db_labels, curve_ks(ranked.shape[1]))
    ks = curve.ks.tolist()
    return {
        "precision_curve": {"ks": ks, "precision": curve.precision.tolist()},
        "pr_curve": {"ks": ks, "precision": curve.precision.tolist(), "recall": curve.recall.tolist()},
    }


def evaluate_learned(model, prep: PreparedFeatures, topk: int, metric: str = "adc") -> dict[str, Any]:
    """:func:`hihpq.evaluation.evaluate_prepared` plus the curves of :func:`curve_scores` (which need the ranking)."""
    split = prep.split
    ranked, info = rank_database(model, prep.queries, prep.database, topk, metric)
    scores = retrieval_scores(ranked, split.query_labels, split.database_labels, topk)
    scores.update(info)
    scores.update(curve_scores(ranked, split.query_labels, split.database_labels))
    return scores


def run_learned(
    cfg: Config,
    prep: PreparedFeatures,
    progress: bool = True,
    *,
    return_model: bool = False,
    front: torch.nn.Module | None = None,
) -> dict[str, Any] | tuple[dict[str, Any], Any]:
    """Train one learned method on the cached features and score it; ``return_model``: (scores, model).

    ``front``: a module between the cached features and the projector (the model's ``backbone``, e.g. the top
    layers of a backbone over cached activations); its ``feature_dim`` is the projector's input.
    """
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    resolve_levels(cfg, len(prep.split.train))  # `hierarchy.levels=[]`: sizes from the number of training images
    in_dim = prep.clean.shape[1] if front is None else front.feature_dim
    model = build_model(cfg, in_dim, backbone=front)
    trainer = Trainer(model, build_loss(cfg), train_settings(cfg, progress=progress))
    history = trainer.fit(prep.train_source())
    scores = evaluate_learned(model, prep, cfg.eval.topk, cfg.eval.metric)
    scores["train_s"] = sum(h["epoch_s"] for h in history)
    scores["wall_s"] = time.perf_counter() - t0
    scores["history"] = history
    return (scores, model) if return_model else scores


def run_baseline(method: str, bits: int, seed: int, prep: PreparedFeatures, topk: int) -> dict[str, Any]:
    from hihpq.baselines import ITQ, PCAOPQ, PCAPQ, FloatCosine

    t0 = time.perf_counter()
    est = {
        "pq": lambda: PCAPQ(bits=bits, n_components=64, seed=seed, n_threads=1),
        "opq": lambda: PCAOPQ(bits=bits, n_components=64, seed=seed, n_threads=1),
        "itq": lambda: ITQ(bits=bits, seed=seed, n_threads=1),
        "float": lambda: FloatCosine(n_threads=1),
    }[method]()
    with warnings.catch_warnings():  # 5,000 training points is below faiss's 39 * K advice for K = 256
        warnings.simplefilter("ignore")
        est.fit(prep.clean_of(prep.split.train))
    _, ranked = est.add(prep.database).search(prep.queries, topk)
    scores = retrieval_scores(ranked, prep.split.query_labels, prep.split.database_labels, topk)
    scores["wall_s"] = time.perf_counter() - t0
    scores.update(curve_scores(ranked, prep.split.query_labels, prep.split.database_labels))
    return scores


def _command_line() -> str:
    """How this process was started, as a user would type it."""
    argv = list(sys.argv)
    argv[0] = f"python {argv[0]}" if argv[0].endswith(".py") else Path(argv[0]).name
    return " ".join(argv)


def merge_records(path: Path, new: list[dict]) -> list[dict]:
    """Replace records of the same (method, bits, seed) and keep the rest; write atomically."""
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {(r["method"], r["bits"], r["seed"]) for r in new}
    merged = [r for r in old if (r["method"], r["bits"], r["seed"]) not in keys] + new
    merged.sort(key=lambda r: (METHODS.index(r["method"]) if r["method"] in METHODS else 99, r["bits"], r["seed"]))
    write_json(path, merged)
    return merged


def features_key(cfg: Config) -> str:
    """What :func:`prepare_features` reads of a config: runs that agree on it can share one PreparedFeatures."""
    d = cfg.to_dict()
    return json.dumps({"device": d["train"]["device"], **{s: d[s] for s in ("data", "backbone", "features")}})


def run_grid(
    protocol: str,
    methods: list[str],
    bits_list: list[int],
    seeds: list[int],
    out: str | Path,
    overrides: list[str] = (),
    data_dir: str | None = None,
    progress: bool = True,
    report: bool = True,
) -> list[dict]:
    """Run every (method, bits, seed) on cached features and merge the records into ``out``.

    The features are computed once for the first bit length's config, and again for a learned method whose
    config reads them otherwise (e.g. another number of cached views at one bit length).
    Per-run details go to ``out`` without its suffix (``<method>-<bits>-<seed>.json``); with ``report`` that
    folder also receives the report of every record in ``out`` (table.md and plots, :func:`write_grid_report`)
    and a Poincare-disk view of the last trained ``hihpq`` model (else the last learned one).
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not methods or not bits_list or not seeds:
        raise ValueError("run_grid needs at least one method, one bit width and one seed")
    out = Path(out)
    base = load_config(f"{protocol}-{bits_list[0]}", list(overrides))
    for bits in bits_list:  # refuse a missing config or bad override before computing any feature
        for method in methods:
            if method not in BASELINES:
                method_config(protocol, method, bits, seeds[0], list(overrides))
    t0 = time.perf_counter()
    prep = prepare_features(base, data_dir=data_dir, progress=progress)
    features_s = time.perf_counter() - t0
    preps = {features_key(base): prep}  # (baselines use the clean features, which every config shares)
    print(prep.split.summary(), f"(features ready in {features_s:.0f} s)")
    command = _command_line()
    commit, env = git_commit(), environment()
    key = f"map_at_{base.eval.topk}"
    records: list[dict] = []
    details_dir = out.with_suffix("")
    shown = None  # (model, config, method, bits, seed, features) of the model drawn on the Poincare disk
    for seed in seeds:
        for bits in bits_list:
            for method in methods:
                if method in BASELINES:
                    if method == "float" and bits != bits_list[0]:
                        continue  # float features do not depend on the code length
                    scores = run_baseline(method, bits, seed, prep, base.eval.topk)
                    rec_bits = 32 * prep.clean.shape[1] if method == "float" else bits
                    config = None
                else:
                    cfg = method_config(protocol, method, bits, seed, list(overrides))
                    fkey = features_key(cfg)
                    if fkey not in preps:
                        preps[fkey] = prepare_features(cfg, data_dir=data_dir, progress=progress)
                    scores, model = run_learned(cfg, preps[fkey], progress, return_model=True)
                    rec_bits, config = bits, cfg.to_dict()
                    if method == "hihpq" or shown is None or shown[2] != "hihpq":
                        shown = (model, cfg, method, bits, seed, preps[fkey])
                    del model
                record = {
                    "method": method,
                    "bits": rec_bits,
                    key: round(float(scores[key]), 6),
                    "seed": seed,
                    "wall_s": round(scores["wall_s"], 2),
                    "command": command,
                    "commit": commit,
                }
                records.append(record)
                print(
                    f"{method:<22} {bits:>3} bits  seed {seed}  {key} = {100 * scores[key]:.2f}  "
                    f"({scores['wall_s']:.0f} s)",
                    flush=True,
                )
                write_json(
                    details_dir / f"{method}-{bits}-{seed}.json",
                    {
                        **record,
                        "scores": scores,
                        "config": config,
                        "features_s": features_s,
                        "split": prep.split.identity(),
                        "environment": env,
                    },
                )
                merge_records(out, [record])
    if report:
        paths = []
        if shown is not None:  # first, so that table.md can show it
            model, cfg, method, bits, seed, features = shown
            disk = details_dir / f"poincare-{method}-{bits}-{seed}.png"
            paths.append(plot_model_poincare(model, cfg, features, disk))
        paths += write_grid_report(out, title=f"{protocol}: {prep.split.summary()}")
        print(f"report: {', '.join(p.name for p in paths)} in {details_dir}/")
    return records


def write_grid_report(out: str | Path, title: str | None = None) -> list[Path]:
    """table.md and plots of every record in the results file ``out``, from the details folder beside it."""
    from hihpq.report import write_report

    out = Path(out)
    details_dir = out.with_suffix("")
    records = json.loads(out.read_text())
    keys = {(r["method"], r["bits"], r["seed"]) for r in records}
    details = []
    for path in sorted(details_dir.glob("*.json")):
        d = json.loads(path.read_text())
        if isinstance(d, dict) and (d.get("method"), d.get("bits"), d.get("seed")) in keys:
            details.append(d)
    return write_report(details_dir, records, details, title=title)


def plot_model_poincare(model, cfg: Config, prep: PreparedFeatures, path: str | Path) -> Path:
    """Subspace 1 of a trained model on the Poincare disk: up to 2,000 training images coloured by class, the
    codewords and the prototypes of a hierarchy fitted (with the config's levels) on all training images."""
    from hihpq.report_plots import plot_poincare

    split = prep.split
    levels = [n for n in cfg.hierarchy.levels if n <= len(split.train)]
    return plot_poincare(
        model,
        prep.clean_of(split.train),
        split.train_labels,
        path,
        levels=levels,
        seed=cfg.seed,
        title=f"{cfg.name}, seed {cfg.seed}",
    )
