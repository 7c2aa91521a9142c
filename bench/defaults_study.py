"""Choosing the per-bit-length defaults without the benchmark's test queries: short grids on two tuning sets.

    PYTHONPATH=src python bench/defaults_study.py --data ~/.cache/hihpq/cifar10-jpeg \
        --fashion ~/.cache/hihpq/fashion-mnist -o backbone.resolution=224
    ... --baselines     # PCA+OPQ on the same tuning sets, the reference a default must beat
    ... --report        # the summary table of the records so far
    ... --study model   # the defaults against a learned curvature, the linear projector, codebooks from data
                        # (bench/results/model_study.json)

Tuning sets (neither holds a CIFAR-10 (II) query):
- ``cifar-train``: the CIFAR-10 (II) training images only (:meth:`PreparedFeatures.validation_fold`): 1,000 of
  the 5,000 are queries, the other 4,000 the database and the training set.
- ``fashion``: Fashion-MNIST written as a folder (bench/fashion_mnist.py), a split of its own (split seed 7:
  1,000 queries, 5,000 database, 2,000 training images; hierarchy sizes from the rule ``levels: []``).

Every candidate (a named set of overrides per bit length) is trained once per tuning set with the built-in config
of its bit length; the choice per bit length is the best mean over the two sets. The defaults study starts every
candidate from the authors' values (AUTHORS), so that it reruns the same way now that the configs hold its
winners; the model study starts from the configs with c fixed at 1 (FIXED_C; MLP projector, random codebooks).
Records are appended to the study's file after every run, so an interrupted study keeps what it measured.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hihpq.benchmark import run_baseline, run_learned
from hihpq.config import load_config
from hihpq.data.prepare import prepare_features
from hihpq.runinfo import run_record, write_json

RESULTS = Path(__file__).resolve().parent / "results"

# The authors' scripts/cifar10-ii values per bit length (what the configs held before this study).
AUTHORS = {
    16: ["quantizer.feature_dim=32", "quantizer.tau=0.2", "quantizer.clip_r=0.8", "loss.tau_qc=0.2"],
    32: ["quantizer.feature_dim=64", "quantizer.tau=1", "quantizer.clip_r=1.5", "loss.tau_qc=0.2"],
    64: ["quantizer.feature_dim=64", "quantizer.tau=1", "quantizer.clip_r=1.5", "loss.tau_qc=0.2"],
}


# c fixed at 1, as the configs held it when both studies ran (the 16-bit configs learn it since the model study).
FIXED_C = ["quantizer.learn_curvature=false", "quantizer.curvature_keeps_scale=false"]


def default_candidates(bits: int) -> dict[str, list[str]]:
    """Named override sets per bit length, each on top of the authors' values. M = bits / 8 (K = 256)."""
    m = bits // 8
    if bits == 16:  # M = 2: tau_qc = 0.1 M is the authors' 0.2; vary the sharpness and the width instead
        cands = {
            "authors": [],
            "tau_qc=0.1": ["loss.tau_qc=0.1"],
            "tau_qc=0.4": ["loss.tau_qc=0.4"],
            "feature_dim=64": ["quantizer.feature_dim=64"],
        }
    else:  # the hypothesis: the summed distance of M subspaces sharpens the logits as M grows
        cands = {
            "authors": [],
            "tau_qc=0.1M": [f"loss.tau_qc={0.1 * m:g}"],
            "tau_qc=0.05M": [f"loss.tau_qc={0.05 * m:g}"],
            "tau=0.2,clip=0.8,tau_qc=0.1M": ["quantizer.tau=0.2", "quantizer.clip_r=0.8", f"loss.tau_qc={0.1 * m:g}"],
        }
    return {name: [*AUTHORS[bits], *FIXED_C, *over] for name, over in cands.items()}


def model_candidates(bits: int) -> dict[str, list[str]]:
    """The defaults (c fixed at 1, MLP projector, random codebooks) against: a learned c as the paper (bounded,
    free), as the authors' code (raw c, weight decay, clamped after each step) and with the clip radius following
    c (keeps the distance scale); the paper's linear projector; codebooks from k-means after the warm-up; and a
    softer contrastive temperature."""
    learned = "quantizer.learn_curvature=true"
    cands = {
        "defaults (c=1, mlp)": [],
        # the defaults study's best tau_qc sat at the edge of its grid at every bit length: one step further
        "tau_qc=0.2M": [f"loss.tau_qc={0.2 * (bits // 8):g}"],
        "learned c, keeps scale": [learned, "quantizer.curvature_keeps_scale=true"],
        "learned c": [learned],
        "learned c, clamped+decay": [learned, "quantizer.curvature_param=clamped"],
        "linear projector": ["projector.kind=linear"],
        "codebooks from data": ["quantizer.init_from_data=true"],
    }
    return {name: [*FIXED_C, *over] for name, over in cands.items()}


STUDIES = {"defaults": default_candidates, "model": model_candidates}


