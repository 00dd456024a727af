"""Pure-torch reference decoder of the lossy bitstream, vectorised across all lanes of all segments.

It follows the lane layout of :mod:`codec.rans` literally (phase by phase, exclusive prefix sums of
the "needs a word" flags to find each lane's word), which is how a GPU kernel decodes it, so a
Triton kernel in ``kernels/`` can be tested against :func:`decode_reference`. Slow (one Python step per
``(token, round)``) but exact: it must agree bit for bit with :func:`codec.decode`.
"""

from __future__ import annotations

import numpy as np
import torch

from codec import container, lossy, rans
from codec.container import CODEC_RANS, CodecError

_MASK = rans.PROB_SCALE - 1


def decode_streams(init: torch.Tensor, words: torch.Tensor, n_words: torch.Tensor, tid: torch.Tensor,
                   sbits: torch.Tensor, t_len: int) -> torch.Tensor:
    """Decode ``S`` segments at once.

    ``init`` int64 ``[S, W]`` initial states; ``words`` int64 ``[S, maxlen]`` (zero-padded);
    ``n_words`` int64 ``[S]``; ``tid``/``sbits`` int64 ``[S, C]``. Returns residuals int64 ``[S, T, C]``.
    """
    freq = torch.from_numpy(rans.FREQ.astype(np.int64)).to(init.device)
    cum = torch.from_numpy(rans.CUM.astype(np.int64)).to(init.device)
    slot2sym = torch.from_numpy(rans.SLOT2SYM.astype(np.int64)).to(init.device)
    s_count, w = init.shape
    c = tid.shape[1]
    x = init.clone()
    pos = torch.zeros(s_count, dtype=torch.int64, device=init.device)
    maxlen = max(words.shape[1], 1)
    padded = torch.nn.functional.pad(words, (0, 1)) if words.shape[1] == 0 else words
    out = torch.empty(s_count, t_len, c, dtype=torch.int64, device=init.device)

    def renorm(x: torch.Tensor, pos: torch.Tensor, active: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        need = active & (x < rans.RANS_L)
        idx = pos[:, None] + torch.cumsum(need.long(), dim=1) - 1  # this lane's word, if it needs one
        pos = pos + need.sum(dim=1)
        if bool((pos > n_words).any()):
            raise CodecError("reference decoder: stream ran out of words")
        word = torch.gather(padded, 1, idx.clamp(0, maxlen - 1))
        return torch.where(need, (x << 16) | word, x), pos

    everyone = torch.ones_like(x, dtype=torch.bool)
    for t in range(t_len):
        for r in range(c // w):
            cols = slice(r * w, (r + 1) * w)
            k, s = tid[:, cols], sbits[:, cols]
            slot = x & _MASK  # phase 0: model symbol
            sym = slot2sym[k, slot]
            x = freq[k, sym] * (x >> rans.SCALE_BITS) + slot - cum[k, sym]
            x, pos = renorm(x, pos, everyone)
            esc = sym == rans.ESCAPE
            hi = x & _MASK  # phases 1, 2: raw 12-bit halves of an escaped value (f = 1)
            x, pos = renorm(torch.where(esc, x >> rans.SCALE_BITS, x), pos, esc)
            lo = x & _MASK
            x, pos = renorm(torch.where(esc, x >> rans.SCALE_BITS, x), pos, esc)
            z = torch.where(esc, (hi << 12) | lo, sym)
            has = s > 0  # phase 3: s raw low bits with f = 2**(12-s)
            sh = rans.SCALE_BITS - s
            slot = x & _MASK
            low = torch.where(has, slot >> sh, 0)
            x, pos = renorm(torch.where(has, (x >> rans.SCALE_BITS << sh) + slot - (low << sh), x), pos, has)
            h = torch.where(z % 2 == 0, z // 2, -(z + 1) // 2)
            out[:, t, cols] = (h << s) + low
    if bool((pos != n_words).any()) or bool((x != rans.RANS_L).any()):
        raise CodecError("reference decoder: stream not fully consumed or bad final state")
    return out


def decode_reference(blob: bytes, device: str | torch.device = "cpu") -> torch.Tensor:
    """Decode a lossy blob with the torch reference path; same result as :func:`codec.decode`."""
    info = container.verify(blob)
    if info.codec_id != CODEC_RANS:
        raise CodecError("decode_reference handles lossy (rANS) blobs only")
    mv = memoryview(blob)
    params = mv[info.params_offset : info.params_offset + info.params_len]
    payload = np.frombuffer(mv[info.payload_offset : info.payload_offset + info.payload_len], dtype=np.uint8)
    n_layers, _, t, h, dim = info.shape
    w, delta, lengths, width, mu = lossy.parse_params(params, info.shape)
    if int(lengths.sum()) != len(payload) or (lengths < 4 * w).any() or ((lengths - 4 * w) % 2).any():
        raise CodecError("segment lengths do not match the payload")
    tid, sbits = rans.param_to_model(width)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    n_words = (lengths - 4 * w) // 2
    if (n_words > 4 * t * h * dim).any():  # at most 4 ops per value, one word each: bound the allocation
        raise CodecError("segment longer than any encoder writes")
    init = np.stack([payload[a : a + 4 * w].view("<u4") for a in starts]).astype(np.int64)
    words = np.zeros((len(starts), int(n_words.max())), dtype=np.int64)
    for i, a in enumerate(starts):
        words[i, : n_words[i]] = payload[a + 4 * w : a + lengths[i]].view("<u2")
    dev = torch.device(device)

    def tt(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(dev)

    d = decode_streams(tt(init), tt(words), tt(n_words), tt(tid), tt(sbits), t)
    q = (d + tt(mu)[:, None, :]).to(torch.float32)
    x = q * torch.from_numpy(delta).to(dev)[:, None, None]
    return x.reshape(n_layers, 2, t, h, dim).to(info.dtype)
