"""Cosine geometry (MeCoQ, Wang et al. AAAI 2022): the Euclidean counterpart of HiHPQ in the paper's Table 2.

Each subspace is the unit sphere: sub-vectors are intra-normalised, codewords are unit vectors, soft assignment
is softmax over inner products / tau and retrieval scores by cosine. The interface is that of
:mod:`hihpq.geometry.lorentz`, so the quantizer, the losses and the hierarchy run on it unchanged:

* ``expmap0`` / ``proj`` normalise (the features "ahead of the quantizer" are the raw sub-vectors, MeCoQ's
  intra-normalisation is the map onto the sphere); ``proj_tan0`` and ``logmap0`` are identities.
* ``dist`` = ``sqdist`` = 1 - cos(x, y) (the cosine distance; both arguments are normalised, so the
  soft-quantized vectors, which are convex combinations of unit codewords and shorter than 1, are scored by
  their direction as MeCoQ does). For unit vectors 1 - cos = |x - y|^2 / 2, so softmax(-sqdist / tau) is
  softmax(<x, c_k> / tau), MeCoQ's assignment with alpha = 1 / tau, and the nearest codeword is the argmax of
  the inner products. The product distance sums 1 - cos over subspaces (Eq. 8's form), M minus the sum of the
  subspace cosines.
* ``centroid`` is the weighted sum of the codewords (MeCoQ's soft reconstruction), not renormalised.

The curvature keyword ``c`` is accepted and ignored.
"""

from __future__ import annotations

import torch

from hihpq.geometry._guards import eps, full_precision, safe_norm
from hihpq.geometry.euclidean import inner, pairwise_inner  # the same dot products

__all__ = [
    "centroid",
    "dist",
    "expmap0",
    "inner",
    "logmap0",
    "origin",
    "pairwise_dist",
    "pairwise_inner",
    "pairwise_sqdist",
    "proj",
    "proj_tan0",
    "sqdist",
]


def _unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """x / |x| along ``dim``; a zero vector stays zero (its cosine with anything is 0)."""
    return x / safe_norm(x, dim=dim, keepdim=True)


def origin(D: int, *, c=1.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """The first basis vector (a fixed point of the sphere), shape (D,) or c.shape[:-1] + (D,)."""
    c = torch.as_tensor(c)
    o = torch.zeros(*(c.shape[:-1] if c.ndim else ()), D, dtype=dtype, device=device)
    o[..., 0] = 1.0
    return o


def proj_tan0(u: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Identity: the raw sub-vectors are the features ahead of the quantizer (what the hierarchy clusters)."""
    return u


@full_precision
def expmap0(v: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Intra-normalisation: v / |v| per subspace."""
    return _unit(v, dim)


def logmap0(x: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Identity (a unit vector is its own feature)."""
    return x


@full_precision
def proj(x: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Onto the unit sphere."""
    return _unit(x, dim)


@full_precision
def sqdist(x: torch.Tensor, y: torch.Tensor, *, c=1.0, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """1 - cos(x, y) (= |x - y|^2 / 2 for unit vectors)."""
    return 1.0 - (_unit(x, dim) * _unit(y, dim)).sum(dim=dim, keepdim=keepdim)


@full_precision
def dist(x: torch.Tensor, y: torch.Tensor, *, c=1.0, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Cosine distance 1 - cos(x, y), in [0, 2]."""
    return sqdist(x, y, dim=dim, keepdim=keepdim)


@full_precision
def pairwise_sqdist(x: torch.Tensor, y: torch.Tensor, *, c=1.0) -> torch.Tensor:
    """1 - cos of all pairs: (..., n, D) x (..., m, D) -> (..., n, m)."""
    return 1.0 - _unit(x) @ _unit(y).transpose(-1, -2)


@full_precision
def pairwise_dist(x: torch.Tensor, y: torch.Tensor, *, c=1.0) -> torch.Tensor:
    """Cosine distances of all pairs."""
    return pairwise_sqdist(x, y)


@full_precision
def centroid(points: torch.Tensor, weights: torch.Tensor, *, c=1.0) -> torch.Tensor:
    """Weighted mean of the codewords (MeCoQ's soft reconstruction): points (..., K, D), weights (..., n, K)."""
    squeeze = weights.ndim == 1
    w = weights.unsqueeze(0) if squeeze else weights
    w = w.to(points.dtype)
    out = (w @ points) / w.sum(-1, keepdim=True).clamp_min(eps(points.dtype))
    return out.squeeze(-2) if squeeze else out
