"""Lossy levels 1..4: layer-wise uniform quantization + per-channel Laplace models + interleaved rANS.

Quantizer. The chunk ``[L, 2, T, H, D]`` is viewed as ``S = 2L`` segments ``[T, C]`` (``C = H*D``;
segment ``2*l + kv``). Each segment gets one step ``delta = alpha * spread`` where ``spread`` is the
RMS over channels of the per-channel standard deviation (RMS of the values when ``T == 1``) and
``alpha`` depends on the level, on K vs V (keys ~3x finer: they move the softmax) and on depth
(layer ``l`` of ``L`` is ``4**(l/(L-1))`` times coarser than layer 0). One step per segment is the
MSE-optimal allocation across its channels; outlier key channels simply get wider models.
``q = rint(x / delta)``, so ``|x - q*delta| <= delta/2`` (plus the output dtype's rounding).

Model. Per channel: integer centre ``mu = rint(mean(q))`` and a width byte from ``b = mean|q - mu|``
(1/8-octave steps). The byte selects a shift ``s`` (low ``s`` bits of ``q - mu`` are sent raw) and one
of 88 fixed Laplace tables (:mod:`codec.rans`) for the rest, so side information is ~2 bytes per
channel per chunk instead of a shipped CDF.

Parameter section (little-endian)::

    u16 W (lanes per segment), u16 reserved = 0
    f32 delta[S]
    u32 stream_bytes[S]
    u8  width[S*C]                      (segment-major, channel c = h*D + d)
    varint mu[S*C]                      (zigzag, LEB128, same order)

Payload: the ``S`` segment streams back to back (layout in :mod:`codec.rans`).
"""

from __future__ import annotations

import struct

import numpy as np
import torch
from numba import njit

from codec import rans
from codec.container import CodecError

# alpha for (level) at layer 0 for values; keys use KEY_FACTOR * alpha; deeper layers up to LAYER_SPAN x.
LEVEL_ALPHA: dict[int, float] = {1: 0.04, 2: 0.1, 3: 0.3, 4: 1.2}
KEY_FACTOR = 0.35
LAYER_SPAN = 4.0
DEFAULT_LEVEL = 1
MAX_LANES = 32
# |q| stays below 2**20 so residuals fit the 24-bit escape field.
Q_LIMIT = float(1 << 20)

_HEAD = struct.Struct("<HH")


def lanes_for(channels: int) -> int:
    """Lanes per segment: the largest divisor of ``channels`` that is <= MAX_LANES."""
    return max(w for w in range(1, min(channels, MAX_LANES) + 1) if channels % w == 0)


