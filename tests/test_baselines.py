"""Shallow baselines: retrieval on synthetic blobs, agreement with faiss, ITQ codes, the search surface."""

from __future__ import annotations

import pickle

import faiss
import numpy as np
import pytest
from sklearn.base import clone
from sklearn.decomposition import PCA
from sklearn.exceptions import NotFittedError
from threadpoolctl import threadpool_info

from hihpq.baselines import (
    ITQ,
    PCAOPQ,
    PCAPQ,
    FewTrainingPointsWarning,
    FloatCosine,
    hamming_distances,
    limit_threads,
    unpack_pq_codes,
)
from hihpq.baselines._base import fit_pca
from hihpq.metrics import map_at_k

N_CLASSES, DIM = 10, 32


def blobs(seed: int, n: int, dim: int = DIM, noise: float = 1.0):
    """Gaussian blobs around N_CLASSES fixed centres (the same centres for every call)."""
    centres = np.random.default_rng(1234).normal(size=(N_CLASSES, dim))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, N_CLASSES, n)
    return (centres[y] + noise * rng.normal(size=(n, dim))).astype(np.float32), y


# Small settings: 16 codewords need 39 * 16 = 624 training points for faiss, we give 1,000. One faiss thread:
# on a loaded 2-core machine OpenMP barriers of 2 threads can be 100x slower than 1 thread.
FACTORIES = {
    "pq": lambda: PCAPQ(bits=16, n_components=16, n_codewords=16, seed=0, n_threads=1),
    "opq": lambda: PCAOPQ(bits=16, n_components=16, n_codewords=16, opq_n_iter=5, seed=0, n_threads=1),
    "itq": lambda: ITQ(bits=16, n_iter=20, seed=0),
    "float": lambda: FloatCosine(),
}


@pytest.fixture(autouse=True, scope="module")
def _one_faiss_thread():
    # The test machine has 2 shared cores: OpenMP barriers across 2 threads stall when another process holds a
    # core. Results do not depend on the thread count; the previous count is restored after the module.
    with limit_threads(1):
        yield


@pytest.fixture(scope="module")
def data():
    xtr, _ = blobs(0, 1000)
    xdb, ydb = blobs(1, 800)
    xq, yq = blobs(2, 60)
    return xtr, xdb, ydb, xq, yq


@pytest.fixture(scope="module", params=list(FACTORIES))
def fitted(request, data):
    xtr, xdb, *_ = data
    return request.param, FACTORIES[request.param]().fit(xtr).add(xdb)


def brute_topk(dist: np.ndarray, k: int):
    ids = np.array([sorted(range(len(row)), key=lambda j: (row[j], j))[:k] for row in dist])
    return np.take_along_axis(dist, ids, axis=1), ids


# ------------------------------------------------------------------------------------------------------------
# retrieval quality


def test_map_well_above_random(fitted, data):
    _, _, ydb, xq, yq = data
    _, est = fitted
    _, I = est.search(xq, 50)
    chance = map_at_k(
        np.random.default_rng(0).permuted(np.tile(np.arange(len(ydb)), (len(yq), 1)), axis=1)[:, :50], yq, ydb
    )
    got = map_at_k(I, yq, ydb)
    assert got > 0.6
    assert got > chance + 0.4


# ------------------------------------------------------------------------------------------------------------
# PQ / OPQ against faiss


@pytest.mark.parametrize(("bits", "n_codewords", "n_train"), [(16, 16, 1000), (16, 256, 39 * 256)])
def test_pcapq_without_pca_equals_faiss_indexpq(bits, n_codewords, n_train, capfd):
    xtr, _ = blobs(3, n_train, dim=16)
    xdb, _ = blobs(4, 500, dim=16)
    xq, _ = blobs(5, 40, dim=16)
    nbits = n_codewords.bit_length() - 1
    m = bits // nbits

    ref = faiss.IndexPQ(16, m, nbits)
    ref.pq.cp.seed = 7
    ref.train(xtr)
    ref.add(xdb)
    D_ref, I_ref = ref.search(xq, 30)

    ours = PCAPQ(bits=bits, n_components=None, n_codewords=n_codewords, seed=7).fit(xtr).add(xdb)
    D, I = ours.search(xq, 30)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_array_equal(D, D_ref)
    np.testing.assert_array_equal(ours.encode(xdb), unpack_pq_codes(ref.pq.compute_codes(xdb), m, nbits))
    np.testing.assert_array_equal(ours.codebooks_.ravel(), faiss.vector_to_array(ref.pq.centroids))
    assert ours.code_size == ref.pq.code_size == bits // 8
    assert capfd.readouterr().err == ""  # faiss printed nothing


