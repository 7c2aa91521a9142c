"""Shared pieces of the baselines: input validation, the faiss-style search surface, PCA, faiss threads."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import faiss
import numpy as np
import scipy.linalg
from sklearn.base import BaseEstimator
from sklearn.exceptions import NotFittedError
from threadpoolctl import threadpool_limits  # installed with scikit-learn

from hihpq.metrics import rank

__all__ = ["BaseSearcher", "FewTrainingPointsWarning", "check_features", "fit_pca", "limit_threads"]

# Entries of an (n_queries, ntotal) distance block computed at once in the numpy searches.
_CHUNK_ENTRIES = 1 << 22


class FewTrainingPointsWarning(UserWarning):
    """Fewer training points than faiss recommends (39 per codeword) for k-means codebooks.

    The standard CIFAR-10 (II) protocol trains on 5,000 points, below 39 * 256: training still works,
    codebooks are just noisier. Filter this category to silence it (faiss's own stderr message is suppressed).
    """


def check_features(X, name: str = "X", *, n_features: int | None = None, owner: str = "") -> np.ndarray:
    """Validate a feature matrix and return it as C-contiguous float32 of shape (n, d).

    Raises TypeError for non-real dtypes, ValueError for a wrong shape, a dimension other than
    ``n_features`` or values that are not finite in float32.
    """
    arr = np.asarray(X)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must have shape (n_samples, n_features), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError(f"{name} has no feature columns (shape {arr.shape})")
    if n_features is not None and arr.shape[1] != n_features:
        raise ValueError(
            f"{name} has {arr.shape[1]} features, but {owner or 'this estimator'} was fitted with {n_features}"
        )
    out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise ValueError(f"{name} contains NaN or infinite values (or values beyond the float32 range)")
    return out


def check_int(value, name: str, *, low: int, high: int | None = None) -> int:
    """``value`` as an int in [low, high], else TypeError/ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return int(value)


@contextlib.contextmanager
def limit_threads(n_threads: int | None) -> Iterator[None]:
    """Run a block with at most ``n_threads`` threads in faiss (OpenMP) and in BLAS, then restore both.

    None leaves everything as it is. Both settings are process-wide while the block runs (faiss's
    ``omp_set_num_threads`` and threadpoolctl's BLAS limits affect every thread of the process); the
    previous values are restored on exit, errors included. On a machine shared with other busy processes,
    1 thread avoids OpenMP/OpenBLAS spin-wait stalls that can make 2-thread runs ten times slower.
    """
    if n_threads is None:
        yield
        return
    previous = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(int(n_threads))
    try:
        with threadpool_limits(limits=int(n_threads), user_api="blas"):
            yield
    finally:
        faiss.omp_set_num_threads(previous)


def fit_pca(X: np.ndarray, n_components: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PCA by eigen-decomposition of the float64 covariance (only the leading eigenpairs are computed).

    Args:
        X: (n, d) training features.
        n_components: number of leading components kept (<= d).

    Returns:
        mean (d,) float64, components (n_components, d) float64 with orthonormal rows sorted by decreasing
        variance (sign fixed so that each row's largest-magnitude entry is positive, for determinism), and the
        explained variances (n_components,).
    """
    n, d = X.shape
    mean = X.mean(axis=0, dtype=np.float64)
    cov = np.zeros((d, d))
    for start in range(0, n, 8192):  # float64 copies of 8192 rows at a time bound the memory
        xc = X[start : start + 8192].astype(np.float64) - mean
        cov += xc.T @ xc
    cov /= max(n - 1, 1)
    evals, evecs = scipy.linalg.eigh(cov, subset_by_index=[d - n_components, d - 1])
    comps = evecs[:, ::-1].T
    evals = evals[::-1]
    signs = np.sign(comps[np.arange(len(comps)), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    return mean, np.ascontiguousarray(comps), np.clip(evals, 0.0, None)


def _pad(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad (n, k') results to k columns with +inf / -1, faiss's "no result"."""
    n, have = I.shape
    if have == k:
        return D, I
    Dp = np.full((n, k), np.inf, dtype=np.float32)
    Ip = np.full((n, k), -1, dtype=np.int64)
    Dp[:, :have] = D
    Ip[:, :have] = I
    return Dp, Ip


def topk_from_distances(dist_fn, n_queries: int, ntotal: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by brute force: ``dist_fn(slice)`` gives the (c, ntotal) distances of a chunk of queries.

    Returns (D float32 (n, k), I int64 (n, k)) ordered by (distance, id), with k <= ntotal.
    """
    D = np.empty((n_queries, k), dtype=np.float32)
    I = np.empty((n_queries, k), dtype=np.int64)
    step = max(1, _CHUNK_ENTRIES // max(ntotal, 1))
    for start in range(0, n_queries, step):
        sl = slice(start, min(start + step, n_queries))
        dist = dist_fn(sl)
        ids = rank(dist, k)
        I[sl] = ids
        D[sl] = np.take_along_axis(dist, ids, axis=1)
    return D, I


class BaseSearcher(BaseEstimator):
    """Estimator with a faiss-like search surface.

    Subclasses implement ``fit`` (setting ``n_features_in_``), ``_encode(Xf32)``, ``_add(Xf32)``,
    ``_search(Qf32, k)`` for 1 <= k <= ntotal, ``_ntotal()``, ``_reset()``, ``code_size`` and ``bits``. A
    subclass with an ``n_threads`` argument gets encode/add/search run under :func:`limit_threads`.
    """

    # ---- faiss-like attributes
    @property
    def is_trained(self) -> bool:
        """True once ``fit`` has run."""
        return hasattr(self, "n_features_in_")

    @property
    def d(self) -> int:
        """Input dimension (faiss's ``d``)."""
        self._check_fitted()
        return int(self.n_features_in_)

    @property
    def ntotal(self) -> int:
        """Number of database items added so far."""
        return self._ntotal() if self.is_trained else 0

    def train(self, X) -> BaseSearcher:
        """faiss spelling of :meth:`fit`."""
        return self.fit(X)

    # ---- public surface
    def encode(self, X) -> np.ndarray:
        """Codes of ``X`` (n, d): see the subclass for their dtype and shape."""
        self._check_fitted()
        x = self._check_input(X, "X")
        with limit_threads(self._checked_n_threads()):
            return self._encode(x)

    def add(self, X) -> BaseSearcher:
        """Encode ``X`` (n, d) and append it to the database (ids continue from ``ntotal``); returns self."""
        self._check_fitted()
        x = self._check_input(X, "X")
        if len(x):
            with limit_threads(self._checked_n_threads()):
                self._add(x)
        return self

    def reset(self) -> None:
        """Remove every database item (the learned quantizer is kept)."""
        self._check_fitted()
        self._reset()

    def search(self, Q, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest database items of each query.

        Args:
            Q: (n, d) queries.
            k: number of results per query (>= 1).

        Returns:
            D (n, k) float32 distances ascending and I (n, k) int64 database ids; ties are ordered by id.
            When k > ntotal the rows are padded with D = +inf and I = -1.
        """
        self._check_fitted()
        k = check_int(k, "k", low=1)
        q = self._check_input(Q, "Q")
        kk = min(k, self.ntotal)
        if kk == 0 or len(q) == 0:
            return _pad(np.empty((len(q), 0), np.float32), np.empty((len(q), 0), np.int64), k)
        with limit_threads(self._checked_n_threads()):
            D, I = self._search(q, kk)
        return _pad(np.ascontiguousarray(D, dtype=np.float32), np.ascontiguousarray(I, dtype=np.int64), k)

    # ---- helpers
    def _check_fitted(self) -> None:
        if not self.is_trained:
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet: call fit(X) first")

    def _checked_n_threads(self) -> int | None:
        n_threads = getattr(self, "n_threads", None)
        return None if n_threads is None else check_int(n_threads, "n_threads", low=1)

    def _check_input(self, X, name: str) -> np.ndarray:
        return check_features(X, name, n_features=self.n_features_in_, owner=type(self).__name__)
