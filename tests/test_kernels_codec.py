"""codec-decode kernel: the Triton decoder (interpreter, CPU tensors) must equal ``codec.decode`` bit for bit.

``TRITON_INTERPRET=1`` is set by a module fixture before ``kernels.codec_decode_triton`` is first imported.
Chunks stay tiny: the interpreter pays ~10 ms per decode step (one step = one token x one round of lanes).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
import xxhash

import codec
from codec import container
from codec.reference import decode_reference
from kernels import codec_decode as twin
from kernels import ops

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@pytest.fixture(scope="module", autouse=True)
def _interpret() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


@pytest.fixture
def tri() -> ModuleType:
    pytest.importorskip("triton")
    return importlib.import_module("kernels.codec_decode_triton")


def _kv(shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Channels with their own offset and spread (like real KV), ``shape`` ``[L, 2, T, H, D]``."""
    g = torch.Generator().manual_seed(seed)
    c = shape[3] * shape[4]
    offset = torch.randn(shape[0], 2, 1, c, generator=g) * 2
    spread = torch.rand(shape[0], 2, 1, c, generator=g) + 0.05
    x = offset + torch.randn(shape[0], 2, shape[2], c, generator=g) * spread
    return x.reshape(shape).to(dtype)


def _check(tri: ModuleType, kv: torch.Tensor, level: int, segments_per_program: int | None = None) -> None:
    blob = codec.encode(kv, level)
    plan = tri.prepare(blob, "cpu")
    out = tri.launch(plan, torch.empty(kv.shape, dtype=kv.dtype), segments_per_program)
    ref = codec.decode(blob)
    assert out.dtype == kv.dtype and out.shape == kv.shape
    assert torch.equal(out, ref), f"max diff {(out.float() - ref.float()).abs().max()}"


def _reseal(blob: bytes) -> bytes:
    """Recompute the checksum of a tampered blob (a forged checksum: only structural checks remain)."""
    body = blob[:-8]
    return body + xxhash.xxh3_64_intdigest(body).to_bytes(8, "little")


@pytest.mark.parametrize("level", (1, 2, 3, 4))
def test_every_lossy_level_bit_exact(tri: ModuleType, level: int) -> None:
    kv = _kv((2, 2, 5, 2, 8), seed=level, dtype=torch.float16)
    _check(tri, kv, level)
    if level == 1:  # fine steps give wide residuals: the raw low-bit phase must have been exercised
        plan = tri.prepare(codec.encode(kv, level), "cpu")
        assert int((plan.meta >> 8).max()) > 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_bit_exact(tri: ModuleType, dtype: torch.dtype) -> None:
    _check(tri, _kv((2, 2, 3, 1, 64), seed=11, dtype=dtype), codec.DEFAULT_LEVEL)


@pytest.mark.parametrize("tokens", (1, 7, 255))
def test_odd_token_counts(tri: ModuleType, tokens: int) -> None:
    _check(tri, _kv((1, 2, tokens, 1, 8), seed=tokens, dtype=torch.bfloat16), 2)


@pytest.mark.parametrize("head_dim", (8, 64, 128))
def test_head_dims(tri: ModuleType, head_dim: int) -> None:
    _check(tri, _kv((1, 2, 2, 2, head_dim), seed=head_dim, dtype=torch.float16), codec.DEFAULT_LEVEL)


@pytest.mark.parametrize(("kv_heads", "head_dim"), [(3, 8), (1, 5)])
def test_lane_counts_below_a_power_of_two(tri: ModuleType, kv_heads: int, head_dim: int) -> None:
    # C = 24 -> W = 24 lanes in a 32-wide tile; C = 5 -> W = 5 (and head_dim 5 for the channel split)
    _check(tri, _kv((1, 2, 4, kv_heads, head_dim), seed=5, dtype=torch.float32), 1)


@pytest.mark.parametrize("segments_per_program", (1, 2, 8))
def test_segment_tilings_agree(tri: ModuleType, segments_per_program: int) -> None:
    # 6 segments: 1 = the GPU default (one warp per segment), 2 and 8 tile several (8 with masked rows)
    _check(tri, _kv((3, 2, 3, 1, 16), seed=9, dtype=torch.bfloat16), 3, segments_per_program)


def test_escapes_and_extreme_values(tri: ModuleType) -> None:
    kv = _kv((2, 2, 24, 1, 8), seed=4)
    kv[0, 0, 3, 0, 2] = 6.0e4  # one spike in a narrow channel: far outside its model, escape path
    kv[0, 1, 9, 0, 5] = -3.0e3
    kv[1, 1, :, 0, 5] = 0.0  # a constant channel
    kv[1, 0] = 0.0  # an all-zero segment
    for level in (1, 4):
        _check(tri, kv, level)


def test_matches_the_lane_parallel_reference(tri: ModuleType) -> None:
    blob = codec.encode(_kv((2, 2, 4, 2, 16), seed=2, dtype=torch.bfloat16), 2)
    assert torch.equal(tri.codec_decode(blob, "cpu"), decode_reference(blob))


@pytest.fixture(scope="module")
def real_kv(model_path: object) -> torch.Tensor:
    """stories260K KV ``[5, 2, 24, 4, 8]`` float32 of a sampled story."""
    from client.model import Llama2c

    model = Llama2c.from_file()
    return model.forward(model.sample(24, seed=5)).kv


