"""The HiHPQ model: (optional backbone) -> projector -> hyperbolic product quantizer (paper Fig. 2a).

With a frozen backbone the model is trained on cached backbone features and ``backbone`` is None; the same
projector and quantizer are then put behind the backbone for encoding images.
"""

from __future__ import annotations

import torch
from torch import nn

from hihpq.quantizer import ProductQuantizer


class HiHPQ(nn.Module):
    """Encoder network followed by the product quantizer.

    Inputs are images (B, 3, H, W) when ``backbone`` is set, else backbone features (B, F).
    """

    def __init__(self, projector: nn.Module, quantizer: ProductQuantizer, backbone: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.quantizer = quantizer

    def project(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Ambient Euclidean embedding z (B, M * D); ``keep``: the projector's dropout mask (Projector.draw_keep)."""
        feats = self.backbone(x) if self.backbone is not None else x
        return self.projector(feats, keep)

    def forward(self, x: torch.Tensor):
        """Quantizer output (tangent vectors, embeddings, soft-quantized embeddings, assignment weights)."""
        return self.quantizer(self.project(x))

    def tangent(self, x: torch.Tensor) -> torch.Tensor:
        """Tangent vectors at the origin (B, M, D): the features the hierarchy clusters."""
        return self.quantizer.tangent(self.project(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Continuous embeddings on the product manifold (B, M, D): what queries are searched with."""
        return self.quantizer.embed(self.project(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Hard codes (B, M), uint8 when K <= 256."""
        return self.quantizer.encode(self.embed(x))
