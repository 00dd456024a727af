"""kvstream's KV-cache codec: a CacheGen-style lossy codec (levels 1..4) plus a lossless level 0.

Tensors are one chunk ``[layers, 2, tokens, kv_heads, head_dim]`` (index 0 = keys, 1 = values) in
float16, bfloat16 or float32. Blobs are self-describing (see :mod:`codec.container` and docs/codec.md).
"""

from codec.api import (
    DEFAULT_LEVEL,
    LEVELS,
    LOSSLESS,
    decode,
    decode_context,
    encode,
    encode_context,
    inspect,
    verify,
)
from codec.container import BlobInfo, CodecError

__all__ = [
    "DEFAULT_LEVEL",
    "LEVELS",
    "LOSSLESS",
    "BlobInfo",
    "CodecError",
    "decode",
    "decode_context",
    "encode",
    "encode_context",
    "inspect",
    "verify",
]
