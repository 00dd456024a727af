"""Fuzzing of the blob container and the lossy bitstream: every corruption must raise CodecError."""

from __future__ import annotations

import struct

import pytest
import torch
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codec
from codec import container

FUZZ = settings(max_examples=150, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def _blobs() -> dict[int, bytes]:
    g = torch.Generator().manual_seed(3)
    kv = (torch.randn(2, 2, 9, 2, 8, generator=g) * 3).half()
    return {lv: codec.encode(kv, lv) for lv in codec.LEVELS}


BLOBS = _blobs()


def _reseal(body: bytes) -> bytes:
    """Recompute the trailing checksum so corruption reaches the deeper parsers."""
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def _decode_or_codec_error(blob: bytes, expect_error: bool) -> None:
    try:
        out = codec.decode(blob)
    except codec.CodecError:
        return
    assert not expect_error, "corrupt blob decoded without error"
    info = codec.inspect(blob)
    assert tuple(out.shape) == info.shape and out.dtype == info.dtype


@pytest.mark.parametrize("level", codec.LEVELS)
def test_every_truncation_fails(level: int) -> None:
    blob = BLOBS[level]
    for n in range(len(blob)):
        with pytest.raises(codec.CodecError):
            codec.decode(blob[:n])
    with pytest.raises(codec.CodecError):
        codec.decode(blob + b"\0")


@FUZZ
@given(level=st.sampled_from(codec.LEVELS), data=st.data())
def test_bit_flips_fail_checksum(level: int, data: st.DataObject) -> None:
    blob = bytearray(BLOBS[level])
    pos = data.draw(st.integers(0, len(blob) * 8 - 1))
    blob[pos // 8] ^= 1 << (pos % 8)
    with pytest.raises(codec.CodecError):
        codec.decode(bytes(blob))
    with pytest.raises(codec.CodecError):
        codec.verify(bytes(blob))


@FUZZ
@given(level=st.sampled_from(codec.LEVELS), data=st.data())
def test_resealed_corruption_never_crashes(level: int, data: st.DataObject) -> None:
    # With a forged checksum only the structural checks stand guard: CodecError or a well-formed tensor.
    blob = bytearray(BLOBS[level][:-8])
    start = container.header_size()
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(start, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    _decode_or_codec_error(_reseal(bytes(blob)), expect_error=False)


@FUZZ
@given(raw=st.binary(max_size=200))
def test_random_bytes(raw: bytes) -> None:
    for candidate in (raw, container.MAGIC + raw, _reseal(container.MAGIC + bytes([1]) + raw)):
        with pytest.raises(codec.CodecError):
            codec.decode(candidate)


FIELDS = {  # name -> (struct format, offset) inside the fixed header
    "version": ("<B", 4),
    "codec": ("<B", 5),
    "level": ("<B", 6),
    "dtype": ("<B", 7),
    "ndim": ("<B", 8),
    "reserved": ("<B", 9),
    "layers": ("<I", 12),
    "kv": ("<I", 16),
    "tokens": ("<I", 20),
    "heads": ("<I", 24),
    "head_dim": ("<I", 28),
    "params_len": ("<I", 32),
    "payload_len": ("<Q", 36),
}


@FUZZ
@given(level=st.sampled_from(codec.LEVELS), field=st.sampled_from(sorted(FIELDS)), data=st.data())
def test_extreme_header_fields(level: int, field: str, data: st.DataObject) -> None:
    fmt, off = FIELDS[field]
    top = 2 ** (8 * struct.calcsize(fmt)) - 1
    candidates = [v for v in (0, 1, 2, 3, 5, 255, top, top - 1, 2**31, 2**24 + 1) if v <= top]
    value = data.draw(st.sampled_from(candidates))
    blob = bytearray(BLOBS[level][:-8])
    if struct.unpack_from(fmt, blob, off)[0] == value:
        return
    struct.pack_into(fmt, blob, off, value)
    sealed = _reseal(bytes(blob))
    # Benign edits (a forged checksum makes them undetectable): a level swap inside the lossy family,
    # or a dtype relabel that keeps the payload's meaning (any dtype for lossy, same width for lossless).
    benign = (field == "level" and level != 0 and value in container.LOSSY_LEVELS) or (
        field == "dtype" and value in container.CODE_DTYPES and (level != 0 or value in (1, 2))
    )
    _decode_or_codec_error(sealed, expect_error=not benign)


def _edit_lossy(blob: bytes, edit_params: object = None, edit_payload: object = None) -> bytes:
    """``blob`` with its parameter section / payload replaced by ``edit_*(bytearray)``, header and
    checksum made consistent (a forged blob only the structural checks can catch)."""
    info = codec.inspect(blob)
    params = bytearray(blob[info.params_offset : info.params_offset + info.params_len])
    payload = bytearray(blob[info.payload_offset : info.payload_offset + info.payload_len])
    params = edit_params(params) if callable(edit_params) else params
    payload = edit_payload(payload) if callable(edit_payload) else payload
    head = bytearray(blob[: info.params_offset])
    struct.pack_into("<IQ", head, 32, len(params), len(payload))
    return _reseal(bytes(head) + bytes(params) + bytes(payload))


def test_a_foreign_lane_count_is_rejected_by_every_decoder(monkeypatch: pytest.MonkeyPatch) -> None:
    # The format fixes W (the largest divisor of C up to 32; GPU decoders keep lanes in a 32-bit mask):
    # a well-formed stream written with 64 lanes must not decode on the CPU and fail elsewhere.
    from codec import lossy
    from codec.reference import decode_reference

    kv = torch.randn(1, 2, 3, 1, 64, generator=torch.Generator().manual_seed(1)).half()
    with monkeypatch.context() as m:
        m.setattr(lossy, "lanes_for", lambda c: c)
        wide = codec.encode(kv, 2)
    for decode in (codec.decode, decode_reference):
        with pytest.raises(codec.CodecError, match="lane count"):
            decode(wide)


def test_the_reference_decoder_bounds_a_segment_before_allocating_for_it() -> None:
    from codec.reference import decode_reference

    blob = BLOBS[2]
    info = codec.inspect(blob)
    s = 2 * info.shape[0]
    first = struct.unpack_from("<I", blob, info.params_offset + 4 + 4 * s)[0]  # segment 0's bytes

    def longer(params: bytearray) -> bytearray:  # segment 0 claims 2**20 more words
        struct.pack_into("<I", params, 4 + 4 * s, first + (2 << 20))
        return params

    forged = _edit_lossy(blob, longer, lambda p: p[:first] + bytearray(2 << 20) + p[first:])
    with pytest.raises(codec.CodecError):
        codec.decode(forged)
    with pytest.raises(codec.CodecError, match="longer than any encoder writes"):
        decode_reference(forged)


def test_lossless_payload_is_exactly_one_frame() -> None:
    forged = _edit_lossy(BLOBS[0], edit_payload=lambda p: p + bytearray(b"trailing junk"))
    with pytest.raises(codec.CodecError, match="unused data"):
        codec.decode(forged)
