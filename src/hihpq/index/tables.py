"""Distance tables for product-quantized search, in numpy float64 (stored float32 by the index).

* :func:`query_tables`: per query and subspace, the distance from the query's segment to each of the K
  codewords -- the lookup tables of asymmetric distance (ADC, Eq. 8 with the query un-quantized).
* :func:`codeword_tables`: per subspace, the K x K distances between codewords -- symmetric distance (SDC).

Lorentz (curvature -c, c > 0): d(x, y) = arcosh(-c <x, y>_L) / sqrt(c) with <x, y>_L = -x0 y0 + sum_i xi yi
(Eq. 2).
Euclidean twin: d(x, y) = |x - y| per subspace (not squared: the product distance is the sum of the M
subspace distances in both geometries, Eq. 8).
Cosine (MeCoQ-style counterpart): d(x, y) = 1 - cos(x, y) per subspace, both normalised, so the product distance
is M minus the sum of the subspace cosines and ranking by it ranks by the summed cosine score.
"""

from __future__ import annotations

import numpy as np

__all__ = ["GEOMETRIES", "check_on_manifold", "codeword_tables", "query_tables"]

GEOMETRIES = ("lorentz", "euclidean", "cosine")
_CHUNK = 4096  # queries per block: bounds the (M, n, K) float64 temporaries to ~32 MB at M = 4, K = 256


def _lift(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """x (M, n, D) -> float64 points exactly on H_c: x0 recomputed from the space part (lorentz.proj).

    Float32 points are off the manifold by ~1e-7 relative, and arcosh(-c <x, y>_L) turns an error e in its
    argument near 1 into a distance error sqrt(2 e): 4e-4 for nearby points. Lifted in float64 the floor is
    ~1e-8, so near-duplicates rank by their true distance and a codeword is at distance ~0 from itself.
    """
    x = np.array(x, np.float64)
    x[..., 0] = np.sqrt(1.0 / c[:, None] + np.einsum("mnd,mnd->mn", x[..., 1:], x[..., 1:]))
    return x


def _lorentz_dist(x: np.ndarray, C: np.ndarray, c: np.ndarray) -> np.ndarray:
    """x (M, n, D), C (M, K, D), c (M,) -> (M, n, K) geodesic distances, float64."""
    xf = _lift(x, c)
    C = _lift(C, c)
    xf[..., 0] = -xf[..., 0]
    inner = np.matmul(xf, C.transpose(0, 2, 1))  # <x, y>_L
    arg = np.maximum(-c[:, None, None] * inner, 1.0)  # >= 1 on the manifold; rounding can dip below
    return np.arccosh(arg) / np.sqrt(c)[:, None, None]


def _euclid_dist(x: np.ndarray, C: np.ndarray) -> np.ndarray:
    """x (M, n, D), C (M, K, D) -> (M, n, K) Euclidean distances, float64."""
    sq = (
        np.einsum("mnd,mnd->mn", x, x)[:, :, None]
        + np.einsum("mkd,mkd->mk", C, C)[:, None, :]
        - 2.0 * np.matmul(x, C.transpose(0, 2, 1))
    )
    return np.sqrt(np.maximum(sq, 0.0))


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-300)


def _cosine_dist(x: np.ndarray, C: np.ndarray) -> np.ndarray:
    """x (M, n, D), C (M, K, D) -> (M, n, K) cosine distances 1 - cos, float64."""
    return 1.0 - np.matmul(_unit(x), _unit(C).transpose(0, 2, 1))


def _pairwise(geometry: str, x: np.ndarray, C: np.ndarray, c: np.ndarray) -> np.ndarray:
    if geometry == "lorentz":
        return _lorentz_dist(x, C, c)
    if geometry == "cosine":
        return _cosine_dist(x, C)
    return _euclid_dist(x, C)


def query_tables(x: np.ndarray, codebooks: np.ndarray, curvatures: np.ndarray, geometry: str) -> np.ndarray:
    """ADC lookup tables: x (n, M, D) points, codebooks (M, K, D), curvatures (M,) -> (n, M, K) float64."""
    x = np.asarray(x, np.float64)
    C = np.asarray(codebooks, np.float64)
    c = np.asarray(curvatures, np.float64)
    n, M, _ = x.shape
    out = np.empty((n, M, C.shape[1]), np.float64)
    for s in range(0, n, _CHUNK):
        xs = x[s : s + _CHUNK].transpose(1, 0, 2)  # (M, b, D)
        out[s : s + _CHUNK] = _pairwise(geometry, xs, C, c).transpose(1, 0, 2)
    return out


def codeword_tables(codebooks: np.ndarray, curvatures: np.ndarray, geometry: str) -> np.ndarray:
    """SDC tables: (M, K, K) float64 distances between the codewords of each subspace, exactly symmetric
    with a zero diagonal."""
    C = np.asarray(codebooks, np.float64)
    T = _pairwise(geometry, C, C, np.asarray(curvatures, np.float64))
    T = 0.5 * (T + T.transpose(0, 2, 1))
    idx = np.arange(C.shape[1])
    T[:, idx, idx] = 0.0
    return T


def check_on_manifold(x: np.ndarray, curvatures: np.ndarray, geometry: str, *, what: str, tol: float = 1e-3) -> None:
    """Raise ValueError unless each segment of x (n, M, D) lies on its Lorentz manifold, or, for the cosine
    geometry, has a direction (a zero segment has no cosine); a no-op for Euclidean.

    <x, x>_L = -1/c with x0 > 0, up to a relative tolerance that accepts float32-rounded points (the error of
    c <x, x>_L grows like c x0^2) but rejects a wrong curvature or tangent vectors passed as points.
    """
    if geometry == "cosine" and x.size:
        norms = np.linalg.norm(np.asarray(x, np.float64), axis=-1)
        if not (norms > 0).all():
            row, m = np.argwhere(~(norms > 0))[0]
            raise ValueError(
                f"{what} have a zero segment (segment {m} of row {row}): the cosine geometry scores directions, "
                "so every segment needs a nonzero norm (pass the quantizer's embed() output)"
            )
        return
    if geometry != "lorentz" or x.size == 0:
        return
    x = np.asarray(x, np.float64)
    c = np.asarray(curvatures, np.float64)[None, :]
    x0 = x[..., 0]
    lin = -x0 * x0 + np.einsum("nmd,nmd->nm", x[..., 1:], x[..., 1:])
    err = np.abs(c * lin + 1.0) / (1.0 + c * x0 * x0)
    bad = (err > tol) | (x0 <= 0)
    if bad.any():
        row, m = np.argwhere(bad)[0]
        raise ValueError(
            f"{what} are not on the Lorentz manifold: segment {m} of row {row} has c <x, x>_L = "
            f"{c[0, m] * lin[row, m]:.6g} (expected -1 with c = {c[0, m]:.6g}) and x0 = {x0[row, m]:.6g} "
            f"(expected > 0); {int(bad.sum())} of {bad.size} segments are off. Pass points on the manifold "
            "(e.g. the quantizer's embed() output) with the index's curvatures."
        )
