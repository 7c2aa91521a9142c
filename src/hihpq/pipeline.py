"""From a Config to trained codes and retrieval figures: the one place that unpacks config sections.

Each section of :class:`hihpq.config.Config` becomes the arguments of one constructor here; library classes never
see the config object. The functions are what the CLI, the demo and the benchmarks call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hihpq.config import Config
from hihpq.losses import HiHPQLoss
from hihpq.models.hihpq import HiHPQ
from hihpq.models.projector import Projector
from hihpq.quantizer import ProductQuantizer
from hihpq.runinfo import atomic_path
from hihpq.train import TrainSettings

MODEL_FORMAT = "hihpq-model/1"


def build_quantizer(cfg: Config) -> ProductQuantizer:
    q = cfg.quantizer
    return ProductQuantizer(
        q.n_subspaces,
        q.n_codewords,
        q.subspace_dim,
        geometry=q.geometry,
        tau=q.tau,
        curvature=q.curvature,
        learn_curvature=q.learn_curvature,
        curvature_bounds=(q.curvature_min, q.curvature_max),
        clip_r=q.clip_r,
        curvature_param=q.curvature_param,
        init_from_data=q.init_from_data,
    )


def build_model(cfg: Config, in_dim: int, backbone: torch.nn.Module | None = None) -> HiHPQ:
    """Projector + quantizer (and the backbone when training end to end)."""
    torch.manual_seed(cfg.seed)
    hidden = cfg.projector.hidden if cfg.projector.kind == "mlp" else None
    projector = Projector(in_dim, cfg.quantizer.feature_dim, kind=cfg.projector.kind, hidden=hidden)
    return HiHPQ(projector, build_quantizer(cfg), backbone=backbone)


def build_loss(cfg: Config) -> HiHPQLoss:
    loss = cfg.loss
    return HiHPQLoss(
        tau=loss.tau_qc,
        lambda1=loss.lambda1,
        lambda2=loss.lambda2,
        instance_denominator=loss.instance_denominator,
    )


def train_settings(cfg: Config, progress: bool = True) -> TrainSettings:
    t, h = cfg.train, cfg.hierarchy
    return TrainSettings(
        epochs=t.epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        warmup_epochs=t.warmup_epochs,
        min_lr=t.min_lr,
        curvature_lr_scale=t.curvature_lr_scale,
        backbone_lr_scale=t.backbone_lr_scale,
        levels=list(h.levels),
        n_subclusters=h.n_subclusters,
        hierarchy_warmup=h.warmup_epochs,
        hierarchy_interval=h.interval,
        device=t.device,
        amp=t.amp,
        seed=cfg.seed,
        progress=progress,
    )


# ------------------------------------------------------------------------------------------------ model files
def save_model(path: str | Path, model: HiHPQ, cfg: Config, in_dim: int, extra: dict | None = None) -> None:
    """Save the trained model with its config, atomically; loadable with weights_only.

    A frozen backbone is left out (it is rebuilt from the config's weights); a trained one is kept, with a
    ``backbone`` entry (name, trainable set, resolution, weights id) telling :func:`load_model` to rebuild it.
    """
    backbone = model.backbone
    keep_backbone = backbone is not None and any(p.requires_grad for p in backbone.parameters())
    state = {k: v for k, v in model.state_dict().items() if keep_backbone or not k.startswith("backbone.")}
    payload = {
        "format": MODEL_FORMAT,
        "config": cfg.to_dict(),
        "in_dim": int(in_dim),
        "state_dict": state,
        "extra": extra or {},
    }
    if keep_backbone:
        payload["backbone"] = {
            "name": str(getattr(backbone, "name", cfg.backbone.name)),
            "trainable": str(getattr(backbone, "trainable", "all")),
            "resolution": int(cfg.backbone.resolution),
            "weights_id": str(getattr(backbone, "weights_id", "")),
        }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path: str | Path, device: str = "cpu") -> tuple[HiHPQ, Config, dict]:
    """Load a model saved by :func:`save_model`; with a trained backbone when the file holds one."""
    from hihpq.config import from_dict

    path = Path(path)
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"no trained model at {path}; train one with `hihpq train`")
    try:
        payload = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ValueError(f"cannot read model file {path}: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a hihpq model file (expected format {MODEL_FORMAT})")
    cfg = from_dict(payload["config"])
    backbone = None
    if payload.get("backbone"):
        from hihpq.models import build_backbone

        info = payload["backbone"]
        backbone = build_backbone(info["name"], weights=None, trainable=info["trainable"])
        backbone.weights_id = info.get("weights_id") or backbone.weights_id
    model = build_model(cfg, payload["in_dim"], backbone=backbone)
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model.to(device), cfg, payload.get("extra", {})


# ----------------------------------------------------------------------------------------------- embeddings
@torch.inference_mode()
def embed(model: HiHPQ, inputs: np.ndarray | torch.Tensor, batch_size: int = 4096, device: str = "cpu") -> np.ndarray:
    """Continuous product-manifold embeddings (n, M, D) float32 of backbone features (n, F), in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, len(inputs), batch_size):
        x = torch.as_tensor(np.asarray(inputs[start : start + batch_size], dtype=np.float32)).to(device)
        out.append(model.embed(x).float().cpu())
    model.train(was_training)
    M, D = model.quantizer.n_subspaces, model.quantizer.subspace_dim
    return torch.cat(out).numpy() if out else np.zeros((0, M, D), np.float32)