def tuning_sets(args) -> dict[str, tuple[list[str], object]]:
    """name -> (overrides every run of the set gets, its PreparedFeatures)."""
    sets = {}
    if args.data:
        over = [f"data.root={args.data}", *args.overrides]
        prep = prepare_features(load_config("cifar10-ii-32", over)).validation_fold(1000, seed=0)
        sets["cifar-train"] = (over, prep)
    if args.fashion:
        over = [
            "data.dataset=folder",
            f"data.root={args.fashion}",
            "data.split_seed=7",
            "data.n_query=1000",
            "data.n_database=5000",
            "data.n_train=2000",
            "hierarchy.levels=[]",
            *args.overrides,
        ]
        sets["fashion"] = (over, prepare_features(load_config("cifar10-ii-32", over)))
    if not sets:
        raise SystemExit("give --data (CIFAR-10) and/or --fashion (Fashion-MNIST folder)")
    return sets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="CIFAR-10 location (its training images make the first tuning set)")
    ap.add_argument("--fashion", help="Fashion-MNIST image folder (bench/fashion_mnist.py)")
    ap.add_argument("--bits", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--only", nargs="+", help="candidate names to run (default all)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument(
        "--baselines",
        action="store_true",
        help="run PCA+OPQ on each tuning set (the reference) instead of the candidates",
    )
    ap.add_argument("--report", action="store_true", help="only print the summary of the records file")
    ap.add_argument("--study", choices=sorted(STUDIES), default="defaults", help="which candidates (default: defaults)")
    ap.add_argument("-o", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", help="records file (default bench/results/<study>_study.json)")
    args = ap.parse_args()
    out = Path(args.out or RESULTS / f"{args.study}_study.json")
    candidates = STUDIES[args.study]
    records = json.loads(out.read_text()) if out.exists() else []
    if args.report:
        return summarise(records)
    sets = tuning_sets(args)
    for bits in args.bits:
        if args.baselines:  # PCA+OPQ on the same tuning sets: the margin a default must win by
            for set_name, (over, prep) in sets.items():
                cfg = load_config(f"cifar10-ii-{bits}", over)
                scores = run_baseline("opq", bits, args.seed, prep, cfg.eval.topk)
                value = float(scores[f"map_at_{cfg.eval.topk}"])
                print(
                    f"{bits:>3} bits  {'PCA+OPQ (reference)':<30} {set_name:<12} mAP@{cfg.eval.topk} {100 * value:6.2f}"
                )
                records.append(
                    run_record(
                        None,
                        args.seed,
                        bits=bits,
                        candidate="pca+opq",
                        reference=True,
                        tuning_set=set_name,
                        map=round(value, 6),
                        wall_s=round(scores["wall_s"], 1),
                    )
                )
                write_json(out, records, force=True)
        for name, cand in candidates(bits).items():
            if args.baselines or (args.only and name not in args.only):
                continue
            for set_name, (over, prep) in sets.items():
                cfg = load_config(f"cifar10-ii-{bits}", [*over, *cand, f"seed={args.seed}"])
                scores = run_learned(cfg, prep, progress=False)
                value = float(scores[f"map_at_{cfg.eval.topk}"])
                print(
                    f"{bits:>3} bits  {name:<30} {set_name:<12} mAP@{cfg.eval.topk} {100 * value:6.2f}  "
                    f"c {scores['history'][-1]['curvature']}  ({scores['wall_s']:.0f} s)",
                    flush=True,
                )
                records.append(
                    run_record(
                        cfg.to_dict(),
                        args.seed,
                        bits=bits,
                        candidate=name,
                        overrides=cand,
                        tuning_set=set_name,
                        map=round(value, 6),
                        curvature=[round(c, 4) for c in scores["history"][-1]["curvature"]],
                        wall_s=round(scores["wall_s"], 1),
                    )
                )
                write_json(out, records, force=True)
    summarise(records)


def summarise(records: list[dict]) -> None:
    """Per bit length: each candidate's mAP per tuning set and the mean; the best mean is the choice (PCA+OPQ is
    listed as the reference it must beat)."""
    by: dict[tuple[int, str], dict[str, float]] = {}
    for r in records:
        by.setdefault((r["bits"], r["candidate"]), {})[r["tuning_set"]] = r["map"]
    sets = sorted({r["tuning_set"] for r in records})
    for bits in sorted({b for b, _ in by}):
        rows = [(name, vals) for (b, name), vals in by.items() if b == bits]
        rows.sort(key=lambda nv: -sum(nv[1].values()) / len(nv[1]))
        print(f"\n{bits} bits   " + "  ".join(f"{s:>12}" for s in sets) + "          mean")
        for name, vals in rows:
            cells = "  ".join(f"{100 * vals[s]:12.2f}" if s in vals else f"{'-':>12}" for s in sets)
            print(f"  {name:<30} {cells}  {100 * sum(vals.values()) / len(vals):12.2f}")


if __name__ == "__main__":
    main()
