"""Lorentz (hyperboloid) model with constant curvature -c, c > 0 (paper Eq. 1-5, 10, 11).

Points x in R^D (D = d + 1, time coordinate first) satisfy <x, x>_L = -1/c; the origin is o = (1/sqrt(c), 0...).
All functions are pure, take the curvature as keyword ``c`` and the coordinate axis as ``dim`` (last by default),
and run in fp32 or fp64 even under autocast.

Curvature broadcasting: ``c`` is a positive float or a tensor that broadcasts against the input with the ``dim``
axis kept at size 1. For M subspaces of points shaped (N, M, D), pass c of shape (M, 1). Pairwise functions return
(..., n, m) and ``c`` must broadcast against that result, e.g. shape (M, 1, 1) for (M, n, D) x (M, m, D).
"""

from __future__ import annotations

import numpy as np
import torch

from hihpq.geometry._guards import (
    arcosh,
    as_curvature,
    asinhc,
    eps,
    full_precision,
    max_cosh_arg,
    safe_norm,
    sinhc,
)

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
    "to_poincare",
]


def _time_space(x: torch.Tensor, dim: int):
    return x.narrow(dim, 0, 1), x.narrow(dim, 1, x.size(dim) - 1)


@full_precision
def inner(x: torch.Tensor, y: torch.Tensor, *, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Minkowski inner product <x, y>_L = -x0 y0 + sum_i xi yi (Eq. 1)."""
    xy = x * y
    res = xy.sum(dim=dim, keepdim=True) - 2.0 * xy.narrow(dim, 0, 1)
    return res if keepdim else res.squeeze(dim)


@full_precision
def pairwise_inner(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """<x_i, y_j>_L for x (..., n, D) and y (..., m, D) -> (..., n, m), one matmul."""
    x_flip = torch.cat([-x[..., :1], x[..., 1:]], dim=-1)
    return x_flip @ y.transpose(-1, -2)


def origin(D: int, *, c=1.0, dtype=torch.float32, device=None) -> torch.Tensor:
    """The origin o = (1/sqrt(c), 0, ..., 0): shape (D,) for a scalar c, (..., D) for c of shape (..., 1)."""
    c = torch.as_tensor(c, dtype=dtype, device=device)
    c = c.reshape(1) if c.ndim == 0 else c
    o = torch.zeros(*c.shape[:-1], D, dtype=dtype, device=device)
    o[..., :1] = 1.0 / c.sqrt()
    return o


@full_precision
def proj_tan0(u: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Orthogonal projection of an ambient vector onto the tangent space at the origin (Eq. 4 with p = o).

    u + c o <o, u>_L simplifies to zeroing the time coordinate, whatever c is.
    """
    time, space = _time_space(u, dim)
    return torch.cat([torch.zeros_like(time), space], dim=dim)


@full_precision
def expmap0(v: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Exponential map at the origin (Eq. 5): tangent vector at o (time coordinate ignored) -> point on H_c.

    exp0(v) = (cosh(sqrt(c)|v|) / sqrt(c), sinh(sqrt(c)|v|) / (sqrt(c)|v|) * v_space).
    """
    c = as_curvature(c, v)
    sqrt_c = c.sqrt()
    _, space = _time_space(v, dim)
    n = safe_norm(space, dim=dim)
    # Cap sqrt(c)|v| so cosh cannot overflow; callers clip tangent norms far below this anyway.
    theta = (sqrt_c * n).clamp_max(max_cosh_arg(v.dtype))
    scale = sinhc(theta) * theta / (sqrt_c * n)  # = sinh(theta) / (sqrt(c)|v|), reduces to sinhc when uncapped
    time = torch.cosh(theta) / sqrt_c
    return torch.cat([time, scale * space], dim=dim)


@full_precision
def logmap0(x: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Logarithmic map at the origin, the inverse of :func:`expmap0`; returns a tangent vector (time = 0).

    Uses the space part only: |x_space| = sinh(sqrt(c) r) / sqrt(c) gives r through asinh, which is well
    conditioned near the origin where arcosh(sqrt(c) x0) is not.
    """
    c = as_curvature(c, x)
    sqrt_c = c.sqrt()
    time, space = _time_space(x, dim)
    n = safe_norm(space, dim=dim)
    scale = asinhc(sqrt_c * n)  # r / |x_space|
    return torch.cat([torch.zeros_like(time), scale * space], dim=dim)


@full_precision
def proj(x: torch.Tensor, *, c=1.0, dim: int = -1) -> torch.Tensor:
    """Put x back on H_c by recomputing its time coordinate from the space part: x0 = sqrt(1/c + |x_s|^2)."""
    c = as_curvature(c, x)
    _, space = _time_space(x, dim)
    time = torch.sqrt(1.0 / c + (space * space).sum(dim=dim, keepdim=True))
    return torch.cat([time, space], dim=dim)


@full_precision
def sqdist(x: torch.Tensor, y: torch.Tensor, *, c=1.0, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Squared Lorentzian distance |x - y|_L^2 = -2/c - 2 <x, y>_L (Eq. 10), clamped at 0 against rounding."""
    c = as_curvature(c, x)
    res = (-2.0 / c - 2.0 * inner(x, y, dim=dim, keepdim=True)).clamp_min(0.0)
    return res if keepdim else res.squeeze(dim)


@full_precision
def dist(x: torch.Tensor, y: torch.Tensor, *, c=1.0, dim: int = -1, keepdim: bool = False) -> torch.Tensor:
    """Geodesic distance d(x, y) = arcosh(-c <x, y>_L) / sqrt(c) (Eq. 2)."""
    c = as_curvature(c, x)
    res = arcosh(-c * inner(x, y, dim=dim, keepdim=True)) / c.sqrt()
    return res if keepdim else res.squeeze(dim)


@full_precision
def pairwise_sqdist(x: torch.Tensor, y: torch.Tensor, *, c=1.0) -> torch.Tensor:
    """Squared Lorentzian distances between all pairs: x (..., n, D), y (..., m, D) -> (..., n, m)."""
    c = as_curvature(c, x)
    return (-2.0 / c - 2.0 * pairwise_inner(x, y)).clamp_min(0.0)


@full_precision
def pairwise_dist(x: torch.Tensor, y: torch.Tensor, *, c=1.0) -> torch.Tensor:
    """Geodesic distances between all pairs: x (..., n, D), y (..., m, D) -> (..., n, m)."""
    c = as_curvature(c, x)
    return arcosh(-c * pairwise_inner(x, y)) / c.sqrt()


@full_precision
def centroid(points: torch.Tensor, weights: torch.Tensor, *, c=1.0) -> torch.Tensor:
    """Weighted Lorentzian centroid (Eq. 11), the minimiser of sum_k w_k |c_k - mu|_L^2 over mu on H_c.

    points (..., K, D) on H_c; weights (..., n, K) non-negative, not all zero -> (..., n, D).
    A 1-D ``weights`` of shape (K,) gives a single centroid of shape (..., D).
    s = sum_k w_k c_k is time-like, and s / (sqrt(c) |<s, s>_L|^(1/2)) is its projection onto H_c.
    """
    c = as_curvature(c, points)
    squeeze = weights.ndim == 1
    w = weights.unsqueeze(0) if squeeze else weights
    s = w.to(points.dtype) @ points
    s_norm = inner(s, s, keepdim=True).abs().clamp_min(eps(s.dtype)).sqrt()
    out = s / (c.sqrt() * s_norm)
    return out.squeeze(-2) if squeeze else out


def to_poincare(x, c=1.0, *, unit: bool = True) -> np.ndarray:
    """Lorentz (hyperboloid) points -> Poincare ball.

    The ball of curvature -c has radius 1/sqrt(c): p = x_space / (1 + sqrt(c) x0). Rescaled by sqrt(c) to the
    unit ball this is p = x_space / (x0 + 1/sqrt(c)), which is what ``unit=True`` returns (so that formula is
    already the unit disk: rescaling it once more by sqrt(c) would overshoot for c > 1).

    Args:
        x: (..., D) points on the hyperboloid <x, x>_L = -1/c (time coordinate first), numpy or torch.
        c: curvature c > 0 (curvature -c), a float or an array broadcasting against (..., 1).
        unit: the unit ball (default) or the ball of radius 1/sqrt(c).

    Returns:
        (..., D - 1) float64. The origin maps to 0; a point at geodesic distance r from the origin lands at
        radius tanh(sqrt(c) r / 2) in the unit ball, strictly inside it.
    """
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim < 1 or x.shape[-1] < 2:
        raise ValueError(f"x must have shape (..., D) with D >= 2 (time coordinate first), got {x.shape}")
    if isinstance(c, torch.Tensor):
        c = c.detach().cpu().numpy()
    c = np.asarray(c, dtype=np.float64)
    if not np.all(c > 0):
        raise ValueError(f"curvature c must be positive (curvature -c), got {c}")
    if not np.isfinite(x).all():
        raise ValueError("x contains NaN or infinite values")
    if np.any(x[..., 0] <= 0):
        raise ValueError("x must lie on the upper sheet of the hyperboloid (time coordinate x0 > 0)")
    p = x[..., 1:] / (x[..., :1] + 1.0 / np.sqrt(c))
    # Far-out points round to norm 1 in float64 (sqrt(c) r > ~37); keep them drawable inside the disk.
    n = np.linalg.norm(p, axis=-1, keepdims=True)
    p = p * np.minimum(1.0, (1.0 - 1e-12) / np.maximum(n, 1e-300))
    return p if unit else p / np.sqrt(c)
