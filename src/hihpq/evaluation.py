"""Trained model -> embeddings -> index -> retrieval figures.

Functions take the device of the model they are given; the entry points (CLI, Encoder) choose it.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

from hihpq.models.hihpq import HiHPQ

__all__ = [
    "build_index",
    "embed",
    "embed_split",
    "encode_embeddings",
    "evaluate_model",
    "evaluate_online",
    "evaluate_prepared",
    "head",
    "protocol_embeddings",
    "rank_database",
    "rank_embedded",
    "retrieval_scores",
    "save_retrieval",
]


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.inference_mode()
def embed(model: HiHPQ, inputs: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
    """Continuous product-manifold embeddings (n, M, D) float32 of backbone features (n, F), in eval mode, on the
    model's device."""
    device = _device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(inputs), batch_size):
            x = torch.as_tensor(np.asarray(inputs[start : start + batch_size], dtype=np.float32)).to(device)
            out.append(model.embed(x).float().cpu())
    finally:
        model.train(was_training)
    M, D = model.quantizer.n_subspaces, model.quantizer.subspace_dim
    return torch.cat(out).numpy() if out else np.zeros((0, M, D), np.float32)


@torch.inference_mode()
def encode_embeddings(quantizer, embeddings: np.ndarray, batch_size: int = 65536) -> np.ndarray:
    """Hard codes (n, M) uint8 of embeddings (n, M, D), computed on the quantizer's device."""
    device = quantizer.codebook_tangent.device
    out = [
        quantizer.encode(torch.from_numpy(np.ascontiguousarray(embeddings[s : s + batch_size])).to(device)).cpu()
        for s in range(0, len(embeddings), batch_size)
    ]
    return torch.cat(out).numpy().astype(np.uint8) if out else np.zeros((0, quantizer.n_subspaces), np.uint8)


def build_index(model: HiHPQ, db_embeddings: np.ndarray, ids: np.ndarray | None = None, metric: str = "adc"):
    """A searchable index of the database's hard codes under the model's codebooks and curvatures."""
    from hihpq.index import HyperbolicPQIndex

    index = HyperbolicPQIndex.from_quantizer(model.quantizer, metric=metric)
    codes = encode_embeddings(model.quantizer, db_embeddings)
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
    info.update(code_usage(index.codes))
    return ranked, info, index


def code_usage(codes: np.ndarray) -> dict[str, Any]:
    """How much of the code space a database fills: codewords used per subspace and distinct codes. Few of
    them mean large cells whose items tie at one distance from every query (ranked by id, not by similarity)."""
    codes = np.asarray(codes)
    return {
        "codewords_used": [len(np.unique(codes[:, m])) for m in range(codes.shape[1])],
        "distinct_codes": len(np.unique(codes, axis=0)) if len(codes) else 0,
    }


def evaluate_model(model: HiHPQ, query_feats, db_feats, query_labels, db_labels, topk: int, metric: str = "adc"):
    """Retrieval figures (mAP@topk, precision@K) and timings of a trained model."""
    ranked, info = rank_database(model, query_feats, db_feats, topk, metric)
    return {**retrieval_scores(ranked, query_labels, db_labels, topk), **info}


def evaluate_prepared(model: HiHPQ, prep, topk: int, metric: str = "adc") -> dict[str, Any]:
    """:func:`evaluate_model` on a protocol's cached query and database features
    (:class:`hihpq.data.prepare.PreparedFeatures`)."""
    split = prep.split
    return evaluate_model(model, prep.queries, prep.database, split.query_labels, split.database_labels, topk, metric)


# ------------------------------------------------------------------------------------- end-to-end models
def head(model: HiHPQ) -> HiHPQ:
    """The model without its backbone (the same projector and quantizer modules, same mode)."""
    return HiHPQ(model.projector, model.quantizer).train(model.training)


def embed_split(
    model: HiHPQ, split, resolution: int, *, batch_size: int = 64, num_workers: int | None = None, progress=False
) -> tuple[np.ndarray, np.ndarray]:
    """(split, query embeddings, database embeddings) (n, M, D), clean view through the model's (trained) backbone.

    Unreadable images leave the query and database sets of the returned split (counted in ``params["excluded"]``),
    as in the frozen-backbone path: a grey placeholder would otherwise match every other one."""
    from hihpq.data import extract_clean_features

    if model.backbone is None:
        raise ValueError("embed_split needs a model with its backbone (an end-to-end trained model)")
    used = np.unique(np.concatenate([split.query, split.database]))
    kw = {} if num_workers is None else {"num_workers": num_workers}
    feats = extract_clean_features(
        model.backbone,
        split.dataset,
        used,
        resolution=resolution,
        batch_size=batch_size,
        device=_device(model),
        cache=None,
        progress=progress,
        **kw,
    )
    emb = embed(head(model), feats.features)
    split = split.without(used[~feats.valid], sets=("query", "database"))
    return split, emb[np.searchsorted(used, split.query)], emb[np.searchsorted(used, split.database)]


def evaluate_online(model: HiHPQ, split, resolution: int, topk: int, metric: str = "adc", **kw) -> dict[str, Any]:
    """Retrieval figures of an end-to-end trained model (queries and database through its backbone); ``kw``: the
    batch_size / num_workers of :func:`embed_split`."""
    t0 = time.perf_counter()
    split, q_emb, db_emb = embed_split(model, split, resolution, **kw)
    ranked, info, _ = rank_embedded(model, q_emb, db_emb, topk, metric, t0)
    return {**retrieval_scores(ranked, split.query_labels, split.database_labels, topk), **info}


def protocol_embeddings(loaded, cfg, data_dir: str | None = None, progress: bool = True):
    """(split, query embeddings, database embeddings) of the protocol of ``cfg`` for a loaded model file
    (:class:`hihpq.models.io.ModelFile`): through its own trained backbone, or from the frozen-backbone feature
    cache (its backbone, on its device)."""
    from hihpq.data.prepare import make_split, prepare_features

    model = loaded.model
    if model.backbone is not None:
        split = make_split(cfg, data_dir)
        kw = {"batch_size": cfg.features.batch_size, "num_workers": cfg.features.num_workers}
        return embed_split(model, split, loaded.backbone["resolution"], progress=progress, **kw)
    if loaded.frozen_backbone is None:
        raise ValueError(f"{loaded.path} holds no backbone record: it can only encode backbone features")
    prep = prepare_features(cfg, data_dir=data_dir, backbone=loaded.frozen_backbone, views=False, progress=progress)
    return prep.split, embed(model, prep.queries), embed(model, prep.database)