@pytest.mark.parametrize("n_codewords", [4, 16, 256])
def test_pq_codes_index_the_codebooks(n_codewords):
    n_train = max(1000, 39 * n_codewords)
    xtr, _ = blobs(6, n_train, dim=16)
    nbits = n_codewords.bit_length() - 1
    bits = 4 * nbits
    est = PCAPQ(bits=bits, n_components=8, n_codewords=n_codewords, n_iter=5).fit(xtr)
    codes = est.encode(xtr[:50])
    assert codes.dtype == np.uint8 and codes.shape == (50, 4)
    assert codes.max() < n_codewords
    recon = np.concatenate([est.codebooks_[m][codes[:, m]] for m in range(4)], axis=1)
    np.testing.assert_allclose(recon, est.index_.sa_decode(est.index_.sa_encode(est._project(xtr[:50]))))
    # Each sub-code is the nearest codeword of its sub-vector.
    sub = est._project(xtr[:50]).reshape(50, 4, -1)
    nearest = np.stack(
        [((sub[:, m, None, :] - est.codebooks_[m][None]) ** 2).sum(-1).argmin(1) for m in range(4)], axis=1
    )
    np.testing.assert_array_equal(codes, nearest)


def test_pca_matches_sklearn_and_feeds_faiss():
    xtr, _ = blobs(7, 1000)
    mean, comps, var = fit_pca(xtr, 8)
    sk = PCA(n_components=8, svd_solver="full").fit(xtr.astype(np.float64))
    np.testing.assert_allclose(mean, sk.mean_, atol=1e-6)
    np.testing.assert_allclose(np.abs(comps @ sk.components_.T), np.eye(8), atol=1e-6)  # same axes, up to sign
    np.testing.assert_allclose(var, sk.explained_variance_, rtol=1e-6)

    # PCAPQ == faiss IndexPQ on our PCA projection of the data.
    xq, _ = blobs(8, 30)
    est = PCAPQ(bits=16, n_components=8, n_codewords=16, seed=3).fit(xtr).add(xtr)
    proj = ((xtr - mean) @ comps.T).astype(np.float32)
    ref = faiss.IndexPQ(8, 4, 4)
    ref.pq.cp.seed = 3
    ref.train(proj)
    ref.add(proj)
    D_ref, I_ref = ref.search(((xq - mean) @ comps.T).astype(np.float32), 20)
    D, I = est.search(xq, 20)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, rtol=1e-5)


def test_opq_rotation_is_orthonormal_and_used():
    xtr, _ = blobs(9, 1000, dim=16)
    est = PCAOPQ(bits=16, n_components=None, n_codewords=16, opq_n_iter=5).fit(xtr)
    R = est.rotation_
    np.testing.assert_allclose(R @ R.T, np.eye(16), atol=1e-5)
    rotated = (xtr[:40] @ R.T).astype(np.float32)
    pq = faiss.downcast_index(est.index_.index).pq
    np.testing.assert_array_equal(est.encode(xtr[:40]), unpack_pq_codes(pq.compute_codes(rotated), 4, 4))


def test_opq_lowers_quantization_error_on_correlated_data():
    # Anisotropic Gaussian in a random basis: axis-aligned sub-spaces split its variance badly; OPQ rotates.
    rng = np.random.default_rng(10)
    basis = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    x = ((rng.normal(size=(2000, 16)) * np.geomspace(5.0, 0.1, 16)) @ basis.T).astype(np.float32)

    def error(est):
        xt = est._project(x)
        return float(((est.index_.sa_decode(est.index_.sa_encode(xt)) - xt) ** 2).sum(1).mean())

    pq = PCAPQ(bits=16, n_components=None, n_codewords=16).fit(x)
    opq = PCAOPQ(bits=16, n_components=None, n_codewords=16, opq_n_iter=20).fit(x)
    assert error(opq) < 0.8 * error(pq)


