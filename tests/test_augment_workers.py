"""Online views from DataLoader worker processes: the same tensors and the same run whatever the number of workers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hihpq.build import build_loss, build_model, train_settings
from hihpq.config import load_config
from hihpq.data import ImageFolderDataset, eval_transform
from hihpq.data.transforms import AugmentConfig, train_transform
from hihpq.train import ImageViews, Trainer

MEAN = STD = (0.5, 0.5, 0.5)


@pytest.fixture
def dataset(make_image_folder):
    return ImageFolderDataset(make_image_folder(per_class=8, size=(20, 20)))


def _views(ds, workers):
    return ImageViews(
        ds,
        np.arange(len(ds)),
        train_transform(AugmentConfig(resolution=16), MEAN, STD),
        eval_transform(16, MEAN, STD),
        num_workers=workers,
        clean_batch_size=5,
    )


def test_views_do_not_depend_on_the_number_of_workers(dataset):
    def steps(src):
        rng = np.random.default_rng(3)
        out = []
        for _ in range(3):
            idx = rng.choice(src.n, 6, replace=False)
            out.append([(idx, src.draw(6, 2, rng)), (idx[::-1].copy(), src.draw(6, 1, rng))])
        return out

    inline, workers = _views(dataset, 0), _views(dataset, 2)
    a = list(inline.stream(steps(inline)))
    b = list(workers.stream(steps(workers)))
    assert len(a) == 3 and all(len(s) == 3 for s in a)
    for sa, sb in zip(a, b, strict=True):
        for x, y in zip(sa, sb, strict=True):
            assert x.shape == (6, 3, 16, 16) and torch.equal(x, y)
    assert not torch.equal(a[0][0], a[0][1])  # two independent views of the same images
    assert torch.equal(torch.cat(list(inline.clean(64))), torch.cat(list(workers.clean(64))))
    assert torch.equal(torch.cat(list(workers.clean(64, 3, 11))), torch.cat(list(inline.clean(64)))[3:11])


def test_training_steps_do_not_depend_on_the_number_of_workers(dataset):
    cfg = load_config(
        "cifar10-ii-16",
        ["quantizer.n_codewords=16", "quantizer.bits=8", "quantizer.feature_dim=8", "projector.kind=linear",
         "train.batch_size=12", "train.epochs=1", "hierarchy.levels=[4, 2]"],
    )  # fmt: skip
    losses = {}
    for workers in (0, 2):
        torch.manual_seed(0)  # a tiny conv backbone: what matters here is the views it is given
        backbone = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        model = build_model(cfg, 6, backbone=backbone)
        trainer = Trainer(model, build_loss(cfg), train_settings(cfg, progress=False))
        source = _views(dataset, workers)
        assert source.n // cfg.train.batch_size == 2  # two steps
        history = trainer.fit(source)
        losses[workers] = (history[0]["loss"], trainer.rng.random())
    assert losses[0] == losses[2]
