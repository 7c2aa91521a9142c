"""Hierarchical clustering of tangent-space features (paper Eq. 16-17): K-means, then bottom-up merging.

The features of the whole training set are tangent vectors at the origin of the product manifold, flattened to
(N, M*D). They are first split by K-means into S sub-clusters (S ~ a few times the finest level), then the two
closest prototypes are merged repeatedly, prototype = mean of the member tangent vectors and distance =
Euclidean distance between prototypes (Eq. 16). This is size-weighted centroid linkage (UPGMC) started from
the K-means partition. The partition is recorded each time the number of clusters reaches a preset level
size N_l, so the levels are nested by construction.

The authors' code ran scipy Ward linkage on all N points (O(N^2) memory, 10 GB at N = 50k); here the cost is
one K-means plus O(S^2) memory and about O(S^2 F) time for the merging, independent of N.

With ``n_subclusters=N`` every sample is its own sub-cluster and no K-means runs: the result is then classic
centroid agglomerative clustering of the samples (``scipy.cluster.hierarchy.linkage(X, "centroid")``), useful
for checks on small data.

:func:`prototypes_on_manifold` maps the prototypes onto the product manifold with exp0 per subspace (Eq. 17).
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch
from scipy.spatial.distance import cdist

__all__ = ["HierarchicalClustering", "default_n_subclusters", "prototypes_on_manifold"]

_BACKENDS = ("faiss", "sklearn")


def default_n_subclusters(n_samples: int, finest_level: int) -> int:
    """Default number of K-means sub-clusters: ``min(N, max(4 * finest_level, round(sqrt(N))))``.

    Four sub-clusters per finest cluster leave the merging real work to do (the merge, not K-means, decides
    the hierarchy), sqrt(N) keeps sub-clusters from growing huge on big data, and S stays small enough for the
    O(S^2) merge (e.g. N = 50,000, levels (200, 100, 50) -> S = 800).
    """
    return min(n_samples, max(4 * finest_level, round(math.sqrt(n_samples))))


class HierarchicalClustering:
    """K-means + bottom-up centroid merging into nested levels (paper Eq. 16), scikit-learn style.

    Parameters
    ----------
    levels
        Cluster counts N_l, strictly decreasing (finest first), e.g. ``(100, 50, 25)``. Unsorted levels are
        refused rather than sorted, so that ``labels_[l]`` always belongs to ``levels[l]``. A single int means
        one level.
    n_subclusters
        Number of K-means sub-clusters S, ``levels[0] <= S <= N``. ``None``: :func:`default_n_subclusters`.
        ``S = N`` skips K-means (every sample is a sub-cluster): exact centroid linkage, for small N (the
        merge keeps an (S, S) float64 distance matrix: 8 S^2 bytes).
    kmeans_iter
        K-means iterations.
    seed
        Seed of the K-means initialisation; the merging itself is deterministic.
    backend
        ``"faiss"`` (faiss.Kmeans) or ``"sklearn"`` (sklearn.cluster.KMeans, one initialisation).
    n_threads
        Threads for K-means (``None``: the library's default, all cores). Limited only during :meth:`fit`;
        on a machine shared with other busy processes fewer threads can be much faster (OpenMP threads spin).

    Attributes (after :meth:`fit`)
    -------------------------------
    levels_ : tuple[int, ...]
        The level sizes, finest first.
    labels_ : list[np.ndarray]
        Per level, (N,) int64 cluster ids in [0, N_l).
    prototypes_ : list[np.ndarray]
        Per level, (N_l, F) float32: mean of the member features (computed in float64).
    sizes_ : list[np.ndarray]
        Per level, (N_l,) int64 number of members (all > 0).
    parents_ : list[np.ndarray]
        Per consecutive level pair (l, l+1), (N_l,) int64: the id at level l+1 of the cluster containing
        cluster i of level l. ``parents_[l][labels_[l]] == labels_[l + 1]``.
    subcluster_labels_ : np.ndarray
        (N,) int64 sub-cluster ids in [0, n_subclusters_), empty K-means clusters dropped.
    subcluster_centers_ : np.ndarray
        (n_subclusters_, F) float32 member means of the sub-clusters.
    n_subclusters_ : int
        Number of non-empty sub-clusters actually merged.
    merge_distances_ : np.ndarray
        (n_subclusters_ - levels[-1],) float64 Euclidean distances between the prototypes merged at each step,
        in merge order (the heights of a scipy linkage, not necessarily monotone for centroid linkage).
    inertia_ : float
        Sum of squared distances of the samples to their sub-cluster means (0 in exact mode).
    n_iter_ : int
        K-means iterations run (0 in exact mode).
    n_features_in_ : int
        F.
    """

    def __init__(
        self,
        levels: Sequence[int] | int = (100, 50, 25),
        *,
        n_subclusters: int | None = None,
        kmeans_iter: int = 20,
        seed: int = 0,
        backend: str = "faiss",
        n_threads: int | None = None,
    ) -> None:
        self.levels = levels
        self.n_subclusters = n_subclusters
        self.kmeans_iter = kmeans_iter
        self.seed = seed
        self.backend = backend
        self.n_threads = n_threads

    # ------------------------------------------------------------------ fit
    def fit(self, X, y=None) -> HierarchicalClustering:
        """Cluster X: (N, F) float numpy array or torch tensor (made float32 numpy); ``y`` is ignored."""
        X = _as_features(X)
        n, f = X.shape
        levels = _check_levels(self.levels, n)
        n_sub = self.n_subclusters
        if n_sub is None:
            n_sub = default_n_subclusters(n, levels[0])
        elif not _is_int(n_sub):
            raise TypeError(f"n_subclusters must be an int or None, got {type(n_sub).__name__}")
        n_sub = int(n_sub)
        if not levels[0] <= n_sub <= n:
            raise ValueError(
                f"n_subclusters must lie between the finest level {levels[0]} and the number of samples {n}, "
                f"got {n_sub}"
            )
        if not _is_int(self.kmeans_iter) or self.kmeans_iter < 1:
            raise ValueError(f"kmeans_iter must be a positive int, got {self.kmeans_iter!r}")
        if not _is_int(self.seed):
            raise TypeError(f"seed must be an int, got {type(self.seed).__name__}")
        if not 0 <= self.seed < 2**31:  # faiss takes a C int, sklearn a 32-bit seed
            raise ValueError(f"seed must lie in [0, 2**31), got {self.seed}")
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.n_threads is not None and (not _is_int(self.n_threads) or self.n_threads < 1):
            raise ValueError(f"n_threads must be a positive int or None, got {self.n_threads!r}")

        if n_sub == n:  # exact mode: every sample is its own sub-cluster
            sub = np.arange(n, dtype=np.int64)
            self.n_iter_ = 0
        else:
            sub = self._kmeans(X, n_sub)
            self.n_iter_ = int(self.kmeans_iter)
        # Drop empty K-means clusters and renumber the rest 0..S-1 (ordered by old id, so deterministic).
        _, sub = np.unique(sub, return_inverse=True)
        sub = sub.astype(np.int64).reshape(-1)
        sums, counts = _group_sums(X, sub)
        s = counts.size
        if s < levels[0]:
            raise ValueError(
                f"K-means left only {s} non-empty sub-clusters, fewer than the finest level {levels[0]} "
                "(too few distinct samples?); lower the levels or pass n_subclusters=N for exact clustering"
            )
        centers = sums / counts[:, None]
        self.inertia_ = _inertia(X, centers, sub) if s < n else 0.0

        snapshots, merge_dist = _centroid_merge(centers, counts, levels)

        self.levels_ = levels
        self.n_features_in_ = f
        self.n_subclusters_ = s
        self.subcluster_labels_ = sub
        self.subcluster_centers_ = centers.astype(np.float32)
        self.merge_distances_ = merge_dist
        self.labels_, self.prototypes_, self.sizes_ = [], [], []
        sub_level = []  # per level: (S,) level id of each sub-cluster
        for snap in snapshots:
            _, ids = np.unique(snap, return_inverse=True)
            ids = ids.astype(np.int64).reshape(-1)
            sub_level.append(ids)
            lab = ids[sub]
            self.labels_.append(lab)
            # Member means from the exact float64 sub-cluster sums (not the merged running means).
            lsums = np.zeros((ids.max() + 1, f))
            np.add.at(lsums, ids, sums)
            lcounts = np.bincount(ids, weights=counts).astype(np.int64)
            self.prototypes_.append((lsums / lcounts[:, None]).astype(np.float32))
            self.sizes_.append(lcounts)
        self.parents_ = []
        for fine, coarse in itertools.pairwise(sub_level):
            parent = np.empty(fine.max() + 1, dtype=np.int64)
            parent[fine] = coarse  # nested levels: every sub-cluster of a fine cluster has the same parent
            self.parents_.append(parent)
        return self

    def fit_predict(self, X, y=None) -> list[np.ndarray]:
        """Fit and return :attr:`labels_`."""
        return self.fit(X).labels_

    def _kmeans(self, X: np.ndarray, k: int) -> np.ndarray:
        """(N,) K-means labels of X into k clusters (some may be empty)."""
        if self.backend == "faiss":
            import faiss

            # min_points_per_centroid=1: no stderr warning for small N; max_points_per_centroid keeps faiss's
            # subsampling (256 points per centroid) so very large N stays cheap.
            km = faiss.Kmeans(
                X.shape[1], k, niter=int(self.kmeans_iter), seed=int(self.seed), verbose=False,
                min_points_per_centroid=1,
            )  # fmt: skip
            previous = faiss.omp_get_max_threads()
            if self.n_threads is not None:
                faiss.omp_set_num_threads(int(self.n_threads))
            try:
                km.train(X)
                _, assign = km.index.search(X, 1)
            finally:
                faiss.omp_set_num_threads(previous)  # process-wide setting: restore it
            return assign.reshape(-1).astype(np.int64)
        from sklearn.cluster import KMeans
        from sklearn.exceptions import ConvergenceWarning
        from threadpoolctl import threadpool_limits

        km = KMeans(n_clusters=k, n_init=1, max_iter=int(self.kmeans_iter), random_state=int(self.seed))
        with warnings.catch_warnings(), threadpool_limits(limits=self.n_threads):
            # Raised when there are fewer distinct points than clusters; the empty clusters are dropped below.
            warnings.simplefilter("ignore", ConvergenceWarning)
            km.fit(X)
        return km.labels_.astype(np.int64)


# ---------------------------------------------------------------------- merging
def _centroid_merge(
    centers: np.ndarray, counts: np.ndarray, levels: tuple[int, ...]
) -> tuple[list[np.ndarray], np.ndarray]:
    """Size-weighted centroid merging of S clusters down to ``levels[-1]``.

    centers (S, F) float64 member means, counts (S,) sizes. Returns, per level, an (S,) array mapping each
    initial cluster to the representative id it belongs to when the count hits that level, and the
    (S - levels[-1],) distances of the merges.

    A dense (S, S) squared-distance matrix plus, per row, a candidate neighbour ``nn`` and a LOWER BOUND
    ``nn_d`` of the row's minimum (the idea of Muellner's generic linkage algorithm). Centroid linkage is not
    monotone: a merged prototype can move away from rows that had it as nearest neighbour, and on noisy data
    one growing cluster is the neighbour of most rows, so rescanning all of them after every merge is O(S^3).
    Instead a row is rescanned only when its bound is the smallest and turns out to be stale; a step is O(S F)
    plus those rescans.
    """
    s = centers.shape[0]
    proto = centers.astype(np.float64, copy=True)
    size = counts.astype(np.float64, copy=True)
    d2 = cdist(proto, proto, "sqeuclidean")
    np.fill_diagonal(d2, np.inf)
    nn = d2.argmin(axis=1)
    nn_d = d2[np.arange(s), nn]
    owner = np.arange(s, dtype=np.int64)  # representative of each initial cluster
    active = np.ones(s, dtype=bool)
    pending = list(levels)  # descending
    snapshots: list[np.ndarray] = []
    merge_dist = np.empty(s - levels[-1], dtype=np.float64)
    n_active = s
    step = 0
    while True:
        while pending and n_active == pending[0]:
            snapshots.append(owner.copy())
            pending.pop(0)
        if not pending:
            break
        # Smallest bound; if it is exact it is the global minimum (every other row's minimum is >= its bound).
        while True:
            i = int(nn_d.argmin())
            j = int(nn[i])
            if active[j] and d2[i, j] == nn_d[i]:
                break
            j = int(d2[i].argmin())
            nn[i], nn_d[i] = j, d2[i, j]
        if j < i:
            i, j = j, i  # keep the smaller id as the representative
        merge_dist[step] = math.sqrt(d2[i, j])
        step += 1
        # New prototype = mean of all members = size-weighted mean of the two prototypes.
        proto[i] = (size[i] * proto[i] + size[j] * proto[j]) / (size[i] + size[j])
        size[i] += size[j]
        owner[owner == j] = i
        active[j] = False
        n_active -= 1
        d2[j, :] = np.inf
        d2[:, j] = np.inf
        nn_d[j] = np.inf
        act = np.flatnonzero(active)
        diff = proto[act] - proto[i]
        new = np.einsum("ij,ij->i", diff, diff)
        new[act == i] = np.inf
        d2[i, act] = new
        d2[act, i] = new
        # Removing j or moving i can only raise a row's minimum (its bound stays valid) unless the new cluster
        # is closer than the bound: then the new cluster is the exact minimum. Row i is exact.
        closer = new < nn_d[act]
        nn[act[closer]] = i
        nn_d[act[closer]] = new[closer]
        k = int(new.argmin())
        nn[i], nn_d[i] = act[k], new[k]
    return snapshots, merge_dist


def _group_sums(X: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-label float64 sums (G, F) and counts (G,) for labels in [0, G) that all occur."""
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    sums = np.add.reduceat(X[order], starts, axis=0, dtype=np.float64)  # float64 sums, no float64 copy of X
    return sums, counts.astype(np.int64)


