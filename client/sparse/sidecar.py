"""Versioned, checksummed binary sidecar for sparse-recall indexes (never pickle).

The service builds a backend's prefill-time index once per stored context and streams it to clients in
this format. All integers are little-endian. Layout of format version 1:

====================  ======  ==========================================================
offset                size    field
====================  ======  ==========================================================
0                     8       magic ``b"KVSPIDX1"``
8                     2       format version, uint16 (= 1)
10                    1       backend id, uint8 (see :data:`BACKEND_IDS`)
11                    1       reserved, must be zero
12                    4       header_len, uint32: length of the JSON header
16                    8       payload_len, uint64: length of the tensor payload
24                    H       UTF-8 JSON header: ``{"backend", "params", "tensors": [{"name", "dtype",
                              "shape", "offset", "nbytes"}, ...]}`` (offsets relative to the payload)
24+H                  N       payload: raw little-endian tensor bytes, each tensor 8-byte aligned
24+H+N                8       xxh3_64 (seed 0) of every preceding byte, uint64
====================  ======  ==========================================================

``len(blob)`` must equal ``32 + header_len + payload_len`` exactly; any violation raises
:class:`SidecarError`. Parameter values are JSON scalars only (int, float, str, bool).
"""

from __future__ import annotations

import json
import struct
import sys
from typing import TYPE_CHECKING

import torch
import xxhash

if TYPE_CHECKING:
    from client.sparse.base import SparseIndex

MAGIC = b"KVSPIDX1"
FORMAT_VERSION = 1
# Stable numeric ids: the sidecar outlives any Python-side registry ordering.
BACKEND_IDS: dict[str, int] = {
    "oracle": 1,
    "sink_local": 2,
    "shadowkv": 3,
    "pqcache": 4,
    "clusterkv": 5,
    "alisa": 6,
}
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 1 << 20  # a forged header must not make the decoder parse megabytes of JSON
_FIXED = struct.Struct("<8sHBBIQ")
_CHECKSUM = struct.Struct("<Q")
ParamValue = int | float | str | bool


class SidecarError(ValueError):
    """A sidecar blob is malformed, truncated, corrupt, or describes an unknown backend/dtype."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    flat = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
    return flat.numpy().tobytes()


def encode(index: SparseIndex) -> bytes:
    """Serialise ``index`` (its backend, scalar params and named tensors) to sidecar bytes."""
    if sys.byteorder != "little":
        raise SidecarError("sidecar encoding needs a little-endian host")
    if index.backend not in BACKEND_IDS:
        raise SidecarError(f"unknown backend {index.backend!r}")
    for k, v in index.params.items():
        if not isinstance(v, int | float | str | bool):
            raise SidecarError(f"param {k!r} must be a JSON scalar, got {type(v).__name__}")
    entries: list[dict[str, object]] = []
    chunks: list[bytes] = []
    offset = 0
    for name, t in index.tensors.items():
        if t.dtype not in DTYPE_NAMES:
            raise SidecarError(f"tensor {name!r} has unsupported dtype {t.dtype}")
        data = _tensor_bytes(t)
        pad = (-offset) % 8
        chunks.append(b"\0" * pad + data)
        offset += pad
        entries.append(
            {
                "name": name,
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "offset": offset,
                "nbytes": len(data),
            }
        )
        offset += len(data)
    header = json.dumps(
        {"backend": index.backend, "params": index.params, "tensors": entries}, sort_keys=True
    ).encode()
    payload = b"".join(chunks)
    body = _FIXED.pack(MAGIC, FORMAT_VERSION, BACKEND_IDS[index.backend], 0, len(header), len(payload))
    body += header + payload
    return body + _CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def _check_entry(e: object, payload_len: int) -> tuple[str, torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(e, dict):
        raise SidecarError("tensor entry is not an object")
    try:
        name, dname, shape, off, nbytes = e["name"], e["dtype"], e["shape"], e["offset"], e["nbytes"]
    except KeyError as exc:
        raise SidecarError(f"tensor entry misses {exc}") from None
    if not isinstance(name, str) or dname not in DTYPES:
        raise SidecarError(f"bad tensor entry name/dtype: {name!r} {dname!r}")
    if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
        raise SidecarError(f"tensor {name!r}: bad shape {shape!r}")
    dtype = DTYPES[dname]
    numel = 1
    for s in shape:
        numel *= s
    itemsize = torch.empty(0, dtype=dtype).element_size()
    if not (isinstance(off, int) and isinstance(nbytes, int)) or nbytes != numel * itemsize:
        raise SidecarError(f"tensor {name!r}: byte count does not match shape {shape} x {dname}")
    if off < 0 or off % 8 or off + nbytes > payload_len:
        raise SidecarError(f"tensor {name!r}: range [{off}, {off + nbytes}) outside the payload")
    return name, dtype, tuple(shape), off, nbytes


def decode(blob: bytes | bytearray | memoryview) -> SparseIndex:
    """Parse sidecar bytes back into a :class:`~client.sparse.base.SparseIndex` (tensors on CPU)."""
    from client.sparse.base import SparseIndex

    data = bytes(blob)
    if len(data) < _FIXED.size + _CHECKSUM.size:
        raise SidecarError(f"sidecar truncated: {len(data)} bytes")
    magic, version, backend_id, reserved, header_len, payload_len = _FIXED.unpack_from(data, 0)
    if magic != MAGIC:
        raise SidecarError(f"bad magic {magic!r}: not a kvstream sparse index")
    if version != FORMAT_VERSION:
        raise SidecarError(f"unsupported sidecar version {version} (this build reads {FORMAT_VERSION})")
    if reserved != 0 or header_len > MAX_HEADER:
        raise SidecarError("corrupt sidecar header")
    if len(data) != _FIXED.size + header_len + payload_len + _CHECKSUM.size:
        raise SidecarError(f"sidecar length {len(data)} does not match its header")
    (stored,) = _CHECKSUM.unpack_from(data, len(data) - _CHECKSUM.size)
    if xxhash.xxh3_64_intdigest(data[: -_CHECKSUM.size]) != stored:
        raise SidecarError("sidecar checksum mismatch: corrupt data")
    try:
        header = json.loads(data[_FIXED.size : _FIXED.size + header_len].decode())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # a forged, deeply nested one
        raise SidecarError(f"sidecar header is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(header, dict) or not isinstance(header.get("params"), dict):
        raise SidecarError("sidecar header must be an object with params")
    if not all(isinstance(v, int | float | str | bool) for v in header["params"].values()):
        raise SidecarError("sidecar params must be JSON scalars (numbers, strings, booleans)")
    backend = header.get("backend")
    if BACKEND_IDS.get(str(backend)) != backend_id:
        raise SidecarError(f"backend {backend!r} does not match backend id {backend_id}")
    entries = header.get("tensors")
    if not isinstance(entries, list):
        raise SidecarError("sidecar header lacks a tensor list")
    payload = data[_FIXED.size + header_len : _FIXED.size + header_len + payload_len]
    tensors: dict[str, torch.Tensor] = {}
    for e in entries:
        name, dtype, shape, off, nbytes = _check_entry(e, payload_len)
        if name in tensors:
            raise SidecarError(f"sidecar lists tensor {name!r} twice")
        raw = bytearray(payload[off : off + nbytes])
        tensors[name] = (
            torch.frombuffer(raw, dtype=torch.uint8).view(dtype).reshape(shape)
            if nbytes
            else torch.empty(shape, dtype=dtype)
        )
    return SparseIndex(backend=str(backend), params=dict(header["params"]), tensors=tensors)
