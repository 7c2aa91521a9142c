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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from hihpq import distributed
from hihpq.hierarchy import HierarchicalClustering
from hihpq.losses import HiHPQLoss
from hihpq.models.hihpq import HiHPQ
from hihpq.neighbours import nearest_neighbours
from hihpq.runinfo import atomic_path, write_json

CHECKPOINT_VERSION = 2  # 2: optimizer groups per step scale (curvature, backbone)

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the message names the step and the last finite values."""


class ViewSource(Protocol):
    """Where training views come from. The trainer draws each step's randomness in the main process from the run's
    generator (:meth:`draw`), for the whole global batch, so a run is the same whatever the number of loader
    workers or of processes; :meth:`stream` then produces the views of a list of steps, in order."""

    n: int

    def draw(self, n: int, n_views: int, rng: np.random.Generator) -> np.ndarray: ...

    def stream(self, steps: list[list[tuple[np.ndarray, np.ndarray]]]) -> Iterator[list[torch.Tensor]]: ...

    def clean(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[torch.Tensor]: ...


class CachedViews:
    """Cached backbone features: ``views`` (N, V, F) of V augmented views, ``clean`` (N, F); float16 memmaps ok."""

    def __init__(self, views: np.ndarray, clean: np.ndarray):
        if views.ndim != 3 or clean.ndim != 2 or views.shape[0] != clean.shape[0] or views.shape[2] != clean.shape[1]:
            raise ValueError(f"views must be (N, V, F) and clean (N, F); got {views.shape} and {clean.shape}")
        if views.shape[1] < 2:
            raise ValueError(f"need at least 2 cached views per image, got {views.shape[1]}")
        self.views, self.clean_feats = views, clean
        self.n, self.n_views, self.dim = views.shape

    def draw(self, n, n_views, rng):
        """Cached view numbers (n, n_views); two views of a row always differ (offset 1..V-1 mod V)."""
        v1 = rng.integers(0, self.n_views, size=n)
        if n_views == 1:
            return v1[:, None]
        v2 = (v1 + rng.integers(1, self.n_views, size=n)) % self.n_views
        return np.stack([v1, v2], axis=1)

    def views_of(self, idx: np.ndarray, draws: np.ndarray) -> list[torch.Tensor]:
        """One (n, F) float32 tensor per column of ``draws``."""
        order = np.argsort(idx, kind="stable")  # sorted reads are kinder to memmaps
        out = []
        for k in range(draws.shape[1]):
            x = np.empty((len(idx), self.dim), np.float32)
            x[order] = self.views[idx[order], draws[order, k]]
            out.append(torch.from_numpy(x))
        return out

    def stream(self, steps):
        for step in steps:
            yield [x for idx, draws in step for x in self.views_of(idx, draws)]

    def pair(self, idx, rng):
        """Two different views of each image (``draw`` then read)."""
        x1, x2 = self.views_of(idx, self.draw(len(idx), 2, rng))
        return x1, x2

    def one(self, idx, rng):
        return self.views_of(idx, self.draw(len(idx), 1, rng))[0]

    def clean(self, batch_size, start=0, stop=None):
        stop = self.n if stop is None else stop
        for lo in range(start, stop, batch_size):
            yield torch.from_numpy(np.asarray(self.clean_feats[lo : min(lo + batch_size, stop)], dtype=np.float32))


class _AugmentedSteps(torch.utils.data.Dataset):
    """Item i: the augmented views of step i, each image's view seeded by its own drawn seed (a pure function of
    the step's request, so it does not matter which worker process computes it)."""

    def __init__(self, dataset, indices: np.ndarray, transform: Callable, steps: list):
        self.dataset, self.indices, self.transform, self.steps = dataset, indices, transform, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], list[int]]:
        views, unreadable = [], []
        for rows, seeds in self.steps[i]:
            images = []
            for row in rows:
                image, index, ok = self.dataset[int(self.indices[row])]
                images.append(image)
                if not ok:
                    unreadable.append(int(index))
            for k in range(seeds.shape[1]):
                views.append(_augment(self.transform, images, seeds[:, k]))
        return views, unreadable


