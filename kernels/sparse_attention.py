"""Sparse decode attention over a per-KV-head index list: torch reference twin.

The Triton kernel with the same signature lives in :mod:`kernels.sparse_attention_triton`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from kernels._common import check_float, check_index, gqa_group


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor | None,
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
    if idx is not None:
        check_index("idx", idx, k.shape[0])


def default_scale(head_dim: int, scale: float | None) -> float:
    return 1.0 / math.sqrt(head_dim) if scale is None else float(scale)


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor | None,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of attention restricted to selected positions.

    Args:
        q: ``[H, D]`` float16/bfloat16/float32 queries (post-RoPE).
        k, v: ``[Hkv, N, D]`` float, or int8 with ``k_scale``/``v_scale`` ``[Hkv, D]`` float (channel-wise
            dequantisation ``x = stored * scale``; a scale given for a float tensor is applied too).
        idx: ``[Hkv, K]`` int64 positions in ``[0, N)``; ``-1`` entries are padding and ignored. ``None``
            attends every position of ``k``/``v`` in place (rows already gathered: no index, no copy).
        scale: softmax scale, default ``1/sqrt(D)``.

    Query head ``h`` attends with KV head ``h // (H // Hkv)``. Softmax runs over the selected positions only;
    a head whose selection is empty returns zeros. Returns ``[H, D]`` in ``q.dtype`` (float32 accumulation).
    """
    n_heads, d = q.shape
    n_kv = k.shape[0]
    group = gqa_group(n_heads, n_kv)
    if (k.shape[1] if idx is None else idx.shape[1]) == 0:  # empty selection: zeros, like the kernel
        return torch.zeros_like(q)
    if idx is None:
        kg, vg = k.float(), v.float()  # no copy for float32 input
    else:
        # Advanced indexing copies only the selected rows; torch.gather would need an int64 index
        # expanded to [Hkv, K, D] (2-4x slower on CPU).
        heads = torch.arange(n_kv, device=idx.device).unsqueeze(1)
        rows = idx.clamp(min=0)
        kg = k[heads, rows].float()  # [Hkv, K, D]
        vg = v[heads, rows].float()
    if k_scale is not None:
        kg = kg * k_scale.float().unsqueeze(1)
    if v_scale is not None:
        vg = vg * v_scale.float().unsqueeze(1)
    qf = q.float().view(n_kv, group, d)
    logits = torch.einsum("hgd,hkd->hgk", qf, kg) * default_scale(d, scale)
    if idx is not None:
        logits = logits.masked_fill((idx < 0).unsqueeze(1), float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # empty rows
    p = torch.exp(logits - row_max)
    denom = p.sum(dim=-1, keepdim=True)
    out = torch.einsum("hgk,hkd->hgd", p, vg) / torch.where(denom > 0, denom, torch.ones_like(denom))
    return out.reshape(n_heads, d).to(q.dtype)


def check_parts(q: torch.Tensor, k_parts: Sequence[torch.Tensor], v_parts: Sequence[torch.Tensor]) -> None:
    """Validate the shapes documented on :func:`decode_attention_parts`."""
    check_float("q", q, 2)
    if not k_parts or len(k_parts) != len(v_parts):
        raise ValueError(f"need as many k as v parts (>= 1), got {len(k_parts)} and {len(v_parts)}")
    head = k_parts[0].shape[0]
    for i, (k, v) in enumerate(zip(k_parts, v_parts, strict=True)):
        check_float(f"k_parts[{i}]", k, 3)
        check_float(f"v_parts[{i}]", v, 3)
        if k.shape != v.shape or k.shape[0] != head or k.shape[2] != q.shape[1]:
            want = f"[{head}, n, {q.shape[1]}]"
            raise ValueError(f"part {i}: k {tuple(k.shape)} / v {tuple(v.shape)} do not fit {want}")
    gqa_group(q.shape[0], head)


def decode_attention_parts(
    q: torch.Tensor,
    k_parts: Sequence[torch.Tensor],
    v_parts: Sequence[torch.Tensor],
    scale: float | None = None,
) -> torch.Tensor:
    """One decode step of attention over K/V given in parts (e.g. resident sink rows, selected rows and
    generated rows), as if they were concatenated along the token axis, without concatenating them.

    Args:
        q: ``[H, D]`` float queries (post-RoPE).
        k_parts, v_parts: equally many ``[Hkv, N_i, D]`` float tensors (any strides, ``N_i`` may be 0);
            query head ``h`` attends with KV head ``h // (H // Hkv)``.
        scale: softmax scale, default ``1/sqrt(D)``.

    Only the ``[Hkv, G, sum N_i]`` logits are joined (softmax needs them all); K/V are read in place, which
    on a CPU saves two full copies of the attended rows per step. Returns ``[H, D]`` in ``q.dtype``
    (float32 accumulation); an all-empty context returns zeros.
    """
    n_heads, d = q.shape
    n_kv = k_parts[0].shape[0]
    group = gqa_group(n_heads, n_kv)
    qf = q.float().view(n_kv, group, d) * default_scale(d, scale)
    logits = torch.cat([torch.einsum("hgd,hkd->hgk", qf, k.float()) for k in k_parts], -1)
    if logits.shape[-1] == 0:
        return torch.zeros_like(q)
    p = torch.softmax(logits, dim=-1)
    out = torch.zeros(n_kv, group, d, dtype=torch.float32, device=q.device)
    start = 0
    for v in v_parts:
        n = v.shape[1]
        out += torch.einsum("hgk,hkd->hgd", p[..., start : start + n], v.float())
        start += n
    return out.reshape(n_heads, d).to(q.dtype)
