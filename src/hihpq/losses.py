"""HiHPQ training losses (paper Eq. 13-15, 18-21) with the distance injected.

Every loss takes ``distance(a, b) -> (n, m)``, a pairwise distance between two batches of embeddings (for
HiHPQ :meth:`hihpq.quantizer.ProductQuantizer.pairwise_distance`, the sum of geodesic distances over
subspaces, Eq. 8), and uses the similarity S(a, b) = exp(-d(a, b) / tau) (Eq. 15). The same losses therefore
serve the hyperbolic model and its Euclidean twin. Every loss is a cross-entropy over logits -d / tau
(log-sum-exp inside, no exp of large numbers).

Normalisation follows the authors' code (github zexuanqiu/HiHPQ, loss.py / engine.py), so that their weights
lambda1 = 1.0 and lambda2 = 0.1 mean the same thing here:
  - L_aug: their NT-Xent is CrossEntropyLoss(reduction="sum") / 2B, the mean over the 2B anchors. The paper's
    Eq. 13, (1 / N_B) sum_x (l1(x) + l2(x)), would be twice that; we use the mean.
  - L_prot: per level sum / B, then the mean over levels: the mean over anchors and levels. (Eq. 18 sums over
    the anchors, which would tie the loss scale to the batch size.)
  - L_ins: per level sum over anchors / B, mean over levels. Their positive is an in-batch neighbour and
    anchors without one add 0; ours is drawn from the whole pool, so every anchor counts: the mean over
    anchors, then levels. Eq. 19's denominator sums over the other anchors only (``instance_denominator=
    "paper"``: unbounded below, it rewards pulling the positive ever closer); by default ("ours") the positive
    is in the denominator too, a proper InfoNCE bounded below by 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "INSTANCE_DENOMINATORS",
    "Distance",
    "HiHPQLoss",
    "instance_loss",
    "prototype_loss",
    "quantized_contrastive_loss",
    "subspace_correlation",
]

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""Pairwise distance: a (n, ...) and b (m, ...) -> (n, m)."""


def _check_tau(tau) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)):
        raise TypeError(f"tau must be a number, got {type(tau).__name__} {tau!r}")
    if not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau}")
    return float(tau)


def _check_distance(distance) -> Distance:
    if not callable(distance):
        raise TypeError(f"distance must be a callable distance(a, b) -> (n, m), got {type(distance).__name__}")
    return distance


def _check_batch(name: str, x, min_rows: int = 1) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"{name} must be a batch of embeddings (B, ...), got shape {tuple(x.shape)}")
    if x.shape[0] < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} rows, got {x.shape[0]}")
    return x


def _pairwise(distance: Distance, a: torch.Tensor, b: torch.Tensor, what: str) -> torch.Tensor:
    d = distance(a, b)
    want = (a.shape[0], b.shape[0])
    if not isinstance(d, torch.Tensor) or tuple(d.shape) != want:
        got = tuple(d.shape) if isinstance(d, torch.Tensor) else type(d).__name__
        raise ValueError(f"distance({what}) must return a {want} matrix, got {got}")
    return d


def _levels(name: str, x) -> list:
    if isinstance(x, torch.Tensor) or not isinstance(x, Sequence):
        raise TypeError(f"{name} must be a list with one entry per hierarchy level, got {type(x).__name__}")
    if len(x) == 0:
        raise ValueError(f"{name} must hold at least one level")
    return list(x)


def _self_masked_logits(distance: Distance, q: torch.Tensor, tau: float, what: str) -> torch.Tensor:
    """-d(q_i, q_t) / tau with the diagonal (self-similarity) set to -inf: (n, n)."""
    d = _pairwise(distance, q, q, what)
    eye = torch.eye(q.shape[0], dtype=torch.bool, device=d.device)
    return (-d / tau).masked_fill(eye, float("-inf"))


