"""Batched k-means assignment and centroid-update Triton kernels.

Twin: :mod:`kernels.kmeans`. Assignment, grid ``(B, cdiv(N, BLOCK_N))``: a program holds a tile of points
(normalised in registers for cosine) and streams all centroids in ``BLOCK_C`` tiles, one ``tl.dot`` per tile,
keeping a running (best score, best id) per point; ties resolve to the lowest id as ``torch.argmax`` does.
Update, grid ``(B, cdiv(C, BLOCK_C))``: a program owns a tile of clusters and streams all points, summing
them with a one-hot ``[BLOCK_C, BLOCK_N] @ [BLOCK_N, D]`` dot. This reads the points ``C / BLOCK_C`` times but
needs no atomics, so the sums are bit-reproducible run to run (float atomics are not), which keeps later
assignments deterministic; its cost is of the same order as the assignment step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import next_pow2
from kernels.kmeans import NORM_EPS


@triton.jit
def _assign_kernel(
    x_ptr, c_ptr, out_ptr, n_pts, n_c, eps,
    stride_xb, stride_xn, stride_xd, stride_cb, stride_cn, stride_cd,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, COSINE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D_PAD)
    dmask = d < D
    x = tl.load(x_ptr + b * stride_xb + n[:, None] * stride_xn + d[None, :] * stride_xd,
                mask=(n < n_pts)[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    if COSINE:
        x = x / tl.maximum(tl.sqrt(tl.sum(x * x, axis=1)), eps)[:, None]
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    best_id = tl.zeros([BLOCK_N], tl.int64)
    for c0 in range(0, n_c, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < n_c
        cen = tl.load(c_ptr + b * stride_cb + c[:, None] * stride_cn + d[None, :] * stride_cd,
                      mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        sq = tl.sum(cen * cen, axis=1)
        dots = tl.dot(x, tl.trans(cen), input_precision="ieee")  # [BLOCK_N, BLOCK_C]
        # For l2, argmax of 2 x.c - |c|^2 is argmin of |x - c|^2.
        s = dots / tl.maximum(tl.sqrt(sq), eps)[None, :] if COSINE else 2.0 * dots - sq[None, :]
        s = tl.where(cmask[None, :], s, float("-inf"))
        tile_best = tl.max(s, axis=1)
        tile_id = tl.argmax(s, axis=1, tie_break_left=True).to(tl.int64) + c0
        better = tile_best > best  # strict: an equal score in a later tile keeps the lower id
        best_id = tl.where(better, tile_id, best_id)
        best = tl.where(better, tile_best, best)
    tl.store(out_ptr + b * n_pts + n, best_id, mask=n < n_pts)


@triton.jit
def _update_kernel(
    x_ptr, a_ptr, prev_ptr, out_ptr, n_pts, n_c,
    stride_xb, stride_xn, stride_xd, stride_ab, stride_an, stride_pb, stride_pc, stride_pd,
    D: tl.constexpr, D_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    HAS_PREV: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, D_PAD)
    cmask = c < n_c
    dmask = d < D
    sums = tl.zeros([BLOCK_C, D_PAD], tl.float32)
    counts = tl.zeros([BLOCK_C], tl.float32)
    for n0 in range(0, n_pts, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < n_pts
        a = tl.load(a_ptr + b * stride_ab + n * stride_an, mask=nmask, other=-1)
        x = tl.load(x_ptr + b * stride_xb + n[:, None] * stride_xn + d[None, :] * stride_xd,
                    mask=nmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        onehot = (a[None, :] == c[:, None]).to(tl.float32)  # [BLOCK_C, BLOCK_N]
        sums += tl.dot(onehot, x, input_precision="ieee")
        counts += tl.sum(onehot, axis=1)
    means = sums / tl.maximum(counts, 1.0)[:, None]
    omask = cmask[:, None] & dmask[None, :]
    if HAS_PREV:
        prev = tl.load(prev_ptr + b * stride_pb + c[:, None] * stride_pc + d[None, :] * stride_pd,
                       mask=omask, other=0.0).to(tl.float32)
    else:
        prev = tl.zeros([BLOCK_C, D_PAD], tl.float32)
    res = tl.where((counts > 0)[:, None], means, prev)
    tl.store(out_ptr + (b * n_c + c[:, None]) * D + d[None, :], res, mask=omask)


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Triton twin of :func:`kernels.kmeans.kmeans_assign` (same contract)."""
    n_b, n_pts, d = x.shape
    n_c = centroids.shape[1]
    out = torch.empty(n_b, n_pts, dtype=torch.int64, device=x.device)
    if n_pts == 0:
        return out
    d_pad = next_pow2(d, 16)
    block_n = 64
    _assign_kernel[(n_b, triton.cdiv(n_pts, block_n))](
        x, centroids, out, n_pts, n_c, NORM_EPS,
        *x.stride(), *centroids.stride(),
        D=d, D_PAD=d_pad, BLOCK_N=block_n, BLOCK_C=64 if d_pad <= 64 else 32, COSINE=metric == "cosine",
        num_warps=4,
    )
    return out


def kmeans_update(
    x: torch.Tensor, assign: torch.Tensor, n_clusters: int, prev: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton twin of :func:`kernels.kmeans.kmeans_update` (same contract)."""
    n_b, n_pts, d = x.shape
    out = torch.empty(n_b, n_clusters, d, dtype=torch.float32, device=x.device)
    p = prev if prev is not None else out  # placeholder pointer, never read when HAS_PREV is False
    block_c = 32
    _update_kernel[(n_b, triton.cdiv(n_clusters, block_c))](
        x, assign, p, out, n_pts, n_clusters,
        *x.stride(), *assign.stride(), *p.stride(),
        D=d, D_PAD=next_pow2(d, 16), BLOCK_N=64, BLOCK_C=block_c, HAS_PREV=prev is not None,
        num_warps=4,
    )
    return out
