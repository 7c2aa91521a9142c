"""Wall time of a protocol's whole frozen-backbone feature cache, end to end (listing, decoding, backbone, writing).

    python bench/feature_cache_time.py --data ../shared/data -o backbone.resolution=224
    python bench/feature_cache_time.py --config fashion-mnist-32 -o backbone.resolution=224

Times the clean features of every query/database/training image, then the cached augmented training views, with
the config's runtime (the fast default unless ``-o backbone.runtime=torch``). An entry already in the cache is not
recomputed: ``cold`` says whether each part was computed in this run (use ``-o features.cache_dir=DIR`` with an
empty DIR for a cold measurement). The LAST line is JSON, also saved to bench/results/feature_cache_<config>.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hihpq.config import load_config
from hihpq.data.feature_cache import FeatureCache
from hihpq.data.prepare import make_split, prepare_features
from hihpq.runinfo import cpu_name, run_record, write_json

RESULTS = Path(__file__).resolve().parent / "results"


def _cache_files(cfg) -> set[Path]:
    """The cache's entries (one folder each): a part was computed cold when it added one."""
    root = FeatureCache(cfg.features.cache_dir).root
    return set(root.iterdir()) if root.is_dir() else set()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="cifar10-ii-32")
    ap.add_argument("--data", help="dataset location (else $HIHPQ_DATA)")
    ap.add_argument("-o", "--set", dest="overrides", action="append", default=[])
    ap.add_argument("--out", help="JSON record (default bench/results/feature_cache_<config>_<resolution>px.json)")
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)

    t0 = time.perf_counter()
    split = make_split(cfg, args.data)
    split_s = time.perf_counter() - t0
    n_used = len(set(split.query) | set(split.database) | set(split.train))

    before = _cache_files(cfg)
    t1 = time.perf_counter()
    prep = prepare_features(cfg, split, views=False)
    clean_s = time.perf_counter() - t1
    clean_cold = _cache_files(cfg) != before

    before = _cache_files(cfg)
    t2 = time.perf_counter()
    prep = prepare_features(cfg, split)  # clean features now come from the cache
    views_s = time.perf_counter() - t2
    views_cold = _cache_files(cfg) != before
    total_s = time.perf_counter() - t0

    n_views = int(prep.views.shape[0] * prep.views.shape[1])
    figures = {
        "config": cfg.name,
        "resolution": cfg.backbone.resolution,
        "runtime": getattr(prep.backbone, "runtime_id", {"runtime": "torch"}),
        "n_clean": n_used,
        "n_views": n_views,
        "split_s": round(split_s, 1),
        "clean_s": round(clean_s, 1),
        "views_s": round(views_s, 1),
        "total_s": round(total_s, 1),
        "clean_img_per_s": round(n_used / clean_s, 1),
        "views_per_s": round(n_views / views_s, 1),
        "cold": {"clean": clean_cold, "views": views_cold},
        "cpu": cpu_name(),
    }
    out = Path(args.out) if args.out else RESULTS / f"feature_cache_{cfg.name}_{cfg.backbone.resolution}px.json"
    write_json(out, run_record(cfg.to_dict(), cfg.features.seed, figures=figures), force=True)
    print(
        f"{n_used} clean images in {clean_s:.0f} s ({n_used / clean_s:.1f}/s), {n_views} views in {views_s:.0f} s "
        f"({n_views / views_s:.1f}/s); whole cache {total_s / 60:.1f} min"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
