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

from hihpq.build import build_loss, build_model, train_settings
from hihpq.config import load_config
from hihpq.data.prepare import prepare_features
from hihpq.demo import demo_overrides
from hihpq.evaluation import embed, rank_embedded
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


def curvature_probe(model, prep, cfg, cs=(0.25, 0.5, 1.0, 2.0, 4.0, 8.0), n: int = 512) -> list[dict]:
    """The hypothesis behind the runaway curvature, on a trained model's tangent vectors held fixed: L_aug of the
    continuous embeddings of two views as a function of a common curvature c, with the mean geodesic distance of
    positive pairs and of negatives and their ratio (how far the negatives are spread relative to the positives)."""
    from hihpq.geometry import lorentz
    from hihpq.losses import quantized_contrastive_loss

    q = model.quantizer
    rng = np.random.default_rng(0)
    idx = rng.choice(prep.train_source().n, size=min(n, prep.train_source().n), replace=False)
    x1, x2 = prep.train_source().pair(idx, rng)
    with torch.no_grad():
        v1, v2 = (q.tangent(model.project(x)).double() for x in (x1, x2))
    out = []
    for c in cs:
        cc = torch.tensor(float(c), dtype=torch.float64, requires_grad=True)

        def dist(a, b, cc=cc):
            return lorentz.pairwise_dist(a.transpose(0, 1), b.transpose(0, 1), c=cc).sum(0)

        h1, h2 = lorentz.expmap0(v1, c=cc), lorentz.expmap0(v2, c=cc)
        loss = quantized_contrastive_loss(h1, h2, distance=dist, tau=cfg.loss.tau_qc)
        (grad,) = torch.autograd.grad(loss, cc)
        with torch.no_grad():
            d = dist(h1, h2)
            pos = d.diagonal().mean().item()
            neg = ((d.sum() - d.diagonal().sum()) / (d.numel() - len(d))).item()
        out.append({"c": c, "L_aug": loss.item(), "dL_dc": grad.item(), "d_pos": pos, "d_neg": neg, "ratio": neg / pos})
        print(
            f"  probe c={c:<5} L_aug {loss.item():.4f}  dL/dc {grad.item():+.4f}  d_pos {pos:.3f}  "
            f"d_neg {neg:.3f}  neg/pos {neg / pos:.2f}",
            flush=True,
        )
    return out


def run_one(label: str, overrides: list[str], args) -> dict:
    cfg = load_config(f"cifar10-ii-{args.bits}", [*demo_overrides(args.data, True), *overrides, f"seed={args.seed}"])
    seed_everything(cfg.seed)
    prep = prepare_features(cfg, progress=False)
    t0 = time.perf_counter()
    model = build_model(cfg, prep.clean.shape[1])
    history = Trainer(model, build_loss(cfg), train_settings(cfg, progress=False)).fit(prep.train_source())
    train_s = time.perf_counter() - t0
    split, topk = prep.split, cfg.eval.topk
    q_emb, db_emb = embed(model, prep.queries), embed(model, prep.database)
    ranked, _, _ = rank_embedded(model, q_emb, db_emb, topk)
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
    if args.probe and model.quantizer.geometry == "lorentz":
        print(f"{label}: curvature probe", flush=True)
        rec["curvature_probe"] = curvature_probe(model, prep, cfg)
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
    ap.add_argument("--probe", action="store_true", help="L_aug against the curvature on each trained model")
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
