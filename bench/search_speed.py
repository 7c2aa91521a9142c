"""Speed of the hyperbolic ADC top-k scan vs faiss IndexPQ, single-threaded and with two threads.

Run: ``python bench/search_speed.py`` (options: --n, --nq, --k, --repeats, --dsub, --out).
Builds a HyperbolicPQIndex with N = 1,000,000 random codes (M = 4 subspaces, K = 256, Lorentz codebooks
of ambient dimension 17 with curvatures 0.5..2) and a faiss IndexPQ(d = 64, M = 4, 8 bits) holding the same
codes, draws 100 queries, and times search(queries, k = 1000) of both in the same run: first with one thread
each, then with two. Times include building the lookup tables (both libraries do that inside search) and are
the best of --repeats runs after a warm-up (JIT / caches); the median is recorded too, and the 1-minute load
average shows how busy the (shared) machine was. The hihpq results are checked against the slow reference
scan: same ids, same distances (exact equality is required and reported).
Prints figures; the LAST line is the single-thread JSON {"hihpq_codes_per_s", "faiss_codes_per_s", "ratio",
"threads": 1}, the line before it the two-thread JSON. Both go to bench/results/search_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

from hihpq.index import HyperbolicPQIndex, reference_scan
from hihpq.runinfo import cpu_name


def _lorentz_points(rng: np.random.Generator, n: int, c: np.ndarray, D: int, scale: float = 0.5) -> np.ndarray:
    """(n, M, D) float32 points on H_{c_m}: exp0 of random tangent vectors (numpy, float64 then rounded)."""
    v = rng.standard_normal((n, c.size, D - 1)) * scale
    r = np.linalg.norm(v, axis=-1, keepdims=True)
    sc = np.sqrt(c)[None, :, None]
    time_ = np.cosh(sc * r) / sc
    space = np.sinh(sc * r) / (sc * np.maximum(r, 1e-12)) * v
    return np.concatenate([time_, space], axis=-1).astype(np.float32)


def _time(fn, repeats: int) -> tuple[float, float, object]:
    fn()  # warm-up
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), statistics.median(times), out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--nq", type=int, default=100)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dsub", type=int, default=16, help="faiss sub-vector dim; hihpq ambient dim is dsub + 1")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_speed.json")
    args = ap.parse_args(argv)

    import faiss

    M, K, N, nq, k = 4, 256, args.n, args.nq, args.k
    rng = np.random.default_rng(0)
    curv = np.array([0.5, 1.0, 1.5, 2.0])
    D = args.dsub + 1
    index = HyperbolicPQIndex(_lorentz_points(rng, K, curv, D).transpose(1, 0, 2), curv, clip_r=1.0)
    codes = rng.integers(0, K, size=(N, M), dtype=np.uint8)
    index.add_codes(codes)
    queries = _lorentz_points(rng, nq, curv, D)

    d_faiss = M * args.dsub
    fidx = faiss.IndexPQ(d_faiss, M, 8)
    fidx.train(rng.standard_normal((K * 64, d_faiss)).astype(np.float32))
    fidx.codes.resize(N * M)
    faiss.copy_array_to_vector(codes.reshape(-1), fidx.codes)  # the very same codes
    fidx.ntotal = N
    fq = rng.standard_normal((nq, d_faiss)).astype(np.float32)

    load_before = os.getloadavg()[0]
    print(f"cpu {cpu_name()}, {os.cpu_count()} cores, load average {load_before:.2f}")
    print(f"N = {N:,} codes, M = {M}, K = {K}, {nq} queries, k = {k}")
    lines = {}
    for threads in (1, 2):
        faiss.omp_set_num_threads(threads)
        h_best, h_med, (Dh, Ih) = _time(lambda t=threads: index.search(queries, k, threads=t), args.repeats)
        f_best, f_med, _ = _time(lambda: fidx.search(fq, k), args.repeats)
        Dr, Ir = reference_scan(index.query_tables(queries), index.codes, index.ids, k)
        exact = bool(np.array_equal(Ih, Ir) and np.array_equal(Dh, Dr))
        max_rel = float(np.max(np.abs(Dh - Dr) / np.maximum(np.abs(Dr), 1e-30)))
        h_rate, f_rate = N * nq / h_best, N * nq / f_best
        print(
            f"threads {threads}: hihpq {h_best * 1e3:.1f} ms ({h_rate / 1e6:.0f} M codes/s), "
            f"faiss IndexPQ {f_best * 1e3:.1f} ms ({f_rate / 1e6:.0f} M codes/s), "
            f"ratio {h_rate / f_rate:.2f}, exact match with the reference scan: {exact}"
        )
        lines[threads] = {
            "hihpq_codes_per_s": round(h_rate),
            "faiss_codes_per_s": round(f_rate),
            "ratio": round(h_rate / f_rate, 3),
            "threads": threads,
            "exact": exact,
            "max_rel_dist_diff": max_rel,
            "hihpq_seconds": {"best": round(h_best, 5), "median": round(h_med, 5)},
            "faiss_seconds": {"best": round(f_best, 5), "median": round(f_med, 5)},
        }
    result = {
        "n": N,
        "M": M,
        "K": K,
        "nq": nq,
        "k": k,
        "repeats": args.repeats,
        "cpu": cpu_name(),
        "cpu_count": os.cpu_count(),
        "load_avg_1min": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "faiss_version": faiss.__version__,
        "two_threads": lines[2],
        "one_thread": lines[1],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for threads in (2, 1):
        line = lines[threads]
        print(json.dumps({key: line[key] for key in ("hihpq_codes_per_s", "faiss_codes_per_s", "ratio", "threads")}))
    return result


if __name__ == "__main__":
    main()
