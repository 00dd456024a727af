"""ClusterKV: cosine k-means of keys; whole clusters are recalled, truncated to the budget.

Index (budget-independent, per layer), over the context minus the ``sink`` first tokens:
``centroids`` ``[kv_heads, C, head_dim]`` (cosine assignment, centroid = mean of raw keys),
``order`` ``[kv_heads, T - sink]`` token ids sorted by cluster (*cluster order*), ``offsets``
``[kv_heads, C + 1]`` where cluster ``c`` occupies ``order[offsets[c]:offsets[c+1]]``. The host store keeps
K/V in cluster order, so a selected cluster is one contiguous range (the layout the service should store).

Decode, per **query head**: inner product ``q . centroid``, clusters in descending order until the budget
is filled, the last one truncated; attended = sink + selected + the current window of generated tokens.
Every ``window`` generated tokens are clustered on their own into ``window_clusters`` clusters and appended
to the index (old clusters are never re-fitted), after which they compete for the budget like context
tokens. Fetches go through a per-head token cache of the previous step's selection (R = 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from client.sparse.base import (
    Context,
    DecodeState,
    SelectionCache,
    SparseBackend,
    SparseIndex,
    default_sink,
    gather_heads,
    register,
    resident,
)
from kernels import ops


def cluster_layout(keys: torch.Tensor, n_clusters: int, iters: int, seed: int) -> tuple[torch.Tensor, ...]:
    """Cluster ``keys`` ``[Hkv, N, D]``.

    Returns ``(centroids [Hkv, C, D], order [Hkv, N], offsets [Hkv, C + 1])``."""
    cents, assign = ops.kmeans(keys, n_clusters, iters=iters, metric="cosine", seed=seed)
    order = assign.argsort(dim=1, stable=True)
    sizes = torch.zeros(keys.shape[0], n_clusters, dtype=torch.long, device=keys.device)
    sizes.scatter_add_(1, assign, torch.ones_like(assign))
    offsets = torch.cat([torch.zeros_like(sizes[:, :1]), sizes.cumsum(1)], 1)
    return cents, order, offsets


@dataclass
class _Layer:
    centroids: torch.Tensor  # [Hkv, C, D]
    order: torch.Tensor  # [Hkv, N] absolute token ids in cluster order
    offsets: torch.Tensor  # [Hkv, C + 1]
    sink_k: torch.Tensor  # [Hkv, sink, D]
    sink_v: torch.Tensor
    cache: SelectionCache


@register
class ClusterKVBackend(SparseBackend):
    """ClusterKV (Liu et al., DAC'25).

    Args:
        n_clusters: clusters per KV head (anchor ``L/80``; default ``max(8, round((T - sink) / 80))``).
        iters: k-means iterations (anchor 20).
        sink: first tokens always attended, excluded from clustering (default ~1% of T, at most 32).
        window: generated tokens kept dense before being clustered (anchor 320).
        window_clusters: clusters per window (paper C+ = 4).
    """

    name = "clusterkv"
    per_query_head = True

    def __init__(
        self,
        budget: float,
        *,
        n_clusters: int | None = None,
        iters: int = 20,
        sink: int | None = None,
        window: int = 320,
        window_clusters: int = 4,
        seed: int = 0,
        **kw: Any,
    ) -> None:
        super().__init__(budget, **kw)
        if window < window_clusters or window_clusters < 1:
            raise ValueError("need window >= window_clusters >= 1")
        self.n_clusters, self.iters, self.sink = n_clusters, iters, sink
        self.window, self.window_clusters, self.seed = window, window_clusters, seed

    def _sink(self, context_len: int) -> int:
        return default_sink(context_len) if self.sink is None else self.sink

    def build_index(self, kv: torch.Tensor, queries: torch.Tensor | None = None) -> SparseIndex:
        n_layers, _, t, _, _ = kv.shape
        sink = min(self._sink(t), t - 1)
        n = t - sink
        c = min(n, self.n_clusters if self.n_clusters is not None else max(8, round(n / 80)))
        cents, orders, offs = [], [], []
        for layer in range(n_layers):
            keys = kv[layer, 0, sink:].float().transpose(0, 1).contiguous().to(self.device)  # [Hkv, n, D]
            ce, order, off = cluster_layout(keys, c, self.iters, self.seed + layer)
            cents.append(ce.cpu())
            orders.append((order + sink).to(torch.int32).cpu())
            offs.append(off.to(torch.int32).cpu())
        params = {**self.shape_params(kv), "sink": sink, "n_clusters": c}
        return SparseIndex(
            self.name,
            params,
            {"centroids": torch.stack(cents), "order": torch.stack(orders), "offsets": torch.stack(offs)},
        )

    def check_index(self, index: SparseIndex, kv: torch.Tensor) -> None:
        super().check_index(index, kv)
        # build_index clamps the sink to leave one token to cluster: compare with that, not the setting
        if self.sink is not None and index.params.get("sink") != min(self.sink, kv.shape[2] - 1):
            raise ValueError(
                f"index clustered without the first {index.params.get('sink')} tokens, backend sink "
                f"{self.sink}"
            )

    def _prefill_layer(self, state: DecodeState, layer: int, kv: torch.Tensor, index: SparseIndex) -> Any:
        sink, dev = int(index.params["sink"]), self.device
        order = index.tensors["order"][layer].long()
        heads = torch.arange(state.n_kv_heads)[:, None]
        k_heads, v_heads = kv[0].transpose(0, 1), kv[1].transpose(0, 1)  # [Hkv, T, D]
        state.offload(layer, "kv", lambda: torch.cat([k_heads[heads, order], v_heads[heads, order]], -1))
        return _Layer(
            centroids=index.layer("centroids", layer, dev),
            order=resident(order, dev),
            offsets=index.layer("offsets", layer, dev).long(),
            sink_k=resident(k_heads[:, :sink], dev),
            sink_v=resident(v_heads[:, :sink], dev),
            cache=SelectionCache(),
        )

    def _absorb_window(self, state: DecodeState, layer: int, st: _Layer) -> None:
        """Cluster the oldest ``window`` generated tokens and append them to the index and the host store."""
        gen = state.generated[layer]
        first = gen.first_pos
        k, v = gen.pop_front(self.window)  # [Hkv, w, D]
        cents, order, offsets = cluster_layout(k, self.window_clusters, self.iters, self.seed + first)
        heads = torch.arange(state.n_kv_heads, device=order.device)[:, None]
        n_old = st.order.shape[1]
        st.centroids = torch.cat([st.centroids, cents.to(st.centroids.dtype)], 1)
        st.offsets = torch.cat([st.offsets, offsets[:, 1:] + n_old], 1)
        st.order = torch.cat([st.order, order + first], 1)
        # rows n_old.. of "kv" (cluster order); in remote mode the node holds only these absorbed rows
        state.store.append(layer, "kv", torch.cat([k[heads, order], v[heads, order]], -1), first_row=n_old)

    def _context(self, state: DecodeState, layer: int, q: torch.Tensor) -> Context:
        st: _Layer = state.layers[layer]
        if state.generated[layer].n > self.window:
            self._absorb_window(state, layer, st)
        n_heads, d = q.shape
        n_kv = state.n_kv_heads
        group = n_heads // n_kv
        sink = st.sink_k.shape[1]
        n_sel = self.budget_tokens(state.context_len) - sink
        sink_tokens = torch.arange(sink, device=q.device).expand(n_heads, -1)
        sink_k, sink_v = st.sink_k.repeat_interleave(group, 0), st.sink_v.repeat_interleave(group, 0)
        if n_sel <= 0:
            return Context(
                sink_tokens[:, : sink + n_sel], (sink_k[:, : sink + n_sel],), (sink_v[:, : sink + n_sel],)
            )
        cents = st.centroids.repeat_interleave(group, 0)  # per query head
        scores = ops.score_centroids(q, cents, softmax=False, scale=1.0)  # [H, C]
        ranked = scores.argsort(dim=1, descending=True)
        offsets = st.offsets.repeat_interleave(group, 0)
        sizes = (offsets[:, 1:] - offsets[:, :-1]).gather(1, ranked)
        ends = sizes.cumsum(1)
        j = torch.arange(n_sel, device=q.device).expand(n_heads, -1)
        rank = torch.searchsorted(ends, j.contiguous(), right=True)  # which ranked cluster holds slot j
        within = j - (ends.gather(1, rank) - sizes.gather(1, rank))
        pos = offsets.gather(1, ranked.gather(1, rank)) + within  # cluster-order positions [H, n_sel]

        def load(miss: torch.Tensor) -> list[torch.Tensor]:
            rows = miss.view(n_kv, group * miss.shape[1])  # a query head reads its KV head's rows
            (kv,) = state.fetch_async(layer, "kv", rows).result()
            state.account(rows, kv)
            return [kv.view(n_heads, miss.shape[1], 1, 2 * d)]

        (kv_sel,) = st.cache.update(pos, load, state.stats)
        kv_sel = kv_sel.view(n_heads, n_sel, 2 * d)
        assert st.cache.ids is not None
        tokens = gather_heads(st.order, st.cache.ids)
        return Context(
            torch.cat([sink_tokens, tokens], 1), (sink_k, kv_sel[..., :d]), (sink_v, kv_sel[..., d:])
        )
