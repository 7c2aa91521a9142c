"""Euclidean geometry with the interface of :mod:`hihpq.geometry.lorentz`, for the Euclidean twin of HiHPQ.

The curvature keyword ``c`` is accepted and ignored, so code written against one geometry runs on the other;
tangent space and manifold coincide, so the exp/log maps and the tangent projection are identities.
"""

from __future__ import annotations

import torch

from hihpq.geometry._guards import eps, full_precision

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


@full_precision
def inner(x: torch.Tensor, y: torch.Tensor, *, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Dot product."""
    return (x * y).sum(dim=dim, keepdim=keepdim)


@full_precision
def pairwise_inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Dot products of all pairs: (..., n, D) x (..., m, D) -> (..., n, m)."""
    return x @ y.transpose(-1, -2)


def origin(D: int, *, c=1.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """The zero vector, shape (D,) (or c.shape[:-1] + (D,) for a tensor c of shape (..., 1))."""
    c = torch.as_tensor(c)
    return torch.zeros(*(c.shape[:-1] if c.ndim else ()), D, dtype=dtype, device=device)


def proj_tan0(u: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Identity: every vector is tangent."""
    return u


def expmap0(v: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Identity."""
    return v


def logmap0(x: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Identity."""
    return x


def proj(x: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Identity: every vector is on the manifold."""
    return x


@full_precision
def sqdist(x: torch.Tensor, y: torch.Tensor, *, c=1.0, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Squared Euclidean distance."""
    d = x - y
    return (d * d).sum(dim=dim, keepdim=keepdim)


@full_precision
def dist(x: torch.Tensor, y: torch.Tensor, *, c=1.0, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Euclidean distance, with a finite gradient at x = y."""
    return sqdist(x, y, dim=dim, keepdim=keepdim).clamp_min(eps(x.dtype) ** 2).sqrt()


@full_precision
def pairwise_sqdist(x: torch.Tensor, y: torch.Tensor, *, c=1.0) -> torch.Tensor:
    """Squared distances between all pairs: (..., n, D) x (..., m, D) -> (..., n, m)."""
    x2 = (x * x).sum(-1, keepdim=True)
    y2 = (y * y).sum(-1, keepdim=True).transpose(-1, -2)
    return (x2 + y2 - 2.0 * pairwise_inner(x, y)).clamp_min(0.0)


@full_precision
def pairwise_dist(x: torch.Tensor, y: torch.Tensor, *, c=1.0) -> torch.Tensor:
    """Distances between all pairs, with a finite gradient at coincident points."""
    return pairwise_sqdist(x, y).clamp_min(eps(x.dtype) ** 2).sqrt()


@full_precision
def centroid(points: torch.Tensor, weights: torch.Tensor, *, c=1.0) -> torch.Tensor:
    """Weighted mean (the minimiser of sum_k w_k |c_k - mu|^2): points (..., K, D), weights (..., n, K)."""
    squeeze = weights.ndim == 1
    w = weights.unsqueeze(0) if squeeze else weights
    w = w.to(points.dtype)
    out = (w @ points) / w.sum(-1, keepdim=True).clamp_min(eps(points.dtype))
    return out.squeeze(-2) if squeeze else out
