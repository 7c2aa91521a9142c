"""The training loop: epochs, hierarchy refresh, learning-rate schedule, logging, atomic checkpoints, resume.

The loop is written against a *view source*: anything that can hand out two different augmented views of a batch
of training images, one random view of any image (instance-wise positives), and the clean view of every image (for
the hierarchy). :class:`CachedViews` serves cached frozen-backbone features; :class:`ImageViews` augments images
through the backbone on every step (GPUs, fine-tuning).
"""

from __future__ import annotations

import csv
import logging
import math
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from hihpq.hierarchy import HierarchicalClustering
from hihpq.losses import HiHPQLoss
from hihpq.models.hihpq import HiHPQ
from hihpq.runinfo import atomic_path, write_json

CHECKPOINT_VERSION = 2  # 2: optimizer groups per step scale (curvature, backbone)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the step and the last finite values."""


class ViewSource(Protocol):
    n: int

    def pair(self, idx: np.ndarray, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...

    def one(self, idx: np.ndarray, rng: np.random.Generator) -> torch.Tensor: ...

    def clean(self, batch_size: int) -> Iterator[torch.Tensor]: ...


class CachedViews:
    """Cached backbone features: ``views`` (N, V, F) of V augmented views, ``clean`` (N, F); float16 memmaps ok."""

    def __init__(self, views: np.ndarray, clean: np.ndarray):
        if views.ndim != 3 or clean.ndim != 2 or views.shape[0] != clean.shape[0] or views.shape[2] != clean.shape[1]:
            raise ValueError(f"views must be (N, V, F) and clean (N, F); got {views.shape} and {clean.shape}")
        if views.shape[1] < 2:
            raise ValueError(f"need at least 2 cached views per image, got {views.shape[1]}")
        self.views, self.clean_feats = views, clean
        self.n, self.n_views, self.dim = views.shape

    def pair(self, idx, rng):
        # Two different views of each image: the second is offset from the first by 1..V-1 (mod V).
        v1 = rng.integers(0, self.n_views, size=len(idx))
        v2 = (v1 + rng.integers(1, self.n_views, size=len(idx))) % self.n_views
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to memmaps
        x1 = np.empty((len(idx), self.dim), np.float32)
        x2 = np.empty((len(idx), self.dim), np.float32)
        x1[order] = self.views[idx[order], v1[order]]
        x2[order] = self.views[idx[order], v2[order]]
        return torch.from_numpy(x1), torch.from_numpy(x2)

    def one(self, idx, rng):
        v = rng.integers(0, self.n_views, size=len(idx))
        return torch.from_numpy(np.asarray(self.views[idx, v], dtype=np.float32))

    def clean(self, batch_size):
        for start in range(0, self.n, batch_size):
            yield torch.from_numpy(np.asarray(self.clean_feats[start : start + batch_size], dtype=np.float32))


class ImageViews:
    """Images augmented on every step, for training through the backbone (GPUs, fine-tuning).

    ``pair`` gives two independently augmented views of each image, ``one`` one augmented view, ``clean``
    the evaluation view of every training image in order. Each view's augmentation is seeded from a draw of
    the ``rng`` passed in (torch's CPU generator is forked, so the caller's torch stream is untouched), which
    makes a run, and its resumption from a checkpoint, reproducible.

    Args:
        dataset: the pooled images (an :class:`~hihpq.data.folders.ImageSource`; its own transform is ignored).
        indices: dataset indices of the training images; row ``i`` of this source is ``dataset[indices[i]]``.
        train_transform: the augmentation, PIL image -> (3, H, W) normalised tensor (random, from torch's
            global generator as torchvision's transforms are).
        clean_transform: the deterministic evaluation transform, same output shape.
        num_workers: threads decoding images (augmentation itself runs in this thread, in order, so that the
            seeding is exact); 0 or 1 decodes sequentially.
        clean_batch_size: cap on the images per batch of :meth:`clean` (the hierarchy refresh asks for large
            batches, which are fine for features but not for images through a large backbone).
    """

    def __init__(
        self,
        dataset,
        indices: np.ndarray,
        train_transform: Callable,
        clean_transform: Callable,
        *,
        num_workers: int = 4,
        clean_batch_size: int = 256,
    ):
        self.dataset = dataset.with_transform(None)
        self.indices = np.asarray(indices, dtype=np.int64)
        if self.indices.ndim != 1 or not len(self.indices):
            raise ValueError(f"indices must be a non-empty 1-d array, got shape {self.indices.shape}")
        self.train_transform, self.clean_transform = train_transform, clean_transform
        self.n = len(self.indices)
        self.num_workers = int(num_workers)
        self.clean_batch_size = max(1, int(clean_batch_size))
        self.skipped: set[int] = set()  # dataset indices of unreadable images (placeholders were used)
        self._pool = ThreadPoolExecutor(self.num_workers) if self.num_workers > 1 else None

    @property
    def n_skipped(self) -> int:
        """Distinct unreadable training images met so far (each was replaced by the dataset's placeholder)."""
        return len(self.skipped)

    def _load(self, rows: np.ndarray) -> list:
        items = [int(i) for i in self.indices[np.asarray(rows, dtype=np.int64)]]
        load = self._pool.map if self._pool is not None else map
        loaded = list(load(self.dataset.__getitem__, items))
        images = []
        for image, index, ok in loaded:
            if not ok and index not in self.skipped:
                self.skipped.add(index)
                log.warning("unreadable training image %s: using a placeholder", self.dataset.describe(index))
            images.append(image)
        return images

    def _augment(self, images: list, seeds: np.ndarray) -> torch.Tensor:
        out = []
        with torch.random.fork_rng(devices=[]):
            for image, seed in zip(images, seeds, strict=True):
                torch.random.default_generator.manual_seed(int(seed))
                out.append(self.train_transform(image))
        return torch.stack(out)

    @staticmethod
    def _seeds(rng: np.random.Generator, shape) -> np.ndarray:
        return rng.integers(0, np.iinfo(np.int64).max, size=shape, dtype=np.int64)

    def pair(self, idx, rng):
        seeds = self._seeds(rng, (len(idx), 2))
        images = self._load(idx)
        return self._augment(images, seeds[:, 0]), self._augment(images, seeds[:, 1])

    def one(self, idx, rng):
        seeds = self._seeds(rng, len(idx))
        return self._augment(self._load(idx), seeds)

    def clean(self, batch_size):
        step = min(int(batch_size), self.clean_batch_size)
        for start in range(0, self.n, step):
            rows = np.arange(start, min(start + step, self.n))
            yield torch.stack([self.clean_transform(image) for image in self._load(rows)])

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


@dataclass
class TrainSettings:
    """Arguments of the loop itself (the ``train`` and ``hierarchy`` config sections)."""

    epochs: int = 50
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-3
    warmup_epochs: int = 1
    min_lr: float = 1e-5
    curvature_lr_scale: float = 1.0
    backbone_lr_scale: float = 1.0
    levels: list[int] = field(default_factory=lambda: [100, 50, 25])
    n_subclusters: int | None = None
    hierarchy_warmup: int = 3
    hierarchy_interval: int = 1
    device: str = "cpu"
    amp: bool = False
    seed: int = 2021
    progress: bool = True


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` down to ``minimum``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return minimum + 0.5 * (base - minimum) * (1.0 + math.cos(math.pi * min(1.0, t)))


class Hierarchy:
    """The hierarchy of one epoch: per level the labels of every training image and the tangent prototypes."""

    def __init__(self, labels: list[np.ndarray], prototypes: list[np.ndarray]):
        self.labels = [np.asarray(a, np.int64) for a in labels]
        self.prototypes = [torch.as_tensor(np.asarray(p, np.float32)) for p in prototypes]
        # Members of each cluster, contiguous after sorting by cluster, to draw same-prototype positives in O(1).
        self._order = [np.argsort(a, kind="stable") for a in self.labels]
        self._rank = [np.argsort(o, kind="stable") for o in self._order]  # position of each image in _order
        self._starts = [
            np.searchsorted(a[o], np.arange(len(p) + 1))
            for a, o, p in zip(self.labels, self._order, self.prototypes, strict=True)
        ]

    def positives(self, idx: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
        """Per level, a uniformly random *other* image of the same cluster (itself only if it is alone)."""
        out = []
        for labels, order, rank, starts in zip(self.labels, self._order, self._rank, self._starts, strict=True):
            lo, hi = starts[labels[idx]], starts[labels[idx] + 1]
            own = rank[idx] - lo
            r = (rng.random(len(idx)) * np.maximum(hi - lo - 1, 1)).astype(np.int64)
            r = np.where((r >= own) & (hi - lo > 1), r + 1, r)  # skip the anchor's own slot
            out.append(order[lo + r])
        return out

    def state(self) -> dict:
        return {"labels": [torch.from_numpy(a) for a in self.labels], "prototypes": list(self.prototypes)}

    @classmethod
    def from_state(cls, state: dict) -> Hierarchy:
        return cls([t.numpy() for t in state["labels"]], [t.numpy() for t in state["prototypes"]])


class Trainer:
    """Trains a :class:`HiHPQ` model with the HiHPQ objective; one call to :meth:`fit` runs (or resumes) a run."""

    def __init__(self, model: HiHPQ, loss: HiHPQLoss, settings: TrainSettings, out_dir: str | Path | None = None):
        self.model, self.loss, self.s = model, loss, settings
        self.out_dir = Path(out_dir) if out_dir else None
        self.device = torch.device(settings.device)
        self.model.to(self.device)
        self.optimizer = torch.optim.SGD(_param_groups(model, settings), lr=settings.lr, momentum=settings.momentum)
        self.epoch = 0
        self.step = 0
        self.hierarchy: Hierarchy | None = None
        self.rng = np.random.default_rng(settings.seed)
        self.history: list[dict] = []

    # ----------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": _rng_state(self.rng),
            "torch_rng": torch.get_rng_state(),
            # dropout in a trainable backbone draws from the CUDA generator on GPU: resume must restore it too
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "hierarchy": self.hierarchy.state() if self.hierarchy else None,
            "history": self.history,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(
                f"checkpoint version {state.get('version')} is not {CHECKPOINT_VERSION} (written by another hihpq "
                "version); resume it with that version or start the run again"
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.rng = _rng_from_state(state["rng"])
        torch.set_rng_state(state["torch_rng"].cpu())  # map_location may have moved it to the GPU
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.hierarchy = Hierarchy.from_state(state["hierarchy"]) if state["hierarchy"] else None
        self.history = list(state["history"])

    def save_checkpoint(self, path: str | Path) -> None:
        """Write the full training state atomically: an interrupted run loses at most the current epoch."""
        with atomic_path(path) as tmp:
            torch.save(self.state_dict(), tmp)

    def load_checkpoint(self, path: str | Path) -> None:
        try:
            state = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # torch raises many types for a damaged file
            raise ValueError(f"cannot read checkpoint {path}: {exc}") from exc
        self.load_state_dict(state)

    # ------------------------------------------------------------------------------------------------- training
    def fit(self, source: ViewSource, *, resume: bool = False) -> list[dict]:
        """Train for ``settings.epochs`` epochs (continuing from the checkpoint in out_dir when ``resume``)."""
        ckpt = self.out_dir / "checkpoint.pt" if self.out_dir else None
        if resume:
            if ckpt is None or not ckpt.exists():
                raise FileNotFoundError(f"--resume given but no checkpoint at {ckpt}")
            self.load_checkpoint(ckpt)
        n_batches = max(1, source.n // self.s.batch_size)
        total_steps = self.s.epochs * n_batches
        while self.epoch < self.s.epochs:
            t0 = time.perf_counter()
            if self.model.quantizer.init_from_data and self.epoch == self.s.hierarchy_warmup:
                self._init_codebooks(source)
            hier_s = self._refresh_hierarchy(source)
            sums: dict[str, float] = {}
            perm = self.rng.permutation(source.n)
            self.model.train()
            bar = tqdm(
                range(n_batches),
                desc=f"epoch {self.epoch + 1}/{self.s.epochs}",
                disable=not self.s.progress,
                leave=False,
            )
            for b in bar:
                idx = perm[b * self.s.batch_size : (b + 1) * self.s.batch_size]
                lr = lr_at(self.step, total_steps, self.s.warmup_epochs * n_batches, self.s.lr, self.s.min_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                parts = self._train_step(source, idx)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
                bar.set_postfix(loss=f"{parts['loss']:.3f}")
                self.step += 1
            record = {k: v / n_batches for k, v in sums.items()}
            record.update(
                epoch=self.epoch + 1,
                lr=lr,
                hierarchy=self.hierarchy is not None,
                hierarchy_s=hier_s,
                epoch_s=time.perf_counter() - t0,
                curvature=[float(c) for c in self.model.quantizer.curvature.detach().cpu()],
            )
            self.history.append(record)
            self.epoch += 1
            if self.out_dir:
                self._write_logs()
                self.save_checkpoint(ckpt)
        return self.history

    def _init_codebooks(self, source: ViewSource) -> None:
        """k-means codebooks from two views of every training image (quantizer.init_from_data), momentum reset."""
        q = self.model.quantizer
        self.model.eval()
        with torch.no_grad():
            chunks = [np.arange(s, min(s + 1024, source.n)) for s in range(0, source.n, 1024)]
            z = [self.model.project(x.to(self.device)).float() for i in chunks for x in source.pair(i, self.rng)]
        q.init_codebooks_from_data(torch.cat(z), generator=torch.Generator().manual_seed(self.s.seed))
        self.optimizer.state.pop(q.codebook_tangent, None)

    def _refresh_hierarchy(self, source: ViewSource) -> float:
        s = self.s
        lam = self.loss.lambda1 > 0 or self.loss.lambda2 > 0
        if not lam or not s.levels or self.epoch < s.hierarchy_warmup:
            return 0.0
        if (self.epoch - s.hierarchy_warmup) % s.hierarchy_interval:
            return 0.0
        t0 = time.perf_counter()
        self.model.eval()
        with torch.inference_mode():
            feats = [self.model.tangent(x.to(self.device)).flatten(1).float().cpu() for x in source.clean(1024)]
        X = torch.cat(feats).numpy()
        hc = HierarchicalClustering(levels=tuple(s.levels), n_subclusters=s.n_subclusters, seed=s.seed + self.epoch)
        hc.fit(X)
        self.hierarchy = Hierarchy(hc.labels_, hc.prototypes_)
        return time.perf_counter() - t0

    def _train_step(self, source: ViewSource, idx: np.ndarray) -> dict[str, float]:
        q = self.model.quantizer
        x1, x2 = source.pair(idx, self.rng)
        inputs = [x1, x2]
        pos_idx: list[np.ndarray] = []
        if self.hierarchy is not None and self.loss.lambda2 > 0:
            pos_idx = self.hierarchy.positives(idx, self.rng)
            inputs += [source.one(p, self.rng) for p in pos_idx]
        x = torch.cat(inputs).to(self.device, non_blocking=True)
        B = len(idx)
        if not torch.isfinite(x).all():
            rows = np.concatenate([idx, idx, *pos_idx])  # image of each row of x
            bad = np.unique(rows[~torch.isfinite(x).flatten(1).all(1).cpu().numpy()])
            raise ValueError(
                f"non-finite input features for training images {bad[:5].tolist()} "
                f"(epoch {self.epoch + 1}, step {self.step}); check the images or the feature cache"
            )
        with torch.autocast(device_type=self.device.type, enabled=self.s.amp):
            z = self.model.project(x)
            if not torch.isfinite(z).all():
                self._diverged("the embeddings", {})
            out = self.model.quantizer(z)
        qs = out.h_soft.float().split(B)
        prototypes = assignments = None
        if self.hierarchy is not None and self.loss.lambda1 > 0:
            # Eq. 17 with the current curvature (so gradients reach it), clipped like the embeddings.
            prototypes = [q.embed(p.to(self.device)) for p in self.hierarchy.prototypes]
            assignments = [torch.from_numpy(a[idx]).to(self.device) for a in self.hierarchy.labels]
        total, parts = self.loss(
            qs[0],
            qs[1],
            distance=q.pairwise_distance,
            prototypes=prototypes,
            assignments=assignments,
            positives=list(qs[2:]) if pos_idx else None,
        )
        if not torch.isfinite(total):
            self._diverged(f"the loss ({total.item()})", parts)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        q.clamp_curvature_()  # the authors' clamped curvature back into bounds (no-op for the default)
        with torch.no_grad():
            qerr = q.quantization_error(out.h[:B].float())
        return {
            "loss": float(total.detach()),
            **{k: float(v) for k, v in parts.items()},
            "quant_error": float(qerr),
        }

    def _diverged(self, what: str, parts: dict) -> None:
        last = {k: v for k, v in self.history[-1].items() if k != "curvature"} if self.history else "none yet"
        raise TrainingDiverged(
            f"{what} became non-finite at epoch {self.epoch + 1}, step {self.step} "
            f"(loss parts: { {k: float(v) for k, v in parts.items()} }); last finite epoch means: {last}. "
            "Lower train.lr (or train.warmup_epochs up) and resume from the last checkpoint."
        )

    def _write_logs(self) -> None:
        write_json(self.out_dir / "log.json", self.history)
        keys = sorted({k for r in self.history for k in r if k != "curvature"})
        with atomic_path(self.out_dir / "log.csv") as tmp, open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow([*keys, "curvature"])
            for r in self.history:
                w.writerow([r.get(k, "") for k in keys] + [" ".join(f"{c:.4f}" for c in r["curvature"])])


def _param_groups(model: HiHPQ, s: TrainSettings) -> list[dict]:
    """SGD groups: decayed weights, undecayed quantizer parameters, the curvature and a trainable backbone, the last
    two with their own step scale (``lr_scale``, applied by the schedule); empty groups are left out."""
    q = model.quantizer
    no_decay = {id(p) for p in q.no_weight_decay_parameters()}
    backbone = {id(p) for p in model.backbone.parameters()} if model.backbone is not None else set()
    groups = {
        "weights": {"params": [], "weight_decay": s.weight_decay},
        "no_decay": {"params": [], "weight_decay": 0.0},
        # decayed only when the quantizer asks for it (the authors' clamped parameterisation)
        "curvature": {
            "params": [],
            "weight_decay": 0.0 if id(q.curvature_raw) in no_decay else s.weight_decay,
            "lr_scale": s.curvature_lr_scale,
        },
        "backbone": {"params": [], "weight_decay": s.weight_decay, "lr_scale": s.backbone_lr_scale},
    }
    for p in model.parameters():
        if p.requires_grad:
            kind = (
                "curvature" if p is q.curvature_raw
                else "backbone" if id(p) in backbone
                else "no_decay" if id(p) in no_decay
                else "weights"
            )  # fmt: skip
            groups[kind]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def _rng_state(rng: np.random.Generator) -> dict:
    st = rng.bit_generator.state
    return {
        "bit_generator": st["bit_generator"],
        "state": {k: int(v) for k, v in st["state"].items()},
        "has_uint32": int(st["has_uint32"]),
        "uinteger": int(st["uinteger"]),
    }


def _rng_from_state(state: dict) -> np.random.Generator:
    rng = np.random.default_rng()
    rng.bit_generator.state = state
    return rng
