"""Sparse-recall attention backends (ShadowKV, PQCache, ClusterKV, ALISA) behind one interface.

``get_backend(name, budget, **params)`` returns a :class:`SparseBackend`; ``list_backends()`` names them
(the methods plus the references ``oracle`` and ``sink_local``). See ``docs/sparse.md``.
"""

from client.sparse import alisa, clusterkv, pqcache, reference, shadowkv  # noqa: F401  (registers backends)
from client.sparse.base import (
    Context,
    DecodeState,
    SparseBackend,
    SparseIndex,
    budget_tokens,
    get_backend,
    list_backends,
)
from client.sparse.prefetch import FetchFn, HostStore, Prefetcher
from client.sparse.sidecar import SidecarError

__all__ = [
    "Context",
    "DecodeState",
    "FetchFn",
    "HostStore",
    "Prefetcher",
    "SidecarError",
    "SparseBackend",
    "SparseIndex",
    "budget_tokens",
    "get_backend",
    "list_backends",
]
