"""A small, exact torch implementation of the llama2.c Llama architecture.

It loads ``stories260K.bin`` (llama2.c's binary checkpoint format) and exposes the KV cache in
kvstream's canonical layout ``[layers, 2, tokens, kv_heads, head_dim]`` (index 0 = keys after RoPE,
1 = values), so the codec, the store and the sparse backends all see real model statistics.

RoPE follows llama2.c: rotation of *interleaved* pairs ``(x[2i], x[2i+1])`` with frequency
``theta ** (-2i / head_dim)``.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_model_path() -> Path:
    """Where the shared test model lives: ``$KVSTREAM_MODEL`` or ``../shared/models/stories260K.bin``."""
    env = os.environ.get("KVSTREAM_MODEL")
    if env:
        return Path(env)
    return _REPO_ROOT.parent / "shared" / "models" / "stories260K.bin"


@dataclass(frozen=True)
class LlamaConfig:
    dim: int
    hidden_dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    seq_len: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads


class ForwardResult(NamedTuple):
    logits: torch.Tensor  # [tokens, vocab] float32
    kv: torch.Tensor  # [layers, 2, past + tokens, kv_heads, head_dim] float32
    queries: torch.Tensor | None  # [layers, tokens, n_heads, head_dim] post-RoPE, if requested


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape ``[len(positions), head_dim // 2]`` for interleaved-pair RoPE."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return ang.cos().float(), ang.sin().float()


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, inverse: bool = False) -> torch.Tensor:
    """Rotate interleaved pairs of ``x`` ``[tokens, heads, head_dim]`` at ``positions`` ``[tokens]``.

    ``inverse=True`` undoes the rotation exactly (used to recover pre-RoPE keys).
    """
    cos, sin = rope_angles(positions, x.shape[-1], theta)
    if inverse:
        sin = -sin
    cos, sin = cos[:, None, :], sin[:, None, :]
    x0, x1 = x[..., 0::2].float(), x[..., 1::2].float()
    out = torch.empty_like(x, dtype=torch.float32)
    out[..., 0::2] = x0 * cos - x1 * sin
    out[..., 1::2] = x0 * sin + x1 * cos
    return out.to(x.dtype)


class Llama2c(torch.nn.Module):
    """Llama (RMSNorm, GQA attention with RoPE, SwiGLU) with weights from a llama2.c checkpoint."""

    # Weights are registered as buffers (inference only); declared here for the type checker.
    tok_emb: torch.Tensor  # [vocab, dim]
    rms_att: torch.Tensor  # [layers, dim]
    wq: torch.Tensor  # [layers, n_heads * head_dim, dim]
    wk: torch.Tensor  # [layers, n_kv_heads * head_dim, dim]
    wv: torch.Tensor  # [layers, n_kv_heads * head_dim, dim]
    wo: torch.Tensor  # [layers, dim, n_heads * head_dim]
    rms_ffn: torch.Tensor  # [layers, dim]
    w1: torch.Tensor  # [layers, hidden, dim]
    w2: torch.Tensor  # [layers, dim, hidden]
    w3: torch.Tensor  # [layers, hidden, dim]
    rms_final: torch.Tensor  # [dim]
    w_cls: torch.Tensor  # [vocab, dim]

    def __init__(self, config: LlamaConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        for name, tensor in weights.items():
            self.register_buffer(name, tensor, persistent=False)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str] | None = None) -> Llama2c:
        """Load a llama2.c ``.bin`` checkpoint (float32, header of 7 little-endian int32)."""
        p = Path(path) if path is not None else default_model_path()
        raw = p.read_bytes()
        dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len = struct.unpack("<7i", raw[:28])
        shared = vocab > 0
        vocab = abs(vocab)
        cfg = LlamaConfig(dim, hidden, n_layers, n_heads, n_kv, vocab, seq_len)
        hd = cfg.head_dim
        flat = torch.frombuffer(bytearray(raw[28:]), dtype=torch.float32)
        shapes: list[tuple[str, tuple[int, ...]]] = [
            ("tok_emb", (vocab, dim)),
            ("rms_att", (n_layers, dim)),
            ("wq", (n_layers, n_heads * hd, dim)),
            ("wk", (n_layers, n_kv * hd, dim)),
            ("wv", (n_layers, n_kv * hd, dim)),
            ("wo", (n_layers, dim, n_heads * hd)),
            ("rms_ffn", (n_layers, dim)),
            ("w1", (n_layers, hidden, dim)),
            ("w2", (n_layers, dim, hidden)),
            ("w3", (n_layers, hidden, dim)),
            ("rms_final", (dim,)),
        ]
        weights: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in shapes:
            n = 1
            for s in shape:
                n *= s
            if offset + n > flat.numel():
                raise ValueError(f"{p}: checkpoint truncated while reading {name}")
            weights[name] = flat[offset : offset + n].view(shape).clone()
            offset += n
        offset += seq_len * hd  # legacy RoPE tables (cos + sin halves), recomputed instead
        if shared:
            weights["w_cls"] = weights["tok_emb"]
        else:
            weights["w_cls"] = flat[offset : offset + vocab * dim].view(vocab, dim).clone()
        return cls(cfg, weights)

    def _rmsnorm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.config.norm_eps) * w

    @torch.no_grad()
    def forward(  # type: ignore[override]
        self,
        tokens: torch.Tensor | list[int],
        past_kv: torch.Tensor | None = None,
        return_queries: bool = False,
    ) -> ForwardResult:
        """Run ``tokens`` ``[T]`` after an optional cache ``past_kv`` ``[L, 2, P, kv_heads, head_dim]``.

        Returns logits ``[T, vocab]`` (float32) and the extended cache ``[L, 2, P+T, kv_heads, head_dim]``
        (float32; a lower-precision ``past_kv`` is upcast).
        """
        cfg = self.config
        ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        t = ids.numel()
        past = 0 if past_kv is None else past_kv.shape[2]
        if past + t > cfg.seq_len:
            raise ValueError(f"context of {past + t} tokens exceeds the model's {cfg.seq_len}")
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size})")
        hd, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
        pos = torch.arange(past, past + t)
        x = self.tok_emb[ids]
        new_kv = torch.empty(cfg.n_layers, 2, past + t, cfg.n_kv_heads, hd)
        if past_kv is not None:
            new_kv[:, :, :past] = past_kv.float()
        queries = torch.empty(cfg.n_layers, t, cfg.n_heads, hd) if return_queries else None
        mask = torch.ones(t, past + t, dtype=torch.bool).tril(diagonal=past)
        for layer in range(cfg.n_layers):
            h = self._rmsnorm(x, self.rms_att[layer])
            q = (h @ self.wq[layer].T).view(t, cfg.n_heads, hd)
            k = (h @ self.wk[layer].T).view(t, cfg.n_kv_heads, hd)
            v = (h @ self.wv[layer].T).view(t, cfg.n_kv_heads, hd)
            q = apply_rope(q, pos, cfg.rope_theta)
            k = apply_rope(k, pos, cfg.rope_theta)
            new_kv[layer, 0, past:] = k
            new_kv[layer, 1, past:] = v
            if queries is not None:
                queries[layer] = q
            keys = new_kv[layer, 0].repeat_interleave(group, dim=1)  # [P+T, H, hd]
            vals = new_kv[layer, 1].repeat_interleave(group, dim=1)
            att = F.scaled_dot_product_attention(
                q.transpose(0, 1), keys.transpose(0, 1), vals.transpose(0, 1), attn_mask=mask
            )  # [H, T, hd]
            x = x + att.transpose(0, 1).reshape(t, cfg.dim) @ self.wo[layer].T
            h = self._rmsnorm(x, self.rms_ffn[layer])
            x = x + (F.silu(h @ self.w1[layer].T) * (h @ self.w3[layer].T)) @ self.w2[layer].T
        logits = self._rmsnorm(x, self.rms_final) @ self.w_cls.T
        return ForwardResult(logits, new_kv, queries)

    @torch.no_grad()
    def sample(self, n_tokens: int, seed: int, temperature: float = 1.0, bos: int = 1) -> list[int]:
        """Sample ``n_tokens`` ids after BOS (BOS included) with a fixed seed: in-distribution contexts."""
        gen = torch.Generator().manual_seed(seed)
        out = [bos]
        res = self.forward([bos])
        kv = res.kv
        for _ in range(n_tokens - 1):
            probs = torch.softmax(res.logits[-1] / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            out.append(nxt)
            res = self.forward([nxt], past_kv=kv)
            kv = res.kv
        return out

    @torch.no_grad()
    def greedy(self, past_kv: torch.Tensor, last_token: int, n_tokens: int) -> list[int]:
        """Greedy continuation of ``n_tokens`` ids from a cache and the token that follows it."""
        out: list[int] = []
        kv, tok = past_kv, last_token
        for _ in range(n_tokens):
            res = self.forward([tok], past_kv=kv)
            kv = res.kv
            tok = int(res.logits[-1].argmax())
            out.append(tok)
        return out