def _inertia(X: np.ndarray, centers: np.ndarray, labels: np.ndarray, chunk: int = 65536) -> float:
    """Sum of squared distances of X (N, F) to centers[labels], in row chunks to bound memory."""
    total = 0.0
    for a in range(0, X.shape[0], chunk):
        d = X[a : a + chunk] - centers[labels[a : a + chunk]]
        total += float(np.einsum("ij,ij->", d, d))
    return total


# ---------------------------------------------------------------------- validation
def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _as_features(X) -> np.ndarray:
    """(N, F) finite float32 C-contiguous copy of X (numpy array or torch tensor)."""
    if isinstance(X, torch.Tensor):
        if X.is_complex() or X.dtype == torch.bool:
            raise TypeError(f"X must hold real numbers, got a torch tensor of dtype {X.dtype}")
        X = X.detach().to(device="cpu", dtype=torch.float32).numpy()
    else:
        X = np.asarray(X)
    if X.dtype == np.bool_ or not (np.issubdtype(X.dtype, np.floating) or np.issubdtype(X.dtype, np.integer)):
        raise TypeError(f"X must be a real-valued (float) array, got dtype {X.dtype}")
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (n_samples, n_features), got shape {X.shape}")
    if X.shape[0] < 1 or X.shape[1] < 1:
        raise ValueError(f"X must have at least one sample and one feature, got shape {X.shape}")
    X = np.ascontiguousarray(X, dtype=np.float32)
    if not np.isfinite(X).all():
        what = "NaN" if np.isnan(X).any() else "infinite values"
        raise ValueError(f"X contains {what} (or values too large for float32)")
    return X


