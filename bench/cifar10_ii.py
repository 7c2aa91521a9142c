"""CIFAR-10 (II) with the frozen EfficientNet-Lite0 backbone (224 px, the default): HiHPQ beside PCA+PQ and PCA+OPQ.

    python bench/cifar10_ii.py --data ~/.cache/hihpq/cifar10-jpeg            # hihpq, pq, opq; 16/32/64 bits; seeds 1-3
    python bench/cifar10_ii.py --data DIR --methods hihpq --bits 32 --seeds 1 2 3

Records ({"method", "bits", "map_at_1000", "seed", "wall_s", "command", "commit"}) are merged into
bench/results/cifar10_ii_lite0.json; per-run details (scores, training log, config) go to
bench/results/cifar10_ii_lite0/.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from hihpq.benchmark import METHODS, run_grid
from hihpq.report_tables import aggregate

RESULTS = Path(__file__).resolve().parent / "results" / "cifar10_ii_lite0.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="CIFAR-10 location (else $HIHPQ_DATA)")
    ap.add_argument("--methods", nargs="+", default=["hihpq", "pq", "opq"], choices=METHODS)
    ap.add_argument("--bits", nargs="+", type=int, default=[16, 32, 64])
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("-o", "--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    t0 = time.perf_counter()
    records = run_grid("cifar10-ii", args.methods, args.bits, args.seeds, args.out, args.overrides, args.data)
    print(f"\nwhole run {time.perf_counter() - t0:.0f} s")
    for (method, bits), (mean, std, n) in sorted(aggregate(records).items()):
        print(f"{method:<22} {bits:>5} bits  mAP@1000 {100 * mean:6.2f} +- {100 * std:.2f} (n={n})")


if __name__ == "__main__":
    main()
