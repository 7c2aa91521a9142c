"""Hostile but realistic input (issue 13): every bad file, value or target generated here ends in a clear message
and a refusal before work starts, or is handled; nothing is overwritten that is not ours.

The numbered comments refer to the items of the issue.
"""

from __future__ import annotations

import dataclasses
import os
import stat
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_colour_folder, write_tiny_config
from hihpq.cli import main
from hihpq.config import SCHEMA, Config, ConfigError, config_keys, load_config

# ------------------------------------------------------------------------------------- 7, 9: config values


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=2.5", r"train.epochs must be an int in \[1, inf\), got 2.5"),
        ("train.epochs=true", r"train.epochs must be an int .* got True"),
        ("train.epochs=abc", r"train.epochs must be an int .* got 'abc'"),
        ("train.min_lr=-1", r"train.min_lr must be a number in \[0, inf\)"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.warmup_epochs=-3", "train.warmup_epochs"),
        ("train.momentum=1", r"train.momentum must be a number in \[0, 1\)"),
        ("train.lr=.nan", "train.lr"),
        ("hierarchy.interval=-1", r"hierarchy.interval must be an int in \[1, inf\)"),
        ("hierarchy.interval=0", "hierarchy.interval"),
        ("hierarchy.levels=[10, 2.5]", "hierarchy.levels must be a list of ints"),
        ("quantizer.tau=false", "quantizer.tau"),
        ("quantizer.learn_curvature=1", "quantizer.learn_curvature must be true or false"),
        ("projector.kind=conv", r"projector.kind must be one of \['linear', 'mlp'\]"),
        ("eval.topk=0", "eval.topk"),
        ("features.num_workers=-1", "features.num_workers"),
        # 9: the quantizer takes the open interval; K > 256 does not fit uint8 codes
        ("quantizer.curvature=10.0", "open interval"),
        ("quantizer.curvature=0.01", "open interval"),
        ("quantizer.n_codewords=512", r"quantizer.n_codewords must be an int in \[2, 256\]"),
        ("train.min_lr=0.5", "train.min_lr=0.5 is above train.lr"),
    ],
)
def test_bad_config_values_name_the_field_and_the_range(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("cifar10-ii-32", [override])


def test_numbers_are_normalised_and_yaml_strings_of_floats_accepted():
    cfg = load_config("cifar10-ii-32", ["train.lr=1", "train.min_lr=1e-6"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float) and cfg.train.min_lr == 1e-6


def test_every_config_field_has_a_declared_type_and_range():
    keys = config_keys(Config())
    assert sorted(keys) == sorted(SCHEMA), set(keys) ^ set(SCHEMA)
    # and a field added without a declaration is refused, naming it
    extended = dataclasses.make_dataclass("X", [("new_knob", int, dataclasses.field(default=1))], bases=(Config,))
    with pytest.raises(ConfigError, match="new_knob has no declared type"):
        extended().validate()


# ------------------------------------------------------------------------------------------ 13: NaN embeddings
def test_build_index_refuses_nan_embeddings():
    from hihpq.pipeline import build_index, build_model

    cfg = load_config("cifar10-ii-16", ["quantizer.bits=8", "quantizer.n_codewords=16", "quantizer.feature_dim=8"])
    model = build_model(cfg, in_dim=12)
    emb = model.embed(torch.randn(5, 12)).detach().numpy()
    emb[3, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf in 1 of 5 rows"):
        build_index(model, emb)
    with pytest.raises(ValueError, match="NaN or inf"):
        model.quantizer.encode(torch.from_numpy(emb))
