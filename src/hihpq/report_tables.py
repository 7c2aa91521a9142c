"""Benchmark statistics and tables: per-method mean ± std over seeds, paired differences, the paper-style Markdown
table (one row per method, one column per code length, cells ``mean ± std (n)`` in percent, laid out like Tables 1
and 2 of the paper)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["METHOD_NAMES", "UNQUANTIZED", "aggregate", "claims_table", "markdown_table", "method_name",
           "paired_differences"]  # fmt: skip

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
    ("Instance - Vanilla, Euclidean", "instance-euclidean", "vanilla-euclidean"),
    ("Prototype - Vanilla, Euclidean", "prototype-euclidean", "vanilla-euclidean"),
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
