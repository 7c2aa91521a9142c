"""Retrieval metrics: mAP@K, full-recall mAP, precision@K, recall@K and precision-recall curves.

Conventions (DESIGN.md section 2, as in DeepHash, MeCoQ and HiHPQ):

- Relevance. Single-label data: integer class ids of shape (n,), an item is relevant to a query iff the ids
  are equal. Multi-label data: 0/1 matrices of shape (n, L), relevant iff they share at least one label.
- Ranked lists are int64 arrays (n_q, k) of database ids, best first, that may be padded with -1 (faiss's "no
  result"); padding is never relevant.
- mAP@K: AP@K = sum_{r<=K} P(r) rel(r) / R_K with R_K the number of relevant items within the top K. A query
  with no relevant item in its top K scores 0 and still counts in the mean.
- Full-recall mAP: the same sum over the whole ranked database divided by R, the total number of relevant
  items in the database (0 when R = 0, still counted).
- Ties in distances are broken by database id (smaller id first), see :func:`rank`.

Everything is numpy, vectorised over queries and processed in chunks of queries so memory stays bounded
(``chunk_size`` = queries per chunk; by default about 4M matrix entries per chunk).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np

__all__ = [
    "PRCurve",
    "map_at_k",
    "map_full",
    "pr_curve",
    "precision_at_k",
    "rank",
    "recall_at_k",
    "relevance",
    "relevant_counts",
]

# Entries of an (n_q, N)-shaped temporary processed at once when chunk_size is not given.
_CHUNK_ENTRIES = 1 << 22


class PRCurve(NamedTuple):
    """Precision and recall (means over queries) at the rank cutoffs ``ks``; all three have shape (n_k,)."""

    ks: np.ndarray
    precision: np.ndarray
    recall: np.ndarray


# ------------------------------------------------------------------------------------------------------------
# input validation


class _Labels(NamedTuple):
    """Labels prepared for fast relevance: class ids (n,) or multi-label bit words (n, W) uint64."""

    multi: bool
    values: np.ndarray


def _prepare_labels(labels, name: str) -> _Labels:
    arr = np.asarray(labels)
    if arr.ndim == 1:
        if arr.dtype.kind not in "iu":
            raise TypeError(f"{name}: single-label data must be integer class ids of shape (n,), got dtype {arr.dtype}")
        return _Labels(False, arr.astype(np.int64, copy=False))
    if arr.ndim == 2:
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{name}: multi-label data must be a numeric 0/1 matrix (n, L), got dtype {arr.dtype}")
        if arr.shape[1] == 0:
            raise ValueError(f"{name}: multi-label matrix needs at least one label column, got shape {arr.shape}")
        if arr.dtype.kind != "b" and not np.isin(arr, (0, 1)).all():
            raise ValueError(
                f"{name}: a 2-D label matrix must contain only 0 and 1 (pass class ids as a 1-D array of shape (n,))"
            )
        # Pack the labels into 64-bit words: "share a label" becomes one AND per word.
        packed = np.packbits(arr.astype(bool), axis=1)
        pad = (-packed.shape[1]) % 8
        if pad:
            packed = np.pad(packed, ((0, 0), (0, pad)))
        return _Labels(True, np.ascontiguousarray(packed).view(np.uint64))
    raise ValueError(
        f"{name}: expected class ids of shape (n,) or a 0/1 label matrix of shape (n, L), got shape {arr.shape}"
    )


def _prepare_pair(query_labels, db_labels, n_queries: int | None = None) -> tuple[_Labels, _Labels]:
    q = _prepare_labels(query_labels, "query_labels")
    db = _prepare_labels(db_labels, "db_labels")
    if q.multi != db.multi:
        raise ValueError(
            "query_labels and db_labels must both be class ids (n,) or both label matrices (n, L), "
            "got shapes "
            f"{np.shape(query_labels)} and {np.shape(db_labels)}"
        )
    if q.multi and np.shape(query_labels)[1] != np.shape(db_labels)[1]:
        raise ValueError(
            f"query_labels has {np.shape(query_labels)[1]} label columns but db_labels has {np.shape(db_labels)[1]}"
        )
    if n_queries is not None and len(q.values) != n_queries:
        raise ValueError(f"query_labels has {len(q.values)} rows but the ranked lists have {n_queries} queries")
    if len(db.values) == 0:
        raise ValueError("db_labels is empty: the database needs at least one item")
    return q, db


def _check_ranked(ranked_ids, n_db: int) -> np.ndarray:
    ids = np.asarray(ranked_ids)
    if ids.ndim != 2:
        raise ValueError(f"ranked_ids must have shape (n_queries, k), got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"ranked_ids must be integer database ids, got dtype {ids.dtype}")
    if ids.shape[1] == 0:
        raise ValueError("ranked_ids has no columns (k = 0)")
    if ids.size and (ids.min() < -1 or ids.max() >= n_db):
        raise ValueError(
            f"ranked_ids must lie in [0, {n_db}) (or be -1 for padding), got values in [{ids.min()}, {ids.max()}]"
        )
    return ids.astype(np.int64, copy=False)


def _check_k(k, available: int, what: str = "ranked_ids") -> int:
    if k is None:
        return available
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= available:
        raise ValueError(f"k must be in [1, {available}] (the columns of {what}), got {k}")
    return int(k)


def _check_ks(ks, available: int) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(ks))
    if arr.ndim != 1 or arr.size == 0 or arr.dtype.kind not in "iu":
        raise TypeError(f"ks must be an int or a non-empty 1-D sequence of ints, got {ks!r}")
    if arr.min() < 1 or arr.max() > available:
        raise ValueError(f"every k in ks must be in [1, {available}] (the columns of ranked_ids), got {ks!r}")
    return arr.astype(np.int64)


def _chunks(n: int, per_row: int, chunk_size: int | None) -> Iterator[slice]:
    if chunk_size is None:
        chunk_size = max(1, _CHUNK_ENTRIES // max(per_row, 1))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    for start in range(0, n, int(chunk_size)):
        yield slice(start, min(start + int(chunk_size), n))


# ------------------------------------------------------------------------------------------------------------
# ranking and relevance


def rank(distances, k: int, *, chunk_size: int | None = None) -> np.ndarray:
    """Ids of the ``k`` nearest database items per query, ordered by (distance asc, id asc).

    Args:
        distances: (n_q, N) real distances (float or integer, e.g. Hamming counts; +-inf allowed, NaN is not).
        k: number of ids per query, 1 <= k <= N.
        chunk_size: queries processed at once (default: about 4M entries of distances per chunk).

    Returns:
        (n_q, k) int64 ids. The top k is selected with a partition (O(N) per query) and only those k are
        sorted, so the cost stays linear in N when k << N. Among items tied at the k-th distance the smallest
        ids win.
    """
    d = np.asarray(distances)
    if d.ndim != 2:
        raise ValueError(f"distances must have shape (n_queries, N), got shape {d.shape}")
    if d.dtype.kind not in "iuf":
        raise TypeError(f"distances must be real numbers, got dtype {d.dtype}")
    n_q, n = d.shape
    if n == 0:
        raise ValueError("distances has no columns: the database is empty")
    k = _check_k(k, n, "distances")
    out = np.empty((n_q, k), dtype=np.int64)
    for sl in _chunks(n_q, n, chunk_size):
        block = d[sl]
        if block.dtype.kind == "f" and np.isnan(block).any():
            raise ValueError("distances contain NaN")
        if k == n:
            # A stable full sort already orders ties by id.
            out[sl] = np.argsort(block, axis=1, kind="stable")
            continue
        kth = np.partition(block, k - 1, axis=1)[:, k - 1 : k]
        keep = block < kth
        # Keep every item strictly closer than the k-th distance, then the smallest-id ties up to k in all.
        need = k - keep.sum(axis=1)
        t_rows, t_cols = np.nonzero(block == kth)  # row-major: ids ascending within each row
        n_ties = np.bincount(t_rows, minlength=len(block))
        rank_in_row = np.arange(len(t_rows)) - (np.cumsum(n_ties) - n_ties)[t_rows]
        take = rank_in_row < need[t_rows]
        keep[t_rows[take], t_cols[take]] = True
        cols = np.nonzero(keep)[1].reshape(-1, k)
        order = np.argsort(np.take_along_axis(block, cols, axis=1), axis=1, kind="stable")
        out[sl] = np.take_along_axis(cols, order, axis=1)
    return out


def _relevance_block(q: _Labels, db: _Labels, ids: np.ndarray) -> np.ndarray:
    """Relevance (c, k) bool of ranked ids (c, k) (may hold -1) for the c queries ``q``."""
    valid = ids >= 0
    safe = np.where(valid, ids, 0)
    if q.multi:
        shared = db.values[safe] & q.values[:, None, :]  # (c, k, W)
        rel = shared[..., 0] != 0 if shared.shape[-1] == 1 else (shared != 0).any(axis=-1)
    else:
        rel = db.values[safe] == q.values[:, None]
    return rel & valid


def relevance(query_labels, db_labels, ranked_ids) -> np.ndarray:
    """Relevance of ranked lists.

    Args:
        query_labels: (n_q,) integer class ids, or (n_q, L) 0/1 label matrix.
        db_labels: (N,) or (N, L), same kind as ``query_labels``.
        ranked_ids: (n_q, k) integer database ids, -1 for padding.

    Returns:
        (n_q, k) bool: True where the ranked item is relevant to its query (padding is never relevant).
    """
    q, db = _prepare_pair(query_labels, db_labels, np.shape(ranked_ids)[0] if np.ndim(ranked_ids) == 2 else None)
    ids = _check_ranked(ranked_ids, len(db.values))
    out = np.empty(ids.shape, dtype=bool)
    for sl in _chunks(ids.shape[0], ids.shape[1] * (q.values.shape[-1] if q.multi else 1), None):
        out[sl] = _relevance_block(_Labels(q.multi, q.values[sl]), db, ids[sl])
    return out


def _total_relevant(q: _Labels, db: _Labels) -> np.ndarray:
    """Number of relevant database items per query, (n_q,) int64."""
    if not q.multi:
        classes, counts = np.unique(db.values, return_counts=True)
        pos = np.searchsorted(classes, q.values)
        pos_c = np.minimum(pos, len(classes) - 1)
        return np.where(classes[pos_c] == q.values, counts[pos_c], 0).astype(np.int64)
    out = np.empty(len(q.values), dtype=np.int64)
    per_row = len(db.values) * db.values.shape[1]
    for sl in _chunks(len(q.values), per_row, None):
        shared = q.values[sl, None, :] & db.values[None, :, :]
        out[sl] = (shared != 0).any(axis=-1).sum(axis=1)
    return out


def relevant_counts(query_labels, db_labels) -> np.ndarray:
    """Total number of relevant database items for each query, (n_q,) int64 (the R of full-recall AP)."""
    q, db = _prepare_pair(query_labels, db_labels)
    return _total_relevant(q, db)


# ------------------------------------------------------------------------------------------------------------
# mAP


def _ap_block(rel: np.ndarray, denom: np.ndarray) -> np.ndarray:
    """AP per row of relevance ``rel`` (c, k) with the given normaliser (c,); 0 where the normaliser is 0."""
    hits = np.cumsum(rel, axis=1)
    precision = hits / np.arange(1, rel.shape[1] + 1)
    num = np.where(rel, precision, 0.0).sum(axis=1)
    return np.divide(num, denom, out=np.zeros(len(num)), where=denom > 0)


def map_at_k(
    ranked_ids,
    query_labels,
    db_labels,
    k: int | None = None,
    *,
    per_query: bool = False,
    chunk_size: int | None = None,
):
    """mAP@K in the field's convention: AP@K = sum_{r<=K} P(r) rel(r) / R_K, R_K = relevant items in top K.

    Args:
        ranked_ids: (n_q, k_cols) integer database ids, best first, -1 for padding (e.g. ``I`` of ``search``).
        query_labels: (n_q,) integer class ids, or (n_q, L) 0/1 label matrix.
        db_labels: (N,) or (N, L), same kind as ``query_labels``.
        k: cutoff K (1 <= K <= k_cols); None uses all k_cols columns.
        per_query: return the (n_q,) vector of AP@K instead of its mean.
        chunk_size: queries processed at once.

    Returns:
        The mean AP@K over all queries as a float (queries with no relevant item in the top K count as 0),
        or the (n_q,) float64 vector when ``per_query``.
    """
    q, db = _prepare_pair(query_labels, db_labels, np.shape(ranked_ids)[0] if np.ndim(ranked_ids) == 2 else None)
    ids = _check_ranked(ranked_ids, len(db.values))
    k = _check_k(k, ids.shape[1])
    ids = ids[:, :k]
    ap = np.empty(ids.shape[0], dtype=np.float64)
    for sl in _chunks(ids.shape[0], k * (q.values.shape[-1] if q.multi else 1), chunk_size):
        rel = _relevance_block(_Labels(q.multi, q.values[sl]), db, ids[sl])
        ap[sl] = _ap_block(rel, rel.sum(axis=1))
    return ap if per_query else float(ap.mean()) if len(ap) else 0.0


def map_full(
    query_labels,
    db_labels,
    *,
    distances=None,
    ranked_ids=None,
    per_query: bool = False,
    chunk_size: int | None = None,
):
    """Full-recall mAP: AP = sum_r P(r) rel(r) / R over the whole ranked database, R = all relevant items.

    Give exactly one of:
        distances: (n_q, N) distances to every database item (ranked with :func:`rank`: ties by id).
        ranked_ids: (n_q, N) a ranking of the whole database per query (each row a permutation of 0..N-1).

    Args:
        query_labels: (n_q,) integer class ids, or (n_q, L) 0/1 label matrix.
        db_labels: (N,) or (N, L), same kind as ``query_labels``.
        per_query: return the (n_q,) vector instead of its mean.
        chunk_size: queries processed at once.

    Returns:
        Mean full-recall AP (float), queries without any relevant database item counting as 0; or the (n_q,)
        vector when ``per_query``.
    """
    if (distances is None) == (ranked_ids is None):
        raise ValueError("map_full needs exactly one of distances= or ranked_ids=")
    given = distances if distances is not None else ranked_ids
    name = "distances" if distances is not None else "ranked_ids"
    if np.ndim(given) != 2:
        raise ValueError(f"{name} must have shape (n_queries, N), got shape {np.shape(given)}")
    q, db = _prepare_pair(query_labels, db_labels, np.shape(given)[0])
    n_db = len(db.values)
    if np.shape(given)[1] != n_db:
        raise ValueError(f"{name} must cover the whole database: expected {n_db} columns, got {np.shape(given)[1]}")
    if ranked_ids is not None:
        ids_all = _check_ranked(ranked_ids, n_db)
    else:
        dist_all = np.asarray(distances)
    totals = _total_relevant(q, db)
    n_q = len(q.values)
    ap = np.empty(n_q, dtype=np.float64)
    for sl in _chunks(n_q, n_db * (q.values.shape[-1] if q.multi else 1), chunk_size):
        if ranked_ids is not None:
            ids = ids_all[sl]
            # Every row must be a permutation, otherwise R (counted from the labels) would not match.
            seen = np.zeros(ids.shape, dtype=bool)
            np.put_along_axis(seen, np.where(ids >= 0, ids, 0), ids >= 0, axis=1)
            if not seen.all():
                raise ValueError("ranked_ids rows must each be a permutation of all database ids 0..N-1")
        else:
            ids = rank(dist_all[sl], n_db)
        rel = _relevance_block(_Labels(q.multi, q.values[sl]), db, ids)
        ap[sl] = _ap_block(rel, totals[sl])
    return ap if per_query else float(ap.mean()) if n_q else 0.0


# ------------------------------------------------------------------------------------------------------------
# precision / recall curves


def _hits_at(ranked_ids, query_labels, db_labels, ks, chunk_size):
    """Relevant items among the top k for each k in ks: (n_q, n_k) int64, plus totals R (n_q,) and ks."""
    q, db = _prepare_pair(query_labels, db_labels, np.shape(ranked_ids)[0] if np.ndim(ranked_ids) == 2 else None)
    ids = _check_ranked(ranked_ids, len(db.values))
    ks = np.arange(1, ids.shape[1] + 1) if ks is None else _check_ks(ks, ids.shape[1])
    kmax = int(ks.max())
    ids = ids[:, :kmax]
    hits = np.empty((ids.shape[0], len(ks)), dtype=np.int64)
    for sl in _chunks(ids.shape[0], kmax * (q.values.shape[-1] if q.multi else 1), chunk_size):
        rel = _relevance_block(_Labels(q.multi, q.values[sl]), db, ids[sl])
        hits[sl] = np.cumsum(rel, axis=1)[:, ks - 1]
    return hits, _total_relevant(q, db), ks


def precision_at_k(
    ranked_ids,
    query_labels,
    db_labels,
    ks: int | Sequence[int],
    *,
    per_query: bool = False,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Precision@k = (relevant items in the top k) / k for each k in ``ks`` (padding counts as not relevant).

    Returns:
        (n_k,) float64 means over queries, or (n_q, n_k) when ``per_query``.
    """
    hits, _, ks = _hits_at(ranked_ids, query_labels, db_labels, ks, chunk_size)
    prec = hits / ks
    return prec if per_query else prec.mean(axis=0)