@pytest.mark.parametrize("name", ["pq", "opq", "itq"])
def test_seed_controls_the_fit(name, data):
    xtr, xdb, *_ = data
    a = FACTORIES[name]().fit(xtr).encode(xdb)
    b = FACTORIES[name]().fit(xtr).encode(xdb)
    c = FACTORIES[name]().set_params(seed=1).fit(xtr).encode(xdb)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


# ------------------------------------------------------------------------------------------------------------
# ITQ


def test_itq_codes_are_sign_patterns_packed():
    xtr, _ = blobs(11, 600)
    est = ITQ(bits=12, n_iter=30, seed=2).fit(xtr)
    codes = est.encode(xtr[:100])
    assert codes.dtype == np.uint8 and codes.shape == (100, 2) and est.code_size == 2
    proj = est.project(xtr[:100])
    want = (xtr[:100].astype(np.float64) - est.mean_) @ est.components_.T @ est.rotation_
    np.testing.assert_allclose(proj, want, rtol=1e-4, atol=1e-4)
    bits = np.unpackbits(codes, axis=1)
    np.testing.assert_array_equal(bits[:, :12], (proj >= 0).astype(np.uint8))
    np.testing.assert_array_equal(bits[:, 12:], 0)  # padding bits stay zero
    # +-1 codes from the bits reproduce sign(V R).
    np.testing.assert_array_equal(2 * bits[:, :12].astype(int) - 1, np.where(proj >= 0, 1, -1))


def test_itq_rotation_orthogonal_and_loss_non_increasing():
    xtr, _ = blobs(12, 800)
    est = ITQ(bits=16, n_iter=40).fit(xtr)
    np.testing.assert_allclose(est.rotation_ @ est.rotation_.T, np.eye(16), atol=1e-10)
    np.testing.assert_allclose(est.components_ @ est.components_.T, np.eye(16), atol=1e-10)
    assert est.losses_.shape == (41,)
    assert np.all(np.diff(est.losses_) <= 1e-9 * est.losses_[0])
    assert est.losses_[-1] < est.losses_[0]


def test_itq_search_is_brute_force_hamming(data):
    xtr, xdb, _, xq, _ = data
    est = ITQ(bits=16, n_iter=10).fit(xtr).add(xdb)
    qb = np.unpackbits(est.encode(xq), axis=1)
    dbb = np.unpackbits(est.encode(xdb), axis=1)
    brute = np.array([[int(np.sum(a != b)) for b in dbb] for a in qb])
    D_ref, I_ref = brute_topk(brute, 40)
    D, I = est.search(xq, 40)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_array_equal(D, D_ref.astype(np.float32))
    np.testing.assert_array_equal(hamming_distances(est.encode(xq), est.encode(xdb)), brute)


def test_hamming_distances_many_words_and_errors():
    rng = np.random.default_rng(13)
    a = rng.integers(0, 256, (7, 19), dtype=np.uint8)  # 19 bytes: three 64-bit words with padding
    b = rng.integers(0, 256, (5, 19), dtype=np.uint8)
    want = np.array([[np.unpackbits(x ^ y).sum() for y in b] for x in a])
    np.testing.assert_array_equal(hamming_distances(a, b), want)
    with pytest.raises(ValueError, match="same number of bytes"):
        hamming_distances(a, b[:, :3])
    with pytest.raises(TypeError, match="uint8"):
        hamming_distances(a.astype(np.int64), b)


# ------------------------------------------------------------------------------------------------------------
# exact float search


def test_float_cosine_is_exact(data):
    _, xdb, _, xq, _ = data
    est = FloatCosine().fit(xdb).add(xdb)
    qn = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    dn = xdb / np.linalg.norm(xdb, axis=1, keepdims=True)
    dist = 1.0 - qn.astype(np.float64) @ dn.T.astype(np.float64)
    D, I = est.search(xq, 25)
    _, I_ref = brute_topk(dist, 25)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, np.take_along_axis(dist, I_ref, 1), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(est.encode(xq), axis=1), 1.0, rtol=1e-6)
    assert est.code_size == 4 * DIM and est.bits == 32 * DIM


