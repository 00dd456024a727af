"""Local scale-out demo: a 3-primary + 3-replica Redis Cluster and N stateless kvstream front ends.

Everything runs on loopback as foreground child processes of this one (never daemonized):

1. start the Redis Cluster (``deploy.redis_cluster``, ``maxmemory-policy volatile-lru``);
2. start ``--front-ends`` ``kvstore serve --backend redis+cluster://...`` processes (``deploy.launch``),
   each with a Prometheus ``/metrics`` port, and wait until every one answers the gRPC health check
   with SERVING and serves ``/metrics``;
3. print the gRPC addresses and metrics URLs;
4. smoke workload (unless ``--no-smoke``): store one context ``[layers, 2, tokens, kv_heads, head_dim]``
   float16 through front end 1, then fetch it from every other front end: the lossless level must be
   bit-exact and the default lossy level byte-identical across front ends;
5. keep running for ``--seconds`` (0 = exit right after the smoke test), then stop everything.
   Ctrl-C / SIGTERM stop everything cleanly at any point.

Exit codes: 0 ok (also when stopped by a signal while holding), 1 smoke test or a child failed,
130 interrupted before the cluster was up and checked.

Run: ``python -m deploy.cluster_demo [--front-ends 3] [--seconds 20]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

import codec
from client import KVCacheClient
from deploy.launch import ServerProcess, free_port, stop_on_sigterm
from deploy.redis_cluster import LocalCluster, start_cluster
from kvstore.keys import ModelKey

# stories260K's KV geometry: [layers=5, 2, tokens, kv_heads=4, head_dim=8]
_LAYERS, _KV_HEADS, _HEAD_DIM = 5, 4, 8


class DemoFailure(RuntimeError):
    """A front end did not become healthy, died, or the smoke test found a difference."""


@dataclass
class FrontEnd:
    """One ``kvstore serve`` child and where to reach it."""

    process: ServerProcess
    metrics_port: int

    @property
    def address(self) -> str:
        return self.process.address

    @property
    def metrics_url(self) -> str:
        return f"http://{self.process.host}:{self.metrics_port}/metrics"


def grpc_health(address: str, timeout: float = 2.0) -> str:
    """Status name of the ``grpc.health.v1`` check of the whole server (``""``), e.g. ``"SERVING"``."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status))


