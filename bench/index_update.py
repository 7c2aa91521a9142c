"""Adding images to a large index file: the stored paths are appended as bytes, not decoded and re-encoded.

Run: ``python bench/index_update.py`` (options: --n, --add, --dir, --out). Not a unit test.
Writes an index of N = 1,000,000 codes with one path each, then times what ``hihpq index add`` does with it apart
from the encoding: read the file (memory-mapped), check which of the ``--add`` = 10,000 new paths are present,
append their codes and paths, write the file atomically. The reference, measured in the same run, is the previous
way of appending names (decode every stored path into a Python list, concatenate, re-encode). Prints figures; the
LAST line is JSON, also saved to bench/results/index_update.json (ratios against the reference).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from hihpq.index import HyperbolicPQIndex, read_index, write_index
from hihpq.index.pq_index import _ItemMetadata


def _paths(start: int, n: int) -> list[str]:
    return [f"/home/user/photos/{i // 1000:04d}/IMG_{i:08d}.jpg" for i in range(start, start + n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--add", type=int, default=10_000)
    ap.add_argument("--dir", help="where the index file goes (default: a temporary folder)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "index_update.json"))
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    M, K, D = 4, 256, 16
    books = rng.standard_normal((M, K, D)).astype(np.float32) * 0.3
    books[..., 0] = np.sqrt(1 + (books[..., 1:] ** 2).sum(-1))  # on the hyperboloid, c = 1
    index = HyperbolicPQIndex(books, np.ones(M))
    index.add_codes(rng.integers(0, K, (args.n, M), dtype=np.uint8), metadata=_paths(0, args.n))
    new_paths = _paths(args.n - args.add // 2, args.add)  # half of them are in the index already
    new_codes = rng.integers(0, K, (len(new_paths), M), dtype=np.uint8)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "big.hpq"
        write_index(index, path)
        del index

        t0 = time.perf_counter()
        stored = read_index(path)
        present = stored._meta.contains(new_paths)
        keep = ~present
        stored.add_codes(new_codes[keep], metadata=[p for p, k in zip(new_paths, keep, strict=True) if k])
        write_index(stored, path)
        t_add = time.perf_counter() - t0
        n_after = read_index(path, verify=False).ntotal

        meta = read_index(path, verify=False)._meta  # the reference: decode every name, append, encode again
        t0 = time.perf_counter()
        names = meta.as_list()
        have = set(names)
        fresh = [p for p in new_paths if p not in have]
        _ItemMetadata(names + fresh).to_buffers()
        t_ref = time.perf_counter() - t0
    result = {
        "n": args.n,
        "added": int(keep.sum()),
        "already_present": int(present.sum()),
        "ntotal_after": n_after,
        "add_s": round(t_add, 3),
        "reference_decode_all_names_only_s": round(t_ref, 3),
        "reference_over_add": round(t_ref / t_add, 2),
    }
    print(
        f"index add of {args.add:,} paths ({result['already_present']:,} present) to {args.n:,} items: "
        f"{t_add:.2f} s read + check + append + write; decoding and re-encoding the stored names alone took "
        f"{t_ref:.2f} s ({result['reference_over_add']}x)"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
