"""Models: backbone registry and weights loading, projector (the HiHPQ model lives in hihpq.models.hihpq)."""

from __future__ import annotations

from hihpq.models.backbones import (
    BACKBONES,
    Backbone,
    WeightsNotFoundError,
    available_backbones,
    build_backbone,
)
from hihpq.models.projector import Projector
from hihpq.models.runtime import CompiledBackbone, frozen_backbone

__all__ = [
    "BACKBONES",
    "Backbone",
    "CompiledBackbone",
    "Projector",
    "WeightsNotFoundError",
    "available_backbones",
    "build_backbone",
    "frozen_backbone",
]
