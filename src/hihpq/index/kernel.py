"""Top-k scan of product-quantized codes against per-query lookup tables (the ADC hot loop).

Given lookup tables ``luts`` (nq, M, K) float32 (``luts[q, m, j]`` = distance from query q to codeword j of
subspace m), codes (N, M) uint8 and ids (N,) int64, the distance of query q to item i is

    ((luts[q, 0, codes[i, 0]] + luts[q, 1, codes[i, 1]]) + luts[q, 2, codes[i, 2]]) + ...

summed in float32 in subspace order (Eq. 8 with table lookups), and the result is the k smallest items per
query ranked by (distance, id): ties are broken by the smaller id, so the answer is unique and the fast kernel
equals :func:`reference_scan` exactly.

How the kernel is fast (several times faiss ``IndexPQ`` on one core; see bench/search_speed.py):

* Queries are scanned in batches of Q = 4, 16 or 32. The tables of a batch are laid out (M, 256, Q), so one
  code byte selects Q contiguous floats: per row the kernel issues M vector loads and M - 1 vector adds and
  gets the distances of all Q queries at once; codes are read once per batch, not once per query. (The
  batch's tables, 128 KB for M = 4 and Q = 32, live in L2 with each row touching M cache lines: measured
  faster than L1-sized batches of 8.) This loop is LLVM IR (a numba intrinsic): numba does not vectorise
  across queries by itself. The adds are IEEE float32 lane-wise adds in subspace order, so every lane equals
  the scalar sum of the reference.
* The loop compares the Q distances with Q thresholds and, branch-free, records only the rows where some
  query is at or below its threshold. Top-k selection never sorts N: candidates go to a per-query buffer that
  is cut back to the k best (a radix sort of the buffer, no data-dependent branches) when full, which
  tightens the threshold.
* For k much smaller than N, a sample of the rows (64 contiguous runs, ~16 N / k rows) gives each query a
  starting threshold (its 32nd smallest sample distance) that admits about 2k candidates instead of the
  ~k ln(N / k) of a cold start. It is only an accelerator: if fewer than k rows fall below it, the query is
  scanned again from +inf, so the answer never depends on the sample.
* Large scans are split into row ranges (one per thread) scanned by GIL-free kernels in a thread pool and
  merged; the thread count is an argument or a module setting (:func:`set_num_threads`).
* Tables are padded to 256 rows of +inf per subspace, so no code byte can index outside them.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

__all__ = ["get_num_threads", "reference_scan", "scan", "set_num_threads"]

_BLOCK = 256  # rows per vector pass; their Q distances (32 KB at Q = 32) are re-read by the candidate pass
_PILOT_CHUNKS = 64  # the sample is read as this many contiguous runs
_PILOT_RANK = 32  # sample rank used as a starting threshold; ~2k candidates expected, P(too tight) ~ 1e-4
_MIN_ROWS_PER_THREAD = 1 << 16  # below this a second thread costs more than it saves
_I64_MAX = np.iinfo(np.int64).max

_num_threads: int | None = None


def _default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def set_num_threads(n: int | None) -> None:
    """Default number of threads for scans; ``None`` restores the default (the CPUs this process may use)."""
    global _num_threads
    if n is not None:
        n = _check_threads(n)
    _num_threads = n


def get_num_threads() -> int:
    """Number of threads a scan uses when its ``threads`` argument is None."""
    return _num_threads if _num_threads is not None else _default_threads()


def _check_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)):
        raise TypeError(f"threads must be a positive int, got {type(threads).__name__}")
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    return int(threads)


# ----------------------------------------------------------------------------------------------------------
# The vector inner loop
# ----------------------------------------------------------------------------------------------------------


_LANES = (4, 16, 32)  # supported batch widths Q (vector lanes)
_UNROLLED_M = 8  # subspace counts 1.._UNROLLED_M get a fully unrolled inner loop; larger M a counted loop


def _emit_rows(builder, q_lit, m_lit, ptrs, row0, nrows, m_v, k_v):
    """Emit the row loop of :func:`_adc_block` for Q = q_lit lanes and M = m_lit (None: runtime M).

    Returns (the loop's exit block, the hit count there). Blocks are appended to the current function.
    """
    lut_p, code_p, thr_p, out_p, hit_p, bits_p = ptrs
    i64 = ir.IntType(64)
    vec = ir.VectorType(ir.FloatType(), q_lit)
    vec_p = vec.as_pointer()
    tag = f"q{q_lit}m{m_lit or 'n'}"
    c_q = ir.Constant(i64, q_lit)
    thr_v = builder.load(builder.bitcast(thr_p, vec_p), align=4)
    entry = builder.block
    head = builder.append_basic_block(f"{tag}.head")
    body = builder.append_basic_block(f"{tag}.body")
    done = builder.append_basic_block(f"{tag}.done")
    builder.branch(head)

    builder.position_at_end(head)
    j = builder.phi(i64)
    n_hit = builder.phi(i64)
    j.add_incoming(ir.Constant(i64, 0), entry)
    n_hit.add_incoming(ir.Constant(i64, 0), entry)
    builder.cbranch(builder.icmp_signed("<", j, nrows), body, done)

    def lookup(base, m):
        byte = builder.load(builder.gep(code_p, [builder.add(base, m)]))
        row = builder.add(builder.mul(k_v, m), builder.zext(byte, i64))
        return builder.load(builder.bitcast(builder.gep(lut_p, [builder.mul(row, c_q)]), vec_p), align=4)

    builder.position_at_end(body)
    base = builder.mul(builder.add(row0, j), m_v if m_lit is None else ir.Constant(i64, m_lit))
    acc = lookup(base, ir.Constant(i64, 0))
    if m_lit is not None:
        for m in range(1, m_lit):
            acc = builder.fadd(acc, lookup(base, ir.Constant(i64, m)))  # IEEE lane-wise, subspace order
    else:
        pre = builder.block
        m_head = builder.append_basic_block(f"{tag}.mhead")
        m_body = builder.append_basic_block(f"{tag}.mbody")
        m_done = builder.append_basic_block(f"{tag}.mdone")
        builder.branch(m_head)
        builder.position_at_end(m_head)
        m = builder.phi(i64)
        acc_phi = builder.phi(vec)
        m.add_incoming(ir.Constant(i64, 1), pre)
        acc_phi.add_incoming(acc, pre)
        builder.cbranch(builder.icmp_signed("<", m, m_v), m_body, m_done)
        builder.position_at_end(m_body)
        acc_next = builder.fadd(acc_phi, lookup(base, m))
        m.add_incoming(builder.add(m, ir.Constant(i64, 1)), m_body)
        acc_phi.add_incoming(acc_next, m_body)
        builder.branch(m_head)
        builder.position_at_end(m_done)
        acc = acc_phi
    builder.store(acc, builder.bitcast(builder.gep(out_p, [builder.mul(j, c_q)]), vec_p), align=4)
    mask = builder.bitcast(builder.fcmp_ordered("<=", acc, thr_v), ir.IntType(q_lit))
    bits = builder.zext(mask, i64)
    builder.store(j, builder.gep(hit_p, [n_hit]))  # written every row, kept only when a query hits
    builder.store(bits, builder.gep(bits_p, [n_hit]))
    any_hit = builder.zext(builder.icmp_unsigned("!=", bits, ir.Constant(i64, 0)), i64)
    j.add_incoming(builder.add(j, ir.Constant(i64, 1)), builder.block)
    n_hit.add_incoming(builder.add(n_hit, any_hit), builder.block)
    builder.branch(head)
    return done, n_hit


@intrinsic
def _adc_block(typingctx, lut, codes, row0, nrows, M, K, Q, thr, out, hits, hbits):
    """One block of rows: distances for Q queries at once, and the rows where any query meets its threshold.

    lut: (M * K * Q,) float32 laid out (M, K, Q); codes: (N, M) uint8 C-contiguous; rows row0 .. row0+nrows-1
    (nrows <= _BLOCK); thr: (Q,) float32; Q in _LANES. Writes out[j * Q + q] = distance of row row0 + j to
    query q and, for every row whose mask of queries with out <= thr[q] is non-empty, appends j to ``hits``
    and the mask to ``hbits`` (branch-free). Returns the number of such rows (-1 for an unsupported Q).

    M and Q are runtime values: the IR holds one loop per (Q, M) with M <= _UNROLLED_M unrolled, plus a
    counted loop over subspaces for larger M, and dispatches once per call.
    """
    sig = types.int64(lut, codes, row0, nrows, M, K, Q, thr, out, hits, hbits)

    def codegen(context, builder, signature, args):
        ptrs = tuple(context.make_array(signature.args[i])(context, builder, args[i]).data for i in (0, 1, 7, 8, 9, 10))
        row0_v, nrows_v, m_v, k_v, q_v = args[2], args[3], args[4], args[5], args[6]
        i64 = ir.IntType(64)
        exit_bb = builder.append_basic_block("adc.exit")
        bad_q = builder.append_basic_block("adc.badq")
        incoming = []
        q_switch = builder.switch(q_v, bad_q)
        for q_lit in _LANES:
            q_bb = builder.append_basic_block(f"adc.q{q_lit}")
            q_switch.add_case(ir.Constant(i64, q_lit), q_bb)
            builder.position_at_end(q_bb)
            generic = builder.append_basic_block(f"adc.q{q_lit}.generic")
            m_switch = builder.switch(m_v, generic)
            for m_lit in (*range(1, _UNROLLED_M + 1), None):
                if m_lit is None:
                    builder.position_at_end(generic)
                else:
                    m_bb = builder.append_basic_block(f"adc.q{q_lit}.m{m_lit}")
                    m_switch.add_case(ir.Constant(i64, m_lit), m_bb)
                    builder.position_at_end(m_bb)
                done, n_hit = _emit_rows(builder, q_lit, m_lit, ptrs, row0_v, nrows_v, m_v, k_v)
                builder.position_at_end(done)
                builder.branch(exit_bb)
                incoming.append((n_hit, done))
        builder.position_at_end(bad_q)
        builder.branch(exit_bb)
        builder.position_at_end(exit_bb)
        result = builder.phi(i64)
        for value, block in incoming:
            result.add_incoming(value, block)
        result.add_incoming(ir.Constant(i64, -1), bad_q)
        return result

    return sig, codegen


@intrinsic
def _lowest_bit(typingctx, x):
    """Index of the lowest set bit of a non-zero int64 (llvm.cttz)."""
    sig = types.int64(types.int64)

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))

    return sig, codegen


# ----------------------------------------------------------------------------------------------------------
# Candidate buffers and selection
# ----------------------------------------------------------------------------------------------------------


@njit(nogil=True, cache=True)
def _radix_sort(keys, payload, n, n_bytes):
    """Stable LSD radix sort of keys[:n] (uint64, low n_bytes significant) carrying payload[:n] (int64).

    8 bits a pass; a pass whose byte is equal for all keys is skipped. No data-dependent branches, unlike a
    comparison sort, which mispredicts on every other compare here.
    """
    tk = np.empty(n, np.uint64)
    tp = np.empty(n, np.int64)
    count = np.empty(256, np.int64)
    swapped = False
    for byte in range(n_bytes):
        if swapped:
            sk, sp, dk, dp = tk, tp, keys, payload
        else:
            sk, sp, dk, dp = keys, payload, tk, tp
        shift = np.uint64(8 * byte)
        count[:] = 0
        for r in range(n):
            count[np.intp((sk[r] >> shift) & np.uint64(255))] += 1
        if count.max() == n:
            continue
        total = 0
        for b in range(256):
            c = count[b]
            count[b] = total
            total += c
        for r in range(n):
            b = np.intp((sk[r] >> shift) & np.uint64(255))
            dk[count[b]] = sk[r]
            dp[count[b]] = sp[r]
            count[b] += 1
        swapped = not swapped
    if swapped:
        keys[:n] = tk
        payload[:n] = tp


@njit(nogil=True, cache=True)
def _rank(d, p, n, ids):
    """Sort the candidates d[:n] (distances), p[:n] (row positions) in place by (distance, ids[p]).

    A radix sort on the distance (floats mapped to order-preserving unsigned keys, -0.0 as +0.0), then the
    runs of equal distance are put in id order. Ids are only read for those runs, so most candidates never
    touch the large, cold id array here.
    """
    keys = np.empty(n, np.uint64)
    bits = d[:n].view(np.uint32)
    for r in range(n):
        b = bits[r]
        if b == np.uint32(0x80000000):  # -0.0 == +0.0
            b = np.uint32(0)
        keys[r] = np.uint64(~b if b >> np.uint32(31) else b | np.uint32(0x80000000))
    order = np.arange(n)
    _radix_sort(keys, order, n, 4)
    dd = d[:n].copy()
    pp = p[:n].copy()
    for r in range(n):
        d[r] = dd[order[r]]
        p[r] = pp[order[r]]
    a = 0
    while a < n:
        b = a + 1
        while b < n and d[b] == d[a]:
            b += 1
        if b - a > 1:  # a run of ties: order it by id (ids offset by 2**63 sort as unsigned)
            m = b - a
            id_keys = np.empty(m, np.uint64)
            for r in range(m):
                id_keys[r] = np.uint64(ids[p[a + r]]) ^ np.uint64(0x8000000000000000)
            run = p[a:b].copy()
            _radix_sort(id_keys, run, m, 8)
            p[a:b] = run
        a = b


@njit(nogil=True, cache=True)
def _pilot_layout(n, kk):
    """(number of chunks, rows per chunk) of the threshold sample for top-kk of n rows; (0, 0) for none.

    The sample has ~16 n / kk rows, so its 32nd smallest distance is expected near the population's 2k-th.
    It is taken only when it is at most n / 8 rows (kk >= 128) and holds at least _PILOT_RANK rows.
    """
    if kk < 1:
        return 0, 0
    s = (_PILOT_RANK * n + 2 * kk - 1) // (2 * kk)
    if 8 * s > n or s < _PILOT_RANK:
        return 0, 0
    n_chunks = min(_PILOT_CHUNKS, s // _PILOT_RANK)
    return n_chunks, (s + n_chunks - 1) // n_chunks


@njit(nogil=True, cache=True)
def _pilot(lut, codes, lo, hi, kk, K, thr, M, Q):
    """Starting thresholds from a sample of rows lo..hi-1 (see the module docstring).

    The sample is _PILOT_CHUNKS contiguous runs spread over the range (sequential reads, unlike single rows).
    thr (Q,) holds the caller's initial thresholds: only +inf entries are replaced (-inf marks padding
    queries). Does nothing when the range is too small for the sample to pay off.
    """
    n = hi - lo
    n_chunks, per = _pilot_layout(n, kk)
    if n_chunks == 0:
        return
    never = np.full(Q, -np.inf, np.float32)
    out = np.empty(_BLOCK * Q, np.float32)
    hits = np.empty(_BLOCK, np.int64)
    bits = np.empty(_BLOCK, np.int64)
    best = np.full((Q, _PILOT_RANK), np.inf, np.float32)  # per query, the smallest distances so far
    last = _PILOT_RANK - 1
    for c in range(n_chunks):
        start = lo + (c * (n - per)) // max(n_chunks - 1, 1)
        for r0 in range(start, start + per, _BLOCK):
            nb = min(_BLOCK, start + per - r0)
            _adc_block(lut, codes, r0, nb, M, K, Q, never, out, hits, bits)
            for q in range(Q):
                b = best[q]
                for j in range(nb):
                    v = out[j * Q + q]
                    if v < b[last]:  # rare after the first few dozen rows: insert in order
                        w = last
                        while w > 0 and b[w - 1] > v:
                            b[w] = b[w - 1]
                            w -= 1
                        b[w] = v
    for q in range(Q):
        if thr[q] == np.inf:
            thr[q] = best[q, last]


@njit(nogil=True, cache=True)
def _scan_range(lut, codes, ids, lo, hi, k, K, thr0, out_d, out_i, M, Q):
    """Top-k of rows lo..hi-1 for one batch of Q queries, starting from thresholds thr0 (Q,).

    Writes out_d / out_i (Q, k) sorted by (distance, id). Returns a (Q,) bool array: False where the starting
    threshold was finite but admitted fewer than min(k, n) rows (then that query must be scanned again from
    +inf); padding queries (thr0 = -inf) report True and get (inf, -1) rows.
    """
    n = hi - lo
    kk = min(k, n)
    ok = np.ones(Q, np.bool_)
    cap = kk + max(min(3 * kk, 1 << 16), 256)
    bd = np.empty((Q, cap), np.float32)
    bp = np.empty((Q, cap), np.int64)  # row positions; ids are read only when needed (cold, 8 B a row)
    cnt = np.zeros(Q, np.int64)
    thr = thr0.copy()
    tie = np.full(Q, _I64_MAX, np.int64)  # a candidate enters iff (d, id) < (thr, tie)
    out = np.empty(_BLOCK * Q, np.float32)
    hits = np.empty(_BLOCK, np.int64)
    hbits = np.empty(_BLOCK, np.int64)
    for r0 in range(lo, hi, _BLOCK):
        nb = min(_BLOCK, hi - r0)
        n_hit = _adc_block(lut, codes, r0, nb, M, K, Q, thr, out, hits, hbits)
        for h in range(n_hit):
            j = hits[h]
            bits = hbits[h]
            while bits != 0:
                q = _lowest_bit(bits)
                bits &= bits - 1
                d = out[j * Q + q]
                # The vector test was d <= thr (stale within the block); this is the exact rule.
                if d < thr[q] or (d == thr[q] and ids[r0 + j] < tie[q]):
                    c = cnt[q]
                    bd[q, c] = d
                    bp[q, c] = r0 + j
                    c += 1
                    if c == cap:  # keep the k best; the k-th becomes the bound
                        _rank(bd[q], bp[q], c, ids)
                        thr[q] = bd[q, kk - 1]
                        tie[q] = ids[bp[q, kk - 1]]
                        c = kk
                    cnt[q] = c
    for q in range(Q):
        c = cnt[q]
        if thr0[q] == -np.inf:
            c = 0
        elif c < kk:
            ok[q] = thr0[q] == np.inf
            if not ok[q]:
                continue
        _rank(bd[q], bp[q], c, ids)
        c = min(c, kk)
        for r in range(c):
            out_d[q, r] = bd[q, r]
            out_i[q, r] = ids[bp[q, r]]
        out_d[q, c:] = np.inf
        out_i[q, c:] = -1
    return ok


@njit(nogil=True, cache=True)
def _scan_batch(lut, codes, ids, lo, hi, k, K, n_real, out_d, out_i, M, Q):
    """Top-k of rows lo..hi-1 for a batch whose first n_real of Q queries are real (the rest padding).

    Returns the number of queries whose sample threshold was too tight and that were scanned again.
    """
    thr = np.full(Q, np.inf, np.float32)
    thr[n_real:] = -np.inf
    _pilot(lut, codes, lo, hi, min(k, hi - lo), K, thr, M, Q)
    ok = _scan_range(lut, codes, ids, lo, hi, k, K, thr, out_d, out_i, M, Q)
    if not ok.all():  # a sample threshold was too tight (rare): rescan those queries from +inf
        for q in range(Q):
            thr[q] = np.inf if not ok[q] else -np.inf
        d2 = np.empty_like(out_d)
        i2 = np.empty_like(out_i)
        _scan_range(lut, codes, ids, lo, hi, k, K, thr, d2, i2, M, Q)
        for q in range(Q):
            if not ok[q]:
                out_d[q] = d2[q]
                out_i[q] = i2[q]
    return Q - ok.sum()


@njit(nogil=True, cache=True)
def _merge(da, ia, db, ib, out_d, out_i):
    """Merge two (n, k) results sorted by (distance, id) with (inf, -1) padding into the k best."""
    nq, k = out_d.shape
    for q in range(nq):
        a = 0
        b = 0
        for r in range(k):
            a_ok = a < k and not (ia[q, a] == -1 and da[q, a] == np.inf)
            b_ok = b < k and not (ib[q, b] == -1 and db[q, b] == np.inf)
            if a_ok and b_ok:
                take_a = da[q, a] < db[q, b] or (da[q, a] == db[q, b] and ia[q, a] < ib[q, b])
            else:
                take_a = a_ok
            if take_a:
                out_d[q, r] = da[q, a]
                out_i[q, r] = ia[q, a]
                a += 1
            elif b_ok:
                out_d[q, r] = db[q, b]
                out_i[q, r] = ib[q, b]
                b += 1
            else:
                out_d[q, r] = np.inf
                out_i[q, r] = -1


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def _check_scan_inputs(luts, codes, ids, k):
    if not isinstance(luts, np.ndarray) or luts.dtype != np.float32 or luts.ndim != 3:
        raise TypeError(f"luts must be a float32 array of shape (nq, M, K), got {_describe(luts)}")
    nq, M, K = luts.shape
    if not isinstance(codes, np.ndarray) or codes.dtype != np.uint8 or codes.ndim != 2:
        raise TypeError(f"codes must be a uint8 array of shape (N, M), got {_describe(codes)}")
    if codes.shape[1] != M:
        raise ValueError(f"codes have {codes.shape[1]} subspaces but the tables have M = {M}")
    if not isinstance(ids, np.ndarray) or ids.dtype != np.int64 or ids.shape != (codes.shape[0],):
        raise TypeError(f"ids must be an int64 array of shape ({codes.shape[0]},), got {_describe(ids)}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 1 <= K <= 256:
        raise ValueError(f"uint8 codes need 1 <= K <= 256 codewords, got K = {K}")
    if M < 1:
        raise ValueError("the tables have M = 0 subspaces")
    if not np.isfinite(luts).all():
        raise ValueError("lookup tables contain NaN or inf (are the queries finite and on the manifold?)")
    return nq, M, K


def _readonly(a: np.ndarray) -> np.ndarray:
    v = a.view(np.ndarray)
    v.flags.writeable = False
    return v


def _describe(a) -> str:
    if isinstance(a, np.ndarray):
        return f"{a.dtype} array of shape {a.shape}"
    return type(a).__name__


def scan(
    luts: np.ndarray, codes: np.ndarray, ids: np.ndarray, k: int, *, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k scan: for each query the k items with the smallest summed table distance.

    Args:
        luts: (nq, M, K) float32 lookup tables, finite.
        codes: (N, M) uint8, every value < K (not re-checked here: the index validates codes on add/read).
        ids: (N,) int64 item ids, used for the result and to break ties; -1 is the padding value of the
            result, so real ids should be >= 0 (the index enforces it).
        k: number of neighbours, >= 1; rows past min(k, N) are padded with (inf, -1).
        threads: threads to use (default :func:`get_num_threads`).

    Returns:
        (D, I): (nq, k) float32 distances and int64 ids, sorted by (distance, id).
    """
    nq, M, K = _check_scan_inputs(luts, codes, ids, k)
    threads = get_num_threads() if threads is None else _check_threads(threads)
    k = int(k)
    N = codes.shape[0]
    D = np.full((nq, k), np.inf, np.float32)
    I = np.full((nq, k), -1, np.int64)
    if nq == 0 or N == 0:
        return D, I
    # Read-only views: the kernels never write them, and one array type means one compiled specialisation
    # whether the index lives in RAM or in a read-only memory map.
    codes = _readonly(np.ascontiguousarray(codes))
    ids = _readonly(np.ascontiguousarray(ids))
    # Batches of 32, 16 or 4 query lanes (wider is faster per query); 4 for huge k keeps the buffers small.
    big_k = k > (1 << 16)  # keep the candidate buffers (Q x ~k) small
    batches = []  # (start, n_real, Q)
    start = 0
    while start < nq:
        left = nq - start
        Q = 4 if left <= 4 or big_k else 16 if left <= 16 else 32
        batches.append((start, min(Q, left), Q))
        start += Q
    n_ranges = max(1, min(threads, N // _MIN_ROWS_PER_THREAD))
    bounds = [N * r // n_ranges for r in range(n_ranges + 1)]
    # Tables are padded to 256 rows of +inf per subspace: any byte indexes inside them, so even a corrupted
    # code (>= K) cannot read out of bounds. Padding query lanes are never compared (threshold -inf).

    def work(item):
        (start, n_real, Q), r = item
        lut = np.full((M, 256, Q), np.inf, np.float32)
        lut[:, :K, :n_real] = luts[start : start + n_real].transpose(1, 2, 0)
        d = np.empty((Q, k), np.float32)
        i = np.empty((Q, k), np.int64)
        _scan_batch(lut.reshape(-1), codes, ids, bounds[r], bounds[r + 1], k, 256, n_real, d, i, M, Q)
        return d, i

    items = [(b, r) for b in batches for r in range(n_ranges)]
    if threads == 1 or len(items) == 1:
        parts = [work(item) for item in items]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(items))) as pool:
            parts = list(pool.map(work, items))
    for b, (start, n_real, _) in enumerate(batches):
        d, i = parts[b * n_ranges]
        for r in range(1, n_ranges):
            d2, i2 = parts[b * n_ranges + r]
            md = np.empty_like(d)
            mi = np.empty_like(i)
            _merge(d, i, d2, i2, md, mi)
            d, i = md, mi
        D[start : start + n_real] = d[:n_real]
        I[start : start + n_real] = i[:n_real]
    return D, I


def reference_scan(luts: np.ndarray, codes: np.ndarray, ids: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Slow, obviously exact twin of :func:`scan` (numpy): full distances, ranking by (distance, id).

    The distances are summed in float32 in subspace order, like the kernel. Rows are ranked with a
    lexicographic sort; a partition first keeps the rows at or below the k-th distance (all of which could
    rank in the top k), which changes nothing but the running time.
    """
    nq, M, _ = _check_scan_inputs(luts, codes, ids, k)
    k = int(k)
    N = codes.shape[0]
    D = np.full((nq, k), np.inf, np.float32)
    I = np.full((nq, k), -1, np.int64)
    kk = min(k, N)
    if kk == 0:
        return D, I
    idx = codes.astype(np.intp)
    for q in range(nq):
        dist = luts[q, 0][idx[:, 0]]
        for m in range(1, M):
            dist = dist + luts[q, m][idx[:, m]]
        kth = np.partition(dist, kk - 1)[kk - 1]
        cand = np.flatnonzero(dist <= kth)
        order = cand[np.lexsort((ids[cand], dist[cand]))[:kk]]
        D[q, :kk] = dist[order]
        I[q, :kk] = ids[order]
    return D, I
