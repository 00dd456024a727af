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
    delta = torch.from_numpy(lossy.step_sizes(x, level)).reshape(n_layers, 2, 1, 1, 1)
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


@pytest.mark.parametrize("level", (1, 2, 3, 4))
def test_reference_decoder_matches(level: int) -> None:
    kv = _kv((2, 2, 17, 2, 64), seed=7, dtype=torch.bfloat16)
    blob = codec.encode(kv, level)
    assert torch.equal(decode_reference(blob), codec.decode(blob))


def test_levels_shrink_and_inspect_is_cheap() -> None:
    kv = _kv((2, 2, 64, 2, 32), dtype=torch.float16)
    sizes = [len(codec.encode(kv, lv)) for lv in (1, 2, 3, 4)]
    assert sizes == sorted(sizes, reverse=True) and sizes[-1] < sizes[0] / 2
    blob = codec.encode(kv, 2)
    assert codec.inspect(blob[:-1] + b"\0").level == 2  # inspect does not checksum
    with pytest.raises(codec.CodecError):
        codec.verify(blob[:-1] + bytes([blob[-1] ^ 1]))


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
    with pytest.raises(codec.CodecError):
        codec.encode(torch.zeros(1, 2, 0, 1, 8), 0)
    bad = good.clone()
    bad[0, 0, 0, 0, 0] = float("nan")
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
