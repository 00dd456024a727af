"""Ephemeral in-process backend (``memory://``): a dict with TTLs and optional LRU byte capacity.

For tests and single-process demos. Every operation runs without awaiting, so each call is atomic with
respect to other tasks on the event loop (``put_if_absent`` races have exactly one winner).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence

from kvstore.backends._lru import LruIndex, glob_match
from kvstore.backends.base import BackendError, BackendStats, StorageBackend

_PURGE_INTERVAL_S = 1.0


def _wrongtype(key: str) -> BackendError:
    return BackendError(f"WRONGTYPE: key {key!r} holds a value of another type")


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds or None (pinned), got {ttl!r}")


class MemoryBackend(StorageBackend):
    """Dict-backed store. ``capacity`` in bytes (key + value lengths); 0 = unbounded."""

    name = "memory"

    def __init__(self, capacity: int = 0) -> None:
        self._data: dict[str, bytes | set[bytes]] = {}
        self._index = LruIndex(capacity)
        self._evictions = 0
        self._next_purge = 0.0

    # -- internals -------------------------------------------------------------------------------

    def _expiry(self, ttl: float | None) -> float | None:
        return None if ttl is None else time.monotonic() + ttl

    def _live(self, key: str) -> bytes | set[bytes] | None:
        """The value of ``key`` unless missing or expired (expired keys are dropped here)."""
        if key not in self._data:
            return None
        exp = self._index.expires_at(key)
        if exp is not None and exp <= time.monotonic():
            self._drop(key)
            return None
        return self._data[key]

    def _drop(self, key: str) -> bool:
        self._index.remove(key)
        return self._data.pop(key, None) is not None

    def _purge(self, force: bool = False) -> None:
        now = time.monotonic()
        if force or now >= self._next_purge:
            self._next_purge = now + _PURGE_INTERVAL_S
            for key in self._index.expired(now):
                self._drop(key)

    def _store(self, items: Sequence[tuple[str, bytes | set[bytes]]], expires_at: float | None) -> None:
        self._purge()
        sized = [(k, len(k.encode()) + _value_size(v)) for k, v in items]
        for victim in self._index.victims(sized, time.monotonic()):  # raises BackendFull before any change
            self._drop(victim)
            self._evictions += 1
        for (key, value), (_, size) in zip(items, sized, strict=True):
            self._data[key] = value
            self._index.set(key, size, expires_at)

    # -- StorageBackend --------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for key in keys:
            value = self._live(key)
            if isinstance(value, set):
                raise _wrongtype(key)
            if value is not None:
                self._index.touch(key)
            out.append(value)
        return out

    async def put_many(self, items: Sequence[tuple[str, bytes]], ttl: float | None) -> None:
        _check_ttl(ttl)
        self._store([(k, bytes(v)) for k, v in items], self._expiry(ttl))

    async def put_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        _check_ttl(ttl)
        if self._live(key) is not None:
            return False
        self._store([(key, bytes(value))], self._expiry(ttl))
        return True

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [self._live(k) is not None for k in keys]

    async def delete_many(self, keys: Sequence[str]) -> int:
        return sum(self._live(k) is not None and self._drop(k) for k in keys)

    async def set_ttl(self, keys: Sequence[str], ttl: float | None) -> None:
        _check_ttl(ttl)
        for key in keys:
            if self._live(key) is not None:
                self._index.set_expiry(key, self._expiry(ttl))

    async def get_ttl(self, key: str) -> float | None:
        if self._live(key) is None:
            raise KeyError(key)
        exp = self._index.expires_at(key)
        return None if exp is None else max(0.0, exp - time.monotonic())

    async def set_add(self, key: str, members: Sequence[bytes], ttl: float | None) -> int:
        _check_ttl(ttl)
        current = self._live(key)
        if isinstance(current, bytes):
            raise _wrongtype(key)
        merged = set(current or ()) | {bytes(m) for m in members}
        if not merged:  # like SADD with nothing to add: no empty set is created
            return 0
        self._store([(key, merged)], self._expiry(ttl))
        return len(merged)

    async def set_remove(self, key: str, members: Sequence[bytes]) -> int:
        current = self._live(key)
        if current is None:
            return 0
        if isinstance(current, bytes):
            raise _wrongtype(key)
        remaining = current - {bytes(m) for m in members}
        if not remaining:
            self._drop(key)
            return 0
        self._data[key] = remaining
        # shrinking never needs eviction: re-record the size, keep the expiry
        self._index.set(key, len(key.encode()) + _value_size(remaining), self._index.expires_at(key))
        return len(remaining)

    async def set_members(self, key: str) -> set[bytes]:
        current = self._live(key)
        if isinstance(current, bytes):
            raise _wrongtype(key)
        return set(current or ())

    async def scan(self, match: str) -> AsyncIterator[str]:
        self._purge(force=True)
        for key in [k for k in self._data if glob_match(match, k)]:
            yield key

    async def stats(self) -> BackendStats:
        self._purge(force=True)
        return BackendStats(
            name=self.name,
            used_bytes=self._index.used,
            capacity_bytes=self._index.capacity,
            keys=len(self._data),
            evictions=self._evictions,
        )


def _value_size(value: bytes | set[bytes]) -> int:
    return len(value) if isinstance(value, bytes) else sum(len(m) for m in value)
