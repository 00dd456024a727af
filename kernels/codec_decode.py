"""Decode a codec blob straight into a device tensor: torch twin and shared checks.

The twin decodes with :func:`codec.decode` on the CPU (numba, one segment per call, bit-exact by
definition) and copies the result to ``device`` / into ``out``. It is the off-GPU implementation and the
oracle the Triton kernel (:mod:`kernels.codec_decode_triton`) is tested against. The lane-parallel torch
decoder :func:`codec.reference.decode_reference` runs the same algorithm as the kernel, but it needs a
Python step (and a host sync) per ``(token, round)``, so it is a test oracle, not a fast path on any device.
"""

from __future__ import annotations

import torch

import codec
from codec.api import has_internal_overlap
from codec.container import BlobInfo


def check_out(out: torch.Tensor | None, info: BlobInfo, device: str | torch.device) -> torch.device:
    """Validate ``out`` against the blob header; returns the device the result goes to.

    ``out`` must have the blob's shape ``[layers, 2, tokens, kv_heads, head_dim]`` and dtype and live on a
    device of the same type as ``device`` (any strides: a token slice of a preallocated cache is fine).
    """
    target = torch.device(device)
    if out is None:
        return target
    if tuple(out.shape) != info.shape or out.dtype != info.dtype:
        raise ValueError(
            f"out is {out.dtype} {tuple(out.shape)}, the blob decodes to {info.dtype} {info.shape}"
        )
    if out.device.type != target.type:
        raise ValueError(f"out is on {out.device}, but device={target} was requested")
    if has_internal_overlap(out):
        raise ValueError("out has elements that share memory; pass a tensor or a slice of one")
    return out.device


def codec_decode(
    blob: bytes | bytearray | memoryview, device: str | torch.device = "cuda", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode ``blob`` to ``[layers, 2, tokens, kv_heads, head_dim]`` in the blob's dtype on ``device``.

    With ``out`` (same shape and dtype, any strides) the result is written there and ``out`` is returned.
    Raises :class:`codec.CodecError` for a malformed or corrupt blob (before touching ``out``, unless its
    checksum was forged to match: then a CPU ``out`` may be partly written).
    """
    dev = check_out(out, codec.inspect(blob), device)
    if out is not None and dev.type == "cpu":
        return codec.decode(blob, "cpu", out=out)  # straight into out, no intermediate tensor
    x = codec.decode(blob, "cpu")
    if out is None:
        return x.to(dev)
    return out.copy_(x)
