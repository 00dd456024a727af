"""Front-end hot-chunk cache: verified codec blobs kept in process memory, LRU by bytes.

Reusable prefixes are skewed (one system prompt, many workers), so a front end that keeps the blobs it
streamed recently serves hot chunks without a storage round trip and without re-verifying them.

Coherence across front ends comes from the chunk records, which every stream reads fresh from storage:
a record names each level's blob by size and xxh3_64 digest, an entry is stored only after the blob read
from storage passed its envelope checksum *and* matched the record's digest, and a lookup hits only under
the digest the current record names. A context deleted and re-put with other bytes therefore never gets
the old bytes from any front end's cache; an entry whose record is gone is simply never asked for again
and ages out.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class CacheStats:
    """Counters since start: ``hits``/``misses`` of ``get``, ``entries`` and ``bytes`` held now."""

    hits: int
    misses: int
    entries: int
    bytes: int


class HotChunkCache:
    """LRU map ``storage key -> (digest, blob)`` holding at most ``max_bytes`` of blob bytes.

    ``max_bytes = 0`` disables it (every ``get`` misses, ``put`` keeps nothing). A blob larger than an
    eighth of the budget is not kept: one huge chunk must not flush the whole hot set. Single event loop:
    no locking.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[int, bytes]] = OrderedDict()
        self._bytes = 0
        self._hits = 0
        self._misses = 0

    def get(self, key: str, digest: int) -> bytes | None:
        """The blob cached under ``key`` if it was stored with ``digest`` (``0`` never hits)."""
        entry = self._entries.get(key) if digest else None
        if entry is None or entry[0] != digest:
            self._misses += 1
            return None
        self._entries.move_to_end(key)
        self._hits += 1
        return entry[1]

    def admits(self, nbytes: int) -> bool:
        """Whether a blob of ``nbytes`` would be kept (check before hashing a blob only to store it)."""
        return self.max_bytes > 0 and nbytes <= self.max_bytes // 8

    def put(self, key: str, digest: int, blob: bytes) -> bool:
        """Keep ``blob`` (already verified to hash to ``digest``); returns whether it was kept."""
        if not digest or not self.admits(len(blob)):
            return False
        self.discard(key)
        self._entries[key] = (digest, blob)
        self._bytes += len(blob)
        while self._bytes > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= len(old)
        return True

    def discard(self, key: str) -> None:
        """Forget ``key`` (its chunk was deleted here)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= len(entry[1])

    def stats(self) -> CacheStats:
        return CacheStats(self._hits, self._misses, len(self._entries), self._bytes)
