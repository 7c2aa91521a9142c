"""The top-k scan kernel equals the slow reference exactly: same ids, same float32 distances."""

from __future__ import annotations

import numpy as np
import pytest

from hihpq.index import kernel as scan_mod
from hihpq.index.kernel import get_num_threads, reference_scan, scan, set_num_threads


def _problem(rng, nq, M, K, N, *, ties=False, shuffle_ids=True):
    luts = rng.random((nq, M, K)).astype(np.float32)
    if ties:  # few distinct table values: many exactly equal sums, ranked by id
        luts = np.round(luts * 3).astype(np.float32)
    codes = rng.integers(0, K, size=(N, M), dtype=np.uint8)
    ids = rng.permutation(3 * N + 1)[:N].astype(np.int64) if shuffle_ids else np.arange(N, dtype=np.int64)
    return luts, codes, ids


def _slow_loop(luts, codes, ids, k):
    """Loop-based reference, independent of reference_scan: python sums, sorted() by (distance, id)."""
    nq = luts.shape[0]
    D = np.full((nq, k), np.inf, np.float32)
    I = np.full((nq, k), -1, np.int64)
    for q in range(nq):
        rows = []
        for i in range(codes.shape[0]):
            d = np.float32(0)
            for m in range(codes.shape[1]):
                d = np.float32(d + luts[q, m, codes[i, m]]) if m else luts[q, 0, codes[i, 0]]
            rows.append((float(d), int(ids[i])))
        rows.sort()
        for r, (d, i) in enumerate(rows[:k]):
            D[q, r], I[q, r] = d, i
    return D, I


@pytest.fixture
def small_ranges(monkeypatch):
    """Split scans into per-thread row ranges from 64 rows on, so that small tests exercise the merge."""
    monkeypatch.setattr(scan_mod, "_MIN_ROWS_PER_THREAD", 64)


def test_reference_scan_matches_loop_reference():
    rng = np.random.default_rng(0)
    for ties in (False, True):
        luts, codes, ids = _problem(rng, 3, 3, 16, 150, ties=ties)
        for k in (1, 10, 150, 200):
            D, I = reference_scan(luts, codes, ids, k)
            Dl, Il = _slow_loop(luts, codes, ids, k)
            np.testing.assert_array_equal(I, Il)
            np.testing.assert_array_equal(D, Dl)


@pytest.mark.parametrize("M", [1, 2, 4, 8])
@pytest.mark.parametrize("K", [16, 256])
@pytest.mark.parametrize("threads", [1, 2])
def test_scan_equals_reference(M, K, threads, small_ranges):
    rng = np.random.default_rng(M * 1000 + K + threads)
    k = 20
    for N in (0, 1, k - 1, k, 3000):
        for ties in (False, True):
            luts, codes, ids = _problem(rng, 6, M, K, N, ties=ties)
            D, I = scan(luts, codes, ids, k, threads=threads)
            Dr, Ir = reference_scan(luts, codes, ids, k)
            assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (6, k)
            np.testing.assert_array_equal(I, Ir, err_msg=f"N={N} ties={ties}")
            np.testing.assert_array_equal(D, Dr, err_msg=f"N={N} ties={ties}")


@pytest.mark.parametrize("nq", [1, 3, 4, 5, 16, 17, 32, 33, 70])
def test_batch_widths_and_padding_queries(nq, small_ranges):
    """Every batch width (4, 16, 32 lanes) and partially filled batch gives the reference answer."""
    rng = np.random.default_rng(nq)
    luts, codes, ids = _problem(rng, nq, 4, 256, 700)
    for threads in (1, 2):
        D, I = scan(luts, codes, ids, 9, threads=threads)
        Dr, Ir = reference_scan(luts, codes, ids, 9)
        np.testing.assert_array_equal(I, Ir)
        np.testing.assert_array_equal(D, Dr)


def test_k_larger_than_n_is_padded():
    rng = np.random.default_rng(1)
    luts, codes, ids = _problem(rng, 2, 2, 16, 5)
    D, I = scan(luts, codes, ids, 8)
    assert (I[:, 5:] == -1).all() and np.isinf(D[:, 5:]).all()
    assert sorted(I[0, :5]) == sorted(ids)
    np.testing.assert_array_equal(I, reference_scan(luts, codes, ids, 8)[1])


def test_large_k_and_compaction(small_ranges):
    """k large enough that candidate buffers overflow and are compacted many times."""
    rng = np.random.default_rng(2)
    for ties in (False, True):
        luts, codes, ids = _problem(rng, 5, 2, 16 if ties else 256, 6000, ties=ties)
        for k in (300, 2999, 6000):
            D, I = scan(luts, codes, ids, k, threads=2)
            Dr, Ir = reference_scan(luts, codes, ids, k)
            np.testing.assert_array_equal(I, Ir)
            np.testing.assert_array_equal(D, Dr)


def test_sampled_threshold_path_is_exact():
    """N >> k: the kernel starts from a sampled threshold; results are still exactly the reference."""
    rng = np.random.default_rng(3)
    luts, codes, ids = _problem(rng, 20, 4, 256, 60_000)
    assert scan_mod._pilot_layout(60_000, 300)[0] > 0  # the sample path is taken
    D, I = scan(luts, codes, ids, 300, threads=1)
    Dr, Ir = reference_scan(luts, codes, ids, 300)
    np.testing.assert_array_equal(I, Ir)
    np.testing.assert_array_equal(D, Dr)


