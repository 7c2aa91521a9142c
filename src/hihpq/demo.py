"""``hihpq demo``: HiHPQ on a reduced CIFAR-10 (II) beside PCA+PQ on the same backbone features.

Finds CIFAR-10 (``--data``, ``$HIHPQ_DATA``, a download when online); without it, runs on scikit-learn's bundled
digits and says so. Writes results.json, run.json and demo.png into the output folder.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from hihpq.build import build_loss, build_model, torch_backbone, train_settings
from hihpq.config import load_config
from hihpq.data.prepare import prepare_features
from hihpq.evaluation import evaluate_prepared, retrieval_scores
from hihpq.models.io import save_model
from hihpq.runinfo import run_record, seed_everything, write_json
from hihpq.train import Trainer

BITS = 32


def demo_overrides(cifar_root: str | None, quick: bool) -> list[str]:
    """The reduced protocol: fewer queries, training images, database images, views and epochs."""
    if cifar_root is None:
        data = ["data.dataset=digits", "hierarchy.levels=[50, 25, 10]"]
    else:
        per_class = (50, 100, 300) if quick else (100, 200, 1000)
        data = [
            f"data.root={cifar_root}",
            f"data.queries_per_class={per_class[0]}",
            f"data.train_per_class={per_class[1]}",
            f"data.database_per_class={per_class[2]}",
        ]
    return [
        *data,
        f"features.n_views={4 if quick else 6}",
        f"train.epochs={10 if quick else 30}",
        "hierarchy.warmup_epochs=2",
    ]


def run_demo(data: str | None = None, out: str | Path = "hihpq-demo", device: str = "cpu", quick: bool = False):
    from hihpq.baselines import PCAPQ
    from hihpq.data import find_cifar10

    t_start = time.perf_counter()
    out = Path(out)
    found = find_cifar10(data)
    if found is None:
        print("CIFAR-10 not found (no --data, no $HIHPQ_DATA, no internet): running on scikit-learn's digits instead.")
    cfg = load_config(
        f"cifar10-ii-{BITS}",
        [*demo_overrides(str(found) if found else None, quick), f"train.device={device}"],
    )
    seed_everything(cfg.seed)
    prep = prepare_features(cfg)
    print(prep.split.summary())
    t_feat = time.perf_counter() - t_start

    model = build_model(cfg, prep.clean.shape[1])
    trainer = Trainer(model, build_loss(cfg), train_settings(cfg), out_dir=out / "run")
    history = trainer.fit(prep.train_source())
    save_model(
        out / "run" / "model.pt",
        model,
        backbone=torch_backbone(prep.backbone, cfg),
        resolution=cfg.backbone.resolution,
        provenance={"config": cfg.to_dict()},
    )
    t_train = time.perf_counter() - t_start - t_feat

    q_labels, db_labels, topk = prep.split.query_labels, prep.split.database_labels, cfg.eval.topk
    hihpq = evaluate_prepared(model, prep, topk)
    with warnings.catch_warnings():  # a reduced training set is smaller than faiss's 39 * K advice
        warnings.simplefilter("ignore")
        pq = PCAPQ(bits=BITS, n_components=64, seed=cfg.seed, n_threads=1).fit(prep.clean_of(prep.split.train))
    _, ranked = pq.add(prep.database).search(prep.queries, topk)
    pcapq = retrieval_scores(ranked, q_labels, db_labels, topk)

    key = f"map_at_{topk}"
    rows = [("HiHPQ (ours)", hihpq[key]), ("PCA+PQ", pcapq[key])]
    print(f"\n{prep.split.name}, {BITS} bits, {len(prep.split.query)} queries x {len(prep.split.database)} database")
    print(f"{'method':<14} mAP@{topk}")
    for name, value in rows:
        print(f"{name:<14} {100 * value:6.2f}")
    wall = time.perf_counter() - t_start
    results = {
        "dataset": prep.split.name,
        "bits": BITS,
        "topk": topk,
        "split": prep.split.identity(),
        "hihpq": hihpq,
        "pca_pq": pcapq,
        "features_s": t_feat,
        "train_s": t_train,
        "wall_s": wall,
    }
    write_json(out / "results.json", results)
    write_json(out / "run.json", run_record(cfg.to_dict(), cfg.seed))
    plot = _plot(out / "demo.png", rows, history, topk)
    print(f"\nresults.json, run.json and {plot.name} in {out}/  ({wall:.0f} s)")
    return results


def _plot(path: Path, rows, history, topk: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r[0] for r in rows]
    ax1.bar(names, [100 * r[1] for r in rows], color=["tab:red", "tab:gray"])
    ax1.set_ylabel(f"mAP@{topk} (%)")
    ax1.set_title(f"{BITS}-bit codes")
    epochs = [h["epoch"] for h in history]
    for key in ("loss", "aug", "prot", "ins"):
        ax2.plot(epochs, [h[key] for h in history], label=key)
    ax2b = ax2.twinx()
    ax2b.plot(epochs, [h["quant_error"] for h in history], "k--", label="quantization error")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("loss")
    ax2b.set_ylabel("quantization error")
    ax2.legend(loc="center right")
    ax2.set_title("training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