def quantized_contrastive_loss(q1: torch.Tensor, q2: torch.Tensor, *, distance: Distance, tau: float) -> torch.Tensor:
    """Hyperbolic quantized contrastive loss L_aug (Eq. 13-15): NT-Xent over the 2B quantized embeddings.

    q1, q2: (B, ...) quantized embeddings of two augmented views of the same B images (row i of both is image
    i). Each of the 2B views is an anchor: its positive is the other view of the same image, its negatives the
    2B - 2 views of the other images; itself is excluded. Returns the mean over the 2B anchors (a scalar).
    """
    tau = _check_tau(tau)
    distance = _check_distance(distance)
    q1, q2 = _check_batch("q1", q1, 2), _check_batch("q2", q2, 2)
    if q1.shape != q2.shape:
        raise ValueError(
            f"q1 and q2 must have the same shape (two views of the same B images), "
            f"got {tuple(q1.shape)} and {tuple(q2.shape)}"
        )
    B = q1.shape[0]
    logits = _self_masked_logits(distance, torch.cat([q1, q2]), tau, "q, q")
    target = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(logits.device)
    return F.cross_entropy(logits, target)


def prototype_loss(
    q: torch.Tensor,
    prototypes: Sequence[torch.Tensor],
    assignments: Sequence[torch.Tensor],
    *,
    distance: Distance,
    tau: float,
) -> torch.Tensor:
    """Prototype-wise contrastive loss L_prot (Eq. 18).

    q: (B, ...) quantized embeddings. prototypes: per level l, (N_l, ...) prototypes on the manifold.
    assignments: per level, (B,) integer index of each anchor's prototype. Per level, the cross-entropy of q
    against all N_l prototypes of that level (each prototype once) with its own prototype as the target; the
    mean over anchors, then over levels (a scalar).
    """
    tau = _check_tau(tau)
    distance = _check_distance(distance)
    q = _check_batch("q", q)
    prototypes, assignments = _levels("prototypes", prototypes), _levels("assignments", assignments)
    if len(prototypes) != len(assignments):
        raise ValueError(
            f"prototypes and assignments must have one entry per level, got {len(prototypes)} levels of "
            f"prototypes and {len(assignments)} of assignments"
        )
    B = q.shape[0]
    per_level = []
    for level, (P, a) in enumerate(zip(prototypes, assignments, strict=True)):
        P = _check_batch(f"prototypes[{level}]", P)
        if P.shape[1:] != q.shape[1:]:
            raise ValueError(
                f"prototypes[{level}] has shape {tuple(P.shape)}; its rows must be shaped like q's rows "
                f"{tuple(q.shape[1:])}"
            )
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"assignments[{level}] must be a torch.Tensor, got {type(a).__name__}")
        if a.is_floating_point() or a.is_complex() or a.dtype == torch.bool:
            raise TypeError(f"assignments[{level}] must be an integer tensor, got {a.dtype}")
        if a.shape != (B,):
            raise ValueError(f"assignments[{level}] must have shape (B,) = ({B},), got {tuple(a.shape)}")
        n = P.shape[0]
        if a.min() < 0 or a.max() >= n:
            raise ValueError(
                f"assignments[{level}] must lie in [0, {n}) (the level has {n} prototypes), "
                f"got values in [{int(a.min())}, {int(a.max())}]"
            )
        logits = -_pairwise(distance, q, P, f"q, prototypes[{level}]") / tau
        per_level.append(F.cross_entropy(logits, a.to(device=logits.device, dtype=torch.long)))
    return torch.stack(per_level).mean()


INSTANCE_DENOMINATORS = ("ours", "paper")


def _check_denominator(denominator) -> str:
    if denominator not in INSTANCE_DENOMINATORS:
        raise ValueError(f"instance_denominator must be one of {INSTANCE_DENOMINATORS}, got {denominator!r}")
    return denominator


