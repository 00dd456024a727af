"""Direct storage-backend throughput: put/get of multi-MiB values, no gRPC in between.

    python -m benchmarks.backend_bench --json out.json [--backends embedded,redis,redis-cluster]
        [--sizes 1MiB,4MiB] [--n 24] [--repeats 5] [--url redis://host:6379/0 ...]

Redis servers (one node; a 3 + 3 cluster) are started on loopback with deploy/redis_cluster.py; the
embedded store lives in a temporary directory (``--embedded-dir`` to put it on another disk). For each
value size, each repeat writes ``n`` fresh keys and reads them back, once one key per call (``single``:
latency-bound, what one stream sees) and once ``batch`` keys per ``put_many``/``get_many`` (pipelined).
Throughput = payload MiB / wall seconds; the JSON reports the median over repeats (and every sample).
``bench_backend(url, sizes, n)`` is reusable from other benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvstore.backends import open_backend, parse_size

MiB = 1 << 20


async def _timed(coro: Any) -> float:
    t0 = time.perf_counter()
    await coro
    return time.perf_counter() - t0


async def bench_backend(
    url: str, sizes: Sequence[int] = (MiB, 4 * MiB), n: int = 24, repeats: int = 5, batch: int = 8
) -> dict[str, Any]:
    """Put/get throughput of the backend at ``url`` (MiB/s medians); removes the keys it wrote.

    Returns ``{"backend", "results": [{"size_bytes", "mode", "op", "mib_s_median", "mib_s"}]}``.
    """
    backend = open_backend(url)
    results: list[dict[str, Any]] = []
    try:
        for size in sizes:
            values = [os.urandom(size) for _ in range(n)]  # incompressible, like encoded KV
            mib = n * size / MiB
            for mode in ("single", f"batch{batch}"):
                samples: dict[str, list[float]] = {"put": [], "get": []}
                for rep in range(repeats):
                    keys = [f"kvs:{{bench:{size}:{mode}:{rep}:{i}}}:L2" for i in range(n)]
                    items = list(zip(keys, values, strict=True))
                    step = 1 if mode == "single" else batch
                    put_s = get_s = 0.0
                    for i in range(0, n, step):
                        put_s += await _timed(backend.put_many(items[i : i + step], 600))
                    for i in range(0, n, step):
                        t0 = time.perf_counter()
                        got = await backend.get_many(keys[i : i + step])
                        get_s += time.perf_counter() - t0
                        if got != values[i : i + step]:
                            raise RuntimeError(f"{url}: read back different bytes")
                    samples["put"].append(mib / put_s)
                    samples["get"].append(mib / get_s)
                    await backend.delete_many(keys)
                for op, mib_s in samples.items():
                    results.append(
                        {
                            "size_bytes": size,
                            "mode": mode,
                            "op": op,
                            "mib_s_median": round(statistics.median(mib_s), 1),
                            "mib_s": [round(x, 1) for x in mib_s],
                        }
                    )
    finally:
        await backend.close()
    return {"backend": backend.name, "results": results}


def _print_table(report: dict[str, Any]) -> None:
    for run in report["runs"]:
        for r in run["results"]:
            print(
                f"{run['backend']:>14} {r['size_bytes'] // MiB:>3} MiB {r['mode']:>7} {r['op']:>3}: "
                f"{r['mib_s_median']:>8.1f} MiB/s (median of {len(r['mib_s'])})"
            )


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="embedded,redis,redis-cluster")
    ap.add_argument("--url", action="append", default=[], help="also bench an existing backend URL")
    ap.add_argument("--sizes", default="1MiB,4MiB")
    ap.add_argument("--n", type=int, default=24, help="values per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--embedded-dir", default=None, help="parent directory for the embedded store")
    ap.add_argument("--json", default=None, help="write the report here ('-' = stdout)")
    args = ap.parse_args(argv)

    from deploy.redis_cluster import redis_cluster, redis_server

    sizes = [parse_size(s) for s in args.sizes.split(",")]
    kinds = [k for k in args.backends.split(",") if k]
    runs: list[dict[str, Any]] = []

    def bench(url: str) -> None:
        print(f"benchmarking {url.split('@')[-1]} ...", file=sys.stderr)
        runs.append(asyncio.run(bench_backend(url, sizes, args.n, args.repeats, args.batch)))

    with contextlib.ExitStack() as stack:
        for kind in kinds:
            if kind == "embedded":
                tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=args.embedded_dir))
                bench(f"embedded://{tmp}/db")
            elif kind == "memory":
                bench("memory://")
            elif kind == "redis":
                bench(stack.enter_context(redis_server()).url)
            elif kind == "redis-cluster":
                bench(stack.enter_context(redis_cluster(3, 1)).url)
            else:
                ap.error(f"unknown backend kind {kind!r}")
        for url in args.url:
            bench(url)

    report = {
        "benchmark": "backend_bench",
        "params": {"sizes": sizes, "n": args.n, "repeats": args.repeats, "batch": args.batch},
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()},
        "runs": runs,
    }
    _print_table(report)
    if args.json == "-":
        print(json.dumps(report, indent=2))
    elif args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