class _CleanChunks(torch.utils.data.Dataset):
    """Item i: the evaluation view of rows ``chunks[i]`` (a range), stacked."""

    def __init__(self, dataset, indices: np.ndarray, transform: Callable, chunks: list[tuple[int, int]]):
        self.dataset, self.indices, self.transform, self.chunks = dataset, indices, transform, chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, list[int]]:
        out, unreadable = [], []
        for row in range(*self.chunks[i]):
            image, index, ok = self.dataset[int(self.indices[row])]
            out.append(self.transform(image))
            if not ok:
                unreadable.append(int(index))
        return torch.stack(out), unreadable


def _augment(transform: Callable, images: list, seeds: np.ndarray) -> torch.Tensor:
    out = []
    with torch.random.fork_rng(devices=[]):  # the caller's torch stream is left as it was
        for image, seed in zip(images, seeds, strict=True):
            torch.random.default_generator.manual_seed(int(seed))
            out.append(transform(image))
    return torch.stack(out)


def _loader(dataset: torch.utils.data.Dataset, num_workers: int) -> torch.utils.data.DataLoader:
    # batch_size=None: every item is already a whole batch; order is kept, whatever the number of workers. The
    # loader draws its workers' base seed from `generator`: a private one leaves the run's torch stream alone.
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_as_is,
        generator=torch.Generator().manual_seed(0),
    )


def _as_is(item):
    return item


