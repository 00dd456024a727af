"""Lossy levels 1..4: layer-wise uniform quantization + per-channel Laplace models + interleaved rANS.

Quantizer. The chunk ``[L, 2, T, H, D]`` is viewed as ``S = 2L`` segments ``[T, C]`` (``C = H*D``;
segment ``2*l + kv``). Each segment gets one step ``delta = alpha * spread`` where ``spread`` is the
RMS over channels of the per-channel standard deviation (RMS of the values when ``T == 1``) and
``alpha`` depends on the level, on K vs V (keys 2x finer: they move the softmax) and on depth
(layer ``l`` of ``L`` is ``6**(l/(L-1))`` times coarser than layer 0). These two factors are a fit of
the reverse water-filling allocation ``alpha_s ~ 1/sqrt(c_s)`` from the measured next-token-KL
sensitivity ``c_s`` of each (layer, K/V) segment of stories260K (docs/codec.md). One step per segment
is the MSE-optimal allocation across its channels; outlier key channels simply get wider models.
``q = rint(x / delta)``, so ``|x - q*delta| <= delta/2`` (plus the output dtype's rounding).

Model. Per channel: integer centre ``mu = rint(mean(q))`` and a width byte from ``b = mean|q - mu|``
(1/8-octave steps; for channels without raw low bits the encoder then keeps the nearby byte with the
fewest coded bits, see :func:`_refine_narrow_models`). The byte selects a shift ``s`` (low ``s`` bits
of ``q - mu`` are sent raw) and one of 88 fixed Laplace tables (:mod:`codec.rans`) for the rest, so
side information is ~2 bytes per channel per chunk instead of a shipped CDF.

Parameter section (little-endian)::

    u16 W (lanes per segment), u16 reserved = 0
    f32 delta[S]
    u32 stream_bytes[S]
    u8  width[S*C]                      (segment-major, channel c = h*D + d)
    varint mu[S*C]                      (zigzag, LEB128, same order)

Payload: the ``S`` segment streams back to back (layout in :mod:`codec.rans`).
"""

from __future__ import annotations

import math
import struct

import numpy as np
import torch
from numba import njit

from codec import rans
from codec.container import CodecError

# alpha for (level) at layer 0 for values; keys use KEY_FACTOR * alpha; deeper layers up to LAYER_SPAN x.
LEVEL_ALPHA: dict[int, float] = {1: 0.028, 2: 0.07, 3: 0.2, 4: 0.8}
KEY_FACTOR = 0.5
LAYER_SPAN = 6.0
DEFAULT_LEVEL = 1
MAX_LANES = 32
REFINE = 4  # width-byte search radius for low-rate channels (_refine_narrow_models)
# |q| stays below 2**20 so residuals fit the 24-bit escape field.
Q_LIMIT = float(1 << 20)

_HEAD = struct.Struct("<HH")


def lanes_for(channels: int) -> int:
    """Lanes per segment: the largest divisor of ``channels`` that is <= MAX_LANES."""
    return max(w for w in range(1, min(channels, MAX_LANES) + 1) if channels % w == 0)


# float32 bit patterns of all 65536 fp16 values: widening is one table load per value.
_F16_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16).astype(np.float32)
_F16_BITS = _F16_BITS.view(np.uint32)


@njit(nogil=True, cache=True)
def _widen(src: np.ndarray, bf16: bool, lut: np.ndarray, dst: np.ndarray) -> None:
    """fp16 or bf16 bit patterns uint16 ``[T, C]`` -> float32 bit patterns in ``dst`` uint32 ``[T, C]``."""
    t_len, c_len = src.shape
    for t in range(t_len):
        for c in range(c_len):
            v = src[t, c]
            dst[t, c] = np.uint32(v) << 16 if bf16 else lut[v]


