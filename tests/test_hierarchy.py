"""Tests of hihpq.hierarchy: K-means + bottom-up centroid merging (Eq. 16), exp0 of prototypes (Eq. 17)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import linkage

from hihpq.geometry import euclidean, lorentz
from hihpq.hierarchy import HierarchicalClustering, default_n_subclusters, prototypes_on_manifold

BACKENDS = ["faiss", "sklearn"]


def _partition(labels: np.ndarray) -> set[frozenset[int]]:
    """A labelling as a set of member sets, independent of the cluster numbering."""
    return {frozenset(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)}


def _reference_merge(X: np.ndarray, start: list[list[int]], levels) -> tuple[list[set], list[float]]:
    """Plain, slow centroid merging: every prototype from its members, every pairwise distance, each step."""
    X = X.astype(np.float64)
    clusters = [list(c) for c in start]
    parts, dists = [], []
    for level in levels:
        while len(clusters) > level:
            protos = [X[c].mean(axis=0) for c in clusters]
            best = None
            for a in range(len(clusters)):
                for b in range(a + 1, len(clusters)):
                    d = float(np.sqrt(((protos[a] - protos[b]) ** 2).sum()))
                    if best is None or d < best[0]:
                        best = (d, a, b)
            d, a, b = best
            dists.append(d)
            clusters[a] = clusters[a] + clusters[b]
            del clusters[b]
        parts.append({frozenset(c) for c in clusters})
    return parts, dists


def _blobs(seed: int = 0, per_blob: int = 30):
    """3 big blobs, each made of 3 small blobs: (N, 8) features, small-blob and big-blob ids."""
    rng = np.random.default_rng(seed)
    big = rng.standard_normal((3, 8)) * 100.0
    X, small_id = [], []
    for b in range(3):
        for s in range(3):
            center = big[b] + rng.standard_normal(8) * 6.0
            X.append(center + rng.standard_normal((per_blob, 8)) * 0.3)
            small_id += [3 * b + s] * per_blob
    small_id = np.array(small_id)
    return np.concatenate(X).astype(np.float32), small_id, small_id // 3


# ---------------------------------------------------------------------- structure
@pytest.mark.parametrize("backend", BACKENDS)
def test_levels_nested_sizes_prototypes(backend):
    X = np.random.default_rng(0).standard_normal((400, 6)).astype(np.float32)
    levels = (40, 13, 5, 1)
    h = HierarchicalClustering(levels, n_subclusters=90, backend=backend, kmeans_iter=10).fit(X)
    assert h.levels_ == levels
    assert len(h.labels_) == len(h.prototypes_) == len(h.sizes_) == 4 and len(h.parents_) == 3
    for lab, proto, size, n_l in zip(h.labels_, h.prototypes_, h.sizes_, levels, strict=True):
        assert lab.shape == (400,) and lab.dtype == np.int64
        # every sample assigned, exactly n_l non-empty clusters numbered 0..n_l-1
        assert set(np.unique(lab).tolist()) == set(range(n_l))
        np.testing.assert_array_equal(size, np.bincount(lab, minlength=n_l))
        assert proto.shape == (n_l, 6) and proto.dtype == np.float32
        means = np.stack([X[lab == c].astype(np.float64).mean(axis=0) for c in range(n_l)])
        np.testing.assert_allclose(proto, means, rtol=1e-5, atol=1e-6)
    for l, parent in enumerate(h.parents_):
        assert parent.shape == (levels[l],) and parent.dtype == np.int64
        np.testing.assert_array_equal(parent[h.labels_[l]], h.labels_[l + 1])
        # each fine cluster lies within exactly one coarse cluster
        for c in range(levels[l]):
            assert np.unique(h.labels_[l + 1][h.labels_[l] == c]).size == 1
    # sub-clusters are nested in the finest level too
    sub = h.subcluster_labels_
    assert h.n_subclusters_ <= 90 and set(np.unique(sub).tolist()) == set(range(h.n_subclusters_))
    for c in range(h.n_subclusters_):
        assert np.unique(h.labels_[0][sub == c]).size == 1
    assert h.merge_distances_.shape == (h.n_subclusters_ - 1,)
    assert h.inertia_ > 0 and h.n_iter_ == 10 and h.n_features_in_ == 6


@pytest.mark.parametrize("levels", [(30, 12, 5, 2), (25,), (30, 29, 1)])
def test_exact_mode_equals_bruteforce_reference(levels):
    X = np.random.default_rng(1).standard_normal((30, 3)).astype(np.float32)
    h = HierarchicalClustering(levels, n_subclusters=30).fit(X)
    assert h.n_iter_ == 0 and h.inertia_ == 0.0
    np.testing.assert_array_equal(h.subcluster_labels_, np.arange(30))
    parts, dists = _reference_merge(X, [[i] for i in range(30)], levels)
    for lab, part in zip(h.labels_, parts, strict=True):
        assert _partition(lab) == part
    np.testing.assert_allclose(h.merge_distances_, dists, rtol=1e-9)


def test_exact_mode_equals_scipy_centroid_linkage():
    n, levels = 200, (60, 20, 7, 3)
    X = np.random.default_rng(2).standard_normal((n, 5)).astype(np.float32)
    h = HierarchicalClustering(levels, n_subclusters=n).fit(X)
    Z = linkage(X.astype(np.float64), method="centroid")  # size-weighted centroid (UPGMC) on raw points
    np.testing.assert_allclose(h.merge_distances_, Z[: n - levels[-1], 2], rtol=1e-7)
    # replay scipy's merges and compare the partitions at each level
    members = {i: [i] for i in range(n)}
    for step, (a, b, _, _) in enumerate(Z[: n - levels[-1]]):
        members[n + step] = members.pop(int(a)) + members.pop(int(b))
        if len(members) in levels:
            lab = h.labels_[levels.index(len(members))]
            assert _partition(lab) == {frozenset(m) for m in members.values()}


@pytest.mark.parametrize("backend", BACKENDS)
def test_kmeans_mode_merges_subclusters_like_reference(backend):
    """After K-means, the merge is exact centroid linkage over the sub-clusters (size-weighted)."""
    X = np.random.default_rng(3).standard_normal((300, 4)).astype(np.float32)
    levels = (12, 6, 2)
    h = HierarchicalClustering(levels, n_subclusters=25, backend=backend, seed=1).fit(X)
    sub = h.subcluster_labels_
    start = [np.flatnonzero(sub == c).tolist() for c in range(h.n_subclusters_)]
    sizes = np.bincount(sub)
    assert sizes.min() > 1  # not trivially exact mode: the weighting matters
    parts, dists = _reference_merge(X, start, levels)
    for lab, part in zip(h.labels_, parts, strict=True):
        assert _partition(lab) == part
    np.testing.assert_allclose(h.merge_distances_, dists, rtol=1e-7)
    centers = np.stack([X[sub == c].astype(np.float64).mean(axis=0) for c in range(h.n_subclusters_)])
    np.testing.assert_allclose(h.subcluster_centers_, centers, rtol=1e-5, atol=1e-6)
    inertia = sum(((X[sub == c] - centers[c]) ** 2).sum() for c in range(h.n_subclusters_))
    np.testing.assert_allclose(h.inertia_, inertia, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_blobs_recovered(backend, seed):
    X, small_id, big_id = _blobs(seed)
    h = HierarchicalClustering((9, 3), backend=backend, seed=seed).fit(X)
    assert _partition(h.labels_[0]) == _partition(small_id)
    assert _partition(h.labels_[1]) == _partition(big_id)


@pytest.mark.parametrize("backend", BACKENDS)
def test_seeded_determinism_and_torch_input(backend):
    X = np.random.default_rng(4).standard_normal((500, 8)).astype(np.float32)
    kw = {"n_subclusters": 60, "backend": backend, "seed": 7}
    a = HierarchicalClustering((20, 5), **kw).fit(X)
    b = HierarchicalClustering((20, 5), **kw).fit(X.copy())
    t = HierarchicalClustering((20, 5), **kw).fit(torch.from_numpy(X).double().requires_grad_())
    for other in (b, t):
        np.testing.assert_array_equal(a.subcluster_labels_, other.subcluster_labels_)
        for la, lb in zip(a.labels_, other.labels_, strict=True):
            np.testing.assert_array_equal(la, lb)
        for pa, pb in zip(a.prototypes_, other.prototypes_, strict=True):
            np.testing.assert_array_equal(pa, pb)


@pytest.mark.parametrize("backend", BACKENDS)
def test_n_threads_limited_then_restored(backend):
    import faiss

    before = faiss.omp_get_max_threads()
    X = np.random.default_rng(10).standard_normal((300, 4)).astype(np.float32)
    h = HierarchicalClustering((10, 3), n_subclusters=30, backend=backend, n_threads=1).fit(X)
    assert [np.unique(lab).size for lab in h.labels_] == [10, 3]
    assert faiss.omp_get_max_threads() == before


def test_default_n_subclusters():
    assert default_n_subclusters(50_000, 200) == 800
    assert default_n_subclusters(1_000_000, 200) == 1000
    assert default_n_subclusters(300, 100) == 300
    X = np.random.default_rng(5).standard_normal((700, 3)).astype(np.float32)
    h = HierarchicalClustering((20, 4)).fit(X)
    assert h.n_subclusters_ <= 80


@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicates_leave_empty_clusters_dropped(backend):
    """40 sub-clusters asked on 20 distinct points: empty K-means clusters are dropped before merging."""
    rng = np.random.default_rng(6)
    X = np.repeat(rng.standard_normal((20, 3)), 10, axis=0).astype(np.float32)
    h = HierarchicalClustering((15, 5), n_subclusters=40, backend=backend).fit(X)
    assert 15 <= h.n_subclusters_ <= 20
    assert np.bincount(h.subcluster_labels_).min() > 0
    assert [np.unique(lab).size for lab in h.labels_] == [15, 5]
    with pytest.raises(ValueError, match="non-empty sub-clusters"):
        HierarchicalClustering((25,), n_subclusters=40, backend=backend).fit(X)


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("X", "kwargs", "err", "match"),
    [
        (
            np.zeros((150, 2)),
            {"levels": (200, 10)},
            ValueError,
            "level 200 is larger than the number of samples 150",
        ),
        (np.full((10, 2), np.nan), {"levels": (3,)}, ValueError, "NaN"),
        (np.array([[0.0, np.inf]] * 10), {"levels": (3,)}, ValueError, "infinite"),
        (np.zeros(10), {"levels": (3,)}, ValueError, "2-D"),
        (np.zeros((4, 3, 2)), {"levels": (3,)}, ValueError, "2-D"),
        (np.zeros((0, 3)), {"levels": (3,)}, ValueError, "at least one sample"),
        (np.array([["a", "b"]] * 5), {"levels": (3,)}, TypeError, "real-valued"),
        (np.zeros((5, 2), dtype=bool), {"levels": (3,)}, TypeError, "real-valued"),
        (torch.zeros(5, 2, dtype=torch.complex64), {"levels": (3,)}, TypeError, "real numbers"),
        (np.zeros((50, 2)), {"levels": (5, 10)}, ValueError, "strictly decreasing"),
        (np.zeros((50, 2)), {"levels": (10, 10)}, ValueError, "strictly decreasing"),
        (np.zeros((50, 2)), {"levels": (10, 0)}, ValueError, "positive"),
        (np.zeros((50, 2)), {"levels": ()}, ValueError, "at least one level"),
        (np.zeros((50, 2)), {"levels": (10, 2.5)}, TypeError, "ints"),
        (np.zeros((50, 2)), {"levels": "ab"}, TypeError, "ints"),
        (np.zeros((50, 2)), {"levels": (10,), "n_subclusters": 5}, ValueError, "between the finest level 10"),
        (np.zeros((50, 2)), {"levels": (10,), "n_subclusters": 51}, ValueError, "number of samples 50"),
        (np.zeros((50, 2)), {"levels": (10,), "n_subclusters": 20.0}, TypeError, "n_subclusters"),
        (np.zeros((50, 2)), {"levels": (10,), "backend": "cuml"}, ValueError, "backend"),
        (np.zeros((50, 2)), {"levels": (10,), "kmeans_iter": 0}, ValueError, "kmeans_iter"),
        (np.zeros((50, 2)), {"levels": (10,), "n_threads": 0}, ValueError, "n_threads"),
        (np.zeros((50, 2)), {"levels": (10,), "seed": -1}, ValueError, "seed"),
        (np.zeros((50, 2)), {"levels": (10,), "seed": 1.5}, TypeError, "seed"),
    ],
)
def test_bad_input(X, kwargs, err, match):
    levels = kwargs.pop("levels")
    with pytest.raises(err, match=match):
        HierarchicalClustering(levels, **kwargs).fit(X)


def test_init_stores_arguments_only():
    h = HierarchicalClustering((5, 10), n_subclusters=-3, backend="nope")  # validated in fit, not here
    assert h.levels == (5, 10) and h.n_subclusters == -3 and h.backend == "nope"
    assert not hasattr(h, "labels_")


# ---------------------------------------------------------------------- Eq. 17
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prototypes_on_manifold_lorentz(dtype):
    M, D, n = 3, 5, 7
    rng = np.random.default_rng(8)
    protos = rng.standard_normal((n, M * D)) * 0.7
    protos.reshape(n, M, D)[..., 0] = 0.0  # tangent vectors at the origin: time coordinate 0
    c = torch.tensor([0.5, 1.0, 2.0], dtype=dtype, requires_grad=True)
    pts = prototypes_on_manifold(torch.as_tensor(protos, dtype=dtype), M, D, c, "lorentz")
    assert pts.shape == (n, M, D) and pts.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    # on H_{c_m}: <x, x>_L = -1/c_m per subspace
    norms = lorentz.inner(pts, pts)
    torch.testing.assert_close(norms, (-1.0 / c).expand(n, M).detach(), atol=tol, rtol=tol, check_dtype=False)
    # per subspace it is exp0 with that subspace's curvature, and log0 gives the prototype back
    for m in range(M):
        seg = torch.as_tensor(protos[:, m * D : (m + 1) * D], dtype=dtype)
        torch.testing.assert_close(pts[:, m].detach(), lorentz.expmap0(seg, c=c.detach()[m].item()), atol=tol, rtol=tol)
    back = lorentz.logmap0(pts, c=c.reshape(M, 1)).reshape(n, M * D)
    torch.testing.assert_close(back.detach(), torch.as_tensor(protos, dtype=dtype), atol=tol * 10, rtol=tol * 10)
    pts.sum().backward()  # the training loop differentiates through the curvature
    assert c.grad is not None and torch.isfinite(c.grad).all() and (c.grad != 0).all()


def test_prototypes_on_manifold_numpy_euclidean_and_errors():
    M, D = 2, 4
    protos = np.random.default_rng(9).standard_normal((5, M * D)).astype(np.float32)
    out = prototypes_on_manifold(protos, M, D, 1.0, euclidean)
    assert out.dtype == torch.float32
    np.testing.assert_array_equal(out.numpy(), protos.reshape(5, M, D))
    lor = prototypes_on_manifold(protos, M, D, 1.0, "lorentz")
    torch.testing.assert_close(lorentz.inner(lor, lor), torch.full((5, M), -1.0), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="M\\*D"):
        prototypes_on_manifold(protos, 3, D, 1.0)
    with pytest.raises(ValueError, match="shape \\(M,\\)"):
        prototypes_on_manifold(protos, M, D, torch.ones(3))
    with pytest.raises(ValueError, match="positive"):
        prototypes_on_manifold(protos, M, D, -1.0)
    with pytest.raises(ValueError, match="unknown geometry"):
        prototypes_on_manifold(protos, M, D, 1.0, "spherical")
