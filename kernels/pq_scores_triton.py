"""PQ asymmetric-distance scoring Triton kernels (twin: :mod:`kernels.pq_scores`).

Two launches. (1) LUT build, grid ``(Hkv * M, cdiv(2**b, BLOCK_C))``: ``LUT[h, m, c] = q_h[m] . codebook[m,
c]`` for every query head of the group, float32 ``[H, M, 2**b]`` (a few KiB, stays in L2). (2) Scoring, grid
``(Hkv, cdiv(N, BLOCK_N))``: a program loads a ``[BLOCK_N, M]`` tile of uint8 codes once (the only
N-proportional traffic), gathers ``LUT[m, code]`` for each query head of the group, sums over ``m`` and
reduces over the group in registers, and writes one float32 score per token.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import gqa_group, next_pow2


@triton.jit
def _lut_kernel(
    q_ptr, cb_ptr, lut_ptr, n_codes,
    stride_qh, stride_qd, stride_bh, stride_bm, stride_bc, stride_bd,
    M: tl.constexpr, G: tl.constexpr, DSUB: tl.constexpr, DSUB_PAD: tl.constexpr, BLOCK_C: tl.constexpr,
):
    hm = tl.program_id(0)
    h = hm // M
    m = hm % M
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, DSUB_PAD)
    cmask = c < n_codes
    dmask = d < DSUB
    cb = tl.load(cb_ptr + h * stride_bh + m * stride_bm + c[:, None] * stride_bc + d[None, :] * stride_bd,
                 mask=cmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
    for g in tl.static_range(G):
        hq = h * G + g
        qs = tl.load(q_ptr + hq * stride_qh + (m * DSUB + d) * stride_qd, mask=dmask, other=0.0)
        qs = qs.to(tl.float32)
        tl.store(lut_ptr + (hq * M + m) * n_codes + c, tl.sum(cb * qs[None, :], axis=1), mask=cmask)


@triton.jit
def _score_kernel(
    lut_ptr, codes_ptr, out_ptr, n_tok, n_codes,
    stride_ch, stride_cn, stride_cm,
    M: tl.constexpr, M_PAD: tl.constexpr, G: tl.constexpr, BLOCK_N: tl.constexpr, REDUCE_MAX: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mm = tl.arange(0, M_PAD)
    mask = (n < n_tok)[:, None] & (mm < M)[None, :]
    code = tl.load(codes_ptr + h * stride_ch + n[:, None] * stride_cn + mm[None, :] * stride_cm,
                   mask=mask, other=0).to(tl.int32)
    lut_off = mm[None, :] * n_codes + code
    red = tl.zeros([BLOCK_N], tl.float32)
    for g in tl.static_range(G):
        vals = tl.load(lut_ptr + (h * G + g) * M * n_codes + lut_off, mask=mask, other=0.0)
        s = tl.sum(vals, axis=1)
        if g == 0:
            red = s
        elif REDUCE_MAX:
            red = tl.maximum(red, s)
        else:
            red = red + s
    tl.store(out_ptr + h * n_tok + n, red, mask=n < n_tok)


def pq_scores(
    q: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, group_reduce: str = "max"
) -> torch.Tensor:
    """Triton twin of :func:`kernels.pq_scores.pq_scores` (same contract)."""
    n_kv, m, n_codes, dsub = codebooks.shape
    n_tok = codes.shape[1]
    group = gqa_group(q.shape[0], n_kv)
    out = torch.empty(n_kv, n_tok, dtype=torch.float32, device=q.device)
    if n_tok == 0:
        return out
    lut = torch.empty(q.shape[0], m, n_codes, dtype=torch.float32, device=q.device)
    block_c = min(64, next_pow2(n_codes))
    _lut_kernel[(n_kv * m, triton.cdiv(n_codes, block_c))](
        q, codebooks, lut, n_codes,
        q.stride(0), q.stride(1), *codebooks.stride(),
        M=m, G=group, DSUB=dsub, DSUB_PAD=next_pow2(dsub), BLOCK_C=block_c,
        num_warps=4,
    )
    block_n = 128
    _score_kernel[(n_kv, triton.cdiv(n_tok, block_n))](
        lut, codes, out, n_tok, n_codes,
        *codes.stride(),
        M=m, M_PAD=next_pow2(m), G=group, BLOCK_N=block_n, REDUCE_MAX=group_reduce == "max",
        num_warps=4,
    )
    return out
