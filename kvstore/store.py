"""kvstream's data model on top of any ``StorageBackend``: chunks, records, manifests, refcounts, pins.

Key scheme (the ``{hash tag}`` keeps every key of one chunk on one Redis Cluster slot)::

    tag = "{" + namespace + ":" + chunk_hash.hex() + "}"
    kvs:{tag}:L{level}     CHUNK envelope around one codec blob [layers, 2, chunk_tokens, kv_heads, head_dim]
    kvs:{tag}:S:{name}     SIDECAR envelope (opaque bytes, e.g. a sparse-recall index)
    kvs:{tag}:rec          CHUNK_RECORD envelope (pb.ChunkInfo): written at commit, makes the chunk visible
    kvs:{tag}:refs         set of context ids referencing the chunk (refcount for delete)
    kvs:{tag}:pins         set of pinned context ids referencing the chunk (pinned iff non-empty)
    kvs:{ns:ctxid}:man     MANIFEST envelope (pb.Manifest); context id = hash of the context's last chunk
    kvs:{ns:ctxid}:inf     CONTEXT_INFO envelope (pb.ContextInfo, no token ids): the manifest's summary,
                           same TTL, so List/Stat/quotas need not load every context's token ids
                           (contexts stored before it have none: their manifest is read instead)
    kvs:{ns:name}:N        NAME_INDEX envelope (body: the context id) for lookups by human name
                           (before: kvs:{ns:name:N}:name, still read: ``legacy_name_key``)
    kvs:{ns:lease}:lease   a namespace lease (random owner token, short TTL) held across front ends
                           by every commit, delete and pin of the namespace (``namespace_lease``)

Write order of a put: blobs (no lock: content-addressed, invisible until a record lists them), then under
the lease refs/pins sets, chunk records, manifest last, so an interrupted upload is never visible as a
context and no two commits, deletes or pins of a namespace interleave. Every record is verified on read
(``open_envelope``); a record that fails is treated as a miss, counted in ``kvstream_corrupt_records``
and logged with its key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import torch
import xxhash

import codec
from kvstore.backends.base import BackendError, BackendFull, StorageBackend
from kvstore.envelope import CorruptRecord, Envelope, Kind, is_newer_version, open_envelope, seal
from kvstore.hotcache import HotChunkCache
from kvstore.keys import DEFAULT_NAMESPACE, HASH_BYTES, InvalidKeyError, ModelKey, chunk_hashes, token_array
from kvstore.metrics import Metrics
from kvstore.rpc import pb
from kvstore.wire import model_to_pb

log = logging.getLogger("kvstore.store")
T = TypeVar("T")

DEFAULT_TTL_S = 86400.0
STAGING_TTL_S = 600.0  # blobs written before a put commits live this long unless the commit keeps them
DEFAULT_MAX_BLOB_BYTES = 256 << 20
DEFAULT_MAX_CONTEXT_CHUNKS = 16384
_SIDECAR_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_CONTEXT_NAME = re.compile(r"[A-Za-z0-9._/@:+-]{1,200}")
_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MANIFEST_BATCH = 256
_SEAL_BATCH_BYTES = 64 << 20  # blob bytes sealed (copied) and written per backend call during a put


class InvalidRequest(ValueError):
    """Bad input: spec, token ids, blob, level, sidecar name (maps to INVALID_ARGUMENT)."""


class ContextNotFound(LookupError):
    """No committed context matches the reference (maps to NOT_FOUND)."""


class LimitExceeded(RuntimeError):
    """The request is larger than a configured limit (maps to RESOURCE_EXHAUSTED)."""


class QuotaExceeded(LimitExceeded):
    """A put would leave its context with ``total_bytes`` above the ``budget`` it was given."""

    def __init__(self, total_bytes: int, budget: int) -> None:
        super().__init__(f"the context would hold {total_bytes} bytes, {budget} are left")
        self.total_bytes = total_bytes
        self.budget = budget


class NamespaceBusy(RuntimeError):
    """Another front end held the namespace lease for longer than we may wait (maps to UNAVAILABLE)."""


# ----- keys ---------------------------------------------------------------------------------------


def _tag(ns: str, chunk_hash: bytes) -> str:
    return "{" + ns + ":" + chunk_hash.hex() + "}"


def blob_key(ns: str, chunk_hash: bytes, level: int) -> str:
    return f"kvs:{_tag(ns, chunk_hash)}:L{level}"


def sidecar_key(ns: str, chunk_hash: bytes, name: str) -> str:
    return f"kvs:{_tag(ns, chunk_hash)}:S:{name}"


def record_key(ns: str, chunk_hash: bytes) -> str:
    return f"kvs:{_tag(ns, chunk_hash)}:rec"


def refs_key(ns: str, chunk_hash: bytes) -> str:
    return f"kvs:{_tag(ns, chunk_hash)}:refs"


def pins_key(ns: str, chunk_hash: bytes) -> str:
    return f"kvs:{_tag(ns, chunk_hash)}:pins"


def manifest_key(ns: str, context_id: bytes) -> str:
    return f"kvs:{_tag(ns, context_id)}:man"


def info_key(ns: str, context_id: bytes) -> str:
    return f"kvs:{_tag(ns, context_id)}:inf"


def name_key(ns: str, name: str) -> str:
    # "}" can occur in neither part, and the tag is the namespace plus a fixed suffix: one key per pair.
    return "kvs:{" + ns + ":name}:" + name


def legacy_name_key(ns: str, name: str) -> str:
    """The name index key written before format 2 of the name index: ambiguous when a namespace or a name
    contains ":name:" (("a", "x:name:y") and ("a:name:x", "y") share it). Read and dropped, never written."""
    return "kvs:{" + ns + ":name:" + name + "}:name"


def lease_key(ns: str) -> str:
    return "kvs:{" + ns + ":lease}:lease"


def _context_pattern(ns: str | None, suffix: str) -> str:
    # A context id is 2*HASH_BYTES hex digits: "*" alone would also match the name key of a context
    # named "man" (kvs:{ns:name}:man). Globs cannot say "hex": _context_key checks what comes back.
    tail = ":" + "?" * (2 * HASH_BYTES) + "}:" + suffix
    return "kvs:{*" + tail if ns is None else "kvs:{" + ns + tail


def _context_key(suffix: str) -> re.Pattern[str]:
    return re.compile(r"kvs:\{.*:[0-9a-f]{" + str(2 * HASH_BYTES) + r"}\}:" + suffix)


_MANIFEST_KEY, _INFO_KEY = _context_key("man"), _context_key("inf")


def _chunk_keys(ns: str, chunk_hash: bytes, sidecars: Iterable[str]) -> list[str]:
    """Every key a chunk may own (missing ones are ignored by ``set_ttl`` / ``delete_many``)."""
    keys = [blob_key(ns, chunk_hash, lv) for lv in codec.LEVELS]
    keys += [sidecar_key(ns, chunk_hash, s) for s in sidecars]
    return [*keys, record_key(ns, chunk_hash), refs_key(ns, chunk_hash), pins_key(ns, chunk_hash)]


def _batches(items: Sequence[_BlobItem]) -> Iterator[list[_BlobItem]]:
    """``items`` in runs of at most ``_SEAL_BATCH_BYTES`` of blob data (at least one item each)."""
    batch: list[_BlobItem] = []
    size = 0
    for it in items:
        batch.append(it)
        size += len(it.data)
        if size >= _SEAL_BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _counted_manifest(
    old_man: pb.Manifest | None, old_recs: Sequence[pb.ChunkInfo | None]
) -> pb.Manifest | None:
    """The stored manifest whose byte counts a put builds on; None (count afresh) when some of its chunks
    are gone (expired, or freed by a delete cut short): its sidecar share no longer describes them."""
    return None if old_man is None or any(r is None for r in old_recs) else old_man


def _context_bytes(
    old_man: pb.Manifest | None,
    old_recs: Sequence[pb.ChunkInfo | None],
    chunks: Sequence[ChunkBlobs],
    records: Sequence[pb.ChunkInfo],
    shared_sidecar_bytes: int = 0,
) -> tuple[dict[int, int], int]:
    """``(bytes per level, total bytes)`` of a context's manifest after a put of ``chunks``.

    Levels: every level its merged chunk ``records`` list, whoever stored it (a level another context
    left in a shared chunk stays readable through this one, so it counts here too; conservative). A
    retry or a re-put therefore adds only what is new. Sidecars (records hold names, not sizes): the
    stored manifest's sidecar bytes plus the uploaded sidecars its records did not list yet; for a first
    put, every uploaded sidecar plus ``shared_sidecar_bytes``, those the records already listed (another
    context's, in a shared chunk) that this put did not upload.
    """
    level_bytes: dict[int, int] = defaultdict(int)
    for rec in records:
        for info in rec.levels:
            level_bytes[info.level] += info.size_bytes
    sidecar_bytes = shared_sidecar_bytes
    if old_man is not None:
        sidecar_bytes = old_man.info.total_bytes - sum(info.size_bytes for info in old_man.info.level_bytes)
    for ch, old in zip(chunks, old_recs, strict=True):
        had = set(old.sidecars) if old_man is not None and old is not None else set()
        sidecar_bytes += sum(len(d) for s, d in ch.sidecars.items() if s not in had)
    return dict(level_bytes), sum(level_bytes.values()) + sidecar_bytes


@dataclass(frozen=True)
class _BlobItem:
    """One blob of a put: a codec level (``sidecar`` empty) or a named sidecar of chunk ``chunk``."""

    key: str
    chunk: int
    level: int
    sidecar: str
    data: bytes


def _blob_items(ns: str, hashes: Sequence[bytes], chunks: Sequence[ChunkBlobs]) -> list[_BlobItem]:
    items = [
        _BlobItem(blob_key(ns, h, lv), i, lv, "", data)
        for i, (h, ch) in enumerate(zip(hashes, chunks, strict=True))
        for lv, data in sorted(ch.levels.items())
    ]
    return items + [
        _BlobItem(sidecar_key(ns, h, name), i, 0, name, data)
        for i, (h, ch) in enumerate(zip(hashes, chunks, strict=True))
        for name, data in sorted(ch.sidecars.items())
    ]


# ----- values -------------------------------------------------------------------------------------


@dataclass
class ChunkBlobs:
    """The blobs uploaded for one chunk: codec blobs by level, and named sidecars (opaque bytes)."""

    levels: dict[int, bytes]
    sidecars: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class PutResult:
    context_id: bytes
    stored_chunks: int
    stored_tokens: int
    bytes_written: int
    dedup_chunks: int


@dataclass(frozen=True)
class LookupResult:
    """Longest committed prefix: ``chunks[i]`` is the verified record of chunk ``i``."""

    chunk_tokens: int
    chunks: list[pb.ChunkInfo]

    @property
    def prefix_chunks(self) -> int:
        return len(self.chunks)

    @property
    def prefix_tokens(self) -> int:
        return len(self.chunks) * self.chunk_tokens


@dataclass(frozen=True)
class ContextQuery:
    """How a caller names a context: exactly one of token ids, context id or name."""

    token_ids: Sequence[int] | np.ndarray | None = None
    context_id: bytes | None = None
    name: str | None = None


_BACKEND_CONCURRENCY = 32  # per-chunk calls in flight at once: a connection pool has a bound (redis-py: 100)


async def _gather_bounded(coros: Iterable[Awaitable[T]], limit: int = _BACKEND_CONCURRENCY) -> list[T]:
    """``asyncio.gather`` of ``coros`` with at most ``limit`` running at once (results in order)."""
    sem = asyncio.Semaphore(limit)

    async def run(coro: Awaitable[T]) -> T:
        async with sem:
            return await coro

    return await asyncio.gather(*(run(c) for c in coros))


async def _check_budget(total_bytes: int, byte_budget: int | Callable[[], Awaitable[int]]) -> None:
    budget = byte_budget if isinstance(byte_budget, int) else await byte_budget()
    if total_bytes > budget:
        raise QuotaExceeded(total_bytes, budget)


class ChunkStore:
    """Async data model of kvstream over one backend; the gRPC servicer is a thin layer over this.

    ``default_ttl`` (seconds) applies to unpinned contexts stored with ``ttl=None``/``0``.
    ``max_blob_bytes`` bounds one blob; ``max_context_chunks`` bounds the chunks of one context.
    ``hot_cache_bytes`` > 0 keeps up to that many bytes of verified blobs in memory for ``read_blob``
    (``kvstore.hotcache``: LRU, hits only under the digest the chunk's current record names).
    """

    def __init__(
        self,
        backend: StorageBackend,
        *,
        default_ttl: float = DEFAULT_TTL_S,
        metrics: Metrics | None = None,
        max_blob_bytes: int = DEFAULT_MAX_BLOB_BYTES,
        max_context_chunks: int = DEFAULT_MAX_CONTEXT_CHUNKS,
        hot_cache_bytes: int = 0,
    ) -> None:
        if not default_ttl > 0:
            raise ValueError(f"default_ttl must be > 0, got {default_ttl}")
        self.backend = backend
        self.default_ttl = float(default_ttl)
        self.metrics = metrics if metrics is not None else Metrics()
        self.max_blob_bytes = max_blob_bytes
        self.max_context_chunks = max_context_chunks
        self.hot_cache = HotChunkCache(hot_cache_bytes)
        self._local_leases: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    # ----- coordination -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def namespace_lease(
        self, namespace: str, *, ttl: float = 30.0, wait: float = 30.0, freeing: bool = False
    ) -> AsyncIterator[None]:
        """Hold ``namespace``'s lease: exclusive among every front end sharing this backend.

        A lease is a key written only if absent, with a random owner token and a ``ttl`` (seconds), so a
        front end that dies holding it blocks the others for at most ``ttl``; while held it is renewed
        every ``ttl / 3`` (a commit of a 16k-chunk context takes longer than ``ttl``). Waits up to
        ``wait`` seconds (polling with backoff), then raises ``NamespaceBusy``. Release deletes the key
        only if it still holds our token, and a failed release is logged, not raised (it expires).
        ``freeing``: the holder only removes data (delete, unpin); if the backend is too full to write
        the lease key it goes ahead under this process's lock alone, or a full store could never be
        emptied. Held by every commit, delete and pin/unpin of the namespace.
        """
        key, token = lease_key(namespace), os.urandom(16)
        deadline = time.monotonic() + wait
        busy = f"namespace {namespace!r} is busy (another commit holds its lease for over {wait:g} s)"
        try:  # this process's waiters queue locally instead of polling the backend's key
            await asyncio.wait_for(self._local_leases[namespace].acquire(), wait)
        except TimeoutError:
            raise NamespaceBusy(busy) from None
        renewer: asyncio.Task[None] | None = None
        try:
            delay = 0.002
            while True:
                try:
                    if await self.backend.put_if_absent(key, token, ttl):
                        break
                except BackendFull:
                    if not freeing:
                        raise
                    log.warning(
                        "namespace=%s lease key does not fit a full store: freeing without it", namespace
                    )
                    token = b""
                    break
                if time.monotonic() >= deadline:
                    raise NamespaceBusy(busy)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.05)
            if token:
                renewer = asyncio.create_task(self._renew_lease(key, token, ttl))
            yield
        finally:
            if renewer is not None:
                renewer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await renewer
            if token:
                try:
                    if await self.backend.get(key) == token:
                        await self.backend.delete_many([key])
                except BackendError as e:  # the data operation's own outcome matters more; the key expires
                    log.warning("namespace=%s lease not released (expires in %.0f s): %s", namespace, ttl, e)
            self._local_leases[namespace].release()

    async def _renew_lease(self, key: str, token: bytes, ttl: float) -> None:
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                if await self.backend.get(key) != token:
                    log.warning("lease %s was lost (expired and taken over); the commit goes on", key)
                    return
                await self.backend.set_ttl([key], ttl)
            except BackendError as e:
                log.warning("lease %s not renewed: %s", key, e)

    # ----- verification helpers ---------------------------------------------------------------

    def _open(self, key: str, raw: bytes | None, kind: Kind) -> Envelope | None:
        """Verified envelope of ``raw`` read from ``key``; None (counted, logged) when missing or corrupt."""
        if raw is None:
            return None
        try:
            return open_envelope(key, raw, kind)
        except CorruptRecord as e:
            self._corrupt(key, kind, str(e))
            return None

    def _corrupt(self, key: str, kind: Kind, reason: str) -> None:
        self.metrics.corrupt_records.labels(kind.name.lower()).inc()
        log.warning("corrupt record key=%s kind=%s reason=%r", key, kind.name, reason)

    def _parse_record(
        self, key: str, raw: bytes | None, chunk_hash: bytes, index: int
    ) -> pb.ChunkInfo | None:
        env = self._open(key, raw, Kind.CHUNK_RECORD)
        if env is None:
            return None
        info = pb.ChunkInfo()
        try:
            info.ParseFromString(env.body)
        except Exception as e:  # protobuf raises DecodeError; any parse failure is corruption
            self._corrupt(key, Kind.CHUNK_RECORD, f"record body does not parse: {e}")
            return None
        if info.hash != chunk_hash or info.index != index or not info.levels:
            self._corrupt(key, Kind.CHUNK_RECORD, "record does not describe this chunk")
            return None
        return info

    def _parse_manifest(self, key: str, raw: bytes | None) -> pb.Manifest | None:
        env = self._open(key, raw, Kind.MANIFEST)
        if env is None:
            return None
        man = pb.Manifest()
        try:
            man.ParseFromString(env.body)
        except Exception as e:  # see _parse_record
            self._corrupt(key, Kind.MANIFEST, f"manifest body does not parse: {e}")
            return None
        if not man.chunk_hashes or man.info.context_id != man.chunk_hashes[-1]:
            self._corrupt(key, Kind.MANIFEST, "manifest context id is not its last chunk")
            return None
        return man

    # ----- validation -------------------------------------------------------------------------

    def context_hashes(self, model: ModelKey, token_ids: Sequence[int] | np.ndarray) -> list[bytes]:
        """Chunk keys of the full chunks of ``token_ids``; raises ``InvalidRequest`` / ``LimitExceeded``."""
        try:
            arr = token_array(token_ids)
        except InvalidKeyError as e:
            raise InvalidRequest(str(e)) from None
        if arr.size // model.chunk_tokens > self.max_context_chunks:
            raise LimitExceeded(
                f"{arr.size} tokens is more than {self.max_context_chunks} chunks of {model.chunk_tokens}"
            )
        return chunk_hashes(model, arr)

    def check_blob(self, model: ModelKey, index: int, level: int, blob: bytes) -> tuple[int, ...]:
        """Verify one uploaded codec blob against its declared level and the spec; returns its shape."""
        if level not in codec.LEVELS:
            raise InvalidRequest(f"chunk {index}: unknown level {level}; levels are {list(codec.LEVELS)}")
        if len(blob) > self.max_blob_bytes:
            raise InvalidRequest(
                f"chunk {index} level {level}: blob of {len(blob)} bytes > {self.max_blob_bytes}"
            )
        try:
            info = codec.verify(blob)
        except codec.CodecError as e:
            raise InvalidRequest(f"chunk {index} level {level}: {e}") from None
        if info.level != level:
            raise InvalidRequest(f"chunk {index}: declared level {level} but the blob is level {info.level}")
        if info.dtype != _TORCH_DTYPES[model.dtype]:
            raise InvalidRequest(
                f"chunk {index} level {level}: blob dtype {info.dtype} != spec {model.dtype}"
            )
        if info.shape[2] != model.chunk_tokens:
            raise InvalidRequest(
                f"chunk {index} level {level}: blob holds {info.shape[2]} tokens, chunk_tokens is "
                f"{model.chunk_tokens}"
            )
        return info.shape

    def _check_chunks(self, model: ModelKey, n_chunks: int, chunks: Sequence[ChunkBlobs]) -> None:
        if len(chunks) != n_chunks:
            raise InvalidRequest(f"the token ids have {n_chunks} full chunks but {len(chunks)} were uploaded")
        shape: tuple[int, ...] | None = None
        for i, ch in enumerate(chunks):
            if not ch.levels:
                raise InvalidRequest(f"chunk {i} has no codec level")
            for level, blob in ch.levels.items():
                s = self.check_blob(model, i, level, blob)
                if shape is None:
                    shape = s
                elif s != shape:
                    raise InvalidRequest(
                        f"chunk {i} level {level}: shape {list(s)} != {list(shape)} of chunk 0"
                    )
            for name, data in ch.sidecars.items():
                check_sidecar_name(name)
                if len(data) > self.max_blob_bytes:
                    raise InvalidRequest(
                        f"chunk {i} sidecar {name}: {len(data)} bytes > {self.max_blob_bytes}"
                    )

    # ----- put --------------------------------------------------------------------------------

    async def put(
        self,
        model: ModelKey,
        token_ids: Sequence[int] | np.ndarray,
        chunks: Sequence[ChunkBlobs],
        *,
        ttl: float | None = None,
        pin: bool = False,
        name: str = "",
        metadata: Mapping[str, str] | None = None,
        byte_budget: int | Callable[[], Awaitable[int]] | None = None,
    ) -> PutResult:
        """Store and commit a context: one ``ChunkBlobs`` per full chunk of ``token_ids``, in order.

        ``ttl`` in seconds (None/0 = ``default_ttl``); ``pin`` stores every key without expiry. A put
        never shortens the expiry of a chunk other contexts share. Idempotent; blobs already stored are
        not rewritten (dedup). A re-put adds to the context: its manifest then counts the levels and
        sidecars of both puts, and keeps its creation time.

        The blobs are written first, without a lock (content-addressed, invisible until a record lists
        them); the commit (refcounts, records, manifest, name) then runs under the namespace's lease, so
        it never interleaves with another commit, a delete or a pin of the namespace on any front end,
        and it rewrites a blob that a delete freed in between.
        ``byte_budget``: the most ``total_bytes`` the context may have after this put (a quota), or an
        async callable returning it; checked before any blob is written and again under the lease.
        ``QuotaExceeded`` otherwise (blobs written before a failed second check are unreferenced and
        expire after ``STAGING_TTL_S``).
        """
        ns = model.namespace
        hashes = self.context_hashes(model, token_ids)
        if not hashes:
            raise InvalidRequest(f"no full chunk: need at least {model.chunk_tokens} token ids")
        if name:
            check_context_name(name)
        check_metadata(metadata or {})
        if ttl is not None and ttl < 0:
            raise InvalidRequest(f"ttl must be >= 0, got {ttl}")
        self._check_chunks(model, len(hashes), chunks)
        ttl_s = float(ttl) if ttl else self.default_ttl
        if byte_budget is not None:
            old_man, old_recs = await self._stored_state(model, hashes)
            records = [
                self._merged_record(model, i, h, ch, old, set())
                for i, (h, ch, old) in enumerate(zip(hashes, chunks, old_recs, strict=True))
            ]
            counted = _counted_manifest(old_man, old_recs)
            await _check_budget(_context_bytes(counted, old_recs, chunks, records)[1], byte_budget)

        items = _blob_items(ns, hashes, chunks)
        present = await self.backend.exists_many([it.key for it in items])
        # Staged with a short TTL: the commit sets the real one; an upload refused there (quota) or
        # cut off leaves nothing that outlives STAGING_TTL_S.
        missing = [it for it, exists in zip(items, present, strict=True) if not exists]
        new = await self._stage_blobs(model, missing, min(ttl_s, STAGING_TTL_S))
        kept = {
            (it.chunk, it.level)
            for it, exists in zip(items, present, strict=True)
            if exists and not it.sidecar
        }
        async with self.namespace_lease(ns):
            try:
                dedup, rewritten = await self._commit(
                    model, token_ids, hashes, chunks, items, kept, ttl, pin, name, metadata, byte_budget
                )
            except (QuotaExceeded, InvalidRequest):  # refused before writing anything under the lease
                await self._drop_unreferenced(ns, hashes, new)
                raise
        n = model.chunk_tokens
        written = sum(len(it.data) for it in new) + rewritten
        return PutResult(hashes[-1], len(hashes), len(hashes) * n, written, dedup)

    async def _stored_state(
        self, model: ModelKey, hashes: Sequence[bytes]
    ) -> tuple[pb.Manifest | None, list[pb.ChunkInfo | None]]:
        """The context's stored manifest and each chunk's stored record (None where missing)."""
        ns = model.namespace
        man_key = manifest_key(ns, hashes[-1])
        rec_keys = [record_key(ns, h) for h in hashes]
        old_man_raw, *old_recs_raw = await self.backend.get_many([man_key, *rec_keys])
        old_recs = [
            self._parse_record(k, r, h, i)
            for i, (k, r, h) in enumerate(zip(rec_keys, old_recs_raw, hashes, strict=True))
        ]
        return self._parse_manifest(man_key, old_man_raw), old_recs

    @staticmethod
    def _merged_record(
        model: ModelKey,
        index: int,
        chunk_hash: bytes,
        chunk: ChunkBlobs,
        old: pb.ChunkInfo | None,
        kept: set[tuple[int, int]],
    ) -> pb.ChunkInfo:
        """Chunk ``index``'s record after the put: the stored one's levels and sidecars plus this put's."""
        sizes = {lv.level: (lv.size_bytes, lv.xxh3_64) for lv in old.levels} if old else {}
        for lv, b in chunk.levels.items():
            if (index, lv) not in kept or lv not in sizes:  # a blob kept from an earlier put keeps its digest
                sizes[lv] = (len(b), xxhash.xxh3_64_intdigest(b))
        n = model.chunk_tokens
        return pb.ChunkInfo(
            index=index,
            hash=chunk_hash,
            token_start=index * n,
            token_end=(index + 1) * n,
            levels=[
                pb.LevelInfo(level=lv, size_bytes=sz, xxh3_64=digest)
                for lv, (sz, digest) in sorted(sizes.items())
            ],
            sidecars=sorted(set(old.sidecars if old else ()) | set(chunk.sidecars)),
        )

    async def _drop_unreferenced(self, ns: str, hashes: Sequence[bytes], staged: Sequence[_BlobItem]) -> None:
        """Delete the blobs a refused put staged that no committed record lists (under the lease, so no
        commit can start using one meanwhile; a put still waiting rewrites what it finds missing)."""
        records = await self._records(ns, hashes)
        orphans = []
        for it in staged:
            rec = records[it.chunk]
            listed = rec is not None and (
                it.sidecar in rec.sidecars if it.sidecar else any(lv.level == it.level for lv in rec.levels)
            )
            if not listed:
                orphans.append(it.key)
        if orphans:
            await self.backend.delete_many(orphans)

    async def _put_blobs(self, model: ModelKey, items: Sequence[_BlobItem], ttl: float | None) -> None:
        """Seal and write ``items`` a batch of at most ``_SEAL_BATCH_BYTES`` at a time: sealing copies each
        blob, and sealing a whole upload at once doubled a front end's memory per upload."""
        for batch in _batches(items):
            await self.backend.put_many([(it.key, self._seal_blob(model, it)) for it in batch], ttl)

    async def _stage_blobs(self, model: ModelKey, items: Sequence[_BlobItem], ttl: float) -> list[_BlobItem]:
        """Write the blobs of ``items`` that do not exist yet (never overwriting one: a blob another put
        committed meanwhile keeps its TTL); returns those this call wrote."""

        async def stage(it: _BlobItem) -> bool:
            return await self.backend.put_if_absent(it.key, self._seal_blob(model, it), ttl)

        written: list[_BlobItem] = []
        for batch in _batches(items):
            done = await _gather_bounded(stage(it) for it in batch)
            written += [it for it, ok in zip(batch, done, strict=True) if ok]
        return written

    @staticmethod
    def _seal_blob(model: ModelKey, item: _BlobItem) -> bytes:
        if item.sidecar:
            return seal(item.key, Envelope(Kind.SIDECAR, model.model_id, item.data))
        codec_id = codec.inspect(item.data).codec_id
        return seal(
            item.key, Envelope(Kind.CHUNK, model.model_id, item.data, codec_id=codec_id, level=item.level)
        )

    async def _expiry(self, key: str) -> float:
        """Seconds ``key`` has left: ``inf`` if it never expires, 0 if it is missing."""
        try:
            left = await self.backend.get_ttl(key)
        except KeyError:
            return 0.0
        return math.inf if left is None else left

    async def _commit(
        self,
        model: ModelKey,
        token_ids: Sequence[int] | np.ndarray,
        hashes: Sequence[bytes],
        chunks: Sequence[ChunkBlobs],
        items: Sequence[_BlobItem],
        kept: set[tuple[int, int]],
        ttl: float | None,
        pin: bool,
        name: str,
        metadata: Mapping[str, str] | None,
        byte_budget: int | Callable[[], Awaitable[int]] | None,
    ) -> tuple[int, int]:
        """The locked half of ``put``; returns ``(chunks already recorded, bytes rewritten)``."""
        ns = model.namespace
        ttl_s = float(ttl) if ttl else self.default_ttl
        ctx = hashes[-1]
        man_key = manifest_key(ns, ctx)
        old_man, old_recs = await self._stored_state(model, hashes)
        old_metadata = dict(old_man.info.metadata) if old_man else {}
        merged_metadata = {**old_metadata, **(metadata or {})}
        if merged_metadata != old_metadata:  # labels stored before the limit existed stay re-puttable
            check_metadata(merged_metadata)  # before anything is written under the lease
        pin = pin or (old_man is not None and old_man.info.pinned)  # re-putting never unpins
        pin_sets = await _gather_bounded(self.backend.set_members(pins_key(ns, h)) for h in hashes)
        left = await _gather_bounded(
            (
                self._expiry(record_key(ns, h))
                for h, old in zip(hashes, old_recs, strict=True)
                if old is not None
            )
        )
        stored_left = iter(left)
        chunk_ttl: list[float | None] = []
        for pins, old in zip(pin_sets, old_recs, strict=True):
            remaining = next(stored_left) if old is not None else 0.0
            if pin or (pins - {ctx}):  # a chunk some pinned context holds stays pinned
                chunk_ttl.append(None)
            else:  # never shorten what other contexts rely on (an unpinned chunk with no expiry: a leak)
                chunk_ttl.append(max(ttl_s, remaining if remaining < math.inf else 0.0))
        records = [
            self._merged_record(model, i, h, ch, old, kept)
            for i, (h, ch, old) in enumerate(zip(hashes, chunks, old_recs, strict=True))
        ]
        shared = 0
        counted = _counted_manifest(old_man, old_recs)
        if counted is None:  # sidecars a sharing context left in these chunks are readable through this one
            keys = [
                sidecar_key(ns, h, name)
                for h, ch, old in zip(hashes, chunks, old_recs, strict=True)
                if old is not None
                for name in old.sidecars
                if name not in ch.sidecars
            ]
            for key, raw in zip(keys, await self.backend.get_many(keys) if keys else [], strict=True):
                env = self._open(key, raw, Kind.SIDECAR)
                shared += len(env.body) if env is not None else 0
        level_bytes, total_bytes = _context_bytes(counted, old_recs, chunks, records, shared)
        if byte_budget is not None:
            await _check_budget(total_bytes, byte_budget)

        # 1. blobs: rewrite any a delete freed since they were written or found, then set the TTL of
        # every blob the merged record lists (levels and sidecars a sharing context stored too: they must
        # not expire underneath this context) and of the blobs staged before the lease.
        present = await self.backend.exists_many([it.key for it in items])
        gone: dict[float | None, list[_BlobItem]] = defaultdict(list)
        for it, exists in zip(items, present, strict=True):
            if not exists:
                gone[chunk_ttl[it.chunk]].append(it)
        for t, lost in gone.items():
            await self._put_blobs(model, lost, t)
        keep: dict[float | None, list[str]] = defaultdict(list)
        for h, rec, t in zip(hashes, records, chunk_ttl, strict=True):
            keep[t] += [blob_key(ns, h, lv.level) for lv in rec.levels]
            keep[t] += [sidecar_key(ns, h, name) for name in rec.sidecars]
        for t, keys in keep.items():
            await self.backend.set_ttl(keys, t)
        rewritten = sum(len(it.data) for it, exists in zip(items, present, strict=True) if not exists)

        # 2. refcount and pin sets.
        await _gather_bounded(
            (self.backend.set_add(refs_key(ns, h), [ctx], t) for h, t in zip(hashes, chunk_ttl, strict=True))
        )
        if pin:
            await _gather_bounded(self.backend.set_add(pins_key(ns, h), [ctx], None) for h in hashes)

        # Before the records that make the additions visible: a commit cut short after charging and
        # retried charges twice (conservative); one cut short after the records would never charge.
        await self._charge_sharers(ns, ctx, hashes, old_recs, records, chunks)

        # 3. chunk records, 4. manifest, 5. name.
        recs_by_ttl: dict[float | None, list[tuple[str, bytes]]] = defaultdict(list)
        for h, info, t in zip(hashes, records, chunk_ttl, strict=True):
            key = record_key(ns, h)
            recs_by_ttl[t].append(
                (key, seal(key, Envelope(Kind.CHUNK_RECORD, model.model_id, info.SerializeToString())))
            )
        for t, pairs in recs_by_ttl.items():
            await self.backend.put_many(pairs, t)

        n = model.chunk_tokens
        name = name or (old_man.info.name if old_man else "")
        man_ttl = None if pin else ttl_s
        if man_ttl is not None and old_man is not None:  # a re-put by anyone must not cut the context short
            left_s = await self._expiry(man_key)
            man_ttl = None if left_s == math.inf else max(man_ttl, left_s)
        man = pb.Manifest(
            info=pb.ContextInfo(
                context_id=ctx,
                name=name,
                model=model_to_pb(model),
                num_chunks=len(hashes),
                num_tokens=len(hashes) * n,
                level_bytes=[pb.LevelInfo(level=lv, size_bytes=sz) for lv, sz in sorted(level_bytes.items())],
                total_bytes=total_bytes,
                pinned=pin,
                # Stored form: the configured TTL (-1 = put pinned); GetContext reports the remaining one.
                ttl_seconds=-1.0 if pin and not ttl else ttl_s,
                created_unix=old_man.info.created_unix if old_man else time.time(),
                # a re-put (a retry, one more level) keeps what it does not restate
                metadata=merged_metadata,
            ),
            chunk_hashes=hashes,
            token_ids=token_array(token_ids)[: len(hashes) * n].tolist(),
        )
        await self._put_manifest(ns, man, man_ttl)
        if name:
            nk = name_key(ns, name)
            await self.backend.put(nk, seal(nk, Envelope(Kind.NAME_INDEX, model.model_id, ctx)), man_ttl)
        if old_man is not None and old_man.info.name and old_man.info.name != name:  # renamed
            await self._drop_name(ns, old_man.info.name, ctx)
        return sum(1 for r in old_recs if r is not None), rewritten

    async def _charge_sharers(
        self,
        ns: str,
        ctx: bytes,
        hashes: Sequence[bytes],
        old_recs: Sequence[pb.ChunkInfo | None],
        records: Sequence[pb.ChunkInfo],
        chunks: Sequence[ChunkBlobs],
    ) -> None:
        """Add the levels and sidecars this put added to chunks other contexts share to those contexts'
        manifests: they can read them now, and the namespace quota must still count them once this
        context is deleted (the chunks stay for the others). Under the namespace lease."""
        added: dict[int, tuple[dict[int, int], int]] = {}  # chunk -> (bytes per new level, new sidecar bytes)
        for i, (old, rec, chunk) in enumerate(zip(old_recs, records, chunks, strict=True)):
            if old is None:
                continue
            had = {lv.level for lv in old.levels}
            levels = {lv.level: lv.size_bytes for lv in rec.levels if lv.level not in had}
            sidecars = sum(len(d) for name, d in chunk.sidecars.items() if name not in old.sidecars)
            if levels or sidecars:
                added[i] = (levels, sidecars)
        if not added:
            return
        sharers = await _gather_bounded(self.backend.set_members(refs_key(ns, hashes[i])) for i in added)
        level_delta: dict[bytes, dict[int, int]] = defaultdict(lambda: defaultdict(int))
        total_delta: dict[bytes, int] = defaultdict(int)
        for (levels, sidecars), refs in zip(added.values(), sharers, strict=True):
            for other in refs - {ctx}:
                for lv, size in levels.items():
                    level_delta[other][lv] += size
                total_delta[other] += sum(levels.values()) + sidecars

        async def charge(other: bytes, extra: int) -> None:
            key = manifest_key(ns, other)
            man = self._parse_manifest(key, await self.backend.get(key))
            left = await self._expiry(key)
            if man is None or left <= 0:  # expired or deleted meanwhile
                return
            sizes = {lv.level: lv.size_bytes for lv in man.info.level_bytes}
            for lv, size in level_delta[other].items():
                sizes[lv] = sizes.get(lv, 0) + size
            del man.info.level_bytes[:]
            merged = [pb.LevelInfo(level=lv, size_bytes=n) for lv, n in sorted(sizes.items())]
            man.info.level_bytes.extend(merged)
            man.info.total_bytes += extra
            await self._put_manifest(ns, man, None if left == math.inf else left)

        # A popular prefix chunk may be shared by thousands of contexts: bounded concurrency.
        await _gather_bounded(charge(other, extra) for other, extra in total_delta.items())

    # ----- lookup and reads -------------------------------------------------------------------

    async def lookup(
        self,
        model: ModelKey,
        token_ids: Sequence[int] | np.ndarray | None = None,
        hashes: Sequence[bytes] | None = None,
    ) -> LookupResult:
        """Longest committed, verified prefix of the context given by ``token_ids`` or ``hashes``."""
        if hashes is None:
            if token_ids is None:
                raise InvalidRequest("lookup needs token ids or chunk hashes")
            hashes = self.context_hashes(model, token_ids)
        else:
            if len(hashes) > self.max_context_chunks:
                raise LimitExceeded(f"{len(hashes)} chunk hashes > {self.max_context_chunks}")
            for h in hashes:
                if len(h) != HASH_BYTES:
                    raise InvalidRequest(f"chunk hashes are {HASH_BYTES} bytes, got one of {len(h)}")
        ns = model.namespace
        keys = [record_key(ns, h) for h in hashes]
        # A dead or slow shard shortens the prefix instead of failing the lookup (Redis Cluster).
        raws = await self.backend.get_many_available(keys) if keys else []
        found: list[pb.ChunkInfo] = []
        for i, (key, raw, h) in enumerate(zip(keys, raws, hashes, strict=True)):
            info = self._parse_record(key, raw, h, i)
            if info is None:
                break
            if (info.token_start, info.token_end) != (i * model.chunk_tokens, (i + 1) * model.chunk_tokens):
                # Hashes are the caller's claim about the model: ones made with another chunk size
                # would make every token count (and the blob shape check) wrong.
                raise InvalidRequest(
                    f"chunk hash {i} is of a {info.token_end - info.token_start}-token chunk; the request's "
                    f"model has chunk_tokens {model.chunk_tokens}"
                )
            found.append(info)
        self.metrics.lookup_chunks.labels("hit").inc(len(found))
        self.metrics.lookup_chunks.labels("miss").inc(len(hashes) - len(found))
        return LookupResult(model.chunk_tokens, found)

    async def read_blob(
        self, model: ModelKey, info: pb.ChunkInfo, level: int, *, cached: bool = True
    ) -> bytes | None:
        """The verified codec blob of chunk ``info`` at ``level``; None when missing or corrupt.

        ``cached=False`` reads storage even if the hot-chunk cache holds the blob, and leaves the cache as
        it is (integrity checks).
        """
        key = blob_key(model.namespace, info.hash, level)
        digest = next((lv.xxh3_64 for lv in info.levels if lv.level == level), 0)
        if cached and self.hot_cache.max_bytes:
            hit = self.hot_cache.get(key, digest)
            self.metrics.hot_cache_reads.labels("miss" if hit is None else "hit").inc()
            if hit is not None:
                self.metrics.chunk_reads.labels("hit").inc()
                return hit
        raw = await self.backend.get(key)
        if raw is None:
            self.metrics.chunk_reads.labels("miss").inc()
            log.info("chunk miss key=%s", key)
            return None
        env = self._open(key, raw, Kind.CHUNK)
        body = None if env is None else env.body
        if env is not None and env.level != level:
            self._corrupt(key, Kind.CHUNK, f"envelope level {env.level} != {level}")
            body = None
        if body is not None:
            try:
                binfo = codec.inspect(body)
                if binfo.level != level or binfo.shape[2] != model.chunk_tokens:
                    raise codec.CodecError(f"blob level {binfo.level} / shape {binfo.shape} do not match")
            except codec.CodecError as e:
                self._corrupt(key, Kind.CHUNK, str(e))
                body = None
        self.metrics.chunk_reads.labels("hit" if body is not None else "corrupt").inc()
        if body is None:
            await self._drop_corrupt(key, raw)
        # A read past the cache (an integrity scan) does not fill it: a scan would flush the hot set.
        if (
            cached
            and body is not None
            and self.hot_cache.admits(len(body))  # no hashing of blobs the cache would not keep
            and digest == xxhash.xxh3_64_intdigest(body)
        ):
            self.hot_cache.put(key, digest, body)
            self.metrics.hot_cache_bytes.set(self.hot_cache.stats().bytes)
        return body

    async def read_sidecar(self, model: ModelKey, info: pb.ChunkInfo, name: str) -> bytes | None:
        """The verified sidecar ``name`` of chunk ``info``; None when missing or corrupt."""
        key = sidecar_key(model.namespace, info.hash, name)
        raw = await self.backend.get(key)
        env = self._open(key, raw, Kind.SIDECAR)
        if raw is not None and env is None:
            await self._drop_corrupt(key, raw)
        return None if env is None else env.body

    async def _drop_corrupt(self, key: str, raw: bytes) -> None:
        """Delete a blob that failed verification: puts skip blobs that exist, so only a missing one is
        rewritten by the next upload of its context (the chunk is unusable either way).

        Only if the key still holds those bytes (another reader may have dropped it and a put rewritten
        it meanwhile; backends have no compare-and-delete, so this narrows the window, it does not close
        it), and never a record of a newer envelope version, which a newer front end can read."""
        if is_newer_version(raw):
            return
        if await self.backend.get(key) != raw:
            return
        await self.backend.delete_many([key])
        self.hot_cache.discard(key)
        log.warning("corrupt blob deleted key=%s (the next put of its context rewrites it)", key)

    # ----- contexts ---------------------------------------------------------------------------

    async def resolve(self, model: ModelKey, query: ContextQuery) -> bytes:
        """Context id named by ``query`` (token ids, context id or name); raises ``ContextNotFound``."""
        if query.context_id is not None:
            if len(query.context_id) != HASH_BYTES:
                raise InvalidRequest(f"context ids are {HASH_BYTES} bytes, got {len(query.context_id)}")
            return query.context_id
        if query.token_ids is not None:
            hashes = self.context_hashes(model, query.token_ids)
            if not hashes:
                raise InvalidRequest(f"no full chunk: need at least {model.chunk_tokens} token ids")
            return hashes[-1]
        if query.name:
            check_context_name(query.name)
            ns = model.namespace
            key = name_key(ns, query.name)
            env = self._open(key, await self.backend.get(key), Kind.NAME_INDEX)
            if env is not None and len(env.body) == HASH_BYTES:
                return env.body
            # A context named before the key format changed. The old key is ambiguous across namespaces,
            # so it counts only if this namespace holds a context of that id under that very name.
            key = legacy_name_key(ns, query.name)
            env = self._open(key, await self.backend.get(key), Kind.NAME_INDEX)
            if env is not None and len(env.body) == HASH_BYTES:
                man = self._parse_manifest(
                    manifest_key(ns, env.body), await self.backend.get(manifest_key(ns, env.body))
                )
                if man is not None and man.info.name == query.name:
                    return env.body
            raise ContextNotFound(f"no context named {query.name!r} in namespace {ns!r}")
        raise InvalidRequest("a context reference needs token ids, a context id or a name")

    async def manifest(self, ns: str, context_id: bytes) -> pb.Manifest:
        """The verified manifest of a committed context; raises ``ContextNotFound``."""
        key = manifest_key(ns, context_id)
        man = self._parse_manifest(key, await self.backend.get(key))
        if man is None:
            raise ContextNotFound(f"no committed context {context_id.hex()[:16]}… in namespace {ns!r}")
        return man

    async def _with_remaining_ttl(self, ns: str, summary: pb.ContextInfo) -> pb.ContextInfo:
        info = pb.ContextInfo()
        info.CopyFrom(summary)
        try:
            remaining = await self.backend.get_ttl(manifest_key(ns, info.context_id))
        except KeyError:
            raise ContextNotFound(f"context {info.context_id.hex()[:16]}… expired") from None
        info.ttl_seconds = -1.0 if remaining is None else remaining
        return info

    async def get_context(self, model: ModelKey, query: ContextQuery) -> pb.ContextInfo:
        ctx = await self.resolve(model, query)
        man = await self.manifest(model.namespace, ctx)
        info = await self._with_remaining_ttl(model.namespace, man.info)
        info.token_ids.extend(man.token_ids)  # lets operators re-read a context they only know by id
        return info

    async def _records(self, ns: str, hashes: Sequence[bytes]) -> list[pb.ChunkInfo | None]:
        keys = [record_key(ns, h) for h in hashes]
        raws = await self.backend.get_many(keys)
        return [
            self._parse_record(k, r, h, i) for i, (k, r, h) in enumerate(zip(keys, raws, hashes, strict=True))
        ]

    async def delete(self, model: ModelKey, query: ContextQuery) -> int:
        """Drop a context; frees chunks no other context references. Returns the chunks freed.

        Chunks are released before the manifest goes: a delete cut short by a backend error leaves the
        context findable, and running it again finishes the job.
        """
        ns = model.namespace
        async with self.namespace_lease(ns, freeing=True):  # a full store must stay deletable
            ctx = await self.resolve(model, query)
            man = await self.manifest(ns, ctx)
            hashes = list(man.chunk_hashes)
            records = await self._records(ns, hashes)

            async def release(h: bytes, rec: pb.ChunkInfo | None) -> bool:
                refs = refs_key(ns, h)
                counted = ctx in await self.backend.set_members(refs)
                refs_left = await self.backend.set_remove(refs, [ctx])
                pins_left = await self.backend.set_remove(pins_key(ns, h), [ctx])
                keys = _chunk_keys(ns, h, rec.sidecars if rec else ())
                if refs_left == 0 and counted:
                    await self.backend.delete_many(keys)
                    for key in keys:
                        self.hot_cache.discard(key)
                    self.metrics.hot_cache_bytes.set(self.hot_cache.stats().bytes)
                    return True
                if refs_left == 0:
                    # No refcount to go by (evicted, or released by an earlier try of this delete): other
                    # contexts may still read the chunk, so it is not freed, only kept from living forever.
                    if pins_left == 0 and await self._expiry(record_key(ns, h)) == math.inf:
                        await self.backend.set_ttl(keys, self.default_ttl)
                    return False
                if man.info.pinned and pins_left == 0:
                    await self.backend.set_ttl(keys, await self._unpinned_ttl(ns, h, ctx, self.default_ttl))
                return False

            freed = await _gather_bounded((release(h, r) for h, r in zip(hashes, records, strict=True)))
            await self.backend.delete_many([manifest_key(ns, ctx), info_key(ns, ctx)])
            await self._drop_name(ns, man.info.name, ctx)
        return sum(freed)

    async def _unpinned_ttl(self, ns: str, chunk_hash: bytes, ctx: bytes, floor: float) -> float | None:
        """TTL for chunk ``chunk_hash`` once ``ctx`` no longer pins it: at least ``floor``, and as long as
        the longest-lived other context referencing it still has (``None``: one never expires)."""
        others = await self.backend.set_members(refs_key(ns, chunk_hash)) - {ctx}
        left = await _gather_bounded(self._expiry(manifest_key(ns, other)) for other in others)
        longest = max([floor, *left])
        return None if longest == math.inf else longest

    async def _name_keys(self, ns: str, name: str, ctx: bytes) -> list[str]:
        """The name index keys (current and legacy) that name context ``ctx``."""
        if not name:
            return []
        keys = [name_key(ns, name), legacy_name_key(ns, name)]
        raws = await self.backend.get_many(keys)
        envs = [self._open(k, raw, Kind.NAME_INDEX) for k, raw in zip(keys, raws, strict=True)]
        return [k for k, env in zip(keys, envs, strict=True) if env is not None and env.body == ctx]

    async def _drop_name(self, ns: str, name: str, ctx: bytes) -> None:
        if keys := await self._name_keys(ns, name, ctx):
            await self.backend.delete_many(keys)

    async def set_pinned(self, model: ModelKey, query: ContextQuery, pinned: bool) -> tuple[bool, int]:
        """Pin (no TTL, never evicted) or unpin a context; returns ``(pinned, chunks)``.

        Unpinning restores the context's TTL on chunks that no other pinned context holds (or the longer
        remaining TTL of another context sharing the chunk).
        """
        ns = model.namespace
        # a delete in between must not be undone by our manifest; unpinning must work on a full store
        async with self.namespace_lease(ns, freeing=not pinned):
            ctx = await self.resolve(model, query)
            man = await self.manifest(ns, ctx)
            hashes = list(man.chunk_hashes)
            records = await self._records(ns, hashes)
            ttl = man.info.ttl_seconds if man.info.ttl_seconds > 0 else self.default_ttl

            async def apply(h: bytes, rec: pb.ChunkInfo | None) -> None:
                keys = _chunk_keys(ns, h, rec.sidecars if rec else ())
                if pinned:
                    await self.backend.set_add(pins_key(ns, h), [ctx], None)
                    await self.backend.set_add(refs_key(ns, h), [ctx], None)
                    await self.backend.set_ttl(keys, None)
                elif await self.backend.set_remove(pins_key(ns, h), [ctx]) == 0:
                    await self.backend.set_ttl(keys, await self._unpinned_ttl(ns, h, ctx, ttl))

            await _gather_bounded((apply(h, r) for h, r in zip(hashes, records, strict=True)))
            man.info.pinned = pinned
            man_ttl = None if pinned else ttl
            await self._put_manifest(ns, man, man_ttl)
            if names := await self._name_keys(ns, man.info.name, ctx):
                await self.backend.set_ttl(names, man_ttl)
        return pinned, len(hashes)

    async def _put_manifest(self, ns: str, man: pb.Manifest, ttl: float | None) -> None:
        """Write a context's manifest and its info summary (same TTL: they expire together)."""
        ctx, model_id = man.info.context_id, man.info.model.model_id
        mk, ik = manifest_key(ns, ctx), info_key(ns, ctx)
        await self.backend.put_many(
            [
                (mk, seal(mk, Envelope(Kind.MANIFEST, model_id, man.SerializeToString()))),
                (ik, seal(ik, Envelope(Kind.CONTEXT_INFO, model_id, man.info.SerializeToString()))),
            ],
            ttl,
        )

    async def context_infos(self, namespace: str | None) -> list[pb.ContextInfo]:
        """Stored summaries of the committed contexts of ``namespace`` (None = every namespace), in no
        order; ``ttl_seconds`` is the configured TTL, not the remaining one.

        Reads the small info keys, not the manifests (which hold every token id); a context without a
        readable info key (stored before they existed, or corrupt) is read from its manifest. An info key
        whose manifest is gone (evicted, or deleted by an older front end) does not count.
        """
        man_keys = {
            k
            async for k in self.backend.scan(_context_pattern(namespace, "man"))
            if _MANIFEST_KEY.fullmatch(k)
        }
        inf_keys = [
            k
            async for k in self.backend.scan(_context_pattern(namespace, "inf"))
            if _INFO_KEY.fullmatch(k) and k[:-3] + "man" in man_keys
        ]
        out: list[pb.ContextInfo] = []
        summarised: set[str] = set()
        for start in range(0, len(inf_keys), _MANIFEST_BATCH):
            batch = inf_keys[start : start + _MANIFEST_BATCH]
            for key, raw in zip(batch, await self.backend.get_many(batch), strict=True):
                env = self._open(key, raw, Kind.CONTEXT_INFO)
                info = pb.ContextInfo()
                try:
                    if env is None:
                        continue
                    info.ParseFromString(env.body)
                except Exception as e:  # see _parse_record
                    self._corrupt(key, Kind.CONTEXT_INFO, f"info body does not parse: {e}")
                    continue
                summarised.add(key[:-3] + "man")
                out.append(info)
        legacy = sorted(man_keys - summarised)
        for start in range(0, len(legacy), _MANIFEST_BATCH):
            batch = legacy[start : start + _MANIFEST_BATCH]
            for key, raw in zip(batch, await self.backend.get_many(batch), strict=True):
                if (man := self._parse_manifest(key, raw)) is not None:
                    out.append(man.info)
        # The scan pattern is a glob: "a:*" also matches namespace "a:b"; filter exactly.
        return [i for i in out if namespace is None or i.model.namespace == namespace]

    async def list_contexts(
        self, namespace: str = "", model_id: str = "", limit: int = 0
    ) -> list[pb.ContextInfo]:
        """Committed contexts of ``namespace`` (""=default), newest first, optionally of one model."""
        ns = namespace or DEFAULT_NAMESPACE
        infos = [i for i in await self.context_infos(ns) if not model_id or i.model.model_id == model_id]
        infos.sort(key=lambda i: (-i.created_unix, i.context_id))
        infos = infos[: limit or 1000]

        async def live(info: pb.ContextInfo) -> pb.ContextInfo | None:
            try:
                return await self._with_remaining_ttl(ns, info)
            except ContextNotFound:  # expired meanwhile: drops out
                return None

        return [i for i in await _gather_bounded(live(i) for i in infos) if i is not None]

    async def stat(self, namespace: str = "") -> pb.StatResponse:
        """Backend usage plus context counts of ``namespace`` ("" = whole store)."""
        stats = await self.backend.stats()
        infos = await self.context_infos(namespace or None)
        self.metrics.store_used_bytes.set(stats.used_bytes)
        self.metrics.store_keys.set(stats.keys)
        self.metrics.store_evictions.set(stats.evictions)
        return pb.StatResponse(
            backend=stats.name,
            used_bytes=stats.used_bytes,
            capacity_bytes=stats.capacity_bytes,
            keys=stats.keys,
            contexts=len(infos),
            pinned_contexts=sum(1 for i in infos if i.pinned),
            evictions=stats.evictions,
        )


def check_sidecar_name(name: str) -> None:
    if not _SIDECAR_NAME.fullmatch(name):
        raise InvalidRequest(f"sidecar name {name!r}: use 1-64 characters from [A-Za-z0-9._-]")


MAX_METADATA_ENTRIES = 64
MAX_METADATA_BYTES = 16 << 10  # keys and values, UTF-8: every List answer carries them


def check_metadata(metadata: Mapping[str, str]) -> None:
    """Metadata is a small label set, not storage: it is neither counted by quotas nor paged by List."""
    size = sum(len(k.encode()) + len(v.encode()) for k, v in metadata.items())
    if len(metadata) > MAX_METADATA_ENTRIES or size > MAX_METADATA_BYTES:
        raise InvalidRequest(
            f"context metadata holds {len(metadata)} entries / {size} bytes (with what the context already "
            f"has); the limit is {MAX_METADATA_ENTRIES} entries / {MAX_METADATA_BYTES} bytes"
        )


def check_context_name(name: str) -> None:
    if not _CONTEXT_NAME.fullmatch(name):
        raise InvalidRequest(f"context name {name!r}: use 1-200 characters from [A-Za-z0-9._/@:+-]")
