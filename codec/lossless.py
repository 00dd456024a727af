"""Lossless level: byte-plane shuffle then zstd, bit-exact for every supported dtype.

Payload = one zstd frame (with its content size set) of the tensor's bytes regrouped by byte
position: for an element size of ``s`` bytes, all byte-0s of the row-major tensor, then all
byte-1s, ... This puts the low-entropy exponent/sign bytes together, which zstd compresses far better
than interleaved fp16 bytes. The parameter section is empty.
"""

from __future__ import annotations

import numpy as np
import torch
import zstandard

from codec.container import CodecError

ZSTD_LEVEL = 3


def _as_bytes(kv: torch.Tensor) -> np.ndarray:
    """Raw bytes of a contiguous CPU tensor as uint8 ``[numel, itemsize]``."""
    t = kv.detach().to("cpu").contiguous()
    return t.view(torch.uint8).numpy().reshape(-1, t.element_size())


def encode(kv: torch.Tensor) -> bytes:
    """Compress ``kv`` (any shape, fp16/bf16/fp32) into a zstd payload."""
    planes = np.ascontiguousarray(_as_bytes(kv).T)
    return zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_content_size=True).compress(planes.tobytes())


def decode(payload: memoryview, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`encode`; raises :class:`CodecError` unless exactly the expected bytes come out."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = int(np.prod(shape))
    want = numel * itemsize
    try:
        params = zstandard.get_frame_parameters(payload)
    except zstandard.ZstdError as e:
        raise CodecError(f"lossless payload is not a zstd frame: {e}") from e
    if params.content_size != want:
        raise CodecError(f"lossless payload declares {params.content_size} bytes, shape needs {want}")
    try:
        # allow_extra_data=False: the payload is exactly one frame, nothing may follow it
        raw = zstandard.ZstdDecompressor().decompress(payload, max_output_size=want, allow_extra_data=False)
    except zstandard.ZstdError as e:
        raise CodecError(f"lossless payload is corrupt: {e}") from e
    if len(raw) != want:
        raise CodecError(f"lossless payload gave {len(raw)} bytes, expected {want}")
    planes = np.frombuffer(raw, dtype=np.uint8).reshape(itemsize, numel)
    flat = np.ascontiguousarray(planes.T).reshape(-1)
    return torch.from_numpy(flat).view(dtype).reshape(shape)
