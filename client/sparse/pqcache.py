"""PQCache: product-quantised keys score every token; exact K/V of the top-k come from host memory.

Index (budget-independent, per layer): ``codebooks`` ``[kv_heads, M, 2**bits, head_dim // M]`` (L2 k-means of
each post-RoPE key sub-vector per KV head) and ``codes`` ``[kv_heads, T, M]`` uint8.

Decode: per query head, approximate logits by asymmetric distance (``q_sub . centroid[code]`` summed over
sub-spaces), softmax(/sqrt(D)) over the candidates, **sum** over the GQA group, top-k per KV head over the
middle region. Attended = ``sink`` first tokens + local window (resident, exact) + top-k (exact K/V from
host memory). Fetched tokens go through a per-layer block cache with LFU replacement: a selected token
whose block is cached costs nothing; the blocks holding most selected tokens are inserted asynchronously
(whole blocks, on the prefetcher) and used from the next step on. With ``prefetch_codes`` the codes stay in
host memory and layer ``i+1``'s codes are fetched while layer ``i`` computes (the anchor's H2D prefetch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from client.sparse.base import (
    Context,
    DecodeState,
    SparseBackend,
    SparseIndex,
    default_sink,
    register,
    resident,
)
from client.sparse.prefetch import Ticket
from kernels import ops


@dataclass
class _Layer:
    codebooks: torch.Tensor  # [Hkv, M, 2**b, D/M]
    codes: torch.Tensor | None  # [Hkv, n_mid, M] uint8 (None when prefetched per step)
    mid_start: int
    mid_end: int
    n_topk: int
    fixed_tokens: torch.Tensor  # [Hkv, sink + local]
    fixed_kv: torch.Tensor  # [Hkv, sink + local, 2D]
    slot_of_block: torch.Tensor  # [n_blocks] int64, -1 = not cached
    freq: torch.Tensor  # [n_blocks] float32 LFU counts
    cache: torch.Tensor  # [slots, Hkv, block, 2D]
    block_of_slot: torch.Tensor  # [slots] int64, -1 = free
    codes_ticket: Ticket | None = None
    insert: tuple[torch.Tensor, torch.Tensor, Ticket] | None = None  # (slots, blocks, pending block fetch)


@register
class PQCacheBackend(SparseBackend):
    """PQCache (Zhang et al., SIGMOD'25).

    Args:
        n_sub: sub-vectors per key ``M`` (anchor: 2).
        bits: centroids ``2**bits`` per sub-space (anchor: 6; default ``min(6, log2(T/16))``).
        sink: first tokens always attended (default ~1% of T, at most 32).
        local_ratio: share of the non-sink budget given to the local window (anchor ``recent_ratio`` 0.5).
        iters: Lloyd iterations of the codebook k-means.
        block: tokens per cache block (anchor 128); cache_tokens: cache capacity per layer (anchor 4096);
        cache_topk: blocks inserted per step (anchor 32).
        prefetch_codes: keep codes on the host and prefetch them one layer ahead.
    """

    name = "pqcache"

    def __init__(
        self,
        budget: float,
        *,
        n_sub: int = 2,
        bits: int | None = None,
        sink: int | None = None,
        local_ratio: float = 0.5,
        iters: int = 20,
        block: int = 128,
        cache_tokens: int = 4096,
        cache_topk: int = 32,
        prefetch_codes: bool = False,
        seed: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(budget, **kw)
        if bits is not None and not 1 <= bits <= 8:
            raise ValueError(f"bits must be in [1, 8] for uint8 codes, got {bits}")
        self.n_sub, self.bits, self.sink, self.local_ratio = n_sub, bits, sink, local_ratio
        self.iters, self.block, self.cache_tokens, self.cache_topk = iters, block, cache_tokens, cache_topk
        self.prefetch_codes, self.seed = prefetch_codes, seed

    def build_index(self, kv: torch.Tensor, queries: torch.Tensor | None = None) -> SparseIndex:
        n_layers, _, t, n_kv, d = kv.shape
        m = self.n_sub
        if d % m:
            raise ValueError(f"head_dim {d} is not divisible by n_sub {m}")
        bits = self.bits if self.bits is not None else min(6, max(1, int(math.log2(max(t, 32) / 16))))
        bits = min(bits, int(math.log2(t)))
        books, codes = [], []
        for layer in range(n_layers):
            # [Hkv * M, T, D/M]: one k-means per (KV head, sub-space)
            x = kv[layer, 0].float().view(t, n_kv, m, d // m).permute(1, 2, 0, 3).reshape(n_kv * m, t, d // m)
            cents, assign = ops.kmeans(
                x.to(self.device), 2**bits, iters=self.iters, metric="l2", seed=self.seed + layer
            )
            books.append(cents.view(n_kv, m, 2**bits, d // m).cpu())
            codes.append(assign.view(n_kv, m, t).transpose(1, 2).to(torch.uint8).cpu())
        params = {**self.shape_params(kv), "n_sub": m, "bits": bits}
        return SparseIndex(self.name, params, {"codebooks": torch.stack(books), "codes": torch.stack(codes)})

    def regions(self, context_len: int) -> tuple[int, int, int]:
        """``(sink, local, topk)`` token counts; they sum to ``budget_tokens(T)``."""
        total = self.budget_tokens(context_len)
        sink = min(total, default_sink(context_len) if self.sink is None else self.sink)
        local = min(total - sink, round((total - sink) * self.local_ratio))
        return sink, local, total - sink - local

    def _prefill_layer(self, state: DecodeState, layer: int, kv: torch.Tensor, index: SparseIndex) -> Any:
        t, n_kv, d, dev = state.context_len, state.n_kv_heads, state.head_dim, self.device
        sink, local, topk = self.regions(t)
        state.offload(layer, "kv", lambda: torch.cat([kv[0], kv[1]], -1).transpose(0, 1))  # [Hkv, T, 2D]
        codes = index.tensors["codes"][layer, :, sink : t - local]
        if self.prefetch_codes:
            state.offload(layer, "codes", lambda: codes)
        fixed = torch.cat([torch.arange(sink), torch.arange(t - local, t)])
        n_blocks = -(-t // self.block)
        slots = min(n_blocks, max(1, self.cache_tokens // self.block))
        return _Layer(
            codebooks=index.layer("codebooks", layer, dev),
            codes=None if self.prefetch_codes else resident(codes, dev),
            mid_start=sink,
            mid_end=t - local,
            n_topk=topk,
            fixed_tokens=resident(fixed.expand(n_kv, -1), dev),
            fixed_kv=resident(torch.cat([kv[0, fixed], kv[1, fixed]], -1).transpose(0, 1), dev),
            slot_of_block=torch.full((n_blocks,), -1, dtype=torch.long, device=dev),
            freq=torch.zeros(n_blocks, device=dev),
            cache=torch.zeros(slots, n_kv, self.block, 2 * d, device=dev),
            block_of_slot=torch.full((slots,), -1, dtype=torch.long, device=dev),
        )

    def _codes_rows(self, st: _Layer, n_kv: int) -> torch.Tensor:
        return torch.arange(st.mid_end - st.mid_start).expand(n_kv, -1)

    def _prefetch(self, state: DecodeState, layer: int) -> None:
        st: _Layer = state.layers[layer]
        if self.prefetch_codes and st.codes_ticket is None and st.n_topk:
            st.codes_ticket = state.fetch_async(layer, "codes", self._codes_rows(st, state.n_kv_heads))

    def _finish_insert(self, st: _Layer, state: DecodeState) -> None:
        """Install the blocks fetched asynchronously at the previous step."""
        if st.insert is None:
            return
        slots, blocks, ticket = st.insert
        (data,) = ticket.result()  # [Hkv, n * block, 2D]
        st.cache[slots] = data.view(state.n_kv_heads, len(blocks), self.block, -1).transpose(0, 1)
        st.slot_of_block[blocks] = slots
        st.block_of_slot[slots] = blocks
        st.insert = None

    def _schedule_insert(
        self, st: _Layer, state: DecodeState, layer: int, missed_blocks: torch.Tensor
    ) -> None:
        """LFU: fetch the most-hit uncached blocks of this step into free or less-frequent slots."""
        if missed_blocks.numel() == 0:
            return
        blocks, counts = missed_blocks.unique(return_counts=True)
        blocks = blocks[counts.argsort(descending=True, stable=True)[: self.cache_topk]]
        occupied = st.block_of_slot >= 0
        slot_freq = torch.where(
            occupied, st.freq[st.block_of_slot.clamp(min=0)], torch.full_like(st.freq[:1], -1)
        )
        victims = slot_freq.argsort(stable=True)[: len(blocks)]
        blocks = blocks[: len(victims)]
        keep = st.freq[blocks] > slot_freq[victims]  # never evict a block used more often
        blocks, victims = blocks[keep], victims[keep]
        if blocks.numel() == 0:
            return
        old = st.block_of_slot[victims]
        st.slot_of_block[old[old >= 0]] = -1
        st.block_of_slot[victims] = -1
        tokens = (blocks[:, None] * self.block + torch.arange(self.block, device=blocks.device)).reshape(-1)
        rows = torch.where(tokens < state.context_len, tokens, -1).expand(state.n_kv_heads, -1)
        ticket = state.fetch_async(layer, "kv", rows)
        state.stats.rows_fetched += int((rows >= 0).sum())
        state.stats.bytes_fetched += int((rows >= 0).sum()) * st.cache.shape[-1] * st.cache.element_size()
        st.insert = (victims, blocks, ticket)

    def _context(self, state: DecodeState, layer: int, q: torch.Tensor) -> Context:
        st: _Layer = state.layers[layer]
        n_kv, d = state.n_kv_heads, state.head_dim
        self._finish_insert(st, state)
        if st.n_topk == 0:
            return Context(st.fixed_tokens, (st.fixed_kv[..., :d],), (st.fixed_kv[..., d:],))
        codes = st.codes
        if codes is None:
            ticket = st.codes_ticket or state.fetch_async(layer, "codes", self._codes_rows(st, n_kv))
            st.codes_ticket = None
            (codes,) = ticket.result()
            state.stats.bytes_fetched += codes.numel() * codes.element_size()
        group = q.shape[0] // n_kv
        # per-query-head ADC logits, softmax, then sum over the group (the anchor's GQA rule)
        logits = ops.pq_scores(q, st.codebooks.repeat_interleave(group, 0), codes.repeat_interleave(group, 0))
        probs = torch.softmax(logits / math.sqrt(d), dim=-1).view(n_kv, group, -1).sum(1)
        sel = probs.topk(st.n_topk, dim=1).indices + st.mid_start  # [Hkv, k] token ids
        blk = sel // self.block
        slot = st.slot_of_block[blk]
        hit = slot >= 0
        st.freq.index_add_(0, blk.reshape(-1), torch.ones(blk.numel(), device=blk.device))
        state.stats.units_hit += int(hit.sum())
        state.stats.units_missed += int((~hit).sum())
        heads = torch.arange(n_kv, device=sel.device)[:, None].expand_as(sel)
        cached = st.cache[slot.clamp(min=0), heads, sel % self.block]  # [Hkv, k, 2D]
        if bool((~hit).any()):
            rows = torch.where(hit, -1, sel)
            (fetched,) = state.fetch_async(layer, "kv", rows).result()
            state.account(rows, fetched)
            kv_sel = torch.where(hit[..., None], cached, fetched)
            self._schedule_insert(st, state, layer, blk[~hit])
        else:
            kv_sel = cached
        return Context(
            torch.cat([st.fixed_tokens, sel], 1),
            (st.fixed_kv[..., :d], kv_sel[..., :d]),
            (st.fixed_kv[..., d:], kv_sel[..., d:]),
        )
