"""Benchmark plots: PNG files, each function returns the path it wrote.

- :func:`plot_map_vs_bits`, :func:`plot_pr_curves`, :func:`plot_precision_at_k`, :func:`plot_training`.
- :func:`plot_poincare` (data from :func:`poincare_view`): one subspace of a trained quantizer on the Poincare
  disk, with embeddings coloured by class, the codewords and the prototypes of every hierarchy level.

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through pyplot, so
drawing neither changes the process-wide backend nor leaks open figures.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hihpq.geometry.lorentz import to_poincare
from hihpq.report_tables import UNQUANTIZED, _detect_key, _method_order, _metric_label, aggregate, method_name

__all__ = ["PoincareView", "plot_map_vs_bits", "plot_poincare", "plot_pr_curves", "plot_precision_at_k",
           "plot_training", "poincare_view"]  # fmt: skip

_LEVEL_MARKERS = ("o", "s", "^", "D", "P", "*", "v", "X")


# ------------------------------------------------------------------------------------------------ figures
def _figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG: the path must end in .png, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def plot_map_vs_bits(records: Sequence[Mapping[str, Any]], path: str | Path, key: str | None = None) -> Path:
    """mAP against code length, one line per method with ±std error bars; float features as a dashed line.

    records: as for :func:`markdown_table`; key: the figure (default: the records' only ``map_at_*`` key).
    """
    key = key or _detect_key(records)
    stats = aggregate(records, key)
    if not stats:
        raise ValueError("no records to plot")
    methods = sorted({m for m, _ in stats}, key=_method_order)
    coded = [m for m in methods if m not in UNQUANTIZED]
    colours = dict(zip(methods, _colours(len(methods)), strict=True))
    fig = _figure((7, 4.5))
    ax = fig.add_subplot()
    all_bits = sorted({b for m, b in stats if m not in UNQUANTIZED})
    for m in coded:
        pts = sorted((b, s) for (mm, b), s in stats.items() if mm == m)
        x = [b for b, _ in pts]
        y = [100 * s[0] for _, s in pts]
        err = [0.0 if s[2] == 1 else 100 * s[1] for _, s in pts]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colours[m], label=method_name(m))
    for m in methods:
        if m in UNQUANTIZED:
            for (mm, size), s in stats.items():
                if mm == m:
                    ax.axhline(100 * s[0], ls="--", color=colours[m], label=f"{method_name(m)} ({size} bits)")
    if all_bits:
        ax.set_xscale("log", base=2)
        ax.set_xticks(all_bits, [str(b) for b in all_bits])
        ax.minorticks_off()
    ax.set_xlabel("code length (bits)")
    ax.set_ylabel(f"{_metric_label(key)} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)


def _field(curve: Any, *names: str) -> np.ndarray:
    for name in names:
        value = curve.get(name) if isinstance(curve, Mapping) else getattr(curve, name, None)
        if value is not None:
            arr = np.asarray(value, dtype=np.float64)
            if arr.ndim != 1 or arr.size == 0:
                raise ValueError(f"curve field {name!r} must be a non-empty 1-D sequence, got shape {arr.shape}")
            return arr
    raise ValueError(f"a curve needs a field {' or '.join(repr(n) for n in names)}; got {type(curve).__name__}")


def _check_curves(curves: Mapping[str, Any]) -> None:
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves must be a non-empty dict {label: curve}")


def _plot_curves(curves, path, xy, *, xlabel: str, ylabel: str, title: str, log_x: bool = False) -> Path:
    """One line per {label: curve}: ``xy(label, curve)`` gives the checked (x, y in [0, 1]) arrays."""
    _check_curves(curves)
    fig = _figure((6, 4.5))
    ax = fig.add_subplot()
    for (label, curve), colour in zip(curves.items(), _colours(len(curves)), strict=True):
        x, y = xy(label, curve)
        ax.plot(x, 100 * y, marker=".", ms=3, color=colour, label=str(label))
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_pr_curves(curves: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Precision-recall curves by rank.

    curves: {label: PRCurve-like}, each with 1-D ``precision`` and ``recall`` of equal length (a
    :class:`hihpq.metrics.PRCurve`, or a dict with those keys, e.g. read back from a details JSON).
    """

    def xy(label, curve):
        p, r = _field(curve, "precision"), _field(curve, "recall")
        if p.shape != r.shape:
            raise ValueError(f"curve {label!r}: precision {p.shape} and recall {r.shape} differ in length")
        return r, p

    return _plot_curves(
        curves, path, xy, xlabel="recall", ylabel="precision (%)", title=title or "precision-recall by rank"
    )


def plot_precision_at_k(curves: Mapping[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Precision@K against K (log scale).

    curves: {label: curve} with 1-D ``ks`` (or ``k``) and ``precision`` of equal length (PRCurve-like).
    """

    def xy(label, curve):
        ks, p = _field(curve, "ks", "k"), _field(curve, "precision")
        if p.shape != ks.shape:
            raise ValueError(f"curve {label!r}: ks {ks.shape} and precision {p.shape} differ in length")
        if ks.min() < 1:
            raise ValueError(f"curve {label!r}: every K must be >= 1, got {ks.min()}")
        return ks, p

    return _plot_curves(
        curves,
        path,
        xy,
        xlabel="K (retrieved items)",
        ylabel="precision@K (%)",
        title=title or "precision@K",
        log_x=True,
    )


def plot_training(histories: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path) -> Path:
    """Training curves per epoch: total loss, its parts, quantization error and curvature.

    histories: {label: per-epoch dicts} as returned by ``Trainer.fit`` (keys "loss", "aug", "prot", "ins",
    "quant_error", "curvature" (list of M floats), optional "epoch"). Missing keys are skipped. In the
    curvature panel the line is the mean over subspaces and the band spans min to max; runs whose curvature
    never changes (the Euclidean twin, a fixed c) are left out of it.
    """
    if not isinstance(histories, Mapping) or not any(len(h) for h in histories.values()):
        raise ValueError("histories must be a dict {label: [per-epoch dicts]} with at least one epoch")
    fig = _figure((11, 7.5))
    axes = fig.subplots(2, 2)
    (ax_loss, ax_parts), (ax_qerr, ax_curv) = axes
    styles = {"aug": "-", "prot": "--", "ins": ":"}
    for (label, hist), colour in zip(histories.items(), _colours(len(histories)), strict=True):
        hist = list(hist)
        if not hist:
            continue
        epochs = [h.get("epoch", i + 1) for i, h in enumerate(hist)]

        def series(name: str, hist=hist) -> list[float] | None:
            vals = [h.get(name) for h in hist]
            return None if any(v is None for v in vals) else [float(v) for v in vals]

        if (loss := series("loss")) is not None:
            ax_loss.plot(epochs, loss, color=colour, label=label)
        for part, ls in styles.items():
            vals = series(part)
            if vals is not None and any(vals):  # a part that is off is all zeros
                ax_parts.plot(epochs, vals, ls=ls, color=colour, label=f"{label}: {part}")
        if (qerr := series("quant_error")) is not None:
            ax_qerr.plot(epochs, qerr, color=colour, label=label)
        curv = [h.get("curvature") for h in hist]
        if all(c is not None and len(c) for c in curv):
            c = np.asarray(curv, dtype=np.float64)  # (epochs, M)
            if np.ptp(c) > 0:
                ax_curv.plot(epochs, c.mean(1), color=colour, label=label)
                ax_curv.fill_between(epochs, c.min(1), c.max(1), color=colour, alpha=0.2)
    from matplotlib.ticker import MaxNLocator

    for ax, title in (
        (ax_loss, "total loss"),
        (ax_parts, "loss parts (aug solid, prot dashed, ins dotted)"),
        (ax_qerr, "quantization error (product distance to the code)"),
        (ax_curv, "curvature c per subspace (mean, min-max band)"),
    ):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    return _save(fig, path)


# -------------------------------------------------------------------------------------------- Poincare disk


@dataclass
class PoincareView:
    """2-D coordinates of one subspace, ready to draw.

    points (n, 2), codewords (K, 2), prototypes: per hierarchy level (finest first) (N_l, 2). For the Lorentz
    model they lie in the unit Poincare disk; for the Euclidean twin they are coordinates in the PCA plane.
    ``reduced``: whether the subspace had more than 2 dimensions and was reduced by PCA (in the tangent space
    at the origin for Lorentz); ``kept``: the share of the squared norm (Lorentz, uncentred) or variance
    (Euclidean) of the embeddings that the 2-D plane keeps.
    """

    points: np.ndarray
    codewords: np.ndarray
    prototypes: list[np.ndarray]
    geometry: str
    curvature: float
    subspace: int
    n_subspaces: int
    dim: int  # manifold dimension of the subspace (D - 1 for Lorentz, D for Euclidean)
    reduced: bool
    kept: float


def _plane(vectors: np.ndarray, centre: bool) -> tuple[np.ndarray, np.ndarray, float]:
    """(mean (d,), basis (d, 2), kept share) of the top-2 principal directions of vectors (n, d)."""
    mean = vectors.mean(0) if centre else np.zeros(vectors.shape[1])
    x = vectors - mean
    # Eigenvectors of the (d, d) scatter matrix: defined for any n, including a single point.
    evals, evecs = np.linalg.eigh(x.T @ x)
    basis = evecs[:, ::-1][:, :2]
    # Eigenvector signs are arbitrary: make the largest entry of each direction positive (reproducible plots).
    basis = basis * np.sign(basis[np.abs(basis).argmax(0), [0, 1]])
    total = float(np.clip(evals, 0, None).sum())
    return mean, basis, float(np.clip(evals[::-1][:2], 0, None).sum() / total) if total > 0 else 1.0


def _tangent_prototypes(hierarchy: Any) -> list[np.ndarray]:
    """Per level (N_l, M*D) tangent prototypes of a fitted HierarchicalClustering, a training Hierarchy, or a
    list of arrays."""
    protos = getattr(hierarchy, "prototypes_", None)
    if protos is None:
        protos = getattr(hierarchy, "prototypes", None)
    if protos is None:
        protos = hierarchy
    if isinstance(protos, (np.ndarray, torch.Tensor)) or not isinstance(protos, Sequence):
        raise TypeError(
            "hierarchy must be a fitted HierarchicalClustering, a training Hierarchy or a list of (N_l, M*D) "
            f"prototype arrays, got {type(hierarchy).__name__}"
        )
    out = []
    for p in protos:
        p = p.detach().cpu().numpy() if isinstance(p, torch.Tensor) else np.asarray(p)
        if p.ndim != 2:
            raise ValueError(f"hierarchy prototypes must be 2-D (N_l, M*D) arrays, got shape {p.shape}")
        out.append(p.astype(np.float32))
    return out


@torch.no_grad()
def poincare_view(
    model,
    features,
    *,
    subspace: int = 0,
    hierarchy: Any = None,
    levels: Sequence[int] | None = (100, 50, 25),
    seed: int = 0,
    batch_size: int = 4096,
) -> PoincareView:
    """Coordinates of one subspace of a trained quantizer for :func:`plot_poincare`.

    Args:
        model: a :class:`hihpq.models.hihpq.HiHPQ` (features are backbone features (n, F)) or a bare
            :class:`hihpq.quantizer.ProductQuantizer` (features are ambient embeddings (n, M*D)).
        features: (n, F) or (n, M*D) float array or tensor.
        subspace: which of the M subspaces, 0-based.
        hierarchy: prototypes to show: a fitted :class:`hihpq.hierarchy.HierarchicalClustering`, the
            training loop's ``Hierarchy``, or a list of (N_l, M*D) tangent prototypes. None: fit a
            HierarchicalClustering with ``levels`` on the tangent features of ``features`` (as training does).
        levels: level sizes for that fit (finest first); None or () shows no prototypes.
        seed: K-means seed of that fit.

    Lorentz subspaces go to the Poincare disk: embeddings, codewords and prototypes are taken to the tangent
    space at the origin (log0); when the hyperbolic dimension d = D - 1 exceeds 2 they are projected on the
    top-2 principal directions of the embeddings' tangent vectors (uncentred, so that the origin stays the
    origin and norms can only shrink), mapped back with exp0 in 2-D under the same curvature, then to the disk
    by ``p = x_space / (x0 + 1/sqrt(c))`` (:func:`hihpq.geometry.lorentz.to_poincare`). The Euclidean twin gets the
    (centred) PCA plane.
    """
    from hihpq.quantizer import ProductQuantizer

    q = model if isinstance(model, ProductQuantizer) else getattr(model, "quantizer", None)
    if not isinstance(q, ProductQuantizer):
        raise TypeError(f"model must be a HiHPQ model or a ProductQuantizer, got {type(model).__name__}")
    M, D = q.n_subspaces, q.subspace_dim
    if isinstance(subspace, bool) or not isinstance(subspace, (int, np.integer)) or not 0 <= subspace < M:
        raise ValueError(f"subspace must be an int in [0, {M}), got {subspace!r}")
    m = int(subspace)
    x = features if isinstance(features, torch.Tensor) else torch.as_tensor(np.asarray(features))
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"features must have shape (n, F) with n >= 1, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"features must be floating point, got {x.dtype}")
    tangent = q.tangent if model is q else model.tangent
    device = q.codebook_tangent.device

    was_training = model.training
    model.eval()  # BatchNorm / dropout in eval mode, as for encoding
    try:
        t = torch.cat([tangent(x[i : i + batch_size].float().to(device)) for i in range(0, len(x), batch_size)])
        codes_t = q.geo.logmap0(q.codebooks(), c=q.curvature.reshape(M, 1, 1))  # (M, K, D)
        if hierarchy is None and levels:
            from hihpq.hierarchy import HierarchicalClustering

            hierarchy = HierarchicalClustering(levels=tuple(levels), seed=seed).fit(t.flatten(1).cpu())
        protos = []
        for p in _tangent_prototypes(hierarchy) if hierarchy is not None else []:
            if p.shape[1] != M * D:
                raise ValueError(f"hierarchy prototypes have {p.shape[1]} columns, the model needs M*D = {M * D}")
            # Clipped like the embeddings, as the training loop does before exp0 (Eq. 17).
            protos.append(q.tangent(torch.from_numpy(p).to(device).reshape(-1, M, D))[:, m])
    finally:
        model.train(was_training)

    c = float(q.curvature[m])
    lorentz = q.geometry == "lorentz"
    first = 1 if lorentz else 0  # the Lorentz time coordinate of a tangent vector at the origin is 0
    pts = t[:, m, first:].double().cpu().numpy()
    cws = codes_t[m, :, first:].double().cpu().numpy()
    prs = [p[:, first:].double().cpu().numpy() for p in protos]
    dim = pts.shape[1]
    reduced = dim > 2
    if reduced:
        mean, basis, kept = _plane(pts, centre=not lorentz)
        pts, cws = (pts - mean) @ basis, (cws - mean) @ basis
        prs = [(p - mean) @ basis for p in prs]
    else:
        kept = 1.0
        if dim == 1:  # a one-dimensional subspace: its points lie on the disk's horizontal diameter
            pts, cws = (np.pad(a, ((0, 0), (0, 1))) for a in (pts, cws))
            prs = [np.pad(p, ((0, 0), (0, 1))) for p in prs]
    if lorentz:
        from hihpq.geometry import lorentz as L

        def disk(u: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.concatenate([np.zeros((len(u), 1)), u], axis=1))
            return to_poincare(L.expmap0(v, c=c), c)

        pts, cws, prs = disk(pts), disk(cws), [disk(p) for p in prs]
    return PoincareView(pts, cws, prs, q.geometry, c, m, M, dim, reduced, kept)


def plot_poincare(
    model,
    features,
    labels,
    path: str | Path,
    *,
    subspace: int = 0,
    hierarchy: Any = None,
    levels: Sequence[int] | None = (100, 50, 25),
    max_points: int = 2000,
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """One subspace of a trained quantizer on the Poincare disk (the PCA plane for the Euclidean twin).

    Embeddings of ``features`` (n, F) coloured by class, the K codewords (black crosses) and the prototypes
    of each hierarchy level (one marker per level, finest smallest). labels: (n,) integer classes, or an
    (n, L) 0/1 matrix (coloured by the first label). At most ``max_points`` embeddings are drawn (a seeded
    random subset); the PCA plane and the hierarchy use all of them. Other arguments: :func:`poincare_view`.
    """
    labels = np.asarray(labels)
    n = len(features)
    if labels.ndim not in (1, 2) or len(labels) != n:
        raise ValueError(f"labels must have shape (n,) or (n, L) with n = {n} features, got {labels.shape}")
    if labels.ndim == 2:
        labels = labels.argmax(1)  # multi-label: colour by the first label
    if isinstance(max_points, bool) or not isinstance(max_points, (int, np.integer)) or max_points < 1:
        raise ValueError(f"max_points must be a positive int, got {max_points!r}")
    view = poincare_view(model, features, subspace=subspace, hierarchy=hierarchy, levels=levels, seed=seed)
    show = np.arange(n)
    if n > max_points:
        show = np.sort(np.random.default_rng(seed).choice(n, max_points, replace=False))

    fig = _figure((8, 6.5))
    ax = fig.add_subplot()
    classes = np.unique(labels)
    colours = _colours(len(classes)) if len(classes) <= 20 else None
    if colours is not None:
        for cls, colour in zip(classes, colours, strict=True):
            sel = show[labels[show] == cls]
            ax.scatter(*view.points[sel].T, s=7, alpha=0.6, color=colour, lw=0, label=f"class {cls}")
    else:
        ax.scatter(*view.points[show].T, s=7, alpha=0.6, c=labels[show], cmap="turbo", lw=0)
    K = len(view.codewords)
    ax.scatter(*view.codewords.T, marker="x", s=22, lw=0.9, color="black", label=f"{K} codewords")
    level_colours = ("#444444", "#b2182b", "#2166ac", "#1b7837", "#762a83", "#e08214", "#000000", "#8c510a")
    for lvl, p in enumerate(view.prototypes):
        ax.scatter(
            *p.T,
            marker=_LEVEL_MARKERS[lvl % len(_LEVEL_MARKERS)],
            s=28 + 22 * lvl,
            facecolors="none",
            edgecolors=level_colours[lvl % len(level_colours)],
            lw=1.2,
            label=f"level {lvl + 1}: {len(p)} prototypes",
        )
    where = f"subspace {view.subspace + 1}/{view.n_subspaces}"
    if view.geometry == "lorentz":
        from matplotlib.patches import Circle

        ax.add_patch(Circle((0, 0), 1.0, fill=False, lw=1, color="grey"))
        ax.set_xlim(-1.05, 1.05)
        ax.set_ylim(-1.05, 1.05)
        head = f"Poincare disk, {where}, c = {view.curvature:.3g}"
        if view.reduced:
            head += (
                f"\n{view.dim}-d: PCA of the tangent space at the origin to 2-d "
                f"({100 * view.kept:.0f}% of the squared norm), then exp0"
            )
    else:
        head = f"Euclidean twin, {where}: " + (
            f"PCA plane of the {view.dim}-d subspace ({100 * view.kept:.0f}% of the variance)"
            if view.reduced
            else "the 2-d subspace"
        )
    ax.set_aspect("equal")
    ax.set_title(f"{title}\n{head}" if title else head, fontsize=9)
    ax.legend(fontsize=6, markerscale=1.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, path)
