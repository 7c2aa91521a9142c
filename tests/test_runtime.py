"""Inference runtimes of frozen backbones (hihpq.models.runtime): same features as PyTorch, own cache keys,
clear fallback. The real EfficientNet-Lite0 at 32 px, exported once per session (conftest's runtime folder)."""

from __future__ import annotations

import copy
import importlib
import logging

import numpy as np
import pytest
import torch

from hihpq.data import FeatureCache, ImageFolderDataset, extract_clean_features
from hihpq.models import Backbone, CompiledBackbone, build_backbone, frozen_backbone
from hihpq.models import runtime as rt

RES = 32
RUNTIMES = [
    pytest.param("openvino", marks=pytest.mark.skipif(not importlib.util.find_spec("openvino"), reason="no openvino")),
    pytest.param(
        "onnxruntime", marks=pytest.mark.skipif(not importlib.util.find_spec("onnxruntime"), reason="no onnxruntime")
    ),
]


@pytest.fixture(scope="module")
def reference() -> Backbone:
    return build_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def compiled() -> dict[str, CompiledBackbone]:
    """One compiled backbone per runtime, built on first use (the export is the slow part)."""
    return {}


def _compiled(cache: dict[str, CompiledBackbone], runtime: str) -> CompiledBackbone:
    if runtime not in cache:
        cache[runtime] = frozen_backbone("efficientnet-lite0", resolution=RES, runtime=runtime)
    return cache[runtime]


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtime_reproduces_pytorch_features(reference, compiled, runtime):
    fast = _compiled(compiled, runtime)
    assert isinstance(fast, CompiledBackbone)
    x = torch.randn(5, 3, RES, RES, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want = reference(x)
    got = fast(x)
    assert got.shape == want.shape == (5, reference.feature_dim) and got.dtype == torch.float32
    rel = float((got - want).abs().max() / want.abs().max())
    assert rel <= 1e-4, f"{runtime}: max relative difference {rel:.2e}"
    # the attributes the feature cache and the transforms read are the reference's
    assert (fast.name, fast.weights_id, fast.mean, fast.std) == (
        reference.name,
        reference.weights_id,
        reference.mean,
        reference.std,
    )
    assert fast.default_resolution == RES and fast.is_frozen and fast.for_inference() is fast
    assert fast.runtime_id["runtime"] == runtime and fast.runtime_id["precision"] == "fp32"
    # any batch size, including one image
    assert torch.allclose(fast(x[:1]), got[:1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_export_is_cached_on_disk(compiled, runtime, monkeypatch):
    first = _compiled(compiled, runtime)

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the artifact is cached")

    monkeypatch.setattr(rt, "_export", no_export)
    assert frozen_backbone("efficientnet-lite0", resolution=RES, runtime=runtime) is first  # this process: reused
    monkeypatch.setattr(rt, "_COMPILED", {})  # a new process: compiled again from the exported file
    again = frozen_backbone("efficientnet-lite0", resolution=RES, runtime=runtime)
    assert again is not first and again.model_path == first.model_path
    assert not list(first.model_path.parent.parent.glob(".*.tmp"))  # no temporary export left behind


def test_wrong_input_size_is_a_clear_error(compiled):
    fast = _compiled(compiled, rt.AUTO_ORDER[0] if importlib.util.find_spec(rt.AUTO_ORDER[0]) else "onnxruntime")
    with pytest.raises(ValueError, match=r"exported for \(B, 3, 32, 32\).*resolution=64"):
        fast(torch.zeros(2, 3, 64, 64))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_changed_runtime_or_precision_never_reuses_a_feature_cache(
    reference, compiled, runtime, image_folder, tmp_path
):
    dataset = ImageFolderDataset(image_folder)
    cache = FeatureCache(tmp_path / "features")
    kw = {"resolution": RES, "cache": cache, "num_workers": 0, "progress": False}
    torch_feats = extract_clean_features(reference, dataset, **kw)
    fast = _compiled(compiled, runtime)
    fast_feats = extract_clean_features(fast, dataset, **kw)
    assert torch_feats.computed and fast_feats.computed and fast_feats.path != torch_feats.path
    np.testing.assert_allclose(fast_feats.features, torch_feats.features, rtol=2e-3, atol=2e-3)  # float16 rows
    assert not extract_clean_features(fast, dataset, **kw).computed  # same runtime: reused

    for change in ({"precision": "bf16"}, {"version": "0.0.0"}):
        other = copy.copy(fast)  # the same compiled model under another runtime identity
        other.runtime_id = {**fast.runtime_id, **change}
        again = extract_clean_features(other, dataset, **kw)
        assert again.computed and again.path not in (fast_feats.path, torch_feats.path), change


def _hide_runtimes(monkeypatch, *names: str) -> None:
    real = importlib.import_module

    def fake_import(name, *args, **kwargs):
        if name in names:
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(rt.importlib, "import_module", fake_import)


def test_auto_falls_back_to_pytorch_with_one_clear_warning(monkeypatch, caplog):
    _hide_runtimes(monkeypatch, *rt.AUTO_ORDER)
    monkeypatch.setattr(rt, "_COMPILED", {})
    with caplog.at_level(logging.WARNING, logger="hihpq.models.runtime"):
        backbone = frozen_backbone("efficientnet-lite0", resolution=RES)
    assert isinstance(backbone, Backbone) and not hasattr(backbone, "runtime_id")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "using PyTorch" in warnings[0].getMessage() and "pip install openvino" in warnings[0].getMessage()


@pytest.mark.parametrize("runtime", rt.AUTO_ORDER)
def test_explicit_missing_runtime_is_an_error(monkeypatch, runtime):
    _hide_runtimes(monkeypatch, runtime)
    monkeypatch.setattr(rt, "_COMPILED", {})
    with pytest.raises(rt.RuntimeUnavailableError, match=rf"{runtime!r} is not installed.*pip install {runtime}"):
        frozen_backbone("efficientnet-lite0", resolution=RES, runtime=runtime)


def test_torch_runtime_and_non_cpu_devices_use_pytorch():
    assert isinstance(frozen_backbone("efficientnet-lite0", weights=None, resolution=RES, runtime="torch"), Backbone)
    on_meta = frozen_backbone("efficientnet-lite0", weights=None, resolution=RES, device="meta")  # auto: as a GPU
    assert isinstance(on_meta, Backbone) and next(on_meta.parameters()).device.type == "meta"
    with pytest.raises(ValueError, match="runs on the CPU"):
        frozen_backbone("efficientnet-lite0", weights=None, resolution=RES, runtime="openvino", device="meta")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"runtime": "tensorrt"}, "backbone.runtime must be one of"),
        ({"precision": "int8"}, "int8 needs a calibration step"),
        ({"runtime": "torch", "precision": "bf16"}, "bf16 needs backbone.runtime 'openvino'"),
        ({"runtime": "onnxruntime", "precision": "bf16"}, "bf16 needs backbone.runtime 'openvino'"),
    ],
)
def test_bad_runtime_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        frozen_backbone("efficientnet-lite0", weights=None, resolution=RES, **kwargs)


