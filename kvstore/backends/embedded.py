"""The default backend: a persistent store on local disk (LMDB), with TTLs, pins and LRU byte capacity.

Why LMDB:

* Crash safety comes from its copy-on-write B+tree: a write transaction either commits whole or not at
  all, so a killed process never leaves a half-written record or a torn eviction. The environment is
  opened with ``metasync=False``: one fsync per commit; an OS crash can lose the last commits but
  never corrupts the file (LMDB's ``MDB_NOMETASYNC`` guarantee). Losing a recent *cache* entry is fine.
* Reads are copies straight out of an mmap (no read syscalls, no userspace page cache), which suits
  multi-MiB chunk values; big values go to overflow pages contiguously.
* One data file plus a lock file per directory; nothing to run or configure.
* The map size is a reservation of address space, not of disk: it starts at twice the capacity (or
  1 GiB when unbounded) and doubles on ``MapFullError`` (the transaction is retried).

Layout: three named databases in one environment. ``data``: key -> value (a set is stored as one
encoded value); ``meta``: key -> fixed 40-byte record (format version, kind, absolute expiry in Unix
seconds (0 = pinned), last-access stamp, value length, xxh3-64 of the value); ``info``: format magic +
version and the persistent eviction counter. Every value is verified against its checksum on read: a
rotten record reads as missing and is deleted, never returned.

LRU without a write per read: recency lives in an in-memory order (``LruIndex``) rebuilt at open by
sorting the stored access stamps. Reads only note the new stamp in memory; the stamps are written in
batches (piggybacked on the next write transaction, or a small flush every 1024 reads / 10 s, and at
close), so a crash only makes recency slightly stale. Byte accounting (key + value lengths) is the same
in-memory index; eviction removes least recently used *TTL* keys inside the same transaction as the write
that needs the room, so pinned keys are never evicted and a write that cannot fit (``BackendFull``)
changes nothing.

Every LMDB call runs on one dedicated worker thread: the event loop never blocks, all transactions (and
the in-memory index) are serialised without locks, and the map can be resized safely (LMDB requires that
no transaction of this process is open). The directory is locked (``flock``) against a second process.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

import lmdb
import xxhash

from kvstore.backends._lru import LruIndex, glob_match, glob_prefix
from kvstore.backends.base import BackendError, BackendFull, BackendStats, StorageBackend

log = logging.getLogger(__name__)
T = TypeVar("T")

_MAGIC = b"KVSLMDB\x00"
_FORMAT_VERSION = 1
_FORMAT = struct.Struct("<8sI")  # info["format"]: magic, version
_META = struct.Struct("<BBxxxxxxddQQ")  # record version, kind, expires_at, last_access, length, xxh3_64
_META_VERSION = 1
_BLOB, _SET = 0, 1
_U32 = struct.Struct("<I")
_MIN_MAP = 64 << 20
_TOUCH_FLUSH_COUNT = 1024
_TOUCH_FLUSH_S = 10.0
_PURGE_INTERVAL_S = 1.0


class _Meta:
    __slots__ = ("kind", "expires_at", "last_access", "length", "checksum")

    def __init__(self, kind: int, expires_at: float | None, last_access: float, length: int, checksum: int):
        self.kind = kind
        self.expires_at = expires_at
        self.last_access = last_access
        self.length = length
        self.checksum = checksum

    def pack(self) -> bytes:
        exp = 0.0 if self.expires_at is None else self.expires_at
        return _META.pack(_META_VERSION, self.kind, exp, self.last_access, self.length, self.checksum)

    @classmethod
    def unpack(cls, raw: bytes) -> _Meta | None:
        """None for a record this version cannot read (treated as corrupt)."""
        if len(raw) != _META.size:
            return None
        version, kind, exp, last_access, length, checksum = _META.unpack(raw)
        if version != _META_VERSION or kind not in (_BLOB, _SET):
            return None
        return cls(kind, None if exp == 0.0 else exp, last_access, length, checksum)

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


def _get(txn: lmdb.Transaction, kb: bytes, db: lmdb._Database) -> bytes | None:
    """``txn.get`` typed as bytes (the environment never hands out buffers)."""
    raw = txn.get(kb, db=db)
    return None if raw is None else bytes(raw)


def _encode_set(members: set[bytes]) -> bytes:
    parts = [_U32.pack(len(members))]
    for m in sorted(members):  # sorted: equal sets encode identically
        parts += [_U32.pack(len(m)), m]
    return b"".join(parts)


def _decode_set(raw: bytes) -> set[bytes]:
    (count,) = _U32.unpack_from(raw, 0)
    pos, out = 4, set()
    for _ in range(count):
        (n,) = _U32.unpack_from(raw, pos)
        out.add(raw[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if pos != len(raw):
        raise ValueError("trailing bytes in set record")
    return out


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds or None (pinned), got {ttl!r}")


def _wrongtype(key: str) -> BackendError:
    return BackendError(f"WRONGTYPE: key {key!r} holds a value of another type")


class EmbeddedBackend(StorageBackend):
    """LMDB store in directory ``path``; ``capacity`` in bytes (key + value lengths), 0 = unbounded.

    Opening is synchronous (it rebuilds the in-memory index from the stored metadata); all operations
    afterwards are async. Only one process may open a directory at a time (``BackendError`` otherwise).
    """

    name = "embedded"

    def __init__(self, path: str | os.PathLike[str], capacity: int = 0, map_size: int = 0) -> None:
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file: IO[bytes] | None = open(self.path / "kvstore.lock", "ab")  # noqa: SIM115
        try:
            fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._lock_file.close()
            raise BackendError(f"{self.path} is in use by another kvstore process") from None
        data_file = self.path / "data.mdb"
        existing = data_file.stat().st_size if data_file.exists() else 0
        if not map_size:
            map_size = max(_MIN_MAP, 2 * capacity if capacity else 1 << 30)
        try:
            self._env = lmdb.open(
                str(self.path), map_size=max(map_size, existing), max_dbs=3, subdir=True,
                metasync=False, sync=True, readahead=False, max_readers=16,
            )  # fmt: skip
        except lmdb.Error as e:
            self._release_lock()
            raise BackendError(f"cannot open embedded store at {self.path}: {e}") from e
        try:
            self._data = self._env.open_db(b"data")
            self._meta = self._env.open_db(b"meta")
            self._info = self._env.open_db(b"info")
            self._check_format()
        except BaseException as e:
            self._env.close()
            self._release_lock()
            if isinstance(e, lmdb.Error):
                raise BackendError(f"cannot open embedded store at {self.path}: {e}") from e
            raise
        self._index = LruIndex(capacity)
        self._evictions = 0
        self._touched: dict[str, float] = {}
        self._doomed: dict[str, bytes] = {}  # expired/corrupt key -> the meta record seen (delete if same)
        self._last_flush = time.time()
        self._next_purge = 0.0
        self._load_state()
        self._executor: ThreadPoolExecutor | None = ThreadPoolExecutor(1, thread_name_prefix="kvs-lmdb")

    # -- setup -----------------------------------------------------------------------------------

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the descriptor drops the flock
            self._lock_file = None

    def _check_format(self) -> None:
        with self._env.begin(write=True) as txn:
            raw = _get(txn, b"format", self._info)
            if raw is None:
                if txn.stat(self._meta)["entries"]:
                    raise BackendError(f"{self.path}: data without a format record")
                txn.put(b"format", _FORMAT.pack(_MAGIC, _FORMAT_VERSION), db=self._info)
                return
        if len(raw) != _FORMAT.size or _FORMAT.unpack(raw) != (_MAGIC, _FORMAT_VERSION):
            raise BackendError(f"{self.path}: not a kvstore LMDB store of format version {_FORMAT_VERSION}")

    def _load_state(self) -> None:
        """Rebuild byte accounting and LRU order (by stored access stamp) from committed metadata."""
        rows: list[tuple[float, str, int, float | None]] = []
        with self._env.begin() as txn:
            raw = _get(txn, b"evictions", self._info)
            self._evictions = struct.unpack("<Q", raw)[0] if raw else 0
            for kb, mraw in txn.cursor(db=self._meta):
                key = bytes(kb).decode()
                meta = _Meta.unpack(bytes(mraw))
                if meta is None:
                    self._doomed[key] = bytes(mraw)
                    continue
                rows.append((meta.last_access, key, len(kb) + meta.length, meta.expires_at))
        rows.sort()
        capacity = self._index.capacity
        self._index = LruIndex(capacity)
        for _, key, size, expires_at in rows:
            self._index.set(key, size, expires_at)

    # -- thread plumbing -------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., T], *args: object) -> T:
        if self._executor is None:
            raise BackendError("embedded backend is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _kb(self, key: str) -> bytes:
        kb = key.encode()
        if not 0 < len(kb) <= self._env.max_key_size():
            raise ValueError(f"key must be 1..{self._env.max_key_size()} UTF-8 bytes, got {len(kb)}")
        return kb

    def _write(self, body: Callable[[lmdb.Transaction, float], T]) -> T:
        """Run ``body`` in a write transaction that also flushes pending stamps and deletions.

        ``body`` mutates the index as it goes (so planning sees the transaction's view); if the
        transaction aborts, the index is rebuilt from the committed state.
        """
        while True:
            now = time.time()
            version = self._index.version
            try:
                with self._env.begin(write=True) as txn:
                    self._flush_pending(txn, now)
                    result = body(txn, now)
                self._touched.clear()
                self._doomed.clear()
                self._last_flush = now
                return result
            except lmdb.MapFullError:
                if self._index.version != version:
                    self._load_state()
                new_size = self._env.info()["map_size"] * 2
                log.info("embedded store %s: growing map to %d bytes", self.path, new_size)
                self._env.set_mapsize(new_size)
            except BaseException as e:
                if self._index.version != version:
                    self._load_state()
                if isinstance(e, lmdb.Error):
                    if "No space left" in str(e):
                        raise BackendFull(f"embedded store {self.path}: disk full") from e
                    raise BackendError(f"embedded store {self.path}: {e}") from e
                raise

    def _flush_pending(self, txn: lmdb.Transaction, now: float) -> None:
        if now >= self._next_purge:
            self._next_purge = now + _PURGE_INTERVAL_S
            for key in self._index.expired(now):
                self._doomed.setdefault(key, b"")
        for key, seen in self._doomed.items():
            kb = key.encode()
            raw = _get(txn, kb, self._meta)
            meta = _Meta.unpack(raw) if raw is not None else None
            # delete only what is still expired, or still the same corrupt record
            if raw is not None and (raw == seen or (meta is not None and meta.expired(now))):
                self._delete(txn, key, kb)
        for key, stamp in self._touched.items():
            kb = key.encode()
            raw = _get(txn, kb, self._meta)
            meta = _Meta.unpack(raw) if raw is not None else None
            if meta is not None and stamp > meta.last_access:
                meta.last_access = stamp
                txn.put(kb, meta.pack(), db=self._meta)

    def _delete(self, txn: lmdb.Transaction, key: str, kb: bytes) -> None:
        txn.delete(kb, db=self._data)
        txn.delete(kb, db=self._meta)
        self._index.remove(key)

    def _store(
        self, txn: lmdb.Transaction, now: float, items: Sequence[tuple[str, bytes, int]], exp: float | None
    ) -> None:
        """Write (key, payload, kind) records, evicting LRU TTL keys first if they do not fit."""
        kbs = [self._kb(k) for k, _, _ in items]
        victims = self._index.victims(
            [(k, len(kb) + len(p)) for (k, p, _), kb in zip(items, kbs, strict=True)], now
        )
        for victim in victims:
            self._delete(txn, victim, victim.encode())
        if victims:
            self._evictions += len(victims)
            txn.put(b"evictions", struct.pack("<Q", self._evictions), db=self._info)
        for (key, payload, kind), kb in zip(items, kbs, strict=True):
            meta = _Meta(kind, exp, now, len(payload), xxhash.xxh3_64_intdigest(payload))
            txn.put(kb, payload, db=self._data)
            txn.put(kb, meta.pack(), db=self._meta)
            self._index.set(key, len(kb) + len(payload), exp)

    def _read(self, txn: lmdb.Transaction, key: str, now: float) -> tuple[_Meta, bytes] | None:
        """The live, verified record of ``key`` (expired/corrupt ones are queued for deletion)."""
        kb = self._kb(key)
        raw = _get(txn, kb, self._meta)
        if raw is None:
            return None
        meta = _Meta.unpack(raw)
        if meta is None or meta.expired(now):
            self._doomed[key] = raw
            return None
        value = _get(txn, kb, self._data)
        if value is None or len(value) != meta.length or xxhash.xxh3_64_intdigest(value) != meta.checksum:
            log.warning("embedded store %s: corrupt record %r dropped", self.path, key)
            self._doomed[key] = raw
            return None
        return meta, value

    def _maybe_flush_touches(self) -> None:
        if (
            self._doomed
            or len(self._touched) >= _TOUCH_FLUSH_COUNT
            or (self._touched and time.time() - self._last_flush >= _TOUCH_FLUSH_S)
        ):
            self._write(lambda txn, now: None)

    # -- blocking implementations (worker thread) ----------------------------------------------------

    def _get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.time()
        out: list[bytes | None] = []
        with self._env.begin() as txn:
            for key in keys:
                rec = self._read(txn, key, now)
                if rec is not None and rec[0].kind != _BLOB:
                    raise _wrongtype(key)
                if rec is not None:
                    self._touched[key] = now
                    self._index.touch(key)
                out.append(None if rec is None else rec[1])
        self._maybe_flush_touches()
        return out

    def _put_if_absent(self, key: str, value: bytes, exp: float | None) -> bool:
        def body(txn: lmdb.Transaction, now: float) -> bool:
            if self._read(txn, key, now) is not None:
                return False
            self._store(txn, now, [(key, value, _BLOB)], exp)
            return True

        return self._write(body)

    def _exists_many(self, keys: Sequence[str]) -> list[bool]:
        now = time.time()
        with self._env.begin() as txn:
            out = []
            for key in keys:
                raw = _get(txn, self._kb(key), self._meta)
                meta = _Meta.unpack(raw) if raw is not None else None
                out.append(meta is not None and not meta.expired(now))
            return out

    def _delete_many(self, keys: Sequence[str]) -> int:
        def body(txn: lmdb.Transaction, now: float) -> int:
            n = 0
            for key in dict.fromkeys(keys):
                kb = self._kb(key)
                raw = _get(txn, kb, self._meta)
                if raw is None:
                    continue
                meta = _Meta.unpack(raw)
                n += meta is not None and not meta.expired(now)
                self._delete(txn, key, kb)
            return n

        return self._write(body)

    def _set_ttl(self, keys: Sequence[str], ttl: float | None) -> None:
        def body(txn: lmdb.Transaction, now: float) -> None:
            exp = None if ttl is None else now + ttl
            for key in keys:
                kb = self._kb(key)
                raw = _get(txn, kb, self._meta)
                meta = _Meta.unpack(raw) if raw is not None else None
                if meta is None or meta.expired(now):
                    continue
                meta.expires_at = exp
                txn.put(kb, meta.pack(), db=self._meta)
                self._index.set_expiry(key, exp)

        self._write(body)

    def _get_ttl(self, key: str) -> float | None:
        now = time.time()
        with self._env.begin() as txn:
            raw = _get(txn, self._kb(key), self._meta)
        meta = _Meta.unpack(raw) if raw is not None else None
        if meta is None or meta.expired(now):
            raise KeyError(key)
        return None if meta.expires_at is None else meta.expires_at - now

    def _read_set(self, txn: lmdb.Transaction, key: str, now: float) -> tuple[_Meta, set[bytes]] | None:
        rec = self._read(txn, key, now)
        if rec is None:
            return None
        if rec[0].kind != _SET:
            raise _wrongtype(key)
        return rec[0], _decode_set(rec[1])

    def _set_add(self, key: str, members: Sequence[bytes], ttl: float | None) -> int:
        def body(txn: lmdb.Transaction, now: float) -> int:
            rec = self._read_set(txn, key, now)
            merged = (rec[1] if rec else set()) | {bytes(m) for m in members}
            if not merged:  # like SADD with nothing to add: no empty set is created
                return 0
            self._store(txn, now, [(key, _encode_set(merged), _SET)], None if ttl is None else now + ttl)
            return len(merged)

        return self._write(body)

    def _set_remove(self, key: str, members: Sequence[bytes]) -> int:
        def body(txn: lmdb.Transaction, now: float) -> int:
            rec = self._read_set(txn, key, now)
            if rec is None:
                return 0
            remaining = rec[1] - {bytes(m) for m in members}
            if remaining:
                self._store(txn, now, [(key, _encode_set(remaining), _SET)], rec[0].expires_at)
            else:
                self._delete(txn, key, key.encode())
            return len(remaining)

        return self._write(body)

    def _set_members(self, key: str) -> set[bytes]:
        with self._env.begin() as txn:
            rec = self._read_set(txn, key, time.time())
        return rec[1] if rec else set()

    def _scan(self, match: str) -> list[str]:
        now = time.time()
        prefix = glob_prefix(match).encode()
        out: list[str] = []
        with self._env.begin() as txn:
            cursor = txn.cursor(db=self._meta)
            if not cursor.set_range(prefix):
                return out
            for kb, raw in cursor:
                if not bytes(kb).startswith(prefix):
                    break
                key = bytes(kb).decode()
                meta = _Meta.unpack(bytes(raw))
                if meta is not None and not meta.expired(now) and glob_match(match, key):
                    out.append(key)
        return out

    def _stats(self) -> BackendStats:
        self._next_purge = 0.0  # count only live keys
        self._write(lambda txn, now: None)
        return BackendStats(
            name=self.name,
            used_bytes=self._index.used,
            capacity_bytes=self._index.capacity,
            keys=len(self._index),
            evictions=self._evictions,
        )

    # -- StorageBackend --------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self._run(self._get_many, list(keys))

    async def put_many(self, items: Sequence[tuple[str, bytes]], ttl: float | None) -> None:
        _check_ttl(ttl)
        # the expiry is stamped when the transaction runs, not when the call was queued
        records = [(k, bytes(v), _BLOB) for k, v in items]
        await self._run(
            self._write,
            lambda txn, now: self._store(txn, now, records, None if ttl is None else now + ttl),
        )

    async def put_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        _check_ttl(ttl)
        return await self._run(
            lambda: self._put_if_absent(key, bytes(value), None if ttl is None else time.time() + ttl)
        )

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return await self._run(self._exists_many, list(keys))

    async def delete_many(self, keys: Sequence[str]) -> int:
        return await self._run(self._delete_many, list(keys))

    async def set_ttl(self, keys: Sequence[str], ttl: float | None) -> None:
        _check_ttl(ttl)
        await self._run(self._set_ttl, list(keys), ttl)

    async def get_ttl(self, key: str) -> float | None:
        return await self._run(self._get_ttl, key)

    async def set_add(self, key: str, members: Sequence[bytes], ttl: float | None) -> int:
        _check_ttl(ttl)
        return await self._run(self._set_add, key, list(members), ttl)

    async def set_remove(self, key: str, members: Sequence[bytes]) -> int:
        return await self._run(self._set_remove, key, list(members))

    async def set_members(self, key: str) -> set[bytes]:
        return await self._run(self._set_members, key)

    async def scan(self, match: str) -> AsyncIterator[str]:
        for key in await self._run(self._scan, match):
            yield key

    async def stats(self) -> BackendStats:
        return await self._run(self._stats)

    async def close(self) -> None:
        """Flush pending access stamps and release the directory (idempotent)."""
        if self._executor is None:
            return
        executor, self._executor = self._executor, None
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=True)
            self._release_lock()

    def _close_sync(self) -> None:
        try:
            if self._touched or self._doomed:
                self._write(lambda txn, now: None)
        finally:
            self._env.close()