def _check_levels(levels, n_samples: int) -> tuple[int, ...]:
    if _is_int(levels):
        levels = (levels,)
    try:
        levels = tuple(levels)
    except TypeError:
        raise TypeError(f"levels must be a sequence of ints, got {type(levels).__name__}") from None
    if not levels:
        raise ValueError("levels must contain at least one level size")
    for lv in levels:
        if not _is_int(lv):
            raise TypeError(f"hierarchy levels must be ints, got {lv!r} in {levels}")
    levels = tuple(int(lv) for lv in levels)
    if min(levels) < 1:
        raise ValueError(f"hierarchy levels must be positive, got {levels}")
    if any(a <= b for a, b in itertools.pairwise(levels)):
        raise ValueError(f"hierarchy levels must be strictly decreasing (finest first), got {levels}")
    if levels[0] > n_samples:
        raise ValueError(f"hierarchy level {levels[0]} is larger than the number of samples {n_samples}")
    return levels


# ---------------------------------------------------------------------- Eq. 17
def prototypes_on_manifold(
    prototypes,
    M: int,
    D: int,
    curvature,
    geometry: str | ModuleType = "lorentz",
) -> torch.Tensor:
    """Map tangent-space prototypes onto the product manifold, exp0 per subspace (Eq. 17).

    prototypes: (N_l, M*D) tangent vectors at the origin (numpy or torch; for the Lorentz model the time
    coordinate of each D-segment is ignored by exp0). curvature: positive float or tensor of shape (M,), one c
    per subspace (curvature -c); gradients flow to it, so the training loop can call this every step with the
    current curvature. geometry: "lorentz" / "hyperbolic" / "euclidean" or a geometry module.
    Returns (N_l, M, D) on the curvature's device, in the prototypes' float dtype (float32 for numpy float32).
    """
    from hihpq.geometry import get_geometry

    geo = get_geometry(geometry) if isinstance(geometry, str) else geometry
    if not (_is_int(M) and _is_int(D)) or M < 1 or D < 1:
        raise ValueError(f"M and D must be positive ints, got M={M!r}, D={D!r}")
    device = curvature.device if isinstance(curvature, torch.Tensor) else None
    e = prototypes if isinstance(prototypes, torch.Tensor) else torch.from_numpy(np.asarray(prototypes))
    if not e.is_floating_point():
        e = e.to(torch.float32)
    e = e.to(device) if device is not None else e
    if e.ndim != 2 or e.shape[1] != M * D:
        raise ValueError(f"prototypes must have shape (N_l, M*D) = (N_l, {M * D}), got {tuple(e.shape)}")
    if not isinstance(curvature, torch.Tensor) and not np.all(np.asarray(curvature) > 0):
        raise ValueError(f"curvature must be positive (curvature -c, c > 0), got {curvature!r}")
    c = torch.as_tensor(curvature, dtype=e.dtype, device=e.device)
    if c.ndim == 0:
        c = c.expand(M)
    if c.shape != (M,):
        raise ValueError(f"curvature must be a float or have shape (M,) = ({M},), got {tuple(c.shape)}")
    return geo.expmap0(e.reshape(-1, M, D), c=c.reshape(M, 1), dim=-1)