def build_index(model: HiHPQ, db_embeddings: np.ndarray, ids: np.ndarray | None = None, metric: str = "adc"):
    """A searchable index of the database's hard codes under the model's codebooks and curvatures."""
    from hihpq.index import HyperbolicPQIndex

    index = HyperbolicPQIndex.from_quantizer(model.quantizer, metric=metric)
    with torch.no_grad():
        codes = model.quantizer.encode(torch.from_numpy(db_embeddings)).cpu().numpy()
    index.add_codes(codes, np.arange(len(codes), dtype=np.int64) if ids is None else ids)
    return index


def save_retrieval(path, index, q_emb, ranked, split, topk: int, map_value: float) -> None:
    """Write what a search used and produced as one .npz (atomically), for an independent check of the figures.

    ``index`` is the one that was searched (:func:`rank_embedded` returns it): its codes, codebooks and curvatures
    are saved as they are. Arrays: ``codes`` (n_db, M) uint8, ``queries`` (n_q, M, D) and ``codewords``
    (M, K, D) as points of the Lorentz model (time coordinate first, <x, x>_L = -1/c_m), ``curvature`` (M,) c_m,
    ``query_labels`` / ``database_labels``, ``ranked`` (n_q, topk) database rows, ``topk`` and ``map`` (the
    reported mAP@topk). The ADC distance is sum_m arcosh(-c_m <q_m, w_m,code>_L) / sqrt(c_m) (``geometry``
    "euclidean": sum_m ||q_m - w_m,code||; "cosine": sum_m 1 - cos(q_m, w_m,code)); ties rank the lower row first.
    """
    from hihpq.runinfo import atomic_path

    arrays = {
        "codes": index.codes,
        "queries": np.asarray(q_emb, dtype=np.float32),
        "codewords": index.codebooks,
        "curvature": index.curvatures,
        "geometry": np.array(index.geometry),
        "query_labels": np.asarray(split.query_labels),
        "database_labels": np.asarray(split.database_labels),
        "ranked": np.asarray(ranked, dtype=np.int32 if index.ntotal < 2**31 else np.int64),
        "topk": np.array(topk),
        "map": np.array(map_value),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)


def retrieval_scores(ranked: np.ndarray, query_labels: np.ndarray, db_labels: np.ndarray, topk: int) -> dict[str, Any]:
    """mAP@topk in the field's convention plus precision at a few cut-offs."""
    from hihpq.metrics import map_at_k, precision_at_k

    ks = [k for k in (1, 10, 100, topk) if k <= ranked.shape[1]]
    prec = precision_at_k(ranked, query_labels, db_labels, ks)
    return {
        f"map_at_{topk}": float(map_at_k(ranked, query_labels, db_labels, k=topk)),
        "precision_at": {int(k): float(p) for k, p in zip(ks, prec, strict=True)},
    }


def rank_database(model: HiHPQ, query_feats, db_feats, topk: int, metric: str = "adc"):
    """Encode the database, search the queries (ADC or SDC): (ranked ids (n_q, topk), timings)."""
    t0 = time.perf_counter()
    q_emb, db_emb = embed(model, query_feats), embed(model, db_feats)
    ranked, info, _ = rank_embedded(model, q_emb, db_emb, topk, metric, t0)
    return ranked, info


