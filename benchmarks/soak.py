"""Soak test: many concurrent fetch streams against ``kvstore serve`` front ends over a local Redis Cluster.

Starts a 3+3 Redis Cluster and ``--frontends`` server processes on loopback, stores ``--contexts``
contexts of ``--chunks`` lossless chunks (random fp16 ``[4, 2, 64, 8, 32]``, ~220 KB each), then runs
``--streams`` concurrent ``StreamContext`` loops (round robin over the front ends) until ``--seconds``
pass or ``--max-requests`` fetches are done. Every received blob is checked against the stored blob's
xxh3, so wrong bytes count as errors. Reports throughput, p50/p99 chunk latency (first chunk: request to
its last byte; later chunks: gap since the previous chunk), errors, and each front end's RSS over time
(``/proc/<pid>/status`` VmRSS); flags a leak when RSS after warm-up grows by more than the threshold::

    python -m benchmarks.soak --seconds 300 --streams 16 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import torch
import xxhash

import codec
from client.api import prefix_route_key, rendezvous_order
from deploy.launch import ServerProcess, stop_on_sigterm
from deploy.redis_cluster import LocalCluster, redis_cluster
from kvstore.keys import ModelKey
from kvstore.rpc import pb, pb_grpc
from kvstore.wire import model_to_pb, split_parts

CHUNK_TOKENS = 64
SHAPE = (4, 8, 32)  # layers, kv_heads, head_dim of the synthetic chunks
CHANNEL_OPTS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
MODEL = ModelKey("soak", namespace="bench", chunk_tokens=CHUNK_TOKENS)


@dataclass(frozen=True)
class Context:
    """One stored context: token ids, its level-0 blobs and their xxh3 digests."""

    ids: list[int]
    blobs: list[bytes]
    digests: list[int]

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blobs)


def make_contexts(n_contexts: int, n_chunks: int, seed: int = 0) -> list[Context]:
    """Synthetic contexts with distinct token ids and barely compressible lossless blobs."""
    g = torch.Generator().manual_seed(seed)
    layers, heads, dim = SHAPE
    out = []
    for c in range(n_contexts):
        kv = torch.randn(layers, 2, n_chunks * CHUNK_TOKENS, heads, dim, generator=g).half()
        blobs = [
            codec.encode(kv[:, :, i * CHUNK_TOKENS : (i + 1) * CHUNK_TOKENS], 0) for i in range(n_chunks)
        ]
        ids = [(c * 1_000_003 + i) % 2**32 for i in range(n_chunks * CHUNK_TOKENS)]
        out.append(Context(ids, blobs, [xxhash.xxh3_64_intdigest(b) for b in blobs]))
    return out


async def store_context(stub: pb_grpc.KVStreamStub, ctx: Context) -> None:
    async def requests() -> Any:
        header = pb.PutHeader(model=model_to_pb(MODEL), token_ids=pb.TokenIds(ids=ctx.ids))
        yield pb.PutChunksRequest(header=header)
        for i, blob in enumerate(ctx.blobs):
            for off, data in split_parts(blob, 1 << 20):
                part = pb.ChunkPart(chunk_index=i, level=0, total_size=len(blob), offset=off, data=data)
                yield pb.PutChunksRequest(part=part)
        yield pb.PutChunksRequest(commit=pb.Commit())

    await stub.PutChunks(requests(), timeout=120)


class FetchError(Exception):
    """A fetch returned wrong, incomplete or no data (``kind`` names which)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


