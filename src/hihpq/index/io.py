"""Index files: one self-describing, checksummed, memory-mappable file per index. No pickle.

Layout (little-endian)::

    offset 0   prefix, 64 bytes: magic b"HIHPQIDX" | format version u32 | flags u32 (0) | header length u64 |
               file size u64 | blake2b-256 digest of prefix[0:32] + header
    offset 64  header: UTF-8 JSON (geometry, metric, M, K, D, ntotal, clip_r, user metadata, and for every
               section its offset, byte length, dtype, shape and blake2b-128 digest)
    sections   each at the next multiple of 64 after the previous one, zero padding in between:
               curvatures <f8 (M,) | codebooks <f4 (M, K, D) | ids <i8 (N,) | codes u1 (N, M)
               [| meta_offsets <i8 (N + 1,) | meta_blob u1 (bytes)]  (optional per-item UTF-8 strings)

Every byte is checked on read: the prefix fields, the header digest, the layout against the header, the zero
padding, and the section digests (those of the large id / code / metadata sections can be skipped with
``verify=False`` for huge files; they stream at ~0.7 GB/s). Any problem raises :class:`IndexFileError` naming
the file and the problem. :func:`write_index` writes through :func:`hihpq.runinfo.atomic_path` (temporary file
in the same directory, fsync, rename), so a crash mid-write leaves the old file intact.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from hihpq import __version__
from hihpq.atomic import atomic_path, kind_of
from hihpq.index.pq_index import HyperbolicPQIndex, _check_metadata, _ItemMetadata, index_class

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "IndexFileError",
    "describe_index",
    "is_index_file",
    "read_index",
    "write_index",
]

MAGIC = b"HIHPQIDX"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sIIQQ32s")  # 64 bytes
_ALIGN = 64
_MAX_HEADER = 1 << 26  # 64 MB of JSON is far beyond any real header: a larger length means corruption
_CHUNK = 1 << 24  # bytes per read/write/hash step: bounded memory for huge sections
_SMALL = ("curvatures", "codebooks")  # always verified
_SECTIONS = ("curvatures", "codebooks", "ids", "codes", "meta_offsets", "meta_blob")
_DTYPES = {
    "curvatures": "<f8",
    "codebooks": "<f4",
    "ids": "<i8",
    "codes": "|u1",
    "meta_offsets": "<i8",
    "meta_blob": "|u1",
}


class IndexFileError(ValueError):
    """An index file is truncated, corrupted, of an unsupported version or inconsistent with itself."""

    def __init__(self, path, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _align(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


def _section_digest(chunks) -> str:
    h = hashlib.blake2b(digest_size=16)
    for c in chunks:
        h.update(c)
    return h.hexdigest()


def _array_chunks(a: np.ndarray):
    """The bytes of a C-contiguous array, in bounded chunks (no copy of a memory map)."""
    flat = a.reshape(-1).view(np.uint8) if a.size else np.empty(0, np.uint8)
    for s in range(0, flat.size, _CHUNK):
        yield memoryview(flat[s : s + _CHUNK])


# ----------------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------------


def _write_array(f, a: np.ndarray) -> None:
    for chunk in _array_chunks(a):
        f.write(chunk)


def write_index(
    index: HyperbolicPQIndex,
    path: str | os.PathLike,
    *,
    item_names: Sequence[str] | None = None,
    metadata: dict[str, Any] | None = None,
    force: bool = False,
) -> None:
    """Write ``index`` to ``path`` atomically (temporary file in the same directory, fsync, rename).

    ``path`` must not be a device, FIFO or folder, nor (unless ``force``) an existing file that is not an index;
    its folder must exist.

    Args:
        item_names: per-item strings (e.g. image paths), one per row in row order, stored in the file instead
            of the index's own item metadata (the index object is not changed).
        metadata: JSON-able dict stored in the file's user metadata, over ``index.user_metadata``.
    """
    if not isinstance(index, HyperbolicPQIndex):
        raise TypeError(f"index must be a HyperbolicPQIndex, got {type(index).__name__}")
    path = Path(path)
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        user = json.loads(json.dumps({**index.user_metadata, **(metadata or {})}, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise TypeError(f"index.user_metadata must be JSON-serialisable (finite numbers): {e}") from e
    meta = index._meta if item_names is None else _ItemMetadata(_check_metadata(item_names, index.ntotal))
    arrays: dict[str, np.ndarray] = {
        "curvatures": np.ascontiguousarray(index.curvatures, "<f8"),
        "codebooks": np.ascontiguousarray(index.codebooks, "<f4"),
        "ids": np.ascontiguousarray(index.ids, "<i8"),
        "codes": np.ascontiguousarray(index.codes, "|u1"),
    }
    if meta is not None:
        offsets, blob = meta.to_buffers()
        arrays["meta_offsets"] = np.ascontiguousarray(offsets, "<i8")
        arrays["meta_blob"] = np.ascontiguousarray(blob, "|u1")
    header: dict[str, Any] = {
        "format": "hihpq-index",
        "hihpq_version": __version__,
        "geometry": index.geometry,
        "metric": index.metric,
        "M": index.M,
        "K": index.K,
        "D": index.D,
        "ntotal": index.ntotal,
        "next_id": index.next_id,
        "clip_r": index.clip_r,
        "user_metadata": user,
        "sections": {
            name: {
                "dtype": _DTYPES[name],
                "shape": list(a.shape),
                "nbytes": int(a.nbytes),
                "blake2b": _section_digest(_array_chunks(a)),
            }
            for name, a in arrays.items()
        },
    }
    # Offsets depend on the header length, which depends on the offsets' digits: iterate to a fixed point.
    header_bytes = b""
    for _ in range(8):
        pos = _align(_PREFIX.size + len(header_bytes))
        for name, a in arrays.items():
            header["sections"][name]["offset"] = pos
            pos = _align(pos + a.nbytes)
        end = header["sections"][list(arrays)[-1]]["offset"] + arrays[list(arrays)[-1]].nbytes
        new = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
        if len(new) == len(header_bytes):
            break
        header_bytes = new
    head = struct.pack("<8sIIQQ", MAGIC, FORMAT_VERSION, 0, len(header_bytes), end)
    digest = hashlib.blake2b(head + header_bytes, digest_size=32).digest()

    with atomic_path(path, looks_like=is_index_file, what="hihpq index file", force=force, make_parents=False) as tmp:
        with open(tmp, "wb") as f:
            f.write(head + digest + header_bytes)
            for name, a in arrays.items():
                f.write(b"\0" * (header["sections"][name]["offset"] - f.tell()))
                _write_array(f, a)


def is_index_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` starts with the index magic (an index file, intact or not: ours to overwrite)."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# ----------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------


def _parse(path: Path, f) -> tuple[dict, int, int]:
    """Check the prefix, header digest and layout of an open index file; returns (header, file size,
    header length)."""
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(_PREFIX.size)
    if len(prefix) < len(MAGIC) or prefix[: len(MAGIC)] != MAGIC:
        if len(prefix) < len(MAGIC) and MAGIC.startswith(prefix):
            raise IndexFileError(path, f"truncated: {size} bytes, shorter than the {_PREFIX.size}-byte prefix")
        raise IndexFileError(path, "not a hihpq index file (bad magic)")
    if len(prefix) < _PREFIX.size:
        raise IndexFileError(path, f"truncated: {size} bytes, shorter than the {_PREFIX.size}-byte prefix")
    _, version, flags, header_len, file_size, digest = _PREFIX.unpack(prefix)
    if version != FORMAT_VERSION:
        raise IndexFileError(path, f"unsupported format version {version} (this hihpq reads version {FORMAT_VERSION})")
    if flags != 0:
        raise IndexFileError(path, f"unsupported flags {flags:#x} (this hihpq writes and reads 0)")
    if size < file_size:
        raise IndexFileError(path, f"truncated: expected {file_size} bytes, found {size}")
    if size > file_size:
        raise IndexFileError(path, f"trailing data: expected {file_size} bytes, found {size}")
    if header_len > min(_MAX_HEADER, file_size - _PREFIX.size):
        raise IndexFileError(path, f"corrupt prefix: header length {header_len} does not fit the file")
    header_bytes = f.read(header_len)
    if hashlib.blake2b(prefix[:32] + header_bytes, digest_size=32).digest() != digest:
        raise IndexFileError(path, "header checksum mismatch (the prefix or header is corrupted)")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise IndexFileError(path, f"malformed header: {e}") from None
    try:
        _check_header(header, header_len, file_size)
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise IndexFileError(path, f"mismatched header: {e}") from None
    return header, size, header_len


def _int(v, name: str, lo: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return v


def _check_header(h: dict, header_len: int, file_size: int) -> None:
    """Types, values and section layout of a header (raises KeyError / TypeError / ValueError)."""
    if not isinstance(h, dict) or h.get("format") != "hihpq-index":
        raise ValueError("not a hihpq-index header")
    if h["geometry"] not in ("lorentz", "euclidean", "cosine"):
        raise ValueError(f"unknown geometry {h['geometry']!r}")
    if h["metric"] not in ("adc", "sdc"):
        raise ValueError(f"unknown metric {h['metric']!r}")
    M, K, D, N = (_int(h[key], key, lo) for key, lo in (("M", 1), ("K", 1), ("D", 1), ("ntotal", 0)))
    _int(h["next_id"], "next_id")
    if K > 256:
        raise ValueError(f"K = {K} > 256 does not fit uint8 codes")
    clip_r = h["clip_r"]
    if clip_r is not None and (isinstance(clip_r, bool) or not isinstance(clip_r, (int, float)) or clip_r <= 0):
        raise ValueError(f"clip_r must be a positive number or null, got {clip_r!r}")
    if not isinstance(h["user_metadata"], dict):
        raise ValueError("user_metadata must be an object")
    sections = h["sections"]
    names = [n for n in _SECTIONS if n in sections]
    if set(sections) - set(_SECTIONS) or names[:4] != list(_SECTIONS[:4]) or len(names) not in (4, 6):
        raise ValueError(f"unexpected set of sections {sorted(sections)}")
    shapes = {"curvatures": [M], "codebooks": [M, K, D], "ids": [N], "codes": [N, M], "meta_offsets": [N + 1]}
    pos = _align(_PREFIX.size + header_len)
    for name in names:
        s = sections[name]
        if s["dtype"] != _DTYPES[name]:
            raise ValueError(f"section {name!r} has dtype {s['dtype']!r}, expected {_DTYPES[name]!r}")
        shape = s["shape"]
        if not isinstance(shape, list) or not all(isinstance(v, int) and v >= 0 for v in shape):
            raise ValueError(f"section {name!r} has a bad shape {shape!r}")
        if name in shapes and shape != shapes[name]:
            raise ValueError(f"section {name!r} has shape {shape} but M={M}, K={K}, D={D}, ntotal={N}")
        if name == "meta_blob" and len(shape) != 1:
            raise ValueError(f"section 'meta_blob' must be 1-D, got shape {shape}")
        nbytes = math.prod(shape) * np.dtype(_DTYPES[name]).itemsize  # Python ints: no overflow
        if s["nbytes"] != nbytes:
            raise ValueError(f"section {name!r} has {s['nbytes']} bytes, expected {nbytes} for shape {shape}")
        if s["offset"] != pos:
            raise ValueError(f"section {name!r} starts at {s['offset']}, expected {pos}")
        if not (isinstance(s["blake2b"], str) and len(s["blake2b"]) == 32):
            raise ValueError(f"section {name!r} has a bad digest")
        end = pos + nbytes
        pos = _align(end)
    if end != file_size:
        raise ValueError(f"sections end at byte {end} but the file has {file_size}")


def _read_bytes(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def _check_zero_padding(path: Path, f, header: dict, header_len: int) -> None:
    prev_end = _PREFIX.size + header_len
    for name in (n for n in _SECTIONS if n in header["sections"]):
        s = header["sections"][name]
        gap = s["offset"] - prev_end
        if gap and _read_bytes(f, prev_end, gap).count(0) != gap:
            raise IndexFileError(path, f"corrupted padding at bytes {prev_end}..{s['offset']}")
        prev_end = s["offset"] + s["nbytes"]


def _verify_section(path: Path, f, name: str, s: dict) -> None:
    h = hashlib.blake2b(digest_size=16)
    f.seek(s["offset"])
    left = s["nbytes"]
    while left:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            raise IndexFileError(path, f"truncated in section {name!r}")
        h.update(chunk)
        left -= len(chunk)
    if h.hexdigest() != s["blake2b"]:
        raise IndexFileError(path, f"checksum mismatch in section {name!r}")


def _load(path: Path, f, s: dict, *, mmap: bool) -> np.ndarray:
    dtype = np.dtype(s["dtype"])
    shape = tuple(s["shape"])
    if s["nbytes"] == 0:
        return np.zeros(shape, dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=s["offset"], shape=shape)
    f.seek(s["offset"])
    a = np.fromfile(f, dtype=dtype, count=int(np.prod(shape)))
    if a.size != int(np.prod(shape)):
        raise IndexFileError(path, "truncated while reading")
    return a.reshape(shape)


def _open(path) -> Path:
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such index file") from None
    if stat.S_ISDIR(mode):
        raise IndexFileError(path, "a folder, not an index file")
    if not stat.S_ISREG(mode):
        raise IndexFileError(path, f"{kind_of(mode)}, not an index file")
    return path


def read_index(
    path: str | os.PathLike, *, mmap: bool = True, verify: bool = True, return_metadata: bool = False
) -> HyperbolicPQIndex | tuple[HyperbolicPQIndex, dict[str, Any]]:
    """Read an index file written by :func:`write_index`.

    Args:
        mmap: memory-map ids, codes and item metadata read-only (an index larger than RAM can be searched;
            the first add / remove copies them into memory). False reads everything into memory.
        verify: check the digests of the large sections too (the prefix, header, layout, padding and the
            small sections are always checked), and that every code is < K and the metadata offsets are
            consistent. False trusts them: only for files known to be intact.
        return_metadata: also return a dict {"metadata": the user metadata, "item_names": the per-item
            strings in row order (a lazy sequence, decoded on access) or None, "ids": the (ntotal,) ids}.
            The index itself answers the same: ``index.user_metadata``, ``index.get_metadata(ids)``.

    Raises:
        IndexFileError: truncated, corrupted, wrong version, or inconsistent file (the message names it).
    """
    path = _open(path)
    with open(path, "rb") as f:
        header, _, header_len = _parse(path, f)
        _check_zero_padding(path, f, header, header_len)
        sections = header["sections"]
        for name, s in sections.items():
            if verify or name in _SMALL:
                _verify_section(path, f, name, s)
        curv = _load(path, f, sections["curvatures"], mmap=False)
        books = _load(path, f, sections["codebooks"], mmap=False)
        M, K, N = header["M"], header["K"], header["ntotal"]
        cls = index_class(header["geometry"])  # the geometry decides the scores (a cosine index scores by cosine)
        try:
            index = cls(books, curv, geometry=header["geometry"], clip_r=header["clip_r"], metric=header["metric"])
        except (TypeError, ValueError) as e:
            raise IndexFileError(path, f"invalid codebooks, curvatures or clip_r: {e}") from None
        ids = _load(path, f, sections["ids"], mmap=mmap)
        codes = _load(path, f, sections["codes"], mmap=mmap)
        meta = None
        if "meta_offsets" in sections:
            offsets = _load(path, f, sections["meta_offsets"], mmap=mmap)
            blob = _load(path, f, sections["meta_blob"], mmap=mmap)
            meta = _ItemMetadata(offsets=offsets, blob=blob)
        if verify:
            _check_contents(path, codes, ids, meta, K)
    index._from_storage(codes.reshape(N, M), ids, meta, header["next_id"])
    index.user_metadata = header["user_metadata"]
    if return_metadata:
        return index, {"metadata": index.user_metadata, "item_names": meta, "ids": index.ids}
    return index


def _check_contents(path: Path, codes, ids, meta: _ItemMetadata | None, K: int) -> None:
    step = 1 << 22
    for s in range(0, codes.shape[0], step):
        if K < 256 and codes[s : s + step].max(initial=0) >= K:
            raise IndexFileError(path, f"codes out of range [0, {K})")
        if ids[s : s + step].min(initial=0) < 0:
            raise IndexFileError(path, "negative ids")
    if meta is not None:
        offsets, blob = meta._offsets, meta._blob
        if offsets[0] != 0 or offsets[-1] != blob.shape[0] or (np.diff(offsets) < 0).any():
            raise IndexFileError(path, "inconsistent item metadata offsets")


def describe_index(path: str | os.PathLike, *, verify: bool = False) -> dict[str, Any]:
    """What an index file holds, from its header (fast; ``verify=True`` also checks every section).

    Returns a JSON-able dict: path, file_size, format_version, hihpq_version, geometry, metric, M, K, D, d,
    bits, code_size, ntotal, next_id, clip_r, curvatures (list), has_item_metadata, user_metadata, sections
    ({name: {offset, nbytes, dtype, shape}}), verified.
    """
    path = _open(path)
    with open(path, "rb") as f:
        header, size, _ = _parse(path, f)
        sec = header["sections"]
        _verify_section(path, f, "curvatures", sec["curvatures"])
        curv = _load(path, f, sec["curvatures"], mmap=False)
    if verify:
        read_index(path, mmap=True, verify=True)
    M, K, D = header["M"], header["K"], header["D"]
    bits = M * float(np.log2(K))
    return {
        "path": str(path),
        "file_size": size,
        "format_version": FORMAT_VERSION,
        "hihpq_version": header.get("hihpq_version"),
        "geometry": header["geometry"],
        "metric": header["metric"],
        "M": M,
        "K": K,
        "D": D,
        "d": M * D,
        "bits": int(bits) if bits.is_integer() else bits,
        "code_size": M,
        "ntotal": header["ntotal"],
        "next_id": header["next_id"],
        "clip_r": header["clip_r"],
        "curvatures": [float(c) for c in curv],
        "has_item_metadata": "meta_offsets" in sec,
        "user_metadata": header["user_metadata"],
        "sections": {
            name: {k: s[k] for k in ("offset", "nbytes", "dtype", "shape")}
            for name, s in sorted(sec.items(), key=lambda item: item[1]["offset"])
        },
        "verified": verify,
    }