@pytest.mark.parametrize(("dtype", "level"), [(torch.float16, codec.DEFAULT_LEVEL), (torch.float32, 3)])
def test_real_stories260k_kv(
    tri: ModuleType, monkeypatch: pytest.MonkeyPatch, real_kv: torch.Tensor, dtype: torch.dtype, level: int
) -> None:
    monkeypatch.setenv("KVSTREAM_KERNELS", "triton")
    kv = real_kv.to(dtype)
    blob = codec.encode(kv, level)
    out = ops.codec_decode(blob, "cpu")
    assert torch.equal(out, codec.decode(blob))
    delta = max(float(d) for d in tri.prepare(blob, "cpu").delta)
    assert float((out.float() - kv.float()).abs().max()) <= delta  # sanity: it is the same KV


@pytest.mark.parametrize("backend", ("triton", "torch"))
def test_out_slice_of_a_token_major_cache(
    tri: ModuleType, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    monkeypatch.setenv("KVSTREAM_KERNELS", backend)
    kv = _kv((2, 2, 6, 2, 8), seed=3, dtype=torch.float16)
    blob = codec.encode(kv, 1)
    # a preallocated whole-context cache stored token-major, viewed as [L, 2, T, H, D]: odd strides
    cache = torch.full((20, 2, 2, 2, 8), float("nan"), dtype=torch.float16).permute(1, 2, 0, 3, 4)
    res = ops.codec_decode(blob, "cpu", out=cache[:, :, 7:13])
    assert res.data_ptr() == cache[:, :, 7:13].data_ptr()
    assert torch.equal(cache[:, :, 7:13], codec.decode(blob))
    assert bool(cache[:, :, :7].isnan().all()) and bool(cache[:, :, 13:].isnan().all())


def test_out_must_match_the_blob(tri: ModuleType) -> None:
    blob = codec.encode(_kv((1, 2, 3, 1, 8)), 1)
    with pytest.raises(ValueError, match="decodes to"):
        tri.codec_decode(blob, "cpu", out=torch.empty(1, 2, 3, 1, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="decodes to"):
        twin.codec_decode(blob, "cpu", out=torch.empty(1, 2, 4, 1, 8))
    expanded = torch.empty(1, 1, 3, 1, 8).expand(1, 2, 3, 1, 8)  # both blocks in the same memory
    for decoder in (tri, twin):
        with pytest.raises(ValueError, match="share memory"):
            decoder.codec_decode(blob, "cpu", out=expanded)


def test_corrupt_blob_raises_before_any_launch(tri: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KVSTREAM_KERNELS", "triton")

    def no_launch(*args: object, **kwargs: object) -> torch.Tensor:
        raise AssertionError("kernel launched for a corrupt blob")

    monkeypatch.setattr(tri, "launch", no_launch)
    blob = bytearray(codec.encode(_kv((1, 2, 4, 1, 8)), 1))
    info = codec.inspect(bytes(blob))
    out = torch.zeros(info.shape)
    for pos in (info.payload_offset + 5, info.params_offset + 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(codec.CodecError):
            ops.codec_decode(bytes(bad), "cpu", out=out)
    with pytest.raises(codec.CodecError):
        ops.codec_decode(bytes(blob[:-3]), "cpu", out=out)
    assert not bool(out.any())


def test_forged_checksum_stream_damage_is_caught(tri: ModuleType) -> None:
    blob = codec.encode(_kv((2, 2, 5, 1, 16), seed=8), 1)
    info = codec.inspect(blob)
    caught = 0
    for rel in (0, 1, 3, 70, 131, info.payload_len // 2, info.payload_len - 2):
        bad = bytearray(blob)
        bad[info.payload_offset + rel] ^= 0x21
        forged = _reseal(bytes(bad))
        try:
            ref = codec.decode(forged)
        except codec.CodecError:
            with pytest.raises(codec.CodecError):
                tri.codec_decode(forged, "cpu")
            caught += 1
        else:  # a damaged stream that still decodes cleanly must decode identically
            assert torch.equal(tri.codec_decode(forged, "cpu"), ref)
    assert caught >= 5


def test_initial_state_below_range_is_caught(tri: ModuleType) -> None:
    blob = bytearray(codec.encode(_kv((1, 2, 3, 1, 8), seed=1), 2))
    off = codec.inspect(bytes(blob)).payload_offset
    blob[off : off + 4] = (0x1234).to_bytes(4, "little")  # lane 0 of segment 0: x < 2^16
    with pytest.raises(codec.CodecError):
        tri.codec_decode(_reseal(bytes(blob)), "cpu")


def test_lossless_blobs_take_the_cpu_path(tri: ModuleType) -> None:
    kv = _kv((1, 2, 5, 2, 8), dtype=torch.bfloat16)
    kv[0, 0, 0, 0, 0] = float("inf")
    blob = codec.encode(kv, codec.LOSSLESS)
    assert container.inspect(blob).codec_id == container.CODEC_ZSTD
    out = torch.empty_like(kv)
    assert tri.codec_decode(blob, "cpu", out=out) is out
    assert torch.equal(out, kv)


def test_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    blob = codec.encode(_kv((1, 2, 3, 1, 8)), 1)
    calls: list[str] = []
    real = twin.codec_decode

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        calls.append("twin")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(twin, "codec_decode", spy)
    for mode in ("auto", "torch"):  # CPU target: the twin either way
        monkeypatch.setenv("KVSTREAM_KERNELS", mode)
        assert torch.equal(ops.codec_decode(blob, "cpu"), codec.decode(blob))
    assert calls == ["twin", "twin"]
    monkeypatch.setenv("KVSTREAM_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        ops.codec_decode(blob, "cpu")
