"""Hyperbolic product quantizer (paper Eq. 6-12), its Euclidean twin and a MeCoQ-style cosine counterpart.

An embedding z in R^{M*D} is split into M segments of ambient dimension D. For the Lorentz geometry each
segment is projected onto the tangent space at the origin (time coordinate zeroed), clipped to norm <= clip_r
and mapped with exp0 onto H^{D-1}_{c_m}, one learnable curvature -c_m per subspace. Each subspace has K
codewords on the same manifold; soft quantization is the Lorentzian centroid of the codewords weighted by
softmax(-d2 / tau) (Eq. 11-12), hard quantization the nearest codeword. The product distance is the sum of the
M geodesic distances (Eq. 8). The cosine geometry (:mod:`hihpq.geometry.cosine`, the Euclidean counterpart of the
paper's Table 2, after MeCoQ) intra-normalises the segments and the codewords, assigns with softmax(<h, c_k> / tau)
and scores by 1 - cos per subspace.

Shapes: B = batch, M = n_subspaces, K = n_codewords, D = subspace_dim (ambient; hyperbolic dimension D - 1).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
from torch import nn

from hihpq.geometry import CANONICAL, get_geometry
from hihpq.geometry._guards import safe_norm

__all__ = ["ProductQuantizer", "QuantizerOutput"]

# Rows per chunk when hard-assigning many embeddings: bounds the (M, chunk, K) distance table in memory.
_ASSIGN_CHUNK = 8192


class QuantizerOutput(NamedTuple):
    """What :meth:`ProductQuantizer.forward` returns; all differentiable wrt z, codebooks and curvature."""

    tangent: torch.Tensor  # (B, M, D) clipped tangent vectors at the origin
    h: torch.Tensor  # (B, M, D) continuous embedding on the product manifold (Eq. 7)
    h_soft: torch.Tensor  # (B, M, D) soft-quantized embedding (Eq. 11)
    weights: torch.Tensor  # (B, M, K) soft-assignment weights (Eq. 12), rows sum to 1


def _exact(method):
    """Run a method with autocast off on the module's device: inputs below fp32 are promoted by ``_dtype`` and
    the Lorentz algebra must not be cast down to fp16/bf16 (catastrophic cancellation)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        device = self.codebook_tangent.device.type
        if torch.is_autocast_enabled(device):
            with torch.autocast(device_type=device, enabled=False):
                return method(self, *args, **kwargs)
        return method(self, *args, **kwargs)

    return wrapper


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