async def fetch_raw(
    stub: pb_grpc.KVStreamStub, ctx: Context, latencies: list[float], timeout: float = 30.0
) -> int:
    """One StreamContext of ``ctx`` at level 0; verifies every blob; appends chunk latencies (s)."""
    start = pb.StreamStart(model=model_to_pb(MODEL), token_ids=pb.TokenIds(ids=ctx.ids), level=0)
    call = stub.StreamContext(timeout=timeout)
    await call.write(pb.StreamContextRequest(start=start))
    await call.done_writing()
    t_prev = time.perf_counter()
    buf = bytearray()
    got = 0
    trailer: pb.StreamTrailer | None = None
    async for resp in call:
        kind = resp.WhichOneof("msg")
        if kind == "chunk":
            msg = resp.chunk
            if msg.offset != len(buf):
                raise FetchError("part out of order")
            buf += msg.data
            if not msg.last:
                continue
            if msg.chunk_index != got or xxhash.xxh3_64_intdigest(bytes(buf)) != ctx.digests[got]:
                raise FetchError("wrong bytes")
            now = time.perf_counter()
            latencies.append(now - t_prev)
            t_prev, buf, got = now, bytearray(), got + 1
        elif kind == "trailer":
            trailer = resp.trailer
    if trailer is None or trailer.truncated or got != len(ctx.blobs):
        raise FetchError("truncated")
    return ctx.nbytes


