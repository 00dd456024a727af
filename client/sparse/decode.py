"""Token-by-token decoding of :class:`~client.model.Llama2c` with a sparse backend's attention.

The prefill is dense (``Llama2c.forward``); each decoded token then runs the model's layers here, reusing
its weights, with attention from :meth:`SparseBackend.decode_step` at the sparse layers and exact dense
attention at ``dense_layers`` (the anchors keep the first layers dense).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import cast

import torch
import torch.nn.functional as F

from client.model.llama2c import Llama2c, apply_rope
from client.sparse.base import DecodeState, RowSource, SparseBackend, SparseIndex, TokenBuffer
from kernels import ops

_WEIGHTS = ("tok_emb", "rms_att", "wq", "wk", "wv", "wo", "rms_ffn", "w1", "w2", "w3", "rms_final", "w_cls")


class SparseDecoder:
    """Greedy/teacher-forced decoding of ``model`` with ``backend`` at every layer not in ``dense_layers``."""

    def __init__(self, model: Llama2c, backend: SparseBackend, dense_layers: Iterable[int] = (0,)) -> None:
        self.model = model
        self.backend = backend
        self.dense_layers = frozenset(dense_layers)
        self.state: DecodeState | None = None
        self._dense: dict[int, tuple[torch.Tensor, TokenBuffer]] = {}
        self.pos = 0
        # the model registers its weights as buffers; typed views for the per-token layer loop
        self._w = {n: cast(torch.Tensor, getattr(model, n)) for n in _WEIGHTS}

    @torch.no_grad()
    def prefill(
        self, ids: list[int] | torch.Tensor, index: SparseIndex | None = None, remote: RowSource | None = None
    ) -> torch.Tensor:
        """Dense prefill of ``ids`` ``[T]``; returns the last position's logits ``[vocab]`` float32.

        ``remote`` (the context's :class:`~client.sparse.service.ServiceChunkFetcher`) selects the backend's
        remote-backed mode (see :meth:`SparseBackend.prefill`); the prefill's dense KV is released here,
        except the ``dense_layers``' own copies."""
        res = self.model.forward(ids, return_queries=True)
        assert res.queries is not None
        if self.state is not None:
            self.state.close()
        self.state = self.backend.prefill(res.kv, index=index, queries=res.queries, remote=remote)
        cfg = self.model.config
        self._dense = {}
        for layer in self.dense_layers:
            buf = TokenBuffer(cfg.n_kv_heads, cfg.head_dim, res.kv.device, torch.float32)
            self._dense[layer] = (res.kv[layer].transpose(1, 2).contiguous(), buf)  # [2, Hkv, T, D]
        self.pos = res.kv.shape[2]
        return res.logits[-1]

    def _rmsnorm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.model.config.norm_eps) * w

    def _dense_attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx, gen = self._dense[layer]
        gen.append(k, v)
        keys = torch.cat([ctx[0], gen.k], 1)
        vals = torch.cat([ctx[1], gen.v], 1)
        idx = torch.arange(keys.shape[1]).expand(keys.shape[0], -1)
        return ops.sparse_decode_attention(q, keys, vals, idx)

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Feed ``token`` at the next position; returns the logits ``[vocab]`` float32 for the one after."""
        if self.state is None:
            raise RuntimeError("call prefill() first")
        w, cfg = self._w, self.model.config
        if self.pos >= cfg.seq_len:
            raise ValueError(f"context of {self.pos + 1} tokens exceeds the model's {cfg.seq_len}")
        hd = cfg.head_dim
        pos = torch.tensor([self.pos])
        x = w["tok_emb"][token]
        for layer in range(cfg.n_layers):
            h = self._rmsnorm(x, w["rms_att"][layer])
            q = apply_rope((w["wq"][layer] @ h).view(1, cfg.n_heads, hd), pos, cfg.rope_theta)[0]
            k = apply_rope((w["wk"][layer] @ h).view(1, cfg.n_kv_heads, hd), pos, cfg.rope_theta)[0]
            v = (w["wv"][layer] @ h).view(cfg.n_kv_heads, hd)
            if layer in self.dense_layers:
                att = self._dense_attention(layer, q, k, v)
            else:
                att = self.backend.decode_step(self.state, layer, q, k, v).to(x.device)
            x = x + w["wo"][layer] @ att.reshape(-1)
            h = self._rmsnorm(x, w["rms_ffn"][layer])
            x = x + w["w2"][layer] @ (F.silu(w["w1"][layer] @ h) * (w["w3"][layer] @ h))
        self.pos += 1
        return self._rmsnorm(x, w["rms_final"]) @ w["w_cls"].T

    def close(self) -> None:
        if self.state is not None:
            self.state.close()
            self.state = None
