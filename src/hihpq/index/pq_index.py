"""A faiss-style index of hyperbolic (or Euclidean) product-quantized codes.

The index holds the codebooks (M, K, D) with their curvatures and, per item, an id (int64) and a code
(M uint8 bytes): memory per item is M + 8 bytes (plus optional per-item strings such as image paths). Search
ranks items by the product distance of Eq. 8, the sum over subspaces of the geodesic distances, computed
through lookup tables:

* ``metric="adc"`` (asymmetric): the query stays un-quantized; table[m, j] = d(query segment m, codeword j).
* ``metric="sdc"`` (symmetric): the query is encoded first; table[m, j] = d(codeword q_m, codeword j), read
  from precomputed K x K tables per subspace. :meth:`HyperbolicPQIndex.search_codes` searches by code.

Results are ranked by (distance, id) and padded with (inf, -1) when fewer than k items are searched;
distances are float32 sums of float32 table entries in subspace order, so they equal
:func:`hihpq.index.kernel.reference_scan` exactly. ``geometry="euclidean"`` gives the Euclidean twin
(per-subspace L2 distance, not squared, summed) and ``geometry="cosine"`` the MeCoQ-style counterpart (per-subspace
cosine distance 1 - cos, summed: D = M - the summed cosine score) behind the same surface.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from hihpq.index import kernel as _kernel
from hihpq.index.tables import check_on_manifold, codeword_tables, query_tables

__all__ = ["CosinePQIndex", "EuclideanPQIndex", "HyperbolicPQIndex"]

_METRICS = ("adc", "sdc")
_GEOMETRY_ALIASES = {"lorentz": "lorentz", "hyperbolic": "lorentz", "euclidean": "euclidean", "cosine": "cosine"}
_MIN_CAPACITY = 1024
_QUERY_CHUNK = 4096  # queries per table batch: 4096 x M x K float32 tables (16 MB at M = 4)


def _to_numpy(x, name: str) -> np.ndarray:
    """numpy view of a numpy array, torch tensor or nested sequence (torch is imported only if given one)."""
    if isinstance(x, np.ndarray):
        return x
    mod = type(x).__module__
    if mod.startswith("torch"):
        return x.detach().cpu().numpy()
    try:
        return np.asarray(x)
    except (TypeError, ValueError) as e:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e


def _check_geometry(geometry) -> str:
    if not isinstance(geometry, str) or geometry not in _GEOMETRY_ALIASES:
        raise ValueError(f"geometry must be one of {sorted(_GEOMETRY_ALIASES)}, got {geometry!r}")
    return _GEOMETRY_ALIASES[geometry]


def _check_metric(metric) -> str:
    if not isinstance(metric, str) or metric not in _METRICS:
        raise ValueError(f"metric must be 'adc' (asymmetric) or 'sdc' (symmetric), got {metric!r}")
    return metric


def _check_k(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return int(k)


def _check_int_array(a, name: str, *, ndim: int) -> np.ndarray:
    a = _to_numpy(a, name)
    if a.dtype == np.bool_ or not (np.issubdtype(a.dtype, np.integer) or a.size == 0):
        raise TypeError(f"{name} must be an integer array, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view()
    v.flags.writeable = False
    return v


class _ItemMetadata:
    """Per-item strings aligned with the index rows: a Python list, or UTF-8 ``blob`` bytes (bytes of file names
    that are not UTF-8 kept as they are, Python's surrogateescape) sliced by
    ``offsets`` (n + 1,) as stored in an index file (maybe memory-mapped: nothing is decoded until asked).
    A read-only sequence: len(), [row], iteration."""

    def __init__(self, strings: list[str] | None = None, offsets=None, blob=None):
        self._strings = strings
        self._offsets = offsets
        self._blob = blob

    def __len__(self) -> int:
        return len(self._strings) if self._strings is not None else len(self._offsets) - 1

    def __getitem__(self, position: int) -> str:
        if not -len(self) <= position < len(self):
            raise IndexError(f"item {position} out of range for {len(self)} items")
        return self.get([position % len(self)])[0]

    def __iter__(self):
        return (self[p] for p in range(len(self)))

    def get(self, positions: np.ndarray) -> list[str]:
        if self._strings is not None:
            return [self._strings[p] for p in positions]
        out = []
        for p in positions:
            a, b = int(self._offsets[p]), int(self._offsets[p + 1])
            out.append(bytes(self._blob[a:b]).decode("utf-8", "surrogateescape"))  # file names as they are
        return out

    def as_list(self) -> list[str]:
        return list(self._strings) if self._strings is not None else self.get(np.arange(len(self)))

    def take(self, positions: np.ndarray) -> _ItemMetadata:
        if self._strings is not None:
            return _ItemMetadata(self.get(positions))
        # gather the byte ranges without decoding them (an index of millions of paths stays cheap to edit)
        offsets, blob = np.asarray(self._offsets, np.int64), np.asarray(self._blob, np.uint8)
        pos = np.asarray(positions, np.int64)
        starts, lens = offsets[pos], offsets[pos + 1] - offsets[pos]
        new_offsets = np.zeros(len(pos) + 1, np.int64)
        np.cumsum(lens, out=new_offsets[1:])
        gather = np.repeat(starts - new_offsets[:-1], lens) + np.arange(new_offsets[-1], dtype=np.int64)
        return _ItemMetadata(offsets=new_offsets, blob=blob[gather])

    def extend(self, strings: list[str]) -> _ItemMetadata:
        if self._strings is not None:
            return _ItemMetadata(self._strings + list(strings))
        # append to the stored bytes: the existing items are copied as bytes, never decoded
        offsets, blob = np.asarray(self._offsets, np.int64), np.asarray(self._blob, np.uint8)
        new = _ItemMetadata(list(strings)).to_buffers()
        return _ItemMetadata(
            offsets=np.concatenate([offsets, offsets[-1] + new[0][1:]]), blob=np.concatenate([blob, new[1]])
        )

    def positions_of(self, strings: Sequence[str]) -> np.ndarray:
        """(n,) int64: the row of each of ``strings`` among the items (the first one), -1 when absent; compared
        as UTF-8 bytes, nothing stored is decoded."""
        if self._strings is not None:
            rows: dict = {}
            for i, s in enumerate(self._strings):
                rows.setdefault(s, i)
            return np.array([rows.get(s, -1) for s in strings], np.int64)
        wanted = [s.encode("utf-8") for s in strings]
        offsets = np.asarray(self._offsets, np.int64)
        lens = np.diff(offsets)
        candidates = np.flatnonzero(np.isin(lens, [len(w) for w in wanted]))  # only items of a wanted length
        blob = np.asarray(self._blob, np.uint8)
        rows = {}
        for i in candidates.tolist():
            rows.setdefault(blob[offsets[i] : offsets[i + 1]].tobytes(), i)
        return np.array([rows.get(w, -1) for w in wanted], np.int64)

    def contains(self, strings: Sequence[str]) -> np.ndarray:
        """(n,) bool: which of ``strings`` are items already."""
        return self.positions_of(strings) >= 0

    def to_buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """(offsets (n + 1,) int64, blob (nbytes,) uint8): the file layout."""
        if self._strings is None:
            return np.asarray(self._offsets, np.int64), np.asarray(self._blob, np.uint8)
        encoded = [s.encode("utf-8", "surrogateescape") for s in self._strings]  # non-UTF-8 file names kept
        offsets = np.zeros(len(encoded) + 1, np.int64)
        np.cumsum([len(e) for e in encoded], out=offsets[1:])
        return offsets, np.frombuffer(b"".join(encoded), np.uint8)


def _check_metadata(metadata, n: int) -> list[str]:
    if isinstance(metadata, (str, bytes)) or not isinstance(metadata, Sequence):
        raise TypeError(f"metadata must be a sequence of str (one per item), got {type(metadata).__name__}")
    if len(metadata) != n:
        raise ValueError(f"metadata has {len(metadata)} entries for {n} items")
    for i, s in enumerate(metadata):
        if not isinstance(s, str):
            raise TypeError(f"metadata[{i}] must be a str, got {type(s).__name__}")
    return list(metadata)


class HyperbolicPQIndex:
    """Index of product-quantized codes with Lorentz (or Euclidean) codebooks, searched by exact table scans.

    Args:
        codebooks: (M, K, D) codewords on the manifold (numpy or torch, stored float32); K <= 256 so that a
            code is M bytes. Lorentz: D is the ambient dimension (time coordinate first).
        curvatures: (M,) positive c_m (curvature -c_m) or a scalar for all subspaces; default 1. Ignored by
            the Euclidean geometry except for being stored.
        geometry: "lorentz" (alias "hyperbolic"), "euclidean" (the twin) or "cosine" (MeCoQ-style: codewords
            and query segments are normalised, scores are cosine distances).
        clip_r: the tangent clipping radius the embeddings were made with (stored for encoders; search does
            not use it). None for no clipping.
        metric: default metric of :meth:`search`: "adc" (asymmetric) or "sdc" (symmetric).

    Attributes (faiss names): ``d`` = M * D, ``ntotal``, ``is_trained`` (always True: the codebooks come from
    a trained quantizer, see :meth:`from_quantizer`), ``M``, ``K``, ``D`` (= ``dsub``), ``code_size`` (M
    bytes), ``codes`` (ntotal, M) uint8 and ``ids`` (ntotal,) int64 (read-only views), ``user_metadata`` (a
    JSON-able dict saved with the index).

    Queries are float arrays (n, M * D) or (n, M, D) of points on the manifold; Lorentz queries are checked to
    lie on it with the index's curvatures (a wrong curvature is an error, not a silent wrong answer).
    """

    def __init__(
        self,
        codebooks,
        curvatures=None,
        *,
        geometry: str = "lorentz",
        clip_r: float | None = None,
        metric: str = "adc",
    ):
        self.geometry = _check_geometry(geometry)
        self.metric = _check_metric(metric)
        C = _to_numpy(codebooks, "codebooks")
        if not np.issubdtype(C.dtype, np.floating):
            raise TypeError(f"codebooks must be a float array, got dtype {C.dtype}")
        if C.ndim != 3 or min(C.shape) < 1:
            raise ValueError(f"codebooks must have shape (M, K, D) with M, K, D >= 1, got {C.shape}")
        M, K, D = C.shape
        if K > 256:
            raise ValueError(f"codes are one byte per subspace, so K <= 256 codewords; got K = {K}")
        if not np.isfinite(C).all():
            raise ValueError("codebooks contain NaN or inf")
        if curvatures is None:
            c = np.ones(M, np.float64)
        else:
            c = _to_numpy(curvatures, "curvatures").astype(np.float64, copy=True).reshape(-1)
            if c.size == 1:
                c = np.full(M, c[0])
            if c.shape != (M,):
                raise ValueError(f"curvatures must be a scalar or shape ({M},), got {c.shape}")
        if not (np.isfinite(c).all() and (c > 0).all()):
            raise ValueError(f"curvatures must be finite and > 0, got {c}")
        if clip_r is not None:
            if isinstance(clip_r, bool) or not isinstance(clip_r, (int, float, np.floating, np.integer)):
                raise TypeError(f"clip_r must be a float or None, got {type(clip_r).__name__}")
            clip_r = float(clip_r)
            if not (math.isfinite(clip_r) and clip_r > 0):
                raise ValueError(f"clip_r must be finite and > 0, got {clip_r}")
        self._codebooks = np.ascontiguousarray(C, np.float32)
        self._codebooks.flags.writeable = False
        self._curvatures = c
        self._curvatures.flags.writeable = False
        check_on_manifold(self._codebooks.astype(np.float64).transpose(1, 0, 2), c, self.geometry, what="codebooks")
        self.clip_r = clip_r
        self.M, self.K, self.D = M, K, D
        self.user_metadata: dict[str, Any] = {}
        self._codes_buf = np.empty((0, M), np.uint8)
        self._ids_buf = np.empty(0, np.int64)
        self._n = 0
        self._meta: _ItemMetadata | None = None
        self._sdc: np.ndarray | None = None
        self._id_sorted: bool | None = True  # ids strictly increasing (None: unknown, e.g. after a read)
        self._id_index: tuple[np.ndarray, np.ndarray] | None = None  # (sorted ids, positions), lazily
        self._max_id: int | None = -1  # largest id ever added (-1: none; None: unknown, use max(ids))

    # ------------------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------------------

    @classmethod
    def from_quantizer(cls, quantizer, *, metric: str = "adc") -> HyperbolicPQIndex:
        """An empty index with the codebooks of a trained quantizer (duck-typed: ``codebooks()`` (M, K, D),
        ``curvature`` (M,), ``geometry`` and ``clip_r``, as :class:`hihpq.quantizer.ProductQuantizer`)."""
        C = quantizer.codebooks() if callable(quantizer.codebooks) else quantizer.codebooks
        geometry = _check_geometry(quantizer.geometry)
        kind = index_class(geometry)
        return kind(C, quantizer.curvature, geometry=geometry, clip_r=quantizer.clip_r, metric=metric)

    def _from_storage(
        self, codes: np.ndarray, ids: np.ndarray, meta: _ItemMetadata | None, next_id: int | None
    ) -> None:
        """Adopt (possibly memory-mapped, read-only) storage as it is; used by :func:`read_index`."""
        self._codes_buf, self._ids_buf, self._n, self._meta = codes, ids, len(ids), meta
        self._id_sorted = None
        self._id_index = None
        self._max_id = None if next_id is None else next_id - 1

    # ------------------------------------------------------------------------------------------------------
    # Attributes
    # ------------------------------------------------------------------------------------------------------

    @property
    def d(self) -> int:
        """Query dimension M * D."""
        return self.M * self.D

    @property
    def dsub(self) -> int:
        """Ambient dimension of one subspace (faiss name)."""
        return self.D

    @property
    def code_size(self) -> int:
        """Bytes per code (M)."""
        return self.M

    @property
    def bits(self) -> float:
        """Bits per code, M log2 K (an int for K a power of two)."""
        b = self.M * math.log2(self.K)
        return int(b) if b.is_integer() else b

    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def is_trained(self) -> bool:
        return True

    @property
    def codebooks(self) -> np.ndarray:
        """(M, K, D) float32 codewords (a copy: small, and safe to hand to torch)."""
        return self._codebooks.copy()

    @property
    def curvatures(self) -> np.ndarray:
        """(M,) float64 curvatures c_m (a copy)."""
        return self._curvatures.copy()

    @property
    def codes(self) -> np.ndarray:
        """(ntotal, M) uint8 codes, row i belongs to ids[i] (read-only view)."""
        return _readonly(self._codes_buf[: self._n])

    @property
    def ids(self) -> np.ndarray:
        """(ntotal,) int64 ids (read-only view)."""
        return _readonly(self._ids_buf[: self._n])

    @property
    def has_item_metadata(self) -> bool:
        return self._meta is not None

    @property
    def is_memory_mapped(self) -> bool:
        """True while codes and ids are read from a memory-mapped file (the first add/remove copies them)."""
        return isinstance(self._codes_buf, np.memmap) or isinstance(self._ids_buf, np.memmap)

    def __len__(self) -> int:
        return self._n

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(geometry={self.geometry!r}, metric={self.metric!r}, "
            f"M={self.M}, K={self.K}, D={self.D}, ntotal={self._n})"
        )

    # ------------------------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------------------------

    def _check_points(self, x, name: str = "x") -> np.ndarray:
        """Queries / embeddings -> (n, M, D) float64, finite, on the manifold."""
        x = _to_numpy(x, name)
        if not np.issubdtype(x.dtype, np.floating):
            raise TypeError(f"{name} must be a float array, got dtype {x.dtype}")
        if x.ndim == 2 and x.shape[1] == self.d:
            x = x.reshape(x.shape[0], self.M, self.D)
        elif not (x.ndim == 3 and x.shape[1:] == (self.M, self.D)):
            raise ValueError(
                f"{name} must have shape (n, d) = (n, {self.d}) or (n, M, D) = (n, {self.M}, {self.D}), got {x.shape}"
            )
        x = x.astype(np.float64)
        if not np.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")
        check_on_manifold(x, self._curvatures, self.geometry, what=name)
        return x

    def _check_codes(self, codes, name: str = "codes") -> np.ndarray:
        codes = _check_int_array(codes, name, ndim=2)
        if codes.shape[1] != self.M:
            raise ValueError(f"{name} must have shape (n, M) = (n, {self.M}), got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= self.K):
            raise ValueError(f"{name} must lie in [0, K) = [0, {self.K}), got values in [{codes.min()}, {codes.max()}]")
        return np.ascontiguousarray(codes, np.uint8)

    def _check_new_ids(self, ids, n: int) -> np.ndarray:
        ids = _check_int_array(ids, "ids", ndim=1)
        if ids.shape[0] != n:
            raise ValueError(f"ids has {ids.shape[0]} entries for {n} items")
        if ids.size and (np.issubdtype(ids.dtype, np.unsignedinteger) and ids.max() > np.iinfo(np.int64).max):
            raise ValueError("ids must fit in int64")
        ids = np.ascontiguousarray(ids, np.int64)
        if ids.size == 0:
            return ids
        if ids.min() < 0:
            raise ValueError(f"ids must be >= 0 (-1 marks padding in search results), got {ids.min()}")
        increasing = bool((ids[1:] > ids[:-1]).all())
        if not increasing:
            s = np.sort(ids)
            dup = s[1:][s[1:] == s[:-1]]
            if dup.size:
                raise ValueError(f"ids must be unique; {dup[0]} appears more than once")
        if self._n:
            if self._is_sorted() and increasing and ids[0] > self._ids_buf[self._n - 1]:
                return ids  # appending in order: nothing to look up
            present = self._lookup(ids)[1]
            if present.any():
                raise ValueError(f"ids already in the index: {ids[present][:5].tolist()}")
        return ids

    # ------------------------------------------------------------------------------------------------------
    # Ids -> positions
    # ------------------------------------------------------------------------------------------------------

    def _is_sorted(self) -> bool:
        if self._id_sorted is None:
            ids, ok = self._ids_buf, True
            for s in range(0, self._n - 1, 1 << 22):  # chunked: no N-sized temporaries on huge mmaps
                e = min(s + (1 << 22) + 1, self._n)
                if not (ids[s + 1 : e] > ids[s : e - 1]).all():
                    ok = False
                    break
            self._id_sorted = ok
        return self._id_sorted

    def _lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of ``keys`` (int64) and a mask of which were found (positions of missing keys are 0)."""
        keys = np.asarray(keys, np.int64)
        if self._n == 0:
            return np.zeros(keys.shape, np.int64), np.zeros(keys.shape, bool)
        if self._is_sorted():
            sorted_ids, order = self._ids_buf[: self._n], None
        else:
            if self._id_index is None:
                order = np.argsort(self._ids_buf[: self._n], kind="stable")
                self._id_index = (self._ids_buf[: self._n][order], order)
            sorted_ids, order = self._id_index
        at = np.minimum(np.searchsorted(sorted_ids, keys), self._n - 1)
        found = sorted_ids[at] == keys
        pos = at if order is None else order[at]
        return np.where(found, pos, 0).astype(np.int64), found

    def _positions(self, keys, name: str) -> np.ndarray:
        keys = _check_int_array(keys, name, ndim=1).astype(np.int64)
        pos, found = self._lookup(keys)
        if not found.all():
            raise KeyError(f"{name}: {int((~found).sum())} id(s) not in the index, e.g. {keys[~found][:5].tolist()}")
        return pos

    # ------------------------------------------------------------------------------------------------------
    # Storage
    # ------------------------------------------------------------------------------------------------------

    def _append(self, codes: np.ndarray, ids: np.ndarray, metadata) -> None:
        n = codes.shape[0]
        if metadata is not None:
            metadata = _check_metadata(metadata, n)
        if self._n == 0:
            self._meta = None  # an emptied index starts over, with or without metadata
        if self._n and (metadata is None) != (self._meta is None):
            raise ValueError(
                "this index stores per-item metadata: pass metadata= with one string per item"
                if self._meta is not None
                else "this index has items without metadata; metadata can only be given from the first add on"
            )
        if n == 0:
            return
        need = self._n + n
        if need > self._codes_buf.shape[0] or not self._codes_buf.flags.writeable:
            cap = max(need, 2 * self._n, _MIN_CAPACITY)
            new_codes = np.empty((cap, self.M), np.uint8)
            new_ids = np.empty(cap, np.int64)
            new_codes[: self._n] = self._codes_buf[: self._n]
            new_ids[: self._n] = self._ids_buf[: self._n]
            self._codes_buf, self._ids_buf = new_codes, new_ids
        was_sorted = self._id_sorted is True and (self._n == 0 or ids[0] > self._ids_buf[self._n - 1])
        self._codes_buf[self._n : need] = codes
        self._ids_buf[self._n : need] = ids
        self._n = need
        self._id_sorted = True if (was_sorted and bool((ids[1:] > ids[:-1]).all())) else None
        self._id_index = None
        if self._max_id is not None:
            self._max_id = max(self._max_id, int(ids.max()))
        if metadata is not None:
            self._meta = _ItemMetadata(metadata) if self._meta is None else self._meta.extend(metadata)

    @property
    def next_id(self) -> int:
        """The id :meth:`add` gives the next item: one past the largest id ever added (removed ones too)."""
        if self._max_id is None:
            self._max_id = int(self._ids_buf[: self._n].max()) if self._n else -1
        return self._max_id + 1

    def _next_ids(self, n: int) -> np.ndarray:
        return np.arange(self.next_id, self.next_id + n, dtype=np.int64)

    def add(self, x, *, metadata: Sequence[str] | None = None) -> None:
        """Encode embeddings x (n, d) or (n, M, D); add them under ids max(ids) + 1, ... (0, 1, ... first)."""
        codes = self.encode(x)
        self._append(codes, self._next_ids(codes.shape[0]), metadata)

    def add_with_ids(self, x, ids, *, metadata: Sequence[str] | None = None) -> None:
        """Encode embeddings x and add them under ``ids`` (n,), unique, >= 0, not yet in the index."""
        codes = self.encode(x)
        self._append(codes, self._check_new_ids(ids, codes.shape[0]), metadata)

    def add_codes(self, codes, ids=None, *, metadata: Sequence[str] | None = None) -> None:
        """Add already-encoded codes (n, M) in [0, K), with ``ids`` (n,) or new consecutive ids."""
        codes = self._check_codes(codes)
        ids = self._next_ids(codes.shape[0]) if ids is None else self._check_new_ids(ids, codes.shape[0])
        self._append(codes, ids, metadata)

    def remove_ids(self, ids) -> int:
        """Remove the items with these ids (an int or 1-D array-like; ids not in the index are ignored) and
        return how many were removed. The remaining rows keep their order. A memory-mapped index is copied
        into memory first.
        """
        keys = np.atleast_1d(_to_numpy(ids, "ids"))
        keys = np.unique(_check_int_array(keys, "ids", ndim=1).astype(np.int64))
        pos, found = self._lookup(keys)
        if not found.any():
            return 0
        keep = np.ones(self._n, bool)
        keep[pos[found]] = False
        kept = np.flatnonzero(keep)
        self._codes_buf = np.ascontiguousarray(self._codes_buf[: self._n][kept])
        self._ids_buf = np.ascontiguousarray(self._ids_buf[: self._n][kept])
        if self._meta is not None:
            self._meta = self._meta.take(kept)
        removed = self._n - kept.size
        self._n = kept.size
        # Removal keeps the order, so _id_sorted stands; _max_id stays a high-water mark, so that add() never
        # hands out the id of a removed item again.
        self._id_index = None
        return removed

    def reset(self) -> None:
        """Remove every item (codebooks stay)."""
        self._codes_buf = np.empty((0, self.M), np.uint8)
        self._ids_buf = np.empty(0, np.int64)
        self._n = 0
        self._meta = None
        self._id_sorted = True
        self._id_index = None
        self._max_id = -1

    # ------------------------------------------------------------------------------------------------------
    # Encoding and reconstruction
    # ------------------------------------------------------------------------------------------------------

    def query_tables(self, x) -> np.ndarray:
        """ADC lookup tables (n, M, K) float32: distance of each query segment to each codeword."""
        x = self._check_points(x, "x")
        return query_tables(x, self._codebooks, self._curvatures, self.geometry).astype(np.float32)

    def encode(self, x) -> np.ndarray:
        """Codes (n, M) uint8 of embeddings x: per subspace the nearest codeword (geodesic distance, float64;
        ties go to the lowest index)."""
        x = self._check_points(x, "x")
        return self._encode64(x)

    def _encode64(self, x: np.ndarray) -> np.ndarray:
        codes = np.empty((x.shape[0], self.M), np.uint8)
        for s in range(0, x.shape[0], 4096):
            t = query_tables(x[s : s + 4096], self._codebooks, self._curvatures, self.geometry)
            codes[s : s + 4096] = t.argmin(axis=2)
        return codes

    def decode(self, codes) -> np.ndarray:
        """Codewords of codes (n, M) -> (n, d) float32 points (the quantized embeddings)."""
        codes = self._check_codes(codes)
        sub = np.arange(self.M)
        return self._codebooks[sub[None, :], codes.astype(np.intp)].reshape(codes.shape[0], self.d)

    def reconstruct(self, key) -> np.ndarray:
        """The quantized embedding (d,) float32 of the item with id ``key``; KeyError if absent."""
        if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
            raise TypeError(f"key must be an int id, got {type(key).__name__}")
        return self.reconstruct_batch([key])[0]

    def reconstruct_batch(self, keys) -> np.ndarray:
        """Quantized embeddings (n, d) float32 of the items with these ids; KeyError if any is absent."""
        pos = self._positions(keys, "keys")
        return self.decode(self._codes_buf[pos])

    def reconstruct_n(self, i0: int, ni: int) -> np.ndarray:
        """Quantized embeddings (ni, d) of the rows i0 .. i0 + ni - 1 (by position, as in faiss)."""
        if not (0 <= i0 and 0 <= ni and i0 + ni <= self._n):
            raise ValueError(f"rows [{i0}, {i0 + ni}) are not within [0, ntotal = {self._n})")
        return self.decode(self._codes_buf[i0 : i0 + ni])

    def get_metadata(self, ids) -> list[str | None]:
        """Per-item strings (e.g. image paths) for these ids; None for -1 (search padding).

        Raises ValueError if the index stores no metadata, KeyError for an unknown id.
        """
        if self._meta is None:
            raise ValueError("this index stores no per-item metadata (add items with metadata=[...])")
        keys = _check_int_array(ids, "ids", ndim=1).astype(np.int64)
        real = keys != -1
        pos = self._positions(keys[real], "ids")
        strings = iter(self._meta.get(pos))
        return [next(strings) if r else None for r in real]

    # ------------------------------------------------------------------------------------------------------
    # Search
    # ------------------------------------------------------------------------------------------------------

    @property
    def sdc_tables(self) -> np.ndarray:
        """(M, K, K) float32 distances between codewords of each subspace (computed once)."""
        if self._sdc is None:
            T = codeword_tables(self._codebooks, self._curvatures, self.geometry).astype(np.float32)
            T.flags.writeable = False
            self._sdc = T
        return self._sdc

    def _sdc_luts(self, codes: np.ndarray) -> np.ndarray:
        T = self.sdc_tables
        return np.ascontiguousarray(T[np.arange(self.M)[None, :], codes.astype(np.intp)])  # (n, M, K)

    def _searched(self, subset) -> tuple[np.ndarray, np.ndarray]:
        """(codes, ids) of the rows to search: all, or those of the ids in ``subset`` (in row order)."""
        codes, ids = self._codes_buf[: self._n], self._ids_buf[: self._n]
        if subset is None:
            return codes, ids
        keys = np.unique(_check_int_array(subset, "subset", ndim=1).astype(np.int64))
        pos = np.sort(self._positions(keys, "subset"))
        return codes[pos], ids[pos]

    def _scan_chunks(self, queries, make_luts, codes, ids, k, threads):
        """Scan in chunks of queries, so tables for many queries are never all in memory at once."""
        n = queries.shape[0]
        D = np.empty((n, k), np.float32)
        I = np.empty((n, k), np.int64)
        for s in range(0, max(n, 1), _QUERY_CHUNK):
            Dc, Ic = _kernel.scan(make_luts(queries[s : s + _QUERY_CHUNK]), codes, ids, k, threads=threads)
            D[s : s + _QUERY_CHUNK] = Dc
            I[s : s + _QUERY_CHUNK] = Ic
        return D, I

    def search(
        self, x, k: int, *, metric: str | None = None, subset=None, threads: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest items of each query x (n, d) or (n, M, D) under the product distance (Eq. 8).

        Args:
            metric: "adc" or "sdc"; default the index's ``metric``.
            subset: optional ids (array-like) to restrict the search to; every id must be in the index.
            threads: threads for the scan (default :func:`hihpq.index.kernel.get_num_threads`).

        Returns:
            (D, I): (n, k) float32 distances and int64 ids, ascending by (distance, id), padded with
            (inf, -1) when fewer than k items are searched.
        """
        k = _check_k(k)
        metric = self.metric if metric is None else _check_metric(metric)
        x = self._check_points(x, "x")
        codes, ids = self._searched(subset)

        def luts(xs):
            if metric == "adc":
                return query_tables(xs, self._codebooks, self._curvatures, self.geometry).astype(np.float32)
            return self._sdc_luts(self._encode64(xs))

        return self._scan_chunks(x, luts, codes, ids, k, threads)

    def search_codes(self, codes, k: int, *, subset=None, threads: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Symmetric search by code: the k nearest items to codes (n, M) in [0, K); see :meth:`search`."""
        k = _check_k(k)
        query_codes = self._check_codes(codes)
        codes, ids = self._searched(subset)
        return self._scan_chunks(query_codes, self._sdc_luts, codes, ids, k, threads)

    def train(self, x) -> None:
        """Not supported: build the index from a trained quantizer (:meth:`from_quantizer`)."""
        raise NotImplementedError(
            "HyperbolicPQIndex does not learn codebooks; train a hihpq quantizer (or model) and build the "
            "index with HyperbolicPQIndex.from_quantizer(quantizer)"
        )


class EuclideanPQIndex(HyperbolicPQIndex):
    """The Euclidean twin: per-subspace L2 distances (not squared) summed over subspaces, same surface."""

    def __init__(self, codebooks, curvatures=None, *, geometry: str = "euclidean", clip_r=None, metric="adc"):
        if _check_geometry(geometry) != "euclidean":
            raise ValueError(f"EuclideanPQIndex has geometry 'euclidean', got {geometry!r}")
        super().__init__(codebooks, curvatures, geometry="euclidean", clip_r=clip_r, metric=metric)


class CosinePQIndex(HyperbolicPQIndex):
    """The MeCoQ-style counterpart: per-subspace cosine distances 1 - cos summed over subspaces, same surface."""

    def __init__(self, codebooks, curvatures=None, *, geometry: str = "cosine", clip_r=None, metric="adc"):
        if _check_geometry(geometry) != "cosine":
            raise ValueError(f"CosinePQIndex has geometry 'cosine', got {geometry!r}")
        super().__init__(codebooks, curvatures, geometry="cosine", clip_r=clip_r, metric=metric)


def index_class(geometry: str) -> type[HyperbolicPQIndex]:
    """The index class of a geometry name (aliases accepted)."""
    return {"lorentz": HyperbolicPQIndex, "euclidean": EuclideanPQIndex, "cosine": CosinePQIndex}[
        _check_geometry(geometry)
    ]
