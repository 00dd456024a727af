"""Unit tests for the KV codec (codec/): round trips, error bounds, containers, real-model quality."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

import codec
from codec import lossy, rans
from codec.reference import decode_reference

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kv(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = shape[3] * shape[4]
    offset = torch.randn(shape[0], 2, 1, c, generator=g) * 2
    spread = torch.rand(shape[0], 2, 1, c, generator=g)
    x = offset + torch.randn(shape[0], 2, shape[2], c, generator=g) * spread
    return x.reshape(shape).to(dtype)


def _bound(kv: torch.Tensor, level: int) -> torch.Tensor:
    """Per-element error bound of a lossy level: half a step, plus the output dtype's rounding."""
    n_layers, _, t, h, d = kv.shape
    x = kv.float().reshape(n_layers, 2, t, h * d).numpy()
    delta = torch.from_numpy(lossy.step_sizes(x, level, kv.dtype)).reshape(n_layers, 2, 1, 1, 1)
    eps = torch.finfo(kv.dtype).eps
    return delta / 2 * (1 + 1e-5) + kv.float().abs() * eps + delta * eps


def test_public_constants() -> None:
    assert codec.LOSSLESS == 0
    assert codec.LEVELS == (0, 1, 2, 3, 4)
    assert codec.DEFAULT_LEVEL in codec.LEVELS and codec.DEFAULT_LEVEL != codec.LOSSLESS
    assert issubclass(codec.CodecError, ValueError)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lossless_bit_exact(dtype: torch.dtype) -> None:
    kv = _kv((2, 2, 33, 2, 8), dtype=dtype)
    kv[0, 0, 0, 0, :3] = torch.tensor([float("inf"), float("-inf"), float("nan")])
    blob = codec.encode(kv, codec.LOSSLESS)
    out = codec.decode(blob)
    assert out.dtype == dtype and out.shape == kv.shape
    assert torch.equal(out.contiguous().view(torch.uint8), kv.contiguous().view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", (1, 2, 3, 4))
def test_lossy_round_trip_and_bound(dtype: torch.dtype, level: int) -> None:
    kv = _kv((3, 2, 40, 2, 8), seed=level, dtype=dtype)
    blob = codec.encode(kv, level)
    out = codec.decode(blob)
    assert out.dtype == dtype and out.shape == kv.shape
    err = (out.float() - kv.float()).abs()
    assert bool((err <= _bound(kv, level)).all())
    info = codec.verify(blob)
    assert (info.level, info.dtype, info.shape, info.nbytes) == (level, dtype, tuple(kv.shape), len(blob))


@pytest.mark.parametrize("tokens", (1, 7, 255, 256, 300))
@pytest.mark.parametrize("head_dim", (8, 64, 128))
def test_shape_edge_cases(tokens: int, head_dim: int) -> None:
    kv = _kv((1, 2, tokens, 1, head_dim), seed=tokens + head_dim, dtype=torch.float16)
    for level in (codec.LOSSLESS, codec.DEFAULT_LEVEL, 4):
        out = codec.decode(codec.encode(kv, level))
        assert out.shape == kv.shape and out.dtype == kv.dtype
        if level == codec.LOSSLESS:
            assert torch.equal(out, kv)
        else:
            assert bool(((out.float() - kv.float()).abs() <= _bound(kv, level)).all())


def test_extreme_values_use_escapes() -> None:
    kv = _kv((2, 2, 20, 1, 8))
    kv[0, 0, 3, 0, 2] = 6.0e4  # far outside the channel model: escape path
    kv[1, 1, :, 0, 5] = 0.0  # a constant channel
    kv[1, 0] = 0.0  # an all-zero segment
    for level in (1, 4):
        blob = codec.encode(kv, level)
        out = codec.decode(blob)
        assert bool(((out - kv).abs() <= _bound(kv, level)).all())
        assert torch.equal(out, decode_reference(blob))


@pytest.mark.parametrize("dtype", DTYPES)
def test_values_near_the_dtype_maximum_stay_finite(dtype: torch.dtype) -> None:
    # A coarse step rounds the largest values up; past the dtype's maximum that used to decode to inf.
    top = torch.finfo(dtype).max
    kv = torch.zeros(1, 2, 4, 1, 2, dtype=torch.float32)
    kv[0, :, :, 0, 0] = torch.tensor([-0.3, 0.0, 0.3, 0.9]) * top
    kv = kv.to(dtype)
    for level in (1, 2, 3, 4):
        out = codec.decode(codec.encode(kv, level))
        assert bool(torch.isfinite(out).all()), level
        assert bool(((out.float() - kv.float()).abs() <= _bound(kv, level)).all()), level
    at_max = torch.full((1, 2, 4, 1, 2), top, dtype=dtype)
    if dtype == torch.float32:  # no room above the float32 maximum for the decoder's product: refused
        with pytest.raises(codec.CodecError, match="LOSSLESS"):
            codec.encode(at_max, 4)
    else:
        assert torch.equal(codec.decode(codec.encode(at_max, 4)), at_max)
    assert torch.equal(codec.decode(codec.encode(at_max, 0)), at_max)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", (1, 2, 3, 4))
def test_reference_decoder_matches(level: int, dtype: torch.dtype) -> None:
    kv = _kv((2, 2, 17, 2, 64), seed=7, dtype=dtype)
    blob = codec.encode(kv, level)
    assert torch.equal(decode_reference(blob), codec.decode(blob))


def _f32_bit_patterns() -> np.ndarray:
    """Random finite float32 bit patterns plus every pattern near the fp16 rounding boundaries."""
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    edges = [0x33000000, 0x38800000, 0x477FF000, 0x47800000]  # 2^-25, 2^-14, fp16 max region, 2^16
    near = np.concatenate([np.arange(e - 3000, e + 3000) for e in edges] + [np.arange(0, 3000)])
    bits = np.concatenate([bits, near.astype(np.uint32)])
    bits = np.concatenate([bits, bits | np.uint32(0x80000000)])
    return bits[np.isfinite(bits.view(np.float32))].reshape(1, -1)


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_narrow_and_widen_match_torch(dtype: torch.dtype) -> None:
    # The decoder rounds float32 to 16 bits itself; it must agree with torch's .to() bit for bit.
    bits = _f32_bit_patterns()
    got = np.empty(bits.shape, dtype=np.uint16)
    lossy._narrow(bits, dtype == torch.bfloat16, got)
    ref = torch.from_numpy(bits.view(np.float32)).to(dtype).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(got, ref)
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).reshape(1, -1)
    wide = np.empty(every.shape, dtype=np.uint32)
    lossy._widen(every, dtype == torch.bfloat16, lossy._F16_BITS, wide)
    ref32 = torch.from_numpy(every.view(np.int16)).view(dtype).float().numpy()
    nan = np.isnan(ref32)  # NaN payloads may differ (quieting); lossy levels reject non-finite input anyway
    assert np.array_equal(np.isnan(wide.view(np.float32)), nan)
    assert np.array_equal(wide[~nan], ref32.view(np.uint32)[~nan])


