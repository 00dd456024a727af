"""Sparse-recall backends: resident bytes, bytes moved per decode step, decode latency vs dense attention.

``python -m benchmarks.sparse_bench --json out.json [--tokens 32768] [--device cuda --tokens 131072]``

* Analytic (Llama-3-8B shape: 32 layers, 32 query heads, 8 KV heads, head_dim 128; bf16 K/V and factors,
  uint8 PQ codes, int32 ids) resident device bytes per context token per layer, fixed device bytes per
  layer, and bytes moved host->device per decode step per layer at the measured cache hit rate, next to
  dense attention (4096 B/token/layer) and ShadowKV's published ~584 B/token/layer.
* Measured on one synthetic layer of that shape at ``--tokens`` (keys low-rank before RoPE with temporal
  correlation, a few massive sink keys, queries aimed at a few regions): device-resident bytes of each
  backend's state (our reference stores float32, so float tensors count 4 B/element), bytes fetched per
  step, cache hit rate, and the median decode-step latency against dense attention over all tokens. The
  first decode step fills the caches: timings, ``hit_rate`` and ``fetched_B_per_step`` are the steady
  state (steps 2..n); that step's fill is ``cold_fill_bytes`` (``cold_hit_rate``).
* MB = 1e6 bytes, as in the other benches.
* Node-resident bytes per context token (``DecodeState.node_bytes()``) right after prefill, device and host,
  in local mode (host copies of the offloaded rows) and remote-backed mode (``prefill(..., remote=...)``:
  the kvstream service serves them; the node keeps only the resident parts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from functools import partial
from typing import Any

import torch

from client.model.llama2c import apply_rope
from client.sparse import SparseBackend, SparseIndex, get_backend
from client.sparse.base import FetchStats, NodeBytes
from client.sparse.pqcache import PQCacheBackend
from client.sparse.service import ServiceChunkFetcher
from client.sparse.shadowkv import ShadowKVBackend
from kernels import ops
from kvstore.keys import ModelKey

# A remote-backed prefill reads nothing from the service (resident parts come from the node's own KV), so
# its footprint is measured with a fetcher that is never contacted: no server needed, nothing decoded.
UNCONTACTED = "127.0.0.1:9"
LLAMA3_8B = {"layers": 32, "heads": 32, "kv_heads": 8, "head_dim": 128}
BF16 = 2
MB = 1e6  # "MB" in every table, as in the other benches
PUBLISHED_SHADOWKV_B_PER_TOKEN = 584
# Anchor defaults at this shape; the budget is set by --budget (a fraction of the context).
PARAMS: dict[str, dict[str, Any]] = {
    "oracle": {},
    "sink_local": {},
    "shadowkv": {"rank": 160, "chunk": 8, "local_chunks": 4},
    "pqcache": {"n_sub": 2, "bits": 6, "iters": 10},
    "clusterkv": {"iters": 10},
    "alisa": {},
}


def synthetic_kv(
    tokens: int, heads: int, kv_heads: int, head_dim: int, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """One layer: kv ``[1, 2, T, Hkv, D]``, decode queries ``[steps=8, H, D]``, last prefill queries
    ``[1, 64, H, D]``, all float32 and post-RoPE."""
    g = torch.Generator().manual_seed(seed)
    rank = 48
    # temporally correlated latent factors -> low-rank pre-RoPE keys, as ShadowKV observes in real models
    z = torch.randn(tokens, rank, generator=g)
    z = torch.cumsum(z, 0) / torch.arange(1, tokens + 1).sqrt()[:, None] * 0.3 + torch.randn(
        tokens, rank, generator=g
    )
    basis = torch.randn(rank, kv_heads * head_dim, generator=g) / math.sqrt(rank)
    k_pre = (z @ basis).view(tokens, kv_heads, head_dim) + 0.1 * torch.randn(
        tokens, kv_heads, head_dim, generator=g
    )
    k_pre[:4] *= 8.0  # attention sinks
    pos = torch.arange(tokens)
    k = apply_rope(k_pre, pos, 10000.0)
    v = torch.randn(tokens, kv_heads, head_dim, generator=g)
    group = heads // kv_heads

    def queries(at: torch.Tensor) -> torch.Tensor:
        # every query looks like a few earlier keys (pre-RoPE) shared by the sequence, plus per-step noise
        # (consecutive decode queries attend to overlapping tokens), then is rotated to its own position
        picks = torch.randint(0, tokens, (1, heads, 3), generator=g)
        base = k_pre[picks, torch.arange(heads)[None, :, None] // group].mean(2)
        q = base * 2.0 + 0.5 * torch.randn(at.numel(), heads, head_dim, generator=g)
        return apply_rope(q, at, 10000.0)

    kv = torch.stack([k, v])[None]
    return kv, queries(torch.full((8,), tokens)), queries(torch.arange(tokens - 64, tokens))[None]


def analytic(tokens: int, budget_tokens: int, hit: dict[str, float]) -> dict[str, dict[str, float]]:
    """Bytes per decode step per layer (host->device, device reads) and resident bytes for Llama-3-8B."""
    hkv, h, d = LLAMA3_8B["kv_heads"], LLAMA3_8B["heads"], LLAMA3_8B["head_dim"]
    kv_tok = 2 * hkv * d * BF16  # 4096
    sk = PARAMS["shadowkv"]
    r, c = sk["rank"], sk["chunk"]
    m, bits = PARAMS["pqcache"]["n_sub"], PARAMS["pqcache"]["bits"]
    n_clusters = max(8, round(tokens / 80))
    sink = max(1, min(32, round(0.01 * tokens)))

    def row(resident_tok: float, fixed: float, h2d: float, read: float) -> dict[str, float]:
        return {
            "resident_B_per_token": resident_tok,
            "fixed_B_per_layer": fixed,
            "h2d_B_per_step": h2d,
            "device_read_B_per_step": read,
            "resident_MB_per_layer": (resident_tok * tokens + fixed) / MB,
        }

    pq_topk = budget_tokens - sink - round((budget_tokens - sink) * 0.5)
    return {
        "dense": row(kv_tok, 0, 0, tokens * kv_tok),
        "shadowkv": row(
            r * BF16 + hkv * d * BF16 / c + 8 * hkv / c,  # U rows, landmarks, landmark ids (as the anchor)
            r * hkv * d * BF16 + budget_tokens * kv_tok,  # SV + static and selected-chunk K/V buffers
            (1 - hit["shadowkv"]) * budget_tokens * hkv * d * BF16,  # V of missed chunks only
            tokens / c * hkv * d * BF16
            + (1 - hit["shadowkv"]) * budget_tokens * r * BF16
            + budget_tokens * kv_tok,
        ),
        "pqcache": row(
            hkv * m,  # uint8 codes
            hkv * m * 2**bits * (d // m) * BF16 + (budget_tokens - pq_topk) * kv_tok + 4096 * kv_tok,
            (1 - hit["pqcache"]) * pq_topk * kv_tok,
            tokens * hkv * m + budget_tokens * kv_tok,
        ),
        "clusterkv": row(
            4 * hkv + hkv * d * BF16 * n_clusters / tokens,  # int32 cluster-order ids + centroids
            sink * kv_tok + (budget_tokens - sink) * 2 * h * d * BF16,  # sink + per-query-head selection
            (1 - hit["clusterkv"]) * (budget_tokens - sink) * 2 * h * d * BF16,
            n_clusters * hkv * d * BF16 + budget_tokens * 2 * h * d * BF16,
        ),
        "alisa": row(
            4,  # float32 importance
            budget_tokens * 2 * hkv * d,  # INT8 local + global K/V
            (1 - hit["alisa"]) * (budget_tokens - round(budget_tokens * 0.5)) * 2 * hkv * d,
            budget_tokens * 2 * hkv * d + tokens * 4,
        ),
        "shadowkv_published": row(PUBLISHED_SHADOWKV_B_PER_TOKEN, 0, 0, 0),
    }


def steady_stats(total: FetchStats, cold: FetchStats) -> FetchStats:
    """Counters of ``total`` minus those of the cold first step ``cold`` (a snapshot taken after it)."""
    return FetchStats(
        **{f.name: getattr(total, f.name) - getattr(cold, f.name) for f in dataclasses.fields(FetchStats)}
    )


def remote_footprint(backend: SparseBackend, kv: torch.Tensor, index: SparseIndex) -> NodeBytes:
    """Node bytes right after a remote-backed prefill of ``kv`` ``[layers, 2, T, Hkv, D]`` with ``index``
    (rows served by a :class:`ServiceChunkFetcher`; its chunk cache is empty, bounded by ``cache_bytes``)."""
    t = kv.shape[2]
    mk = ModelKey("synthetic", dtype="float32", chunk_tokens=math.gcd(t, 256))
    with ServiceChunkFetcher(UNCONTACTED, mk, [0] * t) as remote:
        state = backend.prefill(kv, index=index, remote=remote)
        nodes = state.node_bytes()
        state.close()
    return nodes


def dense_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain dense GQA decode attention: q ``[H, D]``, k/v ``[Hkv, T, D]`` -> ``[H, D]``."""
    hkv, _, d = k.shape
    qg = q.view(hkv, -1, d)
    p = torch.softmax(qg @ k.transpose(1, 2) / math.sqrt(d), dim=-1)
    return (p @ v).reshape(q.shape)


def timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def measure(tokens: int, budget: float, steps: int, device: torch.device, names: list[str]) -> dict[str, Any]:
    """Per backend: build, prefill, then ``steps`` decode steps of one layer, each timed right after two dense
    steps on the same query so that load changes on a shared machine hit all alike (medians of ratios):
    plain dense GQA attention (matmuls) and dense attention through ``ops.sparse_decode_attention`` with
    every position selected (the same kernel the backends use)."""
    cfg = LLAMA3_8B
    kv, dec_q, last_q = synthetic_kv(tokens, cfg["heads"], cfg["kv_heads"], cfg["head_dim"])
    k_dev = kv[0, 0].transpose(0, 1).contiguous().to(device)
    v_dev = kv[0, 1].transpose(0, 1).contiguous().to(device)
    new_k = torch.randn(steps, cfg["kv_heads"], cfg["head_dim"])
    all_idx = torch.arange(tokens, device=device).expand(cfg["kv_heads"], -1)  # dense through the same kernel
    out: dict[str, Any] = {}
    dense_all: list[float] = []
    for name in names:
        backend = get_backend(name, budget, device=device, **PARAMS[name])
        t0 = time.perf_counter()
        index = backend.build_index(kv, last_q)
        build_s = time.perf_counter() - t0
        state = backend.prefill(kv, index=index)
        local = state.node_bytes()
        remote = remote_footprint(backend, kv, index)
        times, dense_s, dense_k = [], [], []
        cold = FetchStats()
        for i in range(steps):
            q = dec_q[i % 8].to(device)
            dense_s.append(timed(partial(dense_decode, q, k_dev, v_dev), device))
            dense_k.append(timed(partial(ops.sparse_decode_attention, q, k_dev, v_dev, all_idx), device))
            times.append(timed(partial(backend.decode_step, state, 0, q, new_k[i], new_k[i]), device))
            if i == 0:
                cold = dataclasses.replace(state.stats)
        # the first step fills the caches: leave it out of the timings and of the data-movement figures
        dense_all += dense_s[1:]
        steady = steady_stats(state.stats, cold)

        def ratio(base: list[float], t: list[float] = times) -> float:
            return statistics.median(b / d for b, d in zip(t[1:], base[1:], strict=True))

        out[name] = {
            "median_step_s": statistics.median(times[1:]),
            "dense_median_step_s": statistics.median(dense_s[1:]),
            "ratio_vs_dense": ratio(dense_s),
            "dense_kernel_median_step_s": statistics.median(dense_k[1:]),
            "ratio_vs_dense_kernel": ratio(dense_k),
            "index_build_s": build_s,
            "index_bytes": index.nbytes,
            "resident_B_per_token_measured": backend.resident_bytes(state) / tokens,
            "host_bytes": state.store.nbytes,
            "node_B_per_token": {
                "local": {"device": local.device / tokens, "host": local.host / tokens},
                "remote": {"device": remote.device / tokens, "host": remote.host / tokens},
            },
            # steady state, steps 2..steps (like the timings); the cold first step separately
            "fetched_B_per_step": steady.bytes_fetched / max(1, steps - 1),
            "hit_rate": steady.hit_rate,
            "cold_fill_bytes": cold.bytes_fetched,
            "cold_hit_rate": cold.hit_rate,
        }
        state.close()
        del state, index
    out["dense"] = {"median_step_s": statistics.median(dense_all)}
    return out