def test_too_tight_sampled_threshold_falls_back_to_a_full_scan():
    """Adversarial order: every sampled row is closer than any other row, so the sampled threshold admits
    fewer than k rows; the kernel must notice and rescan rather than return a short or wrong list."""
    N, k, M = 40_000, 1000, 2
    n_chunks, per = scan_mod._pilot_layout(N, k)
    assert n_chunks > 0 and n_chunks * per < k  # the sample alone cannot hold k rows
    sampled = np.zeros(N, bool)
    for c in range(n_chunks):
        start = (c * (N - per)) // max(n_chunks - 1, 1)
        sampled[start : start + per] = True
    luts = np.ones((1, M, 256), np.float32)
    luts[0, :, 0] = 0.0  # code 0 is at distance 0, every other code at 1 per subspace
    rng = np.random.default_rng(4)
    codes = rng.integers(1, 256, size=(N, M), dtype=np.uint8)
    codes[sampled] = 0
    ids = np.arange(N, dtype=np.int64)
    lut = np.full((M, 256, 4), np.inf, np.float32)
    lut[:, :, 0] = luts[0]
    d = np.empty((4, k), np.float32)
    i = np.empty((4, k), np.int64)
    ro_codes, ro_ids = scan_mod._readonly(codes), scan_mod._readonly(ids)
    rescanned = scan_mod._scan_batch(lut.reshape(-1), ro_codes, ro_ids, 0, N, k, 256, 1, d, i, M, 4)
    assert rescanned == 1
    Dr, Ir = reference_scan(luts, codes, ids, k)
    np.testing.assert_array_equal(i[:1], Ir)
    np.testing.assert_array_equal(d[:1], Dr)
    np.testing.assert_array_equal(scan(luts, codes, ids, k)[1], Ir)


def test_threads_agree_and_default_setting(small_ranges):
    rng = np.random.default_rng(5)
    luts, codes, ids = _problem(rng, 7, 4, 256, 5000)
    r1 = scan(luts, codes, ids, 50, threads=1)
    r2 = scan(luts, codes, ids, 50, threads=2)
    r3 = scan(luts, codes, ids, 50, threads=3)
    for r in (r2, r3):
        np.testing.assert_array_equal(r[0], r1[0])
        np.testing.assert_array_equal(r[1], r1[1])
    try:
        set_num_threads(1)
        assert get_num_threads() == 1
        np.testing.assert_array_equal(scan(luts, codes, ids, 50)[1], r1[1])
    finally:
        set_num_threads(None)
    assert get_num_threads() >= 1
    with pytest.raises(ValueError, match="threads"):
        set_num_threads(0)
    with pytest.raises(TypeError, match="threads"):
        scan(luts, codes, ids, 5, threads=1.5)


def test_negative_and_signed_zero_edge_values():
    """Negative table entries and -0.0 rank like floats do (-0.0 == +0.0, ties by id)."""
    luts = np.array([[[-0.0, 0.0, -1.0, 2.0]]], np.float32)
    codes = np.array([[1], [0], [2], [3], [0]], np.uint8)
    ids = np.array([5, 9, 7, 1, -3], np.int64)
    _, I = scan(luts, codes, ids, 5)
    np.testing.assert_array_equal(I, [[7, -3, 5, 9, 1]])
    np.testing.assert_array_equal(I, reference_scan(luts, codes, ids, 5)[1])


def test_memory_mapped_read_only_inputs(tmp_path):
    rng = np.random.default_rng(6)
    luts, codes, ids = _problem(rng, 3, 4, 256, 999)
    cpath, ipath = tmp_path / "c.bin", tmp_path / "i.bin"
    codes.tofile(cpath)
    ids.tofile(ipath)
    mc = np.memmap(cpath, np.uint8, mode="r", shape=codes.shape)
    mi = np.memmap(ipath, np.int64, mode="r", shape=ids.shape)
    np.testing.assert_array_equal(scan(luts, mc, mi, 11)[1], reference_scan(luts, codes, ids, 11)[1])


def test_bad_inputs():
    rng = np.random.default_rng(7)
    luts, codes, ids = _problem(rng, 2, 4, 16, 50)
    with pytest.raises(ValueError, match="k must be >= 1"):
        scan(luts, codes, ids, 0)
    with pytest.raises(TypeError, match="k must be an int"):
        scan(luts, codes, ids, 2.0)
    with pytest.raises(TypeError, match="luts"):
        scan(luts.astype(np.float64), codes, ids, 2)
    with pytest.raises(TypeError, match="codes"):
        scan(luts, codes.astype(np.int32), ids, 2)
    with pytest.raises(ValueError, match="subspaces"):
        scan(luts, codes[:, :3], ids, 2)
    with pytest.raises(TypeError, match="ids"):
        scan(luts, codes, ids[:-1], 2)
    bad = luts.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        scan(bad, codes, ids, 2)
    with pytest.raises(ValueError, match="K <= 256"):
        scan(np.zeros((1, 1, 300), np.float32), np.zeros((3, 1), np.uint8), np.arange(3), 2)
