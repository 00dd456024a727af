"""GPU benchmark of the Triton kernels against their torch twins and the nearest library ops.

    python -m benchmarks.kernels_bench_gpu --json out.json       # CUDA; prints {"skipped": ...} without one
    python -m benchmarks.kernels_bench_gpu --device cpu --quick  # same code paths, twins + library ops only

Timing: CUDA events around each call after warm-up, median (and p10/p90) over ``--reps`` calls; on CPU,
``perf_counter``. Each kernel is also checked against its twin (max abs difference in the JSON). Sparse
attention reports achieved GB/s = bytes the kernel must read/write (gathered K/V rows, indices, q, output) /
median time; codec decode reports GB/s of decoded output. Triton runs on CPU only under
``TRITON_INTERPRET=1`` (slow; useful to exercise this script).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

import codec
from kernels import centroid_scores, gather_rope, kmeans, pq_scores, sparse_attention
from kernels import codec_decode as codec_decode_twin
from kernels.dispatch import triton_available

Fn = Callable[[], object]


@dataclass
class Case:
    """One benchmark configuration: named implementations plus a (triton, twin) pair for the check."""

    kernel: str
    config: dict[str, Any]
    impls: dict[str, Fn] = field(default_factory=dict)
    bytes_moved: int | None = None
    check: tuple[Fn, Fn] | None = None


def _timer(device: torch.device, fn: Fn, warmup: int, reps: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times: list[float] = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def _max_diff(a: object, b: object) -> float:
    if isinstance(a, tuple) and isinstance(b, tuple):
        return max(_max_diff(x, y) for x, y in zip(a, b, strict=True))
    assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def _cases(device: torch.device, dtype: torch.dtype, quick: bool, use_triton: bool) -> list[Case]:
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape: int, dt: torch.dtype = dtype) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt)

    def tri(name: str) -> Any:
        return importlib.import_module(f"kernels.{name}_triton")

    esize = torch.tensor([], dtype=dtype).element_size()
    # Llama-3-8B-like layer (32 q heads, 8 KV heads, head_dim 128) at 128K context; --quick shrinks it.
    h, hkv, d = (8, 2, 64) if quick else (32, 8, 128)
    n = 4096 if quick else 131072
    budget = 256 if quick else 2560  # ShadowKV: 2048 selected + sink/local/outliers
    cases: list[Case] = []

    # --- sparse decode attention (float and INT8 K/V)
    q = randn(h, d)
    k, v = randn(hkv, n, d), randn(hkv, n, d)
    idx = torch.stack([torch.randperm(n, generator=g)[:budget] for _ in range(hkv)]).to(device)
    idx_sorted = idx.sort(dim=1).values
    gidx = idx_sorted.unsqueeze(-1).expand(-1, -1, d)
    kg, vg = torch.gather(k, 1, gidx), torch.gather(v, 1, gidx)

    def sdpa(kk: torch.Tensor, vv: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q[None, :, None], kk[None], vv[None], enable_gqa=True)

    rw_bytes = 2 * hkv * budget * d * esize + idx.numel() * 8 + 2 * q.numel() * esize
    case = Case(
        "sparse_decode_attention",
        {"H": h, "Hkv": hkv, "D": d, "N": n, "K": budget, "dtype": str(dtype)},
        bytes_moved=rw_bytes,
    )
    case.impls["torch_twin"] = lambda: sparse_attention.sparse_decode_attention(q, k, v, idx_sorted)
    case.impls["gather+sdpa"] = lambda: sdpa(torch.gather(k, 1, gidx), torch.gather(v, 1, gidx))
    case.impls["sdpa_pregathered"] = lambda: sdpa(kg, vg)
    if use_triton:
        sa = tri("sparse_attention")
        case.impls["triton"] = lambda: sa.sparse_decode_attention(q, k, v, idx_sorted)
        case.impls["triton_unsorted_idx"] = lambda: sa.sparse_decode_attention(q, k, v, idx)
        case.check = (case.impls["triton"], case.impls["torch_twin"])
    cases.append(case)

    scale_k = k.float().abs().amax(dim=1) / 127.0
    scale_v = v.float().abs().amax(dim=1) / 127.0
    k8 = torch.round(k.float() / scale_k[:, None]).to(torch.int8)
    v8 = torch.round(v.float() / scale_v[:, None]).to(torch.int8)
    case = Case(
        "sparse_decode_attention_int8",
        {"H": h, "Hkv": hkv, "D": d, "N": n, "K": budget},
        bytes_moved=2 * hkv * budget * d + idx.numel() * 8 + 2 * q.numel() * esize,
    )
    case.impls["torch_twin"] = lambda: sparse_attention.sparse_decode_attention(
        q, k8, v8, idx_sorted, None, scale_k, scale_v
    )
    if use_triton:
        sa = tri("sparse_attention")
        case.impls["triton"] = lambda: sa.sparse_decode_attention(
            q, k8, v8, idx_sorted, None, scale_k, scale_v
        )
        case.check = (case.impls["triton"], case.impls["torch_twin"])
    cases.append(case)

    # --- landmark scoring (ShadowKV: one landmark per 8 tokens) + the top-k it feeds
    n_lm = n // 8
    landmarks = randn(hkv, n_lm, d)
    case = Case(
        "score_centroids",
        {"H": h, "Hkv": hkv, "D": d, "C": n_lm, "softmax": True, "reduce": "max"},
        bytes_moved=landmarks.numel() * esize + hkv * n_lm * 4,
    )
    case.impls["torch_twin"] = lambda: centroid_scores.score_centroids(q, landmarks)
    scores = centroid_scores.score_centroids(q, landmarks)
    case.impls["torch.topk_on_scores"] = lambda: torch.topk(scores, budget // 8, dim=1)
    if use_triton:
        cs = tri("centroid_scores")
        case.impls["triton"] = lambda: cs.score_centroids(q, landmarks)
        case.impls["triton+topk"] = lambda: torch.topk(cs.score_centroids(q, landmarks), budget // 8, dim=1)
        case.check = (case.impls["triton"], case.impls["torch_twin"])
    cases.append(case)

    # --- PQ scores (PQCache: M=2 sub-vectors, 2**6 centroids)
    m_sub, n_codes = 2, 64
    codebooks = randn(hkv, m_sub, n_codes, d // m_sub)
    codes = torch.randint(0, n_codes, (hkv, n, m_sub), generator=g, dtype=torch.uint8).to(device)
    case = Case(
        "pq_scores",
        {"H": h, "Hkv": hkv, "D": d, "N": n, "M": m_sub, "codes": n_codes, "reduce": "sum"},
        bytes_moved=codes.numel() + hkv * n * 4,
    )
    case.impls["torch_twin"] = lambda: pq_scores.pq_scores(q, codebooks, codes, "sum")
    if use_triton:
        pq = tri("pq_scores")
        case.impls["triton"] = lambda: pq.pq_scores(q, codebooks, codes, "sum")
        case.check = (case.impls["triton"], case.impls["torch_twin"])
    cases.append(case)

    # --- ShadowKV key rebuild (rank 160)
    rank = 32 if quick else 160
    u = randn(n, rank)
    sv = randn(rank, hkv, d) / math.sqrt(rank)
    sel = idx_sorted[:, : budget - budget // 5]
    case = Case(
        "gather_rope_keys",
        {"Hkv": hkv, "D": d, "N": n, "rank": rank, "K": sel.shape[1]},
        bytes_moved=(sel.numel() * rank + sv.numel() + sel.numel() * d) * esize + sel.numel() * 8,
    )
    case.impls["torch_twin"] = lambda: gather_rope.gather_rope_keys(u, sv, sel)
    case.impls["gather+bmm_no_rope"] = lambda: torch.bmm(u[sel], sv.transpose(0, 1))
    if use_triton:
        gr = tri("gather_rope")
        case.impls["triton"] = lambda: gr.gather_rope_keys(u, sv, sel)
        case.check = (case.impls["triton"], case.impls["torch_twin"])
    cases.append(case)

    # --- k-means steps (ClusterKV: C = L/80 clusters of the keys of each KV head)
    n_pts = 2048 if quick else 32768
    n_c = max(8, n_pts // 80)
    x = randn(hkv, n_pts, d)
    cent = x[:, :n_c].float().contiguous()
    assign = kmeans.kmeans_assign(x, cent, "cosine")
    cfg = {"B": hkv, "N": n_pts, "D": d, "C": n_c}
    case = Case("kmeans_assign_cosine", cfg)
    case.impls["torch_twin"] = lambda: kmeans.kmeans_assign(x, cent, "cosine")
    if use_triton:
        km = tri("kmeans")
        case.impls["triton"] = lambda: km.kmeans_assign(x, cent, "cosine")
        case.check = (case.impls["triton"], case.impls["torch_twin"])
    cases.append(case)
    case = Case("kmeans_assign_l2", cfg)
    case.impls["torch_twin"] = lambda: kmeans.kmeans_assign(x, cent, "l2")
    case.impls["torch.cdist+argmin"] = lambda: torch.cdist(x.float(), cent).argmin(dim=-1)
    if use_triton:
        km = tri("kmeans")
        case.impls["triton"] = lambda: km.kmeans_assign(x, cent, "l2")
        case.check = (case.impls["triton"], case.impls["torch_twin"])
    cases.append(case)
    case = Case("kmeans_update", cfg)
    case.impls["torch_twin"] = lambda: kmeans.kmeans_update(x, assign, n_c, cent)
    if use_triton:
        km = tri("kmeans")
        case.impls["triton"] = lambda: km.kmeans_update(x, assign, n_c, cent)
        case.check = (case.impls["triton"], case.impls["torch_twin"])
    cases.append(case)

    # --- codec decode: one Llama-8B-shaped 256-token chunk at the default level; GB/s of decoded output
    shape = (2, 2, 8, 1, 32) if quick else (32, 2, 256, 8, 128)
    chan = shape[3] * shape[4]
    base = torch.randn(shape[0], 2, 1, chan, generator=g) * 2  # per-channel offset and spread, like real KV
    spread = torch.rand(shape[0], 2, 1, chan, generator=g) + 0.05
    chunk = (base + torch.randn(shape[0], 2, shape[2], chan, generator=g) * spread).reshape(shape).to(dtype)
    blob = codec.encode(chunk, codec.DEFAULT_LEVEL)
    dec_out = torch.empty(shape, dtype=dtype, device=device)
    case = Case(
        "codec_decode",
        {"shape": list(shape), "level": codec.DEFAULT_LEVEL, "dtype": str(dtype), "blob_bytes": len(blob)},
        bytes_moved=chunk.numel() * esize,
    )
    # twin = codec.decode on the CPU (numba) + copy into the device buffer: the no-kernel path
    case.impls["torch_twin"] = lambda: codec_decode_twin.codec_decode(blob, device, out=dec_out)
    case.impls["codec.decode_cpu"] = lambda: codec.decode(blob, "cpu")
    if use_triton:
        cd = tri("codec_decode")
        plan = cd.prepare(blob, device)  # kernel only: payload and side info already on the device
        case.impls["triton"] = lambda: cd.launch(plan, dec_out)
        # + checksum, parameter parsing and the compressed payload's host-to-device copy
        case.impls["triton_end_to_end"] = lambda: cd.codec_decode(blob, device, out=dec_out)
        case.check = (
            lambda: cd.launch(plan, torch.empty_like(dec_out)),
            lambda: codec_decode_twin.codec_decode(blob, device),
        )
    cases.append(case)
    return cases


def run(device: torch.device, dtype: torch.dtype, quick: bool, warmup: int, reps: int) -> dict[str, Any]:
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    use_triton = triton_available() and (device.type == "cuda" or interpret)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": importlib.import_module("triton").__version__ if use_triton else None,
        "dtype": str(dtype),
        "quick": quick,
        "reps": reps,
        "results": [],
    }
    for case in _cases(device, dtype, quick, use_triton):
        entry: dict[str, Any] = {"kernel": case.kernel, "config": case.config, "impls": {}}
        for name, fn in case.impls.items():
            times = _timer(device, fn, warmup, reps)
            q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
            stats: dict[str, float] = {"median_ms": statistics.median(times), "p10_ms": q[0], "p90_ms": q[-1]}
            if case.bytes_moved is not None and name.startswith("triton"):
                stats["gb_per_s"] = case.bytes_moved / (stats["median_ms"] * 1e-3) / 1e9
            entry["impls"][name] = stats
        if case.bytes_moved is not None:
            entry["bytes_moved"] = case.bytes_moved
        if case.check is not None:
            entry["max_abs_diff_triton_vs_twin"] = _max_diff(case.check[0](), case.check[1]())
        if "triton" in entry["impls"]:
            entry["speedup_vs_twin"] = (
                entry["impls"]["torch_twin"]["median_ms"] / entry["impls"]["triton"]["median_ms"]
            )
        report["results"].append(entry)
        print(json.dumps(entry), file=sys.stderr, flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the report here (it is always printed to stdout)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--quick", action="store_true", help="small shapes (CPU smoke runs)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--reps", type=int, default=50)
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        report: dict[str, Any] = {"skipped": "no CUDA device"}
    else:
        device = torch.device(args.device)
        report = run(device, getattr(torch, args.dtype), args.quick, args.warmup, args.reps)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
