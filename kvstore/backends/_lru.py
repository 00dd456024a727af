"""In-memory recency order, expiry times and byte accounting shared by the memory and embedded backends.

Only keys with a TTL are evictable; pinned keys (``ttl=None``) are counted in ``used`` but never chosen
as victims. Expiry times are absolute, on whatever clock the owning backend uses (the embedded backend
needs wall time because its times survive restarts).
"""

from __future__ import annotations

import itertools
import re
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from functools import lru_cache

from kvstore.backends.base import BackendFull


class LruIndex:
    """Sizes of all keys and the LRU order (oldest first) of the evictable ones."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity  # bytes; 0 = unbounded
        self.used = 0
        self.version = 0  # bumped by every change, so owners can tell whether to roll back
        self._sizes: dict[str, int] = {}
        self._evictable: OrderedDict[str, float] = OrderedDict()  # key -> expires_at

    def __len__(self) -> int:
        return len(self._sizes)

    def __contains__(self, key: str) -> bool:
        return key in self._sizes

    def keys(self) -> Iterable[str]:
        return self._sizes.keys()

    def set(self, key: str, size: int, expires_at: float | None) -> None:
        """Record ``key`` as most recently used (``expires_at=None``: pinned)."""
        self.remove(key)
        self.version += 1
        self._sizes[key] = size
        self.used += size
        if expires_at is not None:
            self._evictable[key] = expires_at

    def set_expiry(self, key: str, expires_at: float | None) -> None:
        if key not in self._sizes:
            return
        self.version += 1
        if expires_at is None:
            self._evictable.pop(key, None)
        else:
            self._evictable[key] = expires_at
            self._evictable.move_to_end(key)

    def expires_at(self, key: str) -> float | None:
        return self._evictable.get(key)

    def size(self, key: str) -> int:
        return self._sizes.get(key, 0)

    def touch(self, key: str) -> None:
        if key in self._evictable:
            self._evictable.move_to_end(key)

    def remove(self, key: str) -> int:
        size = self._sizes.pop(key, None)
        if size is None:
            return 0
        self.version += 1
        self.used -= size
        self._evictable.pop(key, None)
        return size

    def expired(self, now: float) -> list[str]:
        """Keys whose expiry time has passed (O(evictable keys); callers rate-limit it)."""
        return [k for k, exp in self._evictable.items() if exp <= now]

    def victims(self, items: Sequence[tuple[str, int]], now: float) -> list[str]:
        """Keys to evict so that ``items`` (key, new size) fit; raises ``BackendFull`` if they cannot.

        Expired keys not yet purged go first (``now``: the clock of the expiry times), then live TTL keys
        in LRU order. Keys being written are never victims (their old size is freed by the overwrite
        itself), and a write that does not grow the store evicts nothing even when it is over capacity
        (e.g. reopened with a smaller one): removing a set member must always work.
        """
        if not self.capacity:
            return []
        new_sizes = dict(items)  # a key repeated in one batch: the last value wins
        growth = sum(new_sizes.values()) - sum(self.size(k) for k in new_sizes)
        need = self.used + growth - self.capacity
        if growth <= 0 or need <= 0:
            return []
        out: list[str] = []
        expired = [k for k, exp in self._evictable.items() if exp <= now]
        for key in itertools.chain(expired, (k for k in self._evictable if k not in set(expired))):
            if key in new_sizes:
                continue
            out.append(key)
            need -= self._sizes[key]
            if need <= 0:
                return out
        raise BackendFull(
            f"write of {sum(new_sizes.values())} bytes does not fit: capacity {self.capacity} bytes, "
            f"{self.used} used, of which pinned keys cannot be evicted"
        )


@lru_cache(maxsize=256)
def _glob_regex(pattern: str) -> re.Pattern[str]:
    """Redis's glob rules (``stringmatchlen``): ``*``, ``?``, ``[...]`` with ``^`` negation and ``a-z``
    ranges (either order), ``\\x`` a literal ``x`` (also inside brackets); an unclosed ``[`` takes the
    rest of the pattern as its set. (fnmatch differs: no escapes, ``!`` instead of ``^``.)"""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        ch = pattern[i]
        if ch == "\\" and i + 1 < n:
            out.append(re.escape(pattern[i + 1]))
            i += 2
        elif ch == "*":
            out.append(".*")
            i += 1
        elif ch == "?":
            out.append(".")
            i += 1
        elif ch == "[":
            i += 1
            negate = i < n and pattern[i] == "^"
            i += negate
            members: list[str] = []
            while i < n and pattern[i] != "]":
                if pattern[i] == "\\" and i + 1 < n:
                    members.append(re.escape(pattern[i + 1]))
                    i += 2
                elif i + 2 < n and pattern[i + 1] == "-" and pattern[i + 2] != "]":
                    lo, hi = sorted((pattern[i], pattern[i + 2]))
                    members.append(f"{re.escape(lo)}-{re.escape(hi)}")
                    i += 3
                else:
                    members.append(re.escape(pattern[i]))
                    i += 1
            i += 1  # the "]"
            body = "".join(members)
            out.append(f"[{'^' if negate else ''}{body}]" if body else ("." if negate else "(?!)"))
        else:
            out.append(re.escape(ch))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def glob_match(pattern: str, key: str) -> bool:
    """Redis-style glob (see ``_glob_regex``), case-sensitive."""
    return _glob_regex(pattern).match(key) is not None


def glob_prefix(pattern: str) -> str:
    """The literal prefix of a glob pattern (everything before its first wildcard)."""
    for i, ch in enumerate(pattern):
        if ch in "*?[\\":
            return pattern[:i]
    return pattern
