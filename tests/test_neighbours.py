"""Neighbour pairs (train.neighbours): the nearest-neighbour search and how the trainer draws its pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers import noisy_views, resume_matches_uninterrupted, tiny_head_config, tiny_head_trainer
from hihpq.config import ConfigError
from hihpq.neighbours import nearest_neighbours
from hihpq.train import CachedViews


def _brute_force(x: np.ndarray, k: int) -> np.ndarray:
    """Python loops over pairs: cosine similarity of every other row, sorted, best first."""
    out = []
    for i, a in enumerate(x):
        sims = [(float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)), j) for j, b in enumerate(x) if j != i]
        out.append([j for _, j in sorted(sims, key=lambda t: -t[0])[:k]])
    return np.array(out)


@pytest.mark.parametrize("chunk", [7, 2048])
def test_nearest_neighbours_equal_a_brute_force_search(chunk):
    x = np.random.default_rng(0).normal(size=(50, 6))
    np.testing.assert_array_equal(nearest_neighbours(x, 4, chunk=chunk), _brute_force(x, 4))


def test_nearest_neighbours_use_the_angle_not_the_length_and_never_the_row_itself():
    x = np.array([[1.0, 0.0], [100.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    nn = nearest_neighbours(x, 1)
    # row 0 is closest in angle to the long row 1, which is far away in L2; row 3 (45 degrees) is 44.4 degrees
    # from row 1 (cosine 101 / sqrt(2 * 10001) = 0.714) and 45 from rows 0 and 2 (0.707); never a row itself
    assert nn[:, 0].tolist() == [1, 0, 3, 1]


@pytest.mark.parametrize("k", [0, 4])
def test_nearest_neighbours_refuse_an_impossible_k(k):
    with pytest.raises(ValueError, match="0 < k < the number of rows"):
        nearest_neighbours(np.ones((4, 3)), k)


def test_nearest_neighbours_refuse_non_finite_features():
    x = np.ones((5, 3))
    x[2, 1] = np.nan
    with pytest.raises(ValueError, match="non-finite features"):
        nearest_neighbours(x, 2)


_features = noisy_views


def _trainer(tmp_path, *extra, out_dir=None):
    return tiny_head_trainer(tmp_path, "train.epochs=2", *extra, out_dir=out_dir)


@pytest.mark.parametrize("prob", [0.0, 0.5, 1.0])
def test_the_second_view_of_a_pair_is_a_neighbour_with_the_given_probability(tmp_path, prob):
    clean, views = _features()
    source = CachedViews(views, clean)
    trainer = _trainer(tmp_path, "train.neighbours=3", f"train.neighbour_prob={prob}")
    trainer.neighbours = trainer._find_neighbours(source)
    np.testing.assert_array_equal(trainer.neighbours, nearest_neighbours(clean.astype(np.float32), 3))
    idx = np.arange(source.n).repeat(20)
    (anchor, first), (other, second) = trainer._plan_step(source, idx).requests
    np.testing.assert_array_equal(anchor, idx)
    assert first.shape == second.shape == (len(idx), 1)
    own = other == idx
    assert ((trainer.neighbours[idx] == other[:, None]).any(1) | own).all()  # a neighbour or itself, nothing else
    assert abs((~own).mean() - prob) < 0.03
    assert (first[own, 0] != second[own, 0]).all()  # an image paired with itself still gets two different views


def test_without_neighbours_the_pair_is_two_views_of_one_image(tmp_path):
    """train.neighbours=0: the paper's pairs (the configs' default is 10)."""
    clean, views = _features()
    trainer = _trainer(tmp_path, "train.neighbours=0")
    assert trainer.s.neighbours == 0 and trainer.neighbours is None
    (requests,) = trainer._plan_step(CachedViews(views, clean), np.arange(32)).requests
    assert requests[1].shape == (32, 2)


def test_training_with_neighbours_resumes_from_its_checkpoint_with_the_same_neighbours(tmp_path):
    clean, views = _features()
    first = _trainer(tmp_path, "train.neighbours=3", out_dir=tmp_path / "run")
    first.fit(CachedViews(views, clean))
    found = first.neighbours.copy()
    # resume on features whose neighbours differ: the run keeps the neighbours it started with
    later = _trainer(tmp_path, "train.neighbours=3", "train.epochs=3", out_dir=tmp_path / "run")
    shuffled = clean[np.random.default_rng(1).permutation(len(clean))]
    later.fit(CachedViews(views, shuffled), resume=True)
    np.testing.assert_array_equal(later.neighbours, found)
    assert len(later.history) == 3


def test_more_neighbours_than_training_images_is_refused_before_training(tmp_path):
    clean, views = _features(n=20)
    trainer = _trainer(tmp_path, "train.neighbours=20")
    with pytest.raises(ValueError, match=r"train.neighbours=20 .* 20 training images.*lower train.neighbours"):
        trainer.fit(CachedViews(views, clean))
    assert trainer.step == 0


@pytest.mark.parametrize("override", ["train.neighbours=-1", "train.neighbour_prob=1.5", "train.neighbour_refresh=2"])
def test_impossible_neighbour_settings_are_config_errors(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        tiny_head_config(override)


def _model_neighbours(trainer, clean, k):
    """The k-NN table of the model's own embedding of the clean features, computed here from scratch."""
    trainer.model.eval()
    with torch.no_grad():
        x = trainer.model.tangent(torch.from_numpy(clean.astype(np.float32))).flatten(1).numpy()
    return nearest_neighbours(x, k)


