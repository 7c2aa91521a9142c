"""Geometry checks: the Lorentz model against an independent Poincare-ball implementation written in numpy,
identities over seeds x dtypes with per-dtype tolerances, gradients, autocast, and the Euclidean twin."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hihpq.geometry import euclidean, get_geometry, lorentz

CURVATURES = [0.05, 0.2, 1.0, 2.5, 5.0]
DTYPES = [torch.float32, torch.float64]
SEEDS = [0, 1, 2]
GEOMETRIES = [lorentz, euclidean]

# Per-dtype tolerances of identities that should hold to rounding (relative to the size of the quantities).
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tangent(n: int, D: int, *, max_norm: float, dtype, seed: int) -> torch.Tensor:
    """n tangent vectors at the origin (time coordinate 0) with norms spread uniformly in [0, max_norm]."""
    g = _gen(seed)
    v = torch.randn(n, D, generator=g, dtype=torch.float64)
    v[:, 0] = 0.0
    v = v / v.norm(dim=-1, keepdim=True) * torch.rand(n, 1, generator=g, dtype=torch.float64) * max_norm
    return v.to(dtype)


def _points(geo, n: int, D: int, *, c: float, max_norm: float, dtype, seed: int) -> torch.Tensor:
    return geo.expmap0(_tangent(n, D, max_norm=max_norm, dtype=dtype, seed=seed), c=c)


# ----------------------------------------------------------------------------------------------------------
# Independent reference: the Poincare ball of radius 1/sqrt(c), numpy float64, written from its own formulas.
# ----------------------------------------------------------------------------------------------------------


def _np_hyperboloid_from_space(xs: np.ndarray, c: float) -> np.ndarray:
    """Lift space coordinates onto the hyperboloid: x0 = sqrt(1/c + |xs|^2)."""
    x0 = np.sqrt(1.0 / c + np.sum(xs * xs, axis=-1, keepdims=True))
    return np.concatenate([x0, xs], axis=-1)


def _np_to_ball(x: np.ndarray, c: float) -> np.ndarray:
    """Hyperboloid -> Poincare ball (stereographic projection from (-1/sqrt c, 0))."""
    return x[..., 1:] / (1.0 + math.sqrt(c) * x[..., :1])


def _np_from_ball(p: np.ndarray, c: float) -> np.ndarray:
    """Poincare ball -> hyperboloid."""
    p2 = np.sum(p * p, axis=-1, keepdims=True)
    den = 1.0 - c * p2
    return np.concatenate([(1.0 + c * p2) / (math.sqrt(c) * den), 2.0 * p / den], axis=-1)


def _np_ball_dist(x: np.ndarray, y: np.ndarray, c: float) -> np.ndarray:
    """Geodesic distance through the Poincare ball formula: arcosh(1 + 2c|p-q|^2 / ((1-c|p|^2)(1-c|q|^2)))."""
    p, q = _np_to_ball(x, c), _np_to_ball(y, c)
    num = 2.0 * c * np.sum((p - q) ** 2, axis=-1)
    den = (1.0 - c * np.sum(p * p, axis=-1)) * (1.0 - c * np.sum(q * q, axis=-1))
    return np.arccosh(1.0 + num / den) / math.sqrt(c)


def _np_ball_expmap0(v_space: np.ndarray, c: float) -> np.ndarray:
    """exp at the origin through the ball: p = tanh(sqrt(c)|v|/2) v / (sqrt(c)|v|), lifted to H_c."""
    n = np.linalg.norm(v_space, axis=-1, keepdims=True)
    p = np.tanh(math.sqrt(c) * n / 2.0) * v_space / (math.sqrt(c) * n)
    return _np_from_ball(p, c)


def _np_ball_logmap0(x: np.ndarray, c: float) -> np.ndarray:
    """log at the origin through the ball: v = 2 artanh(sqrt(c)|p|) p / (sqrt(c)|p|) (space part)."""
    p = _np_to_ball(x, c)
    n = np.linalg.norm(p, axis=-1, keepdims=True)
    return 2.0 * np.arctanh(math.sqrt(c) * n) * p / (math.sqrt(c) * n)


def _np_minkowski_sqnorm_of_difference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """|x - y|_L^2 = <x - y, x - y>_L computed from the difference (no -2/c - 2<x, y> cancellation)."""
    d = x - y
    return -(d[..., 0] ** 2) + np.sum(d[..., 1:] ** 2, axis=-1)


def _np_random_points(n: int, D: int, c: float, seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Log-uniform radii so that near, middle and far points all occur.
    xs = rng.standard_normal((n, D - 1))
    radii = np.exp(rng.uniform(np.log(1e-3), np.log(scale), size=(n, 1)))
    xs *= radii / np.linalg.norm(xs, axis=1, keepdims=True)
    return _np_hyperboloid_from_space(xs / math.sqrt(c), c)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("c", CURVATURES)
def test_distances_match_poincare_ball_reference(c, seed):
    x_np = _np_random_points(40, 6, c, seed, scale=20.0)
    y_np = _np_random_points(40, 6, c, seed + 100, scale=20.0)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)

    ref = _np_ball_dist(x_np, y_np, c)
    np.testing.assert_allclose(lorentz.dist(x, y, c=c).numpy(), ref, rtol=1e-5)
    ref_pair = _np_ball_dist(x_np[:, None, :], y_np[None, :, :], c)
    np.testing.assert_allclose(lorentz.pairwise_dist(x, y, c=c).numpy(), ref_pair, rtol=1e-5)

    # Squared Lorentzian distance, and the identity d = arcosh(1 + c |x - y|_L^2 / 2) / sqrt(c).
    sq_ref = _np_minkowski_sqnorm_of_difference(x_np, y_np)
    np.testing.assert_allclose(lorentz.sqdist(x, y, c=c).numpy(), sq_ref, rtol=1e-5)
    np.testing.assert_allclose(np.arccosh(1.0 + c * sq_ref / 2.0) / math.sqrt(c), ref, rtol=1e-5)
    sq_pair = _np_minkowski_sqnorm_of_difference(x_np[:, None, :], y_np[None, :, :])
    np.testing.assert_allclose(lorentz.pairwise_sqdist(x, y, c=c).numpy(), sq_pair, rtol=1e-5)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("c", CURVATURES)
def test_exp_and_log_maps_match_poincare_ball_reference(c, seed):
    rng = np.random.default_rng(seed)
    v_space = rng.standard_normal((50, 7))
    # Tangent norms from 1e-4 to ~8 / sqrt(c) (hyperbolic radius up to 8), all below the cosh cap.
    v_space *= np.exp(rng.uniform(np.log(1e-4), np.log(8.0), size=(50, 1))) / (
        math.sqrt(c) * np.linalg.norm(v_space, axis=1, keepdims=True)
    )
    v = torch.from_numpy(np.concatenate([np.zeros((50, 1)), v_space], axis=1))

    ref = _np_ball_expmap0(v_space, c)
    x = lorentz.expmap0(v, c=c)
    np.testing.assert_allclose(x.numpy(), ref, rtol=1e-5, atol=1e-12)

    np.testing.assert_allclose(lorentz.logmap0(x, c=c).numpy()[:, 1:], _np_ball_logmap0(ref, c), rtol=1e-5)
    np.testing.assert_array_equal(lorentz.logmap0(x, c=c).numpy()[:, 0], 0.0)


@settings(max_examples=60, deadline=None)
@given(
    c=st.floats(0.05, 5.0),
    r=st.floats(1e-6, 6.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_distance_from_origin_is_tangent_norm(c, r, seed):
    """d(o, exp0(v)) = |v| for every curvature and radius, and matches the ball reference."""
    v = _tangent(1, 5, max_norm=1.0, dtype=torch.float64, seed=seed)
    v = v / v.norm() * (r / math.sqrt(c))
    x = lorentz.expmap0(v, c=c)
    o = lorentz.origin(5, c=c, dtype=torch.float64)
    d = lorentz.dist(o, x[0], c=c)
    assert d.item() == pytest.approx(r / math.sqrt(c), rel=1e-5, abs=1e-7 / math.sqrt(c))
    if r > 1e-3:  # below this the reference's own arccosh loses the digits
        ref = _np_ball_dist(o.numpy(), x[0].numpy(), c)
        assert d.item() == pytest.approx(float(ref), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Identities over seeds x dtypes x curvatures
# ----------------------------------------------------------------------------------------------------------


def _assert_on_manifold(x: torch.Tensor, c, dtype) -> None:
    c_t = torch.as_tensor(c, dtype=x.dtype)
    residual = (c_t * lorentz.inner(x, x, keepdim=True) + 1.0).abs()
    scale = (c_t * x[..., :1] ** 2).clamp_min(1.0)  # rounding error grows with the size of x0^2
    assert torch.all(residual <= 4 * TOL[dtype] * scale), residual.max()
    assert torch.all(x[..., 0] > 0), "points must lie on the upper sheet"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CURVATURES)
def test_points_stay_on_manifold(c, dtype, seed):
    x = _points(lorentz, 64, 9, c=c, max_norm=6.0 / math.sqrt(c), dtype=dtype, seed=seed)
    assert x.dtype == dtype
    _assert_on_manifold(x, c, dtype)

    g = _gen(seed + 7)
    off = torch.randn(64, 9, generator=g, dtype=dtype) * 3.0
    _assert_on_manifold(lorentz.proj(off, c=c), c, dtype)
    _assert_on_manifold(lorentz.origin(9, c=c, dtype=dtype), c, dtype)

    w = torch.rand(5, 64, generator=g, dtype=dtype)
    _assert_on_manifold(lorentz.centroid(x, w, c=c), c, dtype)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", CURVATURES)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.__name__.rsplit(".", 1)[-1])
def test_exp_log_invert(geo, c, dtype, seed):
    v = _tangent(64, 9, max_norm=5.0 / math.sqrt(c), dtype=dtype, seed=seed)
    x = geo.expmap0(v, c=c)
    back = geo.logmap0(x, c=c)
    scale = 1.0 + v.norm(dim=-1, keepdim=True)
    assert torch.all((back - v).abs() <= 10 * TOL[dtype] * scale)

    again = geo.expmap0(back, c=c)
    assert torch.all((again - x).abs() <= 10 * TOL[dtype] * (1.0 + x.abs()))

    # proj_tan0 is idempotent and a tangent vector at the origin has time coordinate 0 (Lorentz).
    u = torch.randn(10, 9, generator=_gen(seed), dtype=dtype)
    t = geo.proj_tan0(u, c=c)
    torch.testing.assert_close(geo.proj_tan0(t, c=c), t)
    if geo is lorentz:
        assert torch.all(t[:, 0] == 0) and torch.equal(t[:, 1:], u[:, 1:])
        o = lorentz.origin(9, c=c, dtype=dtype)
        assert torch.allclose(lorentz.inner(t, o.expand_as(t)), torch.zeros((), dtype=dtype))


def _diag_tolerance(geo, x: torch.Tensor, c: float, dtype) -> float:
    """How far from 0 d(x, x) may come out of the one-matmul pairwise formula: arcosh(1 + delta) is about
    sqrt(2 delta), with delta the rounding error of -c <x, x>_L, which grows like c x0^2."""
    if geo is euclidean:  # |x|^2 + |x|^2 - 2 x.x cancels the same way
        return math.sqrt(32 * torch.finfo(dtype).eps * (x * x).sum(-1).max().item()) + 1e-6
    delta = 16 * torch.finfo(dtype).eps * (c * x[:, 0] ** 2).max().item()
    return math.sqrt(2 * delta) / math.sqrt(c) + 1e-6


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [0.05, 1.0, 5.0])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.__name__.rsplit(".", 1)[-1])
def test_distance_axioms(geo, c, dtype, seed):
    x = _points(geo, 16, 6, c=c, max_norm=4.0 / math.sqrt(c), dtype=dtype, seed=seed)
    d = geo.pairwise_dist(x, x, c=c)
    assert d.dtype == dtype
    assert torch.all(d >= 0)
    torch.testing.assert_close(d, d.T, rtol=0, atol=TOL[dtype])
    assert d.diagonal().max().item() <= _diag_tolerance(geo, x, c, dtype)

    sq = geo.pairwise_sqdist(x, x, c=c)
    assert torch.all(sq >= 0)
    torch.testing.assert_close(sq, sq.T, rtol=TOL[dtype], atol=TOL[dtype])

    # Triangle inequality over all distinct triples, tolerance relative to the distances involved.
    i, j, k = (t.flatten() for t in torch.meshgrid(*(torch.arange(16),) * 3, indexing="ij"))
    distinct = (i != j) & (j != k) & (i != k)
    i, j, k = i[distinct], j[distinct], k[distinct]
    slack = d[i, j] + d[j, k] - d[i, k]
    assert torch.all(slack >= -100 * TOL[dtype] * (1.0 + d[i, k])), slack.min()


def _weighted_sq_cost(geo, points, w, mu, c):
    """sum_k w_k d2(c_k, mu) for mu of shape (P, D): (P,)."""
    return (w * geo.pairwise_sqdist(mu, points, c=c)).sum(-1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [0.05, 1.0, 5.0])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.__name__.rsplit(".", 1)[-1])
def test_centroid_minimises_weighted_squared_distance(geo, c, dtype, seed):
    g = _gen(seed)
    pts = _points(geo, 7, 5, c=c, max_norm=2.0 / math.sqrt(c), dtype=dtype, seed=seed)
    w = torch.rand(7, generator=g, dtype=dtype) ** 3  # uneven weights
    mu = geo.centroid(pts, w, c=c)
    assert mu.shape == (5,)
    best = _weighted_sq_cost(geo, pts, w, mu[None], c)

    # Perturbed candidates, moved along the manifold: proj recomputes the time coordinate.
    for step in (1e-3, 1e-2, 1e-1, 1.0):
        noise = torch.randn(200, 5, generator=g, dtype=dtype) * step / math.sqrt(c)
        cand = geo.proj(mu[None] + noise, c=c)
        cost = _weighted_sq_cost(geo, pts, w, cand, c)
        slack = 10 * TOL[dtype] * best.abs().clamp_min(1.0)
        assert torch.all(cost >= best - slack), (step, (best - cost).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [0.05, 1.0, 5.0])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.__name__.rsplit(".", 1)[-1])
def test_centroid_hand_cases(geo, c, dtype):
    pts = _points(geo, 4, 4, c=c, max_norm=2.0 / math.sqrt(c), dtype=dtype, seed=3)
    # One-hot weights give the point itself; batched weights (n, K) give (n, D).
    mu = geo.centroid(pts, torch.eye(4, dtype=dtype), c=c)
    assert mu.shape == (4, 4)
    torch.testing.assert_close(mu, pts, rtol=10 * TOL[dtype], atol=10 * TOL[dtype])
    # Equal weights on two points give the geodesic midpoint: equidistant, at half the distance.
    m = geo.centroid(pts[:2], torch.tensor([0.5, 0.5], dtype=dtype), c=c)
    d01 = geo.dist(pts[0], pts[1], c=c)
    tol = 1e-3 if dtype == torch.float32 else 1e-9
    assert geo.dist(pts[0], m, c=c).item() == pytest.approx(d01.item() / 2, rel=tol)
    assert geo.dist(pts[1], m, c=c).item() == pytest.approx(d01.item() / 2, rel=tol)
    # Scaling the weights does not move the centroid.
    w = torch.rand(3, 4, generator=_gen(0), dtype=dtype)
    torch.testing.assert_close(geo.centroid(pts, 7.0 * w, c=c), geo.centroid(pts, w, c=c))


# ----------------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c", [0.01, 1.0, 10.0])
@pytest.mark.parametrize("norm", [0.0, 1e-8, 1e-6, 1e-3, 0.5, 1.0, 3.0, 100.0])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.__name__.rsplit(".", 1)[-1])
def test_gradients_finite(geo, norm, c, dtype):
    """From the origin itself through tiny norms to far beyond any clip radius (cosh cap), gradients of the
    maps and distances with respect to the inputs and the curvature stay finite."""
    v = _tangent(6, 5, max_norm=1.0, dtype=dtype, seed=0)
    v = (v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30) * norm).requires_grad_(True)
    c_t = torch.tensor(c, dtype=dtype, requires_grad=True)
    x = geo.expmap0(v, c=c_t)
    y = geo.expmap0(v.detach().flip(0), c=c_t)  # some pairs coincide with x (rows 0/5 differ, 2/3 too)
    w = torch.softmax(-geo.pairwise_sqdist(x, y, c=c_t), dim=-1)
    loss = (
        geo.dist(x, y, c=c_t).sum()
        + geo.dist(x, x, c=c_t).sum()  # coincident points: arcosh at 1
        + geo.sqdist(x, y, c=c_t).sum()
        + geo.pairwise_dist(x, x, c=c_t).sum()
        + geo.logmap0(x, c=c_t).sum()
        + geo.centroid(y, w, c=c_t).sum()
    )
    assert torch.isfinite(loss)
    gv, gc = torch.autograd.grad(loss, (v, c_t), allow_unused=True)
    assert torch.all(torch.isfinite(gv))
    assert gc is None or torch.isfinite(gc)


def _gradcheck_points(geo, n, D, c, seed):
    return _points(geo, n, D, c=c, max_norm=1.5, dtype=torch.float64, seed=seed)


@pytest.mark.parametrize("c", [0.3, 1.0, 4.0])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.__name__.rsplit(".", 1)[-1])
def test_gradcheck_float64(geo, c):
    v = _tangent(4, 5, max_norm=1.5, dtype=torch.float64, seed=1).requires_grad_(True)
    x = _gradcheck_points(geo, 4, 5, c, seed=2).requires_grad_(True)
    y = _gradcheck_points(geo, 3, 5, c, seed=3).requires_grad_(True)
    c_t = torch.tensor(c, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, 3, dtype=torch.float64, generator=_gen(4)).add(0.1).requires_grad_(True)

    checks = {
        "expmap0": (lambda v, c: geo.expmap0(v, c=c), (v, c_t)),
        "logmap0": (lambda x, c: geo.logmap0(x, c=c), (x, c_t)),
        "dist": (lambda a, b, c: geo.dist(a, b, c=c), (x[:3], y, c_t)),
        "sqdist": (lambda a, b, c: geo.sqdist(a, b, c=c), (x[:3], y, c_t)),
        "pairwise_dist": (lambda a, b, c: geo.pairwise_dist(a, b, c=c), (x, y, c_t)),
        "pairwise_sqdist": (lambda a, b, c: geo.pairwise_sqdist(a, b, c=c), (x, y, c_t)),
        "centroid": (lambda p, w, c: geo.centroid(p, w, c=c), (y, w, c_t)),
    }
    for name, (fn, inputs) in checks.items():
        inputs = tuple(t.detach().requires_grad_(True) for t in inputs)
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5), name


# ----------------------------------------------------------------------------------------------------------
# Autocast, pairwise vs elementwise, curvature broadcasting
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.__name__.rsplit(".", 1)[-1])
def test_autocast_bfloat16_keeps_fp32(geo):
    c = 2.0
    v = _tangent(8, 6, max_norm=2.0, dtype=torch.float32, seed=0)
    x = geo.expmap0(v, c=c)
    y = _points(geo, 5, 6, c=c, max_norm=2.0, dtype=torch.float32, seed=1)
    w = torch.softmax(torch.randn(8, 5, generator=_gen(2)), dim=-1)
    fns = {
        "expmap0": lambda: geo.expmap0(v, c=c),
        "logmap0": lambda: geo.logmap0(x, c=c),
        "dist": lambda: geo.dist(x[:5], y, c=c),
        "sqdist": lambda: geo.sqdist(x[:5], y, c=c),
        "pairwise_inner": lambda: geo.pairwise_inner(x, y),
        "pairwise_dist": lambda: geo.pairwise_dist(x, y, c=c),
        "pairwise_sqdist": lambda: geo.pairwise_sqdist(x, y, c=c),
        "centroid": lambda: geo.centroid(y, w, c=c),
    }
    for name, fn in fns.items():
        expected = fn()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = fn()
        assert got.dtype == torch.float32, name
        torch.testing.assert_close(got, expected, msg=name)

    # bfloat16 inputs are computed in fp32 too.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = geo.pairwise_dist(x.bfloat16(), y.bfloat16(), c=c)
    assert d.dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.__name__.rsplit(".", 1)[-1])
def test_pairwise_agrees_with_elementwise(geo, dtype):
    c = 0.7
    x = _points(geo, 6, 5, c=c, max_norm=3.0, dtype=dtype, seed=0)
    y = _points(geo, 4, 5, c=c, max_norm=3.0, dtype=dtype, seed=1)
    xb, yb = x[:, None, :], y[None, :, :]
    tol = {"rtol": 10 * TOL[dtype], "atol": 10 * TOL[dtype]}
    torch.testing.assert_close(geo.pairwise_inner(x, y), geo.inner(xb, yb), **tol)
    torch.testing.assert_close(geo.pairwise_sqdist(x, y, c=c), geo.sqdist(xb, yb, c=c), **tol)
    # fp32 pairwise and elementwise distances round differently; arcosh magnifies that near coincident points.
    dtol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else tol
    torch.testing.assert_close(geo.pairwise_dist(x, y, c=c), geo.dist(xb, yb, c=c), **dtol)
    # Batched pairwise: (..., n, D) x (..., m, D).
    batch = geo.pairwise_dist(torch.stack([x, x.flip(0)]), torch.stack([y, y]), c=c)
    torch.testing.assert_close(batch[0], geo.pairwise_dist(x, y, c=c))
    torch.testing.assert_close(batch[1], geo.pairwise_dist(x.flip(0), y, c=c))
    # keepdim keeps the coordinate axis.
    assert geo.dist(x, x.flip(0), c=c, keepdim=True).shape == (6, 1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: g.__name__.rsplit(".", 1)[-1])
def test_per_subspace_curvature_broadcasting(geo, dtype):
    M, N, K, D = 3, 5, 4, 4
    cs = [0.1, 1.0, 6.0]
    c_m1 = torch.tensor(cs, dtype=dtype).reshape(M, 1)
    v = _tangent(N * M, D, max_norm=2.0, dtype=dtype, seed=0).reshape(N, M, D)

    h = geo.expmap0(v, c=c_m1)  # (N, M, D)
    for m, c in enumerate(cs):
        torch.testing.assert_close(h[:, m], geo.expmap0(v[:, m], c=c))
        torch.testing.assert_close(geo.logmap0(h, c=c_m1)[:, m], geo.logmap0(h[:, m], c=c))
        torch.testing.assert_close(geo.proj(h, c=c_m1)[:, m], geo.proj(h[:, m], c=c))
    hf = h.flip(0)
    torch.testing.assert_close(geo.dist(h, hf, c=c_m1)[:, 1], geo.dist(h[:, 1], hf[:, 1], c=cs[1]))
    o = geo.origin(D, c=c_m1, dtype=dtype)
    assert o.shape == (M, D)
    for m, c in enumerate(cs):
        torch.testing.assert_close(o[m], geo.origin(D, c=c, dtype=dtype))

    # Pairwise per subspace: (M, n, D) x (M, K, D) with c (M, 1, 1) -> (M, n, K).
    c_m11 = c_m1.reshape(M, 1, 1)
    tangent_codes = _tangent(M * K, D, max_norm=2.0, dtype=dtype, seed=1).reshape(M, K, D)
    codes = geo.expmap0(tangent_codes, c=c_m1[:, None])
    hm = h.transpose(0, 1)  # (M, N, D)
    pd = geo.pairwise_dist(hm, codes, c=c_m11)
    psq = geo.pairwise_sqdist(hm, codes, c=c_m11)
    w = torch.softmax(-psq, dim=-1)
    cen = geo.centroid(codes, w, c=c_m11)
    assert pd.shape == (M, N, K) and cen.shape == (M, N, D)
    for m, c in enumerate(cs):
        torch.testing.assert_close(pd[m], geo.pairwise_dist(hm[m], codes[m], c=c))
        torch.testing.assert_close(psq[m], geo.pairwise_sqdist(hm[m], codes[m], c=c))
        torch.testing.assert_close(cen[m], geo.centroid(codes[m], w[m], c=c))


def test_coordinate_axis_keyword():
    """dim selects the coordinate axis: the same numbers laid out along axis 0 give the same results."""
    c = 1.3
    v = _tangent(5, 4, max_norm=2.0, dtype=torch.float64, seed=0)
    x = lorentz.expmap0(v, c=c)
    torch.testing.assert_close(lorentz.expmap0(v.T, c=c, dim=0), x.T)
    torch.testing.assert_close(lorentz.logmap0(x.T, c=c, dim=0), lorentz.logmap0(x, c=c).T)
    torch.testing.assert_close(lorentz.proj_tan0(v.T, c=c, dim=0), v.T)
    torch.testing.assert_close(lorentz.inner(x.T, x.T, dim=0), lorentz.inner(x, x))
    y = x.flip(0)
    torch.testing.assert_close(lorentz.dist(x.T, y.T, c=c, dim=0), lorentz.dist(x, y, c=c))
    torch.testing.assert_close(lorentz.sqdist(x.T, y.T, c=c, dim=0), lorentz.sqdist(x, y, c=c))


def test_euclidean_matches_numpy():
    x = _points(euclidean, 6, 5, c=1.0, max_norm=3.0, dtype=torch.float64, seed=0)
    y = _points(euclidean, 4, 5, c=1.0, max_norm=3.0, dtype=torch.float64, seed=1)
    ref = np.linalg.norm(x.numpy()[:, None] - y.numpy()[None], axis=-1)
    np.testing.assert_allclose(euclidean.pairwise_dist(x, y, c=3.0).numpy(), ref, rtol=1e-10)
    w = torch.rand(2, 4, dtype=torch.float64, generator=_gen(0))
    ref_mean = (w.numpy() @ y.numpy()) / w.numpy().sum(-1, keepdims=True)
    np.testing.assert_allclose(euclidean.centroid(y, w).numpy(), ref_mean, rtol=1e-10)


def test_get_geometry():
    assert get_geometry("lorentz") is lorentz
    assert get_geometry("hyperbolic") is lorentz
    assert get_geometry("euclidean") is euclidean
    with pytest.raises(ValueError, match="unknown geometry 'poincare'"):
        get_geometry("poincare")


def test_fp64_curvature_is_not_rounded_through_fp32():
    """A Python-float curvature must be used at the input's precision (0.05 is not exact in fp32)."""
    v = _tangent(20, 5, max_norm=10.0, dtype=torch.float64, seed=0)
    for c in (0.05, 0.1, 0.3):
        x = lorentz.expmap0(v, c=c)
        residual = (c * lorentz.inner(x, x) + 1.0).abs() / (c * x[:, 0] ** 2)
        assert residual.max().item() < 1e-13, (c, residual.max().item())


@pytest.mark.parametrize("dtype", DTYPES)
def test_arcosh_guard_accurate_and_finite_over_the_whole_range(dtype):
    """The named arcosh guard: accurate just above its clamp at 1 + eps (where log(x + sqrt(x^2 - 1)) loses
    digits), finite far beyond the point where x^2 overflows, and with a finite gradient at the clamp."""
    from hihpq.geometry._guards import arcosh

    f = torch.finfo(dtype)
    xs = [1 + k * f.eps for k in (8, 17, 100, 1000, 10**4)] + [1.5, 3.0, 1e4, 1e10, 1e17, f.max / 4]
    x = torch.tensor(xs, dtype=dtype)
    got = arcosh(x)
    ref = torch.tensor([math.acosh(v) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(got.double(), ref, rtol=8 * f.eps, atol=0)
    x1 = torch.ones(3, dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(arcosh(x1).sum(), x1)
    assert torch.all(torch.isfinite(g))