@njit(nogil=True, cache=True)
def _narrow(src: np.ndarray, bf16: bool, dst: np.ndarray) -> None:
    """float32 bit patterns uint32 ``[T, C]`` (finite) -> fp16 or bf16 bit patterns in ``dst`` uint16,
    rounding to nearest even exactly like ``torch.Tensor.to`` (overflow gives inf, fp16 subnormals kept)."""
    t_len, c_len = src.shape
    for t in range(t_len):
        for c in range(c_len):
            f = int(src[t, c])
            if bf16:
                dst[t, c] = (f + 0x7FFF + ((f >> 16) & 1)) >> 16
                continue
            sign = (f >> 16) & 0x8000
            f &= 0x7FFFFFFF
            if f >= 143 << 23:  # >= 2**16: inf
                h = 0x7C00
            elif f >= 113 << 23:  # fp16 normal: rebias, drop 13 bits with round-to-nearest-even
                h = (f >> 13) - (112 << 10)
                rem = f & 0x1FFF
                h += (rem > 0x1000) | ((rem == 0x1000) & (h & 1))
            else:  # fp16 subnormal or zero: units of 2**-24
                sh = 126 - (f >> 23)
                if sh > 25:
                    h = 0
                else:
                    m = (f & 0x7FFFFF) | 0x800000
                    h = m >> sh
                    rem = m & ((1 << sh) - 1)
                    half = 1 << (sh - 1)
                    h += (rem > half) | ((rem == half) & (h & 1))
            dst[t, c] = sign | h


@njit(nogil=True, cache=True)
def _segment_stats(x: np.ndarray) -> tuple[float, float]:
    """``x`` f32 ``[T, C]`` -> (spread, max|x|); spread = RMS over channels of the per-channel std over
    tokens (RMS of the values if ``T == 1``). Non-finite input gives a non-finite result."""
    t_len, c_len = x.shape
    s1 = np.zeros(c_len)
    amax = np.zeros(c_len, dtype=np.float32)
    for t in range(t_len):  # branch-free inner loops so LLVM vectorizes them
        for c in range(c_len):
            s1[c] += x[t, c]
            amax[c] = max(amax[c], abs(x[t, c]))
    top = np.float64(amax.max())
    if not np.isfinite(s1.sum()):  # inf/nan anywhere reaches the float64 sums
        return np.nan, np.nan
    if t_len == 1:
        return np.sqrt((s1 * s1).mean()), top
    mean = s1 / t_len
    s2 = np.zeros(c_len)
    for t in range(t_len):
        for c in range(c_len):
            v = x[t, c] - mean[c]
            s2[c] += v * v
    return np.sqrt((s2 / t_len).mean()), top


def _finite_limit(dtype: torch.dtype) -> float:
    """Largest ``|x_hat|`` that decodes to a finite ``dtype`` value: round-to-nearest overflows from
    ``max + ulp/2`` on, less a margin for the decoder's float32 product ``q * delta`` (2^-23 relative)."""
    fi = torch.finfo(dtype)
    ulp = fi.eps * 2.0 ** math.floor(math.log2(fi.max))
    return (fi.max + ulp / 2) * (1 - 2.0**-23)


def _step(
    spread: float, absmax: float, level: int, layer: int, n_layers: int, kv: int, dtype: torch.dtype
) -> np.float32:
    """One segment's quantization step (see module docstring)."""
    depth = LAYER_SPAN ** (layer / max(n_layers - 1, 1))
    alpha = LEVEL_ALPHA[level] * depth * (KEY_FACTOR if kv == 0 else 1.0)
    floor = absmax / Q_LIMIT
    # |x_hat| <= absmax + delta/2 must stay finite in the output dtype: a coarse step on values near the
    # dtype's largest one would otherwise round them up to inf (fp16: absmax 20000, delta 443 -> inf).
    cap = min(2 * (_finite_limit(dtype) - absmax), float(np.finfo(np.float32).max))
    if cap < 2 * floor:
        raise CodecError(f"values up to {absmax:g} are too close to the largest {dtype} for lossy levels; "
                         "use codec.LOSSLESS")
    wanted = min(max(alpha * spread, floor), cap)
    delta = np.float32(wanted)
    if delta > cap:  # float32 rounding must not step over the cap
        delta = np.nextafter(delta, np.float32(0))
    if not delta > 0:
        return np.float32(1.0)
    # absmax / Q_LIMIT can round below the bound in float32; nudge up so rint(x/delta) <= Q_LIMIT.
    return np.nextafter(delta, np.float32(np.inf)) if absmax / delta > Q_LIMIT else delta