def test_width_byte_to_model_matches_spec() -> None:
    # docs/codec.md: e = P - 64; e >= 16: s = min(e//8 - 1, 12), table 80 + clamp(e - 8s - 8, 0, 7);
    # else s = 0, table e + 64 with e clipped to [-64, 15].
    p = np.arange(256)
    e = p - 64
    s = np.where(e >= 16, np.minimum(e // 8 - 1, 12), 0)
    tid = np.where(s > 0, 80 + np.clip(e - 8 * s - 8, 0, 7), np.clip(e, -64, 15) + 64)
    got_tid, got_s = rans.param_to_model(p.astype(np.uint8))
    assert np.array_equal(got_tid, tid) and np.array_equal(got_s, s)


def test_levels_shrink_and_inspect_is_cheap() -> None:
    kv = _kv((2, 2, 64, 2, 32), dtype=torch.float16)
    sizes = [len(codec.encode(kv, lv)) for lv in (1, 2, 3, 4)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] / 2
    blob = codec.encode(kv, 2)
    assert codec.inspect(blob[:-1] + b"\0").level == 2  # inspect does not checksum
    with pytest.raises(codec.CodecError):
        codec.verify(blob[:-1] + bytes([blob[-1] ^ 1]))


@pytest.mark.parametrize("level", [0, 1])
def test_any_contiguous_buffer_of_the_blob_decodes(level: int) -> None:
    kv = _kv((1, 2, 16, 2, 8), dtype=torch.float16)
    blob = codec.encode(kv, level)
    expected = codec.decode(blob)
    if len(blob) % 2:  # wide items need an even length: a trailing byte makes it another blob
        kv, blob = kv[:, :, :8], codec.encode(kv[:, :, :8], level)
        expected = codec.decode(blob)
    assert len(blob) % 2 == 0
    wide = next(t for t in (np.uint64, np.uint32, np.uint16) if len(blob) % np.dtype(t).itemsize == 0)
    views = [
        memoryview(blob).cast("B", shape=[1, len(blob)]),  # 2-D: slices count rows
        memoryview(np.frombuffer(blob, np.uint8).view(wide)),  # slices count 2-8 byte items
        bytearray(blob),
    ]
    padded = np.frombuffer(blob + blob, np.uint8)
    for view in views:
        assert codec.verify(view).nbytes == len(blob)
        assert torch.equal(codec.decode(view), expected)
    with pytest.raises(codec.CodecError, match="contiguous"):
        codec.decode(memoryview(padded)[::2])


def test_bad_inputs() -> None:
    good = _kv((1, 2, 4, 1, 8))
    with pytest.raises(codec.CodecError):
        codec.encode(good[0], 1)  # wrong rank
    with pytest.raises(codec.CodecError):
        codec.encode(torch.zeros(1, 3, 4, 1, 8), 1)  # axis 1 must be 2
    with pytest.raises(codec.CodecError):
        codec.encode(good.double(), 1)
    with pytest.raises(codec.CodecError):
        codec.encode(good.to(torch.int32), 0)
    with pytest.raises(codec.CodecError):
        codec.encode(good, 5)
    for level in (1.0, True, "1"):  # 1.0 == 1 and True == 1: not levels
        with pytest.raises(codec.CodecError, match="integer"):
            codec.encode(good, level)  # type: ignore[arg-type]
    assert codec.encode(good, np.int64(2)) == codec.encode(good, 2)
    with pytest.raises(codec.CodecError, match="dense"):
        codec.encode(good.to_sparse(), 0)
    with pytest.raises(codec.CodecError, match="dense"):
        codec.encode(torch.empty(1, 2, 4, 1, 8, device="meta"), 0)
    negated = torch._neg_view(good)  # a lazily negated view: its bits are those of good
    assert torch.equal(codec.decode(codec.encode(negated, 0)), -good)
    with pytest.raises(codec.CodecError):
        codec.encode(torch.zeros(1, 2, 0, 1, 8), 0)
    for dtype, value in (
        (torch.float32, float("nan")),
        (torch.float16, float("inf")),
        (torch.bfloat16, float("nan")),
    ):
        bad = good.clone().to(dtype)
        bad[0, 1, 2, 0, 3] = value
        with pytest.raises(codec.CodecError):
            codec.encode(bad, 1)
    with pytest.raises(codec.CodecError):
        codec.decode_context([])


def test_context_round_trip() -> None:
    kv = _kv((2, 2, 70, 2, 8), dtype=torch.float16)
    chunks = codec.encode_context(kv, chunk_tokens=32, levels=(0, 3))
    assert len(chunks) == 2 and all(set(c) == {0, 3} for c in chunks)
    full = codec.decode_context([c[0] for c in chunks])
    assert torch.equal(full, kv[:, :, :64])
    lossy_full = codec.decode_context([c[3] for c in chunks])
    assert lossy_full.shape == (2, 2, 64, 2, 8)
    with pytest.raises(codec.CodecError):
        codec.decode_context([chunks[0][0], codec.encode(_kv((1, 2, 4, 1, 8)), 0)])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("level", [0, 1, 4])
def test_decode_into_a_token_slice_of_a_context(dtype: torch.dtype, level: int) -> None:
    kv = _kv((3, 2, 40, 2, 8), seed=5, dtype=dtype)
    blob = codec.encode(kv[:, :, 16:32], level)
    ctx = torch.full((3, 2, 40, 2, 8), 7.0, dtype=dtype)
    got = codec.decode(blob, out=ctx[:, :, 16:32])
    assert got.data_ptr() == ctx[:, :, 16:32].data_ptr()
    assert torch.equal(ctx[:, :, 16:32], codec.decode(blob))  # bit-identical to a plain decode
    assert (ctx[:, :, :16] == 7).all() and (ctx[:, :, 32:] == 7).all()  # nothing outside the slice
    strided = torch.zeros(3, 2, 16, 8, 2, dtype=dtype).transpose(3, 4)  # blocks not contiguous: copied
    assert torch.equal(codec.decode(blob, out=strided), codec.decode(blob))
    for bad in (ctx[:, :, 16:31], ctx[:, :, 16:32].double(), torch.empty(3, 2, 16, 2, 8, dtype=torch.int16)):
        with pytest.raises(codec.CodecError, match="out is"):
            codec.decode(blob, out=bad)
    # Outputs whose elements share memory: each [layer, kv] block would overwrite the one before.
    expanded = torch.zeros(1, 1, 16, 2, 8, dtype=dtype).expand(3, 2, 16, 2, 8)
    overlapping = torch.zeros(4096, dtype=dtype).as_strided((3, 2, 16, 2, 8), (256, 128, 16, 8, 1))
    for bad in (expanded, overlapping):
        with pytest.raises(codec.CodecError, match="share memory"):
            codec.decode(blob, out=bad)


def test_model_tables_are_pinned() -> None:
    # The tables are part of the bitstream format: any change (numpy/libm drift) must fail loudly.
    digest = hashlib.sha256(rans.FREQ.astype("<u4").tobytes()).hexdigest()[:16]
    assert digest == PINNED_TABLES
    assert (rans.FREQ.sum(axis=1) == rans.PROB_SCALE).all() and (rans.FREQ >= 1).all()


PINNED_TABLES = "de531a2182be0f7a"


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    from client.model import Llama2c

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: thread fan-out only adds contention
    yield Llama2c.from_file()
    torch.set_num_threads(threads)


def test_real_model_default_level(model) -> None:  # type: ignore[no-untyped-def]
    p = 80
    agree, kls = 0, []
    for seed in range(4):
        ids = model.sample(97, seed)
        r = model.forward(ids[:96])
        kv, logits = r.kv, r.logits
        prefix = kv[:, :, :p].half()
        blob = codec.encode(prefix, codec.DEFAULT_LEVEL)
        dec = codec.decode(blob)
        assert bool(((dec.float() - prefix.float()).abs() <= _bound(prefix, codec.DEFAULT_LEVEL)).all())
        assert len(blob) < prefix.numel() * 2 / 2  # at least 2x smaller than fp16
        out = model.forward(ids[p:96], past_kv=dec)
        ref = torch.log_softmax(logits[p:96], -1)
        got = torch.log_softmax(out.logits, -1)
        kls.append(float((ref.exp() * (ref - got)).sum(-1).mean()))
        agree += int(ref[-1].argmax() == got[-1].argmax())
    assert agree >= 3
    assert float(np.mean(kls)) < 0.02


def test_width_refinement_never_costs_bits() -> None:
    # Encoder-side table choice for s == 0 channels: never more coded bits than the mean-|d| fit,
    # channels with raw low bits untouched, and the stream still decodes to the same residuals.
    rng = np.random.default_rng(5)
    t, c = 64, 32
    scale = np.concatenate([rng.uniform(0.05, 3.0, c // 2), rng.uniform(20, 200, c // 2)])
    d = np.rint(rng.laplace(size=(t, c)) * rng.uniform(0.5, 1.5, (t, c)) * scale).astype(np.int32)
    width0 = np.array([rans.width_of(float(b)) for b in np.abs(d).mean(axis=0)], dtype=np.uint8)
    tid0, s0 = rans.param_to_model(width0)
    width, tid, sbits = width0.copy(), tid0.copy(), s0.copy()
    lossy._refine_narrow_models(d, width, tid, sbits)

    def bits(col: np.ndarray, k: int) -> float:
        z = np.minimum(np.where(col >= 0, 2 * col, -2 * col - 1), rans.ESCAPE)
        return float(rans.COST_BITS[k, z].sum())

    narrow = s0 == 0
    assert narrow.any() and (~narrow).any()
    assert np.array_equal(width[~narrow], width0[~narrow]) and np.array_equal(tid[~narrow], tid0[~narrow])
    assert np.array_equal(rans.param_to_model(width)[0], tid) and (width[narrow] < rans.N_DIRECT).all()
    for ch in np.nonzero(narrow)[0]:
        assert bits(d[:, ch].astype(np.int64), int(tid[ch])) <= bits(d[:, ch].astype(np.int64), int(tid0[ch]))
    w = lossy.lanes_for(c)
    buf = np.empty(4 * t * c + 1, dtype=np.uint16)
    n, states = rans.encode_segment(d, tid, sbits, w, rans.FREQ, rans.CUM, buf)
    words = np.concatenate([states.view(np.uint16), buf[n - 1 :: -1], np.zeros(4 * w, dtype=np.uint16)])
    out = np.empty((t, c), dtype=np.float32)
    rc = rans.decode_segment(
        words, 0, n, w, tid, sbits, t, rans.DEC, np.zeros(c, dtype=np.int64), np.float32(1.0), out
    )
    assert rc == 0 and np.array_equal(out, d.astype(np.float32))
