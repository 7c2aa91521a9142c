"""Benchmark reports: everything ``hihpq bench`` / ``hihpq report`` write for one grid (:func:`write_report`):
table.md from :mod:`hihpq.report_tables` and the plots of :mod:`hihpq.report_plots`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hihpq.report_plots import _field, plot_map_vs_bits, plot_pr_curves, plot_precision_at_k, plot_training
from hihpq.report_tables import (
    _ABLATION,
    UNQUANTIZED,
    _detect_key,
    _method_order,
    _metric_label,
    aggregate,
    claims_table,
    markdown_table,
    method_name,
)

__all__ = ["write_report"]


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