def step_sizes(x: np.ndarray, level: int, dtype: torch.dtype = torch.float32) -> np.ndarray:
    """Quantization steps float32 ``[L, 2]`` that encode uses for finite ``x`` float32 ``[L, 2, T, C]``
    (the values of a ``dtype`` chunk)."""
    n_layers = x.shape[0]
    out = np.empty((n_layers, 2), dtype=np.float32)
    for layer in range(n_layers):
        for kv in range(2):
            spread, absmax = _segment_stats(np.ascontiguousarray(x[layer, kv], dtype=np.float32))
            out[layer, kv] = _step(spread, absmax, level, layer, n_layers, kv, dtype)
    return out


@njit(nogil=True, cache=True)
def _varint_encode(v: np.ndarray, out: np.ndarray) -> int:
    n = 0
    for i in range(v.shape[0]):
        z = 2 * v[i] if v[i] >= 0 else -2 * v[i] - 1
        while z >= 0x80:
            out[n] = (z & 0x7F) | 0x80
            z >>= 7
            n += 1
        out[n] = z
        n += 1
    return n


@njit(nogil=True, cache=True)
def _varint_decode(buf: np.ndarray, count: int, out: np.ndarray) -> int:
    """Decode ``count`` zigzag varints (at most 4 bytes each); returns bytes used or -1 if malformed."""
    pos = 0
    for i in range(count):
        z = 0
        shift = 0
        while True:
            if pos >= buf.shape[0] or shift > 21:
                return -1
            b = int(buf[pos])
            pos += 1
            z |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        out[i] = z >> 1 if (z & 1) == 0 else -((z + 1) >> 1)
    return pos


@njit(nogil=True, cache=True)
def _encode_segment(x: np.ndarray, delta: np.float32, w: int, d: np.ndarray, mu: np.ndarray,
                    width: np.ndarray, out: np.ndarray) -> tuple[int, np.ndarray]:
    """Quantize ``x`` f32 ``[T, C]`` with step ``delta``, fit the channel models and rANS-code it.

    Fills ``d`` (int32 residuals scratch), ``mu`` (int64 ``[C]``) and ``width`` (uint8 ``[C]``); returns
    :func:`codec.rans.encode_segment`'s (word count, states)."""
    t_len, c_len = x.shape
    acc = np.zeros(c_len, dtype=np.int64)
    for t in range(t_len):
        for c in range(c_len):
            q = np.int32(np.rint(x[t, c] / delta))
            d[t, c] = q
            acc[c] += q
    for c in range(c_len):
        mu[c] = np.int64(np.rint(acc[c] / t_len))
    mad = np.zeros(c_len, dtype=np.int64)
    for t in range(t_len):
        for c in range(c_len):
            v = d[t, c] - mu[c]
            d[t, c] = v
            mad[c] += abs(v)
    tid = np.empty(c_len, dtype=np.int64)
    sbits = np.empty(c_len, dtype=np.int64)
    for c in range(c_len):
        width[c] = rans.width_of(mad[c] / t_len)
        tid[c], sbits[c] = rans.model_of(width[c])
    _refine_narrow_models(d, width, tid, sbits)
    return rans.encode_segment(d, tid, sbits, w, rans.FREQ, rans.CUM, out)


