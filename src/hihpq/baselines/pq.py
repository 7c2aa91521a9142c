"""Product quantization baselines on top of faiss: PCA + PQ and PCA + OPQ, searched by ADC.

Both follow the shallow PQ/OPQ rows of the HiHPQ paper (Table 1): features from a frozen backbone,
optionally reduced by PCA fitted on the training features, then faiss's ``IndexPQ`` (with an ``OPQMatrix``
rotation in front for OPQ). M = bits / log2(n_codewords) sub-quantizers; with the default 256 codewords, one
byte per sub-quantizer.
"""

from __future__ import annotations

import warnings

import faiss
import numpy as np

from hihpq.baselines._base import (
    BaseSearcher,
    FewTrainingPointsWarning,
    check_features,
    check_int,
    fit_pca,
    limit_threads,
)

__all__ = ["PCAOPQ", "PCAPQ"]

# faiss prints a warning to stderr below this many training points per centroid; we warn in Python instead.
_FAISS_MIN_POINTS_PER_CENTROID = 39


def _configure_clustering(cp, *, n_train: int, n_codewords: int, n_iter: int, seed: int) -> None:
    """Seed faiss's k-means and lower its minimum points per centroid so it never prints to stderr."""
    cp.seed = seed
    cp.niter = n_iter
    cp.min_points_per_centroid = min(_FAISS_MIN_POINTS_PER_CENTROID, n_train // n_codewords)


class PCAPQ(BaseSearcher):
    """PCA then product quantization (faiss ``IndexPQ``), searched by asymmetric distance (ADC).

    Args:
        bits: code length B; M = B / log2(n_codewords) sub-quantizers.
        n_components: PCA output dimension (a multiple of M), or None for no PCA.
        n_codewords: codewords per sub-quantizer K, a power of two in [2, 256].
        n_iter: k-means iterations per sub-quantizer.
        seed: seed of faiss's k-means (and of the OPQ initial rotation in :class:`PCAOPQ`).
        n_threads: threads of faiss (OpenMP) and BLAS during fit/add/search/encode (None: leave the
            process's settings). Process-wide while a call runs, restored afterwards (see ``limit_threads``).

    Attributes (after ``fit``):
        n_features_in_: input dimension d.
        mean_, components_: PCA mean (d,) and components (n_components, d) float64, or None without PCA.
        n_subquantizers_: M.
        codebooks_: (M, K, d' / M) float32 sub-codebooks (d' = n_components or d; rotated space for OPQ).
        index_: the faiss index holding the quantizer and the database codes.

    ``encode`` returns (n, M) uint8 codeword ids; ``search`` returns squared L2 ADC distances in the PCA
    space. Ties are ordered by id (faiss's heaps break ties by id).
    """

    def __init__(
        self,
        bits: int = 32,
        n_components: int | None = 64,
        n_codewords: int = 256,
        n_iter: int = 25,
        seed: int = 0,
        n_threads: int | None = None,
    ):
        self.bits = bits
        self.n_components = n_components
        self.n_codewords = n_codewords
        self.n_iter = n_iter
        self.seed = seed
        self.n_threads = n_threads

    # ---- fitting
    def _validate_params(self, n_samples: int, n_features: int) -> tuple[int, int, int]:
        """Check the constructor arguments against the data; returns (M, nbits, working dimension)."""
        bits = check_int(self.bits, "bits", low=1)
        k = check_int(self.n_codewords, "n_codewords", low=2, high=256)
        if k & (k - 1):
            raise ValueError(f"n_codewords must be a power of two (codes are log2(K)-bit), got {k}")
        nbits = k.bit_length() - 1
        if bits % nbits:
            raise ValueError(
                f"bits must be a multiple of log2(n_codewords) = {nbits} "
                f"(M = bits / {nbits} sub-quantizers), got bits={bits}"
            )
        m = bits // nbits
        check_int(self.n_iter, "n_iter", low=1)
        check_int(self.seed, "seed", low=0, high=2**31 - 1)
        self._checked_n_threads()
        if self.n_components is None:
            dim = n_features
            what = f"the feature dimension ({n_features}, no PCA)"
        else:
            dim = check_int(self.n_components, "n_components", low=1, high=n_features)
            if dim > n_samples:
                raise ValueError(f"n_components={dim} exceeds the number of training samples ({n_samples})")
            what = f"n_components ({dim})"
        if dim % m:
            raise ValueError(f"{what} must be a multiple of the number of sub-quantizers M = {m} (bits={bits})")
        if n_samples < k:
            raise ValueError(f"k-means needs at least n_codewords = {k} training points, got {n_samples}")
        if n_samples < _FAISS_MIN_POINTS_PER_CENTROID * k:
            warnings.warn(
                f"{type(self).__name__}: {n_samples} training points for {k} codewords per sub-quantizer; "
                f"faiss recommends at least {_FAISS_MIN_POINTS_PER_CENTROID * k}; codebooks may be noisy.",
                FewTrainingPointsWarning,
                stacklevel=3,
            )
        return m, nbits, dim

    def fit(self, X, y=None) -> PCAPQ:
        """Fit PCA (if any) and the quantizer on training features ``X`` (n, d); ``y`` is ignored."""
        x = check_features(X, "X")
        n, d = x.shape
        m, nbits, dim = self._validate_params(n, d)
        with limit_threads(self._checked_n_threads()):
            if self.n_components is None:
                self.mean_, self.components_ = None, None
            else:
                self.mean_, self.components_, _ = fit_pca(x, dim)
            index = self._build_and_train(self._project(x), m, nbits, dim)
        self.index_ = index
        self.n_subquantizers_ = m
        pq = self._pq_index().pq
        self.codebooks_ = faiss.vector_to_array(pq.centroids).reshape(m, int(pq.ksub), int(pq.dsub))
        self.n_features_in_ = d
        return self

    def _build_and_train(self, xt: np.ndarray, m: int, nbits: int, dim: int):
        index = faiss.IndexPQ(dim, m, nbits)
        _configure_clustering(index.pq.cp, n_train=len(xt), n_codewords=1 << nbits, n_iter=self.n_iter, seed=self.seed)
        index.train(xt)
        return index

    # ---- surface
    def _project(self, x: np.ndarray) -> np.ndarray:
        if self.components_ is None:
            return x
        proj = self.components_.astype(np.float32)
        return np.ascontiguousarray((x - self.mean_.astype(np.float32)) @ proj.T, dtype=np.float32)

    def _pq_index(self):
        """The faiss IndexPQ inside ``index_``."""
        return self.index_

    def _encode(self, x: np.ndarray) -> np.ndarray:
        packed = self.index_.sa_encode(self._project(x))
        return unpack_pq_codes(packed, self.n_subquantizers_, self._nbits())

    def _add(self, x: np.ndarray) -> None:
        self.index_.add(self._project(x))

    def _search(self, q: np.ndarray, k: int):
        D, I = self.index_.search(self._project(q), k)
        D[I < 0] = np.inf  # faiss pads with FLT_MAX; the surface promises +inf
        return D, I

    def _ntotal(self) -> int:
        return int(self.index_.ntotal)

    def _reset(self) -> None:
        self.index_.reset()

    def _nbits(self) -> int:
        return int(self.n_codewords).bit_length() - 1

    @property
    def code_size(self) -> int:
        """Bytes per stored database code (faiss's packed code: ceil(bits / 8))."""
        return (int(self.bits) + 7) // 8

    # ---- pickling: faiss objects are SWIG proxies, store them as faiss's own serialisation
    def __getstate__(self):
        state = super().__getstate__()
        if "index_" in state:
            state = dict(state)
            state["index_"] = faiss.serialize_index(state["index_"])
        return state

    def __setstate__(self, state):
        if "index_" in state:
            state = dict(state)
            state["index_"] = faiss.deserialize_index(np.asarray(state["index_"], dtype=np.uint8))
        super().__setstate__(state)


class PCAOPQ(PCAPQ):
    """PCA then optimized product quantization: faiss ``IndexPreTransform(OPQMatrix, IndexPQ)``, ADC search.

    Args:
        bits, n_components, n_codewords, n_iter, seed, n_threads: as in :class:`PCAPQ`.
        opq_n_iter: alternations between the rotation and the PQ codebooks (faiss ``OPQMatrix.niter``).

    Additional attribute: ``rotation_`` (d', d') float32, the learned orthogonal matrix (y = rotation_ @ x).
    The initial rotation is a random orthogonal matrix drawn from ``seed`` (faiss would always use its fixed
    seed 1234), and the k-means inside OPQ is seeded too, so ``seed`` controls the whole fit.
    """

    def __init__(
        self,
        bits: int = 32,
        n_components: int | None = 64,
        n_codewords: int = 256,
        n_iter: int = 25,
        opq_n_iter: int = 50,
        seed: int = 0,
        n_threads: int | None = None,
    ):
        super().__init__(
            bits=bits,
            n_components=n_components,
            n_codewords=n_codewords,
            n_iter=n_iter,
            seed=seed,
            n_threads=n_threads,
        )
        self.opq_n_iter = opq_n_iter

    def _validate_params(self, n_samples: int, n_features: int) -> tuple[int, int, int]:
        check_int(self.opq_n_iter, "opq_n_iter", low=1)
        return super()._validate_params(n_samples, n_features)

    def _build_and_train(self, xt: np.ndarray, m: int, nbits: int, dim: int):
        opq = faiss.OPQMatrix(dim, m)
        opq.niter = int(self.opq_n_iter)
        rng = np.random.default_rng(self.seed)
        q, r = np.linalg.qr(rng.standard_normal((dim, dim)))
        init = (q * np.where(np.diag(r) < 0, -1.0, 1.0)).astype(np.float32)
        faiss.copy_array_to_vector(init.ravel(), opq.A)  # a preset A is used as the starting rotation
        # OPQ trains its own PQ in every alternation; give it a seeded one with our clustering settings.
        inner = faiss.ProductQuantizer(dim, m, nbits)
        _configure_clustering(inner.cp, n_train=len(xt), n_codewords=1 << nbits, n_iter=self.n_iter, seed=self.seed)
        opq.pq = inner
        pq_index = faiss.IndexPQ(dim, m, nbits)
        _configure_clustering(
            pq_index.pq.cp, n_train=len(xt), n_codewords=1 << nbits, n_iter=self.n_iter, seed=self.seed
        )
        index = faiss.IndexPreTransform(opq, pq_index)
        try:
            index.train(xt)
        finally:
            opq.pq = None  # the inner PQ is a Python-owned temporary: do not leave a dangling pointer
        return index

    def fit(self, X, y=None) -> PCAOPQ:
        """Fit PCA (if any), the OPQ rotation and the quantizer on training features ``X`` (n, d)."""
        super().fit(X, y)
        transform = faiss.downcast_VectorTransform(self.index_.chain.at(0))
        self.rotation_ = faiss.vector_to_array(transform.A).reshape(transform.d_out, transform.d_in)
        return self

    def _pq_index(self):
        return faiss.downcast_index(self.index_.index)


def unpack_pq_codes(packed: np.ndarray, m: int, nbits: int) -> np.ndarray:
    """faiss PQ codes (n, ceil(m * nbits / 8)) uint8, packed least significant bit first, to (n, m) uint8."""
    packed = np.asarray(packed, dtype=np.uint8)
    if nbits == 8:
        return np.ascontiguousarray(packed[:, :m])
    bits = np.unpackbits(packed, axis=1, bitorder="little")[:, : m * nbits].reshape(len(packed), m, nbits)
    weights = (1 << np.arange(nbits)).astype(np.uint16)
    return (bits.astype(np.uint16) * weights).sum(axis=2).astype(np.uint8)