def instance_loss(
    q: torch.Tensor,
    positives: Sequence[torch.Tensor],
    *,
    distance: Distance,
    tau: float,
    denominator: str = "ours",
) -> torch.Tensor:
    """Instance-wise contrastive loss L_ins (Eq. 19).

    q: (B, ...) quantized embeddings. positives: per level, (B, ...) embeddings of a random other image
    assigned to the same prototype as anchor i (drawn from the whole pool, not necessarily in the batch).
    Per level and anchor, with the anchor itself masked:

    * ``denominator="ours"``: -log S(q_i, p_i) / (S(q_i, p_i) + sum_{t != i} S(q_i, q_t)), the positive
      included in the denominator (a proper InfoNCE, bounded below by 0);
    * ``denominator="paper"``: -log S(q_i, p_i) / sum_{t in B, t != i} S(q_i, q_t), Eq. 19 as printed (can be
      negative).

    The mean over anchors, then over levels (a scalar).
    """
    tau = _check_tau(tau)
    denominator = _check_denominator(denominator)
    distance = _check_distance(distance)
    q = _check_batch("q", q)
    positives = _levels("positives", positives)
    negatives = _self_masked_logits(distance, q, tau, "q, q")  # (B, B), shared by all levels
    target = torch.zeros(q.shape[0], dtype=torch.long, device=negatives.device)
    per_level = []
    for level, p in enumerate(positives):
        p = _check_batch(f"positives[{level}]", p)
        if p.shape != q.shape:
            raise ValueError(f"positives[{level}] must have the shape of q {tuple(q.shape)}, got {tuple(p.shape)}")
        pos = -_pairwise(distance, q, p, f"q, positives[{level}]").diagonal() / tau  # log S(q_i, p_i)
        if denominator == "paper":
            per_level.append((torch.logsumexp(negatives, dim=1) - pos).mean())
        else:
            per_level.append(F.cross_entropy(torch.cat([pos[:, None], negatives], dim=1), target))
    return torch.stack(per_level).mean()