def percentile(xs: Sequence[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class LoadResult:
    """Outcome of one load phase."""

    seconds: float
    requests: int
    bytes: int
    latencies: list[float]
    errors: Counter[str] = field(default_factory=Counter)

    def summary(self) -> dict[str, Any]:
        return {
            "seconds": round(self.seconds, 3),
            "requests": self.requests,
            "throughput_MBps": round(self.bytes / self.seconds / 1e6, 2) if self.seconds else 0.0,
            "fetches_per_s": round(self.requests / self.seconds, 2) if self.seconds else 0.0,
            "chunk_latency_ms": {
                "p50": round(percentile(self.latencies, 0.50) * 1e3, 2),
                "p99": round(percentile(self.latencies, 0.99) * 1e3, 2),
                "n": len(self.latencies),
            },
            "errors": dict(self.errors),
        }


async def run_load(
    addresses: Sequence[str],
    contexts: Sequence[Context],
    *,
    streams: int,
    seconds: float,
    max_requests: int,
    seed: int = 0,
    route_by_prefix: bool = False,
) -> LoadResult:
    """``streams`` concurrent fetch loops, stream ``i`` on ``addresses[i % n]`` (with ``route_by_prefix``:
    each fetch on the front end the client's prefix routing picks for its context); bounded in time and
    count."""
    channels = [grpc.aio.insecure_channel(a, options=CHANNEL_OPTS) for a in addresses]
    stubs = [pb_grpc.KVStreamStub(ch) for ch in channels]
    routed: dict[int, pb_grpc.KVStreamStub] = {}
    if route_by_prefix:
        for ctx in contexts:
            key = prefix_route_key(MODEL, ctx.ids)
            assert key is not None
            routed[id(ctx)] = stubs[list(addresses).index(rendezvous_order(addresses, key)[0])]
    res = LoadResult(0.0, 0, 0, [])
    budget = [max_requests]
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        stub = stubs[i % len(stubs)]
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            ctx = rng.choice(contexts)
            try:
                # not `res.bytes += await ...`: lost updates
                n = await fetch_raw(routed.get(id(ctx), stub), ctx, res.latencies)
                res.bytes += n
                res.requests += 1
            except FetchError as e:
                res.errors[e.kind] += 1
            except grpc.aio.AioRpcError as e:
                res.errors[e.code().name] += 1
                await asyncio.sleep(0.05)  # a failing front end must not turn this into a busy loop

    try:
        await asyncio.gather(*(worker(i) for i in range(streams)))
    finally:
        for ch in channels:
            await ch.close()
    res.seconds = time.perf_counter() - t0
    return res


def rss_mb(pid: int) -> float:
    """Resident set size of ``pid`` in MiB (``VmRSS``)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@contextlib.contextmanager
def testbed(n_frontends: int, maxmemory: str = "512mb") -> Iterator[tuple[LocalCluster, list[ServerProcess]]]:
    """A 3+3 Redis Cluster and ``n_frontends`` ``kvstore serve`` processes over it; all stopped on exit."""
    with redis_cluster(3, 1, maxmemory=maxmemory) as cluster:
        procs: list[ServerProcess] = []
        try:
            for _ in range(n_frontends):
                procs.append(ServerProcess(cluster.url, extra_args=["--log-level", "WARNING"]).start())
            yield cluster, procs
        finally:
            for p in procs:
                p.stop()
                p.cleanup()


async def load_contexts(address: str, contexts: Sequence[Context]) -> None:
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTS) as ch:
        stub = pb_grpc.KVStreamStub(ch)
        for ctx in contexts:
            await store_context(stub, ctx)


def leak_verdict(samples: list[tuple[float, float]], warmup_s: float, threshold_mb: float) -> dict[str, Any]:
    """Compare RSS (median of the first 3 samples after warm-up vs of the last 3): growth and a flag."""
    after = [mb for t, mb in samples if t >= warmup_s]
    if len(after) < 6:
        return {"growth_mb": None, "leak": None, "note": "too few samples after warm-up"}
    growth = statistics.median(after[-3:]) - statistics.median(after[:3])
    return {"growth_mb": round(growth, 1), "leak": growth > threshold_mb}


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    contexts = make_contexts(args.contexts, args.chunks, args.seed)
    with testbed(args.frontends) as (_, procs):
        addrs = [p.address for p in procs]
        await load_contexts(addrs[0], contexts)
        pids = [p.proc.pid for p in procs if p.proc is not None]
        rss: dict[int, list[tuple[float, float]]] = {pid: [] for pid in pids}
        t0 = time.perf_counter()

        async def sample() -> None:
            while True:
                for pid in pids:
                    rss[pid].append((time.perf_counter() - t0, rss_mb(pid)))
                await asyncio.sleep(args.rss_interval)

        sampler = asyncio.create_task(sample())
        try:
            res = await run_load(
                addrs,
                contexts,
                streams=args.streams,
                seconds=args.seconds,
                max_requests=args.max_requests,
                seed=args.seed,
            )
        finally:
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
        for pid in pids:
            rss[pid].append((time.perf_counter() - t0, rss_mb(pid)))
    warmup = args.warmup if args.warmup is not None else min(30.0, args.seconds * 0.2)
    frontends = [
        {
            "pid": pid,
            "rss_mb": [[round(t, 1), round(mb, 1)] for t, mb in samples],
            **leak_verdict(samples, warmup, args.leak_threshold_mb),
        }
        for pid, samples in rss.items()
    ]
    return {
        "benchmark": "soak",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "config": {
            "seconds": args.seconds,
            "max_requests": args.max_requests,
            "streams": args.streams,
            "frontends": args.frontends,
            "contexts": args.contexts,
            "chunks_per_context": args.chunks,
            "context_bytes": contexts[0].nbytes,
            "warmup_s": warmup,
            "leak_threshold_mb": args.leak_threshold_mb,
        },
        "load": res.summary(),
        "frontends": frontends,
        "leak": any(f["leak"] for f in frontends),
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=300.0, help="load duration")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="stop after this many fetches")
    ap.add_argument("--streams", type=int, default=16, help="concurrent fetch streams")
    ap.add_argument("--frontends", type=int, default=2)
    ap.add_argument("--contexts", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=8, help="chunks per context (~220 KB each)")
    ap.add_argument("--rss-interval", type=float, default=2.0, help="seconds between RSS samples")
    ap.add_argument("--warmup", type=float, default=None, help="seconds before RSS counts (default 20%%)")
    ap.add_argument("--leak-threshold-mb", type=float, default=64.0, help="RSS growth after warm-up = leak")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the JSON report to this file")
    args = ap.parse_args(argv)
    stop_on_sigterm()  # `kill` must stop the Redis nodes and front ends it started, like Ctrl-C
    try:
        report = asyncio.run(soak(args))
    except KeyboardInterrupt:
        print("soak: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    text = json.dumps(report, indent=2)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    summary = {k: report[k] for k in ("load", "leak")}
    summary["rss_growth_mb"] = [f["growth_mb"] for f in report["frontends"]]
    print(json.dumps(summary, indent=2))
    return 1 if report["leak"] or report["load"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
