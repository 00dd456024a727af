"""Fused rANS decode + dequantize of a lossy codec blob, Triton (twin: :mod:`kernels.codec_decode`).

Bitstream: docs/codec.md, "Lane layout". A segment ``s = 2*layer + kv`` is ``W <= 32`` interleaved rANS
lanes that share one word stream, so its lanes must run in lock step inside one program: grid
``cdiv(S, BLOCK_S)``, each program owns ``BLOCK_S`` whole segments as a ``[BLOCK_S, W]`` tile (one warp
for ``BLOCK_S = 1``, the GPU default: the format gives only ``S * W`` independent lanes, 2048 for a
Llama-8B chunk, and each walks ``T * C / W`` dependent steps, so the kernel is latency-bound and extra
segments per program would only serialise them). Per step ``(t, r)`` the tile does the four phases of the
spec; a phase's words are found with an in-register exclusive prefix count of the "x < 2^16" flags
(ballot + popcount, see :func:`_renorm`), added to the segment's running word position. The escape
phases are skipped with a uniform branch unless some lane escaped (rare), the low-bit phase unless some
channel of the round has ``s > 0``. Each step ends with ``x_hat = float32(q) * delta`` stored in the
blob's dtype straight into ``[layers, 2, tokens, kv_heads, head_dim]`` at arbitrary strides (``out=``
slices).

The host side parses with the codec's own functions (:func:`codec.container.verify`,
:func:`codec.lossy.parse_params`, :func:`codec.rans.param_to_model`) and ships the *compressed*
payload to the device untouched (its uint16 words are read in place, the uint32 initial states as two
words); per-segment word offsets are an exclusive prefix sum of the stream lengths. Corruption that
the checksum cannot catch (a forged checksum) is detected in the kernel (initial state < 2^16, ran out
of words, words left over, final state != 2^16) and raised as :class:`codec.CodecError` after it.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from codec import container, lossy, rans
from codec.container import CODEC_RANS, BlobInfo, CodecError
from kernels import codec_decode as _twin
from kernels._common import next_pow2


@triton.jit
def _renorm(seg_words, n_words, x, pos, bad, need, lane, below):
    """Refill the lanes in ``need`` with one 16-bit word each, in lane order from ``pos``.

    A lane's word is ``pos`` + the number of needing lanes below it: popcount(ballot & ``below``, the
    mask of lower lanes). The ballot is one integer sum of distinct bits (a single warp ``redux`` on the
    GPU), the popcount a SWAR sequence: a shorter dependency chain than a 5-round shuffle scan. Every
    intermediate stays non-negative (no signed overflow for ``TRITON_DEBUG``'s sanitizer). ``bad`` is a
    per-lane tile, reduced once at the end.
    """
    ni = need.to(tl.int32)
    ballot = tl.sum(ni << lane[None, :], axis=1)  # distinct bits: the sum is their OR
    v = ballot[:, None] & below[None, :]
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    v = v + (v >> 8)
    idx = pos[:, None] + ((v + (v >> 16)) & 0x3F)
    inb = need & (idx < n_words[:, None])
    w = tl.load(seg_words[:, None] + idx, mask=inb, other=0).to(tl.int32) & 0xFFFF
    x = tl.where(need, (x << 16) | w.to(tl.uint32), x)
    pos = pos + tl.sum(ni, axis=1)
    bad = bad | (need & ~inb)
    return x, pos, bad


@triton.jit
def _codec_decode_kernel(
    words_ptr, meta_ptr, mu_ptr, delta_ptr, wbase_ptr, nwords_ptr, sym_ptr, fc_ptr, status_ptr, out_ptr,
    n_seg, n_tok, rounds, n_chan,
    stride_l, stride_kv, stride_t, stride_h, stride_d,
    W: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_W: tl.constexpr, BF16: tl.constexpr,
):
    # rANS state in uint32: every op keeps it below 2^32 (f * (x >> 12) + slot - cum < f * 2^20 <= 2^32,
    # (x << 16) | word only for x < 2^16), so no 64-bit arithmetic is needed on the critical path.
    seg = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    lane = tl.arange(0, BLOCK_W)
    below = ~(-1 << lane)  # bits of the lanes below each lane (no signed overflow at lane 31)
    seg_ok = seg < n_seg
    ok = seg_ok[:, None] & (lane < W)[None, :]
    seg = seg.to(tl.int64)  # offsets into a whole-context cache can pass 2^31 elements
    wbase = tl.load(wbase_ptr + seg, mask=seg_ok, other=2 * W)
    seg_words = words_ptr + wbase  # this segment's first word (past its initial states)
    n_words = tl.load(nwords_ptr + seg, mask=seg_ok, other=0)
    delta = tl.load(delta_ptr + seg, mask=seg_ok, other=1.0)
    init = seg_words[:, None] + (2 * lane - 2 * W)[None, :]
    x_lo = tl.load(init, mask=ok, other=0).to(tl.int32) & 0xFFFF
    x_hi = tl.load(init + 1, mask=ok, other=1).to(tl.int32) & 0xFFFF
    x = (x_lo | (x_hi << 16)).to(tl.uint32, bitcast=True)  # dead lanes start (and must end) at 2^16
    pos = tl.zeros([BLOCK_S], tl.int32)
    bad = ok & (x < 65536)
    chan_base = seg[:, None] * n_chan + lane[None, :]
    out_seg = (seg // 2) * stride_l + (seg % 2) * stride_kv
    ty = out_ptr.dtype.element_ty
    # The channel parameters do not depend on the rANS state: load step k+1's while step k decodes.
    meta = tl.load(meta_ptr + chan_base, mask=ok, other=0)
    for t in range(n_tok):
        out_row = out_seg + tl.cast(t, tl.int64) * stride_t
        for r in range(rounds):
            c0 = r * W
            tid = meta & 0xFF
            sbits = meta >> 8
            mu = tl.load(mu_ptr + chan_base + c0, mask=ok, other=0)
            meta = tl.load(meta_ptr + chan_base + tl.where(r + 1 < rounds, c0 + W, 0), mask=ok, other=0)
            # phase 0: model symbol
            slot = x & 0xFFF
            sym = tl.load(sym_ptr + tid * 4096 + slot.to(tl.int32)).to(tl.int32)
            fc = tl.load(fc_ptr + tid * 64 + sym)
            x = (fc & 0x1FFF).to(tl.uint32) * (x >> 12) + (slot - (fc >> 13).to(tl.uint32))
            x, pos, bad = _renorm(seg_words, n_words, x, pos, bad, ok & (x < 65536), lane, below)
            z = sym
            esc = ok & (sym == 63)
            if tl.max(esc.to(tl.int32)) > 0:
                # phases 1, 2: two raw 12-bit fields (f = 1, so value = slot and x -> x >> 12)
                z_hi = (x & 0xFFF).to(tl.int32)
                x = tl.where(esc, x >> 12, x)
                x, pos, bad = _renorm(seg_words, n_words, x, pos, bad, esc & (x < 65536), lane, below)
                z_lo = (x & 0xFFF).to(tl.int32)
                x = tl.where(esc, x >> 12, x)
                x, pos, bad = _renorm(seg_words, n_words, x, pos, bad, esc & (x < 65536), lane, below)
                z = tl.where(esc, (z_hi << 12) | z_lo, z)
            low = tl.zeros([BLOCK_S, BLOCK_W], tl.int32)
            has = ok & (sbits > 0)
            if tl.max(has.to(tl.int32)) > 0:
                # phase 3: s raw low bits, f = 2^(12-s)
                sh = 12 - sbits
                slot = x & 0xFFF
                low = tl.where(has, (slot >> sh).to(tl.int32), 0)
                x = tl.where(has, ((x >> 12) << sh) + (slot & ((1 << sh) - 1)), x)
                x, pos, bad = _renorm(seg_words, n_words, x, pos, bad, has & (x < 65536), lane, below)
            h = (z >> 1) ^ -(z & 1)  # unzigzag; |h| < 2^23
            q = mu.to(tl.int64) + (h.to(tl.int64) << sbits) + low  # int64: forged streams cannot overflow
            val = q.to(tl.float32) * delta[:, None]
            if BF16:
                # Round to nearest even by hand: the interpreter's fp32 -> bf16 cast truncates (val is
                # finite or inf, never NaN, so the carry is safe); on the GPU this equals cvt.rn.
                bits = val.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                res = bits.to(tl.int16).to(tl.bfloat16, bitcast=True)
            else:
                res = val.to(ty)
            c = c0 + lane
            ch_off = (c // HEAD_DIM).to(tl.int64) * stride_h + (c % HEAD_DIM).to(tl.int64) * stride_d
            tl.store(out_ptr + out_row[:, None] + ch_off[None, :], res, mask=ok)
    status = tl.max((bad | (ok & (x != 65536))).to(tl.int32), axis=1) | (pos != n_words).to(tl.int32)
    tl.store(status_ptr + seg, status, mask=seg_ok)


@functools.cache
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Model tables: slot -> symbol uint8 ``[88, 4096]``, ``freq | cum << 13`` int32 ``[88, 64]``.

    Two small tables (one L1-friendly byte per slot) rather than one packed int32 per slot (1.4 MiB).
    """
    fc = rans.FREQ.astype(np.int64) | (rans.CUM.astype(np.int64) << 13)
    sym = torch.from_numpy(rans.SLOT2SYM.copy()).to(device)
    return sym, torch.from_numpy(fc.astype(np.int32)).to(device)


@dataclass(frozen=True)
class DecodePlan:
    """Device-side inputs of one lossy blob, ready to launch.

    ``words`` int16 ``[payload_bytes // 2]`` (the payload as stored); per segment ``s`` (``S = 2*layers``):
    ``wbase`` int64 ``[S]`` (first word index past the initial states), ``n_words`` int32 ``[S]``,
    ``delta`` float32 ``[S]``; per channel ``c = h*head_dim + d``: ``meta`` int32 ``[S, C]``
    (``table_id | shift << 8``) and ``mu`` int32 ``[S, C]``.
    """

    info: BlobInfo
    lanes: int
    words: torch.Tensor
    wbase: torch.Tensor
    n_words: torch.Tensor
    delta: torch.Tensor
    meta: torch.Tensor
    mu: torch.Tensor


def prepare(blob: bytes | bytearray | memoryview, device: str | torch.device) -> DecodePlan:
    """Verify and parse a lossy blob on the host and copy its inputs to ``device`` (no kernel launch).

    Raises :class:`CodecError` for a bad checksum or malformed header/parameters/lengths.
    """
    info = container.verify(blob)
    if info.codec_id != CODEC_RANS:
        raise CodecError("the Triton decoder handles lossy (rANS) blobs only")
    mv = memoryview(blob)
    params = mv[info.params_offset : info.params_offset + info.params_len]
    payload = mv[info.payload_offset : info.payload_offset + info.payload_len]
    w, delta, lengths, width, mu = lossy.parse_params(params, info.shape)
    if int(lengths.sum()) != len(payload) or (lengths < 4 * w).any() or ((lengths - 4 * w) % 2).any():
        raise CodecError("segment lengths do not match the payload")
    n_words = (lengths - 4 * w) // 2
    if int(n_words.max()) >= 1 << 31:  # word positions are int32 in the kernel
        raise CodecError("a segment stream is too long for the GPU decoder")
    tid, sbits = rans.param_to_model(width)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    dev = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: copied below before any use
        raw = torch.frombuffer(payload, dtype=torch.uint8)
    # copy=True: a device copy is aligned for the int16 view even when the payload offset is odd.
    words = raw.to(dev, copy=True).view(torch.int16)

    def dt(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a)).to(device=dev, dtype=dtype)

    return DecodePlan(
        info=info,
        lanes=w,
        words=words,
        wbase=dt(starts // 2 + 2 * w, torch.int64),
        n_words=dt(n_words, torch.int32),
        delta=dt(delta, torch.float32),
        meta=dt(tid | (sbits << 8), torch.int32),
        mu=dt(mu, torch.int32),  # |mu| < 2^27: a varint holds at most 28 zigzag bits
    )


def launch(plan: DecodePlan, out: torch.Tensor, segments_per_program: int | None = None) -> torch.Tensor:
    """Run the kernel for ``plan`` into ``out`` (blob shape and dtype, any strides, on the plan's device).

    Syncs once to read the per-segment status; raises :class:`CodecError` if any segment's stream is
    corrupt (``out`` then holds partial garbage). ``segments_per_program`` is the ``BLOCK_S`` tile height
    (rounded up to a power of two); default 1 on CUDA, up to 16 under the interpreter, which runs programs
    one after another and pays a fixed Python cost per op, whatever the tile size.
    """
    _twin.check_out(out, plan.info, out.device)
    _, _, t, _, head_dim = plan.info.shape
    s_count, c = plan.meta.shape
    if segments_per_program is None:
        segments_per_program = 1 if out.is_cuda else min(s_count, 16)
    block_s = next_pow2(segments_per_program)
    block_w = next_pow2(plan.lanes)
    status = torch.zeros(s_count, dtype=torch.int32, device=out.device)
    sym, fc = _tables(out.device)
    _codec_decode_kernel[(triton.cdiv(s_count, block_s),)](
        plan.words, plan.meta, plan.mu, plan.delta, plan.wbase, plan.n_words, sym, fc, status, out,
        s_count, t, c // plan.lanes, c,
        *out.stride(),
        W=plan.lanes, HEAD_DIM=head_dim, BLOCK_S=block_s, BLOCK_W=block_w, BF16=out.dtype == torch.bfloat16,
        num_warps=max(1, min(8, block_s * block_w // 32)),
    )
    bad = torch.nonzero(status).flatten().tolist()
    if bad:
        raise CodecError(f"segments {bad[:8]}: corrupt entropy-coded stream")
    return out


def codec_decode(
    blob: bytes | bytearray | memoryview, device: str | torch.device = "cuda", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Triton twin of :func:`kernels.codec_decode.codec_decode` (same contract).

    Lossless (level 0) blobs take the codec's CPU path and are copied to the device.
    """
    info = container.inspect(blob)
    dev = _twin.check_out(out, info, device)
    if info.codec_id != CODEC_RANS:
        return _twin.codec_decode(blob, dev, out)
    plan = prepare(blob, dev)
    if out is None:
        out = torch.empty(info.shape, dtype=info.dtype, device=dev)
    return launch(plan, out)
