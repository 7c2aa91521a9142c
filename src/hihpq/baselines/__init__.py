"""Shallow retrieval baselines behind one faiss-like surface.

Every baseline is a scikit-learn style estimator (``__init__`` stores arguments, ``fit(X)`` returns self,
learned attributes end in ``_``) and speaks faiss: ``add(X)``, ``ntotal``, ``search(Q, k) -> (D float32,
I int64)`` padded with +inf / -1, ``encode(X)``, ``code_size`` (bytes) and ``bits``.

- :class:`PCAPQ`: PCA + faiss product quantization, ADC search.
- :class:`PCAOPQ`: PCA + faiss OPQ rotation + product quantization, ADC search.
- :class:`ITQ`: Iterative Quantization binary codes, Hamming search.
- :class:`FloatCosine`: exact cosine search on the raw float features (reference row).
"""

from __future__ import annotations

from hihpq.baselines._base import FewTrainingPointsWarning, limit_threads
from hihpq.baselines.exact import FloatCosine
from hihpq.baselines.itq import ITQ, hamming_distances
from hihpq.baselines.pq import PCAOPQ, PCAPQ, unpack_pq_codes

__all__ = [
    "ITQ",
    "PCAOPQ",
    "PCAPQ",
    "FewTrainingPointsWarning",
    "FloatCosine",
    "hamming_distances",
    "limit_threads",
    "unpack_pq_codes",
]
