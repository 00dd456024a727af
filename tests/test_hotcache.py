"""The front end's hot-chunk cache: LRU by bytes, digest-keyed hits, coherent across front ends."""

from __future__ import annotations

import uuid

import pytest
import torch
import xxhash

import codec
from client import AsyncKVCacheClient
from kvstore.backends import StorageBackend, open_backend
from kvstore.config import ServerConfig
from kvstore.hotcache import HotChunkCache
from kvstore.keys import ModelKey
from kvstore.server import KVStreamServer
from kvstore.store import ChunkBlobs, ChunkStore, ContextQuery, blob_key

N = 16


def test_lru_by_bytes_and_digest_keyed_hits() -> None:
    cache = HotChunkCache(800)
    assert cache.put("a", 1, b"x" * 100) and cache.put("b", 2, b"y" * 100)
    assert cache.get("a", 1) == b"x" * 100  # "a" is now the most recent
    assert cache.get("a", 9) is None  # another digest: the record names other bytes
    assert cache.get("a", 0) is None  # records without a digest never hit
    assert not cache.put("big", 3, b"z" * 101)  # > 1/8 of the budget: not kept
    assert not cache.put("nodigest", 0, b"z")
    for i in range(7):
        cache.put(f"k{i}", 10 + i, b"w" * 100)  # 900 bytes for a budget of 800: the oldest ("b") goes
    assert cache.get("b", 2) is None and cache.get("a", 1) is not None
    s = cache.stats()
    assert (s.bytes, s.entries, s.hits, s.misses) == (800, 8, 2, 3)
    cache.put("a", 11, b"v" * 50)  # replacing an entry accounts its bytes once
    cache.discard("a")
    cache.discard("missing")
    assert cache.stats().bytes == 700
    with pytest.raises(ValueError, match="max_bytes"):
        HotChunkCache(-1)


def _chunks(seed: int) -> list[ChunkBlobs]:
    kv = torch.randn(2, 2, 2 * N, 2, 4, generator=torch.Generator().manual_seed(seed)).half()
    return [ChunkBlobs({0: codec.encode(kv[:, :, i * N : (i + 1) * N], 0)}) for i in range(2)]


def _reads(store: ChunkStore, result: str) -> float:
    return store.metrics.registry.get_sample_value("kvstream_hot_cache_reads_total", {"result": result}) or 0


@pytest.fixture(params=["memory", "redis_cluster"])
async def backend(request: pytest.FixtureRequest) -> StorageBackend:
    url = "memory://" if request.param == "memory" else request.getfixturevalue("redis_cluster_url")
    b = open_backend(url)
    yield b
    await b.close()


async def test_repeat_reads_hit_and_a_reput_elsewhere_is_never_served_stale(backend: StorageBackend) -> None:
    model = ModelKey("m", namespace=f"t{uuid.uuid4().hex[:12]}", chunk_tokens=N)
    ids = list(range(2 * N))
    fe_a = ChunkStore(backend, hot_cache_bytes=1 << 20)  # two front ends over one storage
    fe_b = ChunkStore(backend, hot_cache_bytes=1 << 20)
    first = _chunks(1)
    await fe_a.put(model, ids, first)
    chunk = (await fe_a.lookup(model, ids)).chunks[1]
    assert chunk.levels[0].xxh3_64 == xxhash.xxh3_64_intdigest(first[1].levels[0])
    assert await fe_a.read_blob(model, chunk, 0) == first[1].levels[0]
    assert (_reads(fe_a, "hit"), _reads(fe_a, "miss")) == (0, 1)
    # Served from memory: the stored copy is gone and the read still answers with the verified bytes.
    key = blob_key(model.namespace, chunk.hash, 0)
    await backend.delete_many([key])
    assert await fe_a.read_blob(model, chunk, 0) == first[1].levels[0]
    assert _reads(fe_a, "hit") == 1

    # Front end B deletes the context and stores other bytes for the same tokens: A's next lookup reads
    # the new record, whose digest no longer matches A's entry, so A streams the new bytes.
    await fe_b.delete(model, ContextQuery(token_ids=ids))
    second = _chunks(2)
    await fe_b.put(model, ids, second)
    chunk = (await fe_a.lookup(model, ids)).chunks[1]
    assert await fe_a.read_blob(model, chunk, 0) == second[1].levels[0]
    assert _reads(fe_a, "hit") == 1 and _reads(fe_a, "miss") == 2


