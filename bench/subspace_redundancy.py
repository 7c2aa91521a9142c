"""Do the subspaces of a 16-bit model encode the same thing? (the sixteen study's decorrelation candidates)

    PYTHONPATH=src python bench/subspace_redundancy.py --set fashion-10pct --seed 1 \
        --data ../shared/data --fashion ~/.cache/hihpq/fashion-mnist [-o loss.decorrelation=1]

Trains today's config of ``--bits`` (the sixteen study's reference, plus any ``-o`` overrides) on one held-out
tuning set of bench/defaults_study.py (never a protocol's test queries), then searches its database four ways:
the codes (ADC, Eq. 8's sum over subspaces), each subspace's codes alone, the continuous embeddings, and each
subspace's embedding alone. It measures how much the subspaces share: the canonical correlations between their
tangent vectors (database images), the normalised mutual information between their codes, and the penalty of
``loss.decorrelation`` (:func:`hihpq.losses.subspace_correlation`) on the clean training images.

Record: bench/results/subspace_redundancy.json (one entry per run, appended).
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import normalized_mutual_info_score

from defaults_study import HELD_OUT_SETS, sixteen_bit_candidates, tuning_sets  # same folder
from hihpq.benchmark import run_learned
from hihpq.config import load_config
from hihpq.evaluation import embed, retrieval_scores
from hihpq.losses import subspace_correlation
from hihpq.runinfo import run_record, write_json

RESULTS = Path(__file__).resolve().parent / "results" / "subspace_redundancy.json"


def canonical_correlations(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Canonical correlations (descending) between the rows of a (n, p) and b (n, q), in float64."""

    def basis(x: torch.Tensor) -> torch.Tensor:  # an orthonormal basis of the centred columns' span
        u, s, _ = torch.linalg.svd(x.double() - x.double().mean(0), full_matrices=False)
        return u[:, s > 1e-9 * s[0]]

    return torch.linalg.svdvals(basis(a).T @ basis(b)).clamp(max=1.0)


def searched_ways(model, prep, topk: int) -> dict[str, float]:
    """mAP@topk of the database searched by codes / embeddings, all subspaces or one."""
    q = torch.as_tensor(embed(model, prep.queries))
    db = torch.as_tensor(embed(model, prep.database))
    quantizer = model.quantizer
    labels = prep.split.query_labels, prep.split.database_labels

    def score(dist: torch.Tensor) -> float:
        ranked = torch.argsort(dist, dim=1, stable=True)[:, :topk].numpy()
        return round(float(retrieval_scores(ranked, *labels, topk)[f"map_at_{topk}"]), 6)

    with torch.no_grad():
        codes = quantizer.encode(db).long()
        table = quantizer.distance_table(q)  # (n_q, M, K)
        adc = [table[:, m][:, codes[:, m]] for m in range(codes.shape[1])]
        cont = quantizer.pairwise_distance(q, db, per_subspace=True)  # (M, n_q, n_db)
    out = {"codes": score(sum(adc)), "embeddings": score(cont.sum(0))}
    for m in range(codes.shape[1]):
        out[f"codes, subspace {m}"] = score(adc[m])
        out[f"embeddings, subspace {m}"] = score(cont[m])
    return out, codes.numpy()


def shared(model, prep, codes: np.ndarray) -> dict:
    """What the subspaces share: canonical correlations of their tangent vectors (database), the normalised
    mutual information of their codes (database), subspace_correlation on the clean training images."""
    model.eval()
    with torch.no_grad():
        t_db = model.tangent(torch.as_tensor(prep.database).float())
        t_train = model.tangent(torch.as_tensor(prep.clean_of(prep.split.train)).float())
    pairs = list(itertools.combinations(range(codes.shape[1]), 2))
    cc = {f"{i}-{j}": canonical_correlations(t_db[:, i], t_db[:, j]) for i, j in pairs}
    return {
        "canonical_correlations_top5": {k: [round(float(x), 3) for x in v[:5]] for k, v in cc.items()},
        "canonical_correlation_mean": {k: round(float(v.mean()), 3) for k, v in cc.items()},
        "codes_nmi": {f"{i}-{j}": round(normalized_mutual_info_score(codes[:, i], codes[:, j]), 3) for i, j in pairs},
        "subspace_correlation_train": round(float(subspace_correlation(t_train)), 4),
        "distinct_codes": len(np.unique(codes, axis=0)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="CIFAR-10 location (for cifar-half)")
    ap.add_argument("--fashion", help="Fashion-MNIST image folder (for fashion-10pct)")
    ap.add_argument("--set", choices=HELD_OUT_SETS, default="fashion-10pct")
    ap.add_argument("--bits", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("-o", "--set-option", dest="options", action="append", default=[], help="config override")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    over, prep = tuning_sets(argparse.Namespace(data=args.data, fashion=args.fashion, overrides=[]), [args.set])[
        args.set
    ]
    cand = [*sixteen_bit_candidates(args.bits)["defaults (today's configs)"], *args.options]
    cfg = load_config(f"cifar10-ii-{args.bits}", [*over, *cand, f"seed={args.seed}"])
    scores, model = run_learned(cfg, prep, progress=False, return_model=True)
    ways, codes = searched_ways(model, prep, cfg.eval.topk)
    found = {"map": ways, **shared(model, prep, codes)}
    curvature = [round(c, 3) for c in scores["history"][-1]["curvature"]]
    what = " ".join(args.options) or "today's config"
    print(f"{args.bits} bits, {args.set}, seed {args.seed}, {what}: c {curvature}")
    for k, v in found["map"].items():
        print(f"  mAP@{cfg.eval.topk} {k:<26} {100 * v:6.2f}")
    for k in ("canonical_correlations_top5", "canonical_correlation_mean", "codes_nmi"):
        print(f"  {k:<28} {found[k]}")
    print(f"  subspace_correlation (train) {found['subspace_correlation_train']}, {found['distinct_codes']} codes")
    out = Path(args.out)
    records = json.loads(out.read_text()) if out.exists() else []
    records.append(
        run_record(
            cfg.to_dict(),
            args.seed,
            bits=args.bits,
            tuning_set=args.set,
            options=args.options,
            curvature=curvature,
            **found,
        )
    )
    write_json(out, records, force=True)


if __name__ == "__main__":
    main()
