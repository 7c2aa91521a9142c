"""One training run from a Config: data -> features -> trained model -> model file, config.yaml and run.json.

What ``hihpq train`` runs, callable from Python::

    from hihpq import load_config, train_run
    run_dir = train_run(load_config("photos", ["data.root=my_photos"]), "runs/photos")
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

from hihpq.config import Config, save_config
from hihpq.runinfo import run_record, seed_everything, write_json

__all__ = ["train_run"]


def train_run(
    cfg: Config,
    out: str | Path | None = None,
    *,
    resume: bool = False,
    evaluate: bool = True,
    progress: bool = True,
    data_dir: str | None = None,
    split=None,
) -> Path:
    """Train the model of ``cfg`` into ``out`` (default ``runs/<name>``) and return that folder.

    Writes ``model.pt`` (see :mod:`hihpq.models.io`), ``config.yaml`` (the run's config, hierarchy sizes resolved),
    ``checkpoint.pt`` / ``log.csv`` / ``log.json`` (the trainer's) and ``run.json`` (record, timings and, when the
    data has labels and ``evaluate``, the retrieval figures).
    """
    from hihpq import distributed
    from hihpq.build import build_loss, build_model, torch_backbone, train_settings
    from hihpq.data.prepare import make_split, prepare_features, prepare_online, resolve_levels
    from hihpq.evaluation import evaluate_online, evaluate_prepared
    from hihpq.models.io import save_model
    from hihpq.train import Trainer

    cfg = copy.deepcopy(cfg)
    out = Path(out or f"runs/{cfg.name}")
    split = split if split is not None else make_split(cfg, data_dir)
    resolve_levels(cfg, len(split.train))  # sizes from the number of training images (README: your own photos)
    cfg.check_training_size(len(split.train))  # before the features: levels against the training set
    # under torchrun: join the other processes; each GPU process gets cuda:LOCAL_RANK
    ctx, device = distributed.init_from_env(cfg.train.device)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if not resume:  # a resumed run keeps the record of the config it started with
            save_config(cfg, out / "config.yaml")
    cfg.train.device = device
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    online = bool(cfg.backbone.trainable)  # a trained backbone: augment images through it on every step
    with distributed.main_first():  # rank 0 fills the feature cache, the others read it
        if online:
            prep = prepare_online(cfg, split)
            in_dim, source = prep.in_dim, prep.source
        else:
            prep = prepare_features(cfg, split, progress=progress and ctx.is_main)
            in_dim, source = prep.clean.shape[1], prep.train_source()
    t_feat = time.perf_counter() - t0
    if ctx.is_main:
        print(prep.split.summary())
    model = build_model(cfg, in_dim, backbone=prep.backbone if online else None)
    trainer = Trainer(model, build_loss(cfg), train_settings(cfg, progress=progress and ctx.is_main), out_dir=out)
    trainer.fit(source, resume=resume)
    t_train = time.perf_counter() - t0 - t_feat
    distributed.shutdown()
    if not ctx.is_main:  # rank 0 alone saves, evaluates and reports
        return out
    save_model(
        out / "model.pt",
        model,
        backbone=None if online else torch_backbone(prep.backbone, cfg),
        resolution=cfg.backbone.resolution,
        provenance={"config": cfg.to_dict()},
    )
    record = run_record(cfg.to_dict(), cfg.seed, features_s=t_feat, train_s=t_train, skipped_images=prep.n_skipped)
    if evaluate and len(prep.split.query):
        topk = min(cfg.eval.topk, len(prep.split.database))
        if online:
            kw = {"batch_size": cfg.features.batch_size, "num_workers": cfg.features.num_workers}
            scores = evaluate_online(model, prep.split, cfg.backbone.resolution, topk, cfg.eval.metric, **kw)
        else:
            scores = evaluate_prepared(model, prep, topk, cfg.eval.metric)
        record["eval"] = scores
        print(f"mAP@{topk} = {scores[f'map_at_{topk}']:.4f}")
    elif evaluate:
        print("no evaluation: the images have no labels (pass --eval-labels FILE.csv or use class sub-folders)")
    write_json(out / "run.json", record)
    return out
