"""The online (end-to-end) training path: images augmented through a trainable backbone on every step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from helpers import write_colour_folder, write_tiny_config
from hihpq.build import build_loss, build_model, train_settings
from hihpq.cli import main
from hihpq.config import load_config
from hihpq.data import ImageFolderDataset, eval_transform
from hihpq.data.prepare import prepare_online
from hihpq.data.transforms import AugmentConfig, train_transform
from hihpq.evaluation import embed_split
from hihpq.models.io import load_model, save_model
from hihpq.train import ImageViews, Trainer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online")
    images = write_colour_folder(tmp / "images", per_class=20)
    config = write_tiny_config(
        tmp / "tiny.yaml",
        images,
        tmp / "cache",
        "tiny-online",
        data={"n_query": 12, "n_train": 48},
        backbone={"trainable": True},
        train={"epochs": 3, "batch_size": 16, "lr": 0.005},
    )
    return tmp, images, config


def _trainer(cfg, out_dir=None, freeze_stem=False):
    prep = prepare_online(cfg)
    if freeze_stem:  # a partly trainable backbone: the stem frozen, the rest trained
        for p in [*prep.backbone.net._conv_stem.parameters(), *prep.backbone.net._bn0.parameters()]:
            p.requires_grad_(False)
        prep.backbone.train(prep.backbone.training)
    model = build_model(cfg, prep.in_dim, backbone=prep.backbone)
    trainer = Trainer(model, build_loss(cfg), train_settings(cfg, progress=False), out_dir=out_dir)
    return trainer, prep


@pytest.fixture(scope="module")
def trained(setup):
    _, _, config = setup
    cfg = load_config(str(config))
    trainer, prep = _trainer(cfg, freeze_stem=True)
    before = {k: v.clone() for k, v in trainer.model.backbone.state_dict().items()}
    history = trainer.fit(prep.source)
    return cfg, trainer, prep, before, history


def test_image_views_are_seeded_by_the_rng_and_count_unreadable_images(make_image_folder):
    root = make_image_folder(per_class=3, size=(20, 20))
    (root / "cat" / "broken.jpg").write_bytes(b"not an image")
    ds = ImageFolderDataset(root)
    broken = next(i for i in range(len(ds)) if "broken" in ds.describe(i))
    mean = std = (0.5, 0.5, 0.5)
    src = ImageViews(
        ds,
        np.arange(len(ds)),
        train_transform(AugmentConfig(resolution=16), mean, std),
        eval_transform(16, mean, std),
        num_workers=2,
        clean_batch_size=4,
    )
    idx = np.array([0, broken, 3])
    torch.manual_seed(0)
    a1, a2 = src.pair(idx, np.random.default_rng(7))
    state = torch.get_rng_state()
    b1, b2 = src.pair(idx, np.random.default_rng(7))
    assert torch.equal(state, torch.get_rng_state())  # the caller's torch stream is untouched
    assert a1.shape == (3, 3, 16, 16) and torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # two independent views
    assert not torch.equal(src.one(idx, np.random.default_rng(8)), a1)
    clean = torch.cat(list(src.clean(1024)))
    assert clean.shape == (len(ds), 3, 16, 16)
    assert torch.equal(clean, torch.cat(list(src.clean(3))))
    assert src.n_skipped == 1 and src.skipped == {broken}
    src.close()


def test_online_training_updates_only_the_trainable_backbone_parameters(trained):
    _, trainer, prep, before, history = trained
    assert len(history) == 3 and all(np.isfinite(h["loss"]) for h in history)
    assert history[-1]["hierarchy"] and prep.source.n_skipped == 0
    after = trainer.model.backbone.state_dict()
    frozen = [k for k in after if k.startswith(("net._conv_stem.", "net._bn0."))]
    assert frozen and all(torch.equal(before[k], after[k].cpu()) for k in frozen)  # BN statistics included
    changed = [k for k in after if k not in frozen and not torch.equal(before[k], after[k].cpu())]
    trainable = [n for n, p in trainer.model.backbone.named_parameters() if p.requires_grad]
    assert set(trainable) <= set(changed) and len(trainable) > 50
    # the optimiser holds exactly the trainable parameters
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in trainer.model.parameters() if p.requires_grad}


def test_backbone_layers_step_at_their_own_scale(setup):
    _, _, config = setup
    cfg = load_config(str(config), ["train.backbone_lr_scale=0.1", "train.epochs=1"])
    trainer, prep = _trainer(cfg)
    trainer.fit(prep.source)
    backbone = {id(p) for p in trainer.model.backbone.parameters()}
    (group,) = [g for g in trainer.optimizer.param_groups if {id(p) for p in g["params"]} & backbone]
    assert {id(p) for p in group["params"]} == backbone
    assert group["lr"] == pytest.approx(0.1 * trainer.history[-1]["lr"]) and group["weight_decay"] > 0
    head = [g for g in trainer.optimizer.param_groups if g is not group]
    assert head and all(g["lr"] == pytest.approx(trainer.history[-1]["lr"]) for g in head)


def test_saved_model_keeps_the_trained_backbone(trained, tmp_path):
    cfg, trainer, prep, _, _ = trained
    model = trainer.model.eval()
    save_model(tmp_path / "model.pt", model, resolution=32)
    payload = torch.load(tmp_path / "model.pt", weights_only=True)
    assert payload["backbone"]["name"] == "efficientnet-lite0" and payload["backbone"]["resolution"] == 32
    assert payload["backbone"]["stored"] and payload["backbone"]["trainable"] == "all"
    loaded = load_model(tmp_path).model
    _, q0, db0 = embed_split(model, prep.split, 32)
    _, q1, db1 = embed_split(loaded, prep.split, 32)
    np.testing.assert_array_equal(q0, q1)
    np.testing.assert_array_equal(db0, db1)
    # the pretrained backbone gives other embeddings: the trained one really was saved
    fresh = build_model(cfg, prep.in_dim, backbone=prepare_online(cfg).backbone)
    fresh.load_state_dict({k: v for k, v in loaded.state_dict().items() if not k.startswith("backbone.")}, strict=False)
    assert not np.allclose(embed_split(fresh.eval(), prep.split, 32)[1], q0)


def test_resume_equals_uninterrupted_run(setup, tmp_path, monkeypatch):
    _, _, config = setup
    cfg = load_config(str(config))
    full, prep = _trainer(cfg, out_dir=tmp_path / "full")
    full.fit(prep.source)

    part, prep = _trainer(cfg, out_dir=tmp_path / "part")
    original = Trainer._train_step

    def interrupt_in_epoch_2(self, *args):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", interrupt_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        part.fit(prep.source)
    monkeypatch.setattr(Trainer, "_train_step", original)
    resumed, prep = _trainer(cfg, out_dir=tmp_path / "part")
    resumed.fit(prep.source, resume=True)

    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [h["loss"] for h in full.history] == pytest.approx([h["loss"] for h in resumed.history])


def test_cli_trains_end_to_end_with_a_trainable_backbone(setup, tmp_path):
    _, images, config = setup
    run = tmp_path / "run"
    args = ["train", str(config), "-o", "backbone.trainable=true", "-o", "train.epochs=2", "--out", str(run)]
    assert main(args) == 0
    record = json.loads((run / "run.json").read_text())
    assert record["config"]["backbone"]["trainable"] is True
    assert record["eval"]["map_at_20"] > 0.5  # 3 colour classes: random ranking scores about 1/3
    assert len(json.loads((run / "log.json").read_text())) == 2
    assert "backbone" in torch.load(run / "model.pt", weights_only=True)
    index = tmp_path / "colours.hpq"
    assert main(["encode", str(run), "--images", str(images), "--out", str(index)]) == 0
    # evaluate and encode the protocol's database go through the model's own trained backbone
    assert main(["evaluate", str(run)]) == 0
    evaluated = json.loads((run / "eval.json").read_text())["eval"]["map_at_20"]
    assert evaluated == pytest.approx(record["eval"]["map_at_20"], abs=1e-6)
    assert main(["encode", str(run), "--out", str(tmp_path / "db.hpq")]) == 0


def test_unreadable_images_leave_the_online_query_and_database_sets(trained):
    """Issue 13 item 4 on the end-to-end path: a corrupt query or database image is excluded, not a grey placeholder."""
    import dataclasses

    from hihpq.data import ImageDataset

    _, trainer, prep, _, _ = trained
    split = prep.split
    paths = [split.dataset.full_path(i) for i in range(len(split.dataset))]
    broken = [paths[0].parent / f"zz-broken-{k}.jpg" for k in range(2)]
    for path in broken:
        path.write_bytes(b"not an image")
    try:
        dataset = ImageDataset([*paths, *broken], labels=np.concatenate([split.dataset.labels, [0, 0]]))
        bad_q, bad_db = len(paths), len(paths) + 1
        grown = dataclasses.replace(
            split, dataset=dataset, query=np.append(split.query, bad_q), database=np.append(split.database, bad_db)
        )
        kept, q, db = embed_split(trainer.model.eval(), grown, 32)
    finally:
        for path in broken:
            path.unlink()
    assert bad_q not in kept.query and bad_db not in kept.database and kept.params["excluded"] == 2
    assert len(q) == len(split.query) and len(db) == len(split.database)
    assert np.isfinite(q).all() and np.isfinite(db).all()