@pytest.mark.parametrize("losses", [[], ["loss.lambda1=0", "loss.lambda2=0"]])  # full model; Vanilla (no hierarchy)
def test_refreshed_neighbours_are_found_again_in_the_models_embedding_from_the_warm_up_on(tmp_path, losses):
    clean, views = _features()
    source = CachedViews(views, clean)
    trainer = _trainer(tmp_path, "train.neighbours=3", "train.neighbour_refresh=true", *losses)
    backbone_nn = trainer._find_neighbours(source)
    trainer.neighbours = backbone_nn.copy()
    trainer._refresh_hierarchy(source)  # epoch 0 < hierarchy.warmup_epochs = 1: nothing changes yet
    np.testing.assert_array_equal(trainer.neighbours, backbone_nn)
    trainer.epoch = 1
    trainer._refresh_hierarchy(source)
    expected = _model_neighbours(trainer, clean, 3)
    np.testing.assert_array_equal(trainer.neighbours, expected)
    assert (expected != backbone_nn).any()  # the test can tell the two tables apart
    assert (trainer.hierarchy is None) == bool(losses)  # Vanilla renews its neighbours without clustering


def test_without_refresh_the_neighbours_stay_the_backbones(tmp_path):
    clean, views = _features()
    trainer = _trainer(tmp_path, "train.neighbours=3", "train.epochs=3")
    trainer.fit(CachedViews(views, clean))
    np.testing.assert_array_equal(trainer.neighbours, nearest_neighbours(clean.astype(np.float32), 3))
    assert trainer.hierarchy is not None  # the hierarchy was refreshed meanwhile


def test_a_refreshed_run_resumes_to_the_same_model_as_an_uninterrupted_one(tmp_path, monkeypatch):
    clean, views = _features()
    opts = ["train.neighbours=3", "train.neighbour_refresh=true", "train.epochs=3"]
    # Ctrl-C in the third epoch, after two refreshes (epochs 2 and 3 start with one), then resume
    whole, rest = resume_matches_uninterrupted(
        lambda out: _trainer(tmp_path, *opts, out_dir=out), CachedViews(views, clean), tmp_path, monkeypatch
    )
    np.testing.assert_array_equal(rest.neighbours, whole.neighbours)
    assert not np.array_equal(whole.neighbours, nearest_neighbours(clean.astype(np.float32), 3))
