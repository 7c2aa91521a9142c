"""bench/defaults_study.py: every study reruns as it ran, whatever the configs have become since."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from helpers import BENCH, load_bench_script
from hihpq.config import load_config
from hihpq.data.prepare import PreparedFeatures, auto_levels


@pytest.fixture(scope="module")
def study():
    return load_bench_script("defaults_study")


@pytest.mark.parametrize("name", ["defaults", "model", "generalisation"])
@pytest.mark.parametrize("bits", [16, 32, 64])
def test_candidates_pin_what_the_study_ran_with(study, name, bits):
    """The studies ran before the dropout default (0.2): a candidate without a dropout of its own trains without
    one; the defaults and model studies also fixed c = 1."""
    for cand, overrides in study.STUDIES[name](bits).items():
        over, _ = study.split_candidate(overrides, _prep())
        cfg = load_config(f"cifar10-ii-{bits}", over)
        expected = float(cand.split()[1]) if cand.startswith("dropout") else 0.0
        assert cfg.projector.dropout == pytest.approx(expected), cand
        if name != "generalisation" and "learned c" not in cand:
            assert not cfg.quantizer.learn_curvature, cand


def _prep() -> PreparedFeatures:
    views = np.arange(3 * 8, dtype=np.float16).reshape(3, 8, 1)
    return PreparedFeatures(None, np.zeros((3, 1), np.float16), np.arange(3), views, 0)


def test_views_candidate_trains_on_the_first_cached_views(study):
    over, prep = study.split_candidate(["projector.dropout=0", f"{study.VIEWS}4"], _prep())
    assert over == ["projector.dropout=0"]
    assert prep.views.shape == (3, 4, 1) and np.array_equal(prep.views[:, :, 0], _prep().views[:, :4, 0])


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_sharpness_candidates_start_from_the_configs_as_they_were(study, bits):
    """The sharpness study pins the configs it started from (dropout 0.2, the defaults study's tau / clip /
    tau_qc, c learned at 16 bits only) and changes one thing per candidate."""
    cands = study.sharpness_candidates(bits)
    base = load_config(f"cifar10-ii-{bits}", study.split_candidate(cands["defaults (dropout 0.2)"], _prep())[0])
    assert base.projector.dropout == pytest.approx(0.2)
    assert base.quantizer.learn_curvature == (bits == 16)
    assert base.loss.tau_qc == pytest.approx(0.1 * bits / 8)
    doubled = load_config(f"cifar10-ii-{bits}", cands["tau_qc x2"])
    assert doubled.loss.tau_qc == pytest.approx(2 * base.loss.tau_qc)
    ball = load_config(f"cifar10-ii-{bits}", cands["other ball"])
    assert ball.quantizer.clip_r != base.quantizer.clip_r and ball.loss.tau_qc == base.loss.tau_qc
    assert load_config(f"cifar10-ii-{bits}", cands["batch 256"]).train.batch_size == 2 * base.train.batch_size


@pytest.mark.parametrize(
    "name",
    ["sharpness", "training", "levers", "neighbours", "refresh", "weights", "codes", "length", "refit", "sixteen"],
)
def test_candidates_give_the_configs_the_recorded_study_ran(study, name):
    """Every record of bench/results/<name>_study.json was trained with the config its candidate gives now: the
    same head, quantizer, losses and training (length included: the configs train 16 bits by steps since the
    training study, the candidates pin the 50 epochs they ran with)."""
    records = json.loads((BENCH / "results" / f"{name}_study.json").read_text())
    assert records
    args = SimpleNamespace(data="cifar", fashion="fashion", overrides=[])
    for r in records:
        cand = study.STUDIES[name](r["bits"])[r["candidate"]]
        over = [*study.set_overrides(r["tuning_set"], args), *study.split_candidate(cand, _prep())[0]]
        cfg = load_config(f"cifar10-ii-{r['bits']}", [*over, f"seed={r['seed']}"]).to_dict()
        ran = r["config"]
        ran["train"].setdefault("steps", 0)  # recorded before train.steps existed
        ran["train"].setdefault("neighbours", 0)  # ... and before neighbour pairs
        ran["train"].setdefault("neighbour_prob", 0.5)
        ran["train"].setdefault("neighbour_refresh", False)  # ... and before refreshed neighbours
        ran["train"].setdefault("reseed_codewords", False)  # ... and before re-seeded codewords
        ran["train"].setdefault("refit_codebooks", False)  # ... and before refit codebooks
        ran["loss"].setdefault("decorrelation", 0.0)  # ... and before the decorrelation penalty
        for section in ("projector", "quantizer", "loss", "train"):
            assert cfg[section] == ran[section], (r["candidate"], section)
        levels = cfg["hierarchy"]["levels"] or auto_levels(2000)  # (records hold the sizes the rule gave)
        assert levels == ran["hierarchy"]["levels"], (r["candidate"], r["tuning_set"])


def _todays_config(bits: int, over: list[str], ref: dict) -> dict:
    """The config of ``bits`` as it is now, as a dict; where c is fixed at 1 the pins' ``curvature_keeps_scale``
    (which a fixed c never moves) is copied from ``ref``."""
    today = load_config(f"cifar10-ii-{bits}", over).to_dict()
    if not today["quantizer"]["learn_curvature"]:
        today["quantizer"]["curvature_keeps_scale"] = ref["quantizer"]["curvature_keeps_scale"]
    return today


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_neighbours_study_chose_todays_configs(study, bits):
    """The neighbours study's reference is the configs as the levers study left them; its winner (10 neighbours,
    half the time) is the configs as they are now: when a default changes, the pinned candidates must say what they
    ran with. Each candidate changes only the neighbour pairs."""
    cands = study.neighbour_candidates(bits)
    args = SimpleNamespace(data="cifar", fashion="fashion", overrides=[])
    for set_name in study.HELD_OUT_SETS:
        over = study.set_overrides(set_name, args)
        ref = load_config(f"cifar10-ii-{bits}", [*over, *cands["defaults (3,000 steps at 16 bits)"]]).to_dict()
        won = load_config(f"cifar10-ii-{bits}", [*over, *cands["neighbours 10, p 0.5"]]).to_dict()
        today = _todays_config(bits, [*over, *study.NO_RESEED, *study.NO_REFIT], ref)  # as before the codes study
        for section in ("projector", "quantizer", "loss", "train"):
            assert won[section] == today[section], (set_name, section)
        assert today["train"]["neighbours"] == 10 and ref["train"]["neighbours"] == 0
        for name, cand in cands.items():
            cfg = load_config(f"cifar10-ii-{bits}", [*over, *cand]).to_dict()
            cfg["train"].update(neighbours=0, neighbour_prob=0.5)
            for section in ("projector", "quantizer", "loss", "train"):
                assert cfg[section] == ref[section], (name, section)


#: study -> the fields its candidates vary
SECOND_ROUND = {
    "refresh": {"train": ["neighbours", "neighbour_prob", "neighbour_refresh"]},
    "weights": {"loss": ["lambda1", "lambda2"]},
    "codes": {"train": ["reseed_codewords"], "quantizer": ["learn_curvature", "curvature_keeps_scale"]},
}


@pytest.mark.parametrize("name", sorted(SECOND_ROUND))
@pytest.mark.parametrize("bits", [16, 32, 64])
def test_second_round_studies_start_from_todays_configs(study, name, bits):
    """The refresh, weights and codes studies' reference is the configs as they are now (neighbour pairs
    pinned); each candidate changes only the fields its study is about, and every other candidate changes one."""
    cands = study.STUDIES[name](bits)
    args = SimpleNamespace(data="cifar", fashion="fashion", overrides=[])
    for set_name in study.HELD_OUT_SETS:
        over = study.set_overrides(set_name, args)
        ref = load_config(f"cifar10-ii-{bits}", [*over, *cands["defaults (neighbours 10, p 0.5)"]]).to_dict()
        today = _todays_config(bits, [*over, *study.NO_RESEED, *study.NO_REFIT], ref)  # as before the codes study
        for section in ("projector", "quantizer", "loss", "train"):
            assert ref[section] == today[section], (set_name, section)
        if name == "codes" and bits == 16:  # its winner is the 16-bit config now
            won = load_config(f"cifar10-ii-{bits}", [*over, *cands["re-seeded codewords"]]).to_dict()
            assert won == load_config(f"cifar10-ii-{bits}", over).to_dict()
        base = {sec: {k: ref[sec][k] for k in keys} for sec, keys in SECOND_ROUND[name].items()}
        for cand_name, cand in cands.items():
            cfg = load_config(f"cifar10-ii-{bits}", [*over, *cand]).to_dict()
            varied = {sec: {k: cfg[sec][k] for k in keys} for sec, keys in SECOND_ROUND[name].items()}
            assert (varied == base) == cand_name.startswith("defaults"), cand_name
            for sec, vals in base.items():
                cfg[sec].update(vals)
            for section in ("projector", "quantizer", "loss", "train"):
                assert cfg[section] == ref[section], (cand_name, section)


#: study -> the one train field its candidates vary
THIRD_ROUND = {"length": "steps", "refit": "refit_codebooks"}


@pytest.mark.parametrize("name", sorted(THIRD_ROUND))
@pytest.mark.parametrize("bits", [16, 32, 64])
def test_third_round_studies_start_from_todays_configs(study, name, bits):
    """The length and refit studies' reference is the configs as they were before the refit study (re-seeded
    codewords at 16 bits, the trained codebooks); every other candidate changes the one field its study is about,
    and nothing else."""
    cands = study.STUDIES[name](bits)
    field = THIRD_ROUND[name]
    args = SimpleNamespace(data="cifar", fashion="fashion", overrides=[])
    for set_name in study.HELD_OUT_SETS:
        over = study.set_overrides(set_name, args)
        ref = load_config(f"cifar10-ii-{bits}", [*over, *cands["defaults (neighbours 10, p 0.5)"]]).to_dict()
        today = _todays_config(bits, [*over, *study.NO_REFIT], ref)  # as before the refit study
        for section in ("projector", "quantizer", "loss", "train"):
            assert ref[section] == today[section], (set_name, section)
        if name == "refit":  # its winner is today's config at 32 / 64 bits, not at 16
            won = load_config(f"cifar10-ii-{bits}", [*over, *cands["refit codebooks"]]).to_dict()
            assert (won == _todays_config(bits, over, ref)) == (bits != 16)
        assert len(cands) > 1
        for cand_name, cand in cands.items():
            if cand_name.startswith("defaults"):
                continue
            cfg = load_config(f"cifar10-ii-{bits}", [*over, *cand]).to_dict()
            assert cfg["train"][field] != ref["train"][field], cand_name
            if name == "length":
                assert cfg["train"]["steps"] == int(cand_name.split()[0].replace(",", ""))
            cfg["train"][field] = ref["train"][field]
            for section in ("projector", "quantizer", "loss", "train"):
                assert cfg[section] == ref[section], (cand_name, section)


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_levers_study_starts_from_the_configs_before_neighbour_pairs(study, bits):
    """The levers study's reference is the configs as they were (3,000 steps at 16 bits, 50 epochs at 32 / 64, the
    paper's pairs): today's configs but for the neighbour pairs. Each lever changes what it names."""
    cands = study.lever_candidates(bits)
    args = SimpleNamespace(data="cifar", fashion="fashion", overrides=[])
    for set_name in study.HELD_OUT_SETS:
        over = study.set_overrides(set_name, args)
        ref = load_config(f"cifar10-ii-{bits}", [*over, *cands["defaults (3,000 steps at 16 bits)"]]).to_dict()
        today = _todays_config(bits, [*over, "train.neighbours=0", *study.NO_RESEED, *study.NO_REFIT], ref)
        for section in ("projector", "quantizer", "loss", "train"):
            assert ref[section] == today[section], (set_name, section)
    base = load_config(f"cifar10-ii-{bits}", cands["defaults (3,000 steps at 16 bits)"])
    half = load_config(f"cifar10-ii-{bits}", cands["batch 64"])
    assert half.train.batch_size == 64 and base.train.batch_size == 128
    assert (half.train.steps, half.train.epochs, half.train.lr) == (base.train.steps, base.train.epochs, base.train.lr)
    assert load_config(f"cifar10-ii-{bits}", cands["batch 64, lr x0.5"]).train.lr == pytest.approx(base.train.lr / 2)
    if bits == 16:
        assert load_config(f"cifar10-ii-{bits}", cands["16 codewords"]).quantizer.n_codewords == 16
    else:
        learned = load_config(f"cifar10-ii-{bits}", cands["learned c, 3,000 steps"])
        assert learned.quantizer.learn_curvature and learned.train.steps == 3000


#: sixteen study candidate -> the fields it changes
SIXTEEN = {
    "neighbours 20, p 0.5": {"train": ["neighbours"]},
    "neighbours 5, p 0.25": {"train": ["neighbours", "neighbour_prob"]},
    "prototype loss only (lambda2 0)": {"loss": ["lambda2"]},
    "quantizer tau 0.1": {"quantizer": ["tau"]},
    "quantizer tau 0.4": {"quantizer": ["tau"]},
    "dropout 0.3": {"projector": ["dropout"]},
    "16 cached views": {"features": ["n_views"]},
    "16 cached views, 6,000 steps": {"features": ["n_views"], "train": ["steps"]},
    "c fixed at 1, refit codebooks": {
        "quantizer": ["learn_curvature", "curvature_keeps_scale"],
        "train": ["refit_codebooks"],
    },
    "feature dim 32": {"quantizer": ["feature_dim"]},
    "feature dim 128": {"quantizer": ["feature_dim"]},
    "lambda1 0.5": {"loss": ["lambda1"]},
    "weight decay 0.0005": {"train": ["weight_decay"]},
    "weight decay 0.01": {"train": ["weight_decay"]},
    "weight decay 0.02": {"train": ["weight_decay"]},
    "tau_qc 0.15": {"loss": ["tau_qc"]},
    "step size x2 (lr 0.02)": {"train": ["lr"]},
    "step size x4 (lr 0.04)": {"train": ["lr"]},
    "feature dim 128, step size x2": {"quantizer": ["feature_dim"], "train": ["lr"]},
    "hierarchy 200/100/50": {"hierarchy": ["levels"]},
    "hierarchy 80/40/20": {"hierarchy": ["levels"]},
    "hierarchy 100/50/25 (CIFAR's)": {"hierarchy": ["levels"]},
    "decorrelation 0.3": {"loss": ["decorrelation"]},
    "decorrelation 1": {"loss": ["decorrelation"]},
    "feature dim 128, 3,000 steps": {"quantizer": ["feature_dim"], "train": ["steps"]},
}


#: the sixteen study's candidates at 32 and 64 bits too (the others are 16-bit levers)
AT_EVERY_BIT_LENGTH = {
    "neighbours 20, p 0.5",
    "neighbours 5, p 0.25",
    "prototype loss only (lambda2 0)",
    "quantizer tau 0.1",
    "quantizer tau 0.4",
    "dropout 0.3",
    "16 cached views",
    "feature dim 128",
}


@pytest.mark.parametrize("bits", [16, 32, 64])
def test_sixteen_bit_study_starts_from_todays_configs(study, bits):
    """The sixteen study's reference is the configs as they are now; each candidate changes the fields its name
    says and nothing else (c fixed at 1 with refit only at 16 bits, the other bit lengths have both already)."""
    cands = study.sixteen_bit_candidates(bits)
    not_at_16 = {"feature dim 128, 3,000 steps"}  # (the 16-bit model trains 3,000 steps already)
    expected = set(SIXTEEN) - not_at_16 if bits == 16 else AT_EVERY_BIT_LENGTH | not_at_16
    assert set(cands) - {"defaults (today's configs)"} == expected
    args = SimpleNamespace(data="cifar", fashion="fashion", overrides=[])
    for set_name in study.HELD_OUT_SETS:
        over = study.set_overrides(set_name, args)
        ref = load_config(f"cifar10-ii-{bits}", [*over, *cands["defaults (today's configs)"]]).to_dict()
        today = _todays_config(bits, over, ref)
        for section in ("features", "projector", "quantizer", "loss", "train", "hierarchy"):
            assert ref[section] == today[section], (set_name, section)
        for name, cand in cands.items():
            cfg = load_config(f"cifar10-ii-{bits}", [*over, *cand]).to_dict()
            for sec, keys in SIXTEEN.get(name, {}).items():  # (the reference changes nothing)
                same_on_cifar = name == "hierarchy 100/50/25 (CIFAR's)" and set_name in study.CIFAR_FOLDS
                assert any(cfg[sec][k] != ref[sec][k] for k in keys) != same_on_cifar, (name, set_name)
                cfg[sec].update({k: ref[sec][k] for k in keys})
            for section in ("features", "projector", "quantizer", "loss", "train", "hierarchy"):
                assert cfg[section] == ref[section], (name, section)


def test_a_record_says_which_views_it_trained_on(study):
    """A candidate that asks for more cached views (features.n_views) or fewer (study.views=N) must train on that
    many, or the run stops before its record is written."""
    prep = SimpleNamespace(views=np.zeros((3, 8, 2)))
    cfg = load_config("cifar10-ii-16", ["features.n_views=16"])
    with pytest.raises(RuntimeError, match="8 cached views per image, the candidate asks 16"):
        study.check_views(["features.n_views=16"], cfg, prep)
    study.check_views([], load_config("cifar10-ii-16"), prep)
    four = SimpleNamespace(views=prep.views[:, :4])  # (what split_candidate gives for study.views=4)
    with pytest.raises(RuntimeError, match="4 cached views"):
        study.check_views([], load_config("cifar10-ii-16"), four)
    study.check_views(["study.views=4"], load_config("cifar10-ii-16"), four)


def test_the_summary_keeps_records_of_different_cpus_apart(study, capsys):
    """The same config and seed train to another mAP on another CPU: a summary of records from two kinds of CPU
    gives each candidate a row per kind instead of averaging across them."""
    rec = {"bits": 16, "candidate": "defaults", "tuning_set": "fashion-10pct"}
    records = [
        {**rec, "seed": 1, "map": 0.7369},  # (made before records said which CPU)
        {**rec, "seed": 1, "map": 0.7343, "cpu": {"name": "x", "capability": "AVX512"}},
        {**rec, "seed": 2, "map": 0.7365, "cpu": {"name": "x", "capability": "AVX512"}},
    ]
    study.summarise(records)
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  defaults")]
    assert sorted((r[1], r[2]) for r in rows) == [("[AVX512]", "73.54"), ("[unrecorded]", "73.69")]
    study.summarise(records[1:])
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  defaults")]
    assert rows == [["defaults", "73.54", "(2)", "73.54"]]
