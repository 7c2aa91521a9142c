"""Run configuration: YAML files of sections, each section holding the arguments of one part of the pipeline.

Configuration lives at the edges: library classes never see this object; :mod:`hihpq.build` unpacks each
section into the constructor it belongs to. Unknown keys and impossible values are refused before any work starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

DATASETS = ("cifar10", "folder", "flickr25k", "nuswide", "digits", "images")


class ConfigError(ValueError):
    """A configuration that cannot run: unknown key, wrong type or impossible value."""


@dataclass
class DataConfig:
    dataset: str = "cifar10"  # cifar10 | folder | flickr25k | nuswide | digits | images
    protocol: str = "II"  # cifar10 only: I or II
    root: str | None = None  # dataset location; cifar10 falls back to $HIHPQ_DATA
    split_seed: int = 2021
    queries_per_class: int | None = None  # None = the protocol's full size
    train_per_class: int | None = None
    database_per_class: int | None = None
    database_list: str | None = None  # nuswide: the database list file
    lists: str | None = None  # flickr25k / nuswide: folder of the list files
    n_query: int | None = None  # folder / flickr25k: number of queries (default 2,000 for flickr25k)
    n_train: int | None = None  # folder / flickr25k: training images drawn from the database
    n_database: int | None = None  # folder / flickr25k: database size (default: every image that is not a query)
    eval_labels: str | None = None  # images: CSV of path,label enabling the evaluation


@dataclass
class BackboneConfig:
    name: str = "efficientnet-lite0"
    weights: str | None = "default"  # "default", a file path, or null for random init
    resolution: int = 224  # the weights' native input; 112 encodes ~3x faster for ~5 mAP points less (README)
    trainable: bool = False  # frozen backbones train from the feature cache
    # Inference runtime of a frozen backbone (hihpq.models.runtime): auto = OpenVINO / ONNX Runtime when installed,
    # else PyTorch; each runtime and precision has its own feature caches. fp32 matches PyTorch to ~1e-5.
    runtime: str = "auto"  # auto | torch | openvino | onnxruntime
    precision: str = "fp32"  # fp32 | bf16 (OpenVINO on CPUs with bf16 support)


@dataclass
class FeaturesConfig:
    n_views: int = 8  # augmented views cached per training image
    batch_size: int = 64
    num_workers: int | None = None  # DataLoader workers (None: 1 for clean views, 2 for augmented ones)
    cache_dir: str | None = None  # default ~/.cache/hihpq/features
    seed: int = 2021  # augmentation seed of the cached views, apart from the run seed so that seeds share a cache


@dataclass
class ProjectorConfig:
    kind: str = "mlp"  # linear | mlp
    hidden: int = 1024
    # of the backbone features, in training only: 0.2 generalises beyond the training images (README: "Held-out
    # tuning sets"; bench/defaults_study.py --study generalisation); 0 is the paper's head
    dropout: float = 0.2


@dataclass
class QuantizerConfig:
    bits: int = 32
    n_codewords: int = 256
    feature_dim: int = 64  # M * D, D = ambient dim of one subspace
    geometry: str = "lorentz"  # lorentz | euclidean | cosine (MeCoQ-style: unit sub-vectors, cosine scores)
    tau: float = 0.2  # soft-assignment temperature (divides; the authors' softmax_temp is 1 / tau)
    curvature: float = 1.0
    # Fixed by default (the 16-bit cifar10-ii configs learn it, keeping the scale), unlike the paper: a larger c
    # lengthens every distance on the clip sphere, which lowers the contrastive losses like a lower temperature, so a
    # learned c climbs to 7-9 and the codes get worse (README: "The learned curvature"; bench/curvature_probe.py).
    learn_curvature: bool = False
    curvature_min: float = 0.01
    curvature_max: float = 10.0
    clip_r: float | None = 1.5
    # bounded: c = sigmoid-bounded (steps multiplicative in c); clamped: the authors' raw c, decayed and clamped
    curvature_param: str = "bounded"
    init_from_data: bool = False  # k-means codebooks from the training views once the hierarchy warm-up is over
    # the clip radius follows c so that c shapes the ball without scaling its distances (ProductQuantizer keep_scale)
    curvature_keeps_scale: bool = False

    @property
    def n_subspaces(self) -> int:
        return self.bits // int(math.log2(self.n_codewords))

    @property
    def subspace_dim(self) -> int:
        return self.feature_dim // self.n_subspaces


@dataclass
class LossConfig:
    tau_qc: float = 0.2
    lambda1: float = 1.0  # prototype-wise loss weight
    lambda2: float = 0.1  # instance-wise loss weight
    # Eq. 19's denominator: ours (positive + other anchors, a proper InfoNCE) | paper (other anchors only)
    instance_denominator: str = "ours"
    # weight of the subspaces' cross-correlation penalty (ours, 0 = off; hihpq.losses.subspace_correlation)
    decorrelation: float = 0.0


@dataclass
class HierarchyConfig:
    levels: list[int] = field(default_factory=lambda: [100, 50, 25])
    n_subclusters: int | None = None
    warmup_epochs: int = 3  # epochs before the first hierarchy
    interval: int = 1  # refresh every this many epochs


@dataclass
class TrainConfig:
    epochs: int = 50
    # > 0: train this many optimizer steps instead, the epochs following from the training set size
    # (ceil(steps / steps per epoch)): the same training for 2,000 images or 50,000. A config or override that
    # gives only train.epochs resets it to 0 (the last length given decides: see _merge)
    steps: int = 0
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-3
    warmup_epochs: int = 1  # linear learning-rate warm-up, then cosine
    min_lr: float = 1e-5
    curvature_lr_scale: float = 1.0  # curvature step = lr * this, when quantizer.learn_curvature
    backbone_lr_scale: float = 1.0  # step of the trainable backbone layers = lr * this (online training)
    # > 0: neighbour pairs: with probability neighbour_prob the second view of a pair is a view of one of the
    # image's `neighbours` nearest training images in the backbone's feature space (hihpq.neighbours); 0: the paper
    neighbours: int = 0
    neighbour_prob: float = 0.5
    # true: from the hierarchy warm-up on, the neighbours are found again at every hierarchy refresh, in the
    # model's own embedding (the one the hierarchy clusters) instead of the backbone's features
    neighbour_refresh: bool = False
    # true: from the hierarchy warm-up on, at every hierarchy refresh, codewords no training image uses are moved
    # onto training images' embeddings (a codebook that uses a few of its K codewords ranks ties, not images)
    reseed_codewords: bool = False
    # true: after the last epoch the codebooks are fitted again by k-means to the embeddings of the clean training
    # images (the codes then approximate the embeddings the model learned, not the codewords it trained with)
    refit_codebooks: bool = False
    device: str = "cpu"
    amp: str = "none"  # none | bf16 | fp16 autocast of backbone + projector (old booleans: false=none, true=bf16)
    num_threads: int | None = None


@dataclass
class EvalConfig:
    topk: int = 1000
    metric: str = "adc"  # adc | sdc


@dataclass
class Config:
    name: str = "default"
    seed: int = 2021
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    features: FeaturesConfig = field(default_factory=FeaturesConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    hierarchy: HierarchyConfig = field(default_factory=HierarchyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Refuse impossible settings with a message that says what to change: every field against its declared
        type and range (:data:`SCHEMA`), then the checks that involve several fields."""
        if isinstance(self.train.amp, bool):  # configs written before amp had modes: true meant bf16 autocast
            self.train.amp = "bf16" if self.train.amp else "none"
        check_schema(self)
        q = self.quantizer
        k = q.n_codewords
        if k & (k - 1):
            raise ConfigError(f"quantizer.n_codewords must be a power of two in [2, 256], got {k}")
        log2k = int(math.log2(k))
        if q.bits % log2k:
            raise ConfigError(f"quantizer.bits={q.bits} is not a multiple of log2(n_codewords)={log2k}")
        m = q.n_subspaces
        if q.feature_dim % m:
            raise ConfigError(
                f"quantizer.feature_dim={q.feature_dim} is not divisible by the number of subspaces M={m} "
                f"(bits {q.bits} / log2 K {log2k})"
            )
        if q.subspace_dim < 2:
            raise ConfigError(f"each subspace needs dimension >= 2, got feature_dim / M = {q.subspace_dim}")
        if not q.curvature_min < q.curvature_max:
            raise ConfigError(
                f"quantizer needs curvature_min < curvature_max, got {q.curvature_min} and {q.curvature_max}"
            )
        hyperbolic = q.geometry in ("lorentz", "hyperbolic")
        if hyperbolic and not q.curvature_min < q.curvature < q.curvature_max:  # the quantizer's open interval
            raise ConfigError(
                f"quantizer.curvature={q.curvature} outside the open interval "
                f"(curvature_min, curvature_max) = ({q.curvature_min}, {q.curvature_max})"
            )
        if self.train.min_lr > self.train.lr:
            raise ConfigError(f"train.min_lr={self.train.min_lr} is above train.lr={self.train.lr}")
        if self.loss.decorrelation > 0 and q.n_subspaces < 2:
            raise ConfigError(
                f"loss.decorrelation={self.loss.decorrelation} decorrelates subspaces, and {q.bits} bits of "
                f"{q.n_codewords} codewords make one; set loss.decorrelation=0 or use more bits"
            )
        levels = self.hierarchy.levels
        if list(levels) != sorted(set(levels), reverse=True):
            raise ConfigError(f"hierarchy.levels must be distinct positive sizes, coarsest last; got {levels}")
        if self.train.device not in ("cpu", "cuda") and not self.train.device.startswith("cuda:"):
            raise ConfigError(f"train.device must be 'cpu' or 'cuda[:N]', got {self.train.device!r}")
        return self

    def check_training_size(self, n_train: int) -> None:
        """The checks that need the training set's size, made once the split is known (before any feature)."""
        if n_train < 2:
            raise ConfigError(f"the training set holds {n_train} image(s); at least 2 are needed")
        levels = self.hierarchy.levels
        if levels and (self.loss.lambda1 > 0 or self.loss.lambda2 > 0) and max(levels) > n_train:
            raise ConfigError(
                f"hierarchy.levels {list(levels)} asks for more clusters than the {n_train} training images; "
                "lower hierarchy.levels (or raise data.n_train)"
            )


