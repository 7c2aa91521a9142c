"""Index files kept up to date: add images with the index's own model, remove items, refuse foreign models.

An index records the fingerprint of the model that encoded it (``model_fingerprint`` in its user metadata, with
the model file as ``model``); codes of another model are not comparable, so searching or extending it with one
is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ModelMismatchError", "add_images", "check_model", "remove_items"]

log = logging.getLogger("hihpq")


class ModelMismatchError(ValueError):
    """An index searched or extended with a model other than the one that encoded it."""


def check_model(index_path: str | os.PathLike, user_metadata: dict[str, Any], encoder) -> None:
    """Refuse ``encoder`` unless it is the model that encoded the index (an index without a recorded fingerprint,
    written before fingerprints existed, passes with a notice)."""
    recorded = user_metadata.get("model_fingerprint")
    if recorded is None:
        log.warning("%s records no model fingerprint (an older index): cannot check its model", index_path)
        return
    if recorded != encoder.fingerprint:
        raise ModelMismatchError(
            f"{index_path} was encoded by model {recorded[:16]}... ({user_metadata.get('model', 'unknown file')}), "
            f"but the model loaded from {encoder.model_path} is {encoder.fingerprint[:16]}...: their codes are not "
            "comparable. Re-encode the images with this model (`hihpq encode MODEL --images DIR --out INDEX`), "
            "or pass --model with the model that made the index"
        )


def _encoder_for(index_path, user_metadata: dict, model, device):
    from hihpq.encoder import Encoder

    model = model or user_metadata.get("model")
    if not model:
        raise ValueError(f"{index_path} records no model; pass --model RUN_DIR")
    enc = model if isinstance(model, Encoder) else Encoder.load(model, device=device)
    check_model(index_path, user_metadata, enc)
    return enc


def add_images(
    index_path: str | os.PathLike,
    images: Any,
    *,
    model=None,
    device: str | None = None,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, int]:
    """Encode ``images`` (a folder, a file or a list of paths) with the index's own model and append them to the
    index file, atomically. Paths already in the index are skipped, unreadable files skipped and counted.

    ``model``: a run folder, model file or :class:`~hihpq.encoder.Encoder` (default: the one the index records);
    it must be the model that encoded the index. Returns {"added", "already_present", "unreadable"}.
    """
    from hihpq.data.prepare import list_images
    from hihpq.evaluation import encode_embeddings
    from hihpq.index import read_index, write_index

    index = read_index(index_path)
    enc = _encoder_for(index_path, index.user_metadata, model, device)
    if not index.has_item_metadata and index.ntotal:
        raise ValueError(f"{index_path} stores no item paths: cannot tell which images it holds already")
    paths = list_images(images) if isinstance(images, str | os.PathLike) else [Path(p) for p in images]
    names = [str(p.absolute()) for p in paths]
    present = index._meta.contains(names) if index._meta is not None else np.zeros(len(names), bool)
    new = [p for p, seen in zip(paths, present, strict=True) if not seen]
    emb = enc.embed(new, batch_size=batch_size, progress=progress, on_error="skip")
    skipped = set(enc.skipped)
    kept = [str(p.absolute()) for p in new if str(p) not in skipped]
    if kept:
        index.add_codes(encode_embeddings(enc.quantizer, emb), metadata=kept)
        write_index(index, index_path)
    if skipped:
        log.warning("skipped %d unreadable image(s): %s", len(skipped), ", ".join(sorted(skipped)[:5]))
    return {"added": len(kept), "already_present": int(present.sum()), "unreadable": len(skipped)}


def remove_items(
    index_path: str | os.PathLike, *, ids: Sequence[int] | None = None, paths: Sequence[str] | None = None
) -> int:
    """Remove items by id or by path (as stored: absolute paths for images added by hihpq) from an index file,
    atomically; returns how many were removed. Unknown ids / paths are an error naming them (nothing removed)."""
    from hihpq.index import read_index, write_index

    if (ids is None) == (paths is None):
        raise ValueError("give either ids or paths")
    index = read_index(index_path)
    if paths is not None:
        if index._meta is None:
            raise ValueError(f"{index_path} stores no item paths; remove by --ids")
        names = [str(Path(p).absolute()) for p in paths]
        rows = index._meta.positions_of(names)
        if (rows < 0).any():
            missing = [n for n, r in zip(names, rows, strict=True) if r < 0]
            raise ValueError(f"not in {index_path}: {', '.join(missing[:5])}")
        ids = index.ids[rows]
    keys = np.asarray(ids, np.int64)
    missing = np.setdiff1d(keys, index.ids)
    if missing.size:
        raise ValueError(f"ids not in {index_path}: {missing[:5].tolist()}")
    removed = index.remove_ids(keys)
    write_index(index, index_path)
    return removed
