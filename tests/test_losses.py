"""HiHPQ losses against slow loop-based references (float64), hand-computed cases, stability, gradients,
a loss-goes-down smoke test, and input validation."""

from __future__ import annotations

import math

import pytest
import torch

from hihpq.losses import HiHPQLoss, instance_loss, prototype_loss, quantized_contrastive_loss, subspace_correlation
from hihpq.quantizer import ProductQuantizer

M, D = 3, 4


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quantizer(geometry: str = "lorentz") -> ProductQuantizer:
    q = ProductQuantizer(M, 8, D, geometry=geometry, curvature=0.8, clip_r=2.0, generator=_gen(0)).double()
    if geometry == "lorentz":
        with torch.no_grad():
            q.curvature_raw.add_(torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))  # distinct curvatures
    return q


def _emb(q: ProductQuantizer, n: int, seed: int) -> torch.Tensor:
    return q.embed(torch.randn(n, M * D, generator=_gen(seed), dtype=torch.float64)).detach()


def _euclidean_cdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A second, unrelated distance: Euclidean on the flattened embeddings."""
    return torch.cdist(a.flatten(1), b.flatten(1))


def _scalar_distance(distance):
    """d(x, y) for single embeddings through the pairwise callable, as a Python float."""
    return lambda x, y: distance(x[None], y[None])[0, 0].item()


# ----------------------------------------------------------------------------------------------------------
# Slow loop-based references, written from the paper's equations with Python floats.
# ----------------------------------------------------------------------------------------------------------


def _ref_contrastive(q1, q2, d, tau):
    """Eq. 13-15: every view is an anchor; positive = other view, negatives = views of other images."""
    B = len(q1)
    views = [(i, q1[i]) for i in range(B)] + [(i, q2[i]) for i in range(B)]
    total = 0.0
    for a, (img_a, x) in enumerate(views):
        pos = q2[img_a] if a < B else q1[img_a]
        s_pos = math.exp(-d(x, pos) / tau)
        s_neg = sum(math.exp(-d(x, y) / tau) for img_t, y in views if img_t != img_a)
        total += -math.log(s_pos / (s_pos + s_neg))
    return total / (2 * B)


def _ref_prototype(q, prototypes, assignments, d, tau):
    """Eq. 18: cross-entropy against every prototype of the level once, mean over anchors then levels."""
    per_level = []
    for P, a in zip(prototypes, assignments, strict=True):
        acc = 0.0
        for i in range(len(q)):
            sims = [math.exp(-d(q[i], P[n]) / tau) for n in range(len(P))]
            acc += -math.log(sims[int(a[i])] / sum(sims))
        per_level.append(acc / len(q))
    return sum(per_level) / len(per_level)


def _ref_instance(q, positives, d, tau, *, paper=False):
    """Eq. 19 with the anchor itself excluded: the positive in the denominator (ours), or, with ``paper``, the
    denominator as printed (the batch without the anchor, the positive not added)."""
    per_level = []
    for p in positives:
        acc = 0.0
        for i in range(len(q)):
            s_pos = math.exp(-d(q[i], p[i]) / tau)
            s_neg = sum(math.exp(-d(q[i], q[t]) / tau) for t in range(len(q)) if t != i)
            acc += -math.log(s_pos / (s_neg if paper else s_pos + s_neg))
        per_level.append(acc / len(q))
    return sum(per_level) / len(per_level)


DISTANCES = ["lorentz", "euclidean-twin", "cosine", "cdist"]


def _setup(kind: str):
    if kind == "cdist":
        q = _quantizer("lorentz")
        return q, _euclidean_cdist
    q = _quantizer({"lorentz": "lorentz", "euclidean-twin": "euclidean", "cosine": "cosine"}[kind])
    return q, q.pairwise_distance


@pytest.mark.parametrize("tau", [0.2, 1.0])
@pytest.mark.parametrize("kind", DISTANCES)
def test_contrastive_matches_reference(kind, tau):
    q, dist = _setup(kind)
    q1, q2 = _emb(q, 6, 1), _emb(q, 6, 2)
    got = quantized_contrastive_loss(q1, q2, distance=dist, tau=tau)
    assert got.dtype == torch.float64 and got.shape == ()
    assert got.item() == pytest.approx(_ref_contrastive(q1, q2, _scalar_distance(dist), tau), rel=1e-10)


@pytest.mark.parametrize("kind", DISTANCES)
def test_prototype_loss_matches_reference(kind):
    q, dist = _setup(kind)
    x = _emb(q, 7, 1)
    protos = [_emb(q, 5, 2), _emb(q, 3, 3)]
    g = _gen(4)
    # Several anchors share a prototype: each prototype must still count once.
    assign = [torch.randint(0, 2, (7,), generator=g), torch.randint(0, 3, (7,), generator=g)]
    got = prototype_loss(x, protos, assign, distance=dist, tau=0.3)
    ref = _ref_prototype(x, protos, assign, _scalar_distance(dist), 0.3)
    assert got.item() == pytest.approx(ref, rel=1e-10)


@pytest.mark.parametrize("kind", DISTANCES)
def test_instance_loss_matches_reference(kind):
    q, dist = _setup(kind)
    x = _emb(q, 6, 1)
    positives = [_emb(q, 6, 2), _emb(q, 6, 3), _emb(q, 6, 4)]
    got = instance_loss(x, positives, distance=dist, tau=0.25)
    assert got.item() == pytest.approx(_ref_instance(x, positives, _scalar_distance(dist), 0.25), rel=1e-10)


@pytest.mark.parametrize("kind", DISTANCES)
def test_instance_loss_paper_denominator_matches_reference(kind):
    q, dist = _setup(kind)
    x = _emb(q, 6, 1)
    positives = [_emb(q, 6, 2), _emb(q, 6, 3)]
    got = instance_loss(x, positives, distance=dist, tau=0.25, denominator="paper")
    ref = _ref_instance(x, positives, _scalar_distance(dist), 0.25, paper=True)
    assert got.item() == pytest.approx(ref, rel=1e-10)
    ours = instance_loss(x, positives, distance=dist, tau=0.25, denominator="ours")
    assert ours.item() > got.item()  # the positive in the denominator can only raise the loss


def test_paper_denominator_goes_negative_and_is_selectable_in_the_objective():
    q, dist = _setup("lorentz")
    x = _emb(q, 6, 1)
    # The positive is the anchor itself (distance 0): Eq. 19 as printed is then below 0, ours stays above.
    assert instance_loss(x, [x.clone()], distance=dist, tau=0.5, denominator="paper").item() < 0
    assert instance_loss(x, [x.clone()], distance=dist, tau=0.5).item() > 0
    pos = [_emb(q, 6, 5)]
    paper = HiHPQLoss(lambda1=0.0, lambda2=1.0, instance_denominator="paper", distance=dist)
    _, parts = paper(x, _emb(q, 6, 2), positives=pos)
    ref = instance_loss(x, pos, distance=dist, tau=0.2, denominator="paper")
    assert parts["ins"].item() == pytest.approx(ref.item(), rel=1e-12)
    with pytest.raises(ValueError, match="instance_denominator"):
        HiHPQLoss(instance_denominator="Paper")
    with pytest.raises(ValueError, match="instance_denominator"):
        instance_loss(x, pos, distance=dist, tau=0.2, denominator="both")


def test_hand_computed_cases():
    """1-D points with |a - b| as distance, tau = 1."""
    dist = _euclidean_cdist
    e = math.exp(-10.0)
    q1 = torch.tensor([[0.0], [10.0]], dtype=torch.float64)
    # Each anchor: positive at distance 0, the two views of the other image at 10.
    got = quantized_contrastive_loss(q1, q1.clone(), distance=dist, tau=1.0)
    assert got.item() == pytest.approx(math.log(1 + 2 * e), rel=1e-12)
    # Prototypes at 0 and 10; anchor 0 -> prototype 0 (d=0 vs 10), anchor 1 -> prototype 0 (d=10 vs 0).
    protos = [torch.tensor([[0.0], [10.0]], dtype=torch.float64)]
    got = prototype_loss(q1, protos, [torch.tensor([0, 0])], distance=dist, tau=1.0)
    expected = (math.log(1 + e) + (10.0 + math.log(1 + e))) / 2
    assert got.item() == pytest.approx(expected, rel=1e-12)
    # Instance: positives at distance 1; the only negative at distance 10.
    pos = [q1 + 1.0]
    got = instance_loss(q1, pos, distance=dist, tau=1.0)
    expected = -math.log(math.exp(-1.0) / (math.exp(-1.0) + e))
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_normalisation_is_a_mean_over_anchors():
    """Two well-separated copies of the same configuration give the same loss as one (a sum would double)."""
    dist = _euclidean_cdist
    q1 = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    q2 = q1 + 0.1
    far = 1e4
    one = quantized_contrastive_loss(q1, q2, distance=dist, tau=1.0)
    two = quantized_contrastive_loss(torch.cat([q1, q1 + far]), torch.cat([q2, q2 + far]), distance=dist, tau=1.0)
    assert two.item() == pytest.approx(one.item(), rel=1e-12)
    protos = [torch.tensor([[0.0], [1.0]], dtype=torch.float64)]
    a = [torch.tensor([0, 1])]
    p1 = prototype_loss(q1, protos, a, distance=dist, tau=1.0)
    p2 = prototype_loss(torch.cat([q1, q1]), protos, [torch.cat([a[0], a[0]])], distance=dist, tau=1.0)
    assert p2.item() == pytest.approx(p1.item(), rel=1e-12)
    # Averaged over levels: the same level twice gives the same loss.
    p3 = prototype_loss(q1, protos * 2, a * 2, distance=dist, tau=1.0)
    assert p3.item() == pytest.approx(p1.item(), rel=1e-12)


def test_losses_are_bounded_below_and_stable_at_small_tau():
    """InfoNCE with the positive in the denominator is >= 0; log-sum-exp keeps tiny tau finite."""
    q, dist = _setup("lorentz")
    x1, x2 = _emb(q, 8, 1), _emb(q, 8, 2)
    for tau in (1e-4, 1e-2, 1.0, 100.0):
        losses = [
            quantized_contrastive_loss(x1, x2, distance=dist, tau=tau),
            prototype_loss(x1, [x2[:5]], [torch.arange(8) % 5], distance=dist, tau=tau),
            instance_loss(x1, [x2], distance=dist, tau=tau),
        ]
        for loss in losses:
            assert torch.isfinite(loss) and loss.item() >= 0
    # Positive identical to the anchor and everything else far: all three go to 0.
    y = _emb(q, 4, 3) * torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    tiny = 1e-3
    assert quantized_contrastive_loss(y, y.clone(), distance=dist, tau=tiny).item() < 1e-12
    assert instance_loss(y, [y.clone()], distance=dist, tau=tiny).item() < 1e-12
    assert prototype_loss(y, [y.clone()], [torch.arange(4)], distance=dist, tau=tiny).item() < 1e-12


def test_self_similarity_is_masked():
    """Changing what distance() reports on the diagonal (self-pairs) must not change any loss."""
    q, dist = _setup("lorentz")
    x1, x2 = _emb(q, 5, 1), _emb(q, 5, 2)

    def shifted_diagonal(a, b):
        d = dist(a, b)
        if a.shape == b.shape and torch.equal(a, b):
            d = d - 50.0 * torch.eye(len(a), dtype=d.dtype)  # would dominate if it were used
        return d

    for fn in (
        lambda dd: quantized_contrastive_loss(x1, x2, distance=dd, tau=0.5),
        lambda dd: instance_loss(x1, [x2], distance=dd, tau=0.5),
    ):
        assert fn(shifted_diagonal).item() == pytest.approx(fn(dist).item(), rel=1e-12)


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_gradcheck_float64(geometry):
    q = ProductQuantizer(2, 4, 3, geometry=geometry, clip_r=2.0, generator=_gen(0)).double()
    x1 = _emb_small(q, 4, 1).requires_grad_(True)
    x2 = _emb_small(q, 4, 2).requires_grad_(True)
    P = _emb_small(q, 3, 3).requires_grad_(True)
    a = torch.tensor([0, 2, 2, 1])
    d = q.pairwise_distance
    aug = lambda u, v: quantized_contrastive_loss(u, v, distance=d, tau=0.5)  # noqa: E731
    assert torch.autograd.gradcheck(aug, (x1, x2))
    assert torch.autograd.gradcheck(lambda u, p: prototype_loss(u, [p], [a], distance=d, tau=0.5), (x1, P))
    assert torch.autograd.gradcheck(lambda u, v: instance_loss(u, [v], distance=d, tau=0.5), (x1, x2))


def _emb_small(q, n, seed):
    z = torch.randn(n, q.n_subspaces * q.subspace_dim, generator=_gen(seed), dtype=torch.float64)
    return q.embed(z).detach()


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_sgd_decreases_contrastive_loss(geometry):
    """Random 'images' with noisy views: a few SGD steps on a linear encoder + quantizer lower L_aug."""
    torch.manual_seed(0)
    B, F = 32, 20
    x = torch.randn(B, F, generator=_gen(1))
    noise = torch.randn(2, B, F, generator=_gen(2)) * 0.3
    q = ProductQuantizer(4, 16, 4, geometry=geometry, tau=0.5, generator=_gen(3))
    enc = torch.nn.Linear(F, 16)
    opt = torch.optim.SGD([*enc.parameters(), *q.parameters()], lr=0.2, momentum=0.9)

    def loss_fn():
        o1, o2 = q(enc(x + noise[0])), q(enc(x + noise[1]))
        return quantized_contrastive_loss(o1.h_soft, o2.h_soft, distance=q.pairwise_distance, tau=0.2)

    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads = [p.grad for p in [*enc.parameters(), *q.parameters()] if p.grad is not None]
        assert all(torch.isfinite(g).all() for g in grads)
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = loss_fn().item()
    assert final < 0.8 * losses[0], (losses[0], final)


# ----------------------------------------------------------------------------------------------------------
# The combined objective
# ----------------------------------------------------------------------------------------------------------


def _hierarchy_inputs(q):
    x1, x2 = _emb(q, 6, 1), _emb(q, 6, 2)
    protos = [_emb(q, 4, 3), _emb(q, 2, 4)]
    assign = [torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([0, 1, 0, 1, 0, 1])]
    positives = [_emb(q, 6, 5), _emb(q, 6, 6)]
    return x1, x2, protos, assign, positives


def test_hihpq_loss_combines_parts():
    q = _quantizer()
    d = q.pairwise_distance
    x1, x2, protos, assign, positives = _hierarchy_inputs(q)
    loss = HiHPQLoss(tau=0.3, lambda1=1.0, lambda2=0.1)
    total, parts = loss(x1, x2, distance=d, prototypes=protos, assignments=assign, positives=positives)
    aug = quantized_contrastive_loss(x1, x2, distance=d, tau=0.3)
    prot = prototype_loss(x1, protos, assign, distance=d, tau=0.3)
    ins = instance_loss(x1, positives, distance=d, tau=0.3)
    torch.testing.assert_close(total, aug + 1.0 * prot + 0.1 * ins)
    torch.testing.assert_close(parts["aug"], aug)
    torch.testing.assert_close(parts["prot"], prot)
    torch.testing.assert_close(parts["ins"], ins)
    assert not any(p.requires_grad for p in parts.values())
    assert total.requires_grad
    # The unweighted terms with their graphs (what bench/curvature_probe.py differentiates one by one).
    terms = loss.terms(x1, x2, distance=d, prototypes=protos, assignments=assign, positives=positives)
    assert list(terms) == ["aug", "prot", "ins"] and all(t.requires_grad for t in terms.values())
    for name, ref in (("aug", aug), ("prot", prot), ("ins", ins)):
        torch.testing.assert_close(terms[name], ref)
    assert list(loss.terms(x1, x2, distance=d)) == ["aug"]  # warm-up: no hierarchy given

    # A separate temperature for the hierarchy losses; a distance given at construction.
    loss2 = HiHPQLoss(tau=0.3, lambda1=2.0, lambda2=0.5, tau_hierarchy=0.7, distance=d)
    total2, _ = loss2(x1, x2, prototypes=protos, assignments=assign, positives=positives)
    expected = aug + 2.0 * prototype_loss(x1, protos, assign, distance=d, tau=0.7)
    expected = expected + 0.5 * instance_loss(x1, positives, distance=d, tau=0.7)
    torch.testing.assert_close(total2, expected)
    # The call's distance wins over the constructor's.
    total3, _ = loss2(x1, x2, distance=_euclidean_cdist)
    torch.testing.assert_close(total3, quantized_contrastive_loss(x1, x2, distance=_euclidean_cdist, tau=0.3))


def test_vanilla_and_warmup_give_l_aug_only():
    q = _quantizer()
    d = q.pairwise_distance
    x1, x2, protos, assign, positives = _hierarchy_inputs(q)
    aug = quantized_contrastive_loss(x1, x2, distance=d, tau=0.2)
    vanilla = HiHPQLoss(tau=0.2, lambda1=0.0, lambda2=0.0)
    total, parts = vanilla(x1, x2, distance=d, prototypes=protos, assignments=assign, positives=positives)
    torch.testing.assert_close(total, aug)
    assert parts["prot"].item() == 0 and parts["ins"].item() == 0
    warmup = HiHPQLoss(tau=0.2)
    total, parts = warmup(x1, x2, distance=d)
    torch.testing.assert_close(total, aug)
    assert parts["prot"].item() == 0 and parts["ins"].item() == 0
    # Only one hierarchy part active.
    proto_only = HiHPQLoss(tau=0.2, lambda1=1.0, lambda2=0.0)
    total, parts = proto_only(x1, x2, distance=d, prototypes=protos, assignments=assign, positives=positives)
    torch.testing.assert_close(total, aug + prototype_loss(x1, protos, assign, distance=d, tau=0.2))
    assert parts["ins"].item() == 0


def _slow_subspace_correlation(t: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Loops over subspace pairs and coordinates: the Pearson correlation of every coordinate pair, squared."""
    _, M, D = t.shape
    values = []
    for m in range(M):
        for n in range(m + 1, M):
            for i in range(D):
                for j in range(D):
                    a, b = t[:, m, i], t[:, n, j]
                    cov = ((a - a.mean()) * (b - b.mean())).mean()
                    sa, sb = ((a - a.mean()) ** 2).mean(), ((b - b.mean()) ** 2).mean()
                    values.append((cov / torch.sqrt((sa + eps) * (sb + eps))) ** 2)
    return torch.stack(values).mean() * D


