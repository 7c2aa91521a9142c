"""ProductQuantizer: outputs on the manifold, loop-based references for the soft/hard quantization and the
product distances, curvature bounds, gradients, autocast and input validation, for both geometries."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from hihpq.geometry import euclidean, lorentz
from hihpq.losses import quantized_contrastive_loss
from hihpq.quantizer import ProductQuantizer, QuantizerOutput

GEOMETRIES = ["lorentz", "euclidean"]
M, K, D = 3, 12, 5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quantizer(geometry: str = "lorentz", *, dtype=torch.float64, seed: int = 0, **kw) -> ProductQuantizer:
    kw.setdefault("curvature", 0.7)
    kw.setdefault("clip_r", 1.5)
    q = ProductQuantizer(M, kw.pop("K", K), D, geometry=geometry, generator=_gen(seed), **kw)
    if geometry == "lorentz":
        # Distinct curvatures per subspace, so that mixing them up cannot go unnoticed.
        with torch.no_grad():
            q.curvature_raw.add_(torch.tensor([-1.0, 0.0, 1.5]))
    return q.to(dtype)


def _z(B: int = 9, *, dtype=torch.float64, seed: int = 1, scale: float = 0.7) -> torch.Tensor:
    return torch.randn(B, M * D, generator=_gen(seed), dtype=dtype) * scale


def _geo(q: ProductQuantizer):
    return lorentz if q.geometry == "lorentz" else euclidean


def _assert_on_manifold(x: torch.Tensor, c: torch.Tensor, tol: float) -> None:
    """x (..., M, D) on H_{c_m} per subspace."""
    res = c[:, None] * lorentz.inner(x, x, keepdim=True) + 1.0  # c (M,) -> (M, 1)
    assert res.abs().max().item() < tol
    assert torch.all(x[..., 0] > 0)


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_forward_shapes_and_outputs_on_manifold(geometry, dtype):
    q = _quantizer(geometry, dtype=dtype)
    out = q(_z(dtype=dtype, scale=2.0))  # some segments beyond the clip radius, some inside
    assert isinstance(out, QuantizerOutput)
    assert out.tangent.shape == out.h.shape == out.h_soft.shape == (9, M, D)
    assert out.weights.shape == (9, M, K)
    assert all(t.dtype == dtype for t in out)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(9, M, dtype=dtype))
    assert torch.all(out.weights >= 0)

    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert out.tangent.norm(dim=-1).max().item() <= 1.5 * (1 + tol)
    C = q.codebooks()
    assert C.shape == (M, K, D)
    if geometry == "lorentz":
        c = q.curvature
        assert torch.all(out.tangent[..., 0] == 0)
        for x in (out.h, out.h_soft, C.transpose(0, 1)):
            _assert_on_manifold(x, c, 10 * tol)
        back = lorentz.logmap0(out.h, c=c[:, None])
        torch.testing.assert_close(back, out.tangent, rtol=10 * tol, atol=10 * tol)
    else:
        torch.testing.assert_close(out.h, out.tangent)
    # embed() is the h of forward().
    torch.testing.assert_close(q.embed(_z(dtype=dtype, scale=2.0)), out.h)


def test_clipping():
    q = _quantizer(clip_r=0.8)
    z = _z(scale=1.0)
    v = q.tangent(z)
    raw = lorentz.proj_tan0(z.reshape(9, M, D))
    n_raw, n = raw.norm(dim=-1), v.norm(dim=-1)
    inside = n_raw <= 0.8
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(v[inside], raw[inside])  # untouched inside the radius
    torch.testing.assert_close(n[~inside], torch.full_like(n[~inside], 0.8))  # on the sphere outside
    # Same direction outside.
    torch.testing.assert_close(v[~inside] / n[~inside, None], raw[~inside] / n_raw[~inside, None])
    torch.testing.assert_close(q.tangent(z, clip=False), raw)
    # clip_r=None disables clipping, for codewords too.
    q_free = _quantizer(clip_r=None, init_scale=5.0)
    torch.testing.assert_close(q_free.tangent(z), raw)
    assert q_free.codebooks()[..., 1:].norm(dim=-1).max() > 5.0
    # (B, M, D) input is accepted (e.g. tangent-space prototypes) and gives the same as (B, M*D).
    torch.testing.assert_close(q.tangent(z.reshape(9, M, D)), v)


def test_codewords_are_clipped_like_embeddings():
    q = _quantizer(clip_r=0.5, init_scale=3.0)
    r = lorentz.logmap0(q.codebooks(), c=q.curvature[:, None, None]).norm(dim=-1)
    assert r.max().item() == pytest.approx(0.5, rel=1e-9)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_soft_quantize_matches_loop_reference(geometry):
    q = _quantizer(geometry, tau=0.3)
    geo = _geo(q)
    h = q.embed(_z())
    h_soft, w = q.soft_quantize(h)
    C, c = q.codebooks(), q.curvature.detach()
    for b in range(h.shape[0]):
        for m in range(M):
            cm = float(c[m])
            logits = torch.stack([-geo.sqdist(C[m, k], h[b, m], c=cm) / 0.3 for k in range(K)])
            ref_w = torch.exp(logits - logits.max())
            ref_w = ref_w / ref_w.sum()
            torch.testing.assert_close(w[b, m], ref_w)
            s = sum(ref_w[k] * C[m, k] for k in range(K))
            if geometry == "lorentz":  # Eq. 11: s / (sqrt(c) |<s, s>_L|^(1/2))
                ref_h = s / (math.sqrt(cm) * (s[0] ** 2 - (s[1:] ** 2).sum()).abs().sqrt())
            else:
                ref_h = s / ref_w.sum()
            torch.testing.assert_close(h_soft[b, m], ref_h)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_hard_code_is_brute_force_argmin(geometry):
    q = _quantizer(geometry)
    geo = _geo(q)
    h = q.embed(_z(B=20, scale=1.5))
    codes = q.assign(h)
    assert codes.shape == (20, M) and codes.dtype == torch.uint8
    C, c = q.codebooks(), q.curvature.detach()
    for b in range(20):
        for m in range(M):
            d = [geo.dist(h[b, m], C[m, k], c=float(c[m])).item() for k in range(K)]
            assert int(codes[b, m]) == min(range(K), key=d.__getitem__)
    torch.testing.assert_close(q.encode(h), codes)


def test_assign_chunks_large_batches(monkeypatch):
    import hihpq.quantizer as mod

    q = _quantizer()
    h = q.embed(_z(B=50))
    full = q.assign(h)
    monkeypatch.setattr(mod, "_ASSIGN_CHUNK", 7)
    torch.testing.assert_close(q.assign(h), full)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_reconstruct_encode_equals_gathered_codebooks(geometry):
    q = _quantizer(geometry)
    h = q.embed(_z(B=15))
    codes = q.encode(h)
    rec = q.reconstruct(codes)
    torch.testing.assert_close(q.decode(codes), rec)
    C = q.codebooks()
    for b in range(15):
        for m in range(M):
            torch.testing.assert_close(rec[b, m], C[m, int(codes[b, m])])
    # Any integer dtype decodes the same.
    torch.testing.assert_close(q.decode(codes.long()), rec)
    torch.testing.assert_close(q.decode(codes.int()), rec)


@pytest.mark.parametrize("n_codewords, dtype", [(2, torch.uint8), (256, torch.uint8), (257, torch.int64)])
def test_code_dtype(n_codewords, dtype):
    q = _quantizer(K=n_codewords, init_scale=1.0)
    codes = q.assign(q.embed(_z(B=64, scale=2.0)))
    assert codes.dtype == dtype
    assert int(codes.min()) >= 0 and int(codes.max()) < n_codewords
    assert q.decode(codes).shape == (64, M, D)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_soft_assignment_tends_to_hard_code(geometry):
    q = _quantizer(geometry)
    h = q.embed(_z(B=16, scale=1.5))
    codes = q.assign(h)
    hard = q.decode(codes)
    gaps = []
    for tau in (1.0, 0.1, 1e-2, 1e-3, 1e-5, 1e-8):
        q.tau = tau
        h_soft, w = q.soft_quantize(h)
        gaps.append(q.distance(h_soft, hard).max().item())
        # The hard code is the argmax of the soft weights at every temperature.
        torch.testing.assert_close(w.argmax(-1), codes.long())
    assert all(b <= a + 1e-12 for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[0] > 1e-2 and gaps[-1] < 1e-6, gaps
    torch.testing.assert_close(w, torch.nn.functional.one_hot(codes.long(), K).double(), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------------
# Distances
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_product_distances_match_loops(geometry):
    q = _quantizer(geometry)
    geo = _geo(q)
    a, b = q.embed(_z(B=6, seed=1)), q.embed(_z(B=4, seed=2))
    c = q.curvature.detach()
    pd = q.pairwise_distance(a, b)
    assert pd.shape == (6, 4)
    for i in range(6):
        for j in range(4):
            per = [geo.dist(a[i, m], b[j, m], c=float(c[m])) for m in range(M)]
            torch.testing.assert_close(pd[i, j], sum(per))
            torch.testing.assert_close(q.pairwise_distance(a, b, per_subspace=True)[:, i, j], torch.stack(per))
    torch.testing.assert_close(q.distance(a[:4], b), pd[:4].diagonal())
    torch.testing.assert_close(q.distance(a[:, None], b[None]), pd)  # broadcasting (..., M, D)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_quantization_error(geometry):
    q = _quantizer(geometry)
    geo = _geo(q)
    h = q.embed(_z(B=10))
    rec = q.decode(q.assign(h))
    c = q.curvature.detach()
    per = torch.tensor(
        [[geo.dist(h[b, m], rec[b, m], c=float(c[m])).item() for m in range(M)] for b in range(10)],
        dtype=torch.float64,
    )
    torch.testing.assert_close(q.quantization_error(h), per.sum(1).mean())
    torch.testing.assert_close(q.quantization_error(h, per_subspace=True), per.mean(0))
    # A codeword quantizes to itself with zero error.
    C = q.codebooks().transpose(0, 1)[:4]  # codewords 0..3 of every subspace as embeddings
    assert q.quantization_error(C).item() < 1e-6


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_distance_tables(geometry):
    q = _quantizer(geometry)
    geo = _geo(q)
    h = q.embed(_z(B=5, seed=3))
    codes = q.assign(q.embed(_z(B=7, seed=4)))
    table = q.distance_table(h)
    assert table.shape == (5, M, K)
    C, c = q.codebooks(), q.curvature.detach()
    torch.testing.assert_close(table[2, 1, 7], geo.dist(h[2, 1], C[1, 7], c=float(c[1])))
    # Asymmetric distance from the table equals the product distance to the decoded items.
    adc = table[:, torch.arange(M)[None, :], codes.long()].sum(-1)  # (5, 7)
    torch.testing.assert_close(adc, q.pairwise_distance(h, q.decode(codes)))
    # Symmetric tables: codeword-to-codeword distances, symmetric, zero diagonal.
    sdc = q.codeword_distances()
    assert sdc.shape == (M, K, K)
    torch.testing.assert_close(sdc, sdc.transpose(1, 2))
    assert torch.all(sdc.diagonal(dim1=1, dim2=2) == 0)
    torch.testing.assert_close(sdc[2, 3, 5], geo.dist(C[2, 3], C[2, 5], c=float(c[2])))


# ----------------------------------------------------------------------------------------------------------
# Curvature
# ----------------------------------------------------------------------------------------------------------


def test_curvature_initialised_exactly_and_learnable():
    q = ProductQuantizer(4, 8, 6, curvature=2.5, curvature_bounds=(0.1, 20.0))
    assert q.curvature.shape == (4,)
    torch.testing.assert_close(q.curvature, torch.full((4,), 2.5), rtol=1e-6, atol=0)
    assert q.no_weight_decay_parameters() == [q.curvature_raw]
    assert any(p is q.curvature_raw for p in q.parameters())
    assert q.curvature_raw.requires_grad
    # Fixed curvature: a buffer, nothing to exclude from weight decay.
    q_fixed = ProductQuantizer(4, 8, 6, curvature=2.5, learn_curvature=False)
    assert q_fixed.no_weight_decay_parameters() == []
    assert all(p is not q_fixed.curvature_raw for p in q_fixed.parameters())
    torch.testing.assert_close(q_fixed.curvature, torch.full((4,), 2.5), rtol=1e-6, atol=0)
    # Euclidean: curvature is a fixed buffer of ones.
    q_e = ProductQuantizer(4, 8, 6, geometry="euclidean")
    torch.testing.assert_close(q_e.curvature, torch.ones(4))
    assert q_e.no_weight_decay_parameters() == [] and not q_e.learn_curvature


@pytest.mark.parametrize("param", ["bounded", "clamped"])
@pytest.mark.parametrize("learn", [True, False])
def test_set_curvature_round_trips_through_the_parameterisation(param, learn):
    q = ProductQuantizer(3, 8, 6, curvature=1.0, curvature_bounds=(0.1, 20.0), curvature_param=param,
                         learn_curvature=learn)  # fmt: skip
    target = torch.tensor([0.2, 3.0, 19.5])
    q.set_curvature_(target)
    torch.testing.assert_close(q.curvature, target, rtol=1e-5, atol=0)
    q.set_curvature_(2.5)  # one value for every subspace
    torch.testing.assert_close(q.curvature, torch.full((3,), 2.5), rtol=1e-5, atol=0)
    for bad in (0.1, 25.0, [1.0, 1.0, -1.0]):
        with pytest.raises(ValueError, match="strictly inside curvature_bounds"):
            q.set_curvature_(bad)
    torch.testing.assert_close(q.curvature, torch.full((3,), 2.5), rtol=1e-5, atol=0)  # refused: unchanged
    with pytest.raises(ValueError, match="no curvature"):
        ProductQuantizer(3, 8, 6, geometry="euclidean").set_curvature_(1.0)


@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_curvature_stays_in_bounds_under_huge_learning_rate(direction):
    lo, hi = 0.01, 10.0
    q = ProductQuantizer(M, K, D, curvature=1.0, curvature_bounds=(lo, hi), generator=_gen(0))
    # A huge step on the curvature; codebooks move too, at a rate that keeps them meaningful.
    groups = [{"params": [q.curvature_raw], "lr": 1e6}, {"params": [q.codebook_tangent], "lr": 10.0}]
    opt = torch.optim.SGD(groups)
    z = _z(dtype=torch.float32)
    for _ in range(30):
        opt.zero_grad()
        out = q(z)
        # Push the curvature hard in one direction, plus a real loss that moves everything.
        loss = direction * 1e3 * q.curvature.sum() + quantized_contrastive_loss(
            out.h_soft, q(z.flip(0)).h_soft, distance=q.pairwise_distance, tau=0.2
        )
        loss.backward()
        opt.step()
        c = q.curvature
        assert torch.all((c >= lo) & (c <= hi)), c
    target = lo if direction > 0 else hi
    torch.testing.assert_close(q.curvature, torch.full((M,), target), rtol=1e-3, atol=0)
    out = q(z)
    assert all(torch.isfinite(t).all() for t in out)


def test_curvature_is_used_per_subspace():
    """The embedding of each subspace lies on the hyperboloid of its own curvature."""
    q = _quantizer()
    c = q.curvature.detach()
    assert len(set(c.tolist())) == M
    h = q.embed(_z())
    for m in range(M):
        torch.testing.assert_close(h[:, m], lorentz.expmap0(q.tangent(_z())[:, m], c=float(c[m])))


# ----------------------------------------------------------------------------------------------------------
# Gradients, precision, state
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [0.0, 1e-8, 1e-3, 1.0, 1e4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_gradients_finite(geometry, dtype, scale):
    q = _quantizer(geometry, dtype=dtype, tau=0.05)
    z = (_z(dtype=dtype) * scale / 0.7).requires_grad_(True)
    out = q(z)
    loss = (
        quantized_contrastive_loss(out.h_soft, out.h, distance=q.pairwise_distance, tau=0.2)
        + q.quantization_error(out.h)
        + out.weights.max(-1).values.sum()
    )
    assert torch.isfinite(loss)
    loss.backward()
    for name, g in [("z", z.grad), *((n, p.grad) for n, p in q.named_parameters())]:
        assert g is not None and torch.all(torch.isfinite(g)), name
    assert q.codebook_tangent.grad.abs().sum() > 0
    if geometry == "lorentz":
        assert q.curvature_raw.grad.abs().sum() > 0


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_gradcheck_float64(geometry):
    q = ProductQuantizer(2, 4, 3, geometry=geometry, tau=0.5, clip_r=1.2, generator=_gen(0)).double()
    z = torch.randn(3, 6, generator=_gen(1), dtype=torch.float64)  # some segments clipped, some not
    params = {n: p.detach().clone().requires_grad_(True) for n, p in q.named_parameters()}
    names = list(params)

    def fn(z, *ps):
        out = torch.func.functional_call(q, dict(zip(names, ps, strict=True)), (z,))
        return out.h, out.h_soft, out.weights

    assert torch.autograd.gradcheck(fn, (z.requires_grad_(True), *params.values()), atol=1e-6, rtol=1e-5)

    a = q.embed(torch.randn(3, 6, generator=_gen(2), dtype=torch.float64)).detach().requires_grad_(True)
    b = q.embed(torch.randn(2, 6, generator=_gen(3), dtype=torch.float64)).detach().requires_grad_(True)
    assert torch.autograd.gradcheck(q.pairwise_distance, (a, b), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_autocast_bfloat16_keeps_fp32(geometry):
    q = _quantizer(geometry, dtype=torch.float32)
    z = _z(dtype=torch.float32)
    expected = q(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = q(z)
        got_bf16_input = q(z.bfloat16())
        d = q.pairwise_distance(got.h, got.h_soft)
    for e, g in zip(expected, got, strict=True):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, e)
    assert all(t.dtype == torch.float32 for t in got_bf16_input)
    assert d.dtype == torch.float32


def test_dtype_promotion():
    q = _quantizer(dtype=torch.float32)
    out = q(_z(dtype=torch.float64))
    assert out.h.dtype == torch.float64 and out.h_soft.dtype == torch.float64
    assert q(_z(dtype=torch.float16)).h.dtype == torch.float32


def test_seeded_init_and_scale():
    a = ProductQuantizer(4, 64, 9, generator=_gen(5), clip_r=None, init_scale=0.3)
    b = ProductQuantizer(4, 64, 9, generator=_gen(5), clip_r=None, init_scale=0.3)
    torch.testing.assert_close(a.codebooks(), b.codebooks())
    assert torch.all(a.codebook_tangent[..., 0] == 0)
    assert a.codebook_tangent.norm(dim=-1).mean().item() == pytest.approx(0.3, rel=0.1)
    # Default: half the clip radius, so codewords start inside the region embeddings reach.
    q = ProductQuantizer(4, 64, 9, clip_r=2.0, generator=_gen(5))
    assert q.codebook_tangent.norm(dim=-1).mean().item() == pytest.approx(1.0, rel=0.1)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_state_dict_roundtrip(geometry):
    q = _quantizer(geometry, dtype=torch.float32)
    fresh = ProductQuantizer(M, K, D, geometry=geometry, curvature=0.7, clip_r=1.5, generator=_gen(99))
    fresh.load_state_dict(q.state_dict())
    z = _z(dtype=torch.float32)
    for a, b in zip(q(z), fresh(z), strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(q.curvature, fresh.curvature)


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"n_codewords": 1}, ValueError, "n_codewords must be >= 2"),
        ({"n_subspaces": 0}, ValueError, "n_subspaces must be >= 1"),
        ({"subspace_dim": 1}, ValueError, "subspace_dim must be >= 2"),
        ({"n_subspaces": 2.0}, TypeError, "n_subspaces must be an int"),
        ({"tau": 0.0}, ValueError, "tau must be a finite number > 0"),
        ({"tau": float("nan")}, ValueError, "tau"),
        ({"curvature_bounds": (1.0, 0.5), "curvature": 0.7}, ValueError, "0 < lo < hi"),
        ({"curvature_bounds": (0.0, 1.0), "curvature": 0.5}, ValueError, "curvature_bounds"),
        ({"curvature": 20.0}, ValueError, "strictly inside curvature_bounds"),
        ({"curvature": 0.01}, ValueError, "strictly inside curvature_bounds"),
        ({"curvature": -1.0}, ValueError, "curvature must be a finite number > 0"),
        ({"clip_r": 0.0}, ValueError, "clip_r"),
        ({"init_scale": -1.0}, ValueError, "init_scale"),
        ({"geometry": "poincare"}, ValueError, "unknown geometry 'poincare'"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, err, match):
    args = {"n_subspaces": 2, "n_codewords": 4, "subspace_dim": 3}
    args.update(kwargs)
    with pytest.raises(err, match=match):
        ProductQuantizer(args.pop("n_subspaces"), args.pop("n_codewords"), args.pop("subspace_dim"), **args)


def test_bad_inputs_raise():
    q = ProductQuantizer(4, 8, 16)
    with pytest.raises(ValueError, match=r"embedding dim 60 is not M\*D = 64"):
        q(torch.randn(2, 60))
    z = torch.randn(2, 64)
    z[1, 3] = float("nan")
    with pytest.raises(ValueError, match="z contains NaN or inf"):
        q(z)
    z[1, 3] = float("inf")
    with pytest.raises(ValueError, match="z contains NaN or inf"):
        q.embed(z)
    with pytest.raises(TypeError, match="floating-point"):
        q(torch.ones(2, 64, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        q([[0.0] * 64])
    with pytest.raises(ValueError, match=r"shape \(B, M\*D\)"):
        q(torch.randn(64))
    with pytest.raises(ValueError, match=r"\(B, M, D\)"):
        q.tangent(torch.randn(2, 4, 15))
    with pytest.raises(ValueError, match=r"h must have shape \(B, M, D\) with M=4, D=16"):
        q.soft_quantize(torch.randn(2, 4, 15))
    with pytest.raises(ValueError, match="a must have shape"):
        q.pairwise_distance(torch.randn(2, 64), torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        q.decode(torch.tensor([[0, 1, 2, 8]]))
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 8\)"):
        q.decode(torch.tensor([[0, 1, -1, 2]]))
    with pytest.raises(TypeError, match="integer"):
        q.decode(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"codes must have shape \(B, M\)"):
        q.decode(torch.zeros(1, 3, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# Learned curvature (both parameterisations) and codebooks initialised from data
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("param", ["bounded", "clamped"])
@pytest.mark.parametrize("direction", [1.0, -1.0])
def test_learned_curvature_gets_gradients_and_stays_in_bounds(param, direction):
    lo, hi = 0.05, 4.0
    q = ProductQuantizer(M, K, D, curvature=1.0, curvature_bounds=(lo, hi), curvature_param=param, generator=_gen(0))
    assert q.curvature_raw.requires_grad and q.learn_curvature
    # The authors' clamped c is decayed like a weight; the bounded one is not (decay would mean nothing there).
    assert (q.curvature_raw in q.no_weight_decay_parameters()) == (param == "bounded")
    torch.testing.assert_close(q.curvature, torch.ones(M), rtol=1e-6, atol=0)
    opt = torch.optim.SGD([{"params": [q.curvature_raw], "lr": 50.0}, {"params": [q.codebook_tangent], "lr": 1.0}])
    z = _z(dtype=torch.float32)
    for step in range(15):
        opt.zero_grad()
        loss = direction * q.curvature.sum() + quantized_contrastive_loss(
            q(z).h_soft, q(z.flip(0)).h_soft, distance=q.pairwise_distance, tau=0.2
        )
        loss.backward()
        grad = q.curvature_raw.grad
        assert torch.isfinite(grad).all(), (step, grad)
        if step == 0:  # inside the bounds every subspace's c gets a gradient (a saturated bound may give 0)
            assert (grad != 0).all(), grad
        opt.step()
        q.clamp_curvature_()
        assert torch.all((q.curvature >= lo) & (q.curvature <= hi)), q.curvature
    torch.testing.assert_close(q.curvature, torch.full((M,), lo if direction > 0 else hi), rtol=1e-3, atol=0)
    assert all(torch.isfinite(t).all() for t in q(z))


def test_clamp_is_a_no_op_for_a_fixed_or_bounded_curvature():
    for kw in ({"learn_curvature": False, "curvature_param": "clamped"}, {"curvature_param": "bounded"}):
        q = ProductQuantizer(M, K, D, curvature=1.0, **kw)
        with torch.no_grad():
            q.curvature_raw.fill_(50.0)
        before = q.curvature_raw.clone()
        q.clamp_curvature_()
        torch.testing.assert_close(q.curvature_raw, before)
    with pytest.raises(ValueError, match="curvature_param"):
        ProductQuantizer(M, K, D, curvature_param="softplus")


def _clustered(n_per: int, centres: torch.Tensor, noise: float, seed: int) -> torch.Tensor:
    """(n_per * Kc, M * D) points: every subspace segment near one of its Kc centres (M, Kc, D)."""
    g = _gen(seed)
    Kc = centres.shape[1]
    pick = torch.stack([torch.randperm(n_per * Kc, generator=g) % Kc for _ in range(M)], 1)  # (N, M)
    seg = centres[torch.arange(M)[None, :], pick] + noise * torch.randn(
        n_per * Kc, M, D, generator=g, dtype=torch.float64
    )
    return seg.reshape(-1, M * D)


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean", "cosine"])
def test_codebooks_from_data_find_the_clusters_and_cut_the_quantization_error(geometry):
    Kq = 8
    # Well-separated centres inside the clip radius: +-0.6 e_i, i = 1..4 (time coordinate 0: tangent vectors),
    # shuffled differently per subspace.
    axes = torch.cat([torch.eye(D, dtype=torch.float64)[1:], -torch.eye(D, dtype=torch.float64)[1:]]) * 0.6
    centres = torch.stack([axes[torch.randperm(Kq, generator=_gen(3 + m))] for m in range(M)])
    z = _clustered(30, centres, 0.01, 4)
    q = _quantizer(geometry, K=Kq, clip_r=1.5)
    before = q.quantization_error(q.embed(z)).item()
    counts = q.init_codebooks_from_data(z, generator=_gen(5))
    assert counts.shape == (M, Kq) and torch.all(counts.sum(1) == len(z))
    after = q.quantization_error(q.embed(z)).item()
    assert after < 0.1 * before, (before, after)
    # Every codeword sits on one cluster: the nearest centre of each codeword is a different one.
    C = q.codebooks().detach()  # (M, K, D) points
    ref = q.embed(centres.transpose(0, 1)).transpose(0, 1)  # centres as points (M, Kc, D)
    for m in range(M):
        nearest = q.geo.pairwise_dist(C[m], ref[m], c=float(q.curvature.detach()[m])).argmin(1)
        assert sorted(nearest.tolist()) == list(range(Kq))
    with pytest.raises(ValueError, match="at least K"):
        q.init_codebooks_from_data(z[: Kq - 1])


# ----------------------------------------------------------------------------------------------------------
# keep_scale: the clip radius follows c, so that c shapes the clip ball without scaling its distances
# ----------------------------------------------------------------------------------------------------------


def _on_sphere(q: ProductQuantizer, u: torch.Tensor) -> torch.Tensor:
    """Directions u (B, M, D) (time coordinate ignored) scaled far past any clip radius, then embedded."""
    u = u.clone()
    u[..., 0] = 0
    return q.embed(100.0 * u / u.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("c", [0.05, 0.3, 1.0, 3.0, 9.5])
def test_keep_scale_holds_the_distance_of_orthogonal_points_and_changes_the_shape(c):
    r0 = 0.8
    q = ProductQuantizer(M, K, D, curvature=c, clip_r=r0, keep_scale=True, learn_curvature=False).double()
    e1, e2 = torch.zeros(1, M, D, dtype=torch.float64), torch.zeros(1, M, D, dtype=torch.float64)
    e1[..., 1], e2[..., 2] = 1.0, 1.0
    a, b, anti = _on_sphere(q, e1), _on_sphere(q, e2), _on_sphere(q, -e1)
    rho = math.acosh(math.cosh(r0) ** 2)  # orthogonal points at radius r0 when c = 1
    torch.testing.assert_close(lorentz.dist(a, b, c=q.curvature[:, None]), torch.full((1, M), rho, dtype=torch.float64))
    r = q.clip_radius(1, dtype=torch.float64).squeeze(-1)
    # every embedding lies at distance r(c) from the origin; antipodal points 2 r(c) apart (shrinks as c grows)
    torch.testing.assert_close(lorentz.dist(a, anti, c=q.curvature[:, None]), 2 * r[None])
    # a larger c shrinks the ball (its far pairs shorten) while the orthogonal ones stay put; c = 1 keeps clip_r
    if c == 1.0:
        torch.testing.assert_close(r, torch.full_like(r, r0))
    else:
        torch.testing.assert_close(torch.sign(r0 - r), torch.full_like(r, float(np.sign(c - 1))), rtol=0, atol=0)


def test_keep_scale_is_the_same_model_at_c_1_and_differs_elsewhere():
    z = _z(dtype=torch.float64, scale=3.0)
    for c, same in ((1.0, True), (2.5, False)):
        outs = []
        for keep in (False, True):
            q = ProductQuantizer(M, K, D, curvature=c, clip_r=0.8, keep_scale=keep, generator=_gen(3)).double()
            outs.append(q(z))
        for x, y in zip(*outs, strict=True):
            assert torch.allclose(x, y, atol=1e-12) == same


def test_keep_scale_passes_curvature_gradients_through_the_radius():
    q = ProductQuantizer(M, K, D, curvature=1.3, clip_r=0.8, keep_scale=True, generator=_gen(4)).double()
    z = _z(dtype=torch.float64, scale=3.0)  # past the radius: every embedding is clipped

    def f(raw):
        with torch.no_grad():
            q.curvature_raw.copy_(raw)
        q.curvature_raw.grad = None
        out = quantized_contrastive_loss(q(z).h_soft, q(z.flip(0)).h_soft, distance=q.pairwise_distance, tau=0.3)
        out.backward()
        return out.detach(), q.curvature_raw.grad.clone()

    raw0 = q.curvature_raw.detach().clone()
    _, grad = f(raw0)
    assert (grad != 0).all()
    eps = 1e-6
    for m in range(M):  # central differences against autograd, subspace by subspace
        step = torch.zeros(M, dtype=torch.float64)
        step[m] = eps
        numeric = (f(raw0 + step)[0] - f(raw0 - step)[0]) / (2 * eps)
        torch.testing.assert_close(grad[m], numeric, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("clip_r", [5.0, 30.0, 500.0])
def test_keep_scale_radius_stays_finite_for_large_radii(clip_r):
    """Where cosh would overflow the radius comes from its asymptote: finite, = clip_r at c = 1, smaller for c > 1."""
    radii = []
    for c in (0.5, 1.0, 9.0):
        q = ProductQuantizer(M, K, D, curvature=c, clip_r=clip_r, keep_scale=True, learn_curvature=False)
        for dtype in (torch.float32, torch.float64):
            r = q.clip_radius(1, dtype=dtype)
            assert torch.isfinite(r).all() and (r > 0).all(), (c, dtype, r)
        radii.append(float(q.clip_radius(1, dtype=torch.float64)[0]))
    assert radii[0] > radii[1] > radii[2]
    assert radii[1] == pytest.approx(clip_r, rel=1e-6)


def test_keep_scale_needs_a_clip_radius_and_means_nothing_in_flat_geometries():
    with pytest.raises(ValueError, match="keep_scale needs a clip radius"):
        ProductQuantizer(M, K, D, clip_r=None, keep_scale=True)
    assert not ProductQuantizer(M, K, D, geometry="euclidean", keep_scale=True).keep_scale