def test_trainable_backbone_is_not_exported():
    with pytest.raises(ValueError, match="only a frozen backbone"):
        rt.compile_backbone(build_backbone("efficientnet-lite0", weights=None, trainable=True), RES, "openvino")


def test_weights_hash_follows_every_value_of_any_module():
    """BatchNorm counters (0-d int64) and bf16 tensors hash too; one changed value changes the hash."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 2).bfloat16())
    before = rt._weights_hash(net)
    assert rt._weights_hash(net) == before
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1e-3
    assert rt._weights_hash(net) != before


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_prepare_features_accepts_a_compiled_backbone(compiled, runtime, image_folder, tmp_path):
    """A compiled backbone has no parameters (it runs on the CPU): prepare_features must not ask them its device."""
    from helpers import tiny_head_config
    from hihpq.data.prepare import prepare_features

    cfg = tiny_head_config(
        "data.dataset=folder", f"data.root={image_folder}", "data.n_query=3", f"backbone.resolution={RES}",
        f"features.cache_dir={tmp_path / 'features'}", "features.n_views=2", "features.num_workers=0",
    )  # fmt: skip
    fast = _compiled(compiled, runtime)
    prep = prepare_features(cfg, backbone=fast, progress=False)
    assert prep.clean.shape == (12, fast.feature_dim) and prep.views.shape == (9, 2, fast.feature_dim)
    assert prep.backbone is fast
