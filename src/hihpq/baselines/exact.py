"""Exact search on raw float features by cosine distance: the "uncompressed features" reference row."""

from __future__ import annotations

import numpy as np

from hihpq.baselines._base import BaseSearcher, check_features, topk_from_distances

__all__ = ["FloatCosine"]


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows of ``x`` (n, d) scaled to unit L2 norm, float32; all-zero rows stay zero (cosine 0 to all)."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x / np.maximum(norms, np.finfo(np.float32).tiny), dtype=np.float32)


class FloatCosine(BaseSearcher):
    """Exhaustive search of L2-normalised float32 features by cosine distance 1 - cos(q, x).

    Nothing is learned: ``fit`` only records the dimension (``add`` before ``fit`` is refused, as for the
    quantizers, so that every baseline is driven the same way). ``encode`` returns the normalised float32
    features (n, d); ``code_size`` is 4 d bytes and ``bits`` 32 d. Ties are ordered by id.

    Args:
        n_threads: BLAS threads during add/search/encode (None: leave the process's setting); see
            :func:`hihpq.baselines.limit_threads`.
    """

    def __init__(self, n_threads: int | None = None):
        self.n_threads = n_threads

    def fit(self, X, y=None) -> FloatCosine:
        """Record the feature dimension of ``X`` (n, d); ``y`` is ignored."""
        x = check_features(X, "X")
        self._checked_n_threads()
        self.n_features_in_ = x.shape[1]
        self._db: list[np.ndarray] = []
        return self

    @property
    def code_size(self) -> int:
        """Bytes per stored vector (float32)."""
        return 4 * self.d

    @property
    def bits(self) -> int:
        """Bits per stored vector (float32)."""
        return 32 * self.d

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return l2_normalize(x)

    def _database(self) -> np.ndarray:
        if len(self._db) > 1:
            self._db = [np.concatenate(self._db)]
        return self._db[0] if self._db else np.empty((0, self.n_features_in_), np.float32)

    def _add(self, x: np.ndarray) -> None:
        self._db.append(l2_normalize(x))

    def _ntotal(self) -> int:
        return sum(len(c) for c in self._db)

    def _reset(self) -> None:
        self._db = []

    def _search(self, q: np.ndarray, k: int):
        db = self._database()
        qn = l2_normalize(q)
        return topk_from_distances(lambda sl: 1.0 - qn[sl] @ db.T, len(qn), len(db), k)