def step_sizes(x: np.ndarray, level: int) -> np.ndarray:
    """Quantization steps float32 ``[L, 2]`` for ``x`` float32 ``[L, 2, T, C]``."""
    n_layers, _, t, _ = x.shape
    if t > 1:
        spread = np.sqrt(x.var(axis=2).mean(axis=-1))
    else:
        spread = np.sqrt((x.astype(np.float64) ** 2).mean(axis=(2, 3)))
    depth = LAYER_SPAN ** (np.arange(n_layers) / max(n_layers - 1, 1))
    alpha = LEVEL_ALPHA[level] * depth[:, None] * np.array([KEY_FACTOR, 1.0])[None, :]
    absmax = np.abs(x).max(axis=(2, 3))
    delta = np.maximum(alpha * spread, absmax / Q_LIMIT)
    delta = np.where(delta > 0, delta, 1.0).astype(np.float32)
    # absmax / Q_LIMIT can round below the bound in float32; nudge up so rint(x/delta) <= Q_LIMIT.
    return np.where(absmax / delta > Q_LIMIT, np.nextafter(delta, np.float32(np.inf)), delta)


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
def _quantize(x: np.ndarray, delta: np.float32, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``x`` f32 ``[T, C]`` -> residuals ``d`` (int64, written in place) around per-channel centres.

    Returns (mu int64 ``[C]``, mean |d| float64 ``[C]``)."""
    t_len, c_len = x.shape
    acc = np.zeros(c_len, dtype=np.int64)
    for t in range(t_len):
        for c in range(c_len):
            q = np.int64(np.rint(x[t, c] / delta))
            d[t, c] = q
            acc[c] += q
    mu = np.empty(c_len, dtype=np.int64)
    for c in range(c_len):
        mu[c] = np.int64(np.rint(acc[c] / t_len))
    mad = np.zeros(c_len, dtype=np.float64)
    for t in range(t_len):
        for c in range(c_len):
            d[t, c] -= mu[c]
            mad[c] += abs(d[t, c])
    return mu, mad / t_len


@njit(nogil=True, cache=True)
def _dequantize(d: np.ndarray, mu: np.ndarray, delta: np.float32, out: np.ndarray) -> None:
    t_len, c_len = d.shape
    for t in range(t_len):
        for c in range(c_len):
            out[t, c] = np.float32(mu[c] + d[t, c]) * delta


def encode(kv: torch.Tensor, level: int) -> tuple[bytes, bytes]:
    """Encode ``kv`` ``[L, 2, T, H, D]`` at lossy ``level``; returns (params section, payload)."""
    n_layers, _, t, h, dim = kv.shape
    c = h * dim
    x = kv.detach().to("cpu", torch.float32).reshape(n_layers, 2, t, c).numpy()
    if not np.isfinite(x).all():
        raise CodecError("lossy levels need finite values (found inf/nan); use codec.LOSSLESS")
    delta = step_sizes(x, level)
    segs = x.reshape(2 * n_layers, t, c)
    flat_delta = delta.reshape(-1)
    w = lanes_for(c)
    buf = np.empty(4 * t * c, dtype=np.uint16)
    d = np.empty((t, c), dtype=np.int64)
    streams, lengths, mus, widths = [], [], [], []
    for s in range(2 * n_layers):
        mu_s, mad = _quantize(segs[s], flat_delta[s], d)
        width_s = rans.width_param(mad)
        tid, sbits = rans.param_to_model(width_s)
        mus.append(mu_s)
        widths.append(width_s)
        n, states = rans.encode_segment(d, tid, sbits, w, rans.FREQ, rans.CUM, buf)
        stream = states.astype("<u4").tobytes() + buf[:n][::-1].astype("<u2").tobytes()
        streams.append(stream)
        lengths.append(len(stream))
    mu = np.concatenate(mus)
    mu_buf = np.empty(4 * mu.size, dtype=np.uint8)
    n_mu = _varint_encode(mu, mu_buf)
    params = b"".join((
        _HEAD.pack(w, 0),
        delta.reshape(-1).astype("<f4").tobytes(),
        np.asarray(lengths, dtype="<u4").tobytes(),
        np.concatenate(widths).tobytes(),
        mu_buf[:n_mu].tobytes(),
    ))
    return params, b"".join(streams)


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
    if reserved != 0 or w < 1 or c % w != 0:
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
           dtype: torch.dtype) -> torch.Tensor:
    """Decode a lossy payload into ``shape`` ``[L, 2, T, H, D]`` of ``dtype``."""
    n_layers, _, t, _, _ = shape
    w, delta, lengths, width, mu = parse_params(params, shape)
    if int(lengths.sum()) != len(payload) or (lengths < 4 * w).any() or ((lengths - 4 * w) % 2).any():
        raise CodecError("segment lengths do not match the payload")
    tid, sbits = rans.param_to_model(width)
    raw = np.frombuffer(payload, dtype=np.uint8)
    s_count, c = mu.shape
    out = np.empty((s_count, t, c), dtype=np.float32)
    d = np.empty((t, c), dtype=np.int64)
    off = 0
    for s in range(s_count):
        seg = raw[off : off + lengths[s]]
        off += int(lengths[s])
        init = seg[: 4 * w].view("<u4")
        if (init < rans.RANS_L).any():
            raise CodecError(f"segment {s}: initial rANS state out of range")
        words = seg[4 * w :].view("<u2")
        rc = rans.decode_segment(init, words, tid[s], sbits[s], t, rans.FREQ, rans.CUM, rans.SLOT2SYM, d)
        if rc != 0:
            raise CodecError(f"segment {s}: corrupt entropy-coded stream (code {rc})")
        _dequantize(d, mu[s], delta[s], out[s])
    return torch.from_numpy(out).reshape(shape).to(dtype)
