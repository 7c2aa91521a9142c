"""Nearest neighbours of the training images in the backbone's feature space (``train.neighbours``).

The pair of a training step is two augmented views of one image in the paper. With neighbour pairs the second view
is, with probability ``train.neighbour_prob``, a view of one of the image's k nearest neighbours instead: pairs the
augmentations alone cannot make, found by the pretrained backbone (its features before any training), not by
labels. Measured on the held-out tuning sets (bench/defaults_study.py --study neighbours).
"""

from __future__ import annotations

import numpy as np
import torch


def nearest_neighbours(feats: np.ndarray | torch.Tensor, k: int, chunk: int = 2048) -> np.ndarray:
    """(N, k) int64: for every row of ``feats`` (N, F) the k other rows of highest cosine similarity, most similar
    first. Rows are compared a chunk at a time, so memory is chunk x N whatever N."""
    x = torch.as_tensor(feats).float()
    n = len(x)
    if not 0 < k < n:
        raise ValueError(f"need 0 < k < the number of rows ({n}) to find k other rows; got k={k}")
    if not torch.isfinite(x).all():
        raise ValueError("non-finite features: the nearest neighbours are undefined (check the feature cache)")
    x = torch.nn.functional.normalize(x, dim=1)
    out = np.empty((n, k), np.int64)
    for lo in range(0, n, chunk):
        sim = x[lo : lo + chunk] @ x.T
        rows = torch.arange(len(sim))
        sim[rows, rows + lo] = -float("inf")  # never its own neighbour
        out[lo : lo + chunk] = sim.topk(k, dim=1).indices.numpy()
    return out