def rank_embedded(model: HiHPQ, q_emb, db_emb, topk: int, metric: str = "adc", t0: float | None = None):
    """:func:`rank_database` on embeddings already computed (``t0``: when encoding started, for timings); also
    returns the index that was searched."""
    t0 = time.perf_counter() if t0 is None else t0
    index = build_index(model, db_emb, metric=metric)
    t1 = time.perf_counter()
    _, ranked = index.search(q_emb, topk)
    info = {"encode_s": t1 - t0, "search_s": time.perf_counter() - t1, "n_query": len(q_emb), "n_db": len(db_emb)}
    return ranked, info, index


def evaluate_model(model: HiHPQ, query_feats, db_feats, query_labels, db_labels, topk: int, metric: str = "adc"):
    """Retrieval figures (mAP@topk, precision@K) and timings of a trained model."""
    ranked, info = rank_database(model, query_feats, db_feats, topk, metric)
    return {**retrieval_scores(ranked, query_labels, db_labels, topk), **info}


# ----------------------------------------------------------------------------------------- data and features
class DataNotFoundError(FileNotFoundError):
    """The configured dataset is not on this machine (and could not be downloaded)."""


def make_split(cfg: Config, data_dir: str | None = None):
    """The retrieval protocol of ``cfg.data`` (queries / database / training indices into a pooled dataset)."""
    from hihpq.data import (
        ArrayImageDataset,
        ImageFolderDataset,
        Split,
        cifar10_split,
        find_cifar10,
        flickr25k_split,
        nuswide_split,
        random_split_indices,
    )

    d = cfg.data
    root = data_dir or d.root
    if d.dataset == "cifar10":
        found = find_cifar10(root)
        if found is None:
            raise DataNotFoundError(
                "CIFAR-10 not found: pass --data DIR (a folder with cifar10-jpeg/ or cifar-10-batches-py/), "
                "set $HIHPQ_DATA, or connect to the internet so torchvision can download it"
            )
        kw = {
            "queries_per_class": d.queries_per_class or 1000,
            "train_per_class": d.train_per_class,
            "db_per_class": d.database_per_class,
        }
        return cifar10_split(found, d.protocol, d.split_seed, **kw)
    if d.dataset == "digits":  # scikit-learn's bundled 8x8 digits: the offline fallback of the demo
        from sklearn.datasets import load_digits

        digits = load_digits()
        img = (digits.images / 16.0 * 255).astype(np.uint8)
        img = np.repeat(img[..., None], 3, axis=-1)
        ds = ArrayImageDataset(img, digits.target.astype(np.int64), name="sklearn-digits")
        q, db, tr = random_split_indices(len(img), d.split_seed, n_query=d.n_query or 297, n_train=d.n_train or 1000)
        return Split("digits", ds, q, db, tr, seed=d.split_seed, params={"n_query": len(q), "n_train": len(tr)})
    if root is None:
        raise DataNotFoundError(f"data.root (or --data DIR) must point at the {d.dataset} images")
    if d.dataset == "folder":
        ds = ImageFolderDataset(root)
        nq = d.n_query or max(1, len(ds) // 10)
        q, db, tr = random_split_indices(len(ds), d.split_seed, n_query=nq, n_train=d.n_train or len(ds) - nq)
        return Split("folder", ds, q, db, tr, seed=d.split_seed, params={"n_query": nq, "n_train": len(tr)})
    if d.lists is None:
        raise DataNotFoundError(f"data.lists must point at the folder with the {d.dataset} list files")
    if d.dataset == "flickr25k":
        return flickr25k_split(d.lists, root, d.split_seed, n_query=d.n_query or 2000, n_train=d.n_train or 5000)
    lists = Path(d.lists)
    if d.database_list is None:
        raise DataNotFoundError("nuswide needs data.database_list (the database list file of the protocol)")
    return nuswide_split(root, lists / "test.txt", lists / "train_10500.txt", d.database_list)


@dataclass
class PreparedFeatures:
    """Frozen-backbone features of one protocol: the clean view of every used image, V views of each training one."""

    split: Any
    clean: np.ndarray  # (n_used, F) float16, rows follow ``used``
    used: np.ndarray  # sorted pool indices with a clean row
    views: np.ndarray  # (n_train, V, F) float16, rows follow split.train
    n_skipped: int  # unreadable images (left out of every set: split.without, train_valid)
    train_valid: np.ndarray | None = None  # (n_train,) False for unreadable training images

    def clean_of(self, pool_idx: np.ndarray) -> np.ndarray:
        return np.asarray(self.clean[np.searchsorted(self.used, pool_idx)], dtype=np.float32)

    @property
    def queries(self) -> np.ndarray:
        return self.clean_of(self.split.query)

    @property
    def database(self) -> np.ndarray:
        return self.clean_of(self.split.database)

    def train_source(self):
        from hihpq.train import CachedViews

        rows = np.searchsorted(self.used, self.split.train)
        if self.train_valid is None or self.train_valid.all():
            return CachedViews(self.views, self.clean[rows])
        keep = np.flatnonzero(self.train_valid)
        return CachedViews(np.asarray(self.views[keep]), np.asarray(self.clean[rows[keep]]))


def evaluate_prepared(model: HiHPQ, prep: PreparedFeatures, topk: int, metric: str = "adc") -> dict[str, Any]:
    """:func:`evaluate_model` on a protocol's cached query and database features."""
    split = prep.split
    return evaluate_model(model, prep.queries, prep.database, split.query_labels, split.database_labels, topk, metric)


def prepare_features(
    cfg: Config, split=None, *, data_dir: str | None = None, progress: bool = True
) -> PreparedFeatures:
    """Compute (or read from the cache) backbone features for a frozen-backbone run."""
    from hihpq.data import AugmentConfig, FeatureCache, extract_clean_features, extract_view_features
    from hihpq.models import frozen_backbone

    if cfg.backbone.trainable:
        raise ValueError("the feature cache needs a frozen backbone (backbone.trainable=false)")
    split = split if split is not None else make_split(cfg, data_dir)
    device = cfg.train.device
    backbone = frozen_backbone(
        cfg.backbone.name,
        cfg.backbone.weights,
        cfg.backbone.resolution,
        cfg.backbone.runtime,
        cfg.backbone.precision,
        device,
    )
    cache = FeatureCache(cfg.features.cache_dir)
    used = np.unique(np.concatenate([split.query, split.database, split.train]))
    common = {"batch_size": cfg.features.batch_size, "device": device, "cache": cache, "progress": progress}
    if cfg.features.num_workers is not None:
        common["num_workers"] = cfg.features.num_workers
    clean = extract_clean_features(backbone, split.dataset, used, resolution=cfg.backbone.resolution, **common)
    aug = AugmentConfig(resolution=cfg.backbone.resolution)
    views = extract_view_features(
        backbone,
        split.dataset,
        split.train,
        n_views=cfg.features.n_views,
        augment=aug,
        seed=cfg.features.seed,
        **common,
    )
    train_valid = views.valid & clean.valid[np.searchsorted(used, split.train)]
    # issue 13: unreadable images leave the query and database sets (training ones are masked by train_valid)
    split = split.without(used[~clean.valid], sets=("query", "database"))
    return PreparedFeatures(split, clean.features, used, views.features, clean.n_skipped, train_valid)


# ------------------------------------------------------------------------------------- online (end to end)
@dataclass
class PreparedOnline:
    """What an end-to-end run needs: the protocol, the backbone to train and the augmenting view source."""

    split: Any
    backbone: torch.nn.Module
    source: Any  # hihpq.train.ImageViews over split.train

    @property
    def in_dim(self) -> int:
        return int(self.backbone.feature_dim)

    @property
    def n_skipped(self) -> int:
        return self.source.n_skipped


def prepare_online(cfg: Config, split=None, data_dir: str | None = None) -> PreparedOnline:
    """Build the backbone (``cfg.backbone.trainable`` set trainable) and the view source of the training images.

    No feature is computed: every training step augments images and runs them through the backbone.
    """
    from hihpq.data import AugmentConfig, eval_transform, train_transform
    from hihpq.models import build_backbone
    from hihpq.train import ImageViews

    split = split if split is not None else make_split(cfg, data_dir)
    bb = cfg.backbone
    backbone = build_backbone(bb.name, weights=bb.weights, trainable=bb.trainable)
    res = bb.resolution
    workers = cfg.features.num_workers
    source = ImageViews(
        split.dataset,
        split.train,
        train_transform(AugmentConfig(resolution=res), backbone.mean, backbone.std),
        eval_transform(res, backbone.mean, backbone.std),
        num_workers=4 if workers is None else workers,
        clean_batch_size=cfg.features.batch_size,
    )
    return PreparedOnline(split, backbone, source)


def _embed_clean_images(model: HiHPQ, cfg: Config, dataset, indices=None, progress: bool = False):
    """Clean view of ``dataset[indices]`` through the model's own backbone (end-to-end models) or the config's frozen
    one, then the head: (embeddings (n, M, D), the extracted features with their skip report)."""
    from hihpq.data import extract_clean_features
    from hihpq.models import frozen_backbone

    trained = model.backbone is not None
    device = next(model.parameters()).device
    backbone = (
        model.backbone
        if trained
        else frozen_backbone(
            cfg.backbone.name,
            cfg.backbone.weights,
            cfg.backbone.resolution,
            cfg.backbone.runtime,
            cfg.backbone.precision,
            device,
        )
    )
    kw = {} if cfg.features.num_workers is None else {"num_workers": cfg.features.num_workers}
    feats = extract_clean_features(
        backbone,
        dataset,
        indices,
        resolution=cfg.backbone.resolution,
        batch_size=cfg.features.batch_size,
        device=device,
        cache=None,
        progress=progress,
        **kw,
    )
    return embed(_head(model) if trained else model, feats.features, device=str(device)), feats


def embed_split(model: HiHPQ, split, cfg: Config, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Embeddings (n, M, D) of the queries and the database, clean view through the model's (trained) backbone."""
    if model.backbone is None:
        raise ValueError("embed_split needs a model with its backbone (an end-to-end trained model)")
    used = np.unique(np.concatenate([split.query, split.database]))
    emb, _ = _embed_clean_images(model, cfg, split.dataset, used, progress)
    return emb[np.searchsorted(used, split.query)], emb[np.searchsorted(used, split.database)]


def evaluate_online(model: HiHPQ, split, cfg: Config, topk: int, metric: str = "adc") -> dict[str, Any]:
    """Retrieval figures of an end-to-end trained model (queries and database through its backbone)."""
    t0 = time.perf_counter()
    q_emb, db_emb = embed_split(model, split, cfg)
    ranked, info, _ = rank_embedded(model, q_emb, db_emb, topk, metric, t0)
    return {**retrieval_scores(ranked, split.query_labels, split.database_labels, topk), **info}


def _head(model: HiHPQ) -> HiHPQ:
    """The model without its backbone (the same projector and quantizer modules, same mode)."""
    return HiHPQ(model.projector, model.quantizer).train(model.training)


# ------------------------------------------------------------------------------------------- loose images
def list_images(path: str | Path) -> list[Path]:
    """One image file, or every image file below a folder (sorted)."""
    from hihpq.data.folders import IMAGE_EXTENSIONS, walk_image_files

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither an image file nor a folder")
    files = walk_image_files(path)  # issue 13: links followed once per real file, FIFOs left out
    if not files:
        raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}")
    return files


def embed_images(model: HiHPQ, cfg: Config, paths: list[Path], progress: bool = True) -> np.ndarray:
    """Product-manifold embeddings (n, M, D) of image files (clean view); unreadable files are an error here."""
    from hihpq.data import ImageDataset

    emb, feats = _embed_clean_images(model, cfg, ImageDataset(paths), None, progress)
    if feats.n_skipped:
        raise ValueError(f"could not read {feats.n_skipped} image(s): {', '.join(feats.skipped[:5])}")
    return emb


def protocol_embeddings(model: HiHPQ, cfg: Config, data_dir: str | None = None):
    """(split, query embeddings, database embeddings) of the config's protocol, whichever way the model was trained:
    through its own backbone (end to end) or from the frozen-backbone feature cache."""
    if model.backbone is not None:
        split = make_split(cfg, data_dir)
        q_emb, db_emb = embed_split(model, split, cfg)
        return split, q_emb, db_emb
    prep = prepare_features(cfg, data_dir=data_dir)
    return prep.split, embed(model, prep.queries), embed(model, prep.database)
