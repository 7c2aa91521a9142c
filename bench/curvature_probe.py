"""Why a learned curvature climbs: which loss term pulls c up, and what c does to each term.

    PYTHONPATH=src python bench/curvature_probe.py --data ../shared/data -o backbone.resolution=224

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
import math
import time
from pathlib import Path

import numpy as np
import torch

from hihpq.benchmark import evaluate_learned
from hihpq.build import build_loss, build_model, train_settings
from hihpq.config import load_config
from hihpq.data.prepare import prepare_features, resolve_levels
from hihpq.losses import instance_loss, prototype_loss, quantized_contrastive_loss
from hihpq.runinfo import run_record, seed_everything, write_json
from hihpq.train import Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "curvature_probe.json"
FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
KEYS = ("epoch", "loss", "aug", "prot", "ins", "quant_error", "curvature")  # kept per epoch


def loss_terms(loss, q, qs, prototypes, assignments, positives) -> dict[str, torch.Tensor]:
    """The three terms of the objective with their graphs (HiHPQLoss returns them detached)."""
    d = q.pairwise_distance
    terms = {"aug": quantized_contrastive_loss(qs[0], qs[1], distance=d, tau=loss.tau)}
    if prototypes is not None and loss.lambda1 > 0:
        terms["prot"] = prototype_loss(qs[0], prototypes, assignments, distance=d, tau=loss.tau_hierarchy)
    if positives and loss.lambda2 > 0:
        terms["ins"] = instance_loss(
            qs[0], positives, distance=d, tau=loss.tau_hierarchy, denominator=loss.instance_denominator
        )
    return terms


class ProbedTrainer(Trainer):
    """The trainer, with d(term)/d(log c) measured on every ``every``-th step before the step is taken."""

    def __init__(self, *args, every: int = 10, **kwargs):
        super().__init__(*args, **kwargs)
        self.every, self.trace = every, []
        self.inner_loss = inner = self.loss

        def probed(q1, q2, *, distance, prototypes=None, assignments=None, positives=None):
            if self.step % self.every == 0:
                self._probe([q1, q2], prototypes, assignments, positives)
            return inner(q1, q2, distance=distance, prototypes=prototypes, assignments=assignments, positives=positives)

        probed.lambda1, probed.lambda2 = inner.lambda1, inner.lambda2
        self.loss = probed

    def _probe(self, qs, prototypes, assignments, positives) -> None:
        q = self.model.quantizer
        raw = q.curvature_raw
        (dlogc_draw,) = torch.autograd.grad(q.curvature.log().sum(), raw)  # diagonal: elementwise
        row = {"epoch": self.epoch + 1, "step": self.step, "c": q.curvature.detach().mean().item()}
        for name, term in loss_terms(self.inner_loss, q, qs, prototypes, assignments, positives).items():
            (g,) = torch.autograd.grad(term, raw, retain_graph=True, allow_unused=True)
            row[f"d_{name}"] = 0.0 if g is None else (g / dlogc_draw).mean().item()
            row[name] = term.item()
        self.trace.append(row)


def set_curvature(q, c: torch.Tensor) -> None:
    """Put the curvatures c (M,) into the quantizer's parameterisation (bounded sigmoid or clamped)."""
    with torch.no_grad():
        if q.curvature_param == "clamped":
            q.curvature_raw.copy_(c)
            return
        lo, hi = q.curvature_bounds
        frac = ((c.log() - math.log(lo)) / (math.log(hi) - math.log(lo))).clamp(1e-6, 1 - 1e-6)
        q.curvature_raw.copy_(torch.log(frac / (1 - frac)))


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
    c0 = q.curvature.detach().clone()
    lo, hi = q.curvature_bounds
    rows = []
    for f in FACTORS:
        set_curvature(q, (c0 * f).clamp(lo * (1 + 1e-6), hi * (1 - 1e-6)))
        sums: dict[str, float] = {}
        for idx, x1, x2, pos in batches:
            qs = [q(model.project(x)).h_soft for x in (x1, x2)]
            protos = assign = None
            if hierarchy is not None:
                protos = [q.embed(p) for p in hierarchy.prototypes]
                assign = [torch.from_numpy(a[idx]) for a in hierarchy.labels]
            positives = [q(model.project(x)).h_soft for x in pos]
            terms = loss_terms(loss, q, qs, protos, assign, positives)
            d = q.pairwise_distance(qs[0], qs[1])
            eye = torch.eye(len(idx), dtype=torch.bool)
            vals = {k: v.item() for k, v in terms.items()}
            vals.update(d_pos=d[eye].mean().item(), d_neg=d[~eye].mean().item(),
                        quant_error=q.quantization_error(q.embed(model.project(x1))).item())  # fmt: skip
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v / n_batches
        sums["neg_over_pos"] = sums["d_neg"] / sums["d_pos"]  # relative separation, what a ranking sees
        rows.append({"factor": f, "c": q.curvature.mean().item(), **{k: round(v, 5) for k, v in sums.items()}})
    set_curvature(q, c0)
    return rows


def run(cfg, prep, every: int) -> dict:
    seed_everything(cfg.seed)
    resolve_levels(cfg, len(prep.split.train))
    model = build_model(cfg, prep.clean.shape[1])
    # A fixed c is a buffer outside the optimiser; tracking it gives the pull it feels without moving it.
    model.quantizer.curvature_raw.requires_grad_(True)
    loss = build_loss(cfg)
    trainer = ProbedTrainer(model, loss, train_settings(cfg, progress=False), every=every)
    t0 = time.perf_counter()
    source = prep.train_source()
    history = trainer.fit(source)
    scores = evaluate_learned(model, prep, cfg.eval.topk, cfg.eval.metric)
    land = landscape(model, loss, source, trainer.hierarchy, n_batches=4, batch=cfg.train.batch_size, seed=0)
    return {
        "map": round(float(scores[f"map_at_{cfg.eval.topk}"]), 6),
        "final_c": history[-1]["curvature"],
        "trace": trainer.trace,
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
        runs = (("learned", [learned]), ("fixed", []), ("keeps-scale", [learned, keeps]))
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
