"""Projector from backbone features to the quantizer's input: (B, in_dim) -> (B, out_dim = M * D)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Projector"]


class Projector(nn.Module):
    """Linear (the paper's) or MLP projection head.

    Args:
        in_dim: backbone feature size F.
        out_dim: M * D, the quantizer input size.
        kind: "linear" (one Linear layer, as the paper) or "mlp" (Linear -> BatchNorm1d -> ReLU -> Linear).
        hidden: hidden width of the MLP (default ``min(in_dim, 1024)``); not allowed for "linear".
        dropout: probability of zeroing each backbone feature in training (0: none). A frozen backbone trains
            from a few cached views per image; dropping features is a fresh perturbation at every step, which
            cached views cannot give (bench/defaults_study.py --study generalisation).

    Shapes: forward (B, in_dim) -> (B, out_dim).
    """

    def __init__(
        self, in_dim: int, out_dim: int, kind: str = "linear", hidden: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        for arg, value in (("in_dim", in_dim), ("out_dim", out_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg} must be a positive int, got {value!r}")
        if kind not in ("linear", "mlp"):
            raise ValueError(f"kind must be 'linear' or 'mlp', got {kind!r}")
        if kind == "linear" and hidden is not None:
            raise ValueError("hidden is only used with kind='mlp'")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
        if hidden is None:
            hidden = min(in_dim, 1024)
        if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
            raise ValueError(f"hidden must be a positive int, got {hidden!r}")
        self.in_dim, self.out_dim, self.kind = in_dim, out_dim, kind
        self.hidden = hidden if kind == "mlp" else None
        self.dropout = float(dropout)  # applied in forward (draw_keep): no module, so state dicts are unchanged
        if kind == "linear":
            self.net: nn.Module = nn.Linear(in_dim, out_dim)
        else:
            self.net = nn.Sequential(
                nn.Linear(in_dim, hidden, bias=False),  # bias is redundant before BatchNorm
                nn.BatchNorm1d(hidden),
                nn.ReLU(inplace=True),
                nn.Linear(hidden, out_dim),
            )

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim). In training the features are dropped with ``keep``, a (B, in_dim) mask from
        :meth:`draw_keep` (the trainer draws one for the global batch, so that N processes drop what one would),
        or with a mask drawn here."""
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"Projector expects input of shape (B, {self.in_dim}), got {tuple(x.shape)}")
        if keep is None and self.training:
            keep = self.draw_keep(len(x), device=x.device, dtype=x.dtype)
        if keep is None:
            return self.net(x)
        if keep.shape != x.shape:
            raise ValueError(f"keep mask of shape {tuple(keep.shape)} for input of shape {tuple(x.shape)}")
        return self.net(x * keep)

    def draw_keep(self, n: int, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """A training dropout mask for n rows: Bernoulli(1 - p) / (1 - p) from torch's generator of ``device``, the
        numbers ``nn.Dropout`` draws on CPU from the same generator state (what the recorded benchmarks ran with);
        None without dropout."""
        if not self.dropout:
            return None
        keep = 1.0 - self.dropout
        return torch.empty((n, self.in_dim), device=device, dtype=dtype).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return (
            f"in_dim={self.in_dim}, out_dim={self.out_dim}, kind={self.kind!r}"
            + (f", hidden={self.hidden}" if self.hidden else "")
            + (f", dropout={self.dropout:g}" if self.dropout else "")
        )
