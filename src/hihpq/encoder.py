"""A trained model as an image encoder: images (or backbone features) -> embeddings, codes, an index.

    enc = Encoder.load("runs/photos")              # a run folder or a model file; device="cuda" to use a GPU
    emb = enc.embed(["a.jpg", "b.png"])             # (n, M, D) float32 points of the product manifold
    codes = enc.encode(pil_images)                  # (n, M) uint8
    index = enc.index("photos/")                    # a HyperbolicPQIndex, item metadata = the paths

Batching, progress bars, eval mode, inference mode and device placement happen inside. The backbone is built
once, at load (:func:`hihpq.models.io.rebuild_frozen_backbone` is the one place a model's frozen backbone is made).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from hihpq.models.io import ModelFile, load_model

__all__ = ["Encoder"]

_PathLike = (str, os.PathLike)


def _describe(item: Any, position: int) -> str:
    return str(item) if isinstance(item, _PathLike) else f"item {position} ({type(item).__name__})"


def _to_pil(item: Any) -> Image.Image:
    """One image as PIL RGB: a file path, a PIL image, an HxWx3 (or HxW) uint8 array, or a float tensor (3, H, W)
    of RGB in [0, 1] (quantised to 8 bits, as if read from a file: the same pixels give the same embedding)."""
    from hihpq.data.folders import _open_rgb

    if isinstance(item, _PathLike):
        return _open_rgb(Path(item))
    if isinstance(item, Image.Image):
        return item.convert("RGB")
    if isinstance(item, torch.Tensor):
        if item.ndim != 3 or item.shape[0] not in (1, 3) or not item.is_floating_point():
            raise ValueError(f"an image tensor must be float (3, H, W) in [0, 1], got {item.dtype} {tuple(item.shape)}")
        pixels = (item.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
        item = pixels.expand(3, -1, -1).permute(1, 2, 0).numpy()
    if isinstance(item, np.ndarray):
        if item.dtype != np.uint8 or not (item.ndim == 2 or (item.ndim == 3 and item.shape[2] in (3, 4))):
            raise ValueError(f"an image array must be uint8 (H, W, 3), got {item.dtype} {item.shape}")
        return Image.fromarray(item).convert("RGB")
    raise TypeError(f"cannot read an image from a {type(item).__name__}")


class Encoder:
    """A trained HiHPQ model ready to encode images; see the module doc.

    Attributes:
        device: where the model runs. M, D, K: subspaces, subspace dimension, codewords per subspace.
        quantizer: the trained :class:`~hihpq.quantizer.ProductQuantizer`. transform: the evaluation transform
        (PIL -> normalised tensor). resolution: its output side. fingerprint: SHA-256 hex of the exact model.
        model_path: the model file. skipped: descriptions of the inputs the last call skipped (``on_error="skip"``).
    """

    def __init__(self, model_file: ModelFile, device: str | torch.device = "cpu", runtime: str = "auto") -> None:
        from hihpq.data.transforms import eval_transform
        from hihpq.evaluation import head

        self.device = torch.device(device)
        self.model_file = model_file
        model = model_file.model.to(self.device).eval()
        self._head = head(model).eval()
        self.quantizer = model.quantizer
        record = model_file.backbone
        self._backbone = None
        self.transform = None
        self.resolution = None
        if record is not None:
            backbone = model_file.image_backbone.to(self.device).eval()
            self.resolution = int(record["resolution"])
            if model_file.frozen_backbone is not None and self.device.type == "cpu" and runtime != "torch":
                # a frozen backbone runs in the fastest inference runtime (same features to ~1e-5, README)
                from hihpq.models.runtime import accelerate

                backbone = accelerate(backbone, self.resolution, runtime)
            # a frozen backbone may offer a faster equivalent (BatchNorm folded), as the feature cache uses
            self._backbone = backbone.for_inference() if hasattr(backbone, "for_inference") else backbone
            self.transform = eval_transform(self.resolution, record["mean"], record["std"])
        self.fingerprint = model_file.fingerprint
        self.model_path = model_file.path
        self.skipped: list[str] = []
        self._skipped_at: list[int] = []  # positions of the skipped inputs

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device | None = None, runtime: str = "auto") -> Encoder:
        """Load a run folder (its ``model.pt``) or a model file on ``device`` (None: "cpu"). ``runtime``: where a
        frozen backbone runs on the CPU ("auto": OpenVINO or ONNX Runtime when installed, else PyTorch; "torch")."""
        device = torch.device(device or "cpu")
        return cls(load_model(path, device=device), device, runtime)

    # --------------------------------------------------------------------------------------------- shape
    @property
    def M(self) -> int:
        return self.quantizer.n_subspaces

    @property
    def D(self) -> int:
        return self.quantizer.subspace_dim

    @property
    def K(self) -> int:
        return self.quantizer.n_codewords

    @property
    def in_dim(self) -> int:
        """F, the backbone feature size the projector takes."""
        return int(self._head.projector.in_dim)

    def __repr__(self) -> str:
        bb = self.model_file.backbone
        name = f"{bb['name']} @ {self.resolution}px" if bb else "features only"
        return f"Encoder({name}, M={self.M}, K={self.K}, D={self.D}, device={self.device}, {self.fingerprint[:12]})"

    # ------------------------------------------------------------------------------------------ encoding
    def _features_input(self, images: Any) -> np.ndarray | None:
        """Backbone features (n, F) when ``images`` is a float matrix, else None."""
        if isinstance(images, torch.Tensor) and images.ndim == 2:
            images = images.detach().float().cpu().numpy()
        if isinstance(images, np.ndarray) and images.ndim == 2 and images.dtype.kind == "f":
            if images.shape[1] != self.in_dim:
                raise ValueError(f"features must have shape (n, {self.in_dim}), got {images.shape}")
            return images.astype(np.float32, copy=False)
        return None

    @staticmethod
    def _items(images: Any) -> list:
        """The inputs as a list of single images (a folder becomes its sorted image files)."""
        if isinstance(images, _PathLike):
            from hihpq.data.prepare import list_images

            return list(list_images(images))
        if isinstance(images, Image.Image):
            return [images]
        if isinstance(images, torch.Tensor):
            if images.ndim == 3:
                return [images]
            if images.ndim == 4:
                return list(images)
            raise ValueError(f"an image tensor must be (3, H, W) or (B, 3, H, W), got {tuple(images.shape)}")
        if isinstance(images, np.ndarray):
            if images.ndim in (2, 3):
                return [images]
            if images.ndim == 4:
                return list(images)
            raise ValueError(f"an image array must be (H, W, 3) or (B, H, W, 3), got {images.shape}")
        if isinstance(images, Iterable) and not isinstance(images, (bytes, dict)):
            return list(images)
        raise TypeError(f"images must be paths, PIL images, arrays or tensors, got {type(images).__name__}")

    @torch.inference_mode()
    def _embed_batch(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        x = torch.stack(tensors).to(self.device)
        # rounded as the feature cache stores them: the model was trained on float16 features
        feats = self._backbone(x).float().half().float()
        return self._head.embed(feats).float().cpu()

    def embed(self, images: Any, batch_size: int = 64, progress: bool = False, on_error: str = "raise") -> np.ndarray:
        """Embeddings (n, M, D) float32 on the product manifold.

        Args:
            images: a folder or image path, a list of paths / PIL images / uint8 (H, W, 3) arrays / float (3, H, W)
                tensors in [0, 1], a (B, 3, H, W) tensor, or backbone features (n, F) (float array or tensor).
            batch_size: images per forward pass.
            progress: show a progress bar.
            on_error: "raise" (an unreadable image is a ValueError naming it) or "skip" (left out; the rows
                follow the readable inputs and ``self.skipped`` names the others).
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.skipped, self._skipped_at = [], []
        feats = self._features_input(images)
        if feats is not None:
            from hihpq.evaluation import embed

            return embed(self._head, feats, batch_size=max(batch_size, 1024))
        if self._backbone is None:
            raise ValueError("this model was trained on backbone features only: pass features (n, F), not images")
        items = self._items(images)
        missing = [str(p) for p in items if isinstance(p, _PathLike) and not Path(p).is_file()]
        if missing and on_error == "raise":  # before any work
            raise ValueError(f"{len(missing)} image file(s) not found: {', '.join(missing[:5])}")
        out, batch = [], []
        bar = tqdm(total=len(items), desc="embedding", unit="img", disable=not progress, leave=False)
        try:
            for pos, item in enumerate(items):
                try:
                    batch.append(self.transform(_to_pil(item)))
                except (OSError, ValueError, TypeError) as exc:
                    if on_error == "raise":
                        raise ValueError(f"cannot use {_describe(item, pos)} as an image: {exc}") from exc
                    self.skipped.append(_describe(item, pos))
                    self._skipped_at.append(pos)
                if len(batch) == batch_size:
                    out.append(self._embed_batch(batch))
                    batch = []
                bar.update(1)
            if batch:
                out.append(self._embed_batch(batch))
        finally:
            bar.close()
        return torch.cat(out).numpy() if out else np.zeros((0, self.M, self.D), np.float32)

    def encode(self, images: Any, **kw) -> np.ndarray:
        """Hard codes (n, M) uint8 of ``images`` (anything :meth:`embed` takes, same keywords)."""
        from hihpq.evaluation import encode_embeddings

        return encode_embeddings(self.quantizer, self.embed(images, **kw))

    def index(
        self,
        images: Any,
        ids: Sequence[int] | np.ndarray | None = None,
        metadata: Sequence[str] | None = None,
        *,
        metric: str = "adc",
        **kw,
    ):
        """A :class:`~hihpq.index.HyperbolicPQIndex` of ``images`` under this model's codebooks.

        Item metadata: ``metadata`` when given, else the absolute image paths when ``images`` are paths (a folder:
        its files). The index's user metadata records this model's fingerprint and file, which ``hihpq search`` and
        ``hihpq index add`` check. ``kw``: the keywords of :meth:`embed` (with ``on_error="skip"`` the skipped
        inputs get no item, and their ids and metadata are left out too).
        """
        from hihpq.evaluation import encode_embeddings
        from hihpq.index import HyperbolicPQIndex

        items = images if self._features_input(images) is not None else self._items(images)
        n = len(items)
        if ids is not None and len(ids) != n:
            raise ValueError(f"ids has {len(ids)} entries for {n} inputs")
        if metadata is not None and len(metadata) != n:
            raise ValueError(f"metadata has {len(metadata)} entries for {n} inputs")
        if metadata is None and isinstance(items, list) and items and all(isinstance(p, _PathLike) for p in items):
            metadata = [str(Path(p).absolute()) for p in items]  # absolute: what `hihpq index add` compares
        emb = self.embed(items, **kw)
        kept = np.setdiff1d(np.arange(n), self._skipped_at)  # skipped inputs get no item (nor their id / name)
        index = HyperbolicPQIndex.from_quantizer(self.quantizer, metric=metric)
        codes = encode_embeddings(self.quantizer, emb)
        ids = None if ids is None else np.asarray(ids, np.int64)[kept]
        index.add_codes(codes, ids, metadata=None if metadata is None else [metadata[i] for i in kept])
        index.user_metadata = {**index.user_metadata, **self.index_metadata()}
        return index

    def index_metadata(self) -> dict[str, str]:
        """What an index records about the model that encoded it (checked by search and index add)."""
        return {"model": str(Path(self.model_path).resolve()), "model_fingerprint": self.fingerprint}
