"""Centroid/landmark scoring Triton kernels (twin: :mod:`kernels.centroid_scores`).

Grid ``(Hkv, cdiv(C, BLOCK_C))``: a program scores one tile of centroids against the whole GQA group with one
``tl.dot`` (group padded to 16 rows) and, without softmax, reduces over the group and stores directly. With
softmax the per-head normaliser needs all ``C`` logits, so the first pass also writes the raw logits
``[H, C]`` plus a per-tile (max, sum-exp) pair; a second pass (same grid) merges the tile statistics of each
query head, normalises its logits and reduces over the group. Logits are float32 and cheap next to the
centroid reads (``G`` floats per ``D`` centroid elements).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kernels._common import gqa_group, next_pow2

_LOG2E = 1.4426950408889634


@triton.jit
def _logits_kernel(
    q_ptr, c_ptr, out_ptr, logit_ptr, m_ptr, l_ptr,
    qk_scale, n_c, n_tiles,
    stride_qh, stride_qd, stride_ch, stride_cn, stride_cd,
    G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_C: tl.constexpr, SOFTMAX: tl.constexpr, REDUCE_MAX: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D_PAD)
    c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    gmask = g < G
    cmask = c < n_c
    q = tl.load(q_ptr + (h * G + g)[:, None] * stride_qh + d[None, :] * stride_qd,
                mask=gmask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    cen = tl.load(c_ptr + h * stride_ch + c[:, None] * stride_cn + d[None, :] * stride_cd,
                  mask=cmask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(cen), input_precision="ieee") * qk_scale  # [G_PAD, BLOCK_C], log2 units if SOFTMAX
    if SOFTMAX:
        s = tl.where(cmask[None, :], s, float("-inf"))
        m = tl.max(s, axis=1)
        l_s = tl.sum(tl.exp2(s - m[:, None]), axis=1)
        tl.store(logit_ptr + (h * G + g)[:, None] * n_c + c[None, :], s, mask=gmask[:, None] & cmask[None, :])
        tl.store(m_ptr + (h * G + g) * n_tiles + tile, m, mask=gmask)
        tl.store(l_ptr + (h * G + g) * n_tiles + tile, l_s, mask=gmask)
    else:
        # Padded q rows are zero, so their logits are zero: masked for max, harmless for sum.
        r = tl.max(tl.where(gmask[:, None], s, float("-inf")), axis=0) if REDUCE_MAX else tl.sum(s, axis=0)
        tl.store(out_ptr + h * n_c + c, r, mask=cmask)


@triton.jit
def _softmax_reduce_kernel(
    logit_ptr, m_ptr, l_ptr, out_ptr, n_c, n_tiles,
    G: tl.constexpr, G_PAD: tl.constexpr, T_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
    REDUCE_MAX: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    t = tl.arange(0, T_PAD)
    c = tile * BLOCK_C + tl.arange(0, BLOCK_C)
    gmask = g < G
    cmask = c < n_c
    stat = (h * G + g)[:, None] * n_tiles + t[None, :]
    smask = gmask[:, None] & (t < n_tiles)[None, :]
    m = tl.load(m_ptr + stat, mask=smask, other=float("-inf"))
    l_s = tl.load(l_ptr + stat, mask=smask, other=0.0)
    m_row = tl.max(m, axis=1)
    m_row = tl.where(gmask, m_row, 0.0)
    denom = tl.sum(l_s * tl.exp2(m - m_row[:, None]), axis=1)
    denom = tl.where(gmask, denom, 1.0)
    s = tl.load(logit_ptr + (h * G + g)[:, None] * n_c + c[None, :], mask=gmask[:, None] & cmask[None, :],
                other=float("-inf"))
    p = tl.exp2(s - m_row[:, None]) / denom[:, None]  # padded rows: exp2(-inf) = 0
    r = tl.max(p, axis=0) if REDUCE_MAX else tl.sum(p, axis=0)
    tl.store(out_ptr + h * n_c + c, r, mask=cmask)


def score_centroids(
    q: torch.Tensor,
    centroids: torch.Tensor,
    group_reduce: str = "max",
    softmax: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`kernels.centroid_scores.score_centroids` (same contract)."""
    n_heads, d = q.shape
    n_kv, n_c, _ = centroids.shape
    group = gqa_group(n_heads, n_kv)
    out = torch.empty(n_kv, n_c, dtype=torch.float32, device=q.device)
    if n_c == 0:
        return out
    d_pad = next_pow2(d, 16)
    g_pad = next_pow2(group, 16)
    block_c = 64 if d_pad <= 64 else 32
    n_tiles = triton.cdiv(n_c, block_c)
    qk_scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) * (_LOG2E if softmax else 1.0)
    if softmax:
        logits = torch.empty(n_heads, n_c, dtype=torch.float32, device=q.device)
        m_part = torch.empty(n_heads, n_tiles, dtype=torch.float32, device=q.device)
        l_part = torch.empty_like(m_part)
    else:  # the statistics buffers are never touched without softmax
        logits = m_part = l_part = out
    reduce_max = group_reduce == "max"
    _logits_kernel[(n_kv, n_tiles)](
        q, centroids, out, logits, m_part, l_part,
        qk_scale, n_c, n_tiles,
        q.stride(0), q.stride(1), centroids.stride(0), centroids.stride(1), centroids.stride(2),
        G=group, G_PAD=g_pad, D=d, D_PAD=d_pad, BLOCK_C=block_c, SOFTMAX=softmax, REDUCE_MAX=reduce_max,
        num_warps=4,
    )
    if softmax:
        _softmax_reduce_kernel[(n_kv, n_tiles)](
            logits, m_part, l_part, out, n_c, n_tiles,
            G=group, G_PAD=next_pow2(group), T_PAD=next_pow2(n_tiles), BLOCK_C=block_c, REDUCE_MAX=reduce_max,
            num_warps=4,
        )
    return out
