"""Reliability under faults on a real 3+3 Redis Cluster with real ``kvstore serve`` front ends.

Every test checks the same invariant: a fetch returns bit-exact bytes for a (possibly shorter) verified
prefix, or a clear retryable/deadline error; never wrong bytes, never a hang. Level 0 is lossless, so
"bit-exact" is ``torch.equal`` against the tensor that was stored. The cluster is tuned for fast failover
(``cluster-node-timeout 1000``) and is private to this module because the tests kill its nodes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import redis
import torch
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

import codec
from client.api import AsyncKVCacheClient, FetchResult, KVCacheClient, KVStreamError
from deploy.launch import ServerProcess
from deploy.redis_cluster import HOST, LocalCluster, RedisProcess, start_cluster
from deploy.tcp_proxy import TcpProxy
from kvstore.backends.cluster import ClusterBackend
from kvstore.config import ServerConfig
from kvstore.keys import ModelKey, chunk_hashes
from kvstore.server import KVStreamServer
from kvstore.store import blob_key, manifest_key, record_key

pytestmark = pytest.mark.redis

CHUNK = 64
LAYERS, HEADS, DIM = 4, 8, 32  # one level-0 chunk is ~220 KB: big enough for streams to take time
NODE_TIMEOUT_MS = 1000
FAILOVER_SLO_S = 5.0  # full fetches must succeed again this soon after the cluster's failover
CLEAN_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


# ----- data -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    """A synthetic context: token ids, its KV ``[layers, 2, tokens, heads, dim]`` float16, level-0 blobs."""

    model: ModelKey
    ids: list[int]
    kv: torch.Tensor
    blobs: list[dict[int, bytes]]

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def hashes(self) -> list[bytes]:
        return chunk_hashes(self.model, self.ids)


def make_ctx(namespace: str, seed: int, n_chunks: int) -> Ctx:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(LAYERS, 2, n_chunks * CHUNK, HEADS, DIM, generator=g).half()
    ids = torch.randint(0, 512, (n_chunks * CHUNK,), generator=g).tolist()
    blobs = [{0: codec.encode(kv[:, :, i * CHUNK : (i + 1) * CHUNK], 0)} for i in range(n_chunks)]
    return Ctx(ModelKey("faults", namespace=namespace, chunk_tokens=CHUNK), ids, kv, blobs)


def verified_prefix(res: FetchResult, ctx: Ctx) -> int:
    """Tokens of ``res``; fails unless they equal the stored KV bit for bit."""
    assert res.prefix_tokens % CHUNK == 0 and 0 <= res.prefix_tokens <= ctx.tokens
    assert not res.recompute
    if res.prefix_tokens == 0:
        assert res.kv is None
        return 0
    assert res.kv is not None and res.kv.shape[2] == res.prefix_tokens
    assert torch.equal(res.kv, ctx.kv[:, :, : res.prefix_tokens]), "fetched bytes differ from stored ones"
    return res.prefix_tokens


# ----- cluster helpers --------------------------------------------------------------------------


def _alive(cluster: LocalCluster) -> list[RedisProcess]:
    return [n for n in cluster.nodes if n.proc.poll() is None]


def _primaries(cluster: LocalCluster) -> list[RedisProcess]:
    out = []
    for n in _alive(cluster):
        with contextlib.closing(n.client()) as c:
            if c.info("replication")["role"] == "master":
                out.append(n)
    return out


def _slot_owner(cluster: LocalCluster, key: str) -> RedisProcess:
    """The node serving ``key``'s slot, as a live node reports it."""
    slot = key_slot(key.encode())
    with contextlib.closing(_alive(cluster)[0].client()) as c:
        for start, end, primary, *_ in c.execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return next(n for n in cluster.nodes if n.port == int(primary[1]))
    raise AssertionError(f"slot {slot} not covered")