# ------------------------------------------------------------------------------------------------------------
# the search surface, the same for every baseline


def test_surface_shapes_dtypes_padding(fitted, data):
    _, xdb, _, xq, _ = data
    _, est = fitted
    assert est.is_trained and est.ntotal == len(xdb) and est.d == DIM
    D, I = est.search(xq, 7)
    assert D.shape == I.shape == (len(xq), 7)
    assert D.dtype == np.float32 and I.dtype == np.int64
    assert np.all(np.diff(D, axis=1) >= 0)
    D0, I0 = est.search(xq[:0], 5)
    assert D0.shape == I0.shape == (0, 5)
    codes = est.encode(xq[:3])
    assert len(codes) == 3
    if not isinstance(est, FloatCosine):
        assert codes.dtype == np.uint8 and est.bits == 16 and est.code_size == 2


@pytest.mark.parametrize("name", list(FACTORIES))
def test_surface_small_and_growing_database(name, data):
    xtr, xdb, _, xq, _ = data
    est = FACTORIES[name]().fit(xtr)
    assert est.ntotal == 0
    D, I = est.search(xq[:3], 4)
    assert np.all(I == -1) and np.all(np.isinf(D)) and D.dtype == np.float32
    est.add(xdb[:5])
    D, I = est.search(xq[:3], 8)
    assert np.all(I[:, 5:] == -1) and np.all(np.isposinf(D[:, 5:]))
    np.testing.assert_array_equal(np.sort(I[:, :5], axis=1), np.tile(np.arange(5), (3, 1)))
    assert np.all(np.isfinite(D[:, :5]))
    # Adding in two batches numbers the items as one batch would.
    est.add(xdb[5:])
    one = FACTORIES[name]().fit(xtr).add(xdb)
    for a, b in zip(est.search(xq, 20), one.search(xq, 20), strict=True):
        np.testing.assert_array_equal(a, b)
    est.reset()
    assert est.ntotal == 0


@pytest.mark.parametrize("name", list(FACTORIES))
def test_ties_are_ordered_by_id(name, data):
    xtr, xdb, _, xq, _ = data
    est = FACTORIES[name]().fit(xtr)
    dup = np.repeat(xdb[:20], 6, axis=0)[np.random.default_rng(14).permutation(120)]
    est.add(dup)
    D_all, I_all = est.search(xq[:10], 120)
    _, I = est.search(xq[:10], 15)  # the boundary cuts through groups of identical codes
    for row in range(10):
        d_by_id = np.empty(120)
        d_by_id[I_all[row]] = D_all[row]
        np.testing.assert_array_equal(I[row], np.lexsort((np.arange(120), d_by_id))[:15])


@pytest.mark.parametrize("name", list(FACTORIES))
def test_surface_errors(name, data):
    xtr, *_ = data
    est = FACTORIES[name]()
    with pytest.raises(NotFittedError, match="fit"):
        est.search(xtr[:2], 3)
    with pytest.raises(NotFittedError):
        est.add(xtr)
    assert not est.is_trained and est.ntotal == 0
    with pytest.raises(ValueError, match=r"shape \(n_samples, n_features\)"):
        est.fit(xtr[0])
    with pytest.raises(TypeError, match="real numbers"):
        est.fit(xtr.astype(complex))
    bad = xtr.copy()
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        est.fit(bad)
    est.fit(xtr)
    with pytest.raises(ValueError, match=f"has 5 features, but {type(est).__name__} was fitted with {DIM}"):
        est.add(xtr[:, :5])
    with pytest.raises(ValueError, match="NaN or infinite"):
        est.search(bad, 3)
    with pytest.raises(ValueError, match="k must be >= 1"):
        est.search(xtr[:2], 0)
    with pytest.raises(TypeError, match="k must be an int"):
        est.search(xtr[:2], 2.5)


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"bits": 10}, ValueError, "multiple of log2"),
        ({"bits": 12, "n_codewords": 256}, ValueError, "multiple of log2"),
        ({"bits": 16, "n_codewords": 12}, ValueError, "power of two"),
        ({"bits": 16, "n_codewords": 512}, ValueError, "n_codewords must be"),
        ({"bits": 16, "n_components": 10}, ValueError, r"multiple of the number of sub-quantizers M = 4"),
        ({"bits": 16, "n_components": 64}, ValueError, r"n_components must be \[1, 32\]"),
        ({"bits": 24, "n_components": None}, ValueError, "feature dimension"),
        ({"bits": 16, "n_threads": 0}, ValueError, "n_threads"),
        ({"bits": 16.0}, TypeError, "bits must be an int"),
        ({"bits": 16, "seed": -1}, ValueError, "seed"),
        ({"bits": 16, "n_iter": 0}, ValueError, "n_iter"),
    ],
)
@pytest.mark.parametrize("cls", [PCAPQ, PCAOPQ])
def test_pq_parameter_errors(cls, params, error, match, data):
    xtr, *_ = data
    with pytest.raises(error, match=match):
        cls(**{"n_codewords": 16, **params}).fit(xtr)