class ImageViews:
    """Images augmented on every step, for training through the backbone (GPUs, fine-tuning).

    Views are produced by ``num_workers`` DataLoader worker processes (0: in this process), a whole step per
    worker item, a few steps ahead of the training loop. Each view's augmentation is seeded from a seed drawn
    by :meth:`draw` from the run's generator in the main process (torch's CPU generator is forked around it),
    so the views, and hence the run and its resumption from a checkpoint, are the same whatever ``num_workers``.

    Args:
        dataset: the pooled images (an :class:`~hihpq.data.folders.ImageSource`; its own transform is ignored).
        indices: dataset indices of the training images; row ``i`` of this source is ``dataset[indices[i]]``.
        train_transform: the augmentation, PIL image -> (3, H, W) normalised tensor (random, from torch's
            global generator as torchvision's transforms are). Must be picklable if workers are spawned.
        clean_transform: the deterministic evaluation transform, same output shape.
        num_workers: DataLoader worker processes decoding and augmenting images (0: in the main process).
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
        if int(num_workers) < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.train_transform, self.clean_transform = train_transform, clean_transform
        self.n = len(self.indices)
        self.num_workers = int(num_workers)
        self.clean_batch_size = max(1, int(clean_batch_size))
        self.skipped: set[int] = set()  # dataset indices of unreadable images (placeholders were used)

    @property
    def n_skipped(self) -> int:
        """Distinct unreadable training images met so far (each was replaced by the dataset's placeholder)."""
        return len(self.skipped)

    def _note_unreadable(self, indices: list[int]) -> None:
        for index in indices:
            if index not in self.skipped:
                self.skipped.add(index)
                log.warning("unreadable training image %s: using a placeholder", self.dataset.describe(index))

    def draw(self, n, n_views, rng):
        """Augmentation seeds (n, n_views), one per view of each row."""
        return rng.integers(0, np.iinfo(np.int64).max, size=(n, n_views), dtype=np.int64)

    def stream(self, steps):
        steps_ds = _AugmentedSteps(self.dataset, self.indices, self.train_transform, steps)
        for views, unreadable in _loader(steps_ds, min(self.num_workers, len(steps))):
            self._note_unreadable(unreadable)
            yield views

    def pair(self, idx, rng):
        (views,) = self.stream([[(np.asarray(idx), self.draw(len(idx), 2, rng))]])
        return views[0], views[1]

    def one(self, idx, rng):
        (views,) = self.stream([[(np.asarray(idx), self.draw(len(idx), 1, rng))]])
        return views[0]

    def clean(self, batch_size, start=0, stop=None):
        stop = self.n if stop is None else stop
        step = min(int(batch_size), self.clean_batch_size)
        chunks = [(lo, min(lo + step, stop)) for lo in range(start, stop, step)]
        for batch, unreadable in _loader(
            _CleanChunks(self.dataset, self.indices, self.clean_transform, chunks), min(self.num_workers, len(chunks))
        ):
            self._note_unreadable(unreadable)
            yield batch

    def close(self) -> None:
        """Nothing to release: worker processes live only while a stream is read."""


@dataclass
class TrainSettings:
    """Arguments of the loop itself (the ``train`` and ``hierarchy`` config sections)."""

    epochs: int = 50
    steps: int = 0  # > 0: this many optimizer steps, rounded up to whole epochs (replaces epochs)
    batch_size: int = 128
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-3
    warmup_epochs: int = 1
    min_lr: float = 1e-5
    curvature_lr_scale: float = 1.0
    backbone_lr_scale: float = 1.0
    neighbours: int = 0  # > 0: neighbour pairs (hihpq.neighbours), the second view from one of k neighbours ...
    neighbour_prob: float = 0.5  # ... with this probability
    neighbour_refresh: bool = False  # re-found in the model's embedding at every hierarchy refresh
    reseed_codewords: bool = False  # unused codewords moved onto training embeddings at every hierarchy refresh
    refit_codebooks: bool = False  # after the last epoch, k-means codebooks of the clean training embeddings
    levels: list[int] = field(default_factory=lambda: [100, 50, 25])
    n_subclusters: int | None = None
    hierarchy_warmup: int = 3
    hierarchy_interval: int = 1
    device: str = "cpu"
    amp: str = "none"  # none | bf16 | fp16: autocast of backbone + projector (see amp_dtype)
    seed: int = 2021
    progress: bool = True


def lr_at(step: int, total: int, warmup: int, base: float, minimum: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine from ``base`` down to ``minimum``."""
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return minimum + 0.5 * (base - minimum) * (1.0 + math.cos(math.pi * min(1.0, t)))


AMP_MODES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(mode: str) -> torch.dtype | None:
    """Autocast dtype of ``train.amp`` (None: full precision). The Lorentz operations of the quantizer and the
    losses run in fp32/fp64 whatever this is (they switch autocast off: see hihpq.geometry._guards)."""
    if mode not in AMP_MODES:
        raise ValueError(f"train.amp must be one of {sorted(AMP_MODES)}, got {mode!r}")
    return AMP_MODES[mode]


class _StepForward(nn.Module):
    """What a training step runs under autocast (and DDP): the embedding z and the quantizer's output."""

    def __init__(self, model: HiHPQ):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None):
        z = self.model.project(x, keep)
        if not torch.isfinite(z).all():  # reported by the trainer, which names the step
            return z, None
        return z, self.model.quantizer(z)


@dataclass
class _StepPlan:
    """A step's global batch ``idx``, its positives per level and its view requests [(rows, draws), ...]."""

    idx: np.ndarray
    positives: list[np.ndarray]
    requests: list[tuple[np.ndarray, np.ndarray]]


def _by_group(rows: torch.Tensor, n_groups: int, world_size: int) -> list[torch.Tensor]:
    """Gathered rows (rank-major: each rank's [group 0 | group 1 | ...]) regrouped as n_groups global batches,
    each in global-batch order (rank 0's slice first), as one process would have them."""
    if world_size == 1:
        return list(rows.chunk(n_groups))
    per = rows.shape[0] // (world_size * n_groups)
    grouped = rows.reshape(world_size, n_groups, per, *rows.shape[1:]).transpose(0, 1)
    return list(grouped.reshape(n_groups, world_size * per, *rows.shape[1:]).unbind(0))


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
    """Trains a :class:`HiHPQ` model with the HiHPQ objective; one call to :meth:`fit` runs (or resumes) a run.

    Under torchrun (a process group initialised by :func:`hihpq.distributed.init_from_env`), every process runs
    this same loop on its contiguous slice of the same seeded global batch: the model is wrapped in DDP, the
    quantizer outputs of all slices are gathered so that every process computes the global-batch loss, the
    hierarchy is fitted once by rank 0 on the gathered tangent features and broadcast, and only rank 0 writes.
    """

    def __init__(self, model: HiHPQ, loss: HiHPQLoss, settings: TrainSettings, out_dir: str | Path | None = None):
        self.model, self.loss, self.s = model, loss, settings
        self.out_dir = Path(out_dir) if out_dir else None
        self.device = torch.device(settings.device)
        self.model.to(self.device)
        self.optimizer = torch.optim.SGD(_param_groups(model, settings), lr=settings.lr, momentum=settings.momentum)
        self.epoch = 0
        self.step = 0
        self.hierarchy: Hierarchy | None = None
        self.neighbours: np.ndarray | None = None  # (N, k) nearest training images (once, or per refresh)
        self.codebooks_refit = False  # train.refit_codebooks done (a resumed finished run does not redo it)
        self.rng = np.random.default_rng(settings.seed)
        self.history: list[dict] = []
        self.dist = distributed.context()
        self._amp_dtype = amp_dtype(settings.amp)
        # fp16 gradients underflow without loss scaling; bf16 has fp32's range and needs none
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self._amp_dtype is torch.float16)
        self._forward = self._wrap_forward()

    def _wrap_forward(self) -> nn.Module:
        """The module each training step calls: backbone + projector + quantizer, DDP-wrapped across processes."""
        step = _StepForward(self.model)
        if not self.dist.distributed:
            return step
        if self.device.type == "cuda":  # exact global-batch statistics; torch's SyncBatchNorm is GPU-only
            nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(step, device_ids=ids)

    @property
    def writes(self) -> bool:
        """This process writes checkpoints and logs (rank 0 of a distributed run, or the only process)."""
        return self.out_dir is not None and self.dist.is_main

    # ----------------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {
            "version": CHECKPOINT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch,
            "step": self.step,
            "rng": _rng_state(self.rng),
            "torch_rng": torch.get_rng_state(),
            # dropout in a trainable backbone draws from the CUDA generator on GPU: resume must restore it too
            "cuda_rng": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
            "hierarchy": self.hierarchy.state() if self.hierarchy else None,
            # found with the backbone as training started: a trainable one has moved since
            "neighbours": torch.from_numpy(self.neighbours) if self.neighbours is not None else None,
            "codebooks_refit": self.codebooks_refit,
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
        if state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.rng = _rng_from_state(state["rng"])
        torch.set_rng_state(state["torch_rng"].cpu())  # map_location may have moved it to the GPU
        if state.get("cuda_rng") is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"].cpu(), self.device)
        self.hierarchy = Hierarchy.from_state(state["hierarchy"]) if state["hierarchy"] else None
        nbrs = state.get("neighbours")  # absent from checkpoints written before neighbour pairs
        self.neighbours = nbrs.cpu().numpy() if nbrs is not None else None
        self.codebooks_refit = bool(state.get("codebooks_refit", False))
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
    def steps_per_epoch(self, n_train: int) -> int:
        """Full batches of n_train images (the last partial one is dropped), at least one."""
        return max(1, n_train // self.s.batch_size)

    def n_epochs(self, n_train: int) -> int:
        """Epochs of a run on n_train images: ``epochs``, or with ``steps`` the fewest whole epochs that hold that
        many steps."""
        if not self.s.steps:
            return self.s.epochs
        return math.ceil(self.s.steps / self.steps_per_epoch(n_train))

    def fit(self, source: ViewSource, *, resume: bool = False) -> list[dict]:
        """Train for :meth:`n_epochs` epochs (continuing from the checkpoint in out_dir when ``resume``)."""
        ckpt = self.out_dir / "checkpoint.pt" if self.out_dir else None
        if resume:
            if ckpt is None or not ckpt.exists():
                raise FileNotFoundError(f"--resume given but no checkpoint at {ckpt}")
            self.load_checkpoint(ckpt)  # every rank reads the same file: identical state, any number of ranks
        if source.n < 2:  # e.g. every training image unreadable: say so rather than fail on an empty batch
            raise ValueError(
                f"the training set holds {source.n} usable image(s); at least 2 are needed "
                "(unreadable images are left out: check the data folder)"
            )
        if self.s.levels and (self.loss.lambda1 > 0 or self.loss.lambda2 > 0) and max(self.s.levels) > source.n:
            raise ValueError(
                f"hierarchy.levels {list(self.s.levels)} asks for more clusters than the {source.n} training "
                "images; lower hierarchy.levels"
            )
        if self.s.neighbours >= source.n:
            raise ValueError(
                f"train.neighbours={self.s.neighbours} asks for more neighbours than the {source.n} training images "
                "hold (each has n - 1 others); lower train.neighbours"
            )
        K = self.model.quantizer.n_codewords
        refit = self.s.refit_codebooks and not self.codebooks_refit
        if refit and source.n < K:  # a small photo folder under a default config: said once, before training
            log.warning(
                "train.refit_codebooks skipped: k-means of %d codewords per subspace needs at least %d training "
                "images, there are %d; the trained codebooks are kept",
                K,
                K,
                source.n,
            )
            refit = False
        batch = min(self.s.batch_size, source.n)
        if batch % self.dist.world_size:
            raise ValueError(
                f"the global batch ({batch} = train.batch_size, or the training set if smaller) must be divisible "
                f"by the number of processes ({self.dist.world_size}); change train.batch_size or --nproc-per-node"
            )
        n_batches = self.steps_per_epoch(source.n)
        epochs = self.n_epochs(source.n)
        total_steps = epochs * n_batches
        if self.s.neighbours and self.neighbours is None:
            self.neighbours = self._find_neighbours(source)
        while self.epoch < epochs:
            t0 = time.perf_counter()
            if self.model.quantizer.init_from_data and self.epoch == self.s.hierarchy_warmup:
                self._init_codebooks(source)
            hier_s = self._refresh_hierarchy(source)
            sums: dict[str, float] = {}
            perm = self.rng.permutation(source.n)
            # The epoch's randomness is drawn here, in the order one step at a time would draw it, so the views
            # can be made ahead by worker processes and the run does not depend on how many there are.
            plans = [self._plan_step(source, perm[b * self.s.batch_size : (b + 1) * self.s.batch_size])
                     for b in range(n_batches)]  # fmt: skip
            views = source.stream([self._local(plan.requests) for plan in plans])
            self.model.train()
            bar = tqdm(
                zip(plans, views, strict=True),
                total=n_batches,
                desc=f"epoch {self.epoch + 1}/{epochs}",
                disable=not (self.s.progress and self.dist.is_main),
                leave=False,
            )
            for plan, xs in bar:
                lr = lr_at(self.step, total_steps, self.s.warmup_epochs * n_batches, self.s.lr, self.s.min_lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                parts = self._train_step(plan, xs)
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
            if self.writes:
                self._write_logs()
                self.save_checkpoint(ckpt)
            distributed.barrier()  # no rank runs ahead of the checkpoint it would resume from
        if refit:
            t0 = time.perf_counter()
            self._refit_codebooks(source)
            self.codebooks_refit = True
            if self.history:
                self.history[-1]["refit_s"] = time.perf_counter() - t0
            if self.writes:
                self._write_logs()
                self.save_checkpoint(ckpt)
            distributed.barrier()
        return self.history

    def _init_codebooks(self, source: ViewSource) -> None:
        """k-means codebooks from two views of every training image (quantizer.init_from_data), momentum reset.

        Every rank embeds its shard of the views (the draws are the same on every rank); rank 0 fits, all copy."""
        q = self.model.quantizer
        self.model.eval()
        distributed.broadcast_buffers(self.model)  # every rank embeds with rank 0's BatchNorm statistics
        draws = source.draw(source.n, 2, self.rng)
        lo, hi = distributed.shard_bounds(source.n, self.dist.world_size, self.dist.rank)
        steps = [[(rows, draws[rows])] for rows in np.array_split(np.arange(lo, hi), max(1, (hi - lo) // 1024))]
        with torch.no_grad():  # (rows, 2 views, M*D): rows in training-set order whatever the number of ranks
            z = [torch.stack([self.model.project(x.to(self.device)).float().cpu() for x in xs], 1)
                 for xs in source.stream(steps)]  # fmt: skip
        self._fit_codebooks(distributed.gather_arrays(torch.cat(z).numpy()).reshape(2 * source.n, -1))
        self.optimizer.state.pop(q.codebook_tangent, None)

    def _fit_codebooks(self, Z: np.ndarray) -> None:
        """k-means codebooks of the gathered embeddings ``Z`` (rows ahead of the quantizer): rank 0 fits (seeded),
        every rank copies."""
        q = self.model.quantizer
        books = None
        if self.dist.is_main:
            gen = torch.Generator().manual_seed(self.s.seed)
            q.init_codebooks_from_data(torch.from_numpy(Z).to(q.codebook_tangent.device), generator=gen)
            books = q.codebook_tangent.detach().cpu()
        with torch.no_grad():
            q.codebook_tangent.copy_(distributed.broadcast_object(books))

    def _refit_codebooks(self, source: ViewSource) -> None:
        """train.refit_codebooks: k-means codebooks of the trained model's embeddings of the clean training images.

        The codewords were trained as soft-assignment anchors of the contrastive loss; after training the codes
        only need to approximate the embeddings well (the continuous embeddings rank better than their codes).
        Every rank embeds its shard; rank 0 fits (seeded), all copy."""
        self._fit_codebooks(self._embed_clean(source, self.model.project))

    def _reseed_codewords(self, X: np.ndarray) -> None:
        """Codewords no training image uses moved onto random training embeddings ``X`` (the gathered tangent
        vectors), their momentum cleared; rank 0 chooses, every rank copies its codebooks."""
        q = self.model.quantizer
        books = None
        if self.dist.is_main:
            gen = torch.Generator().manual_seed(self.s.seed + self.epoch)
            moved = q.reseed_dead_codewords(torch.from_numpy(X).to(q.codebook_tangent.device), generator=gen)
            books = (q.codebook_tangent.detach().cpu(), moved)
        tangent, moved = distributed.broadcast_object(books)
        with torch.no_grad():
            q.codebook_tangent.copy_(tangent)
        buf = self.optimizer.state.get(q.codebook_tangent, {}).get("momentum_buffer")
        if buf is not None:
            buf[moved.to(buf.device)] = 0

    def _find_neighbours(self, source: ViewSource) -> np.ndarray:
        """The k nearest training images of every training image by cosine similarity of the backbone features
        (the cached ones, or a trainable backbone's before training); every rank embeds its shard, all get rank 0's."""
        backbone = self.model.backbone
        return self._neighbours_of(self._embed_clean(source, lambda x: backbone(x) if backbone is not None else x))

    def _neighbours_of(self, X: np.ndarray) -> np.ndarray:
        """Rank 0's k-NN table of the gathered embeddings ``X``, the same on every rank."""
        found = nearest_neighbours(X, self.s.neighbours) if self.dist.is_main else None
        return distributed.broadcast_object(found)

    def _embed_clean(self, source: ViewSource, embed: Callable[[torch.Tensor], torch.Tensor]) -> np.ndarray:
        """``embed`` of every clean training image (N, ...) flattened, in training-set order on every rank: each
        rank embeds its shard in eval mode with rank 0's BatchNorm statistics, then all shards are gathered."""
        self.model.eval()
        distributed.broadcast_buffers(self.model)
        lo, hi = distributed.shard_bounds(source.n, self.dist.world_size, self.dist.rank)
        with torch.inference_mode():
            feats = [embed(x.to(self.device)).flatten(1).float().cpu() for x in source.clean(1024, lo, hi)]
        return distributed.gather_arrays(torch.cat(feats).numpy())

    def _plan_step(self, source: ViewSource, idx: np.ndarray) -> _StepPlan:
        """The step's global batch and all its random draws: two views of ``idx`` (with neighbour pairs the second
        may be of a neighbour), then one view of a positive per hierarchy level (the same draws, in the same order,
        on every rank)."""
        draws = source.draw(len(idx), 2, self.rng)
        if self.neighbours is None:
            requests = [(idx, draws)]
        else:  # the anchor's first view, and the second of a random one of its k neighbours, or its own
            other = self.neighbours[idx, self.rng.integers(0, self.neighbours.shape[1], len(idx))]
            other = np.where(self.rng.random(len(idx)) < self.s.neighbour_prob, other, idx)
            requests = [(idx, draws[:, :1]), (other, draws[:, 1:])]
        positives: list[np.ndarray] = []
        if self.hierarchy is not None and self.loss.lambda2 > 0:
            positives = self.hierarchy.positives(idx, self.rng)
            requests += [(p, source.draw(len(p), 1, self.rng)) for p in positives]
        return _StepPlan(idx, positives, requests)

    def _local(self, requests: list) -> list:
        """This rank's contiguous slice of every request of a step (everything for a single process)."""
        if not self.dist.distributed:
            return requests
        lo, hi = distributed.shard_bounds(len(requests[0][0]), self.dist.world_size, self.dist.rank)
        return [(rows[lo:hi], draws[lo:hi]) for rows, draws in requests]

    def _refresh_hierarchy(self, source: ViewSource) -> float:
        """From the warm-up on, every ``hierarchy_interval`` epochs: the hierarchy clustered again in the model's
        embedding and, with ``neighbour_refresh``, the neighbour pairs found again in it. Returns the seconds taken."""
        s = self.s
        if self.epoch < s.hierarchy_warmup or (self.epoch - s.hierarchy_warmup) % s.hierarchy_interval:
            return 0.0
        cluster = bool(s.levels) and (self.loss.lambda1 > 0 or self.loss.lambda2 > 0)
        renew = s.neighbours > 0 and s.neighbour_refresh
        if not (cluster or renew or s.reseed_codewords):
            return 0.0
        t0 = time.perf_counter()
        X = self._embed_clean(source, self.model.tangent)
        if renew:
            self.neighbours = self._neighbours_of(X)
        if s.reseed_codewords:
            self._reseed_codewords(X)
        if not cluster:
            return time.perf_counter() - t0
        fitted = None
        if self.dist.is_main:  # fitted once; every rank then uses the very same prototypes and assignments
            hc = HierarchicalClustering(levels=tuple(s.levels), n_subclusters=s.n_subclusters, seed=s.seed + self.epoch)
            hc.fit(X)
            fitted = (hc.labels_, hc.prototypes_)
        labels, prototypes = distributed.broadcast_object(fitted)
        self.hierarchy = Hierarchy(labels, prototypes)
        return time.perf_counter() - t0

    def _train_step(self, plan: _StepPlan, xs: list[torch.Tensor]) -> dict[str, float]:
        q = self.model.quantizer
        idx, pos_idx = plan.idx, plan.positives
        x = torch.cat(xs).to(self.device, non_blocking=True)
        finite = torch.isfinite(x).flatten(1).all(1)
        if not distributed.all_true(finite.all()):
            # image of each row of x: every request's rows once per view drawn
            rows = np.concatenate([r for r, d in self._local(plan.requests) for _ in range(d.shape[1])])
            bad = np.unique(rows[~finite.cpu().numpy()])
            raise ValueError(
                f"non-finite input features for training images {bad[:5].tolist()} "
                f"(epoch {self.epoch + 1}, step {self.step}); check the images or the feature cache"
            )
        n_groups = 2 + len(pos_idx)  # x1, x2, one positive per level
        keep = self._dropout_keep(n_groups, len(idx))
        with torch.autocast(self.device.type, dtype=self._amp_dtype, enabled=self._amp_dtype is not None):
            z, out = self._forward(x, keep)
        if not distributed.all_true(torch.isfinite(z).all()):
            self._diverged("the embeddings", {})
        qs = _by_group(distributed.gather_rows(out.h_soft.float()), n_groups, self.dist.world_size)  # fp32
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
            tangents=self._first_view_tangents(out.tangent, n_groups) if self.loss.decorrelation > 0 else None,
        )
        if not torch.isfinite(total):  # the same global loss on every rank: all raise together
            self._diverged(f"the loss ({total.item()})", parts)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        q.clamp_curvature_()  # the authors' clamped curvature back into bounds (no-op for the default)
        with torch.no_grad():
            h = out.h[: len(x) // n_groups].float()
            qerr = q.quantization_error(distributed.gather_rows(h))
        return {
            "loss": float(total.detach()),
            **{k: float(v) for k, v in parts.items()},
            "quant_error": float(qerr),
        }

    def _first_view_tangents(self, tangent: torch.Tensor, n_groups: int) -> torch.Tensor:
        """The first view's tangent vectors (B, M, D) of the whole global batch (the decorrelation penalty's
        batch statistics are those one process would compute)."""
        return _by_group(distributed.gather_rows(tangent.float()), n_groups, self.dist.world_size)[0]

    def _dropout_keep(self, n_groups: int, batch: int) -> torch.Tensor | None:
        """The projector's dropout mask for this rank's rows, cut from one mask of the whole global batch: every
        rank draws that mask from the same generator state, so N processes drop the features one process would."""
        full = self.model.projector.draw_keep(n_groups * batch, device=self.device)
        if full is None or not self.dist.distributed:
            return full
        lo, hi = distributed.shard_bounds(batch, self.dist.world_size, self.dist.rank)
        return full.view(n_groups, batch, -1)[:, lo:hi].reshape(-1, full.shape[1])  # rows are group-major

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
