"""Put/get throughput of KV chunks through the gRPC server vs direct ``ChunkStore`` access, per backend.

For each backend (embedded LMDB, one Redis server, a local Redis Cluster) and each chunk size (1 MiB,
4 MiB lossless blobs of random fp16 ``[8, 2, 64, 8, D]`` chunks), every repetition stores a fresh
context (new token ids, so nothing dedups) and reads it back:

* direct: ``ChunkStore.put`` / ``lookup`` + ``read_blob`` in this process (the server's own data path);
* gRPC: ``kvstore serve`` as a subprocess (uvloop) on the same backend; ``PutChunks`` with 1 MiB parts
  and ``StreamContext`` over a loopback channel, blobs reassembled and xxh3-checked by the client.

Reports medians in MB/s (1e6 bytes) of blob bytes and the gRPC/direct ratio::

    python benchmarks/grpc_bench.py [--backends embedded,redis,redis-cluster] [--reps 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402
import xxhash  # noqa: E402

import codec  # noqa: E402
from kvstore.backends import open_backend  # noqa: E402
from kvstore.keys import ModelKey  # noqa: E402
from kvstore.rpc import pb, pb_grpc  # noqa: E402
from kvstore.store import ChunkBlobs, ChunkStore, ContextQuery  # noqa: E402
from kvstore.wire import model_to_pb, split_parts  # noqa: E402

CHUNK_TOKENS = 64
SIZES = {"1MiB": 64, "4MiB": 256}  # head_dim D giving ~1 MiB / ~4 MiB raw fp16 per chunk
CONTEXT_BYTES = 16 << 20  # blob bytes per context: 16 x 1 MiB or 4 x 4 MiB chunks
PART_BYTES = 1 << 20
CHANNEL_OPTS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


def make_blobs(head_dim: int) -> list[bytes]:
    """Lossless blobs of random fp16 chunks ``[8, 2, 64, 8, head_dim]`` (barely compressible)."""
    n = max(2, CONTEXT_BYTES // (8 * 2 * CHUNK_TOKENS * 8 * head_dim * 2))
    g = torch.Generator().manual_seed(head_dim)
    return [
        codec.encode(torch.randn(8, 2, CHUNK_TOKENS, 8, head_dim, generator=g).half(), 0) for _ in range(n)
    ]


def token_ids(rep: int, n_chunks: int) -> list[int]:
    return [(rep * 7919 + i) % 50000 + rep * 100000 for i in range(n_chunks * CHUNK_TOKENS)]


# ----- direct -------------------------------------------------------------------------------------


async def bench_direct(url: str, blobs: list[bytes], reps: int, ns: str) -> tuple[list[float], list[float]]:
    backend = open_backend(url)
    store = ChunkStore(backend, default_ttl=3600)
    model = ModelKey("bench", namespace=ns, chunk_tokens=CHUNK_TOKENS)
    total = sum(map(len, blobs))
    puts, gets = [], []
    try:
        for rep in range(reps):
            ids = token_ids(rep, len(blobs))
            t0 = time.perf_counter()
            await store.put(model, ids, [ChunkBlobs({0: b}) for b in blobs])
            puts.append(total / (time.perf_counter() - t0) / 1e6)
            t0 = time.perf_counter()
            look = await store.lookup(model, ids)
            got = [await store.read_blob(model, c, 0) for c in look.chunks]
            gets.append(total / (time.perf_counter() - t0) / 1e6)
            assert got == blobs, "direct read returned other bytes"
            await store.delete(model, ContextQuery(token_ids=ids))
    finally:
        await backend.close()
    return puts, gets


# ----- gRPC ---------------------------------------------------------------------------------------


def start_server(url: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvstore", "serve", "--listen", "127.0.0.1:0", "--backend", url,
         "--log-level", "WARNING"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.match(r"kvstore listening on (\S+) ", line)
    if not m:
        proc.kill()
        raise RuntimeError(f"server did not start: {line!r}")
    return proc, m.group(1)


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)


async def _requests(
    model: ModelKey, ids: list[int], blobs: list[bytes]
) -> AsyncIterator[pb.PutChunksRequest]:
    yield pb.PutChunksRequest(header=pb.PutHeader(model=model_to_pb(model), token_ids=pb.TokenIds(ids=ids)))
    for i, blob in enumerate(blobs):
        for off, data in split_parts(blob, PART_BYTES):
            part = pb.ChunkPart(chunk_index=i, level=0, total_size=len(blob), offset=off, data=data)
            yield pb.PutChunksRequest(part=part)
    yield pb.PutChunksRequest(commit=pb.Commit())


async def _stream(stub: pb_grpc.KVStreamStub, model: ModelKey, ids: list[int]) -> list[bytes]:
    start = pb.StreamStart(
        model=model_to_pb(model), token_ids=pb.TokenIds(ids=ids), max_part_bytes=PART_BYTES
    )

    async def requests() -> AsyncIterator[pb.StreamContextRequest]:
        yield pb.StreamContextRequest(start=start)

    out: list[bytes] = []
    parts: list[bytes] = []
    async for resp in stub.StreamContext(requests()):
        if resp.WhichOneof("msg") == "chunk":
            parts.append(resp.chunk.data)
            if resp.chunk.last:
                blob = b"".join(parts)
                parts = []
                if xxhash.xxh3_64_intdigest(blob) != resp.chunk.xxh3_64:
                    raise RuntimeError("checksum mismatch")
                out.append(blob)
        elif resp.WhichOneof("msg") == "trailer" and resp.trailer.truncated:
            raise RuntimeError(f"stream truncated: {resp.trailer.reason}")
    return out


async def bench_grpc(address: str, blobs: list[bytes], reps: int, ns: str) -> tuple[list[float], list[float]]:
    model = ModelKey("bench", namespace=ns, chunk_tokens=CHUNK_TOKENS)
    total = sum(map(len, blobs))
    puts, gets = [], []
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTS) as ch:
        stub = pb_grpc.KVStreamStub(ch)
        for rep in range(reps):
            ids = token_ids(rep, len(blobs))
            t0 = time.perf_counter()
            await stub.PutChunks(_requests(model, ids, blobs))
            puts.append(total / (time.perf_counter() - t0) / 1e6)
            t0 = time.perf_counter()
            got = await _stream(stub, model, ids)
            gets.append(total / (time.perf_counter() - t0) / 1e6)
            assert got == blobs, "gRPC read returned other bytes"
            await stub.Delete(pb.ContextRef(model=model_to_pb(model), token_ids=pb.TokenIds(ids=ids)))
    return puts, gets


# ----- driver -------------------------------------------------------------------------------------


def backends(names: list[str], stack: ExitStack) -> Iterator[tuple[str, Callable[[str], str]]]:
    """``(name, url_for(tag))``: direct and gRPC runs get separate stores (LMDB) or namespaces (Redis)."""
    for name in names:
        if name == "embedded":
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvs-bench-")))
            yield name, lambda tag, tmp=tmp: f"embedded://{tmp / tag}"  # type: ignore[misc]
        elif name == "memory":
            yield name, lambda tag: "memory://"
        elif name in ("redis", "redis-cluster"):
            from deploy.redis_cluster import start_cluster, start_server

            srv = start_server(maxmemory="1gb") if name == "redis" else start_cluster(3, 0, maxmemory="1gb")
            stack.callback(srv.stop)
            yield name, lambda tag, url=srv.url: url  # type: ignore[misc]
        else:
            raise SystemExit(f"unknown backend {name!r}")


def run(names: list[str], reps: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    blobs_by_size = {label: make_blobs(d) for label, d in SIZES.items()}
    with ExitStack() as stack:
        for name, url_for in backends(names, stack):
            proc, address = start_server(url_for("grpc"))
            try:
                for label, blobs in blobs_by_size.items():
                    d_put, d_get = asyncio.run(bench_direct(url_for("direct"), blobs, reps, f"direct{label}"))
                    g_put, g_get = asyncio.run(bench_grpc(address, blobs, reps, f"grpc{label}"))
                    row = {
                        "blob_bytes": len(blobs[0]),
                        "chunks_per_context": len(blobs),
                        "direct_put_MBps": statistics.median(d_put),
                        "grpc_put_MBps": statistics.median(g_put),
                        "direct_get_MBps": statistics.median(d_get),
                        "grpc_get_MBps": statistics.median(g_get),
                    }
                    row["put_ratio"] = row["grpc_put_MBps"] / row["direct_put_MBps"]
                    row["get_ratio"] = row["grpc_get_MBps"] / row["direct_get_MBps"]
                    results.setdefault(name, {})[label] = {k: round(v, 3) for k, v in row.items()}
            finally:
                stop_server(proc)
    return {
        "benchmark": "grpc_bench",
        "reps": reps,
        "units": "MB/s of blob bytes (1e6), medians; ratio = gRPC / direct",
        "env": {"python": platform.python_version(), "cpus": os.cpu_count(), "grpc": grpc.__version__},
        "results": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="embedded,redis,redis-cluster",
                    help="comma-separated: embedded, memory, redis, redis-cluster")  # fmt: skip
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None, help="write the JSON report here ('-' = stdout only)")
    args = ap.parse_args()
    out = run([b for b in args.backends.split(",") if b], args.reps)
    if args.json == "-":
        print(json.dumps(out, indent=2))
        return
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"{'backend':<14}{'size':<6}{'put direct':>12}{'put gRPC':>10}{'ratio':>7}{'get direct':>12}"
          f"{'get gRPC':>10}{'ratio':>7}   (MB/s, median of {args.reps})")  # fmt: skip
    for name, sizes in out["results"].items():
        for label, r in sizes.items():
            put = f"{r['direct_put_MBps']:>12.1f}{r['grpc_put_MBps']:>10.1f}{r['put_ratio']:>7.2f}"
            get = f"{r['direct_get_MBps']:>12.1f}{r['grpc_get_MBps']:>10.1f}{r['get_ratio']:>7.2f}"
            print(f"{name:<14}{label:<6}{put}{get}")


if __name__ == "__main__":
    main()
