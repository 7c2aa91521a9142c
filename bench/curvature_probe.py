"""Why a learned curvature climbs: which loss term pulls c up, and what c does to each term.

    PYTHONPATH=src python bench/curvature_probe.py --data ../shared/data

Trains the full model with ``quantizer.learn_curvature=true`` (then with c fixed at 1, then learned with
``quantizer.curvature_keeps_scale=true``) on the CIFAR-10 (II) training images alone (the
tuning set of bench/defaults_study.py: 1,000 of them as queries, the other 4,000 as database and training set; no
test query is touched) and records, every ``--every`` steps, the derivative of each loss term with respect to
log c (mean over the M subspaces) on the step's own batch: a negative value means that term wants a larger c.
At the end, for each model, every term is re-evaluated on a few
fixed batches with every c_m multiplied by a factor (the loss landscape in c), together with the distance scale:
the mean product distance between the two views of an image (positives) and between different images.

Record: bench/results/curvature_probe.json (per bit length: the trace, the landscapes, the tuning-set mAP).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from defaults_study import FIXED_C, NO_DROPOUT  # same folder: c = 1 and no dropout spelt out, as it ran
from hihpq.benchmark import evaluate_learned
from hihpq.build import build_loss, build_model, train_settings
from hihpq.config import load_config
from hihpq.data.prepare import prepare_features, resolve_levels
from hihpq.losses import HiHPQLoss
from hihpq.runinfo import run_record, seed_everything, write_json
from hihpq.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "curvature_probe.json"
FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
KEYS = ("epoch", "loss", "aug", "prot", "ins", "quant_error", "curvature")  # kept per epoch


class ProbedLoss:
    """The trainer's loss, which first records d(term)/d(log c) of each term on every ``every``-th training step
    (before the step is taken); everything else is the wrapped HiHPQLoss's. Set ``trainer`` before fitting."""

    def __init__(self, loss: HiHPQLoss, quantizer, every: int):
        self.loss, self.q, self.every = loss, quantizer, every
        self.trainer: Trainer | None = None
        self.trace: list[dict] = []

    def __getattr__(self, name):  # lambda1, lambda2, ... as the trainer reads them
        return getattr(self.loss, name)

    def __call__(self, q1, q2, **kw):
        step = self.trainer.step
        if step % self.every == 0:
            raw = self.q.curvature_raw
            (dlogc_draw,) = torch.autograd.grad(self.q.curvature.log().sum(), raw)  # diagonal: elementwise
            row = {"epoch": self.trainer.epoch + 1, "step": step, "c": self.q.curvature.detach().mean().item()}
            for name, term in self.loss.terms(q1, q2, **kw).items():
                (g,) = torch.autograd.grad(term, raw, retain_graph=True, allow_unused=True)
                row[f"d_{name}"] = 0.0 if g is None else (g / dlogc_draw).mean().item()
                row[name] = term.item()
            self.trace.append(row)
        return self.loss(q1, q2, **kw)