def wait_healthy(fe: FrontEnd, timeout: float = 30.0) -> None:
    """Block until ``fe`` reports SERVING and serves kvstream metrics; raises ``DemoFailure``."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        proc = fe.process.proc
        if proc is not None and proc.poll() is not None:
            raise DemoFailure(f"front end {fe.address} exited ({proc.returncode}):\n{fe.process.log_tail()}")
        try:
            last = grpc_health(fe.address)
            if last == "SERVING":
                with urllib.request.urlopen(fe.metrics_url, timeout=2.0) as resp:
                    if b"kvstream_requests" in resp.read():
                        return
                    last = "metrics endpoint without kvstream metrics"
        except (grpc.RpcError, OSError) as e:  # not up yet
            last = str(e)
        time.sleep(0.2)
    raise DemoFailure(f"front end {fe.address} not healthy after {timeout:.0f} s: {last}")


def start_front_ends(backend: str, n: int, extra_args: Sequence[str] = ()) -> list[FrontEnd]:
    """Start ``n`` front ends on ``backend`` concurrently and wait until all are healthy.

    On failure every front end already started is stopped before the exception propagates.
    """
    front_ends = []
    for _ in range(n):
        metrics_port = free_port()
        proc = ServerProcess(backend, extra_args=["--metrics-port", str(metrics_port), *extra_args])
        front_ends.append(FrontEnd(proc, metrics_port))
    try:
        # Concurrent: each start pays the interpreter + torch import, which dominates start-up time.
        with ThreadPoolExecutor(max_workers=n) as pool:
            for started in [pool.submit(fe.process.start) for fe in front_ends]:
                started.result()
            for healthy in [pool.submit(wait_healthy, fe) for fe in front_ends]:
                healthy.result()
    except BaseException:
        stop_front_ends(front_ends)
        raise
    return front_ends


def stop_front_ends(front_ends: Sequence[FrontEnd]) -> list[int | None]:
    """SIGTERM every front end, wait for each, remove their logs; returns their exit codes."""
    codes = []
    for fe in front_ends:
        codes.append(fe.process.stop())
        with contextlib.suppress(FileNotFoundError):
            fe.process.cleanup()
    return codes


def smoke(front_ends: Sequence[FrontEnd], tokens: int = 256, chunk_tokens: int = 64, seed: int = 0) -> str:
    """Store one context through ``front_ends[0]`` and check every other front end returns the same bytes.

    The context is a seeded random float16 KV cache ``[5, 2, tokens, 4, 8]`` stored at every codec level
    under a fresh namespace. Returns a one-line summary; raises ``DemoFailure`` on any difference.
    """
    gen = torch.Generator().manual_seed(seed)
    kv = torch.randn(_LAYERS, 2, tokens, _KV_HEADS, _HEAD_DIM, generator=gen).to(torch.float16)
    ids = torch.randint(0, 512, (tokens,), generator=gen).tolist()
    model = ModelKey("cluster-demo", namespace=f"demo-{uuid.uuid4().hex[:12]}", chunk_tokens=chunk_tokens)
    with KVCacheClient(front_ends[0].address) as writer:
        put = writer.store(model, ids, kv, name="cluster-demo")
    if put.stored_tokens != tokens:
        raise DemoFailure(f"stored {put.stored_tokens} of {tokens} tokens")
    lossy_ref: bytes | None = None
    readers = front_ends[1:] or front_ends[:1]  # a single front end reads back its own write
    for fe in readers:
        with KVCacheClient(fe.address) as reader:
            exact = reader.fetch(model, ids, level=codec.LOSSLESS)
            lossy = reader.fetch(model, ids, level=codec.DEFAULT_LEVEL)
        for level, res in ((codec.LOSSLESS, exact), (codec.DEFAULT_LEVEL, lossy)):
            if res.kv is None or res.prefix_tokens != tokens or res.truncated:
                raise DemoFailure(
                    f"{fe.address} level {level}: got {res.prefix_tokens}/{tokens} tokens "
                    f"(truncated={res.truncated} {res.reason})"
                )
        assert exact.kv is not None and lossy.kv is not None
        if not torch.equal(exact.kv.view(torch.int16), kv.view(torch.int16)):
            raise DemoFailure(f"{fe.address}: lossless fetch differs from the stored KV cache")
        lossy_bytes = lossy.kv.contiguous().view(torch.int16).numpy().tobytes()
        if lossy_ref is None:
            lossy_ref = lossy_bytes
        elif lossy_bytes != lossy_ref:
            raise DemoFailure(f"{fe.address}: level {codec.DEFAULT_LEVEL} bytes differ between front ends")
    names = ", ".join(fe.address for fe in readers)
    return (
        f"stored {tokens} tokens ({put.stored_chunks} chunks x {len(codec.LEVELS)} levels, "
        f"{put.bytes_written:,} bytes) via {front_ends[0].address}; identical bytes from {names} "
        f"(level {codec.LOSSLESS} bit-exact, level {codec.DEFAULT_LEVEL} identical)"
    )


def keys_per_primary(cluster: LocalCluster) -> list[int]:
    """``DBSIZE`` of every primary (shows the keys spread over the slots)."""
    out = []
    for node in cluster.primaries():
        with contextlib.closing(node.client()) as c:
            out.append(int(c.dbsize()))
    return out


def _child_died(cluster: LocalCluster, front_ends: Sequence[FrontEnd]) -> str | None:
    for node in cluster.nodes:
        if node.proc.poll() is not None:
            return f"redis-server on port {node.port} exited ({node.proc.returncode})"
    for fe in front_ends:
        proc = fe.process.proc
        if proc is not None and proc.poll() is not None:
            return f"front end {fe.address} exited ({proc.returncode}):\n{fe.process.log_tail()}"
    return None


def _state(cluster: LocalCluster, front_ends: Sequence[FrontEnd]) -> dict[str, Any]:
    return {
        "backend": cluster.url,
        "redis_nodes": [{"port": n.port, "pid": n.proc.pid} for n in cluster.nodes],
        "front_ends": [
            {
                "address": fe.address,
                "metrics_url": fe.metrics_url,
                "pid": fe.process.proc.pid if fe.process.proc else None,
            }
            for fe in front_ends
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deploy.cluster_demo", description=__doc__.splitlines()[0])
    ap.add_argument("--front-ends", type=int, default=3, help="kvstore serve processes (default 3)")
    ap.add_argument(
        "--seconds", type=float, default=0.0, help="keep running this long after the smoke test (0 = exit)"
    )
    ap.add_argument("--no-smoke", action="store_true", help="skip the store/fetch smoke workload")
    ap.add_argument("--maxmemory", default="256mb", help="per Redis node (policy volatile-lru)")
    ap.add_argument("--json", type=Path, help="write addresses, pids and the outcome to this file")
    args = ap.parse_args(argv)
    if args.front_ends < 1:
        ap.error("--front-ends must be >= 1")
    if not 0 <= args.seconds <= 7 * 86400:
        ap.error("--seconds must be in [0, 604800]")

    stop_on_sigterm()  # `kill` stops as cleanly as Ctrl-C
    cluster: LocalCluster | None = None
    front_ends: list[FrontEnd] = []
    state: dict[str, Any] = {}
    code, holding = 1, False
    try:
        t0 = time.perf_counter()
        cluster = start_cluster(3, 1, maxmemory=args.maxmemory)
        print(f"redis cluster (3 primaries + 3 replicas, volatile-lru): {cluster.url}", flush=True)
        front_ends = start_front_ends(cluster.url, args.front_ends)
        for i, fe in enumerate(front_ends, 1):
            print(f"front end {i}: grpc {fe.address}  metrics {fe.metrics_url}  SERVING", flush=True)
        print(f"KVSTREAM_SERVER={','.join(fe.address for fe in front_ends)}", flush=True)
        state = _state(cluster, front_ends)
        if args.json:  # before "ready in": whoever waits for that line may read the file at once
            args.json.write_text(json.dumps(state, indent=2))
        print(f"ready in {time.perf_counter() - t0:.1f} s", flush=True)
        if not args.no_smoke:
            summary = smoke(front_ends)
            state["smoke"] = summary
            print(f"smoke OK: {summary}; keys per primary {keys_per_primary(cluster)}", flush=True)
        code, holding = 0, True
        if args.seconds > 0:
            print(f"running for {args.seconds:g} s (Ctrl-C to stop)", flush=True)
            deadline = time.monotonic() + args.seconds
            while time.monotonic() < deadline:
                if (why := _child_died(cluster, front_ends)) is not None:
                    raise DemoFailure(why)
                time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
    except KeyboardInterrupt:
        print("interrupted: stopping", flush=True)
        code = 0 if holding else 130
    except Exception as e:  # a failed start or smoke test: report it, then still clean up
        print(f"cluster demo FAILED: {e}", file=sys.stderr, flush=True)
        code = 1
    finally:
        # No second signal may cut the shutdown short and leak children; every stop below is bounded.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        exit_codes = stop_front_ends(front_ends)
        if cluster is not None:
            cluster.stop()
        print(
            f"stopped {len(front_ends)} front ends (exit codes {exit_codes}) and the Redis Cluster",
            flush=True,
        )
        if code == 0 and any(c != 0 for c in exit_codes):
            print("cluster demo FAILED: a front end did not shut down cleanly", file=sys.stderr, flush=True)
            code = 1
        if args.json:
            args.json.write_text(json.dumps({**state, "exit_code": code, "front_end_exit_codes": exit_codes}))
    return code


if __name__ == "__main__":
    sys.exit(main())
