"""Benchmark reports: the paper-style Markdown table and the plots written by ``hihpq bench``.

- :func:`markdown_table`: one row per method, one column per code length, cells ``mean ± std (n)`` in percent,
  laid out like Tables 1 and 2 of the paper.
- :func:`plot_map_vs_bits`, :func:`plot_pr_curves`, :func:`plot_precision_at_k`, :func:`plot_training`: PNG
  files, each function returns the path it wrote.
- :func:`plot_poincare` (data from :func:`poincare_view`): one subspace of a trained quantizer on the Poincare
  disk, with embeddings coloured by class, the codewords and the prototypes of every hierarchy level.
- :func:`write_report`: all of the above for one benchmark grid (records + per-run details).

Figures are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas, never through pyplot, so
writing a report neither changes the process-wide backend nor leaks open figures.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "METHOD_NAMES",
    "PoincareView",
    "aggregate",
    "claims_table",
    "lorentz_to_poincare",
    "markdown_table",
    "method_name",
    "paired_differences",
    "plot_map_vs_bits",
    "plot_poincare",
    "plot_pr_curves",
    "plot_precision_at_k",
    "plot_training",
    "poincare_view",
    "write_report",
]

# Readable names, in the order of benchmark.METHODS (kept here so the report needs no training imports).
METHOD_NAMES: dict[str, str] = {
    "hihpq": "HiHPQ",
    "vanilla-euclidean": "Vanilla-Euclidean",
    "vanilla-hyperbolic": "Vanilla-Hyperbolic",
    "instance-euclidean": "Instance-Euclidean",
    "instance-hyperbolic": "Instance-Hyperbolic",
    "prototype-euclidean": "Prototype-Euclidean",
    "prototype-hyperbolic": "Prototype-Hyperbolic",
    "full-euclidean": "Full-Euclidean",
    "vanilla-euclidean-l2": "Vanilla-Euclidean (L2 twin)",
    "instance-euclidean-l2": "Instance-Euclidean (L2 twin)",
    "prototype-euclidean-l2": "Prototype-Euclidean (L2 twin)",
    "full-euclidean-l2": "Full-Euclidean (L2 twin)",
    "instance-hyperbolic-lambda2-0.1": "Instance-Hyperbolic (lambda2 0.1)",
    "instance-euclidean-lambda2-0.1": "Instance-Euclidean (lambda2 0.1)",
    "instance-euclidean-l2-lambda2-0.1": "Instance-Euclidean (L2 twin, lambda2 0.1)",
    "pq": "PCA+PQ",
    "opq": "PCA+OPQ",
    "itq": "ITQ",
    "float": "Float (cosine)",
}
# Methods that store uncompressed vectors: shown for reference, never bold, their "bits" is the vector size.
UNQUANTIZED = ("float",)
_ABLATION = tuple(m for m in METHOD_NAMES if "-" in m)  # the Table 2 variants
_LEVEL_MARKERS = ("o", "s", "^", "D", "P", "*", "v", "X")


def method_name(method: str) -> str:
    """Readable name of a benchmark method ("opq" -> "PCA+OPQ"); unknown names come back unchanged."""
    return METHOD_NAMES.get(method, method)


def _method_order(method: str) -> tuple[int, str]:
    names = list(METHOD_NAMES)
    return (names.index(method), "") if method in names else (len(names), method)


def _metric_label(key: str) -> str:
    """ "map_at_1000" -> "mAP@1000"."""
    if key.startswith("map_at_"):
        return f"mAP@{key[len('map_at_') :]}"
    return key


# ------------------------------------------------------------------------------------------------ records
def _check_records(records: Sequence[Mapping[str, Any]], key: str) -> list[Mapping[str, Any]]:
    if isinstance(records, Mapping) or not isinstance(records, Sequence):
        raise TypeError(f"records must be a list of dicts, got {type(records).__name__}")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, Mapping):
            raise TypeError(f"record {i} must be a dict, got {type(r).__name__}")
        missing = [k for k in ("method", "bits", key) if k not in r]
        if missing:
            raise ValueError(f"record {i} lacks {missing} (it has {sorted(r)}); expected method, bits and {key!r}")
        value = r[key]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"record {i}: {key} must be a finite number, got {value!r}")
        out.append(r)
    return out


def _detect_key(records: Sequence[Mapping[str, Any]]) -> str:
    """The mAP key the records carry ("map_at_1000" ...); refuses zero or several."""
    keys = sorted({k for r in records if isinstance(r, Mapping) for k in r if str(k).startswith("map_at_")})
    if len(keys) != 1:
        raise ValueError(f"cannot tell which figure to report: the records carry mAP keys {keys}; pass key=")
    return keys[0]


def aggregate(
    records: Sequence[Mapping[str, Any]], key: str = "map_at_1000"
) -> dict[tuple[str, int], tuple[float, float, int]]:
    """(method, bits) -> (mean, std, n) of ``key`` over the records (seeds) of each group.

    std is the sample standard deviation (ddof = 1), the honest spread for a handful of seeds; it is NaN
    when n = 1.
    """
    groups: dict[tuple[str, int], list[float]] = {}
    for r in _check_records(records, key):
        groups.setdefault((str(r["method"]), int(r["bits"])), []).append(float(r[key]))
    return {
        k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else math.nan, len(v)) for k, v in groups.items()
    }


def _cell(mean: float, std: float, n: int) -> str:
    if n == 1:
        return f"{100 * mean:.2f} (1)"
    return f"{100 * mean:.2f} ± {100 * std:.2f} ({n})"


# The paper's two claims as (label, method, reference) pairs: geometry (same losses) and hierarchy (same geometry).
CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("Hyperbolic - Euclidean, Vanilla", "vanilla-hyperbolic", "vanilla-euclidean"),
    ("Hyperbolic - Euclidean, Instance", "instance-hyperbolic", "instance-euclidean"),
    ("Hyperbolic - Euclidean, Prototype", "prototype-hyperbolic", "prototype-euclidean"),
    ("Hyperbolic - Euclidean, Full", "hihpq", "full-euclidean"),
    ("Full - Vanilla, hyperbolic", "hihpq", "vanilla-hyperbolic"),
    ("Full - Vanilla, Euclidean", "full-euclidean", "vanilla-euclidean"),
    ("Instance - Vanilla, hyperbolic", "instance-hyperbolic", "vanilla-hyperbolic"),
    ("Prototype - Vanilla, hyperbolic", "prototype-hyperbolic", "vanilla-hyperbolic"),
)


def paired_differences(
    records: Sequence[Mapping[str, Any]], method: str, reference: str, bits: int, key: str = "map_at_1000"
) -> tuple[float, float, int]:
    """(mean, std, n) of ``method - reference`` over the seeds both have at ``bits`` (paired by seed, so the
    spread of the difference is not inflated by what the two runs of a seed share); NaN std when n = 1, n = 0
    (NaN mean) when no seed is shared. A seed with several records of one method is refused."""
    per: dict[str, dict[Any, float]] = {method: {}, reference: {}}
    for r in _check_records(records, key):
        m = str(r["method"])
        if m in per and int(r["bits"]) == int(bits):
            if r.get("seed") in per[m]:
                raise ValueError(f"two records of {m} at {bits} bits with seed {r.get('seed')!r}")
            per[m][r.get("seed")] = float(r[key])
    seeds = sorted(set(per[method]) & set(per[reference]), key=str)
    diff = [per[method][s] - per[reference][s] for s in seeds]
    if not diff:
        return math.nan, math.nan, 0
    return float(np.mean(diff)), float(np.std(diff, ddof=1)) if len(diff) > 1 else math.nan, len(diff)


def claims_table(records: Sequence[Mapping[str, Any]], key: str = "map_at_1000", bits: Sequence[int] = (16, 32, 64)):
    """Markdown table of the paper's claims as measured: :data:`CLAIMS` rows, cells "+d ± s (n)" in points
    (paired by seed), "-" where the pair was not run; None when no row has a pair."""
    rows = []
    for label, method, reference in CLAIMS:
        cells = []
        for b in bits:
            mean, std, n = paired_differences(records, method, reference, b, key)
            if n == 0:
                cells.append("-")
            else:
                cells.append(f"{100 * mean:+.2f} ({n})" if n == 1 else f"{100 * mean:+.2f} ± {100 * std:.2f} ({n})")
        if any(c != "-" for c in cells):
            rows.append(f"| {label} | " + " | ".join(cells) + " |")
    if not rows:
        return None
    head = "| Difference | " + " | ".join(f"{b} bits" for b in bits) + " |\n|---|" + "---:|" * len(bits)
    return head + "\n" + "\n".join(rows)


def markdown_table(
    records: Sequence[Mapping[str, Any]],
    key: str = "map_at_1000",
    bits: Sequence[int] = (16, 32, 64),
    *,
    methods: Sequence[str] | None = None,
    names: Mapping[str, str] | None = None,
) -> str:
    """A Markdown table laid out like the paper's Tables 1 and 2.

    Args:
        records: dicts with "method", "bits" and ``key`` (one per run; seeds of a (method, bits) are pooled).
        key: the figure to report (a fraction in [0, 1]; shown in percent).
        bits: the code lengths, one column each.
        methods: rows to show, in this order (default: every method in the records, benchmark order).
        names: readable row names overriding :data:`METHOD_NAMES`.

    Returns:
        The table as a string: cells "mean ± std (n)" in percent with 2 decimals (std over seeds with ddof = 1;
        "mean (1)" for a single run), "-" where a (method, bits) has no record, and the best code per column in
        bold (ties at the shown precision all bold). Uncompressed float vectors ("float") do not depend on the
        code length: their row repeats the same figure in every column, names the vector size and never
        competes for bold.
    """
    stats = aggregate(records, key)
    bits = [int(b) for b in bits]
    if not bits:
        raise ValueError("bits must name at least one code length")
    present = sorted({m for m, _ in stats}, key=_method_order)
    rows = present if methods is None else [m for m in methods if m in present]
    names = {**METHOD_NAMES, **(names or {})}

    table: list[tuple[str, list[tuple[float, float, int] | None], bool]] = []  # (name, cells, competes)
    for m in rows:
        if m in UNQUANTIZED:
            for size in sorted(b for mm, b in stats if mm == m):
                dim = f"{size // 32}-d float32, " if size % 32 == 0 else ""
                label = f"{names.get(m, m)}, {dim}{size} bits"
                table.append((label, [stats[m, size]] * len(bits), False))
        else:
            table.append((names.get(m, m), [stats.get((m, b)) for b in bits], True))

    best = []
    for j in range(len(bits)):
        vals = [round(100 * cells[j][0], 2) for _, cells, competes in table if competes and cells[j] is not None]
        best.append(max(vals) if vals else None)

    head = f"| Method | {' | '.join(f'{b} bits' for b in bits)} |"
    lines = [head, "|---|" + "---:|" * len(bits)]
    for label, cells, competes in table:
        shown = []
        for j, cell in enumerate(cells):
            if cell is None:
                shown.append("-")
                continue
            text = _cell(*cell)
            bold = competes and best[j] is not None and round(100 * cell[0], 2) == best[j]
            shown.append(f"**{text}**" if bold else text)
        lines.append(f"| {label} | {' | '.join(shown)} |")
    return "\n".join(lines) + "\n"


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
def lorentz_to_poincare(x, c=1.0, *, unit: bool = True) -> np.ndarray:
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
    by ``p = x_space / (x0 + 1/sqrt(c))`` (:func:`lorentz_to_poincare`). The Euclidean twin gets the (centred)
    PCA plane.
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
    if lorentz:
        from hihpq.geometry import lorentz as L

        def disk(u: np.ndarray) -> np.ndarray:
            v = torch.from_numpy(np.concatenate([np.zeros((len(u), 1)), u], axis=1))
            return lorentz_to_poincare(L.expmap0(v, c=c), c)

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


# ------------------------------------------------------------------------------------------------- report
def _load_details(details: Sequence[Mapping[str, Any]] | str | Path) -> list[Mapping[str, Any]]:
    if isinstance(details, (str, Path)):
        folder = Path(details)
        if not folder.is_dir():
            raise FileNotFoundError(f"no details folder at {folder}")
        return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    return list(details)


def _mean_curve(curves: list[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    """Mean over seeds of curves with the same ks (curves with other ks are left out)."""
    ks = _field(curves[0], "ks", "k")
    same = [c for c in curves if np.array_equal(_field(c, "ks", "k"), ks)]
    out = {"ks": ks}
    for name in ("precision", "recall"):
        if all((c.get(name) if isinstance(c, Mapping) else None) is not None for c in same):
            out[name] = np.mean([_field(c, name) for c in same], axis=0)
    return out


def write_report(
    out_dir: str | Path,
    records: Sequence[Mapping[str, Any]],
    details: Sequence[Mapping[str, Any]] | str | Path = (),
    *,
    key: str | None = None,
    title: str | None = None,
) -> list[Path]:
    """Write ``table.md`` and the plots of a benchmark grid into ``out_dir``; returns the written paths.

    Args:
        records: the grid's records ({"method", "bits", key, "seed", ...}, one per run).
        details: per-run detail dicts as written by :func:`hihpq.benchmark.run_grid` (or the folder holding
            them): "method", "bits", "seed" and "scores" with optional "pr_curve" / "precision_curve"
            ({"ks", "precision"[, "recall"]}) and "history" (per-epoch dicts).
        key: the figure (default: the records' only ``map_at_*`` key).
        title: heading of table.md.

    Writes table.md (the comparison with the baselines like the paper's Table 1, the ablation like its Table 2
    when variants were run, the commands and commits), map_vs_bits.png, and per code length
    pr_curves-<b>bits.png, precision_at_k-<b>bits.png (curves averaged over seeds; float features in each) and
    training-<b>bits.png (first seed of each learned method).
    """
    out_dir = Path(out_dir)
    records = list(records)
    key = key or _detect_key(records)
    stats = aggregate(records, key)
    det = _load_details(details)
    out_dir.mkdir(parents=True, exist_ok=True)
    bits = sorted({b for m, b in stats if m not in UNQUANTIZED})
    methods = {m for m, _ in stats}
    paths: list[Path] = []

    main_rows = [m for m in sorted(methods, key=_method_order) if m not in _ABLATION]
    ablation_rows = [m for m in (*_ABLATION, "hihpq") if m in methods]
    parts = [f"# {title or 'Benchmark results'}"]  # Markdown blocks, joined by blank lines
    caption = f"{_metric_label(key)} (%), mean ± std over seeds (number of runs); best code per column in bold."
    if bits and main_rows:
        parts += ["## Comparison with the baselines (as the paper's Table 1)", caption]
        parts.append(markdown_table(records, key, bits, methods=main_rows))
    if bits and any(m in _ABLATION for m in methods):
        parts += ["## Ablation (as the paper's Table 2)", caption]
        parts.append(
            markdown_table(records, key, bits, methods=ablation_rows, names={"hihpq": "Full-Hyperbolic (HiHPQ)"})
        )
    claims = claims_table(records, key, bits) if bits else None
    if claims:
        parts += [
            "## The paper's claims, as measured",
            f"Difference in {_metric_label(key)} (points), mean ± std over the seeds both methods ran (paired by "
            "seed; number of pairs). Positive: the first method is better.",
            claims,
        ]
    if not bits:  # only float features: still show them
        parts.append(markdown_table(records, key, [max(b for _, b in stats)]))

    if len(bits) >= 1:
        paths.append(plot_map_vs_bits(records, out_dir / "map_vs_bits.png", key))
        parts.append("![mAP against code length](map_vs_bits.png)")
    for b in bits:
        group = [d for d in det if d.get("bits") == b or d.get("method") in UNQUANTIZED]
        group.sort(key=lambda d: (_method_order(d["method"]), d.get("seed", 0)))
        curves: dict[str, dict[str, list]] = {"pr_curve": {}, "precision_curve": {}}
        histories: dict[str, list] = {}
        for d in group:
            scores = d.get("scores") or {}
            name = method_name(d["method"])
            for field in curves:
                if scores.get(field) is not None:
                    curves[field].setdefault(name, []).append(scores[field])
            if scores.get("history") and name not in histories:
                histories[name] = scores["history"]
        pr = {name: _mean_curve(cs) for name, cs in curves["pr_curve"].items()}
        pk = {name: _mean_curve(cs) for name, cs in curves["precision_curve"].items()}
        if pr:
            paths.append(plot_pr_curves(pr, out_dir / f"pr_curves-{b}bits.png", title=f"{b}-bit codes"))
        if pk:
            p = plot_precision_at_k(pk, out_dir / f"precision_at_k-{b}bits.png", title=f"{b}-bit codes")
            paths.append(p)
        if histories:
            paths.append(plot_training(histories, out_dir / f"training-{b}bits.png"))
    plots = [p.name for p in paths if p.name != "map_vs_bits.png"]
    if plots:
        parts.append("Plots: " + ", ".join(f"[{n}]({n})" for n in plots))
    for disk in sorted(out_dir.glob("poincare-*.png")):  # drawn by the caller, which holds the model
        parts.append(f"![Poincare-disk view: {disk.stem}]({disk.name})")

    commands = sorted({str(r.get("command")) for r in records if r.get("command")})
    commits = sorted({str(r.get("commit")) for r in records if r.get("commit")})
    if commands or commits:
        lines = [f"- command: `{c}`" for c in commands] + [f"- commit: `{c}`" for c in commits]
        parts += ["## Provenance", "\n".join(lines)]
    table = out_dir / "table.md"
    table.write_text("\n\n".join(p.strip() for p in parts) + "\n")
    return [table, *paths]
