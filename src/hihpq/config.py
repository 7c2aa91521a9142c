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
    eval_labels: str | None = None  # images: CSV of path,label enabling the evaluation


@dataclass
class BackboneConfig:
    name: str = "efficientnet-lite0"
    weights: str | None = "default"  # "default", a file path, or null for random init
    resolution: int = 112
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


@dataclass
class QuantizerConfig:
    bits: int = 32
    n_codewords: int = 256
    feature_dim: int = 64  # M * D, D = ambient dim of one subspace
    geometry: str = "lorentz"  # lorentz | euclidean | cosine (MeCoQ-style: unit sub-vectors, cosine scores)
    tau: float = 0.2  # soft-assignment temperature (divides; the authors' softmax_temp is 1 / tau)
    curvature: float = 1.0
    # Fixed by default, unlike the paper: with the hierarchy losses a learned curvature climbs from 1 to ~7 and the
    # full model swings with the seed (CIFAR-10 II, 32 bits: 47.5 +- 2.7 learned vs 50.0 +- 0.5 fixed, README).
    learn_curvature: bool = False
    curvature_min: float = 0.01
    curvature_max: float = 10.0
    clip_r: float | None = 1.5
    # bounded: c = sigmoid-bounded (steps multiplicative in c); clamped: the authors' raw c, decayed and clamped
    curvature_param: str = "bounded"
    init_from_data: bool = False  # k-means codebooks from the training views once the hierarchy warm-up is over

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


@dataclass
class HierarchyConfig:
    levels: list[int] = field(default_factory=lambda: [100, 50, 25])
    n_subclusters: int | None = None
    warmup_epochs: int = 3  # epochs before the first hierarchy
    interval: int = 1  # refresh every this many epochs


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-3
    warmup_epochs: int = 1  # linear learning-rate warm-up, then cosine
    min_lr: float = 1e-5
    curvature_lr_scale: float = 1.0  # curvature step = lr * this, when quantizer.learn_curvature
    backbone_lr_scale: float = 1.0  # step of the trainable backbone layers = lr * this (online training)
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
        """Refuse impossible settings with a message that says what to change."""
        q = self.quantizer
        k = q.n_codewords
        if k < 2 or k & (k - 1):
            raise ConfigError(f"quantizer.n_codewords must be a power of two >= 2, got {k}")
        log2k = int(math.log2(k))
        if q.bits <= 0 or q.bits % log2k:
            raise ConfigError(f"quantizer.bits={q.bits} is not a multiple of log2(n_codewords)={log2k}")
        m = q.n_subspaces
        if q.feature_dim % m:
            raise ConfigError(
                f"quantizer.feature_dim={q.feature_dim} is not divisible by the number of subspaces M={m} "
                f"(bits {q.bits} / log2 K {log2k})"
            )
        if q.subspace_dim < 2:
            raise ConfigError(f"each subspace needs dimension >= 2, got feature_dim / M = {q.subspace_dim}")
        if q.geometry not in ("lorentz", "hyperbolic", "euclidean", "cosine"):
            raise ConfigError(f"quantizer.geometry must be 'lorentz', 'euclidean' or 'cosine', got {q.geometry!r}")
        if q.curvature_param not in ("bounded", "clamped"):
            raise ConfigError(f"quantizer.curvature_param must be 'bounded' or 'clamped', got {q.curvature_param!r}")
        if self.loss.instance_denominator not in ("ours", "paper"):
            raise ConfigError(
                f"loss.instance_denominator must be 'ours' or 'paper', got {self.loss.instance_denominator!r}"
            )
        if not 0 < q.curvature_min < q.curvature_max:
            raise ConfigError("quantizer needs 0 < curvature_min < curvature_max")
        if not q.curvature_min <= q.curvature <= q.curvature_max:
            raise ConfigError(f"quantizer.curvature={q.curvature} outside [{q.curvature_min}, {q.curvature_max}]")
        _positive(self, "quantizer.tau", "loss.tau_qc", "train.lr", "train.batch_size", "train.epochs")
        _positive(self, "features.n_views", "backbone.resolution", "eval.topk")
        if self.features.n_views < 2:
            raise ConfigError("features.n_views must be >= 2 (two different views per image per step)")
        if self.train.batch_size < 2:
            raise ConfigError("train.batch_size must be >= 2 (the contrastive loss needs negatives)")
        for key in ("curvature_lr_scale", "backbone_lr_scale"):
            if getattr(self.train, key) < 0:
                raise ConfigError(f"train.{key} must be >= 0, got {getattr(self.train, key)}")
        if self.loss.lambda1 < 0 or self.loss.lambda2 < 0:
            raise ConfigError("loss.lambda1 and loss.lambda2 must be >= 0")
        levels = self.hierarchy.levels
        if any(int(n) < 1 for n in levels) or list(levels) != sorted(set(levels), reverse=True):
            raise ConfigError(f"hierarchy.levels must be distinct positive sizes, coarsest last; got {levels}")
        if self.data.dataset not in DATASETS:
            raise ConfigError(f"data.dataset must be one of {DATASETS}, got {self.data.dataset!r}")
        if self.data.protocol.upper() not in ("I", "II"):
            raise ConfigError(f"data.protocol must be 'I' or 'II', got {self.data.protocol!r}")
        if self.eval.metric not in ("adc", "sdc"):
            raise ConfigError(f"eval.metric must be 'adc' or 'sdc', got {self.eval.metric!r}")
        if isinstance(self.train.amp, bool):  # configs written before amp had modes: true meant bf16 autocast
            self.train.amp = "bf16" if self.train.amp else "none"
        if self.train.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"train.amp must be none, bf16 or fp16, got {self.train.amp!r}")
        if self.train.device not in ("cpu", "cuda") and not self.train.device.startswith("cuda:"):
            raise ConfigError(f"train.device must be 'cpu' or 'cuda[:N]', got {self.train.device!r}")
        return self


def _positive(cfg: Config, *dotted: str) -> None:
    for key in dotted:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or value <= 0:
            raise ConfigError(f"{key} must be > 0, got {value}")


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
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
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
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
