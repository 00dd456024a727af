"""ALISA: sparse window attention (local window + globally important tokens) over an INT8 KV cache.

Index (per layer): ``importance`` ``[T]`` = attention weights of the last ``obs_steps`` prefill queries,
summed over those queries and over all heads (ALISA's "local attention sum"; it needs the prefill queries,
which a KV store does not have, so the service stores this vector instead), and the channel-wise
asymmetric min/max 8-bit quantisation of the KV cache: ``scale``/``zero`` ``[kv_heads * 2 * head_dim]``
(``x ~ q * scale + zero``). The INT8 rows themselves (``kv_q`` ``[T, kv_heads * 2 * head_dim]``) are not in
the index: they follow from the KV and ``scale``/``zero`` elementwise (``quantize_with``), so the node
derives them at prefill (local mode) or re-quantises the float rows it fetches (remote mode), and the
sidecar stays ~1/4 of a float32 copy smaller.

Decode: attended = the last ``k = round(budget_tokens * local_ratio)`` context tokens (static) + the
top-``(budget_tokens - k)`` earlier tokens by importance (dynamic, shared by all heads, as ALISA for MHA)
+ the generated tokens (exact). After each step the step's attention weights (over the attended set,
summed over heads) are added to the importance and the step ``obs_steps`` back is subtracted, so the
importance is a sliding sum over the last ``obs_steps`` steps; the prefill share decays linearly over the
first ``obs_steps`` steps (its per-row weights are not kept). The selection does not depend on the current
query, so layer ``i+1``'s global tokens are fetched (INT8, from host memory) while layer ``i`` computes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch

from client.sparse.base import (
    Context,
    DecodeState,
    SelectionCache,
    SparseBackend,
    SparseIndex,
    register,
    resident,
)
from client.sparse.prefetch import Ticket


def quantize_channels(x: torch.Tensor, bits: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric min/max quantisation of ``x`` ``[N, C]`` per channel.

    Returns ``(int8 [N, C], scale [C], zero [C])`` with ``x ~ q * scale + zero``."""
    lo, hi = x.amin(0), x.amax(0)
    scale = ((hi - lo) / (2**bits - 1)).clamp(min=1e-12)
    zero = lo + (2 ** (bits - 1)) * scale  # stored values are centred on 0 to fit int8
    return quantize_with(x, scale, zero, bits), scale, zero