# ------------------------------------------------------------------------------------------------------ schema
@dataclass(frozen=True)
class Spec:
    """The declared type and range of one config field.

    ``kind``: "int" (bool and 2.5 refused), "float" (ints accepted, NaN / inf refused), "bool", "str" or
    "int_list"; ``lo`` / ``hi`` bound numbers (and list items), open when ``lo_open`` / ``hi_open``;
    ``choices`` the accepted strings (case-insensitive with ``nocase``); ``none``: null accepted; ``or_str``: a
    bool field that also takes a string (e.g. backbone.trainable = true | "fc").
    """

    kind: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    choices: tuple[str, ...] | None = None
    none: bool = False
    nocase: bool = False
    or_str: bool = False

    def describe(self) -> str:
        if self.choices is not None:
            what = f"one of {list(self.choices)}"
        else:
            what = {"int": "an int", "float": "a number", "bool": "true or false", "str": "a string"}.get(
                self.kind, "a list of ints"
            )
            if self.or_str:
                what += " or a string"
            if self.lo is not None or self.hi is not None:
                lo = "-inf" if self.lo is None else f"{self.lo:g}"
                hi = "inf" if self.hi is None else f"{self.hi:g}"
                left = "(" if self.lo_open or self.lo is None else "["
                right = ")" if self.hi_open or self.hi is None else "]"
                what += f" {'with items ' if self.kind == 'int_list' else ''}in {left}{lo}, {hi}{right}"
        return what + (" or null" if self.none else "")

    def _in_range(self, v: float) -> bool:
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        return self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)

    def check(self, key: str, value: Any) -> Any:
        """``value`` as the field holds it (ints of float fields become floats); ConfigError when refused."""
        if value is None and self.none:
            return None
        ok, out = False, value
        if self.kind == "bool":
            ok = isinstance(value, bool) or (self.or_str and isinstance(value, str))
        elif self.kind == "str":
            ok = isinstance(value, str) and (
                self.choices is None or (value.upper() if self.nocase else value) in self.choices
            )
        elif self.kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and self._in_range(value)
        elif self.kind == "float":
            if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
                try:
                    value = float(value)
                except ValueError:
                    pass
            number = isinstance(value, int | float) and not isinstance(value, bool)
            ok = number and math.isfinite(value) and self._in_range(value)
            out = float(value) if ok else value
        elif self.kind == "int_list":
            ok = isinstance(value, list | tuple) and all(
                isinstance(v, int) and not isinstance(v, bool) and self._in_range(v) for v in value
            )
            out = list(value) if ok else value
        if not ok:
            raise ConfigError(f"{key} must be {self.describe()}, got {value!r} ({type(value).__name__})")
        return out