@njit(nogil=True, cache=True)
def _refine_narrow_models(d: np.ndarray, width: np.ndarray, tid: np.ndarray, sbits: np.ndarray) -> None:
    """For channels without raw low bits (``s == 0``: low-rate, where the mean-|d| Laplace fit is
    loosest) try the width bytes within +-REFINE of the fit and keep the one with the fewest coded bits.

    Encoder-only choice (the decoder reads whatever byte is stored): ~5 % smaller payload at level 4
    on stories260K, nothing lost elsewhere. Width bytes < N_DIRECT are exactly the s == 0 tables."""
    t_len = d.shape[0]
    chans = np.nonzero(sbits == 0)[0]
    hist = np.zeros((chans.shape[0], rans.N_SYM), dtype=np.int64)
    top = np.zeros(chans.shape[0], dtype=np.int64)  # largest symbol seen: bounds the cost sums
    for t in range(t_len):
        for i in range(chans.shape[0]):
            v = int(d[t, chans[i]])
            sym = min((v << 1) ^ (v >> 63), rans.ESCAPE)
            hist[i, sym] += 1
            top[i] = max(top[i], sym)
    for i in range(chans.shape[0]):
        c = chans[i]
        best, best_bits = int(width[c]), np.inf
        lo, hi = max(best - REFINE, 0), min(best + REFINE, rans.N_DIRECT - 1)
        for p in range(lo, hi + 1):
            bits = 0.0
            for sym in range(top[i] + 1):
                bits += hist[i, sym] * rans.COST_BITS[p, sym]
            if bits < best_bits:
                best, best_bits = p, bits
        width[c] = best
        tid[c] = best


