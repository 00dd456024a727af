"""Interleaved rANS coder (32-bit state, 16-bit renormalisation, 12-bit probabilities), numba-compiled.

Bitstream model (see docs/codec.md, "Lane layout", for the full spec a GPU kernel must follow):

* A *segment* is one (layer, K/V) slice ``[T, C]`` of quantized symbols, ``C = kv_heads * head_dim``.
  Segments are independent byte streams.
* A segment has ``W`` lanes (``W`` divides ``C``). Channel ``c`` belongs to lane ``c % W``; its
  round is ``r = c // W``. Decoding walks steps ``(t, r)`` for ``t`` in ``0..T-1`` and ``r`` in
  ``0..C/W-1``; in each step every lane ``j`` handles channel ``c = r*W + j`` in four *phases*,
  each phase visiting the lanes in increasing ``j``:

  0. model symbol ``z`` (0..63) from table ``tid[c]``;
  1. if ``z == 63`` (escape): 12 raw bits (high half of the escaped zigzag value);
  2. if ``z == 63``: 12 more raw bits (low half);
  3. if ``s[c] > 0``: ``s[c]`` raw bits (the low bits of the residual).

  A raw ``k``-bit field is an rANS op with frequency ``2**(12-k)`` and start ``value << (12-k)``.
* Every op is ``slot = x & 0xFFF``; ``x = f * (x >> 12) + slot - start``; then, if ``x < 2**16``,
  ``x = (x << 16) | next_word``. Words are uint16 little-endian, read in exactly this order
  (phase by phase, lane by lane), so a lane-parallel decoder finds each lane's word with an
  exclusive prefix sum of the "needs a word" flags of the lanes in that phase.
* Segment stream = ``W`` initial states (uint32 LE) followed by the words. A well-formed stream ends
  with every lane state equal to ``2**16`` and every word consumed; the decoder checks both.
"""

from __future__ import annotations

import numpy as np
from numba import njit

SCALE_BITS = 12
PROB_SCALE = 1 << SCALE_BITS
RANS_L = 1 << 16
N_SYM = 64
ESCAPE = N_SYM - 1
MAX_SHIFT = 12
# Width parameter byte: P = clamp(round(8*log2(b)) + PARAM_BIAS, 0, 255) for residual mean |d| = b.
PARAM_BIAS = 64
N_DIRECT = 80  # tables for s == 0, e in [-64, 16)
N_SHIFTED = 8  # tables for s > 0, e' in [8, 16)
N_TABLES = N_DIRECT + N_SHIFTED


def _quantize_freqs(p: np.ndarray) -> np.ndarray:
    """Integer frequencies summing to PROB_SCALE, each >= 1, from probabilities ``p`` (deterministic)."""
    f = 1 + np.floor(p / p.sum() * (PROB_SCALE - N_SYM)).astype(np.int64)
    f[int(np.argmax(p))] += PROB_SCALE - int(f.sum())
    return f