def _replicated(cluster: LocalCluster) -> bool:
    """True when every live replica's link is up and has acknowledged its primary's whole stream."""
    for n in _alive(cluster):
        with contextlib.closing(n.client()) as c:
            info = c.info("replication")
        if info["role"] != "master":
            if info.get("master_link_status") != "up":
                return False
            continue
        offset = int(info["master_repl_offset"])
        replicas = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        if any(int(r["offset"]) != offset for r in replicas):
            return False
    return True


def wait_until(pred: object, timeout: float, what: str, interval: float = 0.02) -> float:
    """Poll ``pred()`` until true (bounded); returns the time.monotonic() at which it became true."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():  # type: ignore[operator]
            return time.monotonic()
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _failed_over(cluster: LocalCluster, victim: RedisProcess) -> bool:
    """Every live node says ``cluster_state:ok`` and none routes a slot to ``victim``."""
    for n in _alive(cluster):
        with contextlib.closing(n.client()) as c:
            if c.cluster("info").get("cluster_state") != "ok":
                return False
            if any(int(r[2][1]) == victim.port for r in c.execute_command("CLUSTER", "SLOTS")):
                return False
    return True


# ----- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(redis_bin: str) -> Iterator[LocalCluster]:
    cl = start_cluster(3, 1, maxmemory="256mb")
    try:
        for n in cl.nodes:
            with contextlib.closing(n.client()) as c:
                # Runtime settings: fast failure detection, failover allowed whatever the replica's data
                # age (it is in sync: see _replicated), and no 5 s wait before the first full sync.
                c.config_set("cluster-node-timeout", NODE_TIMEOUT_MS)
                c.config_set("cluster-replica-validity-factor", 0)
                c.config_set("repl-diskless-sync-delay", 0)
        wait_until(lambda: _replicated(cl), 30, "replicas in sync")
        yield cl
    finally:
        cl.stop()


@pytest.fixture(scope="module")
def frontends(cluster: LocalCluster) -> Iterator[list[ServerProcess]]:
    """Two ``kvstore serve`` processes over the cluster."""
    procs: list[ServerProcess] = []
    try:
        for _ in range(2):
            procs.append(ServerProcess(cluster.url, extra_args=["--log-level", "WARNING"]).start())
        yield procs
    finally:
        for p in procs:
            p.stop()
            p.cleanup()


def _addr(proxy: TcpProxy) -> str:
    assert proxy.address is not None
    return f"{proxy.address[0]}:{proxy.address[1]}"


def store(addresses: list[str], ctx: Ctx, **kwargs: object) -> None:
    with KVCacheClient(addresses, timeout=30) as kvs:
        kvs.store(ctx.model, ctx.ids, blobs=ctx.blobs, **kwargs)


# ----- 1. a Redis primary dies during reads -------------------------------------------------------


@dataclass
class _Fetch:
    t0: float
    t1: float
    tokens: int  # verified prefix; -1 = error
    code: grpc.StatusCode | None = None


def test_primary_killed_during_reads(cluster: LocalCluster, frontends: list[ServerProcess]) -> None:
    ctx = make_ctx("kill-primary", seed=1, n_chunks=12)
    addrs = [f.address for f in frontends]
    store(addrs, ctx)
    wait_until(lambda: _replicated(cluster), 20, "the context replicated")
    victim = _slot_owner(cluster, record_key(ctx.model.namespace, ctx.hashes()[6]))

    log: list[_Fetch] = []
    stop = threading.Event()

    def reader() -> None:
        with KVCacheClient(addrs, timeout=5) as kvs:
            for _ in range(5000):  # bounded; stopped by the main thread long before
                if stop.is_set():
                    return
                t0 = time.monotonic()
                try:
                    res = kvs.fetch(ctx.model, ctx.ids, level=0)
                    log.append(_Fetch(t0, time.monotonic(), verified_prefix(res, ctx)))
                except KVStreamError as e:
                    log.append(_Fetch(t0, time.monotonic(), -1, e.code))
                    time.sleep(0.02)

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    try:
        wait_until(lambda: sum(f.tokens == ctx.tokens for f in log) >= 3, 20, "fetches before the kill")
        t_kill = time.monotonic()
        victim.proc.send_signal(signal.SIGKILL)
        victim.proc.wait()
        t_failover = wait_until(lambda: _failed_over(cluster, victim), 30, "the cluster's failover", 0.01)

        def healthy() -> bool:
            return any(f.t0 > t_kill and f.tokens == ctx.tokens for f in log)

        wait_until(healthy, FAILOVER_SLO_S + 10, "a full fetch after the failover", 0.01)
    finally:
        stop.set()
        th.join(30)
    assert not th.is_alive()
    after = [f for f in log if f.t0 > t_kill]
    first_full = min(f.t1 for f in after if f.tokens == ctx.tokens)
    errors = {f.code for f in log if f.tokens < 0}
    assert errors <= CLEAN_CODES, f"unclean errors {errors}"
    recovery = first_full - t_failover
    print(
        f"\nfailover: cluster {t_failover - t_kill:.2f} s, service {first_full - t_kill:.2f} s after "
        f"the kill (+{recovery:.2f} s); {len(after)} fetches after the kill: "
        f"{sum(f.tokens < 0 for f in after)} errors, "
        f"{sum(0 <= f.tokens < ctx.tokens for f in after)} shorter prefixes"
    )
    assert recovery <= FAILOVER_SLO_S, f"full fetches resumed {recovery:.2f} s after the failover"


# ----- 2. a front end dies mid-stream -------------------------------------------------------------


async def test_frontend_killed_mid_stream(cluster: LocalCluster, frontends: list[ServerProcess]) -> None:
    ctx = make_ctx("kill-frontend", seed=2, n_chunks=16)
    total = sum(len(b[0]) for b in ctx.blobs)
    victim = ServerProcess(cluster.url, extra_args=["--log-level", "WARNING"]).start()
    try:
        # Both front ends behind proxies: the victim's is rate-limited so the stream is long enough to
        # kill it part-way; the survivor's counts the bytes it delivered after the resume.
        async with (
            TcpProxy(victim.address, rate_mbit=30) as slow,
            TcpProxy(frontends[0].address) as survivor,
        ):
            addrs = [_addr(slow), _addr(survivor)]
            async with AsyncKVCacheClient(addrs[1], timeout=30) as kvs:
                await kvs.store(ctx.model, ctx.ids, blobs=ctx.blobs)
            survivor.stats.bytes_down = 0
            async with AsyncKVCacheClient(addrs, timeout=30) as kvs:
                fetch = asyncio.create_task(kvs.fetch(ctx.model, ctx.ids, level=0))
                for _ in range(1000):  # up to ~10 s
                    if slow.stats.bytes_down > total // 3 or fetch.done():
                        break
                    await asyncio.sleep(0.01)
                assert not fetch.done(), "the stream ended before the kill"
                os.kill(victim.proc.pid, signal.SIGKILL)  # type: ignore[union-attr]
                res = await asyncio.wait_for(fetch, 30)
    finally:
        victim.stop()
        victim.cleanup()
    assert verified_prefix(res, ctx) == ctx.tokens and not res.truncated
    # resumed from the first unverified chunk: the survivor sent less than the whole context
    assert 0 < survivor.stats.bytes_down < total, (survivor.stats.bytes_down, total)


# ----- 3. a front end is partitioned from one shard -----------------------------------------------


async def test_partition_from_one_shard(cluster: LocalCluster) -> None:
    """A black-holing proxy between an in-process front end and one primary: deadline-bounded results."""
    ctx = make_ctx("partition", seed=3, n_chunks=16)
    hashes = ctx.hashes()
    ns = ctx.model.namespace
    live = _alive(cluster)
    # Partition the shard of the first chunk that is not on chunk 0's shard, so a prefix can exist.
    first = _slot_owner(cluster, record_key(ns, hashes[0]))
    cut_at, target = next(
        (i, o) for i, h in enumerate(hashes) if (o := _slot_owner(cluster, record_key(ns, h))) is not first
    )
    async with TcpProxy((HOST, target.port)) as link:

        def remap(addr: tuple[str, int]) -> tuple[str, int]:
            return link.address if addr[1] == target.port else addr  # type: ignore[return-value]

        seeds = [ClusterNode(HOST, n.port) for n in live if n is not target]
        client = RedisCluster(startup_nodes=seeds, address_remap=remap, socket_timeout=30)
        backend = ClusterBackend(cluster.url, client, node_timeout=0.5)  # well inside the 1.5 s deadline
        # No hot-chunk cache: it would serve the repeat fetches below from memory, past the partition.
        config = ServerConfig(listen="127.0.0.1:0", health_interval=0.2, grace_seconds=0.1, hot_cache_bytes=0)
        server = KVStreamServer(config, backend=backend)
        await server.start()
        try:
            # Slow client link with shallow buffers (proxy, no HTTP/2 window growth), so the server reads
            # each chunk from Redis shortly before it is sent rather than all at once up front.
            async with TcpProxy(server.address, rate_mbit=20, max_buffer_bytes=64 << 10) as front:
                addr = _addr(front)
                async with AsyncKVCacheClient(server.address, timeout=30) as kvs:
                    await kvs.store(ctx.model, ctx.ids, blobs=ctx.blobs)
                    assert verified_prefix(await kvs.fetch(ctx.model, ctx.ids, level=0), ctx) == ctx.tokens

                deadline = 1.5
                # (a) partitioned before the request: the lookup gives up on the silent shard after the
                # backend's node_timeout and serves the prefix before its first chunk, within the deadline.
                link.set(delay_ms=3_600_000)
                async with AsyncKVCacheClient(server.address, timeout=deadline) as kvs:
                    t0 = time.monotonic()
                    res = await kvs.fetch(ctx.model, ctx.ids, level=0)
                    took = time.monotonic() - t0
                assert verified_prefix(res, ctx) == cut_at * CHUNK, (cut_at, res.prefix_tokens)
                assert took < deadline + 0.5, took
                link.set(delay_ms=0)
                link.kill()  # heal: drop the connections holding black-holed bytes

                # (b) partitioned mid-stream: the chunks read before it arrive, then a truncated trailer.
                opts = [("grpc.http2.bdp_probe", 0)]
                async with AsyncKVCacheClient(addr, timeout=deadline * 2, channel_options=opts) as kvs:
                    t0 = time.monotonic()
                    fetch = asyncio.create_task(kvs.fetch(ctx.model, ctx.ids, level=0))
                    for _ in range(1000):
                        if front.stats.bytes_down > 150_000 or fetch.done():
                            break
                        await asyncio.sleep(0.005)
                    link.set(delay_ms=3_600_000)
                    res = await asyncio.wait_for(fetch, deadline * 2 + 5)
                    took = time.monotonic() - t0
                assert took < deadline * 2 + 0.5, took
                got = verified_prefix(res, ctx)
                assert res.truncated and "deadline" in res.reason, res.reason
                assert got < ctx.tokens
                print(f"\ncut mid-stream: {got // CHUNK}/{len(hashes)} chunks, {took:.2f} s, {res.reason}")
                link.set(delay_ms=0)
                link.kill()

                # healed: the next fetch is complete and exact
                async with AsyncKVCacheClient(server.address, timeout=10) as kvs:
                    res = await kvs.fetch(ctx.model, ctx.ids, level=0)
                assert verified_prefix(res, ctx) == ctx.tokens and not res.truncated
        finally:
            await server.stop(0)
    assert cut_at > 0


# ----- 4. memory full ---------------------------------------------------------------------------


def test_maxmemory_evicts_unpinned_only(cluster: LocalCluster, frontends: list[ServerProcess]) -> None:
    addrs = [f.address for f in frontends]
    primaries = _primaries(cluster)
    pinned = make_ctx("memfull", seed=40, n_chunks=6)
    others = [make_ctx("memfull", seed=41 + i, n_chunks=6) for i in range(16)]  # ~21 MB in all
    try:
        store(addrs, pinned, pin=True)
        for n in primaries:
            with contextlib.closing(n.client()) as c:
                used = int(c.info("memory")["used_memory"])
                c.config_set("maxmemory", used + (4 << 20))  # ~12 MB of data room across 3 shards
        for ctx in others:
            store(addrs, ctx)
        evicted = 0
        for n in primaries:
            with contextlib.closing(n.client()) as c:
                evicted += int(c.info("stats")["evicted_keys"])
        assert evicted > 0, "nothing was evicted: the test did not fill memory"

        with KVCacheClient(addrs, timeout=30) as kvs:
            res = kvs.fetch(pinned.model, pinned.ids, level=0)
            assert verified_prefix(res, pinned) == pinned.tokens and not res.truncated
            got = [verified_prefix(kvs.fetch(c.model, c.ids, level=0), c) for c in others]
        assert min(got) < others[0].tokens, f"no unpinned context lost a chunk: {got}"
        print(f"\nmaxmemory: {evicted} keys evicted; unpinned prefixes (chunks) {[g // CHUNK for g in got]}")
        # every pinned key is still there, with no TTL (keys live on several shards)
        rc = redis.RedisCluster(host=HOST, port=_alive(cluster)[0].port)
        try:
            ns = pinned.model.namespace
            keys = [manifest_key(ns, pinned.hashes()[-1])]
            keys += [k for h in pinned.hashes() for k in (record_key(ns, h), blob_key(ns, h, 0))]
            assert all(rc.pttl(k) == -1 for k in keys)
        finally:
            rc.close()
    finally:
        for n in primaries:
            with contextlib.closing(n.client()) as c:
                c.config_set("maxmemory", 256 << 20)
                c.flushall()


# ----- 5. concurrent writers of one context -------------------------------------------------------


def test_concurrent_writers_one_manifest(frontends: list[ServerProcess], cluster: LocalCluster) -> None:
    ctx = make_ctx("writers", seed=5, n_chunks=8)
    addrs = [f.address for f in frontends]
    barrier = threading.Barrier(8)
    ids: list[bytes] = []
    failures: list[BaseException] = []

    def writer(k: int) -> None:
        try:
            with KVCacheClient(addrs[k % 2 :] + addrs[: k % 2], timeout=30) as kvs:
                barrier.wait(10)
                ids.append(kvs.store(ctx.model, ctx.ids, blobs=ctx.blobs).context_id)
        except BaseException as e:  # reported below: a thread's exception would be lost
            failures.append(e)

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    assert len(ids) == 8 and len(set(ids)) == 1
    with KVCacheClient(addrs, timeout=30) as kvs:
        listed = kvs.ls("faults", namespace=ctx.model.namespace)
        assert [c.context_id for c in listed] == ids[:1]
        for _ in range(4):  # readers on both front ends (round robin)
            res = kvs.fetch(ctx.model, ctx.ids, level=0)
            assert verified_prefix(res, ctx) == ctx.tokens
    rc = redis.RedisCluster(host=HOST, port=_alive(cluster)[0].port)
    try:
        mans = list(rc.scan_iter(match="kvs:{" + ctx.model.namespace + ":*}:man"))
        assert len(mans) == 1
        for h in ctx.hashes():
            assert rc.smembers(f"kvs:{{{ctx.model.namespace}:{h.hex()}}}:refs") == {ids[0]}
    finally:
        rc.close()
