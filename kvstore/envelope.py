"""The envelope around every value kvstream stores, verified on every read.

Layout, little-endian (version 1)::

    offset  size  field
    0       4     magic b"KVSE"
    4       1     format version (1)
    5       1     kind (see ``Kind``)
    6       1     codec id of the body (chunk blobs; 0 otherwise)
    7       1     codec level of the body (chunk blobs; 0 otherwise)
    8       16    first 16 bytes of SHA-256(storage key): a record read under the wrong key is rejected
    24      2     model id length M
    26      M     model id, UTF-8
    26+M    8     body length B
    34+M    B     body (a codec container, a sidecar, or a protobuf message)
    34+M+B  8     xxh3_64 of every preceding byte

The overhead is 42 bytes plus the model id. ``open_envelope`` raises ``CorruptRecord`` for any
mismatch; callers treat that as a miss (and count it), never as data.
"""

from __future__ import annotations

import enum
import hashlib
import struct
from dataclasses import dataclass

import xxhash

MAGIC = b"KVSE"
VERSION = 1
_HEAD = struct.Struct("<4sBBBB16sH")
_LEN = struct.Struct("<Q")
_SUM = struct.Struct("<Q")


class Kind(enum.IntEnum):
    CHUNK = 1  # one codec level of one chunk
    SIDECAR = 2  # a named per-chunk sidecar (e.g. a sparse-recall index)
    CHUNK_RECORD = 3  # committed chunk: which levels/sidecars exist and their sizes
    MANIFEST = 4  # committed context
    NAME_INDEX = 5  # human context name -> context id (body: the 32-byte context id)
    CONTEXT_INFO = 6  # a committed context's pb.ContextInfo without token ids: what List/Stat/quotas read


class CorruptRecord(ValueError):
    """A stored record failed its checks (truncated, bad magic/version/kind/key, checksum mismatch)."""


@dataclass(frozen=True)
class Envelope:
    kind: Kind
    model_id: str
    body: bytes
    codec_id: int = 0
    level: int = 0


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()[:16]


def seal(key: str, env: Envelope) -> bytes:
    """Serialize ``env`` for storage under ``key``."""
    mid = env.model_id.encode()
    head = _HEAD.pack(MAGIC, VERSION, int(env.kind), env.codec_id, env.level, key_digest(key), len(mid))
    parts = (head, mid, _LEN.pack(len(env.body)), env.body)
    digest = xxhash.xxh3_64()
    for part in parts:
        digest.update(part)
    return b"".join((*parts, _SUM.pack(digest.intdigest())))  # one copy of the body, not two


def is_newer_version(record: bytes) -> bool:
    """True for a record of a later envelope version: unreadable here, but not corrupt."""
    magic, version = _HEAD.unpack_from(record, 0)[:2] if len(record) >= _HEAD.size else (b"", 0)
    return magic == MAGIC and version > VERSION


def open_envelope(key: str, record: bytes, expect: Kind | None = None) -> Envelope:
    """Verify and parse a record read from ``key``; raises ``CorruptRecord``."""
    view = memoryview(record)
    if len(view) < _HEAD.size + _LEN.size + _SUM.size:
        raise CorruptRecord(f"{key}: record of {len(view)} bytes is shorter than any envelope")
    (stored_sum,) = _SUM.unpack_from(view, len(view) - _SUM.size)
    if xxhash.xxh3_64_intdigest(view[: len(view) - _SUM.size]) != stored_sum:
        raise CorruptRecord(f"{key}: checksum mismatch")
    magic, version, kind, codec_id, level, digest, mid_len = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise CorruptRecord(f"{key}: bad magic {bytes(magic)!r}")
    if version != VERSION:
        raise CorruptRecord(f"{key}: unsupported envelope version {version}")
    if digest != key_digest(key):
        raise CorruptRecord(f"{key}: record belongs to another key")
    try:
        kind_enum = Kind(kind)
    except ValueError:
        raise CorruptRecord(f"{key}: unknown record kind {kind}") from None
    if expect is not None and kind_enum != expect:
        raise CorruptRecord(f"{key}: expected a {expect.name} record, found {kind_enum.name}")
    pos = _HEAD.size
    end_ids = pos + mid_len
    (body_len,) = _LEN.unpack_from(view, end_ids) if end_ids + _LEN.size <= len(view) else (-1,)
    body_start = end_ids + _LEN.size
    if body_len < 0 or body_start + body_len + _SUM.size != len(view):
        raise CorruptRecord(f"{key}: length fields do not match the record size")
    try:
        model_id = bytes(view[pos:end_ids]).decode()
    except UnicodeDecodeError:
        raise CorruptRecord(f"{key}: model id is not UTF-8") from None
    return Envelope(kind_enum, model_id, bytes(view[body_start : body_start + body_len]), codec_id, level)