async def test_corrupt_blobs_are_not_cached_and_delete_frees_entries() -> None:
    backend = open_backend("memory://")
    model = ModelKey("m", chunk_tokens=N)
    ids = list(range(2 * N))
    store = ChunkStore(backend, hot_cache_bytes=1 << 20)
    await store.put(model, ids, _chunks(3))
    chunk = (await store.lookup(model, ids)).chunks[0]
    key = blob_key(model.namespace, chunk.hash, 0)
    raw = bytearray((await backend.get_many([key]))[0] or b"")
    raw[60] ^= 0x10
    await backend.put_many([(key, bytes(raw))], 3600)
    assert await store.read_blob(model, chunk, 0) is None
    assert store.hot_cache.stats().entries == 0
    good = (await store.lookup(model, ids)).chunks[1]
    assert await store.read_blob(model, good, 0) is not None and store.hot_cache.stats().entries == 1
    assert store.metrics.registry.get_sample_value("kvstream_hot_cache_bytes") == len(
        await store.read_blob(model, good, 0) or b""
    )
    await store.delete(model, ContextQuery(token_ids=ids))
    assert store.hot_cache.stats().entries == 0
    assert store.metrics.registry.get_sample_value("kvstream_hot_cache_bytes") == 0
    await backend.close()


def test_hot_cache_setting() -> None:
    from kvstore.cli import build_parser
    from kvstore.config import ServerConfig, load_config

    assert ServerConfig().hot_cache_bytes == 256 << 20
    assert load_config(env={"KVSTREAM_HOT_CACHE_BYTES": "64MiB"}).hot_cache_bytes == 64 << 20
    args = build_parser().parse_args(["serve", "--hot-cache-bytes", "0"])
    assert load_config(env={}, overrides={"hot_cache_bytes": args.hot_cache_bytes}).hot_cache_bytes == 0
    with pytest.raises(ValueError, match="hot_cache_bytes"):
        ServerConfig(hot_cache_bytes=-1).validate()


async def test_prefix_routing_keeps_a_context_on_one_front_end() -> None:
    """Three front ends over one store: with ``route_by_prefix`` every fetch of a context asks the same
    one, so its cache hits from the second fetch on; round robin spreads the fetches and every front end
    misses once."""
    backend = open_backend("memory://")
    config = ServerConfig(listen="127.0.0.1:0", grace_seconds=0.1, hot_cache_bytes=1 << 20)
    servers = [KVStreamServer(config, backend=backend) for _ in range(3)]
    for srv in servers:
        await srv.start()
    model = ModelKey("m", chunk_tokens=N)
    contexts = [[1000 * c + t for t in range(2 * N)] for c in range(24)]
    addresses = [srv.address for srv in servers]
    try:
        async with AsyncKVCacheClient(addresses, route_by_prefix=True) as routed:
            for c, ids in enumerate(contexts):
                await routed.store(model, ids, blobs=[{0: b.levels[0]} for b in _chunks(c)])
            for _ in range(3):
                assert (await routed.fetch(model, contexts[0], level=0)).prefix_tokens == 2 * N
            hits = sorted(_reads(s.store, "hit") for s in servers)
            assert hits == [0, 0, 4]  # 2 repeat fetches x 2 chunks, one FE
            assert sum(_reads(s.store, "miss") for s in servers) == 2  # the first fetch
            for ids in contexts[1:]:
                await routed.fetch(model, ids, level=0)
            assert sum(_reads(s.store, "miss") > 2 for s in servers) >= 2  # different prefixes spread out
        async with AsyncKVCacheClient(addresses) as round_robin:
            before = [_reads(s.store, "miss") for s in servers]
            for _ in range(3):
                await round_robin.fetch(model, contexts[5], level=0)
            new_misses = [_reads(s.store, "miss") - b for s, b in zip(servers, before, strict=True)]
            # three fetches, three front ends: the two that never served this context miss once each
            assert sorted(new_misses) == [0, 2, 2]
    finally:
        for srv in servers:
            await srv.stop(0)
        await backend.close()
