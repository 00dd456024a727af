"""Time-to-first-token of a stored context vs bandwidth: adaptive streaming against fixed-format baselines.

    python -m benchmarks.ttft_bench --json out.json --plot docs/ttft_vs_bandwidth.png [--tokens 8192]

Needs root + iproute2 (``deploy.netshape.ShapedLink``): a ``kvstore serve --backend memory://`` runs in the
server namespace, a client worker (``python -m benchmarks.ttft_bench worker``) in the client namespace
stores a synthetic Llama-8B-shaped context (``[32, 2, T, 8, 128]`` fp16, AR(1) over tokens, channel
offsets and outlier key channels: ``benchmarks.codec_bench.synthetic_llama_chunk``, one seed per chunk)
encoded once at every codec level, then fetches it through gRPC. "Unshaped loopback" is a second worker
in the server namespace talking to the server's own address (no veth, no shaper).

TTFT = ``fetch()`` wall time until the decoded KV is on the host (receive + pipelined decode):

* ``fp16``: every chunk at the lossless level 0 (zstd over fp16, bit-exact);
* ``int8``: int8-per-token KV travels as ``numel`` bytes (plus fp16 scales). The store only holds codec
  blobs, so the int8 baseline is a second context of the same chunk count whose level-0 blobs carry
  ``numel`` uniformly random bytes (viewed as fp16 of half the head dim; the lossless level is bit-exact
  for any bit pattern): zstd cannot shrink them, so each blob is ``numel`` payload bytes plus the frame
  and container headers. The per-token scales (0.2% more bytes) are left out, in the baseline's favour.
  A pipelined int8 client dequantizes each chunk while the next one arrives, so its TTFT is modelled
  from the stand-in fetch's measured chunk arrivals and the measured single-thread dequant time ``d``
  of one real-shape int8 chunk (``int8_dequant_seconds``): chunk ``i`` arrives at ``a_i`` (the fetch's
  end minus the stand-in's own decode of its last chunk, a zstd pass-through an int8 client does not
  do, then back by the measured gaps between arrivals), one dequant thread takes the chunks in order,
  ``f_i = max(f_{i-1}, a_i) + d``, and TTFT is ``f_last`` (at least ``max(a_last, a_0 + (n-1) d) + d``).
  The dequant's CPU contention with the receive path is not charged (in the baseline's favour); the
  JSON's ``int8_model`` says the same;
* ``adaptive``: ``fetch(slo=...)`` with ``slo = --slo-fraction x`` the median fp16 TTFT at that
  bandwidth, so the planner must shrink the context by ~1/fraction; the levels it chose are reported.
* ``capped``: the same SLO with ``max_level=codec.DEFAULT_LEVEL``: never coarser than the default level's
  quality (the SLO is missed where that cannot fit; no recompute offered).

SLO hit rate: ``--trace-runs`` seeded bandwidth traces stepping every ``slo/4`` between 0.1 and 2 Gbit/s,
each played under an adaptive fetch, a fixed default-level fetch and a fixed smallest-level fetch, for two
SLOs: ``floor`` (the smallest level at a steady 0.1 Gbit/s: the tightest promise streaming alone can
keep on this link) and ``tight`` (the default level at a steady 1 Gbit/s, with recompute on the
inference node at ``--recompute-tps``); see ``_trace_runs``. The worker runs
with ``OMP_NUM_THREADS=1``: on 2 cores shared with the server, OpenMP's spinning threads otherwise add
~0.2 s to every tensor op.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import xxhash

DEFAULT_SHAPE = (32, 8, 128)  # layers, kv_heads, head_dim of Llama-3-8B
SERVER_PORT = 50551
INT8_SUFFIX = "-int8eq"


# ----- data -------------------------------------------------------------------------------------


def token_ids(n: int, seed: int) -> list[int]:
    """``n`` deterministic token ids (the context's key material)."""
    return np.random.default_rng(seed).integers(0, 32000, n).tolist()


def synthetic_context(
    tokens: int, chunk_tokens: int, shape: Sequence[int] = DEFAULT_SHAPE, seed: int = 0
) -> torch.Tensor:
    """fp16 ``[layers, 2, tokens, kv_heads, head_dim]``, Llama-like statistics, a different seed per chunk."""
    from benchmarks.codec_bench import synthetic_llama_chunk

    layers, heads, head_dim = shape
    n = -(-tokens // chunk_tokens)
    parts = [synthetic_llama_chunk(seed * 1000 + i, layers, chunk_tokens, heads, head_dim) for i in range(n)]
    return torch.cat(parts, dim=2)[:, :, :tokens].contiguous()


def int8_equivalent(kv: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``kv.numel()`` uniformly random bytes viewed as fp16 ``[L, 2, T, H, D/2]``: its lossless blob is as
    large as ``kv`` in int8 (zstd finds nothing to shrink in uniform random bytes and stores them raw).

    Every 16-bit pattern is allowed, inf/NaN included: the lossless level reproduces bits, and nothing
    reads the values. (Clearing a bit to avoid them would let zstd's byte-plane coding drop 1/16.)
    """
    if kv.shape[-1] % 2:
        raise ValueError(f"head_dim must be even, got {kv.shape[-1]}")
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(0, 256, tuple(kv.shape), generator=g, dtype=torch.uint8)
    return raw.view(torch.float16)


INT8_MODEL = (
    "pipelined int8 client: chunk arrivals a_i from the int8-sized stand-in fetch (its end minus the "
    "stand-in's own decode of the last chunk, earlier arrivals back by the measured gaps), one dequant "
    "thread f_i = max(f_(i-1), a_i) + d with d = int8_dequant_per_chunk_seconds (measured, 1 thread); "
    "int8_seconds = median over repeats of f_last; dequant CPU contention with the receive not charged"
)


def int8_pipelined_seconds(fetch: dict[str, Any], dequant_per_chunk: float) -> float:
    """TTFT of a pipelined int8 client, from one stand-in fetch's reply (see the module docstring)."""
    chunks = fetch["chunks"]  # [index, level, bytes, recv s (gap since previous arrival), decode s]
    last_arrival = fetch["seconds"] - chunks[-1][4]
    arrivals = [last_arrival - sum(c[3] for c in chunks[i + 1 :]) for i in range(len(chunks))]
    done = 0.0
    for a in arrivals:
        done = max(done, a) + dequant_per_chunk
    return done


def int8_dequant_seconds(kv: torch.Tensor, repeats: int = 3) -> float:
    """Median time to turn int8-per-token KV (one fp16 scale per layer, K/V, token) of ``kv``'s shape back
    into fp16: the decode cost of the int8 baseline."""
    x = kv.float()
    scale = x.abs().amax(dim=(-1, -2), keepdim=True).clamp_min(1e-8) / 127
    q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)
    s16 = scale.half()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        (q.float() * s16.float()).half()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ----- worker: a kvstream client driven by JSON lines (runs inside a namespace) ---------------------


async def _worker_loop(addresses: list[str], inp: IO[str], out: IO[str]) -> None:
    import codec
    from client import AsyncKVCacheClient, KVStreamError
    from kvstore.keys import ModelKey

    def reply(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    # Decode once at every level first: the lossy decoders are JIT-compiled on first use, a one-off
    # cost a long-running inference server never pays per request.
    warm = synthetic_context(16, 16, (1, 1, 8))
    for level in codec.LEVELS:
        codec.decode(codec.encode(warm, level))
    async with AsyncKVCacheClient(addresses, timeout=600.0) as client:
        reply({"ready": True})
        for line in inp:
            msg = json.loads(line)
            op = msg.pop("op")
            if op == "quit":
                return
            model = ModelKey(msg["model"], chunk_tokens=msg["chunk_tokens"])
            ids = token_ids(msg["tokens"], msg["seed"])
            if op == "wait":  # the server may still be starting
                deadline = time.monotonic() + 60
                while True:
                    try:
                        await client.lookup(model, ids)
                        break
                    except KVStreamError:
                        if time.monotonic() > deadline:
                            raise
                        await asyncio.sleep(0.2)
                reply({"ok": True})
            elif op == "store":
                kv = synthetic_context(msg["tokens"], msg["chunk_tokens"], msg["shape"], msg["seed"])
                levels: Sequence[int] = codec.LEVELS
                if msg.get("int8eq"):
                    kv, levels = int8_equivalent(kv, msg["seed"]), (codec.LOSSLESS,)
                t0 = time.perf_counter()
                blobs = codec.encode_context(kv, msg["chunk_tokens"], tuple(levels))
                encode_s = time.perf_counter() - t0
                await client.store(model, ids, blobs=blobs)
                level_bytes = {str(lv): sum(len(b[lv]) for b in blobs) for lv in levels}
                reply({"level_bytes": level_bytes, "raw_bytes": kv.numel() * 2, "encode_seconds": encode_s})
            elif op == "fetch":
                if msg.get("forget"):  # no estimates carried over from earlier fetches
                    client.bandwidth = client.decode_rate = None
                await client.lookup(model, ids)  # warm connection: TTFT excludes the TCP/HTTP2 handshake
                res = await client.fetch(
                    model,
                    ids,
                    slo=msg.get("slo"),
                    level=msg.get("level"),
                    max_level=msg.get("max_level"),
                    recompute_tokens_per_second=msg.get("recompute_tps", 0.0),
                    bandwidth_hint_bps=msg.get("hint_bps"),
                )
                kv_hash = None
                if msg.get("hash") and res.kv is not None:
                    kv_hash = xxhash.xxh3_64_hexdigest(res.kv.contiguous().view(torch.uint8).numpy().data)
                reply(
                    {
                        "seconds": res.seconds,
                        "prefix_tokens": res.prefix_tokens,
                        "nbytes": sum(c.nbytes for c in res.chunks),
                        "levels": [c.level for c in res.chunks],
                        "chunks": [
                            [c.index, c.level, c.nbytes, c.recv_seconds, c.decode_seconds] for c in res.chunks
                        ],
                        "recompute": res.recompute,
                        "truncated": res.truncated,
                        "reason": res.reason,
                        "kv_xxh3": kv_hash,
                        "bandwidth_bps": client.bandwidth,
                    }
                )
            else:
                raise ValueError(f"unknown op {op!r}")


class ClientWorker:
    """A ``benchmarks.ttft_bench worker`` child process, started by ``popen(argv, **kwargs)``
    (``subprocess.Popen``, or ``functools.partial(link.popen, link.client.ns)`` inside a namespace)."""

    def __init__(self, popen: Callable[..., Any], argv: Sequence[str], ready_timeout: float = 120.0) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - lives as long as the process
        self.proc: subprocess.Popen[str] = popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True
        )
        self.read(ready_timeout)

    def _tail(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-3000:].decode(errors="replace")

    def send(self, op: str, **fields: Any) -> None:
        """Send one command; read its answer with ``read``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **fields}) + "\n")
        self.proc.stdin.flush()

    def read(self, timeout: float = 300.0) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(
                f"worker gave no answer within {timeout}s (rc={self.proc.poll()}): {self._tail()}"
            )
        out: dict[str, Any] = json.loads(line)
        return out

    def call(self, op: str, timeout: float = 300.0, **fields: Any) -> dict[str, Any]:
        self.send(op, **fields)
        return self.read(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("quit")
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()


def worker_argv(python_argv: Sequence[str], server: str) -> list[str]:
    """argv of a worker for ``server``, from a ``ShapedLink.python_argv``-style prefix."""
    return ["env", "OMP_NUM_THREADS=1", *python_argv, "worker", "--server", server]


def server_argv(link: Any, port: int = SERVER_PORT) -> list[str]:
    """``kvstore serve`` on the server end of ``link`` (a ``ShapedLink``), memory backend."""
    return link.python_argv(  # type: ignore[no-any-return]
        "kvstore",
        "serve",
        "--listen",
        f"{link.server.addr}:{port}",
        "--backend",
        "memory://",
        "--log-level",
        "WARNING",
    )


# ----- benchmark --------------------------------------------------------------------------------


TRACE_RATES_MBIT = (100, 200, 500, 1000, 2000)


def _trace(seed: int, seconds: float, step: float) -> list[float]:
    """Rates (Mbit/s) for consecutive ``step``-second slots covering ``seconds``."""
    rng = random.Random(seed)
    return [rng.choice(TRACE_RATES_MBIT) for _ in range(int(seconds / step) + 2)]


def _play(link: Any, rates: Sequence[float], step: float, stop: threading.Event) -> None:
    """Set each of ``rates`` for ``step`` seconds in turn, the first after one step (until ``stop``)."""
    for rate in rates:
        if stop.wait(step):
            return
        link.set_rate(rate)


def run(args: argparse.Namespace) -> dict[str, Any]:
    import codec
    from deploy.netshape import ShapedLink

    torch.set_num_threads(1)  # like the workers (see the module docstring)
    shape = tuple(args.shape)
    spec = {"chunk_tokens": args.chunk_tokens, "tokens": args.tokens, "seed": 0}
    res: dict[str, Any] = {
        "config": {
            "tokens": args.tokens,
            "chunk_tokens": args.chunk_tokens,
            "kv_shape": [shape[0], 2, args.tokens, *shape[1:]],
            "repeats": args.repeats,
            "slo_fraction": args.slo_fraction,
            "trace_runs": args.trace_runs,
            "cpu_count": os.cpu_count(),
            "codec_default_level": codec.DEFAULT_LEVEL,
        },
        "bandwidths": {},
    }
    kv = synthetic_context(args.chunk_tokens, args.chunk_tokens, shape)
    dequant_per_chunk = int8_dequant_seconds(kv)
    n_chunks = -(-args.tokens // args.chunk_tokens)
    res["int8_dequant_per_chunk_seconds"] = dequant_per_chunk
    res["int8_dequant_seconds"] = dequant_per_chunk * n_chunks  # all chunks, serially (not what is charged)
    res["int8_model"] = INT8_MODEL
    with ShapedLink(rate_mbit=10000) as link:
        link.popen(link.server.ns, server_argv(link), stdout=subprocess.DEVNULL)
        addr = f"{link.server.addr}:{SERVER_PORT}"
        argv = worker_argv(link.python_argv("benchmarks.ttft_bench"), addr)
        far = ClientWorker(functools.partial(link.popen, link.client.ns), argv)
        near = ClientWorker(functools.partial(link.popen, link.server.ns), argv)  # no veth: loopback
        try:
            far.call("wait", model="bench", **spec)
            t0 = time.perf_counter()
            stored = far.call("store", model="bench", shape=shape, **spec)
            stored8 = far.call("store", model="bench" + INT8_SUFFIX, shape=shape, int8eq=True, **spec)
            res["store_seconds"] = time.perf_counter() - t0
            res["bytes"] = {
                "raw_fp16": stored["raw_bytes"],
                "levels": stored["level_bytes"],
                "int8_equivalent": stored8["level_bytes"]["0"],
            }
            for label, rate in [(f"{m}Mbit" if m else "loopback", m) for m in args.rates_mbit]:
                worker = far if rate else near
                if rate:
                    link.set_rate(rate)
                row: dict[str, Any] = {"rate_mbit": rate or None}
                fp16 = [worker.call("fetch", model="bench", level=0, **spec) for _ in range(args.repeats)]
                int8 = [
                    worker.call("fetch", model="bench" + INT8_SUFFIX, level=0, **spec)
                    for _ in range(args.repeats)
                ]
                fp16_s = statistics.median(r["seconds"] for r in fp16)
                int8_fetch_s = statistics.median(r["seconds"] for r in int8)
                int8_s = statistics.median(int8_pipelined_seconds(r, dequant_per_chunk) for r in int8)
                slo = args.slo_fraction * fp16_s
                adaptive = [worker.call("fetch", model="bench", slo=slo, **spec) for _ in range(args.repeats)]
                ad_s = statistics.median(r["seconds"] for r in adaptive)
                # The same SLO with the quality the codec's default level promises as a floor: what the
                # speedup is worth when the caller will not take coarser KV (misses are reported).
                capped = [
                    worker.call("fetch", model="bench", slo=slo, max_level=codec.DEFAULT_LEVEL, **spec)
                    for _ in range(args.repeats)
                ]
                capped_s = statistics.median(r["seconds"] for r in capped)
                row.update(
                    fp16_seconds=fp16_s,
                    int8_seconds=int8_s,
                    adaptive_seconds=ad_s,
                    slo_seconds=slo,
                    adaptive_slo_met=sum(r["seconds"] <= slo for r in adaptive) / len(adaptive),
                    adaptive_levels=[r["levels"] for r in adaptive],
                    adaptive_mean_level=statistics.mean(lv for r in adaptive for lv in r["levels"]),
                    adaptive_bytes=statistics.median(r["nbytes"] for r in adaptive),
                    goodput_mbit=8 * fp16[-1]["nbytes"] / 1e6 / fp16_s,
                    speedup_vs_fp16=fp16_s / ad_s,
                    speedup_vs_int8=int8_s / ad_s,
                    capped_seconds=capped_s,
                    capped_slo_met=sum(r["seconds"] <= slo for r in capped) / len(capped),
                    capped_speedup_vs_fp16=fp16_s / capped_s,
                    capped_speedup_vs_int8=int8_s / capped_s,
                    int8_fetch_seconds=int8_fetch_s,
                    int8_exposed_dequant_seconds=int8_s - int8_fetch_s,
                    speedup_vs_int8_transfer_only=int8_fetch_s / ad_s,
                    adaptive_chunks=adaptive[0]["chunks"],  # [index, level, bytes, recv s, decode s]
                    all_seconds={
                        "fp16": [r["seconds"] for r in fp16],
                        "int8_fetch": [r["seconds"] for r in int8],
                        "int8": [int8_pipelined_seconds(r, dequant_per_chunk) for r in int8],
                        "adaptive": [r["seconds"] for r in adaptive],
                        "capped": [r["seconds"] for r in capped],
                    },
                )
                res["bandwidths"][label] = row
                brief = {k: v for k, v in row.items() if "levels" not in k and "chunks" not in k}
                print(json.dumps({label: brief}), flush=True)
            if args.trace_runs:
                res["trace"] = _trace_runs(link, far, spec, args)
        finally:
            far.close()
            near.close()
    return res


def recompute_split(levels: Sequence[int]) -> tuple[int, int]:
    """``(head, late)`` recompute markers in a fetch's per-chunk ``levels``.

    Head markers come before the first streamed chunk: the client prefills them while the rest streams.
    Late ones come after it (a re-plan mid-stream): they need the KV before them, so they are prefilled
    after the stream and add to the time to first token.
    """
    from client.adaptation import RECOMPUTE

    head = next((i for i, lv in enumerate(levels) if lv != RECOMPUTE), len(levels))
    return head, sum(1 for lv in levels[head:] if lv == RECOMPUTE)


def _trace_runs(
    link: Any, worker: ClientWorker, spec: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """SLO hit rate of adaptive vs fixed-level fetches under seeded bandwidth traces, for two SLOs.

    ``floor``: the smallest level's TTFT on a steady link at the trace's lowest rate (median of 3), the
    tightest SLO this link can promise without recompute. Adaptation must meet it while buying quality
    above the smallest level whenever the link is faster; the fixed smallest level meets it with the
    worst quality, the fixed default level misses it whenever slow slots come.

    ``tight``: what the default level achieves on a steady 1 Gbit/s link. Slow slots make that
    unreachable by streaming alone, so adaptive fetches may recompute chunks on the inference node at
    ``--recompute-tps``: head chunks prefill while the rest streams, chunks marked later are prefilled
    after it, and TTFT counts both.
    """
    from rich.console import Console
    from rich.progress import track

    import codec
    from client.adaptation import RECOMPUTE

    progress = Console(stderr=True)
    smallest = max(codec.LEVELS)
    chunk_tokens = spec["chunk_tokens"]

    def steady_seconds(mbit: float, level: int) -> float:
        link.set_rate(mbit)
        return statistics.median(
            worker.call("fetch", model="bench", level=level, **spec)["seconds"] for _ in range(3)
        )

    def ttft(r: dict[str, Any]) -> float:
        head, late = recompute_split(r["levels"])
        per_chunk = chunk_tokens / args.recompute_tps
        return float(max(r["seconds"], head * per_chunk) + late * per_chunk)

    scenarios = {
        "floor": (steady_seconds(min(TRACE_RATES_MBIT), smallest), {}),
        "tight": (steady_seconds(1000, codec.DEFAULT_LEVEL), {"recompute_tps": args.recompute_tps}),
    }
    out: dict[str, Any] = {"rates_mbit": list(TRACE_RATES_MBIT), "recompute_tps": args.recompute_tps}
    for scenario, (slo, recompute) in scenarios.items():
        step = slo / 4
        policies = {
            "adaptive": {"slo": slo, **recompute},
            "fixed_default": {"level": codec.DEFAULT_LEVEL},
            "fixed_smallest": {"level": smallest},
        }
        row: dict[str, Any] = {"slo_seconds": slo, "step_seconds": step}
        for name, fields in policies.items():
            runs = []
            label = f"trace {scenario} {name}"
            for i in track(range(args.trace_runs), label, console=progress, transient=True):
                rates = _trace(i, 4 * slo, step)
                link.set_rate(rates[0])
                stop = threading.Event()
                player = threading.Thread(target=_play, args=(link, rates[1:], step, stop))
                worker.send("fetch", model="bench", **fields, **spec)
                player.start()
                r = worker.read()
                stop.set()
                player.join()
                runs.append(
                    {"ttft": ttft(r), "seconds": r["seconds"], "levels": r["levels"], "nbytes": r["nbytes"]}
                )
            secs = [r["ttft"] for r in runs]
            streamed = [lv for r in runs for lv in r["levels"] if lv != RECOMPUTE]
            row[name] = {
                "hit_rate": sum(s <= slo for s in secs) / len(secs),
                "median_ttft": statistics.median(secs),
                "median_bytes": statistics.median(r["nbytes"] for r in runs),
                "mean_streamed_level": statistics.mean(streamed) if streamed else None,
                "recomputed_chunk_fraction": 1 - len(streamed) / sum(len(r["levels"]) for r in runs),
                "runs": runs,
            }
            brief = {k: v for k, v in row[name].items() if k != "runs"}
            print(json.dumps({f"trace_{scenario}_{name}": brief, "slo_seconds": slo}), flush=True)
        out[scenario] = row
    return out


def plot(res: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["bandwidths"].values() if r["rate_mbit"]]
    loop = res["bandwidths"].get("loopback")
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    xs = [r["rate_mbit"] for r in rows]
    for key, label, style in (
        ("fp16_seconds", "fp16 (lossless level 0)", "o-"),
        ("int8_seconds", "int8 per token (bytes + pipelined dequant)", "s-"),
        ("adaptive_seconds", "adaptive (SLO)", "^-"),
        ("capped_seconds", f"adaptive, max_level={res['config']['codec_default_level']}", "v-"),
        ("slo_seconds", "SLO", "k:"),
    ):
        line = ax.plot(xs, [r[key] for r in rows], style, label=label)
        if loop is not None and key != "slo_seconds":
            ax.axhline(loop[key], color=line[0].get_color(), ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bandwidth (Mbit/s, tc htb); dashed: unshaped loopback")
    ax.set_ylabel("TTFT: fetch + decode (s)")
    cfg = res["config"]
    ax.set_title(f"KV {cfg['kv_shape']} fp16, {os.cpu_count()} CPU cores", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command")
    w = sub.add_parser("worker", help="(internal) JSON-lines client worker")
    w.add_argument("--server", required=True, help="host:port[,host:port...]")
    p.add_argument("--json", help="write the results here")
    p.add_argument("--plot", help="PNG of TTFT vs bandwidth")
    p.add_argument("--tokens", type=int, default=2048, help="context length (full mode: 8192)")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument(
        "--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("LAYERS", "HEADS", "DIM")
    )
    p.add_argument(
        "--rates-mbit", type=float, nargs="+", default=[100, 1000, 0], help="0 = unshaped loopback"
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--slo-fraction", type=float, default=0.3)
    p.add_argument("--trace-runs", type=int, default=20, help="seeded traces per SLO and policy")
    p.add_argument(
        "--recompute-tps", type=float, default=5000.0,
        help="prefill tokens/s of the inference node, for the tight-SLO trace (CacheGen: 0.2 s/1000 tokens)",
    )  # fmt: skip
    args = p.parse_args(argv)
    if args.command == "worker":
        asyncio.run(_worker_loop(args.server.split(","), sys.stdin, sys.stdout))
        return 0
    res = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    if args.plot:
        plot(res, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
