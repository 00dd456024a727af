"""Self-describing, checksummed container for one encoded KV chunk.

All integers are little-endian. Byte layout of format version 1 (``ndim`` = 5 for every blob this
codec writes, so the fixed header is 44 bytes):

====================  ======  ==========================================================
offset                size    field
====================  ======  ==========================================================
0                     4       magic ``b"KVCG"``
4                     1       format version, uint8 (= 1)
5                     1       codec id, uint8 (0 = zstd lossless, 1 = rANS lossy)
6                     1       level, uint8 (0 for codec 0; 1..4 for codec 1)
7                     1       dtype code, uint8 (1 = float16, 2 = bfloat16, 3 = float32)
8                     1       ndim, uint8 (must be 5)
9                     3       reserved, must be zero
12                    4*ndim  shape, uint32 each: ``[layers, 2, tokens, kv_heads, head_dim]``
12+4*ndim             4       params_len, uint32: length of the codec-parameter section
16+4*ndim             8       payload_len, uint64: length of the payload section
24+4*ndim             P       codec parameters (``params_len`` bytes; layout owned by the codec)
24+4*ndim+P           N       payload (``payload_len`` bytes; layout owned by the codec)
24+4*ndim+P+N         8       xxh3_64 (seed 0) of every preceding byte, uint64
====================  ======  ==========================================================

``len(blob)`` must equal ``32 + 4*ndim + params_len + payload_len`` exactly. Any violation raises
:class:`CodecError`; nothing here allocates more than the blob itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import torch
import xxhash

MAGIC = b"KVCG"
FORMAT_VERSION = 1
CODEC_ZSTD = 0
CODEC_RANS = 1
LOSSY_LEVELS = (1, 2, 3, 4)
NDIM = 5
# Caps that keep a forged header from asking the decoder for an absurd allocation (2^30 elements is
# 4 GiB as fp32; a 256-token chunk of a 70B model has 4.2e7 elements).
MAX_DIM = 1 << 24
MAX_ELEMENTS = 1 << 30

_PREFIX = struct.Struct("<4sBBBBB3s")  # magic, version, codec, level, dtype, ndim, reserved
_LENGTHS = struct.Struct("<IQ")  # params_len, payload_len
_CHECKSUM = struct.Struct("<Q")

DTYPE_CODES: dict[torch.dtype, int] = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3}
CODE_DTYPES: dict[int, torch.dtype] = {v: k for k, v in DTYPE_CODES.items()}


class CodecError(ValueError):
    """A blob is malformed, truncated or corrupt, or an encoder input is invalid."""


@dataclass(frozen=True)
class BlobInfo:
    """Header fields of a blob. ``nbytes`` is ``len(blob)``; ``shape`` is the decoded tensor's shape."""

    codec_id: int
    level: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    params_offset: int
    params_len: int
    payload_offset: int
    payload_len: int


def header_size(ndim: int = NDIM) -> int:
    """Bytes before the parameter section."""
    return _PREFIX.size + 4 * ndim + _LENGTHS.size


def pack(codec_id: int, level: int, dtype: torch.dtype, shape: tuple[int, ...], params: bytes,
         payload: bytes) -> bytes:
    """Assemble a blob (header, ``params``, ``payload``, checksum)."""
    head = _PREFIX.pack(MAGIC, FORMAT_VERSION, codec_id, level, DTYPE_CODES[dtype], len(shape), b"\0\0\0")
    head += struct.pack(f"<{len(shape)}I", *shape) + _LENGTHS.pack(len(params), len(payload))
    h = xxhash.xxh3_64()
    for part in (head, params, payload):
        h.update(part)
    return b"".join((head, params, payload, _CHECKSUM.pack(h.intdigest())))


def byte_view(blob: bytes | bytearray | memoryview) -> memoryview:
    """``blob`` as a flat memoryview of bytes: slices of a view with wider items count items, not bytes."""
    mv = memoryview(blob)
    if not mv.c_contiguous:
        raise CodecError("blob must be a contiguous buffer")
    return mv.cast("B") if mv.format != "B" or mv.ndim != 1 else mv


def inspect(blob: bytes | bytearray | memoryview) -> BlobInfo:
    """Parse and sanity-check the header of ``blob`` without touching the payload or the checksum."""
    mv = byte_view(blob)
    n = mv.nbytes
    if n < _PREFIX.size:
        raise CodecError(f"blob too short for a header: {n} bytes")
    magic, version, codec_id, level, dcode, ndim, reserved = _PREFIX.unpack_from(mv, 0)
    if magic != MAGIC:
        raise CodecError(f"bad magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise CodecError(f"unsupported format version {version} (this build reads {FORMAT_VERSION})")
    if codec_id == CODEC_ZSTD:
        if level != 0:
            raise CodecError(f"lossless codec with level {level}, expected 0")
    elif codec_id == CODEC_RANS:
        if level not in LOSSY_LEVELS:
            raise CodecError(f"lossy codec with unknown level {level}")
    else:
        raise CodecError(f"unknown codec id {codec_id}")
    if dcode not in CODE_DTYPES:
        raise CodecError(f"unknown dtype code {dcode}")
    if ndim != NDIM:
        raise CodecError(f"ndim {ndim}, expected {NDIM}")
    if reserved != b"\0\0\0":
        raise CodecError("reserved header bytes are not zero")
    hsize = header_size(ndim)
    if n < hsize + _CHECKSUM.size:
        raise CodecError(f"blob truncated: {n} bytes, header alone needs {hsize + _CHECKSUM.size}")
    shape = struct.unpack_from(f"<{ndim}I", mv, _PREFIX.size)
    numel = 1
    for d in shape:
        if not 1 <= d <= MAX_DIM:
            raise CodecError(f"shape {shape} has a dimension outside [1, {MAX_DIM}]")
        numel *= d
    if shape[1] != 2:
        raise CodecError(f"shape {shape}: axis 1 must be 2 (keys, values)")
    if numel > MAX_ELEMENTS:
        raise CodecError(f"shape {shape} has {numel} elements, above the cap {MAX_ELEMENTS}")
    params_len, payload_len = _LENGTHS.unpack_from(mv, _PREFIX.size + 4 * ndim)
    expected = hsize + params_len + payload_len + _CHECKSUM.size
    if expected != n:
        raise CodecError(f"length mismatch: header says {expected} bytes, blob has {n}")
    return BlobInfo(
        codec_id=codec_id,
        level=level,
        dtype=CODE_DTYPES[dcode],
        shape=tuple(shape),
        nbytes=n,
        params_offset=hsize,
        params_len=params_len,
        payload_offset=hsize + params_len,
        payload_len=payload_len,
    )


def verify(blob: bytes | bytearray | memoryview) -> BlobInfo:
    """:func:`inspect` plus verification of the xxh3_64 checksum over the whole blob."""
    info = inspect(blob)
    mv = byte_view(blob)
    body = mv[: info.nbytes - _CHECKSUM.size]
    (stored,) = _CHECKSUM.unpack_from(mv, info.nbytes - _CHECKSUM.size)
    if xxhash.xxh3_64_intdigest(body) != stored:
        raise CodecError("checksum mismatch: blob is corrupt")
    return info
