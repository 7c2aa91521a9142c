"""The loaded search state, without HTTP: one index (memory-mapped), its model, and the batching worker.

Queries arrive as decoded images or as the stored point of an indexed item; the worker embeds the images of a
batch in one model call and scans the index for the whole batch at once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hihpq.service._model import load_encoder
from hihpq.service.batching import MicroBatcher

log = logging.getLogger(__name__)

#: user-metadata keys under which an index may record the fingerprint of the model that encoded it
FINGERPRINT_KEYS = ("model_fingerprint", "fingerprint")


class ModelMismatchError(ValueError):
    """The index was encoded by another model than the one loaded to encode queries."""


@dataclass
class Query:
    """One search: a PIL image to embed, or a point (M, D) already on the manifold; the k nearest wanted."""

    k: int
    image: Any = None
    point: np.ndarray | None = None


def recorded_fingerprint(user_metadata: dict) -> str | None:
    for key in FINGERPRINT_KEYS:
        value = user_metadata.get(key)
        if isinstance(value, str) and value:
            return value
    return None


class SearchService:
    """An index file and its model, loaded once; :meth:`submit` queues a :class:`Query` for the worker.

    Args:
        index_path: an index file written by ``hihpq encode`` (memory-mapped, digests verified once).
        model: run directory or model file; default the one recorded in the index's metadata.
        device: where the model runs.
        max_batch / max_wait_s: micro-batching (see :class:`~hihpq.service.batching.MicroBatcher`).
    """

    def __init__(
        self,
        index_path: str | Path,
        model: str | Path | None = None,
        *,
        device: str = "cpu",
        max_batch: int = 16,
        max_wait_s: float = 0.004,
    ) -> None:
        from hihpq.index import read_index

        self.index_path = Path(index_path)
        if not self.index_path.is_file():
            raise FileNotFoundError(f"no index file {self.index_path}; write one with `hihpq encode`")
        index, meta = read_index(self.index_path, return_metadata=True)
        user = meta.get("metadata") or {}
        model = model if model is not None else user.get("model")
        if not model:
            raise ValueError(f"the index {self.index_path} records no model; pass --model RUN_DIR")
        self.model_path = Path(model)
        self.encoder = load_encoder(self.model_path, device=device)
        recorded = recorded_fingerprint(user)
        if recorded is not None and recorded != self.encoder.fingerprint:
            raise ModelMismatchError(
                f"the index {self.index_path} was encoded by the model with fingerprint {recorded}, but the model "
                f"loaded from {self.model_path} has fingerprint {self.encoder.fingerprint}; its codes would be "
                "searched with the wrong queries. Re-encode the images with this model (`hihpq encode`), or pass "
                "--model with the model that wrote the index"
            )
        if (self.encoder.M, self.encoder.D) != (index.M, index.D):
            raise ModelMismatchError(
                f"the model {self.model_path} embeds into M = {self.encoder.M} subspaces of D = {self.encoder.D}, "
                f"the index {self.index_path} holds M = {index.M}, D = {index.D}; pass the model that wrote it"
            )
        self.index = index
        if index.ntotal:  # builds the id lookup once, here, instead of racing for it in the first requests
            index.reconstruct_batch(index.ids[:1])
        self.batcher = MicroBatcher(self._handle, max_batch=max_batch, max_wait_s=max_wait_s)
        self._warm_up()

    def _warm_up(self) -> None:
        """One search through the whole path now (model, compiled scan kernels), so the first request does not
        pay for it."""
        from PIL import Image

        self._handle([Query(k=1, image=Image.new("RGB", (32, 32), (128, 128, 128)))])

    @property
    def fingerprint(self) -> str:
        return self.encoder.fingerprint

    def submit(self, query: Query):
        """A future of (distances (k',) float32, ids (k',) int64), k' <= k (fewer when the index is smaller)."""
        return self.batcher.submit(query)

    def close(self) -> None:
        self.batcher.close()

    def item_point(self, item_id: int) -> np.ndarray:
        """The stored (quantized) point (M, D) of an indexed item: searching with it finds its neighbours.
        KeyError for an unknown id."""
        return self.index.reconstruct_batch(np.array([item_id], np.int64)).reshape(self.index.M, self.index.D)

    def item_file(self, item_id: int) -> Path:
        """The image file recorded for ``item_id``; KeyError (with the reason) when there is none to serve."""
        index = self.index
        if not index.has_item_metadata:
            raise KeyError("this index stores no item paths")
        try:
            (name,) = index.get_metadata(np.array([item_id], np.int64))
        except KeyError:
            raise KeyError(f"no item with id {item_id} in the index") from None
        if name is None:
            raise KeyError(f"no item with id {item_id} in the index")
        path = Path(name)
        if not path.is_absolute() and not path.is_file():
            path = self.index_path.parent / path  # a relative path stored beside the index
        if not path.is_file():
            raise KeyError(f"the file of item {item_id} ({name}) is gone")
        return path

    def names(self, ids: np.ndarray) -> list[str | None]:
        return self.index.get_metadata(ids) if self.index.has_item_metadata else [None] * len(ids)

    # ------------------------------------------------------------------------------------ the worker's side
    def _handle(self, queries: list[Query]) -> list[tuple[np.ndarray, np.ndarray]]:
        index = self.index
        points = np.empty((len(queries), index.M, index.D), np.float32)
        with_image = [i for i, q in enumerate(queries) if q.image is not None]
        if with_image:
            images = [queries[i].image for i in with_image]
            points[with_image] = self.encoder.embed(images, batch_size=len(images), progress=False)
        for i, q in enumerate(queries):
            if q.image is None:
                points[i] = q.point
        k = max(q.k for q in queries)
        D, I = index.search(points, k)
        out = []
        for q, drow, irow in zip(queries, D, I, strict=True):
            keep = irow[: q.k] >= 0  # padding (inf, -1) when the index holds fewer than k items
            out.append((drow[: q.k][keep], irow[: q.k][keep]))
        return out
