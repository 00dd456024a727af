"""Sparse decode attention over a per-KV-head index list: torch reference twin.

The Triton kernel with the same signature lives in :mod:`kernels.sparse_attention_triton`.
"""

from __future__ import annotations

import math

import torch

from kernels._common import check_float, check_index, gqa_group


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    k_scale: torch.Tensor | None,
    v_scale: torch.Tensor | None,
) -> None:
    """Validate the shapes/dtypes documented on :func:`sparse_decode_attention`."""
    check_float("q", q, 2)
    n_heads, d = q.shape
    for name, x, sc in (("k", k, k_scale), ("v", v, v_scale)):
        if x.dim() != 3 or x.shape[2] != d:
            raise ValueError(f"{name} must be [Hkv, N, {d}], got {tuple(x.shape)}")
        if x.dtype == torch.int8:
            if sc is None:
                raise ValueError(f"int8 {name} needs {name}_scale [Hkv, D]")
        elif x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float or int8, got {x.dtype}")
        if sc is not None and (sc.shape != (x.shape[0], d) or not sc.dtype.is_floating_point):
            raise ValueError(f"{name}_scale must be float [Hkv, D], got {sc.dtype} {tuple(sc.shape)}")
    if k.shape[:2] != v.shape[:2]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    gqa_group(n_heads, k.shape[0])
    check_index("idx", idx, k.shape[0])


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of attention restricted to selected positions.

    Args:
        q: ``[H, D]`` float16/bfloat16/float32 queries (post-RoPE).
        k, v: ``[Hkv, N, D]`` float, or int8 with ``k_scale``/``v_scale`` ``[Hkv, D]`` float (channel-wise
            dequantisation ``x = stored * scale``; a scale given for a float tensor is applied too).
        idx: ``[Hkv, K]`` int64 positions in ``[0, N)``; ``-1`` entries are padding and ignored.
        scale: softmax scale, default ``1/sqrt(D)``.

    Query head ``h`` attends with KV head ``h // (H // Hkv)``. Softmax runs over the selected positions only;
    a head whose selection is empty returns zeros. Returns ``[H, D]`` in ``q.dtype`` (float32 accumulation).
    """
    n_heads, d = q.shape
    n_kv = k.shape[0]
    group = gqa_group(n_heads, n_kv)
    valid = idx >= 0
    # Advanced indexing copies only the selected rows; torch.gather would need an int64 index expanded
    # to [Hkv, K, D] (2-4x slower on CPU).
    rows = idx.clamp(min=0)
    heads = torch.arange(n_kv, device=idx.device).unsqueeze(1)
    kg = k[heads, rows].float()  # [Hkv, K, D]
    vg = v[heads, rows].float()
    if k_scale is not None:
        kg = kg * k_scale.float().unsqueeze(1)
    if v_scale is not None:
        vg = vg * v_scale.float().unsqueeze(1)
    qf = q.float().view(n_kv, group, d)
    logits = torch.einsum("hgd,hkd->hgk", qf, kg) * default_scale(d, scale)
    logits = logits.masked_fill(~valid.unsqueeze(1), float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # empty rows
    p = torch.exp(logits - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("hgk,hkd->hgd", p, vg) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.reshape(n_heads, d).to(q.dtype)
