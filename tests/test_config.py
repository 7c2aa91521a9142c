from __future__ import annotations

import pytest
import yaml

from hihpq.config import ConfigError, builtin_configs, load_config, parse_override


def test_every_builtin_config_loads_and_validates():
    names = builtin_configs()
    # 12 paper settings + per bit width the 7 Table 2 variants and their 7 alternatives (L2 twin, lambda2 = 0.1)
    # + photos + the second dataset of the defaults study (fashion-mnist-16/32/64) and its Full-Euclidean.
    assert len(names) == 12 + 3 * 7 + 3 * 7 + 1 + 3 + 3
    for name in names:
        cfg = load_config(name)
        assert cfg.quantizer.n_subspaces * cfg.quantizer.subspace_dim == cfg.quantizer.feature_dim
        assert cfg.projector.dropout == pytest.approx(0.2), name  # the generalisation study's default everywhere


def test_photos_config_trains_on_an_image_folder_with_sizes_from_the_data():
    cfg = load_config("photos", ["data.root=somewhere"])
    assert cfg.data.dataset == "images" and cfg.hierarchy.levels == []


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_second_dataset_configs_share_the_cifar_settings(bits):
    fashion, cifar = load_config(f"fashion-mnist-{bits}"), load_config(f"cifar10-ii-{bits}")
    assert fashion.data.dataset == "folder"
    # hierarchy sizes from the training set at 32 / 64 bits, CIFAR-10 (II)'s at 16 (sixteen_study.json)
    assert fashion.hierarchy.levels == (cifar.hierarchy.levels if bits == 16 else [])
    assert (fashion.data.n_query, fashion.data.n_database, fashion.data.n_train) == (1000, 10000, 2000)
    assert fashion.quantizer == cifar.quantizer and fashion.loss == cifar.loss and fashion.train == cifar.train
    cosine = load_config(f"fashion-mnist-{bits}-full-euclidean")
    cifar_cosine = load_config(f"cifar10-ii-{bits}-full-euclidean")
    assert cosine.quantizer.geometry == "cosine" and cosine.data == fashion.data
    assert cosine.quantizer == cifar_cosine.quantizer and cosine.loss == cifar_cosine.loss


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_cifar_ii_defaults_follow_the_defaults_study(bits):
    """bench/results/defaults_study.json: tau_qc grows with M (the summed product distance), 0.1 M, then
    sharpness_study.json: 0.075 M at 32 and 64 bits (held-out sets, 3 seeds); feature dim 64; the hierarchy sizes
    are the authors' (= the auto rule for 5,000 training images)."""
    cfg = load_config(f"cifar10-ii-{bits}")
    assert cfg.quantizer.n_subspaces == bits // 8 and cfg.quantizer.feature_dim == 64
    assert cfg.loss.tau_qc == pytest.approx((0.1 if bits == 16 else 0.075) * cfg.quantizer.n_subspaces)
    # training_study.json: 3,000 steps at 16 bits (whatever the number of images), 50 epochs at 32 and 64
    assert (cfg.train.steps, cfg.train.epochs) == ((3000, 50) if bits == 16 else (0, 50))
    assert cfg.backbone.resolution == 224
    assert cfg.hierarchy.levels == [100, 50, 25]
    # bench/results/model_study.json: a learned, scale-keeping curvature wins at 16 bits only
    assert cfg.quantizer.learn_curvature == cfg.quantizer.curvature_keeps_scale == (bits == 16)
    # bench/results/generalisation_study.json: feature dropout 0.2 (held-out tuning sets; every config, below)
    assert cfg.projector.dropout == pytest.approx(0.2)
    # bench/results/neighbours_study.json: neighbour pairs, 10 neighbours half the time (every bit length)
    assert (cfg.train.neighbours, cfg.train.neighbour_prob) == (10, 0.5)


def test_paper_setting_carries_authors_hyperparameters():
    cfg = load_config("cifar10-i-16")
    assert (cfg.quantizer.n_subspaces, cfg.quantizer.subspace_dim) == (2, 16)
    assert cfg.quantizer.tau == pytest.approx(1 / 5)  # authors' softmax_temp 5 multiplies the logits
    assert cfg.hierarchy.levels == [200, 100, 50]
    nus = load_config("nuswide-64")
    assert (nus.quantizer.n_subspaces, nus.quantizer.subspace_dim) == (8, 16)
    assert nus.eval.topk == 5000


