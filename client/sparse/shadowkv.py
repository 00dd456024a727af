"""ShadowKV: low-rank pre-RoPE keys on the device, values offloaded, chunk landmarks for selection.

Index (budget-independent, per layer):

* ``u`` ``[T, r]`` and ``sv`` ``[r, kv_heads, head_dim]``: truncated SVD of the *pre-RoPE* keys of all KV
  heads side by side (``[T, kv_heads * head_dim]``), singular values folded into ``sv``. Pre-RoPE keys are
  recovered exactly from the stored post-RoPE keys with ``apply_rope(..., inverse=True)`` and the model's
  RoPE theta; they are *not* stored.
* ``landmarks`` ``[kv_heads, T // chunk, head_dim]``: mean post-RoPE key of each chunk.
* ``outlier_score`` ``[kv_heads, T // chunk]``: min cosine between a chunk's landmark and its keys; the
  lowest-scoring chunks are kept exact at decode time (their keys are poorly summarised by the landmark).

Decode: softmax(q . landmarks / sqrt(D)) per query head, max over the GQA group, top chunks per KV head.
Attended = local tail + outlier chunks (exact K/V, resident) + selected chunks, whose keys are rebuilt as
``RoPE(U[rows] @ SV)`` on the device and whose values are fetched from host memory (pinned on CUDA),
only for chunks missed by the previous step's selection (:class:`~client.sparse.base.SelectionCache`);
the V fetch runs on the prefetcher while the keys are rebuilt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from client.model.llama2c import apply_rope
from client.sparse.base import (
    Context,
    DecodeState,
    SelectionCache,
    SparseBackend,
    SparseIndex,
    register,
    resident,
)
from kernels import ops


@dataclass(frozen=True)
class ShadowKVSplit:
    """How a budget of ``total`` tokens is spent: local tail + outlier chunks + selected chunks."""

    total: int
    local: int
    outlier_chunks: int
    selected_chunks: int
    chunk: int
    context: int

    @property
    def candidates(self) -> int:
        """Chunks (before removing outliers) that lie entirely before the local tail."""
        return (self.context - self.local) // self.chunk


def split_budget(
    total: int, context: int, chunk: int, local_chunks: int, outlier_chunks: int
) -> ShadowKVSplit:
    """Spend exactly ``total`` tokens: the local tail absorbs what chunks cannot (``< chunk`` tokens)."""
    base_local = min(context, local_chunks * chunk + context % chunk)
    if total <= base_local:
        return ShadowKVSplit(total, total, 0, 0, chunk, context)
    n_out = min(outlier_chunks, (total - base_local) // chunk)
    rest = total - base_local - n_out * chunk
    return ShadowKVSplit(total, base_local + rest % chunk, n_out, rest // chunk, chunk, context)


@dataclass
class _Layer:
    u: torch.Tensor  # [T, r]
    sv: torch.Tensor  # [r, Hkv, D]
    cand_ids: torch.Tensor  # [Hkv, n_cand] chunk ids eligible for selection
    cand_landmarks: torch.Tensor  # [Hkv, n_cand, D]
    static_tokens: torch.Tensor  # [Hkv, n_static] local tail + outlier chunk tokens (exact)
    static_k: torch.Tensor  # [Hkv, n_static, D]
    static_v: torch.Tensor
    cache: SelectionCache
    n_select: int


@register
class ShadowKVBackend(SparseBackend):
    """ShadowKV (Sun et al., 2024). Parameters are scaled from the anchor's defaults (rank 160 of 1024,
    chunk 8, 4 local chunks, 24 outlier chunks per 1024 budget tokens).

    Args:
        rank: SVD rank ``r`` (default ``ceil(160/1024 * kv_heads * head_dim)``).
        chunk: tokens per chunk/landmark.
        local_chunks: chunks of the exact local tail.
        outlier_chunks: exact outlier chunks per KV head (default ``round(0.1875 * budget_tokens / chunk)``).
    """

    name = "shadowkv"

    def __init__(
        self,
        budget: float,
        *,
        rank: int | None = None,
        chunk: int = 8,
        local_chunks: int = 4,
        outlier_chunks: int | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(budget, **kw)
        if chunk < 1 or local_chunks < 0 or (rank is not None and rank < 1):
            raise ValueError("chunk and rank must be >= 1, local_chunks >= 0")
        self.rank, self.chunk, self.local_chunks, self.outlier_chunks = (
            rank,
            chunk,
            local_chunks,
            outlier_chunks,
        )

    def build_index(self, kv: torch.Tensor, queries: torch.Tensor | None = None) -> SparseIndex:
        n_layers, _, t, n_kv, d = kv.shape
        if d % 2:
            raise ValueError(f"ShadowKV undoes RoPE on the keys: head_dim must be even, got {d}")
        c = self.chunk
        full = n_kv * d
        rank = min(t, full, self.rank if self.rank is not None else -(-160 * full // 1024))
        n_chunks = t // c
        pos = torch.arange(t)
        us, svs, lms, scores = [], [], [], []
        for layer in range(n_layers):
            k_post = kv[layer, 0].float()  # [T, Hkv, D]
            k_pre = apply_rope(k_post, pos, self.rope_theta, inverse=True).reshape(t, full)
            u, s, vh = torch.linalg.svd(k_pre.to(self.device), full_matrices=False)
            us.append(u[:, :rank].contiguous().cpu())
            svs.append((s[:rank, None] * vh[:rank]).view(rank, n_kv, d).cpu())
            chunks = k_post[: n_chunks * c].view(n_chunks, c, n_kv, d).permute(2, 0, 1, 3)  # [Hkv, n, c, D]
            lm = chunks.mean(2)
            lms.append(lm)
            scores.append(F.cosine_similarity(chunks, lm.unsqueeze(2), dim=-1).amin(-1))
        params = {**self.shape_params(kv), "rank": rank, "chunk": c, "rope_theta": self.rope_theta}
        tensors = {
            "u": torch.stack(us),
            "sv": torch.stack(svs),
            "landmarks": torch.stack(lms),
            "outlier_score": torch.stack(scores),
        }
        return SparseIndex(self.name, params, tensors)

    def check_index(self, index: SparseIndex, kv: torch.Tensor) -> None:
        super().check_index(index, kv)
        if index.params.get("chunk") != self.chunk or index.params.get("rope_theta") != self.rope_theta:
            raise ValueError(
                f"index chunk/theta {index.params} do not match backend ({self.chunk}, {self.rope_theta})"
            )

    def split(self, context_len: int) -> ShadowKVSplit:
        total = self.budget_tokens(context_len)
        n_out = self.outlier_chunks
        if n_out is None:
            n_out = max(1, round(0.1875 * total / self.chunk))
        return split_budget(total, context_len, self.chunk, self.local_chunks, n_out)

    def _prefill_layer(self, state: DecodeState, layer: int, kv: torch.Tensor, index: SparseIndex) -> Any:
        t, n_kv, c, dev = state.context_len, state.n_kv_heads, self.chunk, self.device
        sp = self.split(t)
        score = index.tensors["outlier_score"][layer, :, : sp.candidates]  # [Hkv, n_cand_total]
        outliers = score.topk(sp.outlier_chunks, dim=1, largest=False).indices.sort(1).values
        is_out = torch.zeros_like(score, dtype=torch.bool).scatter_(1, outliers, True)
        cand = torch.arange(sp.candidates).expand(n_kv, -1)[~is_out].view(n_kv, -1)
        lm = index.tensors["landmarks"][layer]
        local = torch.arange(t - sp.local, t).expand(n_kv, -1)
        out_tokens = (outliers[:, :, None] * c + torch.arange(c)).reshape(n_kv, -1)
        static = torch.cat([out_tokens, local], 1)
        k_heads, v_heads = kv[0].transpose(0, 1), kv[1].transpose(0, 1)  # [Hkv, T, D]
        n_chunks = t // c
        v_rows = n_chunks * c
        state.offload(layer, "v", lambda: v_heads[:, :v_rows].reshape(n_kv, n_chunks, c * state.head_dim))
        return _Layer(
            u=index.layer("u", layer, dev),
            sv=index.layer("sv", layer, dev),
            cand_ids=resident(cand, dev),
            cand_landmarks=resident(lm.gather(1, cand[:, :, None].expand(-1, -1, lm.shape[2])), dev),
            static_tokens=resident(static, dev),
            static_k=resident(k_heads.gather(1, static[:, :, None].expand(-1, -1, state.head_dim)), dev),
            static_v=resident(v_heads.gather(1, static[:, :, None].expand(-1, -1, state.head_dim)), dev),
            cache=SelectionCache(),
            n_select=sp.selected_chunks,
        )

    def _context(self, state: DecodeState, layer: int, q: torch.Tensor) -> Context:
        st: _Layer = state.layers[layer]
        n_kv, d, c = state.n_kv_heads, state.head_dim, self.chunk
        if st.n_select == 0:
            return Context(st.static_tokens, (st.static_k,), (st.static_v,))
        scores = ops.score_centroids(q, st.cand_landmarks, group_reduce="max", softmax=True)
        chunks = st.cand_ids.gather(1, scores.topk(st.n_select, dim=1).indices)  # [Hkv, n_select]

        def load(miss: torch.Tensor) -> list[torch.Tensor]:
            ticket = state.fetch_async(layer, "v", miss)  # V from host overlaps the K rebuild below
            tokens = torch.where(
                miss[:, :, None] >= 0, miss[:, :, None] * c + torch.arange(c, device=miss.device), -1
            ).reshape(n_kv, -1)
            k = ops.gather_rope_keys(st.u, st.sv, tokens, theta=self.rope_theta)
            (v,) = ticket.result()
            state.account(miss, v)
            m = miss.shape[1]
            return [k.view(n_kv, m, c, d), v.view(n_kv, m, c, d)]

        k_sel, v_sel = st.cache.update(chunks, load, state.stats)
        held = st.cache.ids
        assert held is not None
        tokens = (held[:, :, None] * c + torch.arange(c, device=held.device)).reshape(n_kv, -1)
        return Context(
            torch.cat([st.static_tokens, tokens], 1),
            (st.static_k, k_sel.reshape(n_kv, -1, d)),
            (st.static_v, v_sel.reshape(n_kv, -1, d)),
        )
