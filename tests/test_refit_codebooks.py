"""Refit codebooks (train.refit_codebooks): after the last epoch, k-means codebooks of the clean training embeddings."""

from __future__ import annotations

import re

import numpy as np
import torch

from helpers import noisy_views, resume_matches_uninterrupted, tiny_head_trainer
from hihpq.train import CachedViews


def _trainer(tmp_path, *extra, out_dir=None):
    return tiny_head_trainer(tmp_path, "train.epochs=3", *extra, out_dir=out_dir)


def _quantization_error(model, clean: np.ndarray) -> float:
    model.eval()
    with torch.no_grad():
        h = model.embed(torch.as_tensor(clean, dtype=torch.float32))
        return float(model.quantizer.quantization_error(h))


def test_the_codebooks_are_the_k_means_of_the_trained_embeddings(tmp_path):
    """With the option the run ends with the codebooks init_codebooks_from_data fits to the trained model's clean
    training embeddings (the same seed); the rest of the model is the run without it, and the codes approximate the
    training embeddings better than the trained codewords did."""
    clean, views = noisy_views()
    plain = _trainer(tmp_path)
    plain.fit(CachedViews(views, clean))
    refit = _trainer(tmp_path, "train.refit_codebooks=true")
    refit.fit(CachedViews(views, clean))
    a, b = plain.model.state_dict(), refit.model.state_dict()
    for name in a:
        if name != "quantizer.codebook_tangent":
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    assert not torch.allclose(a["quantizer.codebook_tangent"], b["quantizer.codebook_tangent"])
    # the reference: the plain run's model, refitted by hand
    model = plain.model.eval()
    trained_error = _quantization_error(model, clean)
    with torch.no_grad():
        z = model.project(torch.as_tensor(clean, dtype=torch.float32))
    model.quantizer.init_codebooks_from_data(z, generator=torch.Generator().manual_seed(plain.s.seed))
    torch.testing.assert_close(b["quantizer.codebook_tangent"], model.quantizer.codebook_tangent, rtol=0, atol=0)
    assert "refit_s" in refit.history[-1] and "refit_s" not in plain.history[-1]
    # k-means lowers the training embeddings' distance to their codes (the gap between embedding and code)
    assert _quantization_error(refit.model, clean) < trained_error


def test_refitted_training_resumes_to_the_same_model_and_a_finished_run_is_not_refitted_again(tmp_path, monkeypatch):
    clean, views = noisy_views()
    opts = ["train.refit_codebooks=true"]
    resume_matches_uninterrupted(
        lambda out: _trainer(tmp_path, *opts, out_dir=out), CachedViews(views, clean), tmp_path, monkeypatch
    )
    again = _trainer(tmp_path, *opts, out_dir=tmp_path / "whole")
    calls = []
    monkeypatch.setattr(type(again), "_refit_codebooks", lambda self, source: calls.append(1))
    again.fit(CachedViews(views, clean), resume=True)  # the checkpoint says it is done
    assert calls == []


def test_fewer_training_images_than_codewords_keep_the_trained_codebooks_and_say_so(tmp_path, caplog, monkeypatch):
    """A photo folder smaller than K under a config that refits (photos inherits the 32-bit one): trained as
    asked, the codebooks as trained, a warning before training starts."""
    clean, views = noisy_views(n=12)
    opts = ["train.batch_size=4", "hierarchy.levels=[4,2]"]
    trainer = _trainer(tmp_path, "train.refit_codebooks=true", *opts)
    calls = []
    monkeypatch.setattr(type(trainer), "_refit_codebooks", lambda self, source: calls.append(1))
    started = []
    monkeypatch.setattr(type(trainer), "_refresh_hierarchy", lambda self, source: started.append(caplog.text) or 0.0)
    with caplog.at_level("WARNING", logger="hihpq.train"):
        trainer.fit(CachedViews(views, clean))
    assert calls == [] and "refit_s" not in trainer.history[-1]
    assert re.search(r"refit_codebooks skipped.*16 codewords.*at least 16.*there are 12", started[0])