def test_variant_extends_its_base():
    cfg = load_config("cifar10-ii-32-vanilla-euclidean-l2")
    assert cfg.quantizer.geometry == "euclidean"
    assert cfg.loss.lambda1 == 0 and cfg.loss.lambda2 == 0
    assert cfg.quantizer.bits == 32 and cfg.hierarchy.levels == [100, 50, 25]


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_table2_variants_carry_the_papers_definitions(bits):
    lambdas = {"vanilla": (0.0, 0.0), "instance": (0.0, 1.0), "prototype": (1.0, 0.0), "full": (1.0, 0.1)}
    for variant, (l1, l2) in lambdas.items():
        geometries = ("euclidean",) if variant == "full" else ("hyperbolic", "euclidean")
        for g in geometries:
            cfg = load_config(f"cifar10-ii-{bits}-{variant}-{g}")
            assert (cfg.loss.lambda1, cfg.loss.lambda2) == (l1, l2), cfg.name
            # The paper's Euclidean counterpart quantizes and scores like MeCoQ: the cosine geometry.
            assert cfg.quantizer.geometry == ("lorentz" if g == "hyperbolic" else "cosine"), cfg.name
            if g == "euclidean":
                assert cfg.quantizer.tau == pytest.approx(0.1)  # MeCoQ's alpha = 10
                # MeCoQ's full-vector cosine / T with T = 0.2: our sum over M subspaces needs tau_qc = M * 0.2
                assert cfg.loss.tau_qc == pytest.approx(0.2 * cfg.quantizer.n_subspaces)
                twin = load_config(f"cifar10-ii-{bits}-{variant}-euclidean-l2")
                assert twin.quantizer.geometry == "euclidean"
                assert (twin.loss.lambda1, twin.loss.lambda2) == (l1, l2)
    for g, geometry in (("hyperbolic", "lorentz"), ("euclidean", "cosine"), ("euclidean-l2", "euclidean")):
        alt = load_config(f"cifar10-ii-{bits}-instance-{g}-lambda2-0.1")
        assert (alt.loss.lambda1, alt.loss.lambda2, alt.quantizer.geometry) == (0.0, 0.1, geometry)
    assert load_config(f"cifar10-ii-{bits}").loss.instance_denominator == "ours"
    paper = load_config(f"cifar10-ii-{bits}-instance-hyperbolic", ["loss.instance_denominator=paper"])
    assert paper.loss.instance_denominator == "paper"


def test_overrides_apply_with_yaml_types():
    cfg = load_config("cifar10-ii-32", ["train.epochs=3", "hierarchy.levels=[20, 10]", "quantizer.clip_r=null"])
    assert cfg.train.epochs == 3 and cfg.hierarchy.levels == [20, 10] and cfg.quantizer.clip_r is None
    assert parse_override("a.b.c=1") == {"a": {"b": {"c": 1}}}


def test_the_last_training_length_given_decides(tmp_path):
    """train.epochs and train.steps both give the training length: a layer (a config extending another, or an
    override) that gives only the epochs resets the steps, so `-o train.epochs=4` trains 4 epochs on a config that
    trains by steps; a layer that gives the steps trains by steps; a saved config holding both keeps its steps."""
    steps = load_config("cifar10-ii-32", ["train.steps=900"])
    assert steps.train.steps == 900
    assert load_config("cifar10-ii-32", ["train.steps=900", "train.epochs=4"]).train.steps == 0
    assert load_config("cifar10-ii-32", ["train.epochs=4", "train.steps=900"]).train.steps == 900
    child = tmp_path / "child.yaml"
    child.write_text("base: cifar10-ii-32\ntrain:\n  epochs: 7\n")
    assert (load_config(str(child), ["train.steps=900"]).train.steps, load_config(str(child)).train.steps) == (900, 0)
    saved = tmp_path / "saved.yaml"
    saved.write_text(yaml.safe_dump(steps.to_dict()))  # a run's config.yaml: both keys in one layer
    assert load_config(str(saved)).train.steps == 900
    with pytest.raises(ConfigError, match=r"train\.steps"):
        load_config("cifar10-ii-32", ["train.steps=-1"])


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
        ("train.lr=0", r"train.lr must be a number in \(0, inf\)"),
        ("features.n_views=1", "n_views"),
        ("data.protocol=III", "protocol"),
        (
            "quantizer.geometry=poincare",
            r"quantizer.geometry must be one of \['lorentz', 'hyperbolic', 'euclidean', 'cosine'\]",
        ),
        ("quantizer.curvature_param=softplus", "curvature_param"),
        ("loss.instance_denominator=both", "instance_denominator"),
        ("loss.decorrelation=-1", "loss.decorrelation"),
    ],
)
def test_impossible_configs_are_refused_before_work(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cifar10-ii-32", [override])


def test_decorrelation_needs_two_subspaces():
    with pytest.raises(ConfigError, match="decorrelates subspaces, and 8 bits of 256 codewords make one"):
        load_config("cifar10-ii-16", ["quantizer.bits=8", "loss.decorrelation=1"])
    assert load_config("cifar10-ii-16", ["quantizer.bits=8"]).loss.decorrelation == 0  # off: one subspace is fine


def test_unknown_config_name_lists_builtins():
    with pytest.raises(ConfigError, match="cifar10-ii-32"):
        load_config("cifar10-iii-32")
    with pytest.raises(ConfigError, match=r"section\.key=value"):
        parse_override("epochs")