class ProductQuantizer(nn.Module):
    """Product quantizer on M hyperbolic (Lorentz) or Euclidean subspaces with K codewords each.

    Args:
        n_subspaces: M, the number of codebooks (bits = M * log2 K).
        n_codewords: K codewords per subspace; codes are uint8 when K <= 256.
        subspace_dim: D, the ambient dimension of a subspace (input embedding dim = M * D).
        geometry: "lorentz" (alias "hyperbolic"), "euclidean" (the twin: same code, Euclidean distance) or
            "cosine" (MeCoQ-style: unit sub-vectors and codewords, inner-product assignment, cosine scores).
        tau: soft-assignment temperature; divides the squared distances (Eq. 12). The authors'
            ``softmax_temp`` multiplies them, so tau = 1 / softmax_temp.
        curvature: initial c (curvature -c) of every subspace, strictly inside ``curvature_bounds``.
        learn_curvature: train c (kept in bounds by construction) or keep it fixed.
        curvature_bounds: (lo, hi), 0 < lo < hi; c = exp(log lo + (log hi - log lo) * sigmoid(raw)).
        curvature_param: how a learned c is parameterised. "bounded" (default): the sigmoid above, in bounds by
            construction, steps multiplicative in c. "clamped" (the authors' code): c itself is the parameter,
            weight-decayed like the other weights and clamped into the bounds after each optimiser step
            (:meth:`clamp_curvature_`); its steps are additive, about 2x smaller than the bounded ones at c = 1.
        init_from_data: ask the training loop to re-initialise the codebooks from data once the hierarchy warm-up
            is over (:meth:`init_codebooks_from_data`); stored here so that the setting travels with the model.
        clip_r: tangent vectors (embeddings and codewords) are scaled to norm <= clip_r before exp0, as in the
            authors' code; it bounds all distances. None disables clipping.
        keep_scale: Lorentz with a clip radius only. False (the paper): the radius is clip_r whatever c, so a
            larger c lengthens every distance between points on the clip sphere and acts as an inverse temperature
            of the contrastive losses (bench/curvature_probe.py: every loss term falls as c grows, which is why a
            learned c runs away). True: subspace m clips at r(c_m) = arcosh(sqrt(cosh(sqrt(c_m) rho))) / sqrt(c_m),
            rho = arcosh(cosh(clip_r)^2), the radius at which two orthogonal directions lie rho apart, as they do at
            c = 1 and radius clip_r: c then changes the shape of the ball (near pairs against far ones), not its
            scale. r(1) = clip_r, so a fixed c = 1 gives the same model either way.
        init_scale: typical tangent norm of the initial codewords (Gaussian directions); default half the clip
            radius (0.5 without clipping), so they start spread inside the region the embeddings can reach.
        generator: torch.Generator for a reproducible codebook initialisation.
    """

    def __init__(
        self,
        n_subspaces: int,
        n_codewords: int,
        subspace_dim: int,
        *,
        geometry: str = "lorentz",
        tau: float = 0.2,
        curvature: float = 1.0,
        learn_curvature: bool = True,
        curvature_bounds: tuple[float, float] = (0.01, 10.0),
        clip_r: float | None = 1.0,
        init_scale: float | None = None,
        generator: torch.Generator | None = None,
        curvature_param: str = "bounded",
        init_from_data: bool = False,
        keep_scale: bool = False,
    ):
        super().__init__()
        self.n_subspaces = M = _check_int("n_subspaces", n_subspaces, 1)
        self.n_codewords = K = _check_int("n_codewords", n_codewords, 2)
        self.subspace_dim = D = _check_int("subspace_dim", subspace_dim, 2)
        if not isinstance(geometry, str):
            raise TypeError(f"geometry must be a string, got {type(geometry).__name__}")
        self.geo = get_geometry(geometry)  # raises ValueError naming the choices
        self.geometry = CANONICAL[geometry]
        if curvature_param not in ("bounded", "clamped"):
            raise ValueError(f"curvature_param must be 'bounded' or 'clamped', got {curvature_param!r}")
        self.curvature_param = curvature_param
        self.init_from_data = bool(init_from_data)
        self.tau = _check_positive("tau", tau)
        self.clip_r = None if clip_r is None else _check_positive("clip_r", clip_r)
        if init_scale is None:
            init_scale = 0.5 * (self.clip_r if self.clip_r is not None else 1.0)
        init_scale = _check_positive("init_scale", init_scale)

        if len(curvature_bounds) != 2:
            raise ValueError(f"curvature_bounds must be (lo, hi), got {curvature_bounds!r}")
        lo, hi = (_check_positive("curvature_bounds", b) for b in curvature_bounds)
        if not lo < hi:
            raise ValueError(f"curvature_bounds must satisfy 0 < lo < hi, got ({lo}, {hi})")
        curvature = _check_positive("curvature", curvature)
        self.curvature_bounds = (lo, hi)
        self.learn_curvature = bool(learn_curvature) and self.geometry == "lorentz"
        self.keep_scale = bool(keep_scale) and self.geometry == "lorentz"
        if self.keep_scale and self.clip_r is None:
            raise ValueError("keep_scale needs a clip radius (clip_r): it sets the radius from the curvature")

        if self.geometry == "lorentz":
            if not lo < curvature < hi:
                raise ValueError(
                    f"initial curvature {curvature} must lie strictly inside curvature_bounds ({lo}, {hi}): "
                    "the bounded parameterisation reaches the bounds only at infinity"
                )
            raw = torch.full((M,), self._raw_of(curvature))
            if self.learn_curvature:
                self.curvature_raw = nn.Parameter(raw)
            else:
                self.register_buffer("curvature_raw", raw)
        else:
            # Curvature means nothing in Euclidean or cosine space; a fixed buffer of ones keeps the code uniform.
            self.register_buffer("curvature_raw", torch.ones(M))

        # Codewords as tangent vectors at the origin, mapped with exp0 on every use (on the manifold by
        # construction). The Lorentz time coordinate is kept at 0 and projected out anyway.
        init = torch.randn(M, K, D, generator=generator)
        if self.geometry == "lorentz":
            init[..., 0] = 0.0
        dof = D - 1 if self.geometry == "lorentz" else D  # (cosine: only the directions matter)
        self.codebook_tangent = nn.Parameter(init * (init_scale / math.sqrt(dof)))

    # ------------------------------------------------------------------------------------------------------
    # Parameters
    # ------------------------------------------------------------------------------------------------------

    @property
    def curvature(self) -> torch.Tensor:
        """(M,) curvatures c_m > 0 (curvature -c_m), inside ``curvature_bounds``; ones for Euclidean/cosine."""
        if self.geometry != "lorentz":
            return self.curvature_raw
        if self.curvature_param == "clamped":
            return self.curvature_raw  # kept in bounds by clamp_curvature_ after every step
        lo, hi = self.curvature_bounds
        span = math.log(hi) - math.log(lo)
        c = torch.exp(math.log(lo) + span * torch.sigmoid(self.curvature_raw))
        # A saturated sigmoid gives exp(log hi), which can round one ulp past hi; the clamp only trims that.
        return c.clamp(lo, hi)

    def _raw_of(self, c: float) -> float:
        """The raw parameter that gives curvature c: c itself ("clamped"), or the inverse of
        c = exp(log lo + span * sigmoid(raw)) ("bounded"; c strictly inside the bounds)."""
        if self.curvature_param == "clamped":
            return c
        lo, hi = self.curvature_bounds
        frac = (math.log(c) - math.log(lo)) / (math.log(hi) - math.log(lo))
        return math.log(frac / (1.0 - frac))

    @torch.no_grad()
    def set_curvature_(self, c) -> None:
        """Set the Lorentz curvatures to c (a number, or one per subspace), each strictly inside the bounds."""
        if self.geometry != "lorentz":
            raise ValueError(f"a {self.geometry} quantizer has no curvature to set")
        values = torch.as_tensor(c, dtype=torch.float64).expand(self.n_subspaces).tolist()
        lo, hi = self.curvature_bounds
        if not all(lo < v < hi for v in values):
            raise ValueError(f"curvatures {values} must lie strictly inside curvature_bounds ({lo}, {hi})")
        self.curvature_raw.copy_(torch.tensor([self._raw_of(v) for v in values]))

    def no_weight_decay_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimiser must not decay: the bounded raw curvature (decay would pull c towards the
        geometric mean of the bounds, which means nothing). A "clamped" curvature is decayed, as by the authors."""
        if self.curvature_param == "clamped":
            return []
        return [self.curvature_raw] if isinstance(self.curvature_raw, nn.Parameter) else []

    @torch.no_grad()
    def clamp_curvature_(self) -> None:
        """Put a "clamped" learned curvature back into ``curvature_bounds`` (call after each optimiser step);
        a no-op for the bounded parameterisation, a fixed curvature and the flat geometries."""
        if self.learn_curvature and self.curvature_param == "clamped":
            self.curvature_raw.clamp_(*self.curvature_bounds)

    def _c(self, *trailing: int, dtype: torch.dtype) -> torch.Tensor:
        """Curvature shaped (M, *([1] * trailing)) for broadcasting, in ``dtype``."""
        return self.curvature.to(dtype).reshape(self.n_subspaces, *(1,) * len(trailing))

    def _dtype(self, x: torch.Tensor) -> torch.dtype:
        """Compute dtype: at least fp32 (Lorentz inner products cancel badly in half precision)."""
        return torch.promote_types(torch.promote_types(x.dtype, self.codebook_tangent.dtype), torch.float32)

    def clip_radius(self, *trailing: int, dtype: torch.dtype = torch.float32) -> float | torch.Tensor | None:
        """The clip radius: clip_r (a float), or with ``keep_scale`` r(c_m) per subspace shaped
        (M, *([1] * trailing)) for broadcasting; None without clipping."""
        if self.clip_r is None or not self.keep_scale:
            return self.clip_r
        sc = self._c(*trailing, dtype=torch.promote_types(dtype, torch.float32)).sqrt()
        # rho = arcosh(cosh(r)^2) and arcosh(sqrt(cosh(x))), both by their asymptotes where cosh would overflow
        # (the error there is below e^-40).
        r = self.clip_r
        rho = math.acosh(math.cosh(r) ** 2) if r < 20 else 2 * r - math.log(2)
        x = sc * rho
        exact = torch.acosh(torch.cosh(x.clamp_max(40.0)).sqrt())
        return (torch.where(x < 40.0, exact, 0.5 * x + 0.5 * math.log(2)) / sc).to(dtype)

    def _clip(self, v: torch.Tensor, radius: float | torch.Tensor | None) -> torch.Tensor:
        """v * min(1, radius / |v|) along the last axis; exact below the radius, differentiable everywhere."""
        if radius is None:
            return v
        return v * (radius / safe_norm(v)).clamp_max(1.0)

    @_exact
    def codebooks(self) -> torch.Tensor:
        """(M, K, D) codewords on the manifold: exp0 of the clipped tangent codewords, c_m per subspace."""
        t = self.geo.proj_tan0(self.codebook_tangent)
        v = self._clip(t, self.clip_radius(1, 1, dtype=t.dtype))
        return self.geo.expmap0(v, c=self._c(1, 1, dtype=v.dtype))

    @torch.no_grad()
    def init_codebooks_from_data(
        self, features: torch.Tensor, *, n_iter: int = 25, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Replace the codewords with per-subspace k-means centroids of data (closes the gap between the
        continuous embeddings and their codes when the random codewords sit where no data is).

        features: (N, M*D) embeddings ahead of the quantizer (the projector's output), or (N, M, D); N >= K.
        Lorentz: k-means on the clipped tangent vectors at the origin, the centroids stored as the tangent
        codewords (mapped with exp0 on use). Euclidean: k-means on the points. Cosine: spherical k-means on the
        intra-normalised sub-vectors. Lloyd iterations from a k-means++ seeding; an empty cluster is re-seeded
        with the row farthest from its centroid. Returns the (M, K) cluster sizes.
        """
        v = self.tangent(features)  # validates the shape, float64 / float32 as given
        if self.geometry == "cosine":
            v = self.geo.proj(v)
        N, M, _ = v.shape
        K = self.n_codewords
        if N < K:
            raise ValueError(f"k-means initialisation needs at least K = {K} rows, got {N}")
        n_iter = _check_int("n_iter", n_iter, 1)
        X = v.transpose(0, 1).to(self.codebook_tangent.device)  # (M, N, D)
        sub = torch.arange(M, device=X.device)[:, None]
        # k-means++ seeding (each next centre drawn with probability ~ squared distance to the chosen ones):
        # random distinct rows leave merged clusters behind that Lloyd iterations do not split.
        first = torch.randint(N, (M, 1), generator=generator).to(X.device)
        C = X[sub, first]  # (M, 1, D)
        mind = ((X - C) ** 2).sum(-1)  # (M, N)
        for _ in range(K - 1):
            nxt = torch.multinomial(mind.clamp_min(0).cpu().float() + 1e-30, 1, generator=generator).to(X.device)
            new = X[sub, nxt]  # (M, 1, D)
            C = torch.cat([C, new], 1)
            mind = torch.minimum(mind, ((X - new) ** 2).sum(-1))
        for _ in range(n_iter):
            d = torch.cdist(X, C)  # (M, N, K)
            a = d.argmin(-1)  # (M, N)
            sums = torch.zeros_like(C).index_put_((sub.expand_as(a), a), X, accumulate=True)
            counts = torch.zeros(M, K, dtype=X.dtype, device=X.device).index_put_(
                (sub.expand_as(a), a), torch.ones_like(a, dtype=X.dtype), accumulate=True
            )
            C = torch.where(counts[..., None] > 0, sums / counts.clamp_min(1)[..., None], C)
            if self.geometry == "cosine":
                C = self.geo.proj(C)
            for m in (counts == 0).any(1).nonzero().flatten().tolist():  # rare: re-seed from the worst-served rows
                empty = (counts[m] == 0).nonzero().flatten()
                far = d[m].gather(1, a[m][:, None]).squeeze(1).topk(len(empty)).indices
                C[m, empty] = X[m, far]
        counts = torch.zeros(M, K, dtype=torch.long, device=X.device)
        counts.index_put_((sub.expand_as(a), a), torch.ones_like(a), accumulate=True)
        self.codebook_tangent.copy_(C.to(self.codebook_tangent.dtype))
        return counts

    @torch.no_grad()
    def reseed_dead_codewords(self, features: torch.Tensor, *, generator: torch.Generator | None = None):
        """Move every codeword that no row of ``features`` is assigned to onto the embedding of a random row
        (distinct rows per subspace), so that the codes spread over the data instead of a few cells.

        features: (N, M*D) or (N, M, D) as :meth:`init_codebooks_from_data`. Returns the (M, K) bool mask of the
        codewords moved (rows are drawn on the CPU with ``generator``: the same on every device).
        """
        v = self.tangent(features)
        if self.geometry == "cosine":
            v = self.geo.proj(v)
        codes = self.assign(self.embed(features))
        N, M, K = v.shape[0], self.n_subspaces, self.n_codewords
        used = torch.zeros(M, K, dtype=torch.bool)
        used[torch.arange(M)[None, :].expand(N, M), codes.long().cpu()] = True
        dead = ~used
        for m in range(M):
            n_dead = int(dead[m].sum())
            if n_dead:
                rows = torch.randperm(N, generator=generator)[: min(n_dead, N)]
                cols = dead[m].nonzero().flatten()[: len(rows)]
                self.codebook_tangent[m, cols.to(self.codebook_tangent.device)] = v[rows, m].to(self.codebook_tangent)
                dead[m, dead[m].nonzero().flatten()[len(rows) :]] = False  # more dead codewords than rows: kept
        return dead

    # ------------------------------------------------------------------------------------------------------
    # Validation
    # ------------------------------------------------------------------------------------------------------

    def _check_points(self, name: str, x, *, batch: bool = True) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        M, D = self.n_subspaces, self.subspace_dim
        if (batch and x.ndim != 3) or x.ndim < 2 or x.shape[-2:] != (M, D):
            want = "(B, M, D)" if batch else "(..., M, D)"
            raise ValueError(f"{name} must have shape {want} with M={M}, D={D}, got {tuple(x.shape)}")
        return x

    # ------------------------------------------------------------------------------------------------------
    # Embedding
    # ------------------------------------------------------------------------------------------------------

    @_exact
    def tangent(self, z: torch.Tensor, *, clip: bool = True) -> torch.Tensor:
        """z (B, M*D) -> (B, M, D) tangent vectors at the origin: split, proj_tan0, clip to norm <= clip_r.

        A z already shaped (B, M, D) (e.g. prototypes in tangent space) is accepted too.
        """
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
        if not z.is_floating_point():
            raise TypeError(f"z must be a floating-point tensor, got {z.dtype}")
        M, D = self.n_subspaces, self.subspace_dim
        if z.ndim == 3:
            if z.shape[1:] != (M, D):
                raise ValueError(f"z of shape {tuple(z.shape)} is not (B, M, D) = (B, {M}, {D})")
        elif z.ndim == 2:
            if z.shape[1] != M * D:
                raise ValueError(f"embedding dim {z.shape[1]} is not M*D = {M * D} (M={M}, D={D})")
            z = z.reshape(z.shape[0], M, D)
        else:
            raise ValueError(f"z must have shape (B, M*D) = (B, {M * D}), got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError("z contains NaN or inf")
        v = self.geo.proj_tan0(z.to(self._dtype(z)))
        return self._clip(v, self.clip_radius(1, dtype=v.dtype)) if clip else v

    @_exact
    def embed(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, M*D) -> h (B, M, D) on the product manifold: exp0 of the tangent vectors (Eq. 7)."""
        v = self.tangent(z)
        return self.geo.expmap0(v, c=self._c(1, dtype=v.dtype))

    # ------------------------------------------------------------------------------------------------------
    # Quantization
    # ------------------------------------------------------------------------------------------------------

    @_exact
    def soft_quantize(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h (B, M, D) -> (h_soft (B, M, D), weights (B, M, K)).

        weights = softmax_k(-d2(c_k, h) / tau) with the squared Lorentzian distance (Eq. 10, 12); h_soft is
        the weighted Lorentzian centroid of the codewords (Eq. 11). Euclidean twin: squared distance and
        weighted mean.
        """
        h = self._check_points("h", h)
        dtype = self._dtype(h)
        h = h.to(dtype)
        C = self.codebooks().to(dtype)  # (M, K, D)
        c = self._c(1, 1, dtype=dtype)
        sq = self.geo.pairwise_sqdist(h.transpose(0, 1), C, c=c)  # (M, B, K)
        w = torch.softmax(-sq / self.tau, dim=-1)
        h_soft = self.geo.centroid(C, w, c=c)  # (M, B, D)
        return h_soft.transpose(0, 1), w.transpose(0, 1)

    @torch.no_grad()
    @_exact
    def assign(self, h: torch.Tensor) -> torch.Tensor:
        """Hard codes (B, M): index of the nearest codeword per subspace (argmin of the geodesic distance).

        uint8 when K <= 256, else int64. The squared Lorentzian distance is a monotone function of the
        geodesic one (d2 = 2 (cosh(sqrt(c) d) - 1) / c), so its argmin is used: it is the argmax of the soft
        weights.
        """
        h = self._check_points("h", h)
        if not torch.isfinite(h).all():  # NaN has no nearest codeword: argmin would silently give code 0
            bad = int((~torch.isfinite(h)).flatten(1).any(1).sum())
            raise ValueError(f"h contains NaN or inf in {bad} of {h.shape[0]} rows; refusing to encode them")
        dtype = self._dtype(h)
        C = self.codebooks().to(dtype)
        c = self._c(1, 1, dtype=dtype)
        out_dtype = torch.uint8 if self.n_codewords <= 256 else torch.int64
        codes = torch.empty(h.shape[0], self.n_subspaces, dtype=out_dtype, device=h.device)
        for start in range(0, h.shape[0], _ASSIGN_CHUNK):
            hc = h[start : start + _ASSIGN_CHUNK].to(dtype).transpose(0, 1)  # (M, b, D)
            sq = self.geo.pairwise_sqdist(hc, C, c=c)  # (M, b, K)
            codes[start : start + _ASSIGN_CHUNK] = sq.argmin(dim=-1).transpose(0, 1).to(out_dtype)
        return codes

    def encode(self, h: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`assign`: (B, M, D) embeddings -> (B, M) codes."""
        return self.assign(h)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (B, M) integer -> (B, M, D) codewords (differentiable wrt the codebooks and curvature)."""
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
        if codes.ndim != 2 or codes.shape[1] != self.n_subspaces:
            raise ValueError(f"codes must have shape (B, M) = (B, {self.n_subspaces}), got {tuple(codes.shape)}")
        idx = codes.long()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.n_codewords):
            raise ValueError(
                f"codes must lie in [0, {self.n_codewords}), got values in [{int(idx.min())}, {int(idx.max())}]"
            )
        C = self.codebooks()
        sub = torch.arange(self.n_subspaces, device=C.device)
        return C[sub[None, :], idx.to(C.device)]

    def reconstruct(self, codes: torch.Tensor) -> torch.Tensor:
        """Alias of :meth:`decode`."""
        return self.decode(codes)

    @_exact
    def quantization_error(self, h: torch.Tensor, *, per_subspace: bool = False) -> torch.Tensor:
        """Mean over the batch of the product distance from h (B, M, D) to its hard reconstruction: a
        scalar, or the (M,) per-subspace mean geodesic distances with ``per_subspace=True``."""
        h = self._check_points("h", h)
        h = h.to(self._dtype(h))
        rec = self.decode(self.assign(h)).to(h.dtype)
        d = self.geo.dist(h, rec, c=self._c(1, dtype=h.dtype))  # (B, M)
        return d.mean(0) if per_subspace else d.sum(-1).mean()

    # ------------------------------------------------------------------------------------------------------
    # Distances (what the losses and the index receive)
    # ------------------------------------------------------------------------------------------------------

    @_exact
    def pairwise_distance(self, a: torch.Tensor, b: torch.Tensor, *, per_subspace: bool = False) -> torch.Tensor:
        """a (n, M, D), b (m, M, D) -> (n, m): sum over subspaces of geodesic distances, each with its own
        curvature (Eq. 8); the (M, n, m) distances of each subspace with ``per_subspace=True``."""
        a, b = self._check_points("a", a), self._check_points("b", b)
        dtype = torch.promote_types(self._dtype(a), b.dtype)
        d = self.geo.pairwise_dist(
            a.to(dtype).transpose(0, 1), b.to(dtype).transpose(0, 1), c=self._c(1, 1, dtype=dtype)
        )
        return d if per_subspace else d.sum(0)

    @_exact
    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Elementwise product distance: a, b (..., M, D) broadcastable -> (...)."""
        a, b = self._check_points("a", a, batch=False), self._check_points("b", b, batch=False)
        dtype = torch.promote_types(self._dtype(a), b.dtype)
        return self.geo.dist(a.to(dtype), b.to(dtype), c=self._c(1, dtype=dtype)).sum(-1)

    @_exact
    def distance_table(self, h: torch.Tensor) -> torch.Tensor:
        """(B, M, K) geodesic distances from each subspace of h (B, M, D) to every codeword: the asymmetric
        distance lookup table (sum over m of table[:, m, code_m] is the distance to a coded item)."""
        h = self._check_points("h", h)
        dtype = self._dtype(h)
        d = self.geo.pairwise_dist(
            h.to(dtype).transpose(0, 1), self.codebooks().to(dtype), c=self._c(1, 1, dtype=dtype)
        )
        return d.transpose(0, 1)

    @_exact
    def codeword_distances(self) -> torch.Tensor:
        """(M, K, K) geodesic distances between the codewords of each subspace (symmetric distance tables)."""
        C = self.codebooks()
        d = self.geo.pairwise_dist(C, C, c=self._c(1, 1, dtype=C.dtype))
        # The diagonal is rounding noise of arcosh near 1 (~1e-3 in fp32); a code's distance to itself is 0.
        return d * (1.0 - torch.eye(self.n_codewords, dtype=d.dtype, device=d.device))

    # ------------------------------------------------------------------------------------------------------

    @_exact
    def forward(self, z: torch.Tensor) -> QuantizerOutput:
        """z (B, M*D) -> QuantizerOutput(tangent, h, h_soft, weights)."""
        v = self.tangent(z)
        h = self.geo.expmap0(v, c=self._c(1, dtype=v.dtype))
        h_soft, w = self.soft_quantize(h)
        return QuantizerOutput(tangent=v, h=h, h_soft=h_soft, weights=w)

    def extra_repr(self) -> str:
        lo, hi = self.curvature_bounds
        return (
            f"n_subspaces={self.n_subspaces}, n_codewords={self.n_codewords}, "
            f"subspace_dim={self.subspace_dim}, "
            f"geometry={self.geometry!r}, tau={self.tau}, clip_r={self.clip_r}, "
            f"learn_curvature={self.learn_curvature}, curvature_bounds=({lo}, {hi}), "
            f"curvature_param={self.curvature_param!r}, keep_scale={self.keep_scale}, "
            f"init_from_data={self.init_from_data}"
        )
