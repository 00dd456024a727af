"""Conversions between kvstream's Python types and the protobuf messages, shared by server and client."""

from __future__ import annotations

from kvstore.keys import DEFAULT_CHUNK_TOKENS, DEFAULT_NAMESPACE, ModelKey
from kvstore.rpc import pb

DEFAULT_PART_BYTES = 1 << 20  # blob part size on the wire: far below gRPC's 4 MiB default limit
MAX_PART_BYTES = (4 << 20) - (64 << 10)  # leaves room for the message framing under 4 MiB


def model_to_pb(model: ModelKey) -> pb.ModelSpec:
    return pb.ModelSpec(
        namespace=model.namespace,
        model_id=model.model_id,
        revision=model.revision,
        dtype=model.dtype,
        kv_layout=model.kv_layout,
        chunk_tokens=model.chunk_tokens,
    )


def model_from_pb(spec: pb.ModelSpec) -> ModelKey:
    """Build a validated ``ModelKey``; raises ``InvalidKeyError`` with a readable reason."""
    return ModelKey(
        model_id=spec.model_id,
        namespace=spec.namespace or DEFAULT_NAMESPACE,
        revision=spec.revision,
        dtype=spec.dtype or "float16",
        kv_layout=spec.kv_layout or "LTHD",
        chunk_tokens=spec.chunk_tokens or DEFAULT_CHUNK_TOKENS,
    )


def split_parts(blob: bytes, part_bytes: int) -> list[tuple[int, bytes]]:
    """``(offset, data)`` parts of ``blob`` of at most ``part_bytes``; an empty blob is one empty part."""
    if not blob:
        return [(0, b"")]
    view = memoryview(blob)
    return [(off, bytes(view[off : off + part_bytes])) for off in range(0, len(blob), part_bytes)]
