"""Aggregate fetch throughput: 3 front ends vs 1 over one Redis Cluster, and vs direct redis-py reads.

Starts a 3+3 Redis Cluster on loopback and three ``kvstore serve`` processes, stores the same synthetic
contexts as ``benchmarks.soak`` (lossless ~220 KB chunks), then runs, ``--reps`` times interleaved,
for ``--seconds`` each with ``--streams`` concurrent streams:

* ``direct``: each request is one redis-py cluster pipeline of ``GET`` on every blob key of a context
  (the bytes the front end would read), xxh3 of each value computed like the gRPC client does;
* ``ceiling``: the same fetches against ``benchmarks.grpc_ceiling``, a stand-in front end that streams
  the blobs from memory (no lookup, storage read or verification): what Python gRPC alone costs here;
* ``fe1``: ``StreamContext`` fetches, all streams on one front end (hot-chunk cache on, the default);
* ``fe1_nocache``: the same on a front end started with ``--hot-cache-bytes 0``: every blob from Redis;
* ``fe3``: the same as ``fe1``, streams spread round robin over three front ends.

Reports median MB/s (blob bytes, 1e6), ``scaling = fe3 / fe1``, ``overhead = direct / fe - 1`` (time
the front end adds per byte; target <= 0.20) for each front-end phase and for the ceiling, p50/p99 chunk
latency, and the CPU seconds each group of processes used per phase: with few cores the load generator,
the front ends and Redis share them, so the scaling ratio is capped by CPU, not by the design::

    python -m benchmarks.scaling_bench [--seconds 15] [--streams 16] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import resource
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import xxhash
from redis.asyncio.cluster import ClusterNode, RedisCluster

from benchmarks.soak import MODEL, Context, LoadResult, load_contexts, make_contexts, run_load, testbed
from deploy.launch import ServerProcess
from deploy.redis_cluster import HOST, LocalCluster
from kvstore.keys import chunk_hashes
from kvstore.store import blob_key


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (``/proc/<pid>/stat``)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def run_direct(
    cluster: LocalCluster, contexts: Sequence[Context], *, streams: int, seconds: float, max_requests: int
) -> LoadResult:
    """Pipelined redis-py cluster reads of every blob of a context per request, ``streams`` at a time."""
    client = RedisCluster(startup_nodes=[ClusterNode(HOST, n.port) for n in cluster.nodes])
    await client.initialize()
    keys = [[blob_key(MODEL.namespace, h, 0) for h in chunk_hashes(MODEL, ctx.ids)] for ctx in contexts]
    res = LoadResult(0.0, 0, 0, [])
    budget = [max_requests]
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker(i: int) -> None:
        rng = random.Random(i)
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            c = rng.randrange(len(contexts))
            t = time.perf_counter()
            pipe = client.pipeline(transaction=False)
            for k in keys[c]:
                pipe.get(k)
            values = await pipe.execute()
            for v in values:
                if v is None:
                    res.errors["missing"] += 1
                else:
                    xxhash.xxh3_64_intdigest(v)
            # one round trip for the whole context: spread its time evenly over its chunks
            per_chunk = (time.perf_counter() - t) / len(values)
            res.latencies.extend([per_chunk] * len(values))
            res.bytes += contexts[c].nbytes
            res.requests += 1

    try:
        await asyncio.gather(*(worker(i) for i in range(streams)))
    finally:
        await client.aclose()
    res.seconds = time.perf_counter() - t0
    return res


async def bench(args: argparse.Namespace) -> dict[str, Any]:
    contexts = make_contexts(args.contexts, args.chunks, args.seed)
    phases = ("direct", "ceiling", "fe1", "fe1_nocache", "fe3", "fe3_small_cache", "fe3_small_cache_routed")
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in phases}
    data_args = ["--contexts", str(args.contexts), "--chunks", str(args.chunks), "--seed", str(args.seed)]
    working_set = sum(c.nbytes for c in contexts)
    with contextlib.ExitStack() as stack:
        cluster, procs = stack.enter_context(testbed(3))

        def front_end(cache_bytes: int) -> ServerProcess:
            flags = ["--log-level", "WARNING", "--hot-cache-bytes", str(cache_bytes)]
            return stack.enter_context(ServerProcess(cluster.url, extra_args=flags))

        nocache = front_end(0)
        # Front ends whose caches hold half the working set each: round robin makes each of them cache
        # everything (and miss half the time); prefix routing splits the contexts between them.
        small = [front_end(working_set // 2) for _ in range(3)]
        ceiling = stack.enter_context(ServerProcess(module="benchmarks.grpc_ceiling", extra_args=data_args))
        addrs = [p.address for p in procs]
        targets = {
            "ceiling": [ceiling.address],
            "fe1": addrs[:1],
            "fe1_nocache": [nocache.address],
            "fe3": addrs,
            "fe3_small_cache": [p.address for p in small],
            "fe3_small_cache_routed": [p.address for p in small],
        }
        await load_contexts(addrs[0], contexts)
        # CPU columns: the three front ends, the no-cache one, the three small-cache ones, the ceiling
        fe_pids = [p.proc.pid for p in (*procs, nocache, *small, ceiling) if p.proc is not None]
        redis_pids = [n.proc.pid for n in cluster.nodes]
        kw = {"streams": args.streams, "seconds": args.seconds, "max_requests": args.max_requests}
        for rep in range(args.reps):
            for phase in phases:
                cpu0 = ([_cpu_s(p) for p in fe_pids], sum(_cpu_s(p) for p in redis_pids), _self_cpu_s())
                if phase == "direct":
                    res = await run_direct(cluster, contexts, **kw)
                else:
                    routed = phase.endswith("_routed")
                    res = await run_load(targets[phase], contexts, seed=rep, route_by_prefix=routed, **kw)
                fe_cpu = [_cpu_s(p) - c for p, c in zip(fe_pids, cpu0[0], strict=True)]
                summary = res.summary()
                summary["cpu_s"] = {
                    "frontends": [round(c, 2) for c in fe_cpu],
                    "redis": round(sum(_cpu_s(p) for p in redis_pids) - cpu0[1], 2),
                    "load_generator": round(_self_cpu_s() - cpu0[2], 2),
                }
                runs[phase].append(summary)
                print(f"rep {rep} {phase}: {summary['throughput_MBps']} MB/s", file=sys.stderr, flush=True)

    def med(phase: str, *path: str) -> float:
        vals = []
        for r in runs[phase]:
            v: Any = r
            for p in path:
                v = v[p]
            vals.append(float(v))
        return statistics.median(vals)

    mbps = {p: med(p, "throughput_MBps") for p in runs}
    p99 = {p: med(p, "chunk_latency_ms", "p99") for p in runs}
    return {
        "benchmark": "scaling",
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "machine": platform.machine()},
        "config": {
            "seconds": args.seconds,
            "streams": args.streams,
            "reps": args.reps,
            "contexts": args.contexts,
            "chunks_per_context": args.chunks,
            "context_bytes": contexts[0].nbytes,
        },
        "median_MBps": mbps,
        "median_chunk_latency_ms": {
            p: {"p50": med(p, "chunk_latency_ms", "p50"), "p99": p99[p]} for p in runs
        },
        "scaling_fe3_over_fe1": round(mbps["fe3"] / mbps["fe1"], 3),
        # time added per byte over direct Redis reads; the ceiling's is what Python gRPC alone adds here
        **{f"overhead_{p}_vs_direct": round(mbps["direct"] / mbps[p] - 1, 3) for p in phases[1:]},
        "fe1_of_ceiling": round(mbps["fe1"] / mbps["ceiling"], 3),
        "prefix_routing_gain": round(mbps["fe3_small_cache_routed"] / mbps["fe3_small_cache"], 3),
        "small_cache_bytes": working_set // 2,
        "errors": sum(sum(r["errors"].values()) for rs in runs.values() for r in rs),
        "runs": runs,
    }


def plot(report: dict[str, Any], path: str) -> None:
    """Bar chart of aggregate throughput and p99 chunk latency: direct Redis, 1 and 3 front ends."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["direct", "ceiling", "fe1", "fe1_nocache", "fe3", "fe3_small_cache", "fe3_small_cache_routed"]
    labels = [
        "direct\nredis-py", "gRPC from\nmemory", "1 FE", "1 FE,\nno cache", "3 FEs", "3 FEs,\n1/2 cache",
        "3 FEs, 1/2\ncache, routed",
    ]  # fmt: skip
    colors = ["grey", "silver", "tab:blue", "lightsteelblue", "tab:green", "palegreen", "tab:olive"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 4.2))
    ax1.bar(labels, [report["median_MBps"][n] for n in names], color=colors)
    ax1.set_ylabel("aggregate fetch MB/s (median)")
    ax2.bar(labels, [report["median_chunk_latency_ms"][n]["p99"] for n in names],
            color=colors)  # fmt: skip
    ax2.set_ylabel("p99 chunk latency (ms)")
    cpus = report.get("host", {}).get("cpus", "?")
    fig.suptitle(f"Scale-out over a 3+3 Redis Cluster ({cpus} CPU cores shared by everything)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="duration of each phase")
    ap.add_argument("--max-requests", type=int, default=1_000_000, help="per phase")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--contexts", type=int, default=16, help="working set = contexts x chunks x ~222 KB")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the JSON report to this file")
    ap.add_argument("--plot", default=None, help="write a PNG of throughput and p99 latency here")
    args = ap.parse_args(argv)
    report = asyncio.run(bench(args))
    if args.plot:
        plot(report, args.plot)
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: v for k, v in report.items() if k != "runs"}, indent=2))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
