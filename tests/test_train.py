from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from helpers import tiny_head_config
from hihpq.build import build_loss, build_model, train_settings
from hihpq.evaluation import embed, evaluate_model
from hihpq.metrics import map_at_k
from hihpq.models.io import ModelFileError, load_model, save_model
from hihpq.train import CachedViews, Hierarchy, Trainer, TrainingDiverged, lr_at


def _blobs(n_classes=4, per_class=40, n_views=3, dim=24, seed=0):
    """Clustered 'backbone features': views are noisy copies of a per-image point near its class centre."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_classes, dim)) * 3
    labels = np.repeat(np.arange(n_classes), per_class)
    clean = centres[labels] + rng.normal(size=(len(labels), dim))
    views = clean[:, None, :] + 0.3 * rng.normal(size=(len(labels), n_views, dim))
    return clean.astype(np.float16), views.astype(np.float16), labels


def _cfg(tmp_path, *extra):
    return tiny_head_config("train.epochs=4", "eval.topk=40", f"features.cache_dir={tmp_path}", *extra)


def _trainer(cfg, out_dir=None):
    torch.manual_seed(0)
    model = build_model(cfg, 24)
    return Trainer(model, build_loss(cfg), train_settings(cfg, progress=False), out_dir=out_dir)


def test_lr_schedule_warms_up_then_decays_to_min():
    lrs = [lr_at(s, 100, 10, 0.01, 1e-5) for s in range(101)]
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)
    assert all(a >= b for a, b in itertools.pairwise(lrs[9:]))
    assert lrs[100] == pytest.approx(1e-5)


def test_cached_views_gives_two_different_views_of_the_same_image():
    clean, views, _ = _blobs()
    views[:] = np.arange(views.shape[1])[None, :, None]  # view v holds the value v everywhere
    src = CachedViews(views, clean)
    rng = np.random.default_rng(0)
    idx = np.arange(50)
    x1, x2 = src.pair(idx, rng)
    assert torch.all(x1[:, 0] != x2[:, 0])


def test_hierarchy_positives_are_other_members_of_the_same_cluster():
    labels = np.array([0, 0, 1, 1, 1, 2, 0, 2])
    h = Hierarchy([labels], [np.zeros((3, 4))])
    rng = np.random.default_rng(0)
    idx = np.arange(len(labels))
    seen = {i: set() for i in idx}
    for _ in range(200):
        (pos,) = h.positives(idx, rng)
        assert np.all(labels[pos] == labels[idx])
        assert np.all(pos != idx)
        for i, p in zip(idx, pos, strict=True):
            seen[i].add(int(p))
    # uniform over the other members: every one of them shows up
    assert seen[0] == {1, 6} and seen[2] == {3, 4} and seen[5] == {7}


def test_training_lowers_the_loss_and_codes_beat_random(tmp_path):
    cfg = _cfg(tmp_path, "train.epochs=8")
    clean, views, labels = _blobs()
    trainer = _trainer(cfg)
    history = trainer.fit(CachedViews(views, clean))
    assert history[-1]["aug"] < history[0]["aug"]
    assert history[-1]["prot"] > 0 and history[-1]["ins"] > 0  # the hierarchy losses ran
    q, db = np.arange(0, 160, 4), np.setdiff1d(np.arange(160), np.arange(0, 160, 4))
    scores = evaluate_model(trainer.model, clean[q], clean[db], labels[q], labels[db], topk=40)
    rng = np.random.default_rng(0)
    random_ranked = np.stack([rng.permutation(len(db))[:40] for _ in q])
    random_map = map_at_k(random_ranked, labels[q], labels[db], k=40)
    assert scores["map_at_40"] > random_map + 0.3


def test_decorrelation_lowers_the_subspaces_correlation(tmp_path):
    """loss.decorrelation trains the subspaces apart: the trained model's subspaces correlate less than the same
    run's without it, and the term is logged."""
    from hihpq.losses import subspace_correlation

    clean, views, _ = _blobs()
    measured = {}
    for weight in (0.0, 1.0):
        trainer = _trainer(_cfg(tmp_path, "train.epochs=6", f"loss.decorrelation={weight}"))
        history = trainer.fit(CachedViews(views, clean))
        assert ("decorr" in history[-1]) == (weight > 0)
        trainer.model.eval()
        with torch.no_grad():
            measured[weight] = float(subspace_correlation(trainer.model.tangent(torch.as_tensor(clean).float())))
    assert measured[1.0] < 0.5 * measured[0.0]