def quantize_with(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """``x`` ``[..., C]`` float32 to int8 with given per-channel ``scale``/``zero`` ``[C]``.

    Elementwise, so rows re-quantised from the stored float rows fetched from the service (remote mode)
    equal the rows local mode derives from its own KV, bit for bit."""
    half = 2 ** (bits - 1)
    return torch.round((x.float() - zero) / scale).clamp(-half, half - 1).to(torch.int8)


def _rows(kv: torch.Tensor) -> torch.Tensor:
    """One layer's ``kv`` ``[2, T, kv_heads, head_dim]`` as float32 rows ``[T, kv_heads * 2 * head_dim]``
    (per head: K then V), the layout of ALISA's INT8 rows and of the service's row reads."""
    return torch.cat([kv[0], kv[1]], -1).float().flatten(1)  # flatten: T may be 0 (no local window)


@dataclass
class _Layer:
    importance: torch.Tensor  # [T] running sliding-window attention sum
    prefill_share: torch.Tensor  # [T] prefill importance / obs_steps, decayed per step
    prefill_left: int
    rows: deque[tuple[torch.Tensor, torch.Tensor]]  # last obs_steps (tokens, weights) sparse rows
    local_tokens: torch.Tensor  # [k_local]
    local_kv: torch.Tensor  # [k_local, Hkv * 2D] stored dtype
    scale: torch.Tensor  # [Hkv * 2D]
    zero: torch.Tensor
    n_global: int
    cache: SelectionCache = field(default_factory=SelectionCache)
    pending: tuple[torch.Tensor, torch.Tensor, Ticket] | None = None  # (selection, miss rows, fetch)


@register
class ALISABackend(SparseBackend):
    """ALISA (Zhao et al., ISCA'24).

    Args:
        local_ratio: share of the budget given to the static local window (paper: k = n*r/2, i.e. 0.5).
        obs_steps: steps summed into the importance (paper: k; default ``min(64, ceil(T / 16))``, fixed at
            index build so one sidecar serves every budget).
        kv_bits: 8 for INT8 KV (paper) or ``None`` to keep float32.
    """

    name = "alisa"

    def __init__(
        self,
        budget: float,
        *,
        local_ratio: float = 0.5,
        obs_steps: int | None = None,
        kv_bits: int | None = 8,
        **kw: Any,
    ) -> None:
        super().__init__(budget, **kw)
        if kv_bits not in (None, 8):
            raise ValueError(f"kv_bits must be 8 or None, got {kv_bits}")
        self.local_ratio, self.obs_steps, self.kv_bits = local_ratio, obs_steps, kv_bits

    def build_index(self, kv: torch.Tensor, queries: torch.Tensor | None = None) -> SparseIndex:
        if queries is None:
            raise ValueError("ALISA's index needs the prefill queries [layers, T, n_heads, head_dim]")
        n_layers, _, t, n_kv, d = kv.shape
        obs = min(t, self.obs_steps if self.obs_steps is not None else min(64, -(-t // 16)))
        if queries.shape[1] < obs:
            raise ValueError(f"ALISA needs the last {obs} prefill queries, got {queries.shape[1]}")
        group = queries.shape[2] // n_kv
        imps, scales, zeros = [], [], []
        causal = torch.arange(t)[None, :] <= torch.arange(t - obs, t)[:, None]  # [obs, T]
        for layer in range(n_layers):
            keys = kv[layer, 0].float().repeat_interleave(group, 1)  # [T, H, D]
            last_q = queries[layer, queries.shape[1] - obs :].float()
            logits = torch.einsum("ohd,thd->hot", last_q, keys) / math.sqrt(d)
            probs = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
            imps.append(probs.sum((0, 1)))
            flat = _rows(kv[layer])
            if self.kv_bits is None:
                scales.append(torch.ones(flat.shape[1]))
                zeros.append(torch.zeros(flat.shape[1]))
            else:
                _, s, z = quantize_channels(flat, self.kv_bits)
                scales.append(s)
                zeros.append(z)
        params = {**self.shape_params(kv), "obs_steps": obs, "kv_bits": self.kv_bits or 32}
        tensors = {"importance": torch.stack(imps), "scale": torch.stack(scales), "zero": torch.stack(zeros)}
        return SparseIndex(self.name, params, tensors)

    def check_index(self, index: SparseIndex, kv: torch.Tensor) -> None:
        super().check_index(index, kv)
        if index.params.get("kv_bits") != (self.kv_bits or 32):
            raise ValueError(f"index kv_bits {index.params.get('kv_bits')} != backend {self.kv_bits or 32}")

    def _prefill_layer(self, state: DecodeState, layer: int, kv: torch.Tensor, index: SparseIndex) -> Any:
        t, dev = state.context_len, self.device
        total = self.budget_tokens(t)
        k_local = min(total, round(total * self.local_ratio))
        scale, zero = index.tensors["scale"][layer], index.tensors["zero"][layer]

        def quantized(rows: torch.Tensor) -> torch.Tensor:
            return rows if self.kv_bits is None else quantize_with(rows, scale, zero, self.kv_bits)

        # [1, T, Hkv*2D]: one selection shared by all heads; never built when the service serves the rows
        state.offload(layer, "kv_q", lambda: quantized(_rows(kv))[None])
        imp = index.layer("importance", layer, dev).float()
        obs = int(index.params["obs_steps"])
        return _Layer(
            importance=imp.clone(),
            prefill_share=imp / obs,
            prefill_left=obs,
            rows=deque(),
            local_tokens=torch.arange(t - k_local, t, device=dev),
            local_kv=resident(quantized(_rows(kv[:, t - k_local :])), dev),
            scale=index.layer("scale", layer, dev),
            zero=index.layer("zero", layer, dev),
            n_global=total - k_local,
        )

    def _select_global(self, state: DecodeState, st: _Layer) -> torch.Tensor:
        region = st.importance[: state.context_len - st.local_tokens.numel()]
        return region.topk(st.n_global).indices.sort().values[None]  # [1, n_global]

    def _prefetch(self, state: DecodeState, layer: int) -> None:
        st: _Layer = state.layers[layer]
        if st.pending is not None or st.n_global == 0:
            return
        sel = self._select_global(state, st)
        known = st.cache.ids
        miss = sel[~torch.isin(sel, known)][None] if known is not None and known.shape == sel.shape else sel
        st.pending = (sel, miss, state.fetch_async(layer, "kv_q", miss))

    def _context(self, state: DecodeState, layer: int, q: torch.Tensor) -> Context:
        st: _Layer = state.layers[layer]
        n_kv, d = state.n_kv_heads, state.head_dim
        tokens, kv = st.local_tokens, st.local_kv
        if st.n_global:
            if st.pending is None:
                self._prefetch(state, layer)
            sel, planned, ticket = st.pending  # type: ignore[misc]  # set by _prefetch
            st.pending = None

            def load(miss: torch.Tensor) -> list[torch.Tensor]:
                if torch.equal(miss, planned):
                    (rows,) = ticket.result()
                else:  # the cache diff disagreed with the plan (cannot happen unless ids changed shape)
                    (rows,) = state.fetch_async(layer, "kv_q", miss).result()
                state.account(miss, rows)
                return [rows[:, :, None]]

            (glob,) = st.cache.update(sel, load, state.stats)
            assert st.cache.ids is not None
            tokens = torch.cat([st.cache.ids[0], tokens])
            kv = torch.cat([glob[0, :, 0], kv])
        deq = (kv.float() * st.scale + st.zero).view(-1, n_kv, 2, d).permute(2, 1, 0, 3)  # [2, Hkv, K, D]
        return Context(tokens.expand(n_kv, -1), (deq[0],), (deq[1],))

    def _observe(
        self, state: DecodeState, layer: int, q: torch.Tensor, k_parts: tuple[torch.Tensor, ...], ctx: Context
    ) -> None:
        st: _Layer = state.layers[layer]
        n_kv, d = k_parts[0].shape[0], k_parts[0].shape[2]
        qg = q.view(n_kv, -1, d)
        logits = torch.cat([torch.einsum("hgd,hnd->hgn", qg, k) for k in k_parts], -1) / math.sqrt(d)
        weights = torch.softmax(logits, dim=-1).sum((0, 1))[: ctx.tokens.shape[1]]  # context part, all heads
        row = (ctx.tokens[0], weights)
        st.importance.index_add_(0, row[0], row[1])
        st.rows.append(row)
        if st.prefill_left > 0:
            st.importance -= st.prefill_share
            st.prefill_left -= 1
        if len(st.rows) > int(state.index.params["obs_steps"]):
            old_tokens, old_w = st.rows.popleft()
            st.importance.index_add_(0, old_tokens, -old_w)