@torch.no_grad()
def landscape(model, loss, source, hierarchy, n_batches: int, batch: int, seed: int) -> list[dict]:
    """Every term and the distance scale on fixed batches, with each c_m multiplied by each factor."""
    q = model.quantizer
    model.eval()
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(n_batches):
        idx = rng.choice(source.n, batch, replace=False)
        x1, x2 = source.pair(idx, rng)
        pos = [source.one(p, rng) for p in hierarchy.positives(idx, rng)] if hierarchy else []
        batches.append((idx, x1, x2, pos))
    z = [[model.project(x) for x in (x1, x2, *pos)] for _, x1, x2, pos in batches]  # c does not change them
    c0 = q.curvature.detach().clone()
    lo, hi = q.curvature_bounds
    rows = []
    for f in FACTORS:
        q.set_curvature_((c0 * f).clamp(lo * (1 + 1e-6), hi * (1 - 1e-6)))
        protos = [q.embed(p) for p in hierarchy.prototypes] if hierarchy is not None else None
        sums: dict[str, float] = {}
        for (idx, *_), zs in zip(batches, z, strict=True):
            outs = [q(zi) for zi in zs]
            assign = [torch.from_numpy(a[idx]) for a in hierarchy.labels] if hierarchy is not None else None
            terms = loss.terms(outs[0].h_soft, outs[1].h_soft, distance=q.pairwise_distance, prototypes=protos,
                               assignments=assign, positives=[o.h_soft for o in outs[2:]] or None)  # fmt: skip
            d = q.pairwise_distance(outs[0].h_soft, outs[1].h_soft)
            eye = torch.eye(len(idx), dtype=torch.bool)
            vals = {k: v.item() for k, v in terms.items()}
            vals.update(d_pos=d[eye].mean().item(), d_neg=d[~eye].mean().item(),
                        quant_error=q.quantization_error(outs[0].h).item())  # fmt: skip
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v / n_batches
        sums["neg_over_pos"] = sums["d_neg"] / sums["d_pos"]  # relative separation, what a ranking sees
        rows.append({"factor": f, "c": q.curvature.mean().item(), **{k: round(v, 5) for k, v in sums.items()}})
    q.set_curvature_(c0)
    return rows


def run(cfg, prep, every: int) -> dict:
    seed_everything(cfg.seed)
    resolve_levels(cfg, len(prep.split.train))
    model = build_model(cfg, prep.clean.shape[1])
    # A fixed c is a buffer outside the optimiser; tracking it gives the pull it feels without moving it.
    model.quantizer.curvature_raw.requires_grad_(True)
    loss = build_loss(cfg)
    probed = ProbedLoss(loss, model.quantizer, every)
    probed.trainer = trainer = Trainer(model, probed, train_settings(cfg, progress=False))
    t0 = time.perf_counter()
    source = prep.train_source()
    history = trainer.fit(source)
    scores = evaluate_learned(model, prep, cfg.eval.topk, cfg.eval.metric)
    land = landscape(model, loss, source, trainer.hierarchy, n_batches=4, batch=cfg.train.batch_size, seed=0)
    return {
        "map": round(float(scores[f"map_at_{cfg.eval.topk}"]), 6),
        "final_c": history[-1]["curvature"],
        "trace": probed.trace,
        "epochs": [{k: h[k] for k in KEYS} for h in history],
        "landscape": land,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="CIFAR-10 location")
    ap.add_argument("--bits", nargs="+", type=int, default=[32])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--every", type=int, default=10, help="probe every this many steps")
    ap.add_argument("-o", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    over = [f"data.root={args.data}", *args.overrides]
    prep = prepare_features(load_config("cifar10-ii-32", over)).validation_fold(1000, seed=0)
    out = {}
    for bits in args.bits:
        learned = "quantizer.learn_curvature=true"
        keeps = "quantizer.curvature_keeps_scale=true"
        base = [*FIXED_C, *NO_DROPOUT]
        runs = (("learned", [*base, learned]), ("fixed", base), ("keeps-scale", [*base, learned, keeps]))
        for name, extra in runs:
            cfg = load_config(f"cifar10-ii-{bits}", [*over, *extra, f"seed={args.seed}"])
            res = run(cfg, prep, args.every)
            out[f"{bits}-{name}"] = res
            print(f"{bits} bits, c {name}: tuning-set mAP {100 * res['map']:.2f}, final c {res['final_c']}, "
                  f"{res['wall_s']:.0f} s", flush=True)  # fmt: skip
            for r in res["trace"][:: max(1, len(res["trace"]) // 12)]:
                print("  " + "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
            print("  landscape (c multiplied by factor):")
            for r in res["landscape"]:
                print("  " + "  ".join(f"{k} {v:.4g}" for k, v in r.items()))
            write_json(Path(args.out), run_record(cfg.to_dict(), args.seed, probes=out), force=True)


if __name__ == "__main__":
    main()
