"""Content-addressed chunk keys, identical across processes and hosts.

A context's token ids are cut into chunks of ``chunk_tokens``; only full chunks get keys. The key of
chunk ``i`` is a SHA-256 chain (a Merkle-style prefix chain)::

    h_{-1} = SHA256(b"kvstream/v1/salt" || canonical(namespace, model_id, revision,
                                                   dtype, kv_layout, chunk_tokens))
    h_i    = SHA256(h_{i-1} || uint32le(tokens of chunk i))

so equal prefixes under equal salts give equal keys (automatic dedup), any differing token or salt
field changes every later key, and nothing depends on Python's ``hash()`` or ``PYTHONHASHSEED``.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_CHUNK_TOKENS = 256
DEFAULT_NAMESPACE = "default"
KV_LAYOUTS = ("LTHD",)  # [layers, 2, tokens, kv_heads, head_dim]
KV_DTYPES = ("float16", "bfloat16", "float32")
HASH_BYTES = 32
MAX_TOKEN_ID = 2**32 - 1
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/@:+")


class InvalidKeyError(ValueError):
    """Invalid model spec or token ids (maps to INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class ModelKey:
    """The salt of every chunk key: two specs address the same chunks iff they are equal."""

    model_id: str
    namespace: str = DEFAULT_NAMESPACE
    revision: str = ""
    dtype: str = "float16"
    kv_layout: str = "LTHD"
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS

    def __post_init__(self) -> None:
        for field, value, allow_empty in (
            ("namespace", self.namespace, False),
            ("model_id", self.model_id, False),
            ("revision", self.revision, True),
        ):
            if not value and not allow_empty:
                raise InvalidKeyError(f"{field} must not be empty")
            if len(value) > 200 or not set(value) <= _NAME_CHARS:
                raise InvalidKeyError(
                    f"{field} {value!r}: use at most 200 characters from [A-Za-z0-9._-/@:+]"
                )
        if self.dtype not in KV_DTYPES:
            raise InvalidKeyError(f"dtype {self.dtype!r} not one of {', '.join(KV_DTYPES)}")
        if self.kv_layout not in KV_LAYOUTS:
            raise InvalidKeyError(f"kv_layout {self.kv_layout!r} not one of {', '.join(KV_LAYOUTS)}")
        if not 1 <= self.chunk_tokens <= 65536:
            raise InvalidKeyError(f"chunk_tokens {self.chunk_tokens} outside [1, 65536]")

    def salt(self) -> bytes:
        fields = (self.namespace, self.model_id, self.revision, self.dtype, self.kv_layout)
        body = b"".join(struct.pack("<H", len(f.encode())) + f.encode() for f in fields)
        return hashlib.sha256(b"kvstream/v1/salt" + body + struct.pack("<I", self.chunk_tokens)).digest()


def token_array(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Validate token ids and return them as little-endian uint32."""
    arr = np.asarray(token_ids)
    if arr.ndim != 1:
        raise InvalidKeyError("token ids must be a flat sequence")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InvalidKeyError("token ids must be integers")
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > MAX_TOKEN_ID):
        raise InvalidKeyError("token ids must be in [0, 2**32)")
    return arr.astype("<u4", copy=False)


def chunk_hashes(model: ModelKey, token_ids: Sequence[int] | np.ndarray) -> list[bytes]:
    """Chained 32-byte keys of every *full* chunk of ``token_ids`` (a trailing partial chunk gets none)."""
    arr = token_array(token_ids)
    n = model.chunk_tokens
    prev = model.salt()
    out: list[bytes] = []
    for i in range(arr.size // n):
        prev = hashlib.sha256(prev + arr[i * n : (i + 1) * n].tobytes()).digest()
        out.append(prev)
    return out
