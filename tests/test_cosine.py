"""The MeCoQ-style cosine product quantizer (Table 2's Euclidean counterpart) and its index: definitions checked
against loops written from MeCoQ's equations, ADC search against a float64 brute force, file round trip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hihpq.index import CosinePQIndex, EuclideanPQIndex, HyperbolicPQIndex, describe_index, read_index, write_index
from hihpq.losses import quantized_contrastive_loss
from hihpq.quantizer import ProductQuantizer

M, K, D = 3, 16, 6


def _quantizer(**kw) -> ProductQuantizer:
    kw.setdefault("tau", 0.1)
    return ProductQuantizer(M, K, D, geometry="cosine", generator=torch.Generator().manual_seed(0), **kw).double()


def _z(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, M * D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3.0


def test_segments_and_codewords_are_unit_and_soft_assignment_is_softmax_of_inner_products():
    q = _quantizer()
    z = _z(7, 1)
    out = q(z)
    C = q.codebooks()
    torch.testing.assert_close(out.h.norm(dim=-1), torch.ones(7, M, dtype=torch.float64))
    torch.testing.assert_close(C.norm(dim=-1), torch.ones(M, K, dtype=torch.float64))
    seg = z.reshape(7, M, D)
    for b in range(7):
        for m in range(M):
            x = seg[b, m] / seg[b, m].norm()  # intra-normalisation
            torch.testing.assert_close(out.h[b, m], x)
            w = torch.softmax(torch.stack([x @ C[m, k] for k in range(K)]) / 0.1, 0)  # MeCoQ: softmax(alpha <x, c>)
            torch.testing.assert_close(out.weights[b, m], w)
            torch.testing.assert_close(out.h_soft[b, m], sum(w[k] * C[m, k] for k in range(K)))


def test_codes_are_argmax_of_inner_products_and_distance_is_one_minus_cosine():
    q = _quantizer()
    h = q.embed(_z(50, 2))
    C = q.codebooks()
    codes = q.encode(h).long()
    torch.testing.assert_close(codes, torch.einsum("bmd,mkd->bmk", h, C).argmax(-1))
    a, b = q.embed(_z(4, 3)), q.embed(_z(5, 4))
    ref = torch.tensor([[sum(1 - float(a[i, m] @ b[j, m]) for m in range(M)) for j in range(5)] for i in range(4)])
    torch.testing.assert_close(q.pairwise_distance(a, b), ref.double())
    # Scores depend on directions only: a soft-quantized vector (shorter than 1) is scored by its direction.
    torch.testing.assert_close(q.pairwise_distance(0.3 * a, b), ref.double())


def test_cosine_quantizer_trains_with_finite_gradients():
    q = _quantizer()
    z = _z(8, 5).requires_grad_(True)
    loss = quantized_contrastive_loss(q(z).h_soft, q(z + 0.01).h_soft, distance=q.pairwise_distance, tau=0.2)
    loss.backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(q.codebook_tangent.grad).all()
    assert q.codebook_tangent.grad.abs().sum() > 0
    assert not q.learn_curvature and q.no_weight_decay_parameters() == []


def _brute_force(queries: np.ndarray, codes: np.ndarray, C: np.ndarray, k: int):
    """Float64 loop: per query and item, sum over subspaces of 1 - cos(query segment, codeword)."""
    unit = lambda x: x / np.linalg.norm(x)  # noqa: E731
    d = np.array([[sum(1.0 - unit(x[m]) @ unit(C[m, c[m]]) for m in range(M)) for c in codes] for x in queries])
    order = np.lexsort((np.arange(len(codes))[None, :].repeat(len(queries), 0), d), axis=1)[:, :k]
    return np.take_along_axis(d, order, 1), order


def test_adc_search_equals_float64_brute_force():
    q = _quantizer()
    index = HyperbolicPQIndex.from_quantizer(q)
    assert isinstance(index, CosinePQIndex) and index.geometry == "cosine"
    db = q.embed(_z(120, 6)).numpy()
    index.add(db)
    np.testing.assert_array_equal(index.codes, q.encode(torch.from_numpy(db)).numpy())  # same codes as the model
    queries = q.embed(_z(9, 7)).numpy()
    D_, I = index.search(queries, 10)
    ref_d, ref_i = _brute_force(queries, index.codes.astype(np.int64), q.codebooks().detach().numpy(), 10)
    np.testing.assert_array_equal(I, ref_i)
    np.testing.assert_allclose(D_, ref_d, rtol=1e-5, atol=1e-5)
    # Cosine scores ignore the length of each query segment; an L2 index on the same codewords does not.
    scaled = queries * np.array([0.2, 3.0, 7.0])[None, :, None]
    np.testing.assert_array_equal(index.search(scaled, 10)[1], I)
    l2 = EuclideanPQIndex(index.codebooks)
    l2.add_codes(index.codes)
    assert not np.array_equal(l2.search(scaled, 10)[1], I)


def test_sdc_tables_are_cosine_distances_between_codewords():
    q = _quantizer()
    index = HyperbolicPQIndex.from_quantizer(q, metric="sdc")
    C = q.codebooks().detach().numpy().astype(np.float64)
    T = index.sdc_tables
    np.testing.assert_allclose(T, 1.0 - np.einsum("mkd,mjd->mkj", C, C) * (1 - np.eye(K)) - np.eye(K), atol=1e-6)


def test_index_file_round_trip_keeps_cosine_scoring(tmp_path):
    q = _quantizer()
    index = HyperbolicPQIndex.from_quantizer(q)
    index.add(q.embed(_z(60, 8)).numpy())
    queries = q.embed(_z(5, 9)).numpy()
    path = tmp_path / "cos.hpq"
    write_index(index, path)
    assert describe_index(path)["geometry"] == "cosine"
    back = read_index(path)
    assert isinstance(back, CosinePQIndex) and back.geometry == "cosine"
    for got, want in zip(back.search(queries, 7), index.search(queries, 7), strict=True):
        np.testing.assert_array_equal(got, want)


def test_zero_segment_query_is_refused():
    q = _quantizer()
    index = HyperbolicPQIndex.from_quantizer(q)
    x = q.embed(_z(2, 10)).numpy()
    x[1, 2] = 0.0
    with pytest.raises(ValueError, match="zero segment"):
        index.search(x, 3)
    with pytest.raises(ValueError, match="CosinePQIndex has geometry 'cosine'"):
        CosinePQIndex(index.codebooks, geometry="lorentz")
