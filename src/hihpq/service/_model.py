"""The service's one way to get an image encoder: ``hihpq.Encoder`` when the library has it.

TEMPORARY FALLBACK (delete once ``hihpq.encoder`` is merged): :class:`_LegacyEncoder` gives the few members of
the Encoder interface the service uses (``embed``, ``fingerprint``, ``M``, ``D``, ``device``, ``resolution``)
from today's ``pipeline.load_model``, building the eval transform and the frozen backbone once, not per request.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch


def load_encoder(model_path: str | Path, device: str = "cpu"):
    """An object with ``embed(images, batch_size=..., progress=False) -> (n, M, D) float32`` and ``fingerprint``."""
    try:
        from hihpq.encoder import Encoder
    except ModuleNotFoundError:  # the library's Encoder is not there yet: the fallback below
        return _LegacyEncoder(model_path, device)
    return Encoder.load(model_path, device=device)


# ------------------------------------------------------------------------------ fallback (delete after h10lib)
class _LegacyEncoder:
    def __init__(self, model_path: str | Path, device: str = "cpu") -> None:
        from hihpq import pipeline
        from hihpq.data import eval_transform
        from hihpq.models import build_backbone

        path = Path(model_path)
        path = path / "model.pt" if path.is_dir() else path
        model, cfg, _ = pipeline.load_model(path, device=device)
        trained = model.backbone is not None
        backbone = model.backbone if trained else build_backbone(cfg.backbone.name, weights=cfg.backbone.weights)
        backbone = backbone.to(device).eval()
        self._backbone = backbone.for_inference()
        self._head = (pipeline._head(model) if trained else model).eval()
        self.resolution = int(cfg.backbone.resolution)
        self.transform = eval_transform(self.resolution, backbone.mean, backbone.std)
        self.device = torch.device(device)
        self.M, self.D = model.quantizer.n_subspaces, model.quantizer.subspace_dim
        self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()

    @torch.inference_mode()
    def embed(self, images, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        out = []
        for s in range(0, len(images), batch_size):
            x = torch.stack([self.transform(im) for im in images[s : s + batch_size]]).to(self.device)
            # float16 as the feature cache stores them, so queries see the features the index was built from
            feats = self._backbone(x).float().half().float()
            out.append(self._head.embed(feats).float().cpu())
        return torch.cat(out).numpy() if out else np.zeros((0, self.M, self.D), np.float32)
