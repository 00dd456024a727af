"""Public encode/decode entry points: dispatch on level, validate inputs, wrap in the container."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from codec import container, lossless, lossy
from codec.container import CODEC_RANS, CODEC_ZSTD, CodecError

LOSSLESS: int = 0
LEVELS: tuple[int, ...] = (LOSSLESS, *container.LOSSY_LEVELS)
DEFAULT_LEVEL: int = lossy.DEFAULT_LEVEL


def _check_input(kv: torch.Tensor) -> None:
    if not isinstance(kv, torch.Tensor):
        raise CodecError(f"expected a torch.Tensor, got {type(kv).__name__}")
    if kv.dim() != container.NDIM or kv.shape[1] != 2:
        raise CodecError(f"expected kv [layers, 2, tokens, kv_heads, head_dim], got shape {tuple(kv.shape)}")
    if kv.layout != torch.strided or kv.is_meta:
        raise CodecError(f"expected a dense tensor with data, got layout {kv.layout} on {kv.device}")
    if kv.dtype not in container.DTYPE_CODES:
        raise CodecError(f"unsupported dtype {kv.dtype}; use float16, bfloat16 or float32")
    if any(not 1 <= d <= container.MAX_DIM for d in kv.shape) or kv.numel() > container.MAX_ELEMENTS:
        raise CodecError(f"shape {tuple(kv.shape)} is empty or above the size caps")


def encode(kv: torch.Tensor, level: int) -> bytes:
    """Encode one chunk ``kv`` ``[layers, 2, tokens, kv_heads, head_dim]`` (fp16/bf16/fp32, any device).

    ``level`` 0 is bit-exact (zstd); 1..4 are lossy, 1 = best quality ... 4 = smallest. The result is a
    self-contained blob; its size is ``len(blob)``.
    """
    _check_input(kv)
    if isinstance(level, bool) or not hasattr(level, "__index__"):  # 1.0 == 1 would pass the checks below
        raise CodecError(f"level must be an integer, got {type(level).__name__}")
    level = operator.index(level)
    kv = kv.resolve_neg()  # a lazily negated view cannot be reinterpreted as bits
    if level == LOSSLESS:
        return container.pack(CODEC_ZSTD, 0, kv.dtype, tuple(kv.shape), b"", lossless.encode(kv))
    if level in container.LOSSY_LEVELS:
        params, payload = lossy.encode(kv, level)
        return container.pack(CODEC_RANS, level, kv.dtype, tuple(kv.shape), params, payload)
    raise CodecError(f"unknown level {level!r}; levels are {LEVELS}")


def has_internal_overlap(out: torch.Tensor) -> bool:
    """Whether ``out`` may have elements that share memory (``expand()``, some ``as_strided`` views).

    Sufficient test for no overlap: taken by increasing stride, each dimension steps past everything the
    smaller ones span. Every slice, transpose or permutation of a tensor passes it.
    """
    extent = 1
    for stride, size in sorted((out.stride(i), out.shape[i]) for i in range(out.dim()) if out.shape[i] > 1):
        if stride < extent:
            return True
        extent = stride * (size - 1) + extent
    return False


def decode(
    blob: bytes | bytearray | memoryview, device: str | torch.device = "cpu", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode a blob into a tensor with the shape and dtype it was encoded from, on ``device``.

    ``out``: a CPU tensor of the blob's shape and dtype to decode into (then returned), e.g. the token
    slice ``ctx[:, :, a:b]`` of a preallocated context tensor; a lossy blob is decoded straight into it
    when each ``[layer, kv]`` block of ``out`` is contiguous, anything else is decoded then copied.
    Verifies the checksum first; raises :class:`CodecError` for anything malformed (a blob with a forged
    checksum may leave ``out`` partly written).
    """
    info = container.verify(blob)
    if out is not None and (
        tuple(out.shape) != info.shape or out.dtype != info.dtype or out.device.type != "cpu"
    ):
        raise CodecError(
            f"out is {out.dtype} {tuple(out.shape)} on {out.device}; the blob decodes to "
            f"{info.dtype} {info.shape} on the CPU"
        )
    if out is not None and has_internal_overlap(out):  # the decoder would write some elements twice
        raise CodecError("out has elements that share memory; pass a tensor or a slice of one")
    mv = container.byte_view(blob)
    params = mv[info.params_offset : info.params_offset + info.params_len]
    payload = mv[info.payload_offset : info.payload_offset + info.payload_len]
    if info.codec_id == CODEC_ZSTD:
        if info.params_len:
            raise CodecError("lossless blob with a non-empty parameter section")
        x = lossless.decode(payload, info.shape, info.dtype)
    elif out is not None and out[0, 0].is_contiguous():  # every [layer, kv] block has the same strides
        return lossy.decode(params, payload, info.level, info.shape, info.dtype, out)
    else:
        x = lossy.decode(params, payload, info.level, info.shape, info.dtype)
    return x.to(device) if out is None else out.copy_(x)


def inspect(blob: bytes | bytearray | memoryview) -> container.BlobInfo:
    """Cheap header parse and checks (no checksum, no payload decode)."""
    return container.inspect(blob)


def verify(blob: bytes | bytearray | memoryview) -> container.BlobInfo:
    """:func:`inspect` plus checksum verification of the whole blob."""
    return container.verify(blob)


def encode_context(
    kv_full: torch.Tensor, chunk_tokens: int = 256, levels: Sequence[int] = LEVELS
) -> list[dict[int, bytes]]:
    """Cut ``kv_full`` ``[layers, 2, T, kv_heads, head_dim]`` into ``T // chunk_tokens`` full chunks.

    Returns one ``{level: blob}`` dict per chunk, in token order; a partial tail chunk is dropped.
    """
    if chunk_tokens < 1:
        raise CodecError(f"chunk_tokens must be positive, got {chunk_tokens}")
    _check_input(kv_full)
    out = []
    for i in range(kv_full.shape[2] // chunk_tokens):
        chunk = kv_full[:, :, i * chunk_tokens : (i + 1) * chunk_tokens]
        out.append({lv: encode(chunk, lv) for lv in levels})
    return out


def decode_context(blobs: Sequence[bytes], device: str | torch.device = "cpu") -> torch.Tensor:
    """Decode chunk blobs and concatenate them on the token axis.

    Returns ``[layers, 2, sum(tokens), kv_heads, head_dim]`` in the blobs' dtype.
    """
    if not blobs:
        raise CodecError("decode_context needs at least one blob")
    parts = [decode(b, device) for b in blobs]
    ref = parts[0]
    for p in parts[1:]:
        if p.dtype != ref.dtype or p.shape[:2] != ref.shape[:2] or p.shape[3:] != ref.shape[3:]:
            raise CodecError(f"chunks disagree: {tuple(ref.shape)} {ref.dtype} vs {tuple(p.shape)} {p.dtype}")
    return torch.cat(parts, dim=2)