def build_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model tables: ``freq``/``cum`` uint32 ``[N_TABLES, 64]`` and ``slot2sym`` uint8 ``[N_TABLES, 4096]``.

    Table ``i < 80``: discrete Laplace ``P(h) ~ exp(-|h| * lam)`` with ``lam = 2**(-(i-64)/8)``;
    table ``80 + k``: the same for ``h = floor(d / 2**s)`` of a Laplace residual, ``P(h) ~
    exp(-|h + 1/2| * lam)``, ``lam = 2**(-(8+k)/8)``. Symbols are zigzag codes of ``h`` in
    ``[-31, 31]`` (0..62) plus the escape 63 that takes the tail mass.
    """
    freq = np.zeros((N_TABLES, N_SYM), dtype=np.uint32)
    big = np.arange(-4096, 4097, dtype=np.float64)
    zig = np.where(big >= 0, 2 * big, -2 * big - 1).astype(np.int64)
    for i in range(N_TABLES):
        if i < N_DIRECT:
            lam, w = 2.0 ** (-(i - PARAM_BIAS) / 8.0), np.abs(big)
        else:
            lam, w = 2.0 ** (-(8 + i - N_DIRECT) / 8.0), np.abs(big + 0.5)
        mass = np.exp(-(w - w.min()) * lam)
        p = np.zeros(N_SYM)
        inner = zig < ESCAPE
        p[zig[inner]] = mass[inner]
        p[ESCAPE] = mass[~inner].sum() + 1e-300
        freq[i] = _quantize_freqs(p)
    cum = np.zeros_like(freq)
    cum[:, 1:] = np.cumsum(freq, axis=1)[:, :-1]
    slot2sym = np.zeros((N_TABLES, PROB_SCALE), dtype=np.uint8)
    for i in range(N_TABLES):
        slot2sym[i] = np.repeat(np.arange(N_SYM, dtype=np.uint8), freq[i])
    return freq, cum, slot2sym


FREQ, CUM, SLOT2SYM = build_tables()
# Code length in bits of each (table, symbol): what the encoder minimises when it picks a table.
COST_BITS = -np.log2(FREQ / PROB_SCALE)


@njit(nogil=True, cache=True)
def model_of(param: int) -> tuple[int, int]:
    """Width byte -> (table id, shift ``s``): ``e = param - 64``; ``s = min(e//8 - 1, 12)`` if ``e >= 16``."""
    e = int(param) - PARAM_BIAS
    s = min(e // 8 - 1, MAX_SHIFT) if e >= 16 else 0
    e2 = min(max(e - 8 * s, -PARAM_BIAS), 15)
    if s > 0:
        return N_DIRECT + min(max(e2 - 8, 0), N_SHIFTED - 1), s
    return e2 + PARAM_BIAS, 0


@njit(nogil=True, cache=True)
def _models(param: np.ndarray, tid: np.ndarray, sbits: np.ndarray) -> None:
    for i in range(param.shape[0]):
        tid[i], sbits[i] = model_of(param[i])


def param_to_model(param: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel width bytes -> (table id, shift ``s``), both int64 arrays shaped like ``param``."""
    flat = np.ascontiguousarray(param, dtype=np.uint8).reshape(-1)
    tid = np.empty(flat.shape[0], dtype=np.int64)
    sbits = np.empty(flat.shape[0], dtype=np.int64)
    _models(flat, tid, sbits)
    return tid.reshape(param.shape), sbits.reshape(param.shape)


@njit(nogil=True, cache=True)
def width_of(b: float) -> int:
    """Mean absolute residual ``b`` -> width byte ``clamp(rint(8*log2(max(b, 2**-8))) + 64, 0, 255)``."""
    code = np.rint(8.0 * np.log2(max(b, 2.0**-8))) + PARAM_BIAS
    return int(min(max(code, 0.0), 255.0))


def build_decode_table(freq: np.ndarray, cum: np.ndarray) -> np.ndarray:
    """Per (table, slot) one packed uint32 ``sym | f << 6 | (slot - cum[sym]) << 18`` (one load per op)."""
    dec = np.zeros((freq.shape[0], PROB_SCALE), dtype=np.uint32)
    slots = np.arange(PROB_SCALE, dtype=np.uint32)
    for i in range(freq.shape[0]):
        sym = np.repeat(np.arange(N_SYM, dtype=np.uint32), freq[i])
        dec[i] = sym | (freq[i][sym] << 6) | ((slots - cum[i][sym]) << 18)
    return dec


DEC = build_decode_table(FREQ, CUM)


@njit(nogil=True, cache=True)
def encode_segment(d: np.ndarray, tid: np.ndarray, sbits: np.ndarray, w: int, freq: np.ndarray,
                   cum: np.ndarray, out: np.ndarray) -> tuple[int, np.ndarray]:
    """Encode residuals ``d`` (int32/int64 ``[T, C]``, ``|d| < 2**23``) of one segment.

    ``out`` (uint16, at least ``4*T*C + 1`` long) receives the words in *emission* order (reverse of
    read order). Returns (word count, final lane states uint32 ``[w]``).
    """
    t_len, c_len = d.shape
    rounds = c_len // w
    x = np.full(w, RANS_L, dtype=np.int64)
    zb = np.empty(w, dtype=np.int64)
    n = 0
    for t in range(t_len - 1, -1, -1):
        for r in range(rounds - 1, -1, -1):
            base = r * w
            esc = False
            for j in range(w):  # zigzag codes once per step, then the ops in reverse phase order
                h = np.int64(d[t, base + j]) >> sbits[base + j]
                z = (h << 1) ^ (h >> 63)
                zb[j] = z
                esc |= z >= ESCAPE
            for j in range(w - 1, -1, -1):  # phase 3: s raw low bits, f = 2**(12-s): shifts only
                s = sbits[base + j]
                if s > 0:
                    xj = x[j]
                    emit = xj >= (np.int64(1) << (32 - s))  # x_max = 2**20 * f
                    out[n] = xj & 0xFFFF  # written always, kept only if emitted (branch-free)
                    n += emit
                    xj = (xj >> 16) if emit else xj
                    sh = SCALE_BITS - s
                    low = np.int64(d[t, base + j]) & ((1 << s) - 1)
                    x[j] = ((xj >> sh) << SCALE_BITS) + (xj & ((1 << sh) - 1)) + (low << sh)
            if esc:
                for half in range(2):  # phase 2 (low 12 bits), then phase 1 (high 12 bits); f = 1
                    for j in range(w - 1, -1, -1):
                        if zb[j] >= ESCAPE:
                            xj = x[j]
                            if xj >= (1 << 20):
                                out[n] = xj & 0xFFFF
                                n += 1
                                xj >>= 16
                            v = zb[j] & 0xFFF if half == 0 else zb[j] >> 12
                            x[j] = (xj << SCALE_BITS) + v
            for j in range(w - 1, -1, -1):  # phase 0: model symbol
                k = tid[base + j]
                sym = min(zb[j], ESCAPE)
                f = np.int64(freq[k, sym])
                xj = x[j]
                emit = xj >= (f << 20)
                out[n] = xj & 0xFFFF
                n += emit
                xj = (xj >> 16) if emit else xj
                # x < 2**32 and f < 2**12: the correctly rounded float64 quotient floors exactly
                # (faster here than a float reciprocal with a fix-up, or an integer division).
                q = np.int64(np.float64(xj) / np.float64(f))
                x[j] = (q << SCALE_BITS) + xj - q * f + np.int64(cum[k, sym])
    return n, x.astype(np.uint32)


@njit(nogil=True, cache=True)
def decode_segment(words: np.ndarray, start: int, nw: int, w: int, tid: np.ndarray, sbits: np.ndarray,
                   t_len: int, dec: np.ndarray, mu: np.ndarray, delta: np.float32, out: np.ndarray) -> int:
    """Decode one segment and dequantize it into ``out`` float32 ``[T, C]``.

    The segment is ``words[start : start + 2*w + nw]`` (uint16: ``w`` LE uint32 initial states, then
    ``nw`` words); ``words`` must have at least ``4*w`` readable words past the segment (the renorm
    reads are branch-free and overshoot is checked once per step). ``dec`` is :data:`DEC`. Returns 0 or a
    negative error code: -1 = ran out of words, -2 = words left over, -3 = final state is not 2**16,
    -4 = an initial state is below 2**16.
    """
    c_len = out.shape[1]
    rounds = c_len // w
    x = np.empty(w, dtype=np.int64)
    for j in range(w):
        x[j] = np.int64(words[start + 2 * j]) | (np.int64(words[start + 2 * j + 1]) << 16)
        if x[j] < RANS_L:
            return -4
    zb = np.empty(w, dtype=np.int64)
    ev = np.zeros(w, dtype=np.int64)
    pos = start + 2 * w
    end = pos + nw
    mask = PROB_SCALE - 1
    for t in range(t_len):
        for r in range(rounds):
            base = r * w
            esc = False
            for j in range(w):  # phase 0
                xj = x[j]
                e = np.int64(dec[tid[base + j], xj & mask])
                xj = ((e >> 6) & mask) * (xj >> SCALE_BITS) + (e >> 18)
                need = xj < RANS_L
                nxt = (xj << 16) | np.int64(words[pos])
                x[j] = nxt if need else xj
                pos += need
                zb[j] = e & 63
                esc |= (e & 63) == ESCAPE
            if esc:
                for half in range(2):  # phases 1 and 2: two raw 12-bit halves (f = 1: value = slot)
                    for j in range(w):
                        if zb[j] == ESCAPE:
                            xj = x[j]
                            v = xj & mask
                            xj >>= SCALE_BITS
                            if xj < RANS_L:
                                xj = (xj << 16) | np.int64(words[pos])
                                pos += 1
                            x[j] = xj
                            ev[j] = v if half == 0 else (ev[j] << 12) | v
                for j in range(w):
                    if zb[j] == ESCAPE:
                        zb[j] = ev[j]
            for j in range(w):  # phase 3: low bits, rebuild, dequantize
                c = base + j
                z = zb[j]
                h = (z >> 1) ^ -(z & 1)
                s = sbits[c]
                low = np.int64(0)
                if s > 0:
                    sh = SCALE_BITS - s
                    xj = x[j]
                    slot = xj & mask
                    low = slot >> sh
                    xj = ((xj >> SCALE_BITS) << sh) + (slot & ((1 << sh) - 1))
                    need = xj < RANS_L
                    nxt = (xj << 16) | np.int64(words[pos])
                    x[j] = nxt if need else xj
                    pos += need
                out[t, c] = np.float32(mu[c] + (h << s) + low) * delta
            if pos > end:
                return -1
    if pos != end:
        return -2
    for j in range(w):
        if x[j] != RANS_L:
            return -3
    return 0


__all__ = [
    "COST_BITS",
    "CUM",
    "ESCAPE",
    "FREQ",
    "MAX_SHIFT",
    "N_SYM",
    "SCALE_BITS",
    "SLOT2SYM",
    "DEC",
    "decode_segment",
    "encode_segment",
    "model_of",
    "param_to_model",
    "width_of",
]
