"""Sharded encoding of a large collection: N processes (or machines, or torchrun ranks) each encode one shard into
its own index file, and :func:`merge_index_files` joins the shard files into one index.

A shard is a contiguous slice of the sorted item list: shard I of N (0-based) holds items [lo, hi) with sizes
differing by at most one, the larger first (as ``np.array_split``), and its items keep their global positions as
ids, so the merged index is, row for row, the index a single pass would have written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hihpq.index.io import read_index, write_index

__all__ = ["SHARD_KEY", "Shard", "merge_index_files", "parse_shard", "select_shard", "shard_path"]

SHARD_KEY = "shard"  # user-metadata entry of a shard file: {"index", "count", "n_items", "lo", "hi"}


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` over ``n_items`` items: items [lo, hi)."""

    index: int
    count: int
    n_items: int

    @property
    def bounds(self) -> tuple[int, int]:
        base, extra = divmod(self.n_items, self.count)
        lo = self.index * base + min(self.index, extra)
        return lo, lo + base + (1 if self.index < extra else 0)

    @property
    def ids(self) -> np.ndarray:
        """Global positions of the shard's items: their ids in the index."""
        return np.arange(*self.bounds, dtype=np.int64)

    def metadata(self) -> dict:
        lo, hi = self.bounds
        return {"index": self.index, "count": self.count, "n_items": self.n_items, "lo": lo, "hi": hi}


def parse_shard(spec: str, n_items: int) -> Shard:
    """``"I/N"`` (0 <= I < N), or ``"auto"`` for I/N = RANK/WORLD_SIZE as torchrun sets them (0/1 without)."""
    text = str(spec).strip()
    if text == "auto":
        i, n = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    else:
        i, sep, n = text.partition("/")
        if not sep:
            raise ValueError(f"--shard {spec!r}: expected I/N (e.g. 0/4 for the first of 4 shards) or auto")
    try:
        index, count = int(i), int(n)
    except ValueError:
        raise ValueError(f"--shard {spec!r}: I and N must be integers, as in 0/4") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {spec!r}: needs N >= 1 and 0 <= I < N (shards are numbered from 0)")
    if count > n_items:
        raise ValueError(f"--shard {spec!r}: {count} shards for only {n_items} items; use at most {n_items}")
    return Shard(index, count, int(n_items))


def shard_path(out: str | Path, shard: Shard) -> Path:
    """``db.hpq`` -> ``db-00001-of-00004.hpq``: every shard its own file, the same --out given to all of them."""
    out = Path(out)
    return out.with_name(f"{out.stem}-{shard.index:05d}-of-{shard.count:05d}{out.suffix}")


def select_shard(items: list, spec: str, out: str | Path) -> tuple[list, np.ndarray, dict, Path]:
    """The ``--shard`` of an encode: (the shard's items, their ids, the metadata entry, the shard file's path)."""
    shard = parse_shard(spec, len(items))
    lo, hi = shard.bounds
    return items[lo:hi], shard.ids, {SHARD_KEY: shard.metadata()}, shard_path(out, shard)


def _comparable(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != SHARD_KEY}


def merge_index_files(out: str | Path, shards: list[str | Path]) -> dict:
    """Join shard index files into one index file ``out`` (written atomically); returns a summary.

    Refused, naming the file: different codebooks, curvatures, geometry, metric or clip radius (another model),
    different user metadata apart from the shard entry (e.g. another model file or fingerprint), shards of
    different splits, a missing or repeated shard, item names in some files only, and ids present twice.
    Rows are ordered by shard number (files without a shard entry: in the order given).
    """
    paths = [Path(p) for p in shards]
    if not paths:
        raise ValueError("no shard files to merge")
    if Path(out).resolve() in {p.resolve() for p in paths}:
        raise ValueError(f"the output {out} is also one of the inputs; write the merged index elsewhere")
    loaded = [(p, *read_index(p, return_metadata=True)) for p in paths]
    infos = [meta["metadata"].get(SHARD_KEY) for _, _, meta in loaded]
    if all(infos):
        loaded = [x for _, x in sorted(zip([i["index"] for i in infos], loaded, strict=True), key=lambda t: t[0])]
        infos = sorted(infos, key=lambda i: i["index"])
        count = {(i["count"], i["n_items"]) for i in infos}
        if len(count) > 1:
            raise ValueError(f"the shard files come from different splits (count, items): {sorted(count)}")
        (n_shards, _), found = count.pop(), [i["index"] for i in infos]
        if found != list(range(n_shards)):
            missing = sorted(set(range(n_shards)) - set(found))
            repeated = sorted({i for i in found if found.count(i) > 1})
            raise ValueError(
                f"shards of a {n_shards}-way split: missing {missing}, repeated {repeated}; "
                "pass every shard file exactly once"
            )
    first_path, first, first_meta = loaded[0]
    for path, index, meta in loaded[1:]:
        what = [
            name
            for name, same in (
                ("geometry", index.geometry == first.geometry),
                ("metric", index.metric == first.metric),
                ("clip radius", index.clip_r == first.clip_r),
                ("codebook shape", (index.M, index.K, index.D) == (first.M, first.K, first.D)),
                ("curvatures", np.array_equal(index.curvatures, first.curvatures)),
                ("codebooks", index.codebooks.shape == first.codebooks.shape
                 and np.array_equal(index.codebooks, first.codebooks)),
                ("metadata", _comparable(meta["metadata"]) == _comparable(first_meta["metadata"])),
            )
            if not same
        ]  # fmt: skip
        if what:
            raise ValueError(
                f"{path} does not match {first_path} ({', '.join(what)} differ): shards must be encoded by the "
                "same model with the same settings"
            )
    named = [meta["item_names"] is not None for _, _, meta in loaded]
    if any(named) and not all(named):
        raise ValueError("some shard files have item names and others not: encode every shard the same way")
    ids = np.concatenate([np.asarray(index.ids) for _, index, _ in loaded])
    uniq, counts = np.unique(ids, return_counts=True)
    if len(uniq) != len(ids):
        raise ValueError(f"ids present in more than one shard file, e.g. {uniq[counts > 1][:5].tolist()}")
    merged = type(first)(
        first.codebooks, first.curvatures, geometry=first.geometry, clip_r=first.clip_r, metric=first.metric
    )
    merged.add_codes(
        np.concatenate([np.asarray(index.codes) for _, index, _ in loaded]),
        ids,
        metadata=[name for _, _, meta in loaded for name in meta["item_names"]] if all(named) else None,
    )
    write_index(merged, out, metadata=_comparable(first_meta["metadata"]))
    return {"n_items": merged.ntotal, "n_files": len(paths), "out": str(out)}