def recall_at_k(
    ranked_ids,
    query_labels,
    db_labels,
    ks: int | Sequence[int],
    *,
    per_query: bool = False,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Recall@k = (relevant items in the top k) / (relevant items in the whole database) for each k in ``ks``.

    A query with no relevant item in the database has recall 0 and still counts (as in mAP).

    Returns:
        (n_k,) float64 means over queries, or (n_q, n_k) when ``per_query``.
    """
    hits, totals, _ = _hits_at(ranked_ids, query_labels, db_labels, ks, chunk_size)
    rec = np.divide(hits, totals[:, None], out=np.zeros(hits.shape), where=totals[:, None] > 0)
    return rec if per_query else rec.mean(axis=0)


def pr_curve(
    ranked_ids,
    query_labels,
    db_labels,
    ks: Sequence[int] | None = None,
    *,
    chunk_size: int | None = None,
) -> PRCurve:
    """Precision-recall curve by rank: mean precision@k and recall@k at each cutoff.

    Args:
        ranked_ids: (n_q, k_cols) ranked database ids (-1 padding); rank the whole database for recall to
            reach 1.
        query_labels, db_labels: as in :func:`map_at_k`.
        ks: cutoffs (each in [1, k_cols]); None = every rank 1..k_cols.

    Returns:
        PRCurve(ks (n_k,) int64, precision (n_k,), recall (n_k,)), ready for ``plt.plot(curve.recall,
        curve.precision)``.
    """
    hits, totals, ks = _hits_at(ranked_ids, query_labels, db_labels, ks, chunk_size)
    prec = (hits / ks).mean(axis=0)
    rec = np.divide(hits, totals[:, None], out=np.zeros(hits.shape), where=totals[:, None] > 0).mean(axis=0)
    return PRCurve(ks, prec, rec)
