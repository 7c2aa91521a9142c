"""Retrieval metrics against hand-computed cases and slow loop-based references."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hihpq.metrics import (
    map_at_k,
    map_full,
    pr_curve,
    precision_at_k,
    rank,
    recall_at_k,
    relevance,
    relevant_counts,
)

# ------------------------------------------------------------------------------------------------------------
# slow references: one query, one item at a time


def ref_relevant(q_label, db_label) -> bool:
    q_label, db_label = np.asarray(q_label), np.asarray(db_label)
    if q_label.ndim == 0:
        return bool(q_label == db_label)
    return any(bool(a) and bool(b) for a, b in zip(q_label, db_label, strict=True))


def ref_ap(q_label, db_labels, ranked, denom_kind: str) -> float:
    hits, total = 0, 0.0
    for r, idx in enumerate(ranked, start=1):
        if idx >= 0 and ref_relevant(q_label, db_labels[idx]):
            hits += 1
            total += hits / r
    if denom_kind == "topk":
        denom = hits
    else:
        denom = sum(ref_relevant(q_label, row) for row in db_labels)
    return total / denom if denom else 0.0


def ref_rank(row, k: int) -> list[int]:
    return sorted(range(len(row)), key=lambda j: (row[j], j))[:k]


def random_ranked(rng, n_q: int, n_db: int, k: int, pad_frac: float = 0.1) -> np.ndarray:
    ids = np.stack([rng.permutation(n_db)[:k] for _ in range(n_q)]).astype(np.int64)
    ids[rng.random(ids.shape) < pad_frac] = -1  # padding anywhere, not only at the tail
    return ids


# ------------------------------------------------------------------------------------------------------------
# hand-computed cases


def test_ap_hand_single_label():
    db = np.array([0, 1, 0, 1])
    ranked = np.array([[0, 1, 2, 3]])
    # relevance [1, 0, 1, 0]: AP@4 = (1/1 + 2/3) / 2
    assert map_at_k(ranked, np.array([0]), db) == pytest.approx((1 / 1 + 2 / 3) / 2, abs=1e-15)
    # relevance [1, 0]: R_K = 1, AP@2 = 1
    assert map_at_k(ranked, np.array([0]), db, k=2) == pytest.approx(1.0, abs=1e-15)
    # query of class 1: relevance [0, 1, 0, 1]: AP@4 = (1/2 + 2/4) / 2
    assert map_at_k(ranked, np.array([1]), db) == pytest.approx((1 / 2 + 2 / 4) / 2, abs=1e-15)


def test_query_without_relevant_scores_zero_and_counts():
    db = np.array([0, 1, 0, 1])
    ranked = np.array([[0, 1, 2, 3], [0, 1, 2, 3]])
    per_q = map_at_k(ranked, np.array([0, 7]), db, per_query=True)
    np.testing.assert_allclose(per_q, [(1 + 2 / 3) / 2, 0.0], atol=1e-15)
    assert map_at_k(ranked, np.array([0, 7]), db) == pytest.approx((1 + 2 / 3) / 4, abs=1e-15)


def test_padding_is_not_relevant():
    # All database items are relevant: a -1 read as "the last item" would wrongly count as a hit.
    db = np.array([0, 0, 0])
    ranked = np.array([[2, -1, 0]])
    np.testing.assert_array_equal(relevance(np.array([0]), db, ranked), [[True, False, True]])
    assert map_at_k(ranked, np.array([0]), db) == pytest.approx((1 + 2 / 3) / 2, abs=1e-15)
    np.testing.assert_allclose(precision_at_k(ranked, np.array([0]), db, [1, 2, 3]), [1, 1 / 2, 2 / 3])


def test_multilabel_sharing_hand():
    query = np.array([[1, 0, 1, 0]])
    db = np.array([[0, 1, 0, 0], [0, 0, 1, 1], [1, 1, 0, 0], [0, 0, 0, 1]])
    ranked = np.array([[0, 1, 2, 3]])
    np.testing.assert_array_equal(relevance(query, db, ranked), [[False, True, True, False]])
    # relevance [0, 1, 1, 0]: AP = (1/2 + 2/3) / 2
    assert map_at_k(ranked, query, db) == pytest.approx((1 / 2 + 2 / 3) / 2, abs=1e-15)
    np.testing.assert_array_equal(relevant_counts(query, db), [2])


def test_multilabel_more_than_64_labels():
    # Labels beyond the first 64-bit word must still be compared.
    n_labels = 70
    query = np.zeros((1, n_labels), dtype=np.uint8)
    query[0, 65] = 1
    db = np.zeros((3, n_labels), dtype=np.uint8)
    db[0, 3] = 1
    db[1, 65] = 1
    db[2, [1, 65, 69]] = 1
    np.testing.assert_array_equal(relevance(query, db, np.array([[0, 1, 2]])), [[False, True, True]])
    np.testing.assert_array_equal(relevance(query.astype(bool), db.astype(float), np.array([[2]])), [[True]])


def test_topk_and_full_recall_conventions_differ_where_they_should():
    db = np.array([0, 1, 1, 0, 0])
    q = np.array([0])
    ranked = np.array([[0, 1, 2, 3, 4]])
    # relevance [1, 0, 0, 1, 1], R = 3: full-recall AP = (1/1 + 2/4 + 3/5) / 3
    full = (1 + 2 / 4 + 3 / 5) / 3
    assert map_full(q, db, ranked_ids=ranked) == pytest.approx(full, abs=1e-15)
    # With the whole ranking in the top K, both conventions agree.
    assert map_at_k(ranked, q, db) == pytest.approx(full, abs=1e-15)
    # At K = 2 only one relevant item is retrieved: R_K = 1 gives 1, while two relevant items are missed.
    assert map_at_k(ranked, q, db, k=2) == pytest.approx(1.0, abs=1e-15)
    assert map_at_k(ranked, q, db, k=2) > map_full(q, db, ranked_ids=ranked)


def test_map_full_from_distances_hand():
    db = np.array([0, 1, 1, 0, 0])
    # ranking by (distance, id): ids 3 (0.0), 1 (0.5), 0 (1.0), 4 (1.0), 2 (2.0) -> relevance [1, 0, 1, 1, 0]
    dist = np.array([[1.0, 0.5, 2.0, 0.0, 1.0]])
    expected = (1 + 2 / 3 + 3 / 4) / 3
    assert map_full(np.array([0]), db, distances=dist) == pytest.approx(expected, abs=1e-15)


def test_precision_recall_hand():
    db = np.array([0, 1, 0, 1, 0])  # three items of class 0, one of them never retrieved
    ranked = np.array([[0, 1, 2, 3]])
    q = np.array([0])
    np.testing.assert_allclose(precision_at_k(ranked, q, db, [1, 2, 3, 4]), [1, 1 / 2, 2 / 3, 2 / 4])
    np.testing.assert_allclose(recall_at_k(ranked, q, db, [1, 2, 3, 4]), [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    np.testing.assert_allclose(precision_at_k(ranked, q, db, 3), [2 / 3])
    curve = pr_curve(ranked, q, db)
    np.testing.assert_array_equal(curve.ks, [1, 2, 3, 4])
    np.testing.assert_allclose(curve.precision, [1, 1 / 2, 2 / 3, 2 / 4])
    np.testing.assert_allclose(curve.recall, [1 / 3, 1 / 3, 2 / 3, 2 / 3])
    ks, prec, rec = pr_curve(ranked, q, db, ks=[2, 4])
    np.testing.assert_array_equal(ks, [2, 4])
    np.testing.assert_allclose(prec, [1 / 2, 2 / 4])
    np.testing.assert_allclose(rec, [1 / 3, 2 / 3])


def test_rank_hand_ties():
    d = np.array([[3.0, 1.0, 1.0, 0.0, 1.0, 2.0]])
    np.testing.assert_array_equal(rank(d, 1), [[3]])
    np.testing.assert_array_equal(rank(d, 2), [[3, 1]])  # ids 1, 2, 4 tie at the boundary: smallest wins
    np.testing.assert_array_equal(rank(d, 3), [[3, 1, 2]])
    np.testing.assert_array_equal(rank(d, 6), [[3, 1, 2, 4, 5, 0]])
    inf = np.array([[np.inf, 2.0, np.inf, -np.inf]])
    np.testing.assert_array_equal(rank(inf, 3), [[3, 1, 0]])
    assert rank(d, 2).dtype == np.int64


# ------------------------------------------------------------------------------------------------------------
# vectorised code against the loop references on random data


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("kind", ["single", "multi", "multi_wide"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_map_matches_loop_reference(seed, kind, chunk_size):
    rng = np.random.default_rng(seed)
    n_q, n_db, k = 23, 60, 25
    if kind == "single":
        ql, dbl = rng.integers(0, 5, n_q), rng.integers(0, 5, n_db)
    else:
        n_labels = 6 if kind == "multi" else 70
        ql = (rng.random((n_q, n_labels)) < 0.15).astype(np.int64)
        dbl = (rng.random((n_db, n_labels)) < 0.15).astype(np.int64)
    ranked = random_ranked(rng, n_q, n_db, k)
    for kk in (k, 10):
        got = map_at_k(ranked, ql, dbl, k=kk, per_query=True, chunk_size=chunk_size)
        want = [ref_ap(ql[i], dbl, ranked[i, :kk], "topk") for i in range(n_q)]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
        assert map_at_k(ranked, ql, dbl, k=kk, chunk_size=chunk_size) == pytest.approx(np.mean(want), abs=1e-12)

    dist = rng.integers(0, 6, (n_q, n_db)).astype(np.float32)  # many ties
    full_rank = np.stack([ref_rank(row, n_db) for row in dist])
    want_full = [ref_ap(ql[i], dbl, full_rank[i], "all") for i in range(n_q)]
    got_d = map_full(ql, dbl, distances=dist, per_query=True, chunk_size=chunk_size)
    got_r = map_full(ql, dbl, ranked_ids=full_rank, per_query=True, chunk_size=chunk_size)
    np.testing.assert_allclose(got_d, want_full, rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_r, want_full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["single", "multi"])
def test_precision_recall_match_loop_reference(kind):
    rng = np.random.default_rng(5)
    n_q, n_db, k = 17, 40, 30
    if kind == "single":
        ql, dbl = rng.integers(0, 4, n_q), rng.integers(0, 4, n_db)
    else:
        ql = rng.random((n_q, 5)) < 0.3
        dbl = rng.random((n_db, 5)) < 0.3
    ranked = random_ranked(rng, n_q, n_db, k)
    ks = [1, 5, 13, 30]
    prec = np.zeros((n_q, len(ks)))
    rec = np.zeros((n_q, len(ks)))
    for i in range(n_q):
        total = sum(ref_relevant(ql[i], row) for row in dbl)
        for j, kk in enumerate(ks):
            hits = sum(1 for idx in ranked[i, :kk] if idx >= 0 and ref_relevant(ql[i], dbl[idx]))
            prec[i, j] = hits / kk
            rec[i, j] = hits / total if total else 0.0
    np.testing.assert_allclose(precision_at_k(ranked, ql, dbl, ks, per_query=True, chunk_size=4), prec, atol=1e-12)
    np.testing.assert_allclose(recall_at_k(ranked, ql, dbl, ks, per_query=True), rec, atol=1e-12)
    np.testing.assert_allclose(precision_at_k(ranked, ql, dbl, ks), prec.mean(0), atol=1e-12)
    np.testing.assert_allclose(recall_at_k(ranked, ql, dbl, ks), rec.mean(0), atol=1e-12)
    curve = pr_curve(ranked, ql, dbl, ks=ks)
    np.testing.assert_allclose(curve.precision, prec.mean(0), atol=1e-12)
    np.testing.assert_allclose(curve.recall, rec.mean(0), atol=1e-12)
    rel = relevance(ql, dbl, ranked)
    want_rel = [[idx >= 0 and ref_relevant(ql[i], dbl[idx]) for idx in ranked[i]] for i in range(n_q)]
    np.testing.assert_array_equal(rel, want_rel)


def test_recall_reaches_one_on_full_ranking():
    rng = np.random.default_rng(3)
    ql, dbl = rng.integers(0, 3, 9), rng.integers(0, 3, 30)
    ranked = rank(rng.random((9, 30)), 30)
    curve = pr_curve(ranked, ql, dbl)
    np.testing.assert_allclose(curve.recall[-1], 1.0)
    assert np.all(np.diff(curve.recall) >= 0)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 5),
    st.integers(1, 40),
    st.integers(1, 4),
    st.sampled_from(["int", "float", "inf"]),
)
def test_rank_matches_sorted_reference(seed, n_q, n_db, n_values, dtype):
    rng = np.random.default_rng(seed)
    d = rng.integers(0, n_values, (n_q, n_db))  # few distinct values: ties everywhere
    if dtype != "int":
        d = d.astype(np.float64)
    if dtype == "inf":
        d[d == 0] = np.inf
    k = int(rng.integers(1, n_db + 1))
    want = np.array([ref_rank(row, k) for row in d])
    np.testing.assert_array_equal(rank(d, k), want)
    np.testing.assert_array_equal(rank(d, k, chunk_size=2), want)


def test_rank_large_matches_reference():
    rng = np.random.default_rng(11)
    d = rng.integers(0, 50, (12, 3000)).astype(np.float32)
    want = np.array([ref_rank(row, 100) for row in d])
    np.testing.assert_array_equal(rank(d, 100, chunk_size=5), want)


# ------------------------------------------------------------------------------------------------------------
# validation


def test_errors():
    db = np.array([0, 1, 0])
    ranked = np.array([[0, 1, 2]])
    q = np.array([0])
    with pytest.raises(ValueError, match=r"k must be in \[1, 3\]"):
        map_at_k(ranked, q, db, k=4)
    with pytest.raises(ValueError, match="k must be in"):
        map_at_k(ranked, q, db, k=0)
    with pytest.raises(TypeError, match="k must be an int"):
        map_at_k(ranked, q, db, k=2.0)
    with pytest.raises(ValueError, match="query_labels has 2 rows"):
        map_at_k(ranked, np.array([0, 1]), db)
    with pytest.raises(ValueError, match=r"ranked_ids must lie in \[0, 3\)"):
        map_at_k(np.array([[0, 3]]), q, db)
    with pytest.raises(ValueError, match=r"ranked_ids must lie in"):
        map_at_k(np.array([[0, -2]]), q, db)
    with pytest.raises(TypeError, match="ranked_ids must be integer"):
        map_at_k(ranked.astype(float), q, db)
    with pytest.raises(ValueError, match=r"shape \(n_queries, k\)"):
        map_at_k(np.array([0, 1]), q, db)
    with pytest.raises(TypeError, match="integer class ids"):
        map_at_k(ranked, np.array([0.0]), db)
    with pytest.raises(ValueError, match="only 0 and 1"):
        map_at_k(ranked, np.array([[0, 2]]), np.array([[0, 1], [1, 0], [1, 1]]))
    with pytest.raises(ValueError, match="both be class ids"):
        map_at_k(ranked, np.array([[0, 1]]), db)
    with pytest.raises(ValueError, match="label columns"):
        map_at_k(ranked, np.array([[0, 1, 1]]), np.array([[0, 1], [1, 0], [1, 1]]))
    with pytest.raises(ValueError, match="expected class ids"):
        map_at_k(ranked, q, np.zeros((3, 1, 1), dtype=int))
    with pytest.raises(ValueError, match="chunk_size"):
        map_at_k(ranked, q, db, chunk_size=0)


def test_full_and_curve_errors():
    db = np.array([0, 1, 0])
    q = np.array([0])
    with pytest.raises(ValueError, match="exactly one of"):
        map_full(q, db)
    with pytest.raises(ValueError, match="exactly one of"):
        map_full(q, db, distances=np.zeros((1, 3)), ranked_ids=np.array([[0, 1, 2]]))
    with pytest.raises(ValueError, match="whole database: expected 3 columns, got 2"):
        map_full(q, db, distances=np.zeros((1, 2)))
    with pytest.raises(ValueError, match="permutation"):
        map_full(q, db, ranked_ids=np.array([[0, 0, 2]]))
    with pytest.raises(ValueError, match="permutation"):
        map_full(q, db, ranked_ids=np.array([[0, -1, 2]]))
    with pytest.raises(ValueError, match="every k in ks"):
        precision_at_k(np.array([[0, 1]]), q, db, [1, 3])
    with pytest.raises(TypeError, match="ks must be"):
        recall_at_k(np.array([[0, 1]]), q, db, [1.5])
    with pytest.raises(ValueError, match="NaN"):
        rank(np.array([[0.0, np.nan]]), 1)
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        rank(np.zeros((1, 2)), 3)
    with pytest.raises(TypeError, match="real numbers"):
        rank(np.zeros((1, 2), dtype=complex), 1)
    with pytest.raises(ValueError, match="shape"):
        rank(np.zeros(3), 1)
