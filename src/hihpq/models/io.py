"""Model files: a trained model saved with exactly what rebuilds it ("hihpq-model/2").

A model file is a dict that ``torch.load(..., weights_only=True)`` reads:

- ``format``: "hihpq-model/2".
- ``projector``: the :class:`~hihpq.models.projector.Projector` arguments (in_dim, out_dim, kind, hidden, dropout).
- ``quantizer``: the :class:`~hihpq.quantizer.ProductQuantizer` arguments (n_subspaces, n_codewords, subspace_dim,
  geometry, tau, curvature, learn_curvature, curvature_bounds, clip_r, curvature_param).
- ``backbone``: None for a model on backbone features only, else name, resolution, mean, std, feature_dim,
  trainable (the trained layers, "none" when frozen), weights_id, weights_sha256 (SHA-256 of its tensors) and
  ``stored``. A frozen backbone with the packaged / torchvision default weights is not stored: it is rebuilt on
  load and its SHA-256 recomputed and compared. Any other backbone (trained end to end, random or user-file
  weights) is stored: the model's ``backbone.*`` tensors, or ``backbone_state`` for a frozen one.
- ``state_dict`` (and ``backbone_state``): the tensors; ``tensors_sha256``: SHA-256 over all of them (names,
  dtypes, shapes, bytes), checked on load, so a flipped byte is a clear error and not a silently different model.
- ``provenance``: informational only (e.g. the training config as a dict); never used to rebuild anything.
- ``extra``: the caller's dict.

Files of the first format ("hihpq-model/1": the whole training config, ``in_dim`` and ``state_dict``) are
converted on load, with a one-line notice.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hihpq.models.hihpq import HiHPQ
from hihpq.models.projector import Projector
from hihpq.quantizer import ProductQuantizer
from hihpq.runinfo import atomic_path

__all__ = [
    "MODEL_FORMAT",
    "ModelFile",
    "ModelFileError",
    "load_model",
    "rebuild_frozen_backbone",
    "save_model",
    "tensors_sha256",
]

MODEL_FORMAT = "hihpq-model/2"
_FORMAT_1 = "hihpq-model/1"
#: weights ids of backbones whose weights ship with a package or torchvision (rebuilt, not stored)
_DEFAULT_WEIGHTS = ("package:", "torchvision:")

log = logging.getLogger("hihpq")


class ModelFileError(ValueError):
    """A model file that cannot be used: not a model file, corrupted, or made for other backbone weights."""


def tensors_sha256(*states: dict[str, torch.Tensor]) -> str:
    """SHA-256 over named tensors (sorted names; name, dtype, shape and raw bytes of each)."""
    h = hashlib.sha256()
    for state in states:
        for name in sorted(state):
            t = state[name].detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ component args
def _projector_args(p: Projector) -> dict[str, Any]:
    return {"in_dim": p.in_dim, "out_dim": p.out_dim, "kind": p.kind, "hidden": p.hidden, "dropout": p.dropout}


def _quantizer_args(q: ProductQuantizer) -> dict[str, Any]:
    # the initial curvature only has to be a valid one: the stored curvature_raw replaces it
    c = float(q.curvature.detach().cpu()[0]) if q.geometry == "lorentz" else 1.0
    lo, hi = q.curvature_bounds
    c = min(max(c, lo * (1 + 1e-6)), hi * (1 - 1e-6))
    return {
        "n_subspaces": q.n_subspaces,
        "n_codewords": q.n_codewords,
        "subspace_dim": q.subspace_dim,
        "geometry": q.geometry,
        "tau": float(q.tau),
        "curvature": c,
        "learn_curvature": bool(q.learn_curvature),
        "curvature_bounds": [float(lo), float(hi)],
        "clip_r": None if q.clip_r is None else float(q.clip_r),
        "curvature_param": str(getattr(q, "curvature_param", "bounded")),
        "keep_scale": bool(getattr(q, "keep_scale", False)),
    }


def _backbone_record(backbone: nn.Module, resolution: int | None, stored: bool) -> dict[str, Any]:
    return {
        "name": str(backbone.name),
        "resolution": int(resolution if resolution is not None else backbone.default_resolution),
        "mean": [float(m) for m in backbone.mean],
        "std": [float(s) for s in backbone.std],
        "feature_dim": int(backbone.feature_dim),
        "trainable": str(getattr(backbone, "trainable", "none")),
        "weights_id": str(getattr(backbone, "weights_id", "")),
        "weights_sha256": tensors_sha256(backbone.state_dict()),
        "stored": bool(stored),
    }


# --------------------------------------------------------------------------------------------------- save
def save_model(
    path: str | Path,
    model: HiHPQ,
    *,
    backbone: nn.Module | None = None,
    resolution: int | None = None,
    provenance: dict | None = None,
    extra: dict | None = None,
) -> None:
    """Save a trained model atomically (format "hihpq-model/2", see the module doc).

    Args:
        model: the trained model; its own backbone (end-to-end training) is saved with it.
        backbone: the frozen backbone that made the features a head-only model was trained on (None: the file
            encodes backbone features only).
        resolution: the backbone's input side during training (default: the backbone's default).
        provenance: informational dict (e.g. ``cfg.to_dict()``), kept as is, never used to rebuild.
        extra: the caller's dict.
    """
    if model.backbone is not None and backbone is not None and backbone is not model.backbone:
        raise ValueError("the model has its own backbone; do not pass another one")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    backbone_state: dict[str, torch.Tensor] = {}
    record = None
    if model.backbone is not None:
        record = _backbone_record(model.backbone, resolution, stored=True)
    elif backbone is not None:
        stored = not str(getattr(backbone, "weights_id", "")).startswith(_DEFAULT_WEIGHTS)
        record = _backbone_record(backbone, resolution, stored=stored)
        if stored:  # random or user-file weights: the file is the only way to get them back
            backbone_state = {k: v.detach().cpu() for k, v in backbone.state_dict().items()}
    payload = {
        "format": MODEL_FORMAT,
        "projector": _projector_args(model.projector),
        "quantizer": _quantizer_args(model.quantizer),
        "backbone": record,
        "state_dict": state,
        "backbone_state": backbone_state,
        "tensors_sha256": tensors_sha256(state, backbone_state),
        "provenance": provenance or {},
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# --------------------------------------------------------------------------------------------------- load
@dataclass
class ModelFile:
    """A loaded model file.

    Attributes:
        model: projector + quantizer (+ the trained backbone when it was trained end to end), eval mode.
        backbone: the backbone record (see the module doc), None for a features-only model.
        frozen_backbone: the frozen backbone module (rebuilt and checked, or from the file), None when the model
            has its own trained backbone or none at all.
        provenance, extra: as saved.
        path: the file read.
        fingerprint: SHA-256 hex of the exact model (all its tensors and the backbone's weights and input).
    """

    model: HiHPQ
    backbone: dict[str, Any] | None
    frozen_backbone: nn.Module | None
    provenance: dict[str, Any]
    extra: dict[str, Any]
    path: Path
    fingerprint: str = ""
    converted_from: str | None = field(default=None)

    @property
    def image_backbone(self) -> nn.Module | None:
        """The backbone images go through: the model's trained one or the frozen one (None: features only)."""
        return self.model.backbone if self.model.backbone is not None else self.frozen_backbone


def rebuild_frozen_backbone(name: str, *, weights_sha256: str | None = None, state: dict | None = None) -> nn.Module:
    """The frozen backbone ``name``, with its default weights (checked against ``weights_sha256``) or ``state``.

    The one place a model's frozen backbone is built (on the CPU, eval mode, frozen).
    """
    from hihpq.models.backbones import build_backbone

    backbone = build_backbone(name, weights="default" if state is None else None, trainable=False)
    if state is not None:
        backbone.load_state_dict(state)
        backbone.weights_id = "stored:" + (weights_sha256 or tensors_sha256(state))[:16]
    if weights_sha256 is not None:
        got = tensors_sha256(backbone.state_dict())
        if got != weights_sha256:
            raise ModelFileError(
                f"the {name} weights on this machine (SHA-256 {got[:16]}...) are not the ones the model was "
                f"trained with ({weights_sha256[:16]}...): install the same version of the weights package, "
                "or retrain the model with these weights"
            )
    return backbone.eval()


def _read(path: Path) -> dict:
    if path.is_dir():
        path = path / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"no trained model at {path}; train one with `hihpq train`")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"cannot read model file {path} (damaged or not a model file): {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") not in (MODEL_FORMAT, _FORMAT_1):
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ModelFileError(f"{path} is not a hihpq model file (format {found!r}, expected {MODEL_FORMAT})")
    return payload


