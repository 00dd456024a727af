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


def param_to_model(param: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel width bytes -> (table id, shift ``s``), both int64 arrays shaped like ``param``."""
    e = param.astype(np.int64) - PARAM_BIAS
    s = np.clip(np.where(e >= 16, e // 8 - 1, 0), 0, MAX_SHIFT)
    e2 = np.clip(e - 8 * s, -PARAM_BIAS, 15)
    tid = np.where(s > 0, N_DIRECT + np.clip(e2 - 8, 0, N_SHIFTED - 1), e2 + PARAM_BIAS)
    return tid, s


def width_param(b: np.ndarray) -> np.ndarray:
    """Mean absolute residual ``b`` (float) -> width byte (uint8)."""
    with np.errstate(divide="ignore"):
        code = np.rint(8.0 * np.log2(np.maximum(b, 2.0**-8))) + PARAM_BIAS
    return np.clip(code, 0, 255).astype(np.uint8)


@njit(nogil=True, cache=True, inline="always")
def _put(x: int, start: int, f: int, out: np.ndarray, n: int) -> tuple[int, int]:
    if x >= ((RANS_L >> SCALE_BITS) << 16) * f:
        out[n] = x & 0xFFFF
        n += 1
        x >>= 16
    return ((x // f) << SCALE_BITS) + (x % f) + start, n


@njit(nogil=True, cache=True)
def encode_segment(d: np.ndarray, tid: np.ndarray, sbits: np.ndarray, w: int, freq: np.ndarray,
                   cum: np.ndarray, out: np.ndarray) -> tuple[int, np.ndarray]:
    """Encode residuals ``d`` int64 ``[T, C]`` (``|d| < 2**23``) of one segment.

    ``out`` (uint16, at least ``4*T*C`` long) receives the words in *emission* order (reverse of read
    order). Returns (word count, final lane states uint32 ``[w]``).
    """
    t_len, c_len = d.shape
    rounds = c_len // w
    x = np.full(w, RANS_L, dtype=np.int64)
    n = 0
    for t in range(t_len - 1, -1, -1):
        for r in range(rounds - 1, -1, -1):
            for j in range(w - 1, -1, -1):  # phase 3: low bits
                c = r * w + j
                s = sbits[c]
                if s > 0:
                    low = d[t, c] & ((1 << s) - 1)
                    x[j], n = _put(x[j], low << (SCALE_BITS - s), 1 << (SCALE_BITS - s), out, n)
            for j in range(w - 1, -1, -1):  # phase 2: escape low half
                c = r * w + j
                h = d[t, c] >> sbits[c]
                z = 2 * h if h >= 0 else -2 * h - 1
                if z >= ESCAPE:
                    x[j], n = _put(x[j], z & 0xFFF, 1, out, n)
            for j in range(w - 1, -1, -1):  # phase 1: escape high half
                c = r * w + j
                h = d[t, c] >> sbits[c]
                z = 2 * h if h >= 0 else -2 * h - 1
                if z >= ESCAPE:
                    x[j], n = _put(x[j], z >> 12, 1, out, n)
            for j in range(w - 1, -1, -1):  # phase 0: model symbol
                c = r * w + j
                h = d[t, c] >> sbits[c]
                z = 2 * h if h >= 0 else -2 * h - 1
                sym = min(z, ESCAPE)
                k = tid[c]
                x[j], n = _put(x[j], cum[k, sym], freq[k, sym], out, n)
    return n, x.astype(np.uint32)


@njit(nogil=True, cache=True)
def decode_segment(init: np.ndarray, words: np.ndarray, tid: np.ndarray, sbits: np.ndarray, t_len: int,
                   freq: np.ndarray, cum: np.ndarray, slot2sym: np.ndarray, d: np.ndarray) -> int:
    """Decode one segment into residuals ``d`` int64 ``[T, C]``. Returns 0, or a negative error code:
    -1 = ran out of words, -2 = words left over, -3 = final state is not 2**16.
    """
    w = init.shape[0]
    c_len = d.shape[1]
    rounds = c_len // w
    x = init.astype(np.int64)
    zs = np.empty(w, dtype=np.int64)
    esc = np.zeros(w, dtype=np.int64)
    nw = words.shape[0]
    pos = 0
    mask = PROB_SCALE - 1
    for t in range(t_len):
        for r in range(rounds):
            for j in range(w):  # phase 0
                c = r * w + j
                k = tid[c]
                slot = x[j] & mask
                sym = slot2sym[k, slot]
                xj = np.int64(freq[k, sym]) * (x[j] >> SCALE_BITS) + slot - np.int64(cum[k, sym])
                if xj < RANS_L:
                    if pos >= nw:
                        return -1
                    xj = (xj << 16) | np.int64(words[pos])
                    pos += 1
                x[j] = xj
                zs[j] = sym
            for j in range(w):  # phases 1 and 2 read 12 raw bits each (f = 1): value = slot
                if zs[j] >= ESCAPE:
                    zs[j] = -1  # escape marker; the value is rebuilt from the two raw fields
            for ph in range(2):
                for j in range(w):
                    if zs[j] < 0:
                        raw = np.int64(x[j] & mask)
                        xj = x[j] >> SCALE_BITS
                        if xj < RANS_L:
                            if pos >= nw:
                                return -1
                            xj = (xj << 16) | np.int64(words[pos])
                            pos += 1
                        x[j] = xj
                        esc[j] = raw if ph == 0 else (esc[j] << 12) | raw
            for j in range(w):  # phase 3: low bits, then rebuild the residual
                c = r * w + j
                z = esc[j] if zs[j] < 0 else zs[j]
                h = z >> 1 if (z & 1) == 0 else -((z + 1) >> 1)
                s = sbits[c]
                low = np.int64(0)
                if s > 0:
                    sh = SCALE_BITS - s
                    slot = x[j] & mask
                    low = np.int64(slot >> sh)
                    xj = np.int64(1 << sh) * (x[j] >> SCALE_BITS) + slot - (np.int64(low) << sh)
                    if xj < RANS_L:
                        if pos >= nw:
                            return -1
                        xj = (xj << 16) | np.int64(words[pos])
                        pos += 1
                    x[j] = xj
                d[t, c] = (h << s) + low
    if pos != nw:
        return -2
    for j in range(w):
        if x[j] != RANS_L:
            return -3
    return 0


__all__ = [
    "CUM",
    "ESCAPE",
    "FREQ",
    "MAX_SHIFT",
    "N_SYM",
    "SCALE_BITS",
    "SLOT2SYM",
    "decode_segment",
    "encode_segment",
    "param_to_model",
    "width_param",
]