def _int(lo: int | None = None, hi: int | None = None, *, none: bool = False) -> Spec:
    return Spec("int", lo, hi, none=none)


def _float(lo=None, hi=None, *, lo_open=False, hi_open=False, none=False) -> Spec:
    return Spec("float", lo, hi, lo_open=lo_open, hi_open=hi_open, none=none)


def _str(*choices: str, none: bool = False, nocase: bool = False) -> Spec:
    return Spec("str", choices=choices or None, none=none, nocase=nocase)


_POSITIVE = _float(0, lo_open=True)
_NON_NEGATIVE = _float(0)

#: Every config field, "section.name" (or "name" at the top), with its declared type and range. A field missing
#: here is refused by :func:`check_schema` (and the test suite), so that no new field runs unchecked.
SCHEMA: dict[str, Spec] = {
    "name": _str(),
    "seed": _int(0),
    "data.dataset": Spec("str", choices=DATASETS),  # read at check time below: others may extend DATASETS
    "data.protocol": _str("I", "II", nocase=True),
    "data.root": _str(none=True),
    "data.split_seed": _int(0),
    "data.queries_per_class": _int(1, none=True),
    "data.train_per_class": _int(1, none=True),
    "data.database_per_class": _int(1, none=True),
    "data.database_list": _str(none=True),
    "data.lists": _str(none=True),
    "data.n_query": _int(1, none=True),
    "data.n_train": _int(1, none=True),
    "data.n_database": _int(1, none=True),
    "data.eval_labels": _str(none=True),
    "backbone.name": _str(),
    "backbone.weights": _str(none=True),
    "backbone.resolution": _int(8, 4096),
    "backbone.trainable": Spec("bool", or_str=True),
    "backbone.runtime": _str("auto", "torch", "openvino", "onnxruntime"),  # hihpq.models.runtime.RUNTIMES
    "backbone.precision": _str("fp32", "bf16"),
    "features.n_views": _int(2),  # two different views per image per step
    "features.batch_size": _int(1),
    "features.num_workers": _int(0, none=True),
    "features.cache_dir": _str(none=True),
    "features.seed": _int(0),
    "projector.kind": _str("linear", "mlp"),
    "projector.hidden": _int(1),
    "projector.dropout": _float(0, 1, hi_open=True),
    "quantizer.bits": _int(1, 4096),
    "quantizer.n_codewords": _int(2, 256),  # codes are stored as uint8
    "quantizer.feature_dim": _int(2),
    "quantizer.geometry": _str("lorentz", "hyperbolic", "euclidean", "cosine"),
    "quantizer.tau": _POSITIVE,
    "quantizer.curvature": _POSITIVE,
    "quantizer.learn_curvature": Spec("bool"),
    "quantizer.curvature_min": _POSITIVE,
    "quantizer.curvature_max": _POSITIVE,
    "quantizer.clip_r": _float(0, lo_open=True, none=True),
    "quantizer.curvature_param": _str("bounded", "clamped"),
    "quantizer.init_from_data": Spec("bool"),
    "quantizer.curvature_keeps_scale": Spec("bool"),
    "loss.tau_qc": _POSITIVE,
    "loss.lambda1": _NON_NEGATIVE,
    "loss.lambda2": _NON_NEGATIVE,
    "loss.instance_denominator": _str("ours", "paper"),
    "loss.decorrelation": _NON_NEGATIVE,
    "hierarchy.levels": Spec("int_list", 1),
    "hierarchy.n_subclusters": _int(1, none=True),
    "hierarchy.warmup_epochs": _int(0),
    "hierarchy.interval": _int(1),
    "train.epochs": _int(1),
    "train.steps": _int(0),
    "train.batch_size": _int(2),  # the contrastive loss needs negatives
    "train.lr": _POSITIVE,
    "train.momentum": _float(0, 1, hi_open=True),
    "train.weight_decay": _NON_NEGATIVE,
    "train.warmup_epochs": _int(0),
    "train.min_lr": _NON_NEGATIVE,
    "train.curvature_lr_scale": _NON_NEGATIVE,
    "train.backbone_lr_scale": _NON_NEGATIVE,
    "train.neighbours": _int(0),
    "train.neighbour_prob": _float(0, 1),
    "train.neighbour_refresh": Spec("bool"),
    "train.reseed_codewords": Spec("bool"),
    "train.refit_codebooks": Spec("bool"),
    "train.device": _str(),
    "train.amp": _str("none", "bf16", "fp16"),
    "train.num_threads": _int(1, none=True),
    "eval.topk": _int(1),
    "eval.metric": _str("adc", "sdc"),
}