def _convert_format1(payload: dict, path: Path) -> dict:
    """The format-1 payload (whole config + in_dim + state_dict) as a format-2 one."""
    try:
        cfg = payload["config"]
        q, p, b = cfg["quantizer"], cfg["projector"], cfg["backbone"]
        M = int(q["bits"]) // int(math.log2(int(q["n_codewords"])))
        D = int(q["feature_dim"]) // M
        quantizer = {
            "n_subspaces": M,
            "n_codewords": int(q["n_codewords"]),
            "subspace_dim": D,
            "geometry": q["geometry"],
            "tau": float(q["tau"]),
            "curvature": float(q["curvature"]),
            "learn_curvature": bool(q["learn_curvature"]),
            "curvature_bounds": [float(q["curvature_min"]), float(q["curvature_max"])],
            "clip_r": q["clip_r"],
        }
        projector = {
            "in_dim": int(payload["in_dim"]),
            "out_dim": int(q["feature_dim"]),
            "kind": p["kind"],
            "hidden": p["hidden"] if p["kind"] == "mlp" else None,
        }
        state = payload["state_dict"]
        trained = payload.get("backbone")
        if trained:
            record = {"name": trained["name"], "resolution": int(trained["resolution"]), "stored": True}
            record["trainable"] = trained["trainable"]
        elif b.get("weights") == "default":
            record = {"name": b["name"], "resolution": int(b["resolution"]), "stored": False}
            record["trainable"] = "none"
        else:
            raise ModelFileError(
                f"{path} (format {_FORMAT_1}) was trained on a frozen backbone with weights {b.get('weights')!r}, "
                "which the file does not hold: retrain the model with this version of hihpq"
            )
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, ModelFileError):
            raise
        raise ModelFileError(f"{path} (format {_FORMAT_1}) is incomplete ({exc}); retrain the model") from exc
    log.warning("%s: model file format %s converted on load; save it again to store format %s",
                path, _FORMAT_1, MODEL_FORMAT)  # fmt: skip
    return {
        "format": MODEL_FORMAT,
        "projector": projector,
        "quantizer": quantizer,
        "backbone": record,
        "state_dict": state,
        "backbone_state": {},
        "tensors_sha256": None,  # format 1 had no checksum
        "provenance": {"config": cfg, "converted_from": _FORMAT_1},
        "extra": payload.get("extra", {}),
    }


