"""Mixed precision: autocast covers the projector (and backbone); the Lorentz quantizer and the losses stay fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import tiny_head_config
from hihpq.build import build_loss, build_model, train_settings
from hihpq.config import ConfigError, load_config
from hihpq.train import CachedViews, Trainer, _StepForward, amp_dtype


def _cfg(*extra):
    return tiny_head_config("train.epochs=2", *extra)


def _source(n=96, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    clean = rng.normal(size=(n, dim)) + 3 * rng.normal(size=(4, dim))[np.arange(n) % 4]
    views = clean[:, None, :] + 0.3 * rng.normal(size=(n, 3, dim))
    return CachedViews(views.astype(np.float16), clean.astype(np.float16))


def test_amp_modes_and_old_booleans():
    assert load_config("cifar10-ii-16").train.amp == "none"
    assert load_config("cifar10-ii-16", ["train.amp=true"]).train.amp == "bf16"  # the old switch meant bf16
    assert load_config("cifar10-ii-16", ["train.amp=false"]).train.amp == "none"
    assert load_config("cifar10-ii-16", ["train.amp=fp16"]).train.amp == "fp16"
    with pytest.raises(ConfigError, match=r"train\.amp must be one of \['none', 'bf16', 'fp16'\]"):
        load_config("cifar10-ii-16", ["train.amp=fp8"])
    assert amp_dtype("none") is None and amp_dtype("bf16") is torch.bfloat16


def test_bf16_autocast_leaves_the_quantizer_in_fp32():
    cfg = _cfg()
    model = build_model(cfg, 24)
    x = torch.from_numpy(np.asarray(_source().clean_feats[:32], np.float32))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, out = _StepForward(model)(x)
    assert z.dtype == torch.bfloat16  # the projector ran in bf16 ...
    for name, t in out._asdict().items():  # ... the Lorentz operations did not
        assert t.dtype == torch.float32, name
    exact = model.quantizer(z.float())
    torch.testing.assert_close(out.h_soft, exact.h_soft)


@pytest.mark.parametrize("mode", ["bf16", "fp16"])
def test_training_under_autocast_stays_finite_and_close_to_fp32(mode):
    runs = {}
    for amp in ("none", mode):
        cfg = _cfg(f"train.amp={amp}")
        torch.manual_seed(0)
        trainer = Trainer(build_model(cfg, 24), build_loss(cfg), train_settings(cfg, progress=False))
        runs[amp] = trainer.fit(_source())
        assert trainer.scaler.is_enabled() == (amp == "fp16")
    for full, mixed in zip(runs["none"], runs[mode], strict=True):
        assert np.isfinite(mixed["loss"]) and np.isfinite(mixed["quant_error"])
        assert mixed["loss"] == pytest.approx(full["loss"], rel=0.05)  # half-precision projector, same run
    assert runs[mode][-1]["hierarchy"]  # the hierarchy losses ran under autocast too