def config_keys(cfg: Config | None = None) -> list[str]:
    """Every field of a Config as "section.name" ("name" for top-level ones)."""
    cfg = cfg if cfg is not None else Config()
    keys = []
    for f in fields(cfg):
        sub = getattr(cfg, f.name)
        keys.extend(f"{f.name}.{g.name}" for g in fields(sub)) if dataclasses.is_dataclass(sub) else keys.append(f.name)
    return keys


def check_schema(cfg: Config) -> None:
    """Check (and normalise: ints of float fields become floats) every field against :data:`SCHEMA`."""
    for key in config_keys(cfg):
        spec = SCHEMA.get(key)
        if spec is None:
            raise ConfigError(f"config field {key} has no declared type and range (add it to hihpq.config.SCHEMA)")
        if key == "data.dataset":
            spec = dataclasses.replace(spec, choices=DATASETS)
        owner, name = (cfg, key) if "." not in key else (getattr(cfg, key.split(".")[0]), key.split(".")[1])
        setattr(owner, name, spec.check(key, getattr(owner, name)))


def _build(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in {where or 'config'}; known keys: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        sub = _SECTIONS.get(name) if cls is Config else None
        kwargs[name] = _build(sub, value or {}, name) if sub else value
    return cls(**kwargs)


_SECTIONS = {
    "data": DataConfig,
    "backbone": BackboneConfig,
    "features": FeaturesConfig,
    "projector": ProjectorConfig,
    "quantizer": QuantizerConfig,
    "loss": LossConfig,
    "hierarchy": HierarchyConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


def from_dict(values: dict[str, Any]) -> Config:
    """Build and validate a Config from nested dictionaries (e.g. parsed YAML)."""
    return _build(Config, dict(values), "").validate()


def builtin_configs() -> list[str]:
    """Names of the configs shipped with hihpq (one per paper setting and ablation variant)."""
    root = resources.files("hihpq") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _read_yaml(name_or_path: str) -> dict[str, Any]:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file():  # a folder called like a built-in config is not one
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        text = path.read_text()
    else:
        res = resources.files("hihpq") / "configs" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(f"no config named {name_or_path!r}; built-in configs: {', '.join(builtin_configs())}")
        text = res.read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {name_or_path} must be a YAML mapping")
    base = data.pop("base", None)  # a config may extend another one (e.g. an ablation variant)
    return _merge(_read_yaml(base), data) if base else data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` (a config extending ``base``, or an override) on top of ``base``. train.epochs and train.steps are
    two ways of giving the training length: a layer that gives only the epochs also resets the steps, so that the
    last one given decides (``-o train.epochs=10`` on a config that trains by steps trains 10 epochs)."""
    out = _merge_dicts(base, over)
    given = over.get("train")
    if isinstance(given, dict) and "epochs" in given and "steps" not in given and isinstance(out.get("train"), dict):
        out["train"] = {**out["train"], "steps": 0}
    return out


def _merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        is_dict = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merge_dicts(out[key], value) if is_dict else value
    return out


def parse_override(text: str) -> dict[str, Any]:
    """'train.epochs=5' -> {'train': {'epochs': 5}}; the value is parsed as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    value: Any = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads "1e-5" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    for part in reversed(parts):
        value = {part: value}
    return value


def load_config(name_or_path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a built-in config by name or a YAML file, apply ``section.key=value`` overrides, validate."""
    data = _read_yaml(name_or_path) if name_or_path else {}
    for text in overrides:
        data = _merge(data, parse_override(text))
    return from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    from hihpq.atomic import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
