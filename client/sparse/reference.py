"""The two reference backends every method is compared against.

* ``oracle``: exact top-k of ``q . k`` per query head over the whole context (upper bound; needs all keys).
* ``sink_local``: the first ``sink`` tokens plus the most recent ones (StreamingLLM-like lower bound).
"""

from __future__ import annotations

from typing import Any

import torch

from client.sparse.base import (
    Context,
    DecodeState,
    SparseBackend,
    SparseIndex,
    default_sink,
    gather_heads,
    register,
    resident,
)


@register
class OracleBackend(SparseBackend):
    """Exact top-``budget`` keys per query head (all K/V resident)."""

    name = "oracle"
    per_query_head = True

    def build_index(self, kv: torch.Tensor, queries: torch.Tensor | None = None) -> SparseIndex:
        return SparseIndex(self.name, self.shape_params(kv), {})

    def _prefill_layer(self, state: DecodeState, layer: int, kv: torch.Tensor, index: SparseIndex) -> Any:
        # [2, Hkv, T, D]: every key must be scored, so everything stays on the device
        return resident(kv.transpose(1, 2), self.device)

    def _context(self, state: DecodeState, layer: int, q: torch.Tensor) -> Context:
        kv = state.layers[layer]
        n_heads, d = q.shape
        group = n_heads // state.n_kv_heads
        logits = torch.einsum("hgd,htd->hgt", q.view(state.n_kv_heads, group, d), kv[0]).reshape(n_heads, -1)
        tokens = logits.topk(self.budget_tokens(state.context_len), dim=1).indices
        return Context(tokens, (gather_heads(kv[0], tokens),), (gather_heads(kv[1], tokens),))


@register
class SinkLocalBackend(SparseBackend):
    """``sink`` first tokens + the most recent ``budget - sink`` context tokens, same for every head."""

    name = "sink_local"

    def __init__(self, budget: float, *, sink: int | None = None, **kw: Any) -> None:
        super().__init__(budget, **kw)
        self.sink = sink

    def build_index(self, kv: torch.Tensor, queries: torch.Tensor | None = None) -> SparseIndex:
        return SparseIndex(self.name, self.shape_params(kv), {})

    def _prefill_layer(self, state: DecodeState, layer: int, kv: torch.Tensor, index: SparseIndex) -> Any:
        t = state.context_len
        n = self.budget_tokens(t)
        sink = min(n, default_sink(t) if self.sink is None else self.sink)
        tokens = torch.cat([torch.arange(sink), torch.arange(t - (n - sink), t)])
        sel = resident(kv[:, tokens].transpose(1, 2), self.device)  # only these stay resident
        return resident(tokens.expand(state.n_kv_heads, -1), self.device), sel

    def _context(self, state: DecodeState, layer: int, q: torch.Tensor) -> Context:
        tokens, sel = state.layers[layer]
        return Context(tokens, (sel[0],), (sel[1],))
