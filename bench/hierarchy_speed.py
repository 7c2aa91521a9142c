"""Speed of the hierarchy (K-means + bottom-up merging) vs the authors' approach (scipy Ward on all points).

Run: ``python bench/hierarchy_speed.py`` (options: --n, --dim, --levels, --repeats, --threads, --ward-n,
--sklearn). On a machine shared with other busy processes, ``OMP_WAIT_POLICY=PASSIVE`` or ``--threads 1`` keep
faiss's spinning OpenMP threads from fighting them (both are recorded in the JSON).
Fits HierarchicalClustering on seeded random float32 features (default 50,000 x 64 into levels 200, 100, 50),
times scipy Ward linkage (what the authors' code runs on all N) on a subsample and measures its memory, which
grows as N^2. Prints figures; the LAST line is JSON, also saved to bench/results/hierarchy_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tracemalloc
from pathlib import Path

import numpy as np

from hihpq.hierarchy import HierarchicalClustering, _centroid_merge


def _fit_seconds(
    X: np.ndarray, levels: tuple[int, ...], backend: str, threads: int | None
) -> tuple[float, HierarchicalClustering]:
    t0 = time.perf_counter()
    h = HierarchicalClustering(levels, backend=backend, seed=0, n_threads=threads).fit(X)
    return time.perf_counter() - t0, h


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--levels", type=int, nargs="+", default=[200, 100, 50])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="n_threads for K-means (default: all cores)")
    ap.add_argument("--ward-n", type=int, default=5_000, help="subsample size for scipy Ward (0: skip)")
    ap.add_argument("--sklearn", action="store_true", help="also time backend='sklearn' (slow)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hierarchy_speed.json")
    args = ap.parse_args(argv)
    levels = tuple(args.levels)

    import faiss

    threads = args.threads or faiss.omp_get_max_threads()
    wait_policy = os.environ.get("OMP_WAIT_POLICY", "")
    print(f"cpu cores {os.cpu_count()}, K-means threads {threads}, OMP_WAIT_POLICY={wait_policy or '-'}")
    X = np.random.default_rng(0).standard_normal((args.n, args.dim)).astype(np.float32)

    times, h = [], None
    for _ in range(args.repeats):
        t, h = _fit_seconds(X, levels, "faiss", args.threads)
        times.append(t)
    seconds = statistics.median(times)
    print(
        f"HierarchicalClustering(faiss) {args.n} x {args.dim} -> levels {levels}, "
        f"{h.n_subclusters_} sub-clusters: median {seconds:.2f} s over {args.repeats} "
        f"({', '.join(f'{t:.2f}' for t in times)})"
    )
    # The merge alone, from the fitted sub-clusters (the rest is K-means + assignment + bookkeeping).
    sizes = np.bincount(h.subcluster_labels_)
    t0 = time.perf_counter()
    _centroid_merge(h.subcluster_centers_.astype(np.float64), sizes, levels)
    merge_seconds = time.perf_counter() - t0
    print(f"  of which bottom-up merge of {h.n_subclusters_} sub-clusters: {merge_seconds:.3f} s")
    result: dict = {
        "n": args.n,
        "dim": args.dim,
        "seconds": round(seconds, 4),
        "levels": list(levels),
        "n_subclusters": int(h.n_subclusters_),
        "merge_seconds": round(merge_seconds, 4),
        "repeats": [round(t, 4) for t in times],
        "threads": threads,
        "omp_wait_policy": wait_policy,
        "load_avg_1min": round(os.getloadavg()[0], 2),
    }
    if args.sklearn:
        t, _ = _fit_seconds(X, levels, "sklearn", args.threads)
        print(f"HierarchicalClustering(sklearn): {t:.2f} s")
        result["sklearn_seconds"] = round(t, 4)

    if args.ward_n:
        from scipy.cluster.hierarchy import fcluster, linkage

        m = min(args.ward_n, args.n)
        sub = X[np.random.default_rng(1).choice(args.n, m, replace=False)].astype(np.float64)
        tracemalloc.start()
        t0 = time.perf_counter()
        Z = linkage(sub, method="ward")
        for lv in levels:
            fcluster(Z, lv, criterion="maxclust")
        ward_seconds = time.perf_counter() - t0
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        scale = (args.n / m) ** 2
        print(
            f"scipy Ward (authors' approach) on {m} points: {ward_seconds:.2f} s, "
            f"peak memory {peak / 2**20:.0f} MiB; "
            f"O(N^2) -> at N = {args.n}: ~{peak * scale / 2**30:.1f} GiB and >= ~{ward_seconds * scale:.0f} s"
        )
        result.update(
            ward_n=m,
            ward_seconds=round(ward_seconds, 4),
            ward_peak_bytes=int(peak),
            ward_bytes_extrapolated=int(peak * scale),
            ward_seconds_extrapolated=round(ward_seconds * scale, 1),
        )

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
