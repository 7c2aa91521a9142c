"""The service's image encoder: :class:`hihpq.Encoder` (frozen backbone and eval transform built once, at load)."""

from __future__ import annotations

from pathlib import Path


def load_encoder(model_path: str | Path, device: str = "cpu"):
    """An :class:`hihpq.encoder.Encoder` of a run folder or model file on ``device``."""
    from hihpq.encoder import Encoder

    return Encoder.load(model_path, device=device)
