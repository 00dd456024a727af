"""ShadowKV gather-GEMM-RoPE Triton kernel (twin: :mod:`kernels.gather_rope`).

Grid ``(Hkv, cdiv(K, BLOCK_K))``: a program gathers ``BLOCK_K`` rows of ``U`` by index and multiplies them
with the two halves of ``SV_h`` that form the RoPE pairs (even/odd columns for "interleaved", first/second
half for "half"), looping over the rank in ``BLOCK_R`` slices with ``tl.dot``. Producing both members of every
pair in the same program lets the rotation run in the epilogue on registers (as ShadowKV's CUTLASS epilogue
does), so the pre-RoPE keys never touch memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels._common import dot_mode, next_pow2
from kernels.gather_rope import out_dtype, rope_inv_freq


@triton.jit
def _gather_rope_kernel(
    u_ptr, sv_ptr, idx_ptr, pos_ptr, freq_ptr, out_ptr,
    n_idx, rank,
    stride_un, stride_ur, stride_sr, stride_sh, stride_sd,
    stride_ih, stride_ik, stride_ph, stride_pk, stride_oh, stride_ok, stride_od,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    HAS_POS: tl.constexpr, INTERLEAVED: tl.constexpr, DOT: tl.constexpr,
):
    h = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    i = tl.arange(0, HALF_PAD)
    jmask = j < n_idx
    imask = i < HALF
    rows = tl.load(idx_ptr + h * stride_ih + j * stride_ik, mask=jmask, other=-1)
    valid = rows >= 0
    rows = tl.where(valid, rows, 0)
    if INTERLEAVED:
        col0 = 2 * i
        col1 = 2 * i + 1
    else:
        col0 = i
        col1 = i + HALF
    x0 = tl.zeros([BLOCK_K, HALF_PAD], tl.float32)
    x1 = tl.zeros([BLOCK_K, HALF_PAD], tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < rank
        ut = tl.load(u_ptr + rows[:, None] * stride_un + r[None, :] * stride_ur,
                     mask=valid[:, None] & rmask[None, :], other=0.0)
        smask = rmask[:, None] & imask[None, :]
        s_base = sv_ptr + r[:, None] * stride_sr + h * stride_sh
        s0 = tl.load(s_base + col0[None, :] * stride_sd, mask=smask, other=0.0)
        s1 = tl.load(s_base + col1[None, :] * stride_sd, mask=smask, other=0.0)
        if DOT == "fp16":
            x0 += tl.dot(ut, s0)
            x1 += tl.dot(ut, s1)
        else:
            ut = ut.to(tl.float32)
            x0 += tl.dot(ut, s0.to(tl.float32), input_precision=DOT)
            x1 += tl.dot(ut, s1.to(tl.float32), input_precision=DOT)
    pos = tl.load(pos_ptr + h * stride_ph + j * stride_pk, mask=jmask, other=0) if HAS_POS else rows
    freq = tl.load(freq_ptr + i, mask=imask, other=0.0)
    ang = pos.to(tl.float32)[:, None] * freq[None, :]
    cos = tl.cos(ang)
    sin = tl.sin(ang)
    y0 = x0 * cos - x1 * sin
    y1 = x0 * sin + x1 * cos
    omask = jmask[:, None] & imask[None, :]
    o_base = out_ptr + h * stride_oh + j[:, None] * stride_ok
    ty = out_ptr.dtype.element_ty
    tl.store(o_base + col0[None, :] * stride_od, y0.to(ty), mask=omask)
    tl.store(o_base + col1[None, :] * stride_od, y1.to(ty), mask=omask)


def gather_rope_keys(
    u: torch.Tensor,
    sv: torch.Tensor,
    idx: torch.Tensor,
    positions: torch.Tensor | None = None,
    theta: float = 10000.0,
    rope_style: str = "interleaved",
) -> torch.Tensor:
    """Triton twin of :func:`kernels.gather_rope.gather_rope_keys` (same contract)."""
    rank, n_kv, d = sv.shape
    n_idx = idx.shape[1]
    out = torch.empty(n_kv, n_idx, d, dtype=out_dtype(u, sv), device=u.device)
    if n_idx == 0:
        return out
    freq = rope_inv_freq(d, theta, u.device)
    pos = positions if positions is not None else idx  # placeholder pointer when HAS_POS is False
    half = d // 2
    block_k = 32
    _gather_rope_kernel[(n_kv, triton.cdiv(n_idx, block_k))](
        u, sv, idx, pos, freq, out,
        n_idx, rank,
        u.stride(0), u.stride(1), *sv.stride(),
        idx.stride(0), idx.stride(1), pos.stride(0), pos.stride(1), *out.stride(),
        HALF=half, HALF_PAD=next_pow2(half, 16), BLOCK_K=block_k, BLOCK_R=32 if rank > 16 else 16,
        HAS_POS=positions is not None, INTERLEAVED=rope_style == "interleaved",
        DOT=dot_mode(u.dtype, sv.dtype),
        num_warps=4,
    )
    return out
