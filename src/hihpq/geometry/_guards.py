"""Numerical guards shared by the geometry modules.

Every guard has a name so that the geometry code reads as the paper's equations; nothing here asserts.
"""

from __future__ import annotations

import functools

import torch

# Smallest norm treated as non-zero, and the largest argument given to cosh/sinh. Both depend on the dtype:
# fp32 loses <x, x>_L = -1/c to rounding long before cosh overflows, fp64 has far more head-room.
_EPS = {torch.float32: 1e-7, torch.float64: 1e-15}
_MAX_COSH_ARG = {torch.float32: 40.0, torch.float64: 300.0}
_SMALL = {torch.float32: 1e-3, torch.float64: 1e-5}


def eps(dtype: torch.dtype) -> float:
    """Smallest quantity treated as non-zero for ``dtype`` (fp32 or fp64)."""
    return _EPS.get(dtype, 1e-7)


def max_cosh_arg(dtype: torch.dtype) -> float:
    """Largest argument passed to cosh/sinh for ``dtype``, far below overflow."""
    return _MAX_COSH_ARG.get(dtype, 40.0)


def safe_norm(x: torch.Tensor, dim: int = -1, keepdim: bool = True) -> torch.Tensor:
    """Euclidean norm with a finite gradient at zero (the norm is clamped away from zero)."""
    sq = (x * x).sum(dim=dim, keepdim=keepdim)
    return sq.clamp_min(eps(x.dtype) ** 2).sqrt()


def arcosh(x: torch.Tensor) -> torch.Tensor:
    """arcosh with its argument clamped to >= 1 + eps, so the value and its gradient stay finite.

    Written as log1p((x - 1) + sqrt(x - 1) sqrt(x + 1)): the textbook log(x + sqrt(x^2 - 1)) overflows once
    x^2 does (x ~ 1e19 in fp32, reached by points at the cosh cap) and loses relative precision just above 1
    (up to 1e-4 in fp32); this form is accurate to rounding over the whole range.
    """
    x = x.clamp_min(1.0 + eps(x.dtype))
    return torch.log1p((x - 1.0) + torch.sqrt(x - 1.0) * torch.sqrt(x + 1.0))


def sinhc(x: torch.Tensor) -> torch.Tensor:
    """sinh(x) / x for x >= 0, exact at 0 (Taylor branch for small x keeps the gradient smooth)."""
    small = x < _SMALL.get(x.dtype, 1e-3)
    xs = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 + x * x / 6.0, torch.sinh(xs) / xs)


def asinhc(x: torch.Tensor) -> torch.Tensor:
    """asinh(x) / x for x >= 0, exact at 0."""
    small = x < _SMALL.get(x.dtype, 1e-3)
    xs = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 - x * x / 6.0, torch.asinh(xs) / xs)


def as_curvature(c, like: torch.Tensor) -> torch.Tensor:
    """Curvature as a tensor of ``like``'s dtype and device. c is the positive number in curvature -c."""
    if not isinstance(c, torch.Tensor):
        # Straight to like's dtype: going through torch's default fp32 would round a Python float such as 0.05
        # and put fp64 points off the manifold by ~1e-8.
        return torch.as_tensor(c, dtype=like.dtype, device=like.device)
    return c.to(dtype=like.dtype, device=like.device)


def _upcast(t):
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        return t.float()
    return t


def full_precision(fn):
    """Evaluate ``fn`` in fp32/fp64 even under autocast: half inputs are upcast and autocast is switched off.

    Lorentz inner products of points far from the origin cancel catastrophically in fp16/bf16.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        args = tuple(_upcast(a) for a in args)
        kwargs = {k: _upcast(v) for k, v in kwargs.items()}
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if torch.is_autocast_enabled(device):
            with torch.autocast(device_type=device, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper
