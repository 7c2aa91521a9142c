"""From a Config to the objects of a run: the one place that unpacks config sections into constructors.

Each section of :class:`hihpq.config.Config` becomes the arguments of one constructor here; library classes never
see the config object.
"""

from __future__ import annotations

import torch

from hihpq.config import Config
from hihpq.losses import HiHPQLoss
from hihpq.models.hihpq import HiHPQ
from hihpq.models.projector import Projector
from hihpq.quantizer import ProductQuantizer
from hihpq.train import TrainSettings

__all__ = ["build_loss", "build_model", "build_quantizer", "torch_backbone", "train_settings"]


def build_quantizer(cfg: Config) -> ProductQuantizer:
    q = cfg.quantizer
    return ProductQuantizer(
        q.n_subspaces,
        q.n_codewords,
        q.subspace_dim,
        geometry=q.geometry,
        tau=q.tau,
        curvature=q.curvature,
        learn_curvature=q.learn_curvature,
        curvature_bounds=(q.curvature_min, q.curvature_max),
        clip_r=q.clip_r,
        curvature_param=q.curvature_param,
        init_from_data=q.init_from_data,
        keep_scale=q.curvature_keeps_scale,
    )


def build_model(cfg: Config, in_dim: int, backbone: torch.nn.Module | None = None) -> HiHPQ:
    """Projector + quantizer (and the backbone when training end to end)."""
    torch.manual_seed(cfg.seed)
    hidden = cfg.projector.hidden if cfg.projector.kind == "mlp" else None
    projector = Projector(
        in_dim, cfg.quantizer.feature_dim, kind=cfg.projector.kind, hidden=hidden, dropout=cfg.projector.dropout
    )
    return HiHPQ(projector, build_quantizer(cfg), backbone=backbone)


def build_loss(cfg: Config) -> HiHPQLoss:
    loss = cfg.loss
    return HiHPQLoss(
        tau=loss.tau_qc,
        lambda1=loss.lambda1,
        lambda2=loss.lambda2,
        instance_denominator=loss.instance_denominator,
        decorrelation=loss.decorrelation,
    )


def train_settings(cfg: Config, progress: bool = True) -> TrainSettings:
    t, h = cfg.train, cfg.hierarchy
    return TrainSettings(
        epochs=t.epochs,
        steps=t.steps,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        weight_decay=t.weight_decay,
        warmup_epochs=t.warmup_epochs,
        min_lr=t.min_lr,
        curvature_lr_scale=t.curvature_lr_scale,
        backbone_lr_scale=t.backbone_lr_scale,
        neighbours=t.neighbours,
        neighbour_prob=t.neighbour_prob,
        neighbour_refresh=t.neighbour_refresh,
        reseed_codewords=t.reseed_codewords,
        refit_codebooks=t.refit_codebooks,
        levels=list(h.levels),
        n_subclusters=h.n_subclusters,
        hierarchy_warmup=h.warmup_epochs,
        hierarchy_interval=h.interval,
        device=t.device,
        amp=t.amp,
        seed=cfg.seed,
        progress=progress,
    )


def torch_backbone(backbone, cfg):
    """The PyTorch module of the frozen backbone (a model file records its weights' SHA-256): the one given, or,
    for a compiled runtime (OpenVINO / ONNX Runtime, no tensors), the same backbone rebuilt in PyTorch."""
    if any(True for _ in backbone.parameters()):  # a compiled runtime holds no tensors
        return backbone
    from hihpq.models import build_backbone

    return build_backbone(cfg.backbone.name, weights=cfg.backbone.weights)
