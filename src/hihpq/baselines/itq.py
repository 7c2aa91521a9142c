"""Iterative Quantization (Gong & Lazebnik, CVPR 2011 / TPAMI 2013), searched by Hamming distance.

ITQ centres the features, projects them on the top ``bits`` principal directions (V = (X - mean) W), and
learns an orthogonal rotation R minimising the quantization loss ||B - V R||_F^2 over binary codes B in
{-1, +1}, by alternating B = sign(V R) and the orthogonal Procrustes solution R = U S^T where
V^T B = U Sigma S^T.
"""

from __future__ import annotations

import numpy as np

from hihpq.baselines._base import (
    BaseSearcher,
    check_features,
    check_int,
    fit_pca,
    limit_threads,
    topk_from_distances,
)

__all__ = ["ITQ", "hamming_distances"]

_BYTE_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], dtype=np.uint8)


def _as_words(packed: np.ndarray) -> np.ndarray:
    """Packed bytes (n, nb) as (n, ceil(nb / 8)) uint64 words (zero padding leaves Hamming counts alone)."""
    packed = np.ascontiguousarray(packed, dtype=np.uint8)
    pad = (-packed.shape[1]) % 8
    if pad:
        packed = np.pad(packed, ((0, 0), (0, pad)))
    return np.ascontiguousarray(packed).view(np.uint64)


def _popcount(x: np.ndarray) -> np.ndarray:
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0
        return np.bitwise_count(x)
    return _BYTE_POPCOUNT[x.view(np.uint8)].reshape(*x.shape, x.itemsize).sum(axis=-1, dtype=np.uint8)


def hamming_distances(a, b) -> np.ndarray:
    """Hamming distances between packed binary codes.

    Args:
        a: (n, nb) uint8 packed codes (as from ``np.packbits(bits, axis=1)``).
        b: (m, nb) uint8 packed codes with the same number of bytes.

    Returns:
        (n, m) int32 counts of differing bits.
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != np.uint8 or b.dtype != np.uint8 or a.ndim != 2 or b.ndim != 2:
        raise TypeError(f"expected 2-D uint8 packed codes, got {a.dtype} {a.shape} and {b.dtype} {b.shape}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"codes must have the same number of bytes, got {a.shape[1]} and {b.shape[1]}")
    wa, wb = _as_words(a), _as_words(b)
    out = np.zeros((len(wa), len(wb)), dtype=np.int32)
    for w in range(wa.shape[1]):  # one 64-bit word at a time keeps the temporaries (n, m)
        out += _popcount(wa[:, w, None] ^ wb[None, :, w])
    return out


class ITQ(BaseSearcher):
    """Iterative Quantization: PCA to ``bits`` dimensions, a learned rotation, sign bits, Hamming search.

    Args:
        bits: code length B (<= the feature dimension); codes take ceil(B / 8) bytes.
        n_iter: alternations between the codes and the rotation (50 in the ITQ paper).
        seed: seed of the random orthogonal initial rotation.
        n_threads: BLAS threads during fit/add/search/encode (None: leave the process's setting); see
            :func:`hihpq.baselines.limit_threads`.

    Attributes (after ``fit``):
        n_features_in_: input dimension d.
        mean_ (d,), components_ (bits, d): PCA, float64.
        rotation_ (bits, bits): learned orthogonal rotation, float64.
        losses_ (n_iter + 1,): mean quantization loss ||B - V R||^2 / n before each rotation update and at the
            end; non-increasing.

    ``encode`` returns (n, ceil(bits / 8)) uint8 codes packed by ``np.packbits`` (bit j of a code is 1 iff the
    j-th rotated projection is >= 0); ``search`` returns Hamming distances as float32, ties ordered by id.
    """

    def __init__(self, bits: int = 32, n_iter: int = 50, seed: int = 0, n_threads: int | None = None):
        self.bits = bits
        self.n_iter = n_iter
        self.seed = seed
        self.n_threads = n_threads

    def fit(self, X, y=None) -> ITQ:
        """Learn the PCA and the rotation from training features ``X`` (n, d); ``y`` is ignored."""
        x = check_features(X, "X")
        n, d = x.shape
        bits = check_int(self.bits, "bits", low=1, high=d)
        n_iter = check_int(self.n_iter, "n_iter", low=0)
        seed = check_int(self.seed, "seed", low=0)
        if n < 2:
            raise ValueError(f"ITQ needs at least 2 training samples, got {n}")
        with limit_threads(self._checked_n_threads()):
            self._fit(x, bits, n_iter, seed)
        self.n_features_in_ = d
        self._db: list[np.ndarray] = []
        return self

    def _fit(self, x: np.ndarray, bits: int, n_iter: int, seed: int) -> None:
        n = len(x)
        mean, comps, _ = fit_pca(x, bits)
        v = (x - mean.astype(np.float32)) @ comps.T.astype(np.float32)  # (n, bits): float32 keeps memory low
        v = v.astype(np.float64)
        rng = np.random.default_rng(seed)
        q, r = np.linalg.qr(rng.standard_normal((bits, bits)))
        rot = q * np.where(np.diag(r) < 0, -1.0, 1.0)
        losses = []
        for _ in range(n_iter):
            proj = v @ rot
            b = np.where(proj >= 0, 1.0, -1.0)
            losses.append(float(((b - proj) ** 2).sum() / n))
            # Orthogonal Procrustes: R = argmax tr(R^T V^T B) = U S^T with V^T B = U Sigma S^T.
            u, _, st = np.linalg.svd(v.T @ b)
            rot = u @ st
        proj = v @ rot
        losses.append(float(((np.where(proj >= 0, 1.0, -1.0) - proj) ** 2).sum() / n))
        self.mean_, self.components_, self.rotation_ = mean, comps, rot
        self.losses_ = np.asarray(losses)

    # ---- codes
    def project(self, X) -> np.ndarray:
        """Rotated PCA projections (n, bits) float32, whose signs (>= 0 -> 1) are the code bits."""
        self._check_fitted()
        x = self._check_input(X, "X")
        with limit_threads(self._checked_n_threads()):
            return self._project(x)

    def _project(self, x: np.ndarray) -> np.ndarray:
        w = (self.components_.T @ self.rotation_).astype(np.float32)  # (d, bits)
        return (x - self.mean_.astype(np.float32)) @ w

    def _encode(self, x: np.ndarray) -> np.ndarray:
        return np.packbits(self._project(x) >= 0, axis=1)

    @property
    def code_size(self) -> int:
        """Bytes per code: ceil(bits / 8)."""
        return (int(self.bits) + 7) // 8

    # ---- database
    def _database(self) -> np.ndarray:
        if len(self._db) > 1:
            self._db = [np.concatenate(self._db)]
        return self._db[0] if self._db else np.empty((0, self.code_size), np.uint8)

    def _add(self, x: np.ndarray) -> None:
        self._db.append(self._encode(x))

    def _ntotal(self) -> int:
        return sum(len(c) for c in self._db)

    def _reset(self) -> None:
        self._db = []

    def _search(self, q: np.ndarray, k: int):
        db = self._database()
        qc = self._encode(q)
        return topk_from_distances(lambda sl: hamming_distances(qc[sl], db), len(qc), len(db), k)