def load_model(path: str | Path, device: str | torch.device = "cpu") -> ModelFile:
    """Read a model file (or ``RUN_DIR/model.pt``), verify its checksum and backbone weights, rebuild it.

    Raises:
        FileNotFoundError: no such file.
        ModelFileError: not a model file, damaged (checksum), or the backbone weights here differ.
    """
    path = Path(path)
    file = path / "model.pt" if path.is_dir() else path
    payload = _read(path)
    converted = None
    if payload["format"] == _FORMAT_1:
        payload, converted = _convert_format1(payload, file), _FORMAT_1
    state, backbone_state = payload["state_dict"], payload.get("backbone_state") or {}
    expected = payload.get("tensors_sha256")
    if converted is None and tensors_sha256(state, backbone_state) != expected:
        raise ModelFileError(
            f"{file} is damaged: its tensors do not match the SHA-256 stored with them; copy the file again or retrain"
        )
    record = payload.get("backbone")
    with torch.random.fork_rng(devices=[]):  # the random init is overwritten; leave the caller's stream alone
        projector = Projector(**payload["projector"])
        q = dict(payload["quantizer"])
        q["curvature_bounds"] = tuple(q["curvature_bounds"])
        quantizer = ProductQuantizer(**q)
        trained = None
        if record is not None and record.get("trainable", "none") != "none":
            from hihpq.models.backbones import build_backbone

            trained = build_backbone(record["name"], weights=None, trainable=record["trainable"])
    model = HiHPQ(projector, quantizer, backbone=trained)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelFileError(f"{file}: the stored tensors do not fit the stored architecture: {exc}") from exc
    frozen = None
    if record is not None and trained is None:
        frozen = rebuild_frozen_backbone(
            record["name"], weights_sha256=record.get("weights_sha256"), state=backbone_state or None
        )
    if record is not None:
        source = trained if trained is not None else frozen
        full = _backbone_record(source, record["resolution"], stored=bool(record["stored"]))
        record = {**full, **{k: v for k, v in record.items() if k != "weights_sha256"}}
        record["weights_sha256"] = full["weights_sha256"]
        if trained is not None:
            trained.weights_id = record["weights_id"] or trained.weights_id
    model.eval().to(device)
    if frozen is not None:
        frozen.to(device)
    return ModelFile(
        model=model,
        backbone=record,
        frozen_backbone=frozen,
        provenance=dict(payload.get("provenance") or {}),
        extra=dict(payload.get("extra") or {}),
        path=file,
        fingerprint=_fingerprint(model, record),
        converted_from=converted,
    )


def _fingerprint(model: HiHPQ, record: dict | None) -> str:
    """SHA-256 of the exact model: head (and trained backbone) tensors, plus the backbone's weights and input."""
    h = hashlib.sha256(tensors_sha256(model.state_dict()).encode())
    if record is not None:
        keys = ("name", "resolution", "mean", "std", "weights_sha256")
        h.update(repr([record[k] for k in keys]).encode())
    return h.hexdigest()
