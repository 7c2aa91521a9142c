"""10 million codes in one index file, searched memory-mapped: time and memory.

Run: ``python bench/index_scale.py`` (options: --n, --nq, --k, --threads, --dir, --out). Not a unit test.
Builds a Lorentz HyperbolicPQIndex with N = 10,000,000 random 32-bit codes (M = 4, K = 256), writes it to a
temporary directory (or --dir), drops it, reads the file back memory-mapped (with and without verifying the
section checksums) and searches it. Reports the file size per code (M bytes + 8-byte id + a fixed header),
write / read / search times, and the process memory (anonymous vs file-backed resident pages, from /proc)
before and after the read and the search: the codes and ids stay in the page cache, not in the process's own
memory. A few queries are checked against the slow reference scan (same ids and distances).
Prints figures; the LAST line is JSON, also saved to bench/results/index_scale.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from hihpq.index import HyperbolicPQIndex, read_index, reference_scan, write_index


def _mem() -> dict[str, int]:
    """Resident memory of this process in bytes: total, anonymous (heap) and file-backed (mapped files)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _points(rng: np.random.Generator, n: int, c: np.ndarray, D: int) -> np.ndarray:
    v = rng.standard_normal((n, c.size, D - 1)) * 0.5
    r = np.linalg.norm(v, axis=-1, keepdims=True)
    sc = np.sqrt(c)[None, :, None]
    return np.concatenate([np.cosh(sc * r) / sc, np.sinh(sc * r) / (sc * r) * v], axis=-1).astype(np.float32)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--nq", type=int, default=16)
    ap.add_argument("--k", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dir", type=Path, default=None, help="where to write the file (default: a temp dir)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "index_scale.json")
    args = ap.parse_args(argv)
    M, K, D, N = 4, 256, 17, args.n
    rng = np.random.default_rng(0)
    curv = np.array([0.5, 1.0, 1.5, 2.0])
    books = _points(rng, K, curv, D).transpose(1, 0, 2)
    queries = _points(rng, args.nq, curv, D)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "scale.hihpq"
        index = HyperbolicPQIndex(books, curv, clip_r=1.0)
        for s in range(0, N, 1 << 22):  # add in chunks, as an encoder would
            index.add_codes(rng.integers(0, K, size=(min(1 << 22, N - s), M), dtype=np.uint8))
        t0 = time.perf_counter()
        write_index(index, path)
        write_s = time.perf_counter() - t0
        size = path.stat().st_size
        del index
        gc.collect()
        print(f"wrote {N:,} codes: {size / 1e6:.1f} MB ({size / N:.2f} bytes per code) in {write_s:.2f} s")

        mem0 = _mem()
        t0 = time.perf_counter()
        read_index(path, mmap=True, verify=False)
        read_fast_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        index = read_index(path, mmap=True, verify=True)
        read_s = time.perf_counter() - t0
        mem1 = _mem()
        index.search(queries[:1], 1, threads=args.threads)  # warm-up: JIT cache load
        mem_warm = _mem()
        t0 = time.perf_counter()
        Dq, Iq = index.search(queries, args.k, threads=args.threads)
        search_s = time.perf_counter() - t0
        mem2 = _mem()
        print(
            f"read (mmap) {read_fast_s * 1e3:.0f} ms without / {read_s:.2f} s with checksums; "
            f"search {args.nq} queries k={args.k} with {args.threads} threads: {search_s:.2f} s "
            f"({N * args.nq / search_s / 1e6:.0f} M codes/s)"
        )
        n_check = min(2, args.nq)
        Dr, Ir = reference_scan(index.query_tables(queries[:n_check]), index.codes, index.ids, args.k)
        exact = bool(np.array_equal(Iq[:n_check], Ir) and np.array_equal(Dq[:n_check], Dr))
        print(f"exact match with the reference scan on {n_check} queries: {exact}")
        mb = 1 / 2**20
        anon_growth = mem2["RssAnon"] - mem0["RssAnon"]
        print(
            f"resident memory: anonymous {mem0['RssAnon'] * mb:.0f} -> {mem1['RssAnon'] * mb:.0f} (read) -> "
            f"{mem2['RssAnon'] * mb:.0f} MB (search); file-backed {mem0['RssFile'] * mb:.0f} -> "
            f"{mem1['RssFile'] * mb:.0f} -> {mem2['RssFile'] * mb:.0f} MB; codes + ids would be "
            f"{N * (M + 8) * mb:.0f} MB in RAM"
        )
        result = {
            "n": N,
            "M": M,
            "K": K,
            "nq": args.nq,
            "k": args.k,
            "threads": args.threads,
            "file_bytes": size,
            "bytes_per_code": round(size / N, 3),
            "write_seconds": round(write_s, 3),
            "read_mmap_seconds": round(read_fast_s, 4),
            "read_mmap_verify_seconds": round(read_s, 3),
            "search_seconds": round(search_s, 3),
            "codes_per_s": round(N * args.nq / search_s),
            "exact": exact,
            "rss_bytes": {
                "before_read": mem0,
                "after_read": mem1,
                "after_warmup": mem_warm,
                "after_search": mem2,
            },
            "anon_growth_bytes": anon_growth,
            "load_avg_1min": round(os.getloadavg()[0], 2),
        }
        del index
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("n", "bytes_per_code", "search_seconds", "anon_growth_bytes", "exact")}))
    return result


if __name__ == "__main__":
    main()