@pytest.mark.parametrize("M", [2, 3])
def test_subspace_correlation_matches_reference_and_its_extremes(M):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(50, M, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(subspace_correlation(t), _slow_subspace_correlation(t))
    # Copies of one subspace (up to scale and shift): every coordinate correlates 1 with its twin, 0 with the
    # others (independent coordinates, nearly).
    base = torch.randn(4000, 1, 4, generator=g, dtype=torch.float64)
    copies = torch.cat([base, 3 * base + 1, -base][:M], dim=1)
    assert subspace_correlation(copies).item() == pytest.approx(1, abs=0.02)
    independent = torch.randn(4000, M, 4, generator=g, dtype=torch.float64)
    assert subspace_correlation(independent).item() < 0.01
    # Mixing subspace 0 into 1 raises it: corr^2 = 1 / 1.25 for each coordinate of one of the M(M-1)/2 pairs;
    # it is invariant to a per-coordinate scale.
    mixed = independent.clone()
    mixed[:, 1] = independent[:, 0] + 0.5 * independent[:, 1]
    assert subspace_correlation(mixed).item() == pytest.approx(0.8 / (M * (M - 1) / 2), abs=0.02)
    torch.testing.assert_close(
        subspace_correlation(mixed * 5.0), subspace_correlation(mixed), rtol=1e-4, atol=0
    )  # (eps)


def test_subspace_correlation_gradcheck_float64():
    t = torch.randn(12, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(subspace_correlation, (t,))


def test_decorrelation_term_is_weighted_in_the_objective():
    q = _quantizer()
    d = q.pairwise_distance
    x1, x2, *_ = _hierarchy_inputs(q)
    t = torch.randn(6, 2, 3, dtype=torch.float64)
    plain = HiHPQLoss(tau=0.3)
    total, parts = plain(x1, x2, distance=d, tangents=t)  # off by default: the tangents change nothing
    assert "decorr" not in parts
    torch.testing.assert_close(total, quantized_contrastive_loss(x1, x2, distance=d, tau=0.3))
    loss = HiHPQLoss(tau=0.3, decorrelation=0.5)
    total, parts = loss(x1, x2, distance=d, tangents=t)
    expected = quantized_contrastive_loss(x1, x2, distance=d, tau=0.3) + 0.5 * subspace_correlation(t)
    torch.testing.assert_close(total, expected)
    torch.testing.assert_close(parts["decorr"], subspace_correlation(t))
    assert "decorr" not in loss.terms(x1, x2, distance=d)  # no tangents given: no term
    with pytest.raises(ValueError, match="decorrelation"):
        HiHPQLoss(decorrelation=-1.0)
    with pytest.raises(ValueError, match="M >= 2"):
        subspace_correlation(torch.randn(6, 1, 3))


# ----------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------


def test_bad_inputs_raise():
    q = _quantizer()
    d = q.pairwise_distance
    x1, x2, protos, assign, positives = _hierarchy_inputs(q)
    with pytest.raises(ValueError, match="q1 and q2 must have the same shape"):
        quantized_contrastive_loss(x1, x2[:5], distance=d, tau=0.2)
    with pytest.raises(ValueError, match="at least 2 rows"):
        quantized_contrastive_loss(x1[:1], x2[:1], distance=d, tau=0.2)
    with pytest.raises(ValueError, match="tau must be a finite number > 0"):
        quantized_contrastive_loss(x1, x2, distance=d, tau=0.0)
    with pytest.raises(TypeError, match="distance must be a callable"):
        quantized_contrastive_loss(x1, x2, distance=None, tau=0.2)
    with pytest.raises(ValueError, match=r"must return a \(12, 12\) matrix"):
        quantized_contrastive_loss(x1, x2, distance=lambda a, b: torch.zeros(3), tau=0.2)
    with pytest.raises(TypeError, match="floating-point"):
        quantized_contrastive_loss(x1.long(), x2.long(), distance=d, tau=0.2)

    with pytest.raises(ValueError, match="one entry per level, got 2 levels of prototypes and 1"):
        prototype_loss(x1, protos, assign[:1], distance=d, tau=0.2)
    with pytest.raises(ValueError, match=r"assignments\[1\] must lie in \[0, 2\)"):
        prototype_loss(x1, protos, [assign[0], torch.tensor([0, 1, 2, 0, 0, 0])], distance=d, tau=0.2)
    with pytest.raises(ValueError, match=r"assignments\[0\] must lie in \[0, 4\)"):
        prototype_loss(x1, protos, [torch.tensor([0, -1, 0, 0, 0, 0]), assign[1]], distance=d, tau=0.2)
    with pytest.raises(ValueError, match=r"assignments\[0\] must have shape \(B,\) = \(6,\)"):
        prototype_loss(x1, protos, [assign[0][:5], assign[1]], distance=d, tau=0.2)
    with pytest.raises(TypeError, match="integer tensor"):
        prototype_loss(x1, protos, [assign[0].double(), assign[1]], distance=d, tau=0.2)
    with pytest.raises(ValueError, match=r"prototypes\[0\] has shape"):
        prototype_loss(x1, [protos[0][:, :2], protos[1]], assign, distance=d, tau=0.2)
    with pytest.raises(TypeError, match="one entry per hierarchy level"):
        prototype_loss(x1, protos[0], assign[0], distance=d, tau=0.2)
    with pytest.raises(ValueError, match="at least one level"):
        prototype_loss(x1, [], [], distance=d, tau=0.2)

    with pytest.raises(ValueError, match=r"positives\[1\] must have the shape of q"):
        instance_loss(x1, [positives[0], positives[1][:4]], distance=d, tau=0.2)

    loss = HiHPQLoss()
    with pytest.raises(ValueError, match="no distance"):
        loss(x1, x2)
    with pytest.raises(ValueError, match="prototypes and assignments must be given together"):
        loss(x1, x2, distance=d, prototypes=protos)
    for kwargs, err in [
        ({"tau": -1.0}, ValueError),
        ({"lambda1": -0.1}, ValueError),
        ({"lambda2": float("inf")}, ValueError),
        ({"lambda1": "1"}, TypeError),
        ({"tau_hierarchy": 0.0}, ValueError),
        ({"distance": 3}, TypeError),
    ]:
        with pytest.raises(err):
            HiHPQLoss(**kwargs)
