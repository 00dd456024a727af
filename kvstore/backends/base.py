"""The storage backend interface: a small async key-value store with TTLs, pins and sets.

kvstream's data model (kvstore/store.py) is written against this interface only; every backend passes
the same test suite (tests/test_backends.py).

Semantics every backend guarantees:

* ``ttl=None`` means *pinned*: no expiry and never evicted (Redis: no TTL + ``volatile-*`` eviction
  policy; embedded: excluded from LRU eviction). A number is a TTL in seconds; such keys may also be
  evicted under memory pressure (LRU).
* Values are opaque bytes. A backend never returns bytes other than those written for that key, but
  callers still verify every record (kvstore/envelope.py): storage can rot.
* All multi-key operations are pipelines of single-key commands: keys may live on different Redis
  Cluster slots. Keys sharing a ``{hash tag}`` are co-located.
* ``BackendFull`` is raised when a write cannot be stored (capacity, Redis ``OOM command not allowed``);
  nothing already stored is affected.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass


class BackendError(RuntimeError):
    """The backend is unreachable or failed (maps to UNAVAILABLE)."""


class BackendFull(BackendError):
    """The write does not fit (maps to RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True)
class BackendStats:
    name: str
    used_bytes: int
    capacity_bytes: int  # 0 = unknown / unbounded
    keys: int
    evictions: int
    partial_read_failures: int = 0  # multi-key reads where one shard failed and its keys read as misses


class StorageBackend(abc.ABC):
    """Async key-value backend. Keys are ``str``, values ``bytes``."""

    name: str = "abstract"

    @abc.abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values of ``keys`` in order (``None`` where missing/expired). Touches LRU recency."""

    async def get_many_available(self, keys: Sequence[str]) -> list[bytes | None]:
        """Like ``get_many`` for reads where a shorter answer beats none (a lookup's prefix): a backend of
        independent shards may answer the keys of a failed or slow shard as misses instead of failing
        the whole read. Never use it where a miss would be acted on (a put merging old records)."""
        return await self.get_many(keys)

    async def get(self, key: str) -> bytes | None:
        return (await self.get_many([key]))[0]

    @abc.abstractmethod
    async def put_many(self, items: Sequence[tuple[str, bytes]], ttl: float | None) -> None:
        """Store all items with one TTL (``None`` = pinned). Overwrites."""

    async def put(self, key: str, value: bytes, ttl: float | None) -> None:
        await self.put_many([(key, value)], ttl)

    @abc.abstractmethod
    async def put_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        """Store only if ``key`` does not exist; True if this call stored it."""

    @abc.abstractmethod
    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        """Existence hints (a later read may still miss)."""

    @abc.abstractmethod
    async def delete_many(self, keys: Sequence[str]) -> int:
        """Delete keys; returns how many existed."""

    @abc.abstractmethod
    async def set_ttl(self, keys: Sequence[str], ttl: float | None) -> None:
        """Change the TTL of existing keys (``None`` = pin). Missing keys are ignored."""

    @abc.abstractmethod
    async def get_ttl(self, key: str) -> float | None:
        """Remaining TTL in seconds; ``None`` if pinned; raises ``KeyError`` if missing."""

    @abc.abstractmethod
    async def set_add(self, key: str, members: Sequence[bytes], ttl: float | None) -> int:
        """Add members to the set at ``key`` (created if needed) and set its TTL; returns new size."""

    @abc.abstractmethod
    async def set_remove(self, key: str, members: Sequence[bytes]) -> int:
        """Remove members; deletes the key when it becomes empty; returns new size."""

    @abc.abstractmethod
    async def set_members(self, key: str) -> set[bytes]:
        """Members of the set at ``key`` (empty if missing)."""

    @abc.abstractmethod
    def scan(self, match: str) -> AsyncIterator[str]:
        """All keys matching a glob pattern (``*`` wildcard), across every shard."""

    @abc.abstractmethod
    async def stats(self) -> BackendStats:
        """Usage figures for ``Stat`` and metrics."""

    async def ping(self) -> bool:
        """True if the backend answers (health checks)."""
        await self.exists_many(["kvs:ping"])
        return True

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections/handles."""
