"""Re-seeded codewords (train.reseed_codewords): codewords no training image uses move onto training embeddings."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import noisy_views, resume_matches_uninterrupted, tiny_head_trainer
from hihpq.evaluation import code_usage
from hihpq.quantizer import ProductQuantizer
from hihpq.train import CachedViews


@pytest.mark.parametrize("geometry", ["lorentz", "euclidean", "cosine"])
def test_dead_codewords_move_onto_the_data_and_used_ones_stay(geometry):
    torch.manual_seed(0)
    q = ProductQuantizer(n_subspaces=2, n_codewords=16, subspace_dim=4, geometry=geometry)
    z = torch.randn(40, 8, dtype=torch.float64)
    q = q.double()
    before = q.codebook_tangent.detach().clone()
    used = torch.zeros(2, 16, dtype=torch.bool)
    codes = q.assign(q.embed(z)).long()
    for m in range(2):
        used[m, codes[:, m].unique()] = True
    moved = q.reseed_dead_codewords(z, generator=torch.Generator().manual_seed(0))
    assert torch.equal(moved, ~used)  # 40 rows are enough for every dead codeword
    assert torch.equal(q.codebook_tangent[used], before[used])
    v = q.tangent(z)
    if geometry == "cosine":
        v = q.geo.proj(v)
    for m, k in moved.nonzero().tolist():  # each moved codeword now sits on one of the rows' embeddings
        assert (v[:, m] - q.codebook_tangent[m, k]).norm(dim=-1).min() < 1e-12
    after = q.assign(q.embed(z)).long()
    for m, k in moved.nonzero().tolist():  # ... so a row is assigned to it: no moved codeword stays dead
        assert (after[:, m] == k).any()


def test_a_collapsed_codebook_spreads_over_the_data_after_one_reseed():
    torch.manual_seed(0)
    q = ProductQuantizer(n_subspaces=2, n_codewords=16, subspace_dim=4).double()
    with torch.no_grad():  # codeword 0 at the origin, the 15 others one point: at most 2 used per subspace
        q.codebook_tangent.zero_()
        q.codebook_tangent[:, 1:, 0] = 5.0
    z = torch.randn(200, 8, dtype=torch.float64)
    before = code_usage(q.assign(q.embed(z)).numpy())
    q.reseed_dead_codewords(z, generator=torch.Generator().manual_seed(0))
    after = code_usage(q.assign(q.embed(z)).numpy())
    assert max(before["codewords_used"]) <= 2 and min(after["codewords_used"]) >= 14
    assert after["distinct_codes"] > 5 * before["distinct_codes"]


def test_code_usage_counts_codewords_per_subspace_and_distinct_codes():
    codes = np.array([[0, 1], [0, 2], [3, 1], [0, 1]], dtype=np.uint8)
    assert code_usage(codes) == {"codewords_used": [2, 2], "distinct_codes": 3}


_features = noisy_views


def _trainer(tmp_path, *extra, out_dir=None):
    return tiny_head_trainer(tmp_path, "train.epochs=3", *extra, out_dir=out_dir)


def test_the_trainer_reseeds_from_the_warm_up_on_and_clears_their_momentum(tmp_path, monkeypatch):
    clean, views = _features()
    trainer = _trainer(tmp_path, "train.reseed_codewords=true")
    calls = []
    original = ProductQuantizer.reseed_dead_codewords

    def spy(self, features, **kw):
        moved = original(self, features, **kw)
        calls.append(int(moved.sum()))
        return moved

    monkeypatch.setattr(ProductQuantizer, "reseed_dead_codewords", spy)
    trainer.fit(CachedViews(views, clean))
    assert len(calls) == 2 and calls[0] > 0  # epochs 2 and 3 (warm-up 1); 96 images leave codewords unused
    q = trainer.model.quantizer
    assert torch.isfinite(q.codebook_tangent).all()
    off = _trainer(tmp_path, "train.reseed_codewords=false")
    calls.clear()
    off.fit(CachedViews(views, clean))
    assert calls == []


def test_reseeded_training_resumes_to_the_same_model(tmp_path, monkeypatch):
    clean, views = _features()
    opts = ["train.reseed_codewords=true"]
    resume_matches_uninterrupted(
        lambda out: _trainer(tmp_path, *opts, out_dir=out), CachedViews(views, clean), tmp_path, monkeypatch
    )
