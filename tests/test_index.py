"""HyperbolicPQIndex semantics: encoding, ADC / SDC search vs float64 geometry, ids, subsets, metadata."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hihpq.geometry import euclidean, lorentz
from hihpq.index import EuclideanPQIndex, HyperbolicPQIndex, reference_scan

M, K, D = 3, 16, 5
CURV = np.array([0.5, 1.0, 2.0])


def _lorentz_points(rng, n, c=CURV, scale=0.6):
    """(n, M, D) float64 points on H_c per subspace (time coordinate first)."""
    v = torch.as_tensor(rng.standard_normal((n, len(c), D)) * scale)
    v[..., 0] = 0.0
    return lorentz.expmap0(v, c=torch.as_tensor(c).reshape(-1, 1)).numpy()


def _index(rng, *, geometry="lorentz", metric="adc", n_items=0, k_codes=K):
    if geometry == "lorentz":
        books = _lorentz_points(rng, k_codes).transpose(1, 0, 2)
        idx = HyperbolicPQIndex(books, CURV, clip_r=1.5, metric=metric)
    else:
        idx = EuclideanPQIndex(rng.standard_normal((M, k_codes, D)), metric=metric)
    if n_items:
        idx.add_codes(rng.integers(0, k_codes, size=(n_items, M)))
    return idx


def _queries(rng, idx, n):
    if idx.geometry == "lorentz":
        return _lorentz_points(rng, n).astype(np.float32)
    return rng.standard_normal((n, M, D)).astype(np.float32)


def _geo_dist(idx, a, b):
    """Product distance (Eq. 8) in float64 with the geometry module: a (n, M, D), b (m, M, D) -> (n, m).

    Lorentz points are first put exactly on the manifold in float64 (lorentz.proj), as the index does.
    """
    ta = torch.as_tensor(np.asarray(a, np.float64)).transpose(0, 1)
    tb = torch.as_tensor(np.asarray(b, np.float64)).transpose(0, 1)
    c = torch.as_tensor(idx.curvatures).reshape(-1, 1, 1)
    if idx.geometry == "lorentz":
        ta, tb = lorentz.proj(ta, c=c), lorentz.proj(tb, c=c)
    geo = lorentz if idx.geometry == "lorentz" else euclidean
    return geo.pairwise_dist(ta, tb, c=c).sum(0).numpy()


def _item_dist(idx, q, codes=None):
    """float64 product distances (n, ntotal) from queries q (or the codewords of query ``codes``) to items."""
    items = idx.decode(idx.codes).reshape(-1, M, D)
    a = np.asarray(q).reshape(-1, M, D) if codes is None else idx.decode(codes).reshape(-1, M, D)
    return _geo_dist(idx, a, items)


def test_attributes():
    rng = np.random.default_rng(0)
    idx = _index(rng, n_items=10)
    assert (idx.d, idx.M, idx.K, idx.D, idx.dsub, idx.code_size, idx.bits) == (M * D, M, K, D, D, M, 12)
    assert idx.ntotal == len(idx) == 10 and idx.is_trained and idx.geometry == "lorentz" and idx.clip_r == 1.5
    assert idx.codes.shape == (10, M) and idx.codes.dtype == np.uint8 and not idx.codes.flags.writeable
    np.testing.assert_array_equal(idx.ids, np.arange(10))
    assert "ntotal=10" in repr(idx)
    with pytest.raises(NotImplementedError, match="from_quantizer"):
        idx.train(np.zeros((1, M * D)))


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_query_tables_equal_geometry_distances(geometry):
    rng = np.random.default_rng(1)
    idx = _index(rng, geometry=geometry)
    q = _queries(rng, idx, 6)
    T = idx.query_tables(q)
    assert T.shape == (6, M, K) and T.dtype == np.float32
    for m in range(M):
        one = HyperbolicPQIndex(idx.codebooks[m : m + 1], idx.curvatures[m], geometry=geometry)
        ref = _geo_dist(one, q[:, m : m + 1], idx.codebooks[m][:, None])
        np.testing.assert_allclose(T[:, m], ref, rtol=1e-6, atol=1e-6)
    # a query equal to a codeword is at distance ~0 from it despite float32 rounding off the manifold
    T0 = idx.query_tables(idx.codebooks[:, :2].transpose(1, 0, 2))
    assert np.abs(T0[[0, 1], :, [0, 1]]).max() < 1e-6


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_encode_is_nearest_codeword(geometry):
    rng = np.random.default_rng(2)
    idx = _index(rng, geometry=geometry)
    x = _queries(rng, idx, 40)
    codes = idx.encode(x)
    d = idx.query_tables(x).astype(np.float64)
    chosen = np.take_along_axis(d, codes[..., None].astype(np.intp), axis=2)[..., 0]
    np.testing.assert_allclose(chosen, d.min(axis=2), rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(idx.encode(x.reshape(40, M * D)), codes)


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_adc_search_matches_brute_force(geometry):
    rng = np.random.default_rng(3)
    idx = _index(rng, geometry=geometry, n_items=400)
    q = _queries(rng, idx, 5)
    Dk, Ik = idx.search(q, 15)
    Dr, Ir = reference_scan(idx.query_tables(q), idx.codes, idx.ids, 15)
    np.testing.assert_array_equal(Ik, Ir)  # the kernel is exact
    np.testing.assert_array_equal(Dk, Dr)
    d64 = _item_dist(idx, q)  # brute force in float64 over all items (rows follow idx.ids = positions)
    for qi in range(5):
        np.testing.assert_allclose(Dk[qi], d64[qi, Ik[qi]], rtol=1e-5)  # the geodesic distances of Eq. 8
        np.testing.assert_allclose(Dk[qi], np.sort(d64[qi])[:15], rtol=1e-5)  # and the true 15 nearest


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_sdc_search_and_search_codes(geometry):
    rng = np.random.default_rng(4)
    idx = _index(rng, geometry=geometry, n_items=300, metric="sdc")
    q = _queries(rng, idx, 4)
    qc = idx.encode(q)
    Ds, Is = idx.search(q, 12)  # index default metric: sdc
    Dc, Ic = idx.search_codes(qc, 12)
    np.testing.assert_array_equal(Is, Ic)
    np.testing.assert_array_equal(Ds, Dc)
    # SDC = product distance between the query's codewords and the items' codewords
    d64 = _item_dist(idx, None, codes=qc)
    for qi in range(4):
        np.testing.assert_allclose(Ds[qi], d64[qi, Is[qi]], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(Ds[qi], np.sort(d64[qi])[:12], rtol=1e-5, atol=1e-6)
    T = idx.sdc_tables
    assert T.shape == (M, K, K) and (np.diagonal(T, axis1=1, axis2=2) == 0).all()
    np.testing.assert_array_equal(T, T.transpose(0, 2, 1))
    # an item searched with its own code is at distance 0, and ADC is chosen explicitly per call
    Dz, _ = idx.search_codes(idx.codes[:3], 1)
    assert (Dz[:, 0] == 0).all()
    Da, _ = idx.search(q, 12, metric="adc")
    assert not np.array_equal(Da, Ds)


def test_search_padding_empty_and_shapes():
    rng = np.random.default_rng(5)
    idx = _index(rng)
    q = _queries(rng, idx, 2)
    D0, I0 = idx.search(q, 4)
    assert D0.shape == (2, 4) and np.isinf(D0).all() and (I0 == -1).all()
    idx.add_codes(rng.integers(0, K, size=(3, M)))
    D1, I1 = idx.search(q, 5)
    assert (I1[:, 3:] == -1).all() and np.isinf(D1[:, 3:]).all() and (I1[:, :3] >= 0).all()
    assert (np.diff(D1[:, :3], axis=1) >= 0).all()
    _, I2 = idx.search(torch.as_tensor(q.reshape(2, M * D)), 5)  # torch and flat input
    np.testing.assert_array_equal(I2, I1)


def test_ids_add_remove_reconstruct():
    rng = np.random.default_rng(6)
    idx = _index(rng)
    x = _queries(rng, idx, 10)
    idx.add(x[:4])
    np.testing.assert_array_equal(idx.ids, [0, 1, 2, 3])
    idx.add_with_ids(x[4:7], [100, 50, 70])
    idx.add(x[7:])  # continues after the largest id
    np.testing.assert_array_equal(idx.ids, [0, 1, 2, 3, 100, 50, 70, 101, 102, 103])
    np.testing.assert_array_equal(idx.reconstruct(50), idx.decode(idx.encode(x[5:6]))[0])
    np.testing.assert_array_equal(idx.reconstruct_batch([101, 0]), idx.decode(idx.encode(x[[7, 0]])))
    np.testing.assert_array_equal(idx.reconstruct_n(4, 2), idx.decode(idx.codes[4:6]))
    with pytest.raises(KeyError, match="not in the index"):
        idx.reconstruct(99)
    with pytest.raises(ValueError, match="already in the index"):
        idx.add_with_ids(x[:1], [70])
    with pytest.raises(ValueError, match="unique"):
        idx.add_with_ids(x[:2], [7, 7])
    with pytest.raises(ValueError, match=">= 0"):
        idx.add_with_ids(x[:1], [-4])
    with pytest.raises(ValueError, match="entries for 2 items"):
        idx.add_with_ids(x[:2], [200])
    codes_before = idx.codes.copy()
    assert idx.remove_ids([50, 0, 12345]) == 2
    assert idx.ntotal == 8 and 50 not in idx.ids and 0 not in idx.ids
    np.testing.assert_array_equal(idx.codes, np.delete(codes_before, [0, 5], axis=0))
    q = _queries(rng, idx, 3)
    _, I = idx.search(q, 20)
    assert not np.isin(I, [0, 50]).any() and (I[:, 8:] == -1).all()
    assert idx.remove_ids([]) == 0
    assert idx.remove_ids([103]) == 1
    idx.add(x[:1])  # ids of removed items are not handed out again
    assert idx.ids[-1] == 104 == idx.next_id - 1
    idx.reset()
    assert idx.ntotal == 0 and idx.next_id == 0


def test_subset_search():
    rng = np.random.default_rng(7)
    idx = _index(rng, n_items=200)
    q = _queries(rng, idx, 4)
    subset = rng.choice(200, size=30, replace=False)
    Ds, Is = idx.search(q, 10, subset=subset)
    assert np.isin(Is, subset).all()
    only = _index(np.random.default_rng(7))  # same codebooks
    only.add_codes(idx.codes[np.sort(subset)], np.sort(subset))
    Do, Io = only.search(q, 10)
    np.testing.assert_array_equal(Is, Io)
    np.testing.assert_array_equal(Ds, Do)
    _, Ic = idx.search_codes(idx.encode(q), 40, subset=subset)
    assert (Ic[:, 30:] == -1).all()
    with pytest.raises(KeyError, match="not in the index"):
        idx.search(q, 3, subset=[1, 5000])


def test_bad_inputs():
    rng = np.random.default_rng(8)
    idx = _index(rng, n_items=20)
    q = _queries(rng, idx, 2)
    with pytest.raises(ValueError, match="k must be >= 1"):
        idx.search(q, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        idx.search(q, 2.5)
    with pytest.raises(ValueError, match="shape"):
        idx.search(q.reshape(2, -1)[:, :-1], 2)
    bad = q.copy()
    bad[0, 0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        idx.search(bad, 2)
    with pytest.raises(ValueError, match="not on the Lorentz manifold"):
        idx.search(q * 1.5, 2)  # off the manifold (e.g. a wrong curvature)
    with pytest.raises(TypeError, match="float"):
        idx.search(q.astype(np.int32), 2)
    with pytest.raises(ValueError, match="metric"):
        idx.search(q, 2, metric="l2")
    with pytest.raises(ValueError, match=r"\[0, K\)"):
        idx.add_codes(np.full((1, M), K))
    with pytest.raises(ValueError, match="shape"):
        idx.add_codes(np.zeros((1, M + 1), np.uint8))
    with pytest.raises(TypeError, match="integer"):
        idx.add_codes(np.zeros((1, M)))
    with pytest.raises(ValueError, match=r"\[0, K\)"):
        idx.search_codes(np.full((1, M), -1), 2)
    books = idx.codebooks
    with pytest.raises(ValueError, match="K <= 256"):
        HyperbolicPQIndex(np.zeros((1, 257, 3)), geometry="euclidean")
    with pytest.raises(ValueError, match="curvatures"):
        HyperbolicPQIndex(books, [1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="not on the Lorentz manifold"):
        HyperbolicPQIndex(books, 1.0)  # right points, wrong curvatures
    with pytest.raises(ValueError, match="geometry"):
        HyperbolicPQIndex(books, CURV, geometry="poincare")
    with pytest.raises(ValueError, match="shape"):
        HyperbolicPQIndex(books[0], CURV)
    with pytest.raises(ValueError, match="clip_r"):
        HyperbolicPQIndex(books, CURV, clip_r=0)
    with pytest.raises(ValueError, match="NaN"):
        EuclideanPQIndex(np.full((1, 2, 2), np.nan))


def test_item_metadata():
    rng = np.random.default_rng(9)
    idx = _index(rng)
    idx.add_codes(rng.integers(0, K, size=(3, M)), metadata=["a.jpg", "b/ü.png", ""])
    idx.add_codes(rng.integers(0, K, size=(2, M)), [10, 11], metadata=["d", "e"])
    assert idx.get_metadata([11, 1, -1, 0]) == ["e", "b/ü.png", None, "a.jpg"]
    with pytest.raises(ValueError, match="metadata"):
        idx.add_codes(rng.integers(0, K, size=(1, M)))
    with pytest.raises(ValueError, match="2 entries for 1 items"):
        idx.add_codes(rng.integers(0, K, size=(1, M)), metadata=["x", "y"])
    with pytest.raises(TypeError, match="str"):
        idx.add_codes(rng.integers(0, K, size=(1, M)), metadata=[3])
    idx.remove_ids([1])
    assert idx.get_metadata(idx.ids) == ["a.jpg", "", "d", "e"]
    plain = _index(rng, n_items=2)
    with pytest.raises(ValueError, match="no per-item metadata"):
        plain.get_metadata([0])
    idx.remove_ids(idx.ids)  # emptied: may go on without metadata
    idx.add_codes(rng.integers(0, K, size=(2, M)))
    assert not idx.has_item_metadata and idx.ntotal == 2


def test_from_quantizer_matches_quantizer_codes():
    from hihpq.quantizer import ProductQuantizer

    torch.manual_seed(0)
    for geometry in ("lorentz", "euclidean"):
        q = ProductQuantizer(4, 16, 6, geometry=geometry, clip_r=1.0)
        idx = HyperbolicPQIndex.from_quantizer(q)
        assert isinstance(idx, EuclideanPQIndex) == (geometry == "euclidean")
        assert (idx.M, idx.K, idx.D, idx.clip_r, idx.geometry) == (4, 16, 6, 1.0, geometry)
        with torch.no_grad():
            h = q.embed(torch.randn(50, 24))
        np.testing.assert_array_equal(idx.encode(h), q.assign(h).numpy())


def test_from_duck_typed_quantizer():
    rng = np.random.default_rng(10)
    books = _lorentz_points(rng, K).transpose(1, 0, 2)

    class Q:
        geometry = "hyperbolic"
        clip_r = None
        curvature = torch.as_tensor(CURV, dtype=torch.float32).requires_grad_()

        def codebooks(self):
            return torch.as_tensor(books, dtype=torch.float32).requires_grad_()

    idx = HyperbolicPQIndex.from_quantizer(Q(), metric="sdc")
    assert idx.geometry == "lorentz" and idx.metric == "sdc" and idx.clip_r is None
    np.testing.assert_allclose(idx.codebooks, books, rtol=1e-6)


def test_many_small_adds_keep_order_and_ids():
    rng = np.random.default_rng(11)
    idx = _index(rng)
    all_codes = rng.integers(0, K, size=(3000, M))
    for s in range(0, 3000, 7):
        idx.add_codes(all_codes[s : s + 7])
    np.testing.assert_array_equal(idx.codes, all_codes)
    np.testing.assert_array_equal(idx.ids, np.arange(3000))


def test_queries_are_scanned_in_chunks(monkeypatch):
    from hihpq.index import pq_index

    rng = np.random.default_rng(12)
    idx = _index(rng, n_items=500)
    q = _queries(rng, idx, 11)
    whole = idx.search(q, 6), idx.search(q, 6, metric="sdc"), idx.search_codes(idx.codes[:11], 6)
    monkeypatch.setattr(pq_index, "_QUERY_CHUNK", 4)
    chunked = idx.search(q, 6), idx.search(q, 6, metric="sdc"), idx.search_codes(idx.codes[:11], 6)
    for (Dw, Iw), (Dc, Ic) in zip(whole, chunked, strict=True):
        np.testing.assert_array_equal(Iw, Ic)
        np.testing.assert_array_equal(Dw, Dc)
    D0, I0 = idx.search(q[:0], 6)
    assert D0.shape == I0.shape == (0, 6)