def markdown(report: dict[str, Any]) -> str:
    """The analytic and measured tables of a report, as Markdown."""
    cfg = report["config"]
    lines = [
        f"Analytic, Llama-3-8B shape, T = {cfg['tokens']}, budget {cfg['budget_tokens']} tokens, bf16, "
        "hit rates as measured below:",
        "",
        "| backend | resident B/token/layer | fixed MB/layer | resident MB/layer | H2D B/step/layer | "
        "device read MB/step/layer |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in report["analytic_llama3_8b"].items():
        lines.append(
            f"| {name} | {r['resident_B_per_token']:.0f} | {r['fixed_B_per_layer'] / MB:.2f} | "
            f"{r['resident_MB_per_layer']:.1f} | {r['h2d_B_per_step']:.0f} | "
            f"{r['device_read_B_per_step'] / MB:.2f} |"
        )
    lines += [
        "",
        f"Measured, one synthetic layer, {cfg['device']}, {cfg['threads']} threads, {cfg['steps']} steps "
        "(float32 reference: 4 B per float element; fetched B/step and hit rate over steps 2..n, the "
        "first step's cache fill in the last column):",
        "",
        "| backend | step ms | dense ms | ratio vs dense | dense-kernel ms | ratio vs dense kernel | "
        "index build s | resident B/token | fetched B/step | hit rate | cold fill B |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in report["measured"].items():
        if name == "dense":
            continue
        lines.append(
            f"| {name} | {r['median_step_s'] * 1e3:.1f} | {r['dense_median_step_s'] * 1e3:.1f} | "
            f"{r['ratio_vs_dense']:.2f} | {r['dense_kernel_median_step_s'] * 1e3:.1f} | "
            f"{r['ratio_vs_dense_kernel']:.2f} | {r['index_build_s']:.1f} | "
            f"{r['resident_B_per_token_measured']:.0f} | {r['fetched_B_per_step']:.0f} | "
            f"{r['hit_rate']:.2f} | {r['cold_fill_bytes']:.0f} |"
        )
    lines += [
        "",
        "Node-resident bytes per context token right after prefill (`DecodeState.node_bytes()`, float32 "
        "reference), local mode vs remote-backed mode (offloaded rows served by the kvstream service; the "
        "fetcher's chunk cache, bounded by its `cache_bytes`, comes on top):",
        "",
        "| backend | device B/token local | device B/token remote | host B/token local | "
        "host B/token remote |",
        "|---|---|---|---|---|",
    ]
    for name, r in report["measured"].items():
        if name == "dense":
            continue
        nb = r["node_B_per_token"]
        lines.append(
            f"| {name} | {nb['local']['device']:.0f} | {nb['remote']['device']:.0f} | "
            f"{nb['local']['host']:.0f} | {nb['remote']['host']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument(
        "--budget", type=float, default=0.0625, help="fraction of the context (2048 tokens at 32K)"
    )
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backends", default=",".join(PARAMS))
    p.add_argument("--markdown", help="also write the tables as Markdown here")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    names = [n for n in a.backends.split(",") if n]
    measured = measure(a.tokens, a.budget, a.steps, device, names)
    n_budget = get_backend("oracle", a.budget).budget_tokens(a.tokens)
    hits = {
        n: measured.get(n, {}).get("hit_rate", 0.0) for n in ("shadowkv", "pqcache", "clusterkv", "alisa")
    }
    report = {
        "config": {
            "tokens": a.tokens,
            "budget": a.budget,
            "budget_tokens": n_budget,
            "steps": a.steps,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "shape": LLAMA3_8B,
            "params": PARAMS,
            "shadowkv_default_outliers": ShadowKVBackend(a.budget).split(a.tokens).outlier_chunks,
            "pqcache_regions": PQCacheBackend(a.budget, **PARAMS["pqcache"]).regions(a.tokens),
        },
        "analytic_llama3_8b": analytic(a.tokens, n_budget, hits),
        "measured": measured,
    }
    with open(a.json, "w") as f:
        json.dump(report, f, indent=2)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(markdown(report) + "\n")
    for name, r in measured.items():
        nb = r.get("node_B_per_token", {})
        extra = (
            ""
            if name == "dense"
            else (
                f" ratio {r['ratio_vs_dense']:.2f} (same kernel {r['ratio_vs_dense_kernel']:.2f})"
                f" build {r['index_build_s']:.1f}s resident "
                f"{r['resident_B_per_token_measured']:.0f} B/tok "
                f"fetched {r['fetched_B_per_step']:.0f} B/step hit {r['hit_rate']:.2f} "
                f"(cold fill {r['cold_fill_bytes']} B) host B/tok "
                f"local {nb['local']['host']:.0f} remote {nb['remote']['host']:.0f}"
            )
        )
        print(f"{name:10s} step {r['median_step_s'] * 1e3:8.2f} ms{extra}")


if __name__ == "__main__":
    main()
