"""Fidelity harness: every backend vs exact attention on real stories260K KV caches.

``python -m client.sparse.eval --json out.json [--plot docs/sparse_fidelity.png] [--markdown table.md]``

For each sampled context (``--tokens`` long, the first ``--prefill`` tokens are the prefill) and each
backend row and budget:

* attention level (every layer, the dense model's queries and exact K/V of the decoded tokens, so errors do
  not compound): recall@K of the oracle top-K context keys per query head, attention-mass coverage of the
  attended set (context selection + generated tokens) under the dense softmax, relative error of the
  attention output per query head (mean and p90); cache hit rate and bytes fetched per decode position
  (all layers) in the steady state, i.e. positions 2..n, with the cold first position's cache fill
  apart (``cold_fill_bytes``, ``cold_hit_rate``);
* end to end: dense prefill, then teacher-forced decoding of the remaining tokens with sparse attention at
  every layer not in ``--dense-layers`` (generated K/V come from the sparse run): KL(dense || sparse) of the
  next-token distribution, NLL increase of the true next token, top-1 agreement.

Indexes are built once per context and backend (they are budget-independent), round-tripped through the
sidecar format, and reused for every budget. Rows are always reported beside ``oracle`` (upper bound) and
``sink_local`` (lower bound); ``beats_sink_local`` lists, per row and budget, the metrics where a method
is not better than sink+local.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from client.model import Llama2c
from client.sparse.base import FetchStats, SparseIndex, budget_tokens, get_backend
from client.sparse.decode import SparseDecoder

BUDGETS = (0.0625, 0.125, 0.25)
# (label, backend, params): anchor defaults scaled to a 448-token context (see docs/sparse.md)
ROWS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    ("oracle", "oracle", {}),
    ("sink_local", "sink_local", {}),
    ("shadowkv", "shadowkv", {"chunk": 4, "local_chunks": 2}),
    ("shadowkv r16", "shadowkv", {"chunk": 4, "local_chunks": 2, "rank": 16}),
    ("pqcache", "pqcache", {"block": 16, "cache_tokens": 64, "cache_topk": 4}),
    ("clusterkv", "clusterkv", {}),
    ("alisa", "alisa", {}),
)
HIGHER_IS_BETTER = {"recall": True, "mass": True, "out_err": False, "kl": False, "dnll": False, "top1": True}


@dataclass
class RowResult:
    label: str
    backend: str
    params: dict[str, Any]
    budget: float
    budget_tokens: int
    recall: float = 0.0
    mass: float = 0.0
    out_err: float = 0.0
    out_err_p90: float = 0.0
    kl: float = 0.0
    dnll: float = 0.0
    top1: float = 0.0
    index_bytes: int = 0
    hit_rate: float = 0.0  # steady state: decode positions 2..n (the first one fills the caches)
    fetched_bytes_per_step: float = 0.0  # steady state, per decode position (all layers)
    cold_fill_bytes: float = 0.0  # fetched at the first decode position (all layers)
    cold_hit_rate: float = 0.0
    not_better_than_sink_local: list[str] = field(default_factory=list)


def attention_metrics(
    backend_name: str,
    params: dict[str, Any],
    budget: float,
    index: SparseIndex,
    kv: torch.Tensor,
    queries: torch.Tensor,
    prefill: int,
) -> dict[str, Any]:
    """Attention-level metrics of one backend over decode positions ``[prefill, T)``.

    ``kv`` ``[layers, 2, T, kv_heads, head_dim]`` and ``queries`` ``[layers, T, n_heads, head_dim]`` come
    from a dense forward of the whole sequence.
    """
    n_layers, _, t_total, n_kv, d = kv.shape
    n_heads = queries.shape[2]
    group = n_heads // n_kv
    backend = get_backend(backend_name, budget, **params)
    state = backend.prefill(kv[:, :, :prefill], index=index)
    k_budget = budget_tokens(budget, prefill)
    recalls, masses, errs = [], [], []
    cold = FetchStats()
    for t in range(prefill, t_total):
        if t == prefill + 1:  # the first decode position (every layer) filled the caches
            cold = dataclasses.replace(state.stats)
        for layer in range(n_layers):
            q = queries[layer, t]
            out = backend.decode_step(state, layer, q, kv[layer, 0, t], kv[layer, 1, t])
            keys = kv[layer, 0, : t + 1].repeat_interleave(group, 1).transpose(0, 1)  # [H, t+1, D]
            vals = kv[layer, 1, : t + 1].repeat_interleave(group, 1).transpose(0, 1)
            probs = torch.softmax(torch.einsum("hd,htd->ht", q, keys) / math.sqrt(d), dim=-1)
            dense = torch.einsum("ht,htd->hd", probs, vals)
            sel = state.last_selection[layer]
            assert sel is not None
            if sel.shape[0] != n_heads:
                sel = sel.repeat_interleave(n_heads // sel.shape[0], 0)
            chosen = torch.zeros(n_heads, t + 1, dtype=torch.bool)
            chosen.scatter_(1, sel.cpu(), True)
            chosen[:, prefill:] = True  # generated tokens are always attended
            top = probs[:, :prefill].topk(k_budget, dim=1).indices
            recalls.append(chosen.gather(1, top).float().mean(1))
            masses.append((probs * chosen).sum(1))
            errs.append((out.cpu() - dense).norm(dim=1) / dense.norm(dim=1).clamp(min=1e-12))
    steps = t_total - prefill
    if steps == 1:
        cold = dataclasses.replace(state.stats)
    # Steady state: decode positions 2..steps; the cold first position's cache fill is reported apart.
    total = state.stats
    steady = FetchStats(
        units_hit=total.units_hit - cold.units_hit, units_missed=total.units_missed - cold.units_missed
    )
    state.close()
    err = torch.cat(errs)
    return {
        "recall": float(torch.cat(recalls).mean()),
        "mass": float(torch.cat(masses).mean()),
        "out_err": float(err.mean()),
        "out_err_p90": float(err.quantile(0.9)),
        "hit_rate": steady.hit_rate,
        "fetched_bytes_per_step": (total.bytes_fetched - cold.bytes_fetched) / max(1, steps - 1),
        "cold_fill_bytes": float(cold.bytes_fetched),
        "cold_hit_rate": cold.hit_rate,
    }


def e2e_metrics(
    model: Llama2c,
    backend_name: str,
    params: dict[str, Any],
    budget: float,
    index: SparseIndex,
    ids: Sequence[int],
    dense_logits: torch.Tensor,
    prefill: int,
    dense_layers: Sequence[int],
) -> dict[str, float]:
    """KL(dense || sparse), NLL increase and top-1 agreement of teacher-forced sparse decoding after a dense
    prefill of ``ids[:prefill]``; ``dense_logits`` ``[T, vocab]`` from a dense forward of ``ids``."""
    dec = SparseDecoder(model, get_backend(backend_name, budget, **params), dense_layers=dense_layers)
    dec.prefill(list(ids[:prefill]), index=index)
    kls, dnlls, agree = [], [], []
    for t in range(prefill, len(ids) - 1):
        logits = dec.step(int(ids[t]))
        lp_s = torch.log_softmax(logits, -1)
        lp_d = torch.log_softmax(dense_logits[t], -1)
        kls.append(float((lp_d.exp() * (lp_d - lp_s)).sum()))
        dnlls.append(float(lp_d[ids[t + 1]] - lp_s[ids[t + 1]]))
        agree.append(float(lp_s.argmax() == lp_d.argmax()))
    dec.close()
    n = len(kls)
    return {"kl": sum(kls) / n, "dnll": sum(dnlls) / n, "top1": sum(agree) / n}


def run(
    n_contexts: int = 3,
    tokens: int = 512,
    prefill: int = 448,
    budgets: Sequence[float] = BUDGETS,
    rows: Sequence[tuple[str, str, dict[str, Any]]] = ROWS,
    dense_layers: Sequence[int] = (0,),
    seed: int = 0,
) -> dict[str, Any]:
    """Run the harness: ``{"config": ..., "results": [RowResult as dict, ...]}`` (means over contexts)."""
    torch.manual_seed(seed)
    model = Llama2c.from_file()
    per: dict[tuple[str, float], list[dict[str, float]]] = {}
    index_bytes: dict[str, int] = {}
    for c in range(n_contexts):
        ids = model.sample(tokens, seed=seed + c)
        res = model.forward(ids, return_queries=True)
        assert res.queries is not None
        kv_prefill, q_prefill = res.kv[:, :, :prefill], res.queries[:, :prefill]
        for label, name, params in rows:
            blob = get_backend(name, budgets[0], **params).build_index(kv_prefill, q_prefill).to_bytes()
            index = SparseIndex.from_bytes(blob)  # what a client receives from the service
            index_bytes[label] = len(blob)
            for b in budgets:
                m = attention_metrics(name, params, b, index, res.kv, res.queries, prefill)
                m.update(e2e_metrics(model, name, params, b, index, ids, res.logits, prefill, dense_layers))
                per.setdefault((label, b), []).append(m)
    results: list[RowResult] = []
    for label, name, params in rows:
        for b in budgets:
            runs = per[(label, b)]
            row = RowResult(label, name, params, b, budget_tokens(b, prefill), index_bytes=index_bytes[label])
            for key in runs[0]:
                setattr(row, key, sum(r[key] for r in runs) / len(runs))
            results.append(row)
    floor = {r.budget: r for r in results if r.label == "sink_local"}
    for r in results:
        if r.label in ("sink_local", "oracle") or r.budget not in floor:
            continue
        for metric, higher in HIGHER_IS_BETTER.items():
            mine, base = getattr(r, metric), getattr(floor[r.budget], metric)
            if (mine <= base) if higher else (mine >= base):
                r.not_better_than_sink_local.append(metric)
    config = {
        "n_contexts": n_contexts,
        "tokens": tokens,
        "prefill": prefill,
        "budgets": list(budgets),
        "dense_layers": list(dense_layers),
        "seed": seed,
        "model": "stories260K",
    }
    return {"config": config, "results": [asdict(r) for r in results]}


def markdown_table(report: dict[str, Any]) -> str:
    """One Markdown table row per (backend row, budget)."""
    head = (
        "| budget | backend | recall@K | mass | out err mean / p90 | KL | ΔNLL | top-1 | hit rate | "
        "fetched B/step | cold fill B | not better than sink+local |"
    )
    lines = [head, "|" + "---|" * 12]
    for r in sorted(report["results"], key=lambda r: r["budget"]):
        lines.append(
            f"| {r['budget'] * 100:.2f}% ({r['budget_tokens']}) | {r['label']} | {r['recall']:.3f} | "
            f"{r['mass']:.3f} | {r['out_err']:.3f} / {r['out_err_p90']:.3f} | {r['kl']:.3f} | "
            f"{r['dnll']:.3f} | {r['top1']:.3f} | "
            f"{r['hit_rate']:.2f} | {r['fetched_bytes_per_step']:.0f} | {r['cold_fill_bytes']:.0f} | "
            f"{', '.join(r['not_better_than_sink_local']) or '-'} |"
        )
    return "\n".join(lines)


def plot(report: dict[str, Any], path: str) -> None:
    """Four panels (recall, mass, output error, KL) against the budget, one line per backend row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = (
        ("recall", "recall@K (higher is better)"),
        ("mass", "attention mass covered"),
        ("out_err", "attention output rel. error"),
        ("kl", "next-token KL(dense||sparse)"),
    )
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    labels = list(dict.fromkeys(r["label"] for r in report["results"]))
    for ax, (metric, title) in zip(axes, metrics, strict=True):
        for label in labels:
            rs = sorted((r for r in report["results"] if r["label"] == label), key=lambda r: r["budget"])
            style = "--" if label in ("oracle", "sink_local") else "-"
            ax.plot([r["budget"] * 100 for r in rs], [r[metric] for r in rs], style, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ticks = sorted({r["budget"] * 100 for r in report["results"]})
        ax.set_xticks(ticks, [f"{x:g}%" for x in ticks])
        ax.set_xlabel("budget (% of context)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    cfg = report["config"]
    fig.suptitle(
        f"stories260K, {cfg['n_contexts']} contexts, prefill {cfg['prefill']} / {cfg['tokens']} tokens"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", required=True, help="write the report here")
    p.add_argument("--plot", help="write a PNG plot here")
    p.add_argument("--markdown", help="write a Markdown table here")
    p.add_argument("--contexts", type=int, default=3)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--prefill", type=int, default=448)
    p.add_argument(
        "--dense-layers", default="0", help="comma-separated layers kept dense end to end ('' = none)"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    dense = [int(x) for x in a.dense_layers.split(",") if x.strip()]
    t0 = time.perf_counter()
    report = run(a.contexts, a.tokens, a.prefill, dense_layers=dense, seed=a.seed)
    report["config"]["wall_s"] = round(time.perf_counter() - t0, 1)
    with open(a.json, "w") as f:
        json.dump(report, f, indent=2)
    table = markdown_table(report)
    if a.markdown:
        with open(a.markdown, "w") as f:
            f.write(table + "\n")
    if a.plot:
        plot(report, a.plot)
    print(table)


if __name__ == "__main__":
    main()
