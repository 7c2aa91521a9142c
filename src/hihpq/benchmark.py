"""Grids of (method x bits x seed) on one protocol, on cached frozen-backbone features.

Methods: ``hihpq`` (the full model), the Table 2 variants (``vanilla-euclidean`` ... ``prototype-hyperbolic``,
``full-euclidean``), and the shallow baselines ``pq``, ``opq``, ``itq``, ``float``. Every record carries its
figure, seed, wall time, command and commit; the list is merged into a JSON file so that grids can be resumed.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from hihpq import pipeline as P
from hihpq.config import Config, load_config
from hihpq.runinfo import git_commit, seed_everything, write_json
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
BASELINES = ("pq", "opq", "itq", "float")
METHODS = ("hihpq", *VARIANTS, *BASELINES)


def method_config(protocol: str, method: str, bits: int, seed: int, overrides: list[str]) -> Config:
    """The config of a learned method: the paper setting, or its Table 2 variant."""
    name = f"{protocol}-{bits}" if method == "hihpq" else f"{protocol}-{bits}-{method}"
    return load_config(name, [*overrides, f"seed={seed}"])


def run_learned(cfg: Config, prep: P.PreparedFeatures, progress: bool = True) -> dict[str, Any]:
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    model = P.build_model(cfg, prep.clean.shape[1])
    trainer = Trainer(model, P.build_loss(cfg), P.train_settings(cfg, progress=progress))
    history = trainer.fit(prep.train_source())
    scores = P.evaluate_prepared(model, prep, cfg.eval.topk, cfg.eval.metric)
    scores["train_s"] = sum(h["epoch_s"] for h in history)
    scores["wall_s"] = time.perf_counter() - t0
    scores["history"] = history
    return scores


def run_baseline(method: str, bits: int, seed: int, prep: P.PreparedFeatures, topk: int) -> dict[str, Any]:
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
    scores = P.retrieval_scores(ranked, prep.split.query_labels, prep.split.database_labels, topk)
    scores["wall_s"] = time.perf_counter() - t0
    return scores


def merge_records(path: Path, new: list[dict]) -> list[dict]:
    """Replace records of the same (method, bits, seed) and keep the rest; write atomically."""
    old = json.loads(path.read_text()) if path.exists() else []
    keys = {(r["method"], r["bits"], r["seed"]) for r in new}
    merged = [r for r in old if (r["method"], r["bits"], r["seed"]) not in keys] + new
    merged.sort(key=lambda r: (METHODS.index(r["method"]) if r["method"] in METHODS else 99, r["bits"], r["seed"]))
    write_json(path, merged)
    return merged


def run_grid(
    protocol: str,
    methods: list[str],
    bits_list: list[int],
    seeds: list[int],
    out: str | Path,
    overrides: list[str] = (),
    data_dir: str | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run every (method, bits, seed) on cached features and merge the records into ``out``."""
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    out = Path(out)
    base = load_config(f"{protocol}-{bits_list[0]}", list(overrides))
    t0 = time.perf_counter()
    prep = P.prepare_features(base, data_dir=data_dir, progress=progress)
    features_s = time.perf_counter() - t0
    print(prep.split.summary(), f"(features ready in {features_s:.0f} s)")
    command = " ".join(sys.argv)
    commit = git_commit()
    key = f"map_at_{base.eval.topk}"
    records: list[dict] = []
    details_dir = out.with_suffix("")
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
                    scores = run_learned(cfg, prep, progress)
                    rec_bits, config = bits, cfg.to_dict()
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
                    },
                )
                merge_records(out, [record])
    return records


def summarise(records: list[dict], key: str = "map_at_1000") -> dict[tuple[str, int], tuple[float, float, int]]:
    """(method, bits) -> (mean, std, n) over seeds."""
    groups: dict[tuple[str, int], list[float]] = {}
    for r in records:
        groups.setdefault((r["method"], r["bits"]), []).append(r[key])
    return {k: (float(np.mean(v)), float(np.std(v)), len(v)) for k, v in groups.items()}
