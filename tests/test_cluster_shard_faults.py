"""One bad shard of a Redis Cluster degrades lookups to the prefix on healthy shards; it never blocks them.

A private 3+3 cluster (the tests stop and kill its primaries). ``ClusterBackend.get_many_available``
reads each node's keys with a bounded per-node timeout, so a lookup whose chunk records are spread over
the shards returns, within about that timeout, exactly the chunks before the first one on the bad shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Iterator

import pytest
import torch
from redis.crc import key_slot

import codec
from client.api import AsyncKVCacheClient
from deploy.redis_cluster import LocalCluster, RedisProcess, redis_cluster, start_cluster
from kvstore.backends.base import BackendError
from kvstore.backends.cluster import ClusterBackend
from kvstore.config import ServerConfig
from kvstore.keys import ModelKey, chunk_hashes
from kvstore.server import KVStreamServer
from kvstore.store import ChunkBlobs, ChunkStore, record_key

pytestmark = pytest.mark.redis

CHUNK, N_CHUNKS = 16, 24
NODE_TIMEOUT_S = 0.5
BOUND_S = 3.0  # a lookup with one bad shard must answer well within this


@pytest.fixture(scope="module")
def cluster(redis_bin: str) -> Iterator[LocalCluster]:
    cl = start_cluster(3, 1)
    try:
        yield cl
    finally:
        cl.stop()


def _alive(cluster: LocalCluster) -> list[RedisProcess]:
    return [n for n in cluster.nodes if n.proc.poll() is None]


def _slot_owners(cluster: LocalCluster, keys: list[str]) -> list[int]:
    """Port of the primary serving each key's slot, as a live node reports it."""
    with contextlib.closing(_alive(cluster)[0].client()) as c:
        ranges = [(int(s), int(e), int(p[1])) for s, e, p, *_ in c.execute_command("CLUSTER", "SLOTS")]
    slots = [key_slot(k.encode()) for k in keys]
    return [next(port for s, e, port in ranges if s <= slot <= e) for slot in slots]


def _context(namespace: str, seed: int) -> tuple[ModelKey, list[int], torch.Tensor, list[ChunkBlobs]]:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(2, 2, N_CHUNKS * CHUNK, 2, 8, generator=g).half()
    ids = torch.randint(0, 1000, (N_CHUNKS * CHUNK,), generator=g).tolist()
    blobs = [ChunkBlobs({0: codec.encode(kv[:, :, i * CHUNK : (i + 1) * CHUNK], 0)}) for i in range(N_CHUNKS)]
    return ModelKey("shard-faults", namespace=namespace, chunk_tokens=CHUNK), ids, kv, blobs


def _victim(cluster: LocalCluster, model: ModelKey, ids: list[int]) -> tuple[RedisProcess, int]:
    """A primary not holding chunk 0's record, and the index of the first chunk whose record it holds."""
    owners = _slot_owners(cluster, [record_key(model.namespace, h) for h in chunk_hashes(model, ids)])
    cut = next(i for i, port in enumerate(owners) if port != owners[0])
    return next(n for n in cluster.nodes if n.port == owners[cut]), cut


def test_start_cluster_returns_with_replicas_in_sync(redis_bin: str) -> None:
    with redis_cluster(3, 1) as cl:
        infos = {}
        for n in cl.nodes:
            with contextlib.closing(n.client()) as c:
                infos[n.port] = c.info("replication")
    replicas = {port: i for port, i in infos.items() if i["role"] == "slave"}
    assert len(replicas) == 3
    for port, info in replicas.items():
        assert info["master_link_status"] == "up", (port, info)
        primary = infos[int(info["master_port"])]
        listed = [v for k, v in primary.items() if k.startswith("slave") and isinstance(v, dict)]
        assert any(int(r["port"]) == port and r["state"] == "online" for r in listed), (port, primary)


async def test_stopped_primary_lookup_and_fetch_return_prefix(cluster: LocalCluster) -> None:
    """SIGSTOP (a hung or partitioned node): bounded lookup and gRPC fetch of the healthy prefix."""
    model, ids, kv, blobs = _context("stopped", seed=1)
    backend = ClusterBackend.from_url(cluster.url + f"?node_timeout={NODE_TIMEOUT_S}")
    server = KVStreamServer(ServerConfig(listen="127.0.0.1:0", grace_seconds=0.1), backend=backend)
    await server.start()
    victim: RedisProcess | None = None
    try:
        store = ChunkStore(backend)
        await store.put(model, ids, blobs)
        assert (await store.lookup(model, ids)).prefix_chunks == N_CHUNKS  # warm pooled connections
        victim, cut = _victim(cluster, model, ids)
        os.kill(victim.proc.pid, signal.SIGSTOP)
        for _ in range(2):  # the first read finds the hang on a pooled connection, the second anew
            t0 = time.monotonic()
            res = await store.lookup(model, ids)
            took = time.monotonic() - t0
            assert res.prefix_chunks == cut, (res.prefix_chunks, cut)
            assert NODE_TIMEOUT_S * 0.9 <= took < BOUND_S, took
        assert backend.node_read_failures[f"127.0.0.1:{victim.port}"] >= 2

        async with AsyncKVCacheClient(server.address, timeout=BOUND_S * 2) as kvs:
            t0 = time.monotonic()
            got = await kvs.fetch(model, ids, level=0)
            took = time.monotonic() - t0
        assert took < BOUND_S, took
        assert got.prefix_tokens == cut * CHUNK and not got.recompute
        assert got.kv is not None and torch.equal(got.kv, kv[:, :, : cut * CHUNK])
    finally:
        if victim is not None:
            os.kill(victim.proc.pid, signal.SIGCONT)
        await server.stop(0)


async def test_killed_primary_prefix_then_full_after_failover(cluster: LocalCluster) -> None:
    """SIGKILL: the prefix at once, no exception; after the replica takes over, the whole context again."""
    for n in _alive(cluster):
        with contextlib.closing(n.client()) as c:
            c.config_set("cluster-node-timeout", 1000)  # fail over within ~2 s, for any data age
            c.config_set("cluster-replica-validity-factor", 0)
    model, ids, _, blobs = _context("killed", seed=2)
    backend = ClusterBackend.from_url(cluster.url)  # the default node timeout (1 s)
    try:
        store = ChunkStore(backend)
        await store.put(model, ids, blobs)
        victim, cut = _victim(cluster, model, ids)
        with contextlib.closing(victim.client()) as c:
            assert c.wait(1, 5000) == 1  # the replica holds every write before the kill
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        t0 = time.monotonic()
        res = await store.lookup(model, ids)
        assert time.monotonic() - t0 < BOUND_S
        assert res.prefix_chunks == cut, (res.prefix_chunks, cut)
        # The strict read (a put merging old records) never takes an unreachable record for an absent one:
        # it fails, or it waits out the failover (redis-py retries) and returns every record.
        rec_keys = [record_key(model.namespace, h) for h in chunk_hashes(model, ids)]
        with contextlib.suppress(BackendError):
            assert None not in await backend.get_many(rec_keys)

        # Recovery needs the backend to notice the new slot owner itself: the dead node never redirects.
        # Until the replica takes over every node answers CLUSTERDOWN: that one is a BackendError.
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(BackendError):
                if (await store.lookup(model, ids)).prefix_chunks == N_CHUNKS:
                    break
            assert time.monotonic() < deadline, "lookups did not recover after the failover"
            await asyncio.sleep(0.05)
        # What the server exports as kvstream_store_partial_read_failures.
        assert (await backend.stats()).partial_read_failures >= 1
    finally:
        await backend.close()
