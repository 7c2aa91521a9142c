"""Several processes, one run: the process group torchrun describes, and the few collectives training needs.

``torchrun --nproc-per-node N -m hihpq train ...`` starts N copies of the command with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init_from_env` joins them (NCCL on GPUs, gloo on
CPUs) at the entry point. Below it, code asks :func:`context` who it is; without torchrun everything here is a
no-op for one process, so the single-process path has no branch of its own.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

__all__ = [
    "Context",
    "all_true",
    "barrier",
    "broadcast_buffers",
    "broadcast_object",
    "context",
    "gather_arrays",
    "gather_rows",
    "init_from_env",
    "main_first",
    "shard_bounds",
    "shutdown",
]


@dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world_size`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes checkpoints, logs, the model and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (set by torchrun)") from None


def init_from_env(device: str) -> tuple[Context, str]:
    """Join the process group torchrun set up (no-op without torchrun); returns (context, this process's device).

    Each process of a GPU run gets its own GPU, ``cuda:LOCAL_RANK`` (whatever index ``device`` named), and NCCL;
    CPU runs use gloo.
    """
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return Context(), device
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    cuda = device.startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise ValueError(f"train.device={device} but this machine has no usable CUDA GPU; use --device cpu")
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"LOCAL_RANK {local} but only {torch.cuda.device_count()} GPU(s) here: "
                "--nproc-per-node must not exceed the GPUs of a machine"
            )
        device = f"cuda:{local}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        kw = {"device_id": torch.device(device)} if cuda else {}
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, **kw)
    return Context(rank, world, local), device


def context() -> Context:
    """Who this process is (one process of one when no process group is initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if context().distributed:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. fills a cache), the others after it, reading what it wrote."""
    ctx = context()
    if ctx.distributed and not ctx.is_main:
        dist.barrier()
    yield
    if ctx.distributed and ctx.is_main:
        dist.barrier()


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """Rows [lo, hi) of rank ``rank`` when n rows are cut into ``world_size`` contiguous shards (sizes differ by
    at most one, the larger first, like ``np.array_split``)."""
    base, extra = divmod(int(n), int(world_size))
    lo = rank * base + min(rank, extra)
    return lo, lo + base + (1 if rank < extra else 0)


def broadcast_object(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (pickled; for small things such as a fitted hierarchy)."""
    if not context().distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_arrays(a: np.ndarray) -> np.ndarray:
    """Concatenation, in rank order, of every rank's array (rows may differ in number between ranks)."""
    if not context().distributed:
        return a
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, np.ascontiguousarray(a))
    return np.concatenate(parts)


def all_true(flag: bool | torch.Tensor) -> bool:
    """True on every rank iff ``flag`` is true on every rank (so that all ranks raise together, none hangs)."""
    ctx = context()
    if not ctx.distributed:
        return bool(flag)
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if bool(flag) else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class _GatherRows(torch.autograd.Function):
    """All ranks' rows, concatenated in rank order; the gradient flows back to this rank's own rows.

    Every rank computes the same loss from the gathered rows, so the gradient of its own rows is complete here;
    DDP then *averages* the parameter gradients over the ranks, which the factor ``world_size`` undoes: the
    update is the gradient of the global-batch loss, as with one process.
    """

    @staticmethod
    def forward(ctx, t: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.world, ctx.lo, ctx.hi = world, rank * t.shape[0], (rank + 1) * t.shape[0]
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad[ctx.lo : ctx.hi] * ctx.world


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Rows of every rank (each holding the same number), concatenated in rank order, differentiable."""
    if not context().distributed:
        return t
    return _GatherRows.apply(t)


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Give every rank the buffers (BatchNorm running statistics) of rank ``src``."""
    if not context().distributed:
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=src)
