"""bench/subspace_redundancy.py: its code search is the library's, its per-subspace searches add up to it, and its
canonical correlations are those of known cases."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import load_bench_script
from hihpq.benchmark import evaluate_learned
from hihpq.build import build_model
from hihpq.config import load_config


@pytest.fixture(scope="module")
def script():
    return load_bench_script("subspace_redundancy")


def test_canonical_correlations_of_known_cases(script):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3000, 3, generator=g, dtype=torch.float64)
    mixed = a @ torch.randn(3, 3, generator=g, dtype=torch.float64) + 5.0  # any invertible map of the same span
    torch.testing.assert_close(script.canonical_correlations(a, mixed), torch.ones(3, dtype=torch.float64))
    independent = torch.randn(3000, 3, generator=g, dtype=torch.float64)
    assert script.canonical_correlations(a, independent).max() < 0.1
    half = torch.cat([a[:, :1], independent[:, 1:]], dim=1)  # one shared direction of three
    cc = script.canonical_correlations(a, half)
    assert cc[0] == pytest.approx(1.0, abs=1e-9) and cc[1:].max() < 0.1


def test_code_search_is_the_library_one_and_subspaces_are_its_parts(script):
    cfg = load_config("cifar10-ii-16", ["quantizer.n_codewords=16", "quantizer.feature_dim=8", "projector.hidden=32"])
    model = build_model(cfg, 12).eval()  # 16 bits of K = 16: M = 4 subspaces
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 50)
    x = (rng.normal(size=(3, 12))[labels] * 3 + rng.normal(size=(150, 12))).astype(np.float32)
    prep = SimpleNamespace(
        queries=x[:30],
        database=x[30:],
        clean_of=lambda idx: x[30:][idx],
        split=SimpleNamespace(query_labels=labels[:30], database_labels=labels[30:], train=np.arange(60)),
    )
    ways, codes = script.searched_ways(model, prep, topk=25)
    assert ways["codes"] == pytest.approx(evaluate_learned(model, prep, topk=25)["map_at_25"], abs=1e-6)
    assert codes.shape == (120, 4) and set(ways) == {
        "codes",
        "embeddings",
        *(f"{way}, subspace {m}" for way in ("codes", "embeddings") for m in range(4)),
    }
    found = script.shared(model, prep, codes)
    assert set(found["codes_nmi"]) == {"0-1", "0-2", "0-3", "1-2", "1-3", "2-3"}
    assert all(0 <= v <= 1 for v in found["codes_nmi"].values())
    assert found["distinct_codes"] == len(np.unique(codes, axis=0))
