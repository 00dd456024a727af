"""kvstream client: fetch/store KV caches, model integration (client.model), sparse recall (client.sparse)."""

from client.api import (
    AsyncKVCacheClient,
    ChunkReport,
    FetchResult,
    KVCacheClient,
    KVStreamError,
    LookupResult,
    StoreResult,
)

__all__ = [
    "AsyncKVCacheClient",
    "ChunkReport",
    "FetchResult",
    "KVCacheClient",
    "KVStreamError",
    "LookupResult",
    "StoreResult",
]
