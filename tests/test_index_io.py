"""Index files: round trips, and every kind of damage gives a clear IndexFileError (never a crash or a wrong
answer)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hihpq.geometry import lorentz
from hihpq.index import (
    EuclideanPQIndex,
    HyperbolicPQIndex,
    IndexFileError,
    describe_index,
    io,
    read_index,
    write_index,
)

M, K, D = 2, 16, 4
CURV = np.array([0.7, 1.3])


def _points(rng, n):
    v = torch.as_tensor(rng.standard_normal((n, M, D)) * 0.5)
    v[..., 0] = 0.0
    return lorentz.expmap0(v, c=torch.as_tensor(CURV).reshape(-1, 1)).numpy().astype(np.float32)


def _make(rng, n=60, *, metadata=True, geometry="lorentz"):
    if geometry == "lorentz":
        idx = HyperbolicPQIndex(_points(rng, K).transpose(1, 0, 2), CURV, clip_r=0.9, metric="sdc")
    else:
        idx = EuclideanPQIndex(rng.standard_normal((M, K, D)))
    ids = rng.permutation(10 * n)[:n]
    idx.add_codes(rng.integers(0, K, size=(n, M)), ids, metadata=[f"img/{i}-é.jpg" for i in ids] if metadata else None)
    idx.user_metadata = {"model": "hihpq", "epoch": 3, "bits": [16, 32]}
    return idx


@pytest.fixture(scope="module")
def index_bytes():
    """A small index with item metadata, as file bytes (written once for the module)."""
    idx = _make(np.random.default_rng(0), n=40)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "x.hihpq")
        write_index(idx, path)
        with open(path, "rb") as f:
            return f.read()


def _write_bytes(tmp_dir, data: bytes, name="bad.hihpq") -> str:
    path = os.path.join(tmp_dir, name)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _same_results(a, b, rng):
    q = _points(rng, 5) if a.geometry == "lorentz" else rng.standard_normal((5, M, D)).astype(np.float32)
    for metric in ("adc", "sdc"):
        Da, Ia = a.search(q, 7, metric=metric)
        Db, Ib = b.search(q, 7, metric=metric)
        np.testing.assert_array_equal(Ia, Ib)
        np.testing.assert_array_equal(Da, Db)


@pytest.mark.parametrize("mmap", [True, False])
@pytest.mark.parametrize("geometry", ["lorentz", "euclidean"])
def test_round_trip(tmp_path, mmap, geometry):
    rng = np.random.default_rng(1)
    idx = _make(rng, geometry=geometry)
    idx.remove_ids(idx.ids[np.argmax(idx.ids)])  # the high-water id survives the round trip
    path = tmp_path / "a.hihpq"
    write_index(idx, path)
    back = read_index(path, mmap=mmap)
    assert type(back) is type(idx) and back.is_memory_mapped == mmap
    for attr in ("geometry", "metric", "M", "K", "D", "ntotal", "clip_r", "user_metadata", "next_id"):
        assert getattr(back, attr) == getattr(idx, attr), attr
    np.testing.assert_array_equal(back.codebooks, idx.codebooks)
    np.testing.assert_array_equal(back.curvatures, idx.curvatures)
    np.testing.assert_array_equal(back.codes, idx.codes)
    np.testing.assert_array_equal(back.ids, idx.ids)
    assert back.get_metadata(idx.ids) == idx.get_metadata(idx.ids)
    _same_results(idx, back, rng)
    # the read index is a full index: add / remove work (a memory map is copied first)
    back.add_codes(np.zeros((2, M), np.uint8), metadata=["n1", "n2"])
    assert back.remove_ids(idx.ids[:3]) == 3 and back.ntotal == idx.ntotal - 1 and not back.is_memory_mapped
    # and it can be written over the file it was mapped from
    write_index(back, path)
    again = read_index(path)
    np.testing.assert_array_equal(again.ids, back.ids)
    assert again.get_metadata(again.ids[-2:]) == ["n1", "n2"]


def test_round_trip_empty_and_without_metadata(tmp_path):
    rng = np.random.default_rng(2)
    idx = _make(rng, n=0, metadata=False)
    write_index(idx, tmp_path / "e.hihpq")
    back = read_index(tmp_path / "e.hihpq")
    assert back.ntotal == 0 and not back.has_item_metadata
    _, I0 = back.search(_points(rng, 2), 3)
    assert (I0 == -1).all()
    idx2 = _make(rng, n=30, metadata=False)
    write_index(idx2, tmp_path / "n.hihpq")
    _same_results(idx2, read_index(tmp_path / "n.hihpq"), rng)


def test_describe_index(tmp_path):
    idx = _make(np.random.default_rng(3), n=25)
    path = tmp_path / "d.hihpq"
    write_index(idx, path)
    info = describe_index(path)
    assert info["path"] == str(path) and info["file_size"] == os.path.getsize(path)
    assert (info["M"], info["K"], info["D"], info["d"], info["bits"], info["ntotal"]) == (
        M,
        K,
        D,
        M * D,
        8,
        25,
    )
    assert (info["geometry"], info["metric"], info["clip_r"], info["format_version"]) == (
        "lorentz",
        "sdc",
        0.9,
        1,
    )
    assert info["curvatures"] == pytest.approx(CURV.tolist())
    assert info["has_item_metadata"] and info["user_metadata"]["epoch"] == 3 and not info["verified"]
    assert set(info["sections"]) == {"curvatures", "codebooks", "ids", "codes", "meta_offsets", "meta_blob"}
    json.dumps(info)  # JSON-able, for `hihpq index info`
    assert describe_index(path, verify=True)["verified"]


# ----------------------------------------------------------------------------------------------------------
# Damage
# ----------------------------------------------------------------------------------------------------------


def _expect_error(path, match, **kw):
    with pytest.raises(IndexFileError, match=match) as e:
        read_index(path, **kw)
    assert str(path) in str(e.value)
    return e.value


def test_truncated_at_many_offsets(tmp_path, index_bytes):
    n = len(index_bytes)
    for cut in sorted({0, 1, 7, 8, 40, 63, 64, 65, 200, n // 3, n // 2, n - 64, n - 1}):
        path = _write_bytes(tmp_path, index_bytes[:cut], f"t{cut}.hihpq")
        err = _expect_error(path, "truncated|bad magic")
        if cut >= 64:
            assert f"expected {n} bytes, found {cut}" in str(err)
    path = _write_bytes(tmp_path, index_bytes + b"\0", "long.hihpq")
    _expect_error(path, "trailing data")


def test_wrong_magic_version_flags(tmp_path, index_bytes):
    _expect_error(_write_bytes(tmp_path, b"PK\x03\x04" + index_bytes[4:]), r"not a hihpq index file \(bad magic\)")
    bad = bytearray(index_bytes)
    bad[8:12] = struct.pack("<I", 9)
    _expect_error(_write_bytes(tmp_path, bytes(bad)), r"unsupported format version 9 \(this hihpq reads version 1\)")
    bad = bytearray(index_bytes)
    bad[12:16] = struct.pack("<I", 1)
    _expect_error(_write_bytes(tmp_path, bytes(bad)), "unsupported flags")
    _expect_error(_write_bytes(tmp_path, b"not an index at all" * 10), "bad magic")


def _sections(data: bytes) -> dict:
    header_len = struct.unpack("<Q", data[16:24])[0]
    return json.loads(data[64 : 64 + header_len])["sections"]


@pytest.mark.parametrize("name", ["curvatures", "codebooks", "ids", "codes", "meta_offsets", "meta_blob"])
def test_flipped_byte_in_each_section(tmp_path, index_bytes, name):
    s = _sections(index_bytes)[name]
    bad = bytearray(index_bytes)
    bad[s["offset"] + s["nbytes"] // 2] ^= 0x10
    path = _write_bytes(tmp_path, bytes(bad))
    _expect_error(path, f"checksum mismatch in section '{name}'")
    if name not in ("curvatures", "codebooks"):  # large sections may be trusted: no crash, same shapes
        idx = read_index(path, verify=False)
        q = _points(np.random.default_rng(0), 2)
        D_, I_ = idx.search(q, 5)
        assert D_.shape == I_.shape == (2, 5)


def test_flipped_header_and_padding(tmp_path, index_bytes):
    bad = bytearray(index_bytes)
    bad[70] ^= 0x01  # inside the JSON header
    _expect_error(_write_bytes(tmp_path, bytes(bad)), "header checksum mismatch")
    bad = bytearray(index_bytes)
    bad[40] ^= 0x01  # inside the stored digest
    _expect_error(_write_bytes(tmp_path, bytes(bad)), "header checksum mismatch")
    s = _sections(index_bytes)["curvatures"]
    bad = bytearray(index_bytes)
    bad[s["offset"] - 1] = 7  # padding before the first section
    _expect_error(_write_bytes(tmp_path, bytes(bad)), "corrupted padding")


def _resign(data: bytes, edit) -> bytes:
    """Rewrite the JSON header with ``edit`` and re-sign it: a self-consistent but mismatched file.

    The sections stay where they were (the header has room up to the first one; zero padding in between).
    """
    header_len = struct.unpack("<Q", data[16:24])[0]
    header = json.loads(data[64 : 64 + header_len])
    first = min(s["offset"] for s in header["sections"].values())
    edit(header)
    new = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    assert 64 + len(new) <= first
    head = data[:16] + struct.pack("<Q", len(new)) + data[24:32]
    digest = hashlib.blake2b(head + new, digest_size=32).digest()
    return head + digest + new + b"\0" * (first - 64 - len(new)) + data[first:]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda h: h.update(M=3), "section 'curvatures' has shape"),
        (lambda h: h.update(ntotal=41), "section 'ids' has shape"),
        (lambda h: h.update(K=300), "K = 300"),
        (lambda h: h.update(geometry="poincare"), "unknown geometry"),
        (lambda h: h["sections"]["codes"].update(offset=h["sections"]["codes"]["offset"] + 64), "starts at"),
        (lambda h: h["sections"]["codes"].update(dtype="<i2"), "dtype"),
        (lambda h: h["sections"].pop("meta_blob"), "set of sections"),
        (lambda h: h.pop("metric"), "mismatched header"),
        (lambda h: h.update(format="other"), "not a hihpq-index header"),
    ],
)
def test_mismatched_but_signed_headers(tmp_path, index_bytes, edit, match):
    _expect_error(_write_bytes(tmp_path, _resign(index_bytes, edit)), match)


def test_codes_out_of_range_are_rejected(tmp_path, index_bytes):
    """A code byte >= K with a correct checksum (e.g. written by another tool) is refused on verify."""
    s = _sections(index_bytes)["codes"]
    bad = bytearray(index_bytes)
    bad[s["offset"]] = K + 3

    def fix(h):
        h["sections"]["codes"]["blake2b"] = hashlib.blake2b(
            bytes(bad[s["offset"] : s["offset"] + s["nbytes"]]), digest_size=16
        ).hexdigest()

    _expect_error(_write_bytes(tmp_path, _resign(bytes(bad), fix)), r"codes out of range")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_any_damage_is_detected(index_bytes, data):
    """Random byte flips, overwrites, truncations and insertions: always IndexFileError, nothing else."""
    buf = bytearray(index_bytes)
    n = len(buf)
    kind = data.draw(st.sampled_from(["flip", "overwrite", "truncate", "insert"]))
    if kind == "flip":
        for pos in data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4, unique=True)):
            buf[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "overwrite":
        pos = data.draw(st.integers(0, n - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=64))
        before = bytes(buf[pos : pos + len(chunk)])
        buf[pos : pos + len(chunk)] = chunk
        if bytes(buf[pos : pos + len(chunk)]) == before[: len(chunk)] and len(buf) == n:
            return  # the "damage" left the file unchanged
    elif kind == "truncate":
        del buf[data.draw(st.integers(0, n - 1)) :]
    else:
        pos = data.draw(st.integers(0, n))
        buf[pos:pos] = data.draw(st.binary(min_size=1, max_size=16))
    with tempfile.TemporaryDirectory() as d:
        path = _write_bytes(d, bytes(buf))
        with pytest.raises(IndexFileError):
            read_index(path)
        with pytest.raises(IndexFileError):
            describe_index(path, verify=True)


@settings(max_examples=60, deadline=None)
@given(blob=st.binary(min_size=0, max_size=300))
def test_fuzz_random_files(blob):
    with tempfile.TemporaryDirectory() as d:
        path = _write_bytes(d, blob)
        with pytest.raises(IndexFileError):
            read_index(path)
        with pytest.raises(IndexFileError):
            read_index(_write_bytes(d, io.MAGIC + struct.pack("<I", 1) + blob, "m.hihpq"))


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    old = _make(rng, n=30)
    path = tmp_path / "idx.hihpq"
    write_index(old, path)
    before = path.read_bytes()
    real = io._write_array

    def crash_midway(f, a):
        if a.dtype == np.int64 and a.ndim == 1:  # the ids section: half of it, then a "crash"
            f.write(a.tobytes()[: a.nbytes // 2])
            raise OSError("disk full (simulated)")
        real(f, a)

    monkeypatch.setattr(io, "_write_array", crash_midway)
    with pytest.raises(OSError, match="simulated"):
        write_index(_make(rng, n=500), path)
    assert path.read_bytes() == before  # old file untouched
    assert os.listdir(tmp_path) == ["idx.hihpq"]  # no temporary left behind
    monkeypatch.setattr(io, "_write_array", real)
    _same_results(old, read_index(path), rng)


def test_write_errors(tmp_path):
    idx = _make(np.random.default_rng(5), n=3)
    idx.user_metadata = {"x": object()}
    with pytest.raises(TypeError, match="JSON"):
        write_index(idx, tmp_path / "u.hihpq")
    with pytest.raises(TypeError, match="HyperbolicPQIndex"):
        write_index("not an index", tmp_path / "u.hihpq")
    with pytest.raises(FileNotFoundError, match="no such index file"):
        read_index(tmp_path / "missing.hihpq")


def test_write_with_item_names_and_metadata(tmp_path):
    """The file can carry per-item names and user metadata given at write time (e.g. by `hihpq encode`)."""
    idx = _make(np.random.default_rng(6), n=12, metadata=False)
    names = [f"/data/img_{i:03d}.png" for i in range(12)]
    write_index(idx, tmp_path / "w.hihpq", item_names=names, metadata={"model": "/runs/a"})
    assert not idx.has_item_metadata  # the index object is unchanged
    back, info = read_index(tmp_path / "w.hihpq", return_metadata=True)
    assert info["metadata"] == {**idx.user_metadata, "model": "/runs/a"} == back.user_metadata
    np.testing.assert_array_equal(info["ids"], idx.ids)
    stored = info["item_names"]
    assert len(stored) == 12 and stored[3] == names[3] and stored[-1] == names[-1] and list(stored) == names
    with pytest.raises(IndexError):
        stored[12]
    assert back.get_metadata(idx.ids[[5, 0]]) == [names[5], names[0]]
    with pytest.raises(ValueError, match="11 entries for 12 items"):
        write_index(idx, tmp_path / "x.hihpq", item_names=names[:-1])
    with pytest.raises(TypeError, match="dict"):
        write_index(idx, tmp_path / "x.hihpq", metadata=["model"])
    assert read_index(tmp_path / "w.hihpq", return_metadata=False).ntotal == 12
