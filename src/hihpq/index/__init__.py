"""The search engine: an index of product-quantized codes, its scan kernel and its file format.

* :class:`HyperbolicPQIndex` (the twin :class:`EuclideanPQIndex`, the MeCoQ-style :class:`CosinePQIndex`):
  faiss-style ``add`` / ``search`` with asymmetric (ADC) or symmetric (SDC) distance, ``remove_ids``,
  ``reconstruct``, subset search.
* :func:`write_index` / :func:`read_index` / :func:`describe_index`: one checksummed, memory-mappable file
  per index; :class:`IndexFileError` for any bad file.
* :func:`hihpq.index.kernel.scan`: the top-k table-scan kernel; :func:`set_num_threads` sets its default
  thread count.
"""

from __future__ import annotations

from hihpq.index.io import FORMAT_VERSION, IndexFileError, describe_index, read_index, write_index
from hihpq.index.kernel import get_num_threads, reference_scan, scan, set_num_threads
from hihpq.index.pq_index import CosinePQIndex, EuclideanPQIndex, HyperbolicPQIndex

__all__ = [
    "FORMAT_VERSION",
    "CosinePQIndex",
    "EuclideanPQIndex",
    "HyperbolicPQIndex",
    "IndexFileError",
    "describe_index",
    "get_num_threads",
    "read_index",
    "reference_scan",
    "scan",
    "set_num_threads",
    "write_index",
]