def subspace_correlation(t: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Mean squared cross-correlation between the subspaces of a batch (ours, not in the paper).

    t: (B, M, D) per-subspace vectors (the tangent vectors at the origin). Each of the M * D coordinates is
    standardised over the batch; for every pair of subspaces m < m' the D x D cross-correlation matrix C is
    taken, and the result is sum(C**2) / D averaged over the pairs: 0 when the subspaces are uncorrelated, 1 when
    each coordinate of one is a linear function of one coordinate of another (for whitened subspaces, the mean
    squared canonical correlation; coordinates correlated within a subspace can take it above 1). A product code
    of M subspaces that learn the same directions spends its bits twice; the penalty asks each subspace for what
    the others do not already encode (measured in bench/subspace_redundancy.py; README: Levers at 16 bits).
    """
    t = _check_batch("t", t, 2)
    if t.dim() != 3 or t.shape[1] < 2:
        raise ValueError(f"t must be (B, M, D) with M >= 2 subspaces, got {tuple(t.shape)}")
    B, M, D = t.shape
    z = (t - t.mean(0)) / (t.var(0, unbiased=False) + eps).sqrt()  # (B, M, D) standardised per coordinate
    corr = torch.einsum("bmi,bnj->mnij", z, z) / B  # (M, M, D, D)
    pairs = torch.triu_indices(M, M, offset=1, device=t.device)
    return corr[pairs[0], pairs[1]].pow(2).sum((-2, -1)).mean() / D


class HiHPQLoss:
    """The HiHPQ objective L = L_aug + lambda1 L_prot + lambda2 L_ins (Eq. 20-21).

    Args:
        tau: temperature tau_qc of the similarity S = exp(-d / tau) (Eq. 15).
        lambda1: weight of the prototype-wise loss (0 switches it off).
        lambda2: weight of the instance-wise loss (0 switches it off).
        tau_hierarchy: temperature of the two hierarchy losses; None uses ``tau`` (as the authors do).
        distance: default pairwise distance; a ``distance`` passed to the call takes precedence.
        instance_denominator: "ours" (positive in the denominator) or "paper" (Eq. 19 as printed); see
            :func:`instance_loss`.
        decorrelation: weight of :func:`subspace_correlation` of the first view's tangent vectors (ours; 0, the
            default, switches it off).

    Vanilla (lambda1 = lambda2 = 0) or warm-up (no hierarchy passed yet) gives L_aug alone. The hierarchy
    losses use the first view's quantized embeddings as anchors, as in the authors' code.
    """

    def __init__(
        self,
        *,
        tau: float = 0.2,
        lambda1: float = 1.0,
        lambda2: float = 0.1,
        tau_hierarchy: float | None = None,
        distance: Distance | None = None,
        instance_denominator: str = "ours",
        decorrelation: float = 0.0,
    ):
        self.tau = _check_tau(tau)
        self.instance_denominator = _check_denominator(instance_denominator)
        self.tau_hierarchy = self.tau if tau_hierarchy is None else _check_tau(tau_hierarchy)
        for name, lam in (("lambda1", lambda1), ("lambda2", lambda2), ("decorrelation", decorrelation)):
            if isinstance(lam, bool) or not isinstance(lam, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(lam).__name__} {lam!r}")
            if not (math.isfinite(lam) and lam >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {lam}")
        self.lambda1, self.lambda2 = float(lambda1), float(lambda2)
        self.decorrelation = float(decorrelation)
        self.distance = None if distance is None else _check_distance(distance)

    def __call__(self, q1: torch.Tensor, q2: torch.Tensor, **inputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum of :meth:`terms` (same arguments). Returns (total, {"aug", "prot", "ins"} and "decorr"
        when its weight is set), the parts detached (0 where a part is off)."""
        terms = self.terms(q1, q2, **inputs)
        weights = {"aug": 1.0, "prot": self.lambda1, "ins": self.lambda2}
        if self.decorrelation > 0:
            weights["decorr"] = self.decorrelation
        total = sum(weights[k] * v for k, v in terms.items())
        zero = terms["aug"].new_zeros(())
        return total, {k: terms[k].detach() if k in terms else zero for k in weights}

    def terms(
        self,
        q1: torch.Tensor,
        q2: torch.Tensor,
        *,
        distance: Distance | None = None,
        prototypes: Sequence[torch.Tensor] | None = None,
        assignments: Sequence[torch.Tensor] | None = None,
        positives: Sequence[torch.Tensor] | None = None,
        tangents: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """The unweighted terms that are on, with their graphs: "aug" always, "prot" when lambda1 > 0 and
        prototypes are given, "ins" when lambda2 > 0 and positives are given, "decorr" when decorrelation > 0 and
        tangents (B, M, D) are given.

        q1, q2 (B, ...): quantized embeddings of the two views. distance: overrides the constructor's.
        prototypes/assignments: per level, for L_prot (both or neither). positives: per level (B, ...), for L_ins.
        """
        distance = distance if distance is not None else self.distance
        if distance is None:
            raise ValueError("no distance: pass distance= to HiHPQLoss(...) or to the call")
        if (prototypes is None) != (assignments is None):
            raise ValueError("prototypes and assignments must be given together (or both left out)")
        terms = {"aug": quantized_contrastive_loss(q1, q2, distance=distance, tau=self.tau)}
        if self.lambda1 > 0 and prototypes is not None:
            terms["prot"] = prototype_loss(q1, prototypes, assignments, distance=distance, tau=self.tau_hierarchy)
        if self.lambda2 > 0 and positives is not None:
            terms["ins"] = instance_loss(
                q1, positives, distance=distance, tau=self.tau_hierarchy, denominator=self.instance_denominator
            )
        if self.decorrelation > 0 and tangents is not None:
            terms["decorr"] = subspace_correlation(tangents)
        return terms

    def __repr__(self) -> str:
        return (
            f"HiHPQLoss(tau={self.tau}, lambda1={self.lambda1}, lambda2={self.lambda2}, "
            f"tau_hierarchy={self.tau_hierarchy}, instance_denominator={self.instance_denominator!r}, "
            f"decorrelation={self.decorrelation})"
        )
