"""Choosing the per-bit-length defaults without the benchmark's test queries: short grids on two tuning sets.

    PYTHONPATH=src python bench/defaults_study.py --data ~/.cache/hihpq/cifar10-jpeg \
        --fashion ~/.cache/hihpq/fashion-mnist -o backbone.resolution=224
    ... --baselines     # PCA+OPQ on the same tuning sets, the reference a default must beat
    ... --report        # the summary table of the records so far
    ... --study model   # the defaults against a learned curvature, the linear projector, codebooks from data
                        # (bench/results/model_study.json)
    ... --study generalisation   # regularisers of the head, on the held-out tuning sets below
                        # (bench/results/generalisation_study.json)
    ... --study sharpness   # temperature, ball and batch re-chosen on the held-out sets, with the dropout
                        # (bench/results/sharpness_study.json)
    ... --study training    # epochs, step size, loss weights, hierarchy sizes, width, codewords per subspace
                        # on the held-out sets (bench/results/training_study.json)
    ... --study levers      # the batch, a learned curvature at 32 / 64 bits, 16 codewords at 16 bits
    ... --study neighbours  # neighbour pairs (train.neighbours, train.neighbour_prob)
    ... --study refresh     # neighbour pairs found again in the model's embedding (train.neighbour_refresh)
    ... --study weights     # the hierarchy losses' weights with neighbour pairs
    ... --study codes       # the codes' use of their space (c fixed at 1, re-seeded dead codewords)
    ... --study length      # training length with neighbour pairs
    ... --study refit       # codebooks fitted again by k-means after training
    ... --study sixteen     # levers at 16 bits: neighbour k / p, lambda2, the quantizer's tau, dropout, c = 1 + refit

Tuning sets (neither holds a CIFAR-10 (II) query):
- ``cifar-train``: the CIFAR-10 (II) training images only (:meth:`PreparedFeatures.validation_fold`): 1,000 of
  the 5,000 are queries, the other 4,000 the database and the training set.
- ``fashion``: Fashion-MNIST written as a folder (bench/fashion_mnist.py), a split of its own (split seed 7:
  1,000 queries, 5,000 database, 2,000 training images; hierarchy sizes from the rule ``levels: []``).

In both, most of the database is the training set (all of it in ``cifar-train``, 40% in ``fashion``), while
the benchmark protocols train on 10% of theirs: they reward a head that memorises its training images. The
generalisation study therefore uses two held-out sets (``--sets``), and so may any study:
- ``cifar-half``: the CIFAR-10 (II) training images, 1,000 queries, the other 4,000 the database, 2,000 of
  which are the training set (half the database never seen in training).
- ``fashion-10pct``: Fashion-MNIST (split seed 7), 1,000 queries, 20,000 database, 2,000 of them the training
  set (10%, as the benchmark protocols).

Every candidate (a named set of overrides per bit length) is trained once per tuning set and seed with the
built-in config of its bit length; the choice per bit length is the best mean over the two sets. The defaults
study starts every candidate from the authors' values (AUTHORS), so that it reruns the same way now that the
configs hold its winners; the model study starts from the configs with c fixed at 1 (FIXED_C; MLP projector,
random codebooks). Records are appended to the study's file after every run, and a rerun skips the runs the file
holds, so an interrupted study resumes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
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
# no feature dropout, as every study before the generalisation study ran (the default since: 0.2)
NO_DROPOUT = ["projector.dropout=0"]
# 50 epochs, as every study before the training study ran (the configs train by train.steps since)
FIFTY_EPOCHS = ["train.epochs=50"]
# the paper's pairs (two views of one image), as every study before the neighbours study ran
NO_NEIGHBOURS = ["train.neighbours=0"]
# no re-seeded codewords, as every study before the codes study ran (the 16-bit default since)
NO_RESEED = ["train.reseed_codewords=false"]
# the trained codebooks, as every study before the refit study ran (refit codebooks the 32 / 64-bit default since)
NO_REFIT = ["train.refit_codebooks=false"]


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
    else:  # the issue's hypothesis: the summed distance of M subspaces sharpens the logits as M grows
        cands = {
            "authors": [],
            "tau_qc=0.1M": [f"loss.tau_qc={0.1 * m:g}"],
            "tau_qc=0.05M": [f"loss.tau_qc={0.05 * m:g}"],
            "tau=0.2,clip=0.8,tau_qc=0.1M": ["quantizer.tau=0.2", "quantizer.clip_r=0.8", f"loss.tau_qc={0.1 * m:g}"],
        }
    return {
        name: [*AUTHORS[bits], *FIXED_C, *NO_DROPOUT, *FIFTY_EPOCHS, *NO_NEIGHBOURS, *NO_RESEED, *NO_REFIT, *over]
        for name, over in cands.items()
    }


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
    return {
        name: [*FIXED_C, *NO_DROPOUT, *FIFTY_EPOCHS, *NO_NEIGHBOURS, *NO_RESEED, *NO_REFIT, *over]
        for name, over in cands.items()
    }


def generalisation_candidates(bits: int) -> dict[str, list[str]]:
    """The defaults against ways of making the head generalise beyond its training images: fresh perturbations
    of the cached features (dropout), fewer cached views (does the number of views limit it?), stronger weight
    decay, shorter training; and the MeCoQ-style cosine quantizer as the reference that scored above the
    hyperbolic one on the benchmark (Table 2). Every candidate starts from the configs without dropout (as they
    were when the study ran; it chose the dropout default)."""
    m = bits // 8
    cands = {
        "no dropout (previous defaults)": [],
        "dropout 0.1": ["projector.dropout=0.1"],
        "dropout 0.2": ["projector.dropout=0.2"],
        "dropout 0.5": ["projector.dropout=0.5"],
        "4 views": [f"{VIEWS}4"],
        "weight decay x10": ["train.weight_decay=0.05"],
        "25 epochs": ["train.epochs=25"],
        "cosine (full-euclidean)": ["quantizer.geometry=cosine", "quantizer.tau=0.1", f"loss.tau_qc={0.2 * m:g}"],
    }
    return {
        name: [*NO_DROPOUT, *FIFTY_EPOCHS, *NO_NEIGHBOURS, *NO_RESEED, *NO_REFIT, *over] for name, over in cands.items()
    }


# The two (soft-assignment tau, clip radius) balls of the configs: narrow at 16 and 32 bits, wide at 64.
BALLS = {"narrow": ["quantizer.tau=0.2", "quantizer.clip_r=0.8"], "wide": ["quantizer.tau=1", "quantizer.clip_r=1.5"]}


def _pinned(bits: int, tau_qc: float) -> list[str]:
    """The configs as the held-out studies found them (the ball of the bit length, dropout 0.2, c learned keeping
    its scale at 16 bits only, 50 epochs), with ``tau_qc``: pinned, so that a study reruns as it ran."""
    return [
        *BALLS["wide" if bits == 64 else "narrow"],
        f"loss.tau_qc={tau_qc:g}",
        f"quantizer.learn_curvature={str(bits == 16).lower()}",
        "quantizer.curvature_keeps_scale=true",
        "projector.dropout=0.2",
        *FIFTY_EPOCHS,
        *NO_NEIGHBOURS,
        *NO_RESEED,
        *NO_REFIT,
    ]


def sharpness_candidates(bits: int) -> dict[str, list[str]]:
    """The settings the defaults study chose on tuning sets that rewarded memorising, re-examined on the held-out
    sets with the dropout default: a softer or sharper contrastive temperature, the other bit lengths' ball (clip
    radius and soft-assignment tau), twice the batch (more negatives per step). Every candidate pins the configs
    as the study started from them (tau_qc = 0.1 M, dropout 0.2, c learned keeping its scale at 16 bits only), so
    that it reruns the same way later."""
    tau_qc = 0.1 * (bits // 8)
    other = "narrow" if bits == 64 else "wide"
    pinned = _pinned(bits, tau_qc)
    cands = {
        "defaults (dropout 0.2)": [],
        **{f"tau_qc x{f:g}": [f"loss.tau_qc={f * tau_qc:g}"] for f in (2, 1.5, 0.75, 0.5)},
        "other ball": BALLS[other],
        "batch 256": ["train.batch_size=256"],
    }
    return {name: [*pinned, *over] for name, over in cands.items()}


#: tau_qc per subspace of the configs after the sharpness study (0.075 M at 32 / 64 bits, 0.1 M at 16)
TAU_QC_PER_M = {16: 0.1, 32: 0.075, 64: 0.075}


def _pinned_after_sharpness(bits: int) -> list[str]:
    """The configs as the sharpness study left them (its tau_qc per subspace), pinned."""
    return _pinned(bits, TAU_QC_PER_M[bits] * (bits // 8))


def _pinned_after_training(bits: int) -> list[str]:
    """The configs as the training study left them (3,000 steps at 16 bits, 50 epochs at 32 / 64), pinned."""
    return [*_pinned_after_sharpness(bits), *(["train.steps=3000"] if bits == 16 else [])]


def _sixteen_codewords(bits: int) -> list[str]:
    """16 codewords per subspace: twice the subspaces for the same bits, tau_qc keeping its rate per subspace."""
    return ["quantizer.n_codewords=16", f"loss.tau_qc={TAU_QC_PER_M[bits] * 2 * (bits // 8):g}"]


def training_candidates(bits: int) -> dict[str, list[str]]:
    """The knobs no study had varied, on the held-out sets, around the configs as the sharpness study left them
    (pinned, so that it reruns the same way): training length and step size, the weights of the hierarchy losses
    (lambda2 = 1 is the paper's Instance weight), hierarchy sizes finer and coarser than both sets' (cifar-half
    100 / 50 / 25, fashion-10pct the auto rule 40 / 20 / 10), a wider feature, and 16 codewords per subspace
    (twice the subspaces for the same bits; tau_qc keeps its rate per subspace)."""
    pinned = _pinned_after_sharpness(bits)
    cands = {
        "defaults (tau_qc 0.075 M at 32/64)": [],
        "100 epochs": ["train.epochs=100"],
        "200 epochs": ["train.epochs=200"],
        "lr x2": ["train.lr=0.02"],
        "lr x0.5": ["train.lr=0.005"],
        "lambda1 2": ["loss.lambda1=2"],
        "lambda2 1": ["loss.lambda2=1"],
        "Instance weights (lambda1 0, lambda2 1)": ["loss.lambda1=0", "loss.lambda2=1"],
        "hierarchy 200/100/50": ["hierarchy.levels=[200,100,50]"],
        "hierarchy 40/20/10": ["hierarchy.levels=[40,20,10]"],
        "feature dim 128": ["quantizer.feature_dim=128"],
        "16 codewords": _sixteen_codewords(bits),
    }
    return {name: [*pinned, *over] for name, over in cands.items()}


def lever_candidates(bits: int) -> dict[str, list[str]]:
    """Levers left after the training study, around the configs as it left them (pinned: 3,000 steps at 16 bits,
    50 epochs at 32 / 64): the batch (the sharpness study found 256 far worse than 128, so smaller?), a learned
    curvature at 32 / 64 bits with and without the longer training that made it pay at 16 bits, and 16 codewords
    per subspace with the 16-bit model's longer training."""
    pinned = _pinned_after_training(bits)
    learned = ["quantizer.learn_curvature=true", "quantizer.curvature_keeps_scale=true"]
    cands = {
        "defaults (3,000 steps at 16 bits)": [],
        "batch 64": ["train.batch_size=64"],
        "batch 32": ["train.batch_size=32"],
        "batch 64, lr x0.5": ["train.batch_size=64", "train.lr=0.005"],
    }
    if bits == 16:
        cands["16 codewords"] = _sixteen_codewords(bits)
    else:
        cands["learned c"] = learned
        cands["learned c, 3,000 steps"] = [*learned, "train.steps=3000"]
    return {name: [*pinned, *over] for name, over in cands.items()}


def neighbour_candidates(bits: int) -> dict[str, list[str]]:
    """Neighbour pairs (``train.neighbours``, ours): the second view of a pair from one of the k nearest training
    images in the backbone's feature space with probability p, around the configs as the levers study left them
    (the training study's: the levers changed no default)."""
    pinned = _pinned_after_training(bits)
    cands = {"defaults (3,000 steps at 16 bits)": []}
    for k, p in [(10, 0.5), (5, 0.5), (20, 0.5), (5, 1.0), (5, 0.25)]:
        cands[f"neighbours {k}, p {p}"] = [f"train.neighbours={k}", f"train.neighbour_prob={p}"]
    return {name: [*pinned, *over] for name, over in cands.items()}


#: neighbour pairs as the neighbours study left them (the default since), pinned
NEIGHBOURS_10 = ["train.neighbours=10", "train.neighbour_prob=0.5"]


def refresh_candidates(bits: int) -> dict[str, list[str]]:
    """Neighbour pairs found again in the model's own embedding at every hierarchy refresh
    (``train.neighbour_refresh``): after the warm-up the model separates what the backbone confuses, so its
    neighbours may be purer than the backbone's (Fashion-MNIST, where the backbone's features trail PCA+OPQ)."""
    pinned = [*_pinned_after_training(bits), *NEIGHBOURS_10]
    cands = {
        "defaults (neighbours 10, p 0.5)": [],
        "refreshed": ["train.neighbour_refresh=true"],
        "refreshed, p 0.75": ["train.neighbour_refresh=true", "train.neighbour_prob=0.75"],
        "refreshed, 20 neighbours": ["train.neighbour_refresh=true", "train.neighbours=20"],
    }
    return {name: [*pinned, *over] for name, over in cands.items()}


def weight_candidates(bits: int) -> dict[str, list[str]]:
    """The hierarchy losses' weights again now that neighbour pairs already pull similar images together (the
    training study chose them with the paper's pairs): each loss alone, the instance-wise one at the paper's
    Instance weight."""
    pinned = [*_pinned_after_training(bits), *NEIGHBOURS_10]
    cands = {
        "defaults (neighbours 10, p 0.5)": [],
        "prototype loss only (lambda2 0)": ["loss.lambda2=0"],
        "Instance weights (lambda1 0, lambda2 1)": ["loss.lambda1=0", "loss.lambda2=1"],
        "lambda2 1": ["loss.lambda2=1"],
    }
    return {name: [*pinned, *over] for name, over in cands.items()}


def code_candidates(bits: int) -> dict[str, list[str]]:
    """The codes' use of their space. At 16 bits the learned curvature runs to c ~ 9 and the codes use ~28 of 256
    codewords per subspace (held-out fashion-10pct, seed 1: 305 distinct codes for 20,000 images, the query's
    own cell ~280 images that tie): c fixed at 1 as at 32 / 64 bits, and dead codewords re-seeded from the data
    at every hierarchy refresh (``train.reseed_codewords``)."""
    pinned = [*_pinned_after_training(bits), *NEIGHBOURS_10]
    cands = {"defaults (neighbours 10, p 0.5)": [], "re-seeded codewords": ["train.reseed_codewords=true"]}
    if bits == 16:  # (32 and 64 bits fix c at 1 already)
        cands["c fixed at 1"] = FIXED_C
        cands["c fixed at 1, re-seeded codewords"] = [*FIXED_C, "train.reseed_codewords=true"]
    return {name: [*pinned, *over] for name, over in cands.items()}


#: re-seeded codewords as the codes study left them (the 16-bit default since), pinned
RESEED_AT_16 = {16: ["train.reseed_codewords=true"], 32: [], 64: []}


def length_candidates(bits: int) -> dict[str, list[str]]:
    """Training length again now that neighbour pairs give the positives variety that eight cached views of one
    image lack (the training study, with the paper's pairs, found longer training flat to worse at 32 / 64 bits,
    and 50 epochs of 2,000 training images are only 800 steps)."""
    pinned = [*_pinned_after_training(bits), *NEIGHBOURS_10, *RESEED_AT_16[bits]]
    lengths = [6000] if bits == 16 else [1500, 3000]
    cands = {"defaults (neighbours 10, p 0.5)": []}
    cands.update({f"{n:,} steps": [f"train.steps={n}"] for n in lengths})
    return {name: [*pinned, *over] for name, over in cands.items()}


def refit_candidates(bits: int) -> dict[str, list[str]]:
    """Codebooks fitted again after training by k-means to the clean training images' embeddings
    (``train.refit_codebooks``): the trained codewords are soft-assignment anchors of the contrastive loss, and
    the codes of the continuous embeddings they give rank below the embeddings themselves (0.8-0.9 points at 32
    bits on the held-out sets, seed 1, a diagnostic outside the repository)."""
    pinned = [*_pinned_after_training(bits), *NEIGHBOURS_10, *RESEED_AT_16[bits]]
    return {name: [*pinned, *over] for name, over in {
        "defaults (neighbours 10, p 0.5)": [],
        "refit codebooks": ["train.refit_codebooks=true"],
    }.items()}  # fmt: skip


#: refit codebooks as the refit study left them (the 32 / 64-bit default since), pinned
REFIT_AT_32_64 = {16: [], 32: ["train.refit_codebooks=true"], 64: ["train.refit_codebooks=true"]}


def sixteen_bit_candidates(bits: int) -> dict[str, list[str]]:
    """Levers at 16 bits, where Fashion-MNIST's margin over PCA+OPQ is the smallest, around today's configs: the
    neighbour pairs' k and p (only 10 / 0.5 had run at 16 bits), the prototype loss alone (the weights study's best
    at 32 bits), a harder and a softer soft assignment (the quantizer's tau), a stronger feature dropout (the
    generalisation study's mAP rose from 0 to 0.1 to 0.2 at 16 bits, the highest it ran there), and at 16 bits the
    refit with c fixed at 1 (the refit loses with the learned c, which runs to ~5-7 there; k-means in the tangent
    space at the origin is a poorer fit of geodesic distances the larger c is); and 16 cached views per training
    image instead of 8 (4 against 8 had cost fashion-10pct 1.6 points at 32 bits in the generalisation study, and
    at 16 bits training runs 3,000 steps, ~190 passes over each view of 2,000 images), alone and with 6,000 steps.
    A second round at 16 bits: the knobs the training study screened at 750 steps, when the 16-bit model was 4
    points worse and had neither neighbour pairs nor re-seeded codewords (a narrower and a wider feature, half the
    prototype loss), and the weight decay no study had varied (3,000 steps are 200 epochs of 2,000 images); the
    wider feature also at 32 and 64 bits, whose M = 4 and 8 subspaces get 16 and 8 dimensions of the 64, there
    alone and with the 16-bit model's 3,000 steps. A third round at 16 bits: twice and four times the weight decay
    (a tenth of it had lost on both sets, its learned curvature collapsing), tau_qc x0.75 (the 32 / 64-bit choice,
    level at 16 bits at 750 steps) and twice and four times the step size (x2 +1.1 at 750 steps, when the 16-bit
    model trained too short), twice the step size with the wider feature, finer hierarchies (screened at 750 steps
    only) and fashion-10pct with the CIFAR sets' sizes; and a penalty on the subspaces' cross-correlation
    (``loss.decorrelation``): in a 16-bit model (fashion-10pct, seed 1) the two subspaces' top canonical
    correlations are 0.98 and their codes share half their information (normalised mutual information 0.58): 3,638
    distinct codes of 65,536 for 20,000 images.

    Round one's reference was not rerun at 16 bits: the codes study's "re-seeded codewords" records are the same
    config. The second round runs its own ("defaults (today's configs)") on its machine, since the same seed
    trains to another mAP on another CPU (README: Levers at 16 bits)."""
    pinned = [*_pinned_after_training(bits), *NEIGHBOURS_10, *RESEED_AT_16[bits], *REFIT_AT_32_64[bits]]
    cands = {
        "defaults (today's configs)": [],
        "neighbours 20, p 0.5": ["train.neighbours=20"],
        "neighbours 5, p 0.25": ["train.neighbours=5", "train.neighbour_prob=0.25"],
        "prototype loss only (lambda2 0)": ["loss.lambda2=0"],
        "quantizer tau 0.1": ["quantizer.tau=0.1"],
        "quantizer tau 0.4": ["quantizer.tau=0.4"],
        "dropout 0.3": ["projector.dropout=0.3"],
        "16 cached views": ["features.n_views=16"],
    }
    cands["feature dim 128"] = ["quantizer.feature_dim=128"]  # (64 at every bit length: 8 per subspace at 64 bits)
    if bits == 16:
        cands["16 cached views, 6,000 steps"] = ["features.n_views=16", "train.steps=6000"]
        cands["c fixed at 1, refit codebooks"] = [*FIXED_C, "train.refit_codebooks=true"]  # (32 / 64 bits have both)
        # second round: knobs last screened at 750 steps, before neighbour pairs and re-seeding
        cands["feature dim 32"] = ["quantizer.feature_dim=32"]
        cands["lambda1 0.5"] = ["loss.lambda1=0.5"]
        cands["weight decay 0.0005"] = ["train.weight_decay=0.0005"]
        # third round: the other side of the weight decay, and two knobs screened at 16 bits only at 750 steps
        cands["weight decay 0.01"] = ["train.weight_decay=0.01"]
        cands["weight decay 0.02"] = ["train.weight_decay=0.02"]
        cands["tau_qc 0.15"] = ["loss.tau_qc=0.15"]
        cands["step size x2 (lr 0.02)"] = ["train.lr=0.02"]
        cands["step size x4 (lr 0.04)"] = ["train.lr=0.04"]
        # the two that gained on fashion-10pct at every seed, together
        cands["feature dim 128, step size x2"] = ["quantizer.feature_dim=128", "train.lr=0.02"]
        # hierarchy sizes, last screened at 750 steps (200 / 100 / 50: fashion-10pct +0.9, cifar-half -0.6)
        cands["hierarchy 200/100/50"] = ["hierarchy.levels=[200,100,50]"]
        cands["hierarchy 80/40/20"] = ["hierarchy.levels=[80,40,20]"]
        # cifar-half has trained with the authors' 100 / 50 / 25 (N / 20 ... for its 2,000 images) in every study,
        # fashion-10pct with the rule of the number of images (N / 50 ...: 40 / 20 / 10): the same sizes on both
        cands["hierarchy 100/50/25 (CIFAR's)"] = ["hierarchy.levels=[100,50,25]"]
        # the two subspaces learn the same directions (top canonical correlations ~0.98): ask them apart
        cands["decorrelation 0.3"] = ["loss.decorrelation=0.3"]
        cands["decorrelation 1"] = ["loss.decorrelation=1"]
    else:  # the wider feature gained only with the 16-bit model's 3,000 steps
        cands["feature dim 128, 3,000 steps"] = ["quantizer.feature_dim=128", "train.steps=3000"]
    return {name: [*pinned, *over] for name, over in cands.items()}


STUDIES = {
    "defaults": default_candidates,
    "model": model_candidates,
    "generalisation": generalisation_candidates,
    "sharpness": sharpness_candidates,
    "training": training_candidates,
    "levers": lever_candidates,
    "neighbours": neighbour_candidates,
    "refresh": refresh_candidates,
    "weights": weight_candidates,
    "codes": code_candidates,
    "length": length_candidates,
    "refit": refit_candidates,
    "sixteen": sixteen_bit_candidates,
}
HELD_OUT_SETS = ["cifar-half", "fashion-10pct"]
#: the studies made before the held-out sets existed; every later study runs on the held-out sets
TUNING_SET_STUDIES = ("defaults", "model")
#: a candidate's "study.views=N" trains on the first N cached views of each image (not a config field)
VIEWS = "study.views="


def split_candidate(cand: list[str], prep):
    """(config overrides, the PreparedFeatures to train on) of a candidate."""
    over = [o for o in cand if not o.startswith(VIEWS)]
    for o in cand:
        if o.startswith(VIEWS):
            prep = dataclasses.replace(prep, views=prep.views[:, : int(o[len(VIEWS) :])])
    return over, prep


#: the CIFAR-10 sets are folds of the CIFAR-10 (II) training images: PreparedFeatures.validation_fold arguments
CIFAR_FOLDS = {"cifar-train": {"n_query": 1000, "seed": 0}, "cifar-half": {"n_query": 1000, "seed": 0, "n_fit": 2000}}


def set_overrides(name: str, args) -> list[str]:
    """The config overrides every run on tuning set ``name`` gets (with the 32-bit config: its split)."""
    if name in CIFAR_FOLDS:
        if not args.data:
            raise SystemExit(f"tuning set {name} needs --data (CIFAR-10)")
        # the authors' hierarchy sizes, which every study ran with on the CIFAR sets, pinned: a change of the
        # configs' sizes must not change how the studies rerun
        return [f"data.root={args.data}", "hierarchy.levels=[100,50,25]", *args.overrides]
    if not args.fashion:
        raise SystemExit(f"tuning set {name} needs --fashion (the Fashion-MNIST folder)")
    return [
        "data.dataset=folder",
        f"data.root={args.fashion}",
        "data.split_seed=7",
        "data.n_query=1000",
        f"data.n_database={20000 if name == 'fashion-10pct' else 5000}",
        "data.n_train=2000",
        "hierarchy.levels=[]",
        *args.overrides,
    ]


def tuning_sets(args, names: list[str], features: tuple[str, ...] = ()) -> dict[str, tuple[list[str], object]]:
    """name -> (overrides every run of the set gets, its PreparedFeatures); ``features`` are a candidate's
    ``features.*`` overrides (e.g. more cached views), which change the features it trains on."""
    sets, cifar = {}, None  # both CIFAR sets are folds of the same CIFAR-10 (II) features: read them once
    for name in names:
        over = set_overrides(name, args)
        if name in CIFAR_FOLDS:
            cifar = cifar or prepare_features(load_config("cifar10-ii-32", [*over, *features]))
            sets[name] = (over, cifar.validation_fold(**CIFAR_FOLDS[name]))
        else:
            sets[name] = (over, prepare_features(load_config("cifar10-ii-32", [*over, *features])))
    return sets


def check_views(cand: list[str], cfg, prep) -> None:
    """A record must say which views it trained on: the cached views' count is the config's, or the candidate's
    ``study.views=N``."""
    want = next((int(o[len(VIEWS) :]) for o in cand if o.startswith(VIEWS)), cfg.features.n_views)
    if prep.views.shape[1] != want:
        raise RuntimeError(f"trained on {prep.views.shape[1]} cached views per image, the candidate asks {want}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="CIFAR-10 location (its training images make the first tuning set)")
    ap.add_argument("--fashion", help="Fashion-MNIST image folder (bench/fashion_mnist.py)")
    ap.add_argument("--bits", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--only", nargs="+", help="candidate names to run (default all)")
    ap.add_argument("--seed", type=int, nargs="+", default=[1], help="one or more seeds (default 1)")
    ap.add_argument(
        "--baselines",
        action="store_true",
        help="run PCA+OPQ on each tuning set (the reference) instead of the candidates",
    )
    ap.add_argument("--report", action="store_true", help="only print the summary of the records file")
    ap.add_argument("--study", choices=sorted(STUDIES), default="defaults", help="which candidates (default: defaults)")
    ap.add_argument(
        "--sets",
        nargs="+",
        choices=["cifar-train", "fashion", *HELD_OUT_SETS],
        help="tuning sets (default: cifar-train fashion; the generalisation study: the held-out ones)",
    )
    ap.add_argument("-o", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", help="records file (default bench/results/<study>_study.json)")
    args = ap.parse_args()
    out = Path(args.out or RESULTS / f"{args.study}_study.json")
    candidates = STUDIES[args.study]
    records = json.loads(out.read_text()) if out.exists() else []
    if args.report:
        return summarise(records)
    default_sets = ["cifar-train", "fashion"] if args.study in TUNING_SET_STUDIES else HELD_OUT_SETS
    names = args.sets or default_sets
    prepared = {(): tuning_sets(args, names)}  # features overrides -> the sets prepared with them, on first use
    sets = prepared[()]
    done = {(r["bits"], r["candidate"], r["tuning_set"], r["seed"]) for r in records}  # a rerun resumes
    for bits, seed in itertools.product(args.bits, args.seed):
        if args.baselines:  # PCA+OPQ on the same tuning sets: the margin a default must win by
            for set_name, (over, prep) in sets.items():
                cfg = load_config(f"cifar10-ii-{bits}", over)
                scores = run_baseline("opq", bits, seed, prep, cfg.eval.topk)
                value = float(scores[f"map_at_{cfg.eval.topk}"])
                print(
                    f"{bits:>3} bits  {'PCA+OPQ (reference)':<30} {set_name:<12} mAP@{cfg.eval.topk} {100 * value:6.2f}"
                )
                records.append(
                    run_record(
                        None,
                        seed,
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
            features = tuple(o for o in cand if o.startswith("features."))
            for set_name in names:
                if (bits, name, set_name, seed) in done:
                    continue
                if features not in prepared:
                    prepared[features] = tuning_sets(args, names, features)
                over, prep = prepared[features][set_name]
                cand_over, cand_prep = split_candidate(cand, prep)
                cfg = load_config(f"cifar10-ii-{bits}", [*over, *cand_over, f"seed={seed}"])
                check_views(cand, cfg, cand_prep)
                scores = run_learned(cfg, cand_prep, progress=False)
                value = float(scores[f"map_at_{cfg.eval.topk}"])
                print(
                    f"{bits:>3} bits  {name:<30} {set_name:<12} mAP@{cfg.eval.topk} {100 * value:6.2f}  "
                    f"c {scores['history'][-1]['curvature']}  codewords used {scores['codewords_used']}, "
                    f"{scores['distinct_codes']} codes  ({scores['wall_s']:.0f} s)",
                    flush=True,
                )
                records.append(
                    run_record(
                        cfg.to_dict(),
                        seed,
                        bits=bits,
                        candidate=name,
                        overrides=cand,
                        tuning_set=set_name,
                        map=round(value, 6),
                        curvature=[round(c, 4) for c in scores["history"][-1]["curvature"]],
                        codewords_used=scores["codewords_used"],
                        distinct_codes=scores["distinct_codes"],
                        wall_s=round(scores["wall_s"], 1),
                    )
                )
                write_json(out, records, force=True)
    summarise(records)


def machine(record: dict) -> str:
    """The CPU a record ran on, as far as it says (torch's capability; records before the field: "unrecorded")."""
    return record.get("cpu", {}).get("capability") or "unrecorded"


def summarise(records: list[dict]) -> None:
    """Per bit length: each candidate's mAP per tuning set (the mean over the seeds run, their number in
    brackets when more than one) and the mean over the sets; the best mean is the choice (PCA+OPQ is listed as the
    reference it must beat). When the records come from more than one kind of CPU, each candidate gets a row per
    kind, named in brackets: the same seed trains to another mAP on another CPU, so rows only compare within one."""
    mixed = len({machine(r) for r in records}) > 1
    by: dict[tuple[int, str], dict[str, list[float]]] = {}
    for r in records:
        name = f"{r['candidate']} [{machine(r)}]" if mixed else r["candidate"]
        by.setdefault((r["bits"], name), {}).setdefault(r["tuning_set"], []).append(r["map"])
    sets = sorted({r["tuning_set"] for r in records})
    for bits in sorted({b for b, _ in by}):
        rows = [
            (name, {s: sum(v) / len(v) for s, v in runs.items()}, runs) for (b, name), runs in by.items() if b == bits
        ]
        rows.sort(key=lambda row: -sum(row[1].values()) / len(row[1]))
        width = max(30, *(len(name) for name, _, _ in rows))
        print(f"\n{f'{bits} bits':<{width + 3}}" + "  ".join(f"{s:>17}" for s in sets) + "          mean")
        for name, vals, runs in rows:
            cells = "  ".join(
                f"{100 * vals[s]:12.2f} {f'({len(runs[s])})' if len(runs[s]) > 1 else '':>4}"
                if s in vals
                else f"{'-':>17}"
                for s in sets
            )
            print(f"  {name:<{width}} {cells}  {100 * sum(vals.values()) / len(vals):12.2f}")


if __name__ == "__main__":
    main()