def test_train_steps_sets_the_epochs_from_the_training_set_size(tmp_path):
    """train.steps: that many optimizer steps rounded up to whole epochs, whatever the number of images; the
    cosine schedule spans exactly those steps."""
    clean, views, _ = _blobs()  # 160 images
    for steps, n, epochs in ((7, 160, 2), (11, 160, 3), (7, 80, 4), (1, 10, 1)):  # batch 32: 160 images, 5 steps
        cfg = _cfg(tmp_path, "train.batch_size=32", f"train.steps={steps}", "hierarchy.levels=[4,2]")
        trainer = _trainer(cfg)
        assert trainer.n_epochs(n) == epochs
        if n == 80:
            history = trainer.fit(CachedViews(views[:n], clean[:n]))
            total = epochs * (n // 32)
            assert len(history) == epochs and trainer.step == total
            t = cfg.train
            assert history[-1]["lr"] == pytest.approx(lr_at(total - 1, total, t.warmup_epochs * 2, t.lr, t.min_lr))
    assert _trainer(_cfg(tmp_path, "train.epochs=5")).n_epochs(160) == 5  # steps = 0: the epochs as given


def test_curvature_lr_scale_sets_the_curvature_step_and_zero_freezes_it(tmp_path):
    clean, views, _ = _blobs()
    moved = {}
    for scale in (0.0, 0.1, 1.0):
        trainer = _trainer(
            _cfg(tmp_path, "train.epochs=2", "quantizer.learn_curvature=true", f"train.curvature_lr_scale={scale}")
        )
        c0 = trainer.model.quantizer.curvature.detach().clone()
        trainer.fit(CachedViews(views, clean))
        (group,) = [g for g in trainer.optimizer.param_groups if g.get("lr_scale") is not None]
        assert group["params"] == [trainer.model.quantizer.curvature_raw]
        assert group["lr"] == pytest.approx(scale * trainer.history[-1]["lr"])
        moved[scale] = float((trainer.model.quantizer.curvature.detach() - c0).abs().max())
    assert moved[0.0] == 0.0
    assert 0 < moved[0.1] < moved[1.0]


def test_clamped_curvature_is_decayed_clamped_and_learns(tmp_path):
    clean, views, _ = _blobs()
    trainer = _trainer(
        _cfg(tmp_path, "train.epochs=2", "quantizer.learn_curvature=true", "quantizer.curvature_param=clamped")
    )
    q = trainer.model.quantizer
    (group,) = [g for g in trainer.optimizer.param_groups if any(p is q.curvature_raw for p in g["params"])]
    assert group["weight_decay"] == trainer.s.weight_decay > 0  # the authors decay the raw curvature
    c0 = q.curvature.detach().clone()
    trainer.fit(CachedViews(views, clean))
    c = q.curvature.detach()
    assert not torch.equal(c, c0)
    assert torch.all((c >= q.curvature_bounds[0]) & (c <= q.curvature_bounds[1]))
    bounded = _trainer(_cfg(tmp_path, "quantizer.learn_curvature=true"))
    (group,) = [g for g in bounded.optimizer.param_groups if g.get("lr_scale") is not None]
    assert group["weight_decay"] == 0.0


@pytest.mark.parametrize("geometry", ["lorentz", "cosine"])
def test_codebooks_initialised_from_data_after_the_hierarchy_warm_up(tmp_path, geometry):
    clean, views, _ = _blobs()
    books = {}
    for init in (False, True):
        cfg = _cfg(
            tmp_path,
            "train.epochs=2",
            "hierarchy.warmup_epochs=1",
            f"quantizer.geometry={geometry}",
            f"quantizer.init_from_data={str(init).lower()}",
        )
        trainer = _trainer(cfg)
        trainer.fit(CachedViews(views, clean))
        q = trainer.model.quantizer
        assert q.init_from_data is init
        h = q.embed(trainer.model.project(torch.from_numpy(clean.astype(np.float32))).detach())
        books[init] = (q.codebooks().detach(), float(q.quantization_error(h).detach()))
    assert not torch.equal(books[True][0], books[False][0])
    assert books[True][1] < books[False][1]  # codewords placed on the data quantize it better


def test_paper_linear_projector_is_a_config_choice_that_trains(tmp_path):
    clean, views, _ = _blobs()
    trainer = _trainer(_cfg(tmp_path, "train.epochs=3", "projector.kind=linear"))
    linears = [m for m in trainer.model.projector.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 1 and linears[0].in_features == 24  # one Linear layer, as the paper
    history = trainer.fit(CachedViews(views, clean))
    assert history[-1]["aug"] < history[0]["aug"]


def test_resume_equals_uninterrupted_run(tmp_path, monkeypatch):
    clean, views, _ = _blobs()
    full = _trainer(_cfg(tmp_path), out_dir=tmp_path / "full")
    full.fit(CachedViews(views, clean))

    part = _trainer(_cfg(tmp_path), out_dir=tmp_path / "part")
    original = Trainer._train_step

    def interrupt_in_epoch_3(self, *args):
        if self.epoch == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C during the third epoch
        return original(self, *args)

    monkeypatch.setattr(Trainer, "_train_step", interrupt_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        part.fit(CachedViews(views, clean))
    monkeypatch.setattr(Trainer, "_train_step", original)
    resumed = _trainer(_cfg(tmp_path), out_dir=tmp_path / "part")
    resumed.fit(CachedViews(views, clean), resume=True)

    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [h["loss"] for h in full.history] == pytest.approx([h["loss"] for h in resumed.history])
    assert (tmp_path / "part" / "log.csv").read_text().count("\n") == 1 + 4


def test_checkpoint_write_is_atomic_and_loads_weights_only(tmp_path, monkeypatch):
    clean, views, _ = _blobs()
    trainer = _trainer(_cfg(tmp_path, "train.epochs=1"), out_dir=tmp_path)
    trainer.fit(CachedViews(views, clean))
    ckpt = tmp_path / "checkpoint.pt"
    before = ckpt.read_bytes()

    def broken_save(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(ckpt)
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_nan_features_are_named_before_they_reach_the_model(tmp_path):
    clean, views, _ = _blobs()
    views[5, :, 0] = np.nan
    trainer = _trainer(_cfg(tmp_path))
    with pytest.raises(ValueError, match=r"training images \[5\] \(epoch 1, step \d+\)"):
        trainer.fit(CachedViews(views, clean))


def test_divergence_stops_training_with_the_step_and_last_values(tmp_path):
    clean, views, _ = _blobs()
    trainer = _trainer(_cfg(tmp_path, "train.lr=1e12", "train.warmup_epochs=0"))
    with pytest.raises(TrainingDiverged, match=r"non-finite at epoch \d+, step \d+.*Lower train.lr"):
        trainer.fit(CachedViews(views * 1000, clean))


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    clean, views, _ = _blobs()
    trainer = _trainer(_cfg(tmp_path), out_dir=tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        trainer.fit(CachedViews(views, clean), resume=True)


@pytest.mark.parametrize("learned", [False, True])
def test_model_file_round_trip(tmp_path, learned):
    flag = str(learned).lower()
    curvature = [f"quantizer.learn_curvature={flag}", f"quantizer.curvature_keeps_scale={flag}"]
    dropout = [f"projector.dropout={0.3 if learned else 0}"]
    cfg = _cfg(tmp_path, "train.epochs=1", *curvature, *dropout)
    clean, views, _ = _blobs()
    trainer = _trainer(cfg)
    trainer.fit(CachedViews(views, clean))
    save_model(tmp_path / "model.pt", trainer.model, provenance={"config": cfg.to_dict()})
    loaded = load_model(tmp_path)
    model = loaded.model
    assert loaded.provenance["config"] == cfg.to_dict() and loaded.backbone is None
    assert model.quantizer.keep_scale == learned
    assert model.projector.dropout == (0.3 if learned else 0.0)  # an architecture argument, kept with the file
    if learned:  # the learned c travels with the file (it sets the clip radius too)
        torch.testing.assert_close(model.quantizer.curvature, trainer.model.quantizer.curvature)
    np.testing.assert_array_equal(embed(model, clean), embed(trainer.model, clean))
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match=r"bad\.pt"):
        load_model(tmp_path / "bad.pt")
