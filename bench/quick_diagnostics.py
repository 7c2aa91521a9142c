"""Small diagnostics on a reduced CIFAR-10 (II) split (the ``hihpq demo --quick`` sizes): a handful of short runs.

Each run trains one config (plus overrides) on cached frozen-backbone features and prints, per run: mAP of the
ADC search of the codes, mAP of the exact search on the continuous embeddings (the quantization gap is the
difference), the final curvatures and the loss parts. For guiding choices only: the split is tiny and the figures
are one seed; defaults are decided on full grids (bench/cifar10_ii.py) and a second dataset.

    PYTHONPATH=src nice -n 10 python bench/quick_diagnostics.py --data ~/.cache/hihpq --bits 32 \
        --run base: --run learned:quantizer.learn_curvature=true

A run is ``label:override,override,...``; results are appended to bench/results/quick_diagnostics.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from hihpq import pipeline as P
from hihpq.config import load_config
from hihpq.demo import demo_overrides
from hihpq.metrics import map_at_k
from hihpq.runinfo import git_commit, seed_everything, write_json
from hihpq.train import Trainer


def continuous_ranking(model, q_emb: np.ndarray, db_emb: np.ndarray, topk: int) -> np.ndarray:
    """Rows of the database ranked by the exact product distance to each query (no quantization)."""
    q = model.quantizer
    with torch.no_grad():
        a, b = torch.from_numpy(q_emb).double(), torch.from_numpy(db_emb).double()
        out = [
            torch.topk(q.pairwise_distance(a[s : s + 256], b), topk, largest=False).indices
            for s in range(0, len(a), 256)
        ]
    return torch.cat(out).numpy()


def run_one(label: str, overrides: list[str], args) -> dict:
    cfg = load_config(f"cifar10-ii-{args.bits}", [*demo_overrides(args.data, True), *overrides, f"seed={args.seed}"])
    seed_everything(cfg.seed)
    prep = P.prepare_features(cfg, progress=False)
    t0 = time.perf_counter()
    model = P.build_model(cfg, prep.clean.shape[1])
    history = Trainer(model, P.build_loss(cfg), P.train_settings(cfg, progress=False)).fit(prep.train_source())
    train_s = time.perf_counter() - t0
    split, topk = prep.split, cfg.eval.topk
    q_emb, db_emb = P.embed(model, prep.queries), P.embed(model, prep.database)
    ranked, _, _ = P.rank_embedded(model, q_emb, db_emb, topk)
    adc = map_at_k(ranked, split.query_labels, split.database_labels, k=topk)
    cont = map_at_k(continuous_ranking(model, q_emb, db_emb, topk), split.query_labels, split.database_labels, k=topk)
    last = history[-1]
    rec = {
        "label": label,
        "bits": args.bits,
        "seed": args.seed,
        "overrides": overrides,
        "map_adc": float(adc),
        "map_continuous": float(cont),
        "curvature": last["curvature"],
        "final": {k: last[k] for k in ("loss", "aug", "prot", "ins", "quant_error") if k in last},
        "train_s": train_s,
        "commit": git_commit(),
    }
    c = " ".join(f"{x:.2f}" for x in last["curvature"])
    print(
        f"{label:<24} adc {100 * adc:6.2f}  continuous {100 * cont:6.2f}  gap {100 * (cont - adc):5.2f}  "
        f"c [{c}]  qerr {last['quant_error']:.3f}  ({train_s:.0f} s)",
        flush=True,
    )
    return rec


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="folder holding cifar10-jpeg/")
    ap.add_argument("--bits", type=int, default=32)
    ap.add_argument("--seed", type=int, default=2021)
    ap.add_argument("--run", action="append", required=True, help="label:override,override,... (repeatable)")
    ap.add_argument("--out", default="bench/results/quick_diagnostics.json")
    args = ap.parse_args(argv)
    records = []
    for spec in args.run:
        label, _, rest = spec.partition(":")
        records.append(run_one(label, [o for o in rest.split(",") if o], args))
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else []
    write_json(out, old + records)


if __name__ == "__main__":
    main()