def test_itq_parameter_errors(data):
    xtr, *_ = data
    with pytest.raises(ValueError, match=r"bits must be \[1, 32\]"):
        ITQ(bits=64).fit(xtr)
    with pytest.raises(ValueError, match="at least 2"):
        ITQ(bits=4).fit(xtr[:1])
    with pytest.raises(ValueError, match="n_iter"):
        ITQ(bits=4, n_iter=-1).fit(xtr)


# ------------------------------------------------------------------------------------------------------------
# faiss hygiene: training size, threads, pickling


@pytest.mark.parametrize("cls", [PCAPQ, PCAOPQ])
def test_few_training_points_warn_in_python_only(cls, capfd):
    xtr, _ = blobs(15, 300, dim=16)
    with pytest.warns(FewTrainingPointsWarning, match="300 training points for 16 codewords"):
        est = cls(bits=16, n_components=None, n_codewords=16).fit(xtr)
    assert est.search(xtr[:2], 3)[1].shape == (2, 3)
    assert capfd.readouterr().err == ""  # faiss's own stderr warning was suppressed
    with pytest.raises(ValueError, match="at least n_codewords = 16 training points, got 10"):
        cls(bits=16, n_components=None, n_codewords=16).fit(xtr[:10])


def _thread_state():
    blas = sorted(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")
    return faiss.omp_get_max_threads(), blas


def test_thread_limits_are_restored(data):
    xtr, xdb, _, xq, _ = data
    outside = _thread_state()
    with limit_threads(2):  # a process-wide state different from what the estimators ask for
        state = _thread_state()
        assert state[0] == 2
        with limit_threads(1):
            assert _thread_state()[0] == 1 and set(_thread_state()[1]) == {1}
        assert _thread_state() == state
        with pytest.raises(RuntimeError), limit_threads(1):
            raise RuntimeError  # restored on errors too
        assert _thread_state() == state
        for est in (
            PCAOPQ(bits=16, n_components=16, n_codewords=16, opq_n_iter=1, n_threads=1),
            ITQ(bits=8, n_threads=1),
            FloatCosine(n_threads=1),
        ):
            est.fit(xtr).add(xdb).search(xq, 5)
            est.encode(xq)
            assert _thread_state() == state
    assert _thread_state() == outside


def test_pickle_and_clone(fitted, data):
    _, _, _, xq, _ = data
    _, est = fitted
    restored = pickle.loads(pickle.dumps(est))
    for a, b in zip(est.search(xq, 10), restored.search(xq, 10), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(est.encode(xq), restored.encode(xq))
    fresh = clone(est)
    assert not fresh.is_trained and fresh.get_params() == est.get_params()


def test_opq_parameter_errors(data):
    xtr, *_ = data
    with pytest.raises(ValueError, match="opq_n_iter"):
        PCAOPQ(bits=16, n_components=16, n_codewords=16, opq_n_iter=0).fit(xtr)
    with pytest.raises(TypeError, match="n_threads must be an int"):
        FloatCosine(n_threads="2").fit(xtr)
