"""bench/train_from_probe.py: the cut of EfficientNet-Lite0 it trains from gives the backbone's own features, and its
random-window pooling averages one window of the activation map per image."""

from __future__ import annotations

import itertools

import pytest
import torch

from helpers import load_bench_script
from hihpq.models import build_backbone

RES = 64  # a 2 x 2 activation map


@pytest.fixture(scope="module")
def probe():
    return load_bench_script("train_from_probe")


@pytest.fixture(scope="module")
def blocks(probe):
    return probe.LiteBlocks(RES)


def test_blocks_then_head_are_the_backbone(probe, blocks):
    """Cached activations through the (frozen, evaluated) head give the pooled features of the whole backbone."""
    x = torch.randn(3, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    whole = build_backbone("efficientnet-lite0").eval()
    acts = blocks.eval()(x)
    assert acts.shape == (3, 320 * 4) and blocks.feature_dim == 320 * 4 and blocks.is_frozen
    head = probe.LiteHead(blocks, 1.0, trainable=False).eval()
    with torch.no_grad():
        torch.testing.assert_close(head(acts), whole(x), rtol=1e-4, atol=1e-4)
    assert not any(p.requires_grad for p in head.parameters())
    assert all(p.requires_grad for p in probe.LiteHead(blocks, 1.0, trainable=True).parameters())
    with pytest.raises(ValueError, match="multiple of 32"):
        probe.LiteBlocks(100)


def test_random_window_pooling_averages_one_window_per_image(probe, blocks):
    head = probe.LiteHead(blocks, 0.5, trainable=False).train()  # windows of side 1 or 2 in a 2 x 2 map
    acts = torch.randn(64, 320 * 4, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)
    with torch.no_grad():
        pooled = head(acts)
        y = torch.nn.functional.relu6(head.conv(acts.reshape(64, 320, 2, 2)))
    windows = [
        y[:, :, t : t + h, left : left + w].mean(dim=(2, 3))
        for h, w in itertools.product((1, 2), repeat=2)
        for t in range(3 - h)
        for left in range(3 - w)
    ]
    errors = torch.stack([(pooled - win).abs().amax(dim=1) for win in windows])  # (windows, images)
    assert (errors.amin(dim=0) < 1e-5).all()  # every image is the mean of one window
    assert len(set(errors.argmin(dim=0).tolist())) > 3  # and the windows differ between images
    with torch.no_grad():
        torch.testing.assert_close(head.eval()(acts), y.mean(dim=(2, 3)))  # evaluation pools the whole map


@pytest.mark.parametrize("trainable", [False, True])
def test_run_arm_trains_the_head_only_when_asked(probe, blocks, trainable):
    """run_learned with a front module: the projector reads the head's 1280 features; the head conv moves only in the
    trainable arms."""
    import numpy as np

    from helpers import tiny_head_config
    from hihpq.benchmark import run_learned
    from hihpq.data.folders import ArrayImageDataset
    from hihpq.data.prepare import PreparedFeatures
    from hihpq.data.protocols import Split

    rng = np.random.default_rng(0)
    n = 40
    labels = np.arange(n) % 4
    ds = ArrayImageDataset(np.zeros((n, 4, 4, 3), np.uint8), labels)
    split = Split("toy", ds, np.arange(0, 8), np.arange(8, n), np.arange(8, n))
    acts = rng.random((n, blocks.feature_dim)).astype(np.float16) + labels[:, None].astype(np.float16)
    views = (acts[8:, None] + 0.05 * rng.random((n - 8, 2, blocks.feature_dim))).astype(np.float16)
    prep = PreparedFeatures(split, acts, np.arange(n), views, 0)
    cfg = tiny_head_config("train.epochs=2", "train.batch_size=16", "eval.topk=10", "hierarchy.levels=[4, 2]")
    front = probe.LiteHead(blocks, 0.5, trainable=trainable)
    before = front.conv.weight.detach().clone()
    scores, model = run_learned(cfg, prep, progress=False, return_model=True, front=front)
    assert model.backbone is front and model.projector.in_dim == front.feature_dim == 1280
    assert 0 <= scores["map_at_10"] <= 1
    assert (not torch.equal(front.conv.weight, before)) == trainable