def encode(kv: torch.Tensor, level: int) -> tuple[bytes, bytes]:
    """Encode ``kv`` ``[L, 2, T, H, D]`` at lossy ``level``; returns (params section, payload)."""
    n_layers, _, t, h, dim = kv.shape
    c = h * dim
    src = kv.detach().to("cpu").contiguous()
    if src.dtype == torch.float32:
        segs = src.reshape(2 * n_layers, t, c).numpy()
        xbuf = None
    else:  # widen one segment at a time in numba (torch's fp16 -> fp32 is slow on one core)
        segs = src.view(torch.int16).reshape(2 * n_layers, t, c).numpy().view(np.uint16)
        xbuf = np.empty((t, c), dtype=np.float32)
    w = lanes_for(c)
    buf = np.empty(4 * t * c + 1, dtype=np.uint16)
    d = np.empty((t, c), dtype=np.int32)
    mu = np.empty((2 * n_layers, c), dtype=np.int64)
    width = np.empty((2 * n_layers, c), dtype=np.uint8)
    delta = np.empty(2 * n_layers, dtype=np.float32)
    parts, lengths = [], []
    for s in range(2 * n_layers):
        if xbuf is None:
            x = segs[s]
        else:
            _widen(segs[s], src.dtype == torch.bfloat16, _F16_BITS, xbuf.view(np.uint32))
            x = xbuf
        spread, absmax = _segment_stats(x)
        if not math.isfinite(spread):
            raise CodecError("lossy levels need finite values (found inf/nan); use codec.LOSSLESS")
        delta[s] = _step(spread, absmax, level, s // 2, n_layers, s % 2, src.dtype)
        n, states = _encode_segment(x, delta[s], w, d, mu[s], width[s], buf)
        parts += [states.view(np.uint16), buf[n - 1 :: -1].copy() if n else buf[:0]]  # buf is reused
        lengths.append(4 * w + 2 * n)
    mu_buf = np.empty(4 * mu.size, dtype=np.uint8)
    n_mu = _varint_encode(mu.reshape(-1), mu_buf)
    params = b"".join((
        _HEAD.pack(w, 0),
        delta.astype("<f4").tobytes(),
        np.asarray(lengths, dtype="<u4").tobytes(),
        width.tobytes(),
        mu_buf[:n_mu].tobytes(),
    ))
    return params, np.concatenate(parts).astype("<u2", copy=False).tobytes()


def parse_params(params: memoryview, shape: tuple[int, ...]) -> tuple[int, np.ndarray, np.ndarray,
                                                                        np.ndarray, np.ndarray]:
    """Validate and split the parameter section: (W, delta f32 [S], stream_bytes i64 [S],
    width u8 [S, C], mu i64 [S, C])."""
    n_layers, _, _, h, dim = shape
    s, c = 2 * n_layers, h * dim
    fixed = _HEAD.size + 8 * s + s * c
    if len(params) < fixed + s * c:
        raise CodecError(f"lossy parameter section too short: {len(params)} bytes")
    w, reserved = _HEAD.unpack_from(params, 0)
    if reserved != 0 or w != lanes_for(c):  # the format fixes W; GPU decoders rely on W <= 32
        raise CodecError(f"bad lane count {w} for {c} channels")
    raw = np.frombuffer(params, dtype=np.uint8)
    off = _HEAD.size
    delta = raw[off : off + 4 * s].view("<f4").astype(np.float32)
    off += 4 * s
    lengths = raw[off : off + 4 * s].view("<u4").astype(np.int64)
    off += 4 * s
    width = raw[off : off + s * c].reshape(s, c)
    off += s * c
    if not (np.isfinite(delta).all() and (delta > 0).all()):
        raise CodecError("bad quantization step in parameter section")
    mu = np.empty(s * c, dtype=np.int64)
    used = _varint_decode(raw[off:], s * c, mu)
    if used < 0 or off + used != len(params):
        raise CodecError("malformed channel centres in parameter section")
    return w, delta, lengths, width, mu.reshape(s, c)


def decode(params: memoryview, payload: memoryview, level: int, shape: tuple[int, ...],
           dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode a lossy payload into ``shape`` ``[L, 2, T, H, D]`` of ``dtype``.

    ``out``: a CPU tensor of that shape and dtype whose ``[l, kv]`` blocks are each contiguous (a token
    slice of a context tensor is); the segments are decoded straight into it. A stream found corrupt
    part-way leaves the segments before it written.
    """
    n_layers, _, t, _, _ = shape
    w, delta, lengths, width, mu = parse_params(params, shape)
    if int(lengths.sum()) != len(payload) or (lengths < 4 * w).any() or ((lengths - 4 * w) % 2).any():
        raise CodecError("segment lengths do not match the payload")
    tid, sbits = rans.param_to_model(width)
    # Aligned uint16 copy with 4*W words of slack: the decoder's renorm reads run ahead branch-free.
    words = np.zeros(len(payload) // 2 + 4 * w, dtype=np.uint16)
    words.view(np.uint8)[: len(payload)] = np.frombuffer(payload, dtype=np.uint8)
    s_count, c = mu.shape
    if out is None:  # numpy memory: glibc reuses freed blocks, torch.empty hands out fresh pages to fault in
        host = np.empty(shape, dtype=np.float32 if dtype == torch.float32 else np.int16)
        out = torch.from_numpy(host).view(dtype)
    if dtype == torch.float32:
        dst = out.numpy()
    else:  # decode a segment into float32 scratch, then round it to 16 bits in numba (cache-resident)
        dst = out.view(torch.int16).numpy().view(np.uint16)
        scratch = np.empty((t, c), dtype=np.float32)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) // 2
    for s in range(s_count):
        seg = dst[s // 2, s % 2].reshape(t, c)  # segment s = 2*layer + kv; a view (blocks are contiguous)
        nw = int(lengths[s] - 4 * w) // 2
        rc = rans.decode_segment(words, int(starts[s]), nw, w, tid[s], sbits[s], t, rans.DEC, mu[s],
                                 delta[s], seg if dtype == torch.float32 else scratch)
        if rc != 0:
            raise CodecError(f"segment {s}: corrupt entropy-coded stream (code {rc})")
        if dtype != torch.float32:
            _narrow(scratch.view(np.uint32), dtype == torch.bfloat16, seg)
    return out
