from __future__ import annotations

import pytest

from hihpq.config import ConfigError, builtin_configs, load_config, parse_override


def test_every_builtin_config_loads_and_validates():
    names = builtin_configs()
    # 12 paper settings + Table 2 variants (6 per bit width) + the Euclidean twin of the full model + photos.
    assert len(names) == 12 + 3 * 7 + 1
    for name in names:
        cfg = load_config(name)
        assert cfg.quantizer.n_subspaces * cfg.quantizer.subspace_dim == cfg.quantizer.feature_dim


def test_photos_config_trains_on_an_image_folder_with_sizes_from_the_data():
    cfg = load_config("photos", ["data.root=somewhere"])
    assert cfg.data.dataset == "images" and cfg.hierarchy.levels == []


def test_paper_setting_carries_authors_hyperparameters():
    cfg = load_config("cifar10-ii-16")
    assert (cfg.quantizer.n_subspaces, cfg.quantizer.subspace_dim) == (2, 16)
    assert cfg.quantizer.tau == pytest.approx(1 / 5)  # authors' softmax_temp 5 multiplies the logits
    assert cfg.hierarchy.levels == [100, 50, 25]
    nus = load_config("nuswide-64")
    assert (nus.quantizer.n_subspaces, nus.quantizer.subspace_dim) == (8, 16)
    assert nus.eval.topk == 5000


def test_variant_extends_its_base():
    cfg = load_config("cifar10-ii-32-vanilla-euclidean")
    assert cfg.quantizer.geometry == "euclidean"
    assert cfg.loss.lambda1 == 0 and cfg.loss.lambda2 == 0
    assert cfg.quantizer.bits == 32 and cfg.hierarchy.levels == [100, 50, 25]


def test_overrides_apply_with_yaml_types():
    cfg = load_config("cifar10-ii-32", ["train.epochs=3", "hierarchy.levels=[20, 10]", "quantizer.clip_r=null"])
    assert cfg.train.epochs == 3 and cfg.hierarchy.levels == [20, 10] and cfg.quantizer.clip_r is None
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochz=3", "unknown key"),
        ("trainer.epochs=3", "unknown key"),
        ("quantizer.bits=30", "not a multiple of log2"),
        ("quantizer.feature_dim=30", "not divisible"),
        ("quantizer.n_codewords=100", "power of two"),
        ("quantizer.curvature=20", "outside"),
        ("hierarchy.levels=[25, 50]", "coarsest last"),
        ("train.lr=0", "train.lr must be > 0"),
        ("features.n_views=1", "n_views"),
        ("data.protocol=III", "protocol"),
    ],
)
def test_impossible_configs_are_refused_before_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cifar10-ii-32", [override])


def test_unknown_config_name_lists_builtins():
    with pytest.raises(ConfigError, match="cifar10-ii-32"):
        load_config("cifar10-iii-32")
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("epochs")
