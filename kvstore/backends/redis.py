"""Single-node Redis backend (``redis://``, ``rediss://``) on ``redis.asyncio``.

Every multi-key operation is a non-transactional pipeline of single-key commands (one round trip, and
the same code routes per node on a cluster, see cluster.py). Pinned keys are written with a plain ``SET``
(which clears any TTL) or ``PERSIST``; run the server with a ``volatile-*`` maxmemory policy so that only
TTL keys are evicted. Set updates run as small Lua scripts on one key, so ``SADD`` + TTL + ``SCARD`` are
atomic (and one round trip) on a single node and on a cluster alike.

Errors: ``OOM command not allowed`` -> ``BackendFull``; connection failures, timeouts and every other
server error -> ``BackendError``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.connection import URL_QUERY_ARGUMENT_PARSERS
from redis.exceptions import OutOfMemoryError, RedisClusterException, RedisError, ResponseError

from kvstore.backends.base import BackendError, BackendFull, BackendStats, StorageBackend

# connection options accepted in the URL query (parsed by redis-py)
URL_OPTIONS = frozenset(
    {
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "retry_on_timeout",
        "max_connections",
        "health_check_interval",
        "ssl_check_hostname",
        "protocol",
    }
)
_Command = tuple[str, tuple[Any, ...], Mapping[str, Any]]  # pipeline method, args, kwargs
_DEFAULTS: dict[str, Any] = {"socket_timeout": 30.0, "socket_connect_timeout": 5.0}

# KEYS[1] = set key; ARGV[1] = TTL in ms (0 = pinned); ARGV[2..] = members
_SET_ADD = """
if #ARGV > 1 then redis.call('SADD', KEYS[1], unpack(ARGV, 2)) end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if tonumber(ARGV[1]) > 0 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) else redis.call('PERSIST', KEYS[1]) end
return redis.call('SCARD', KEYS[1])
"""
_SET_REMOVE = """
redis.call('SREM', KEYS[1], unpack(ARGV))
return redis.call('SCARD', KEYS[1])
"""


def ttl_ms(ttl: float | None) -> int | None:
    """Seconds -> whole milliseconds (rounded up, so a TTL never expires early); None stays None."""
    if ttl is None:
        return None
    if not ttl > 0:
        raise ValueError(f"ttl must be > 0 seconds or None (pinned), got {ttl!r}")
    return max(1, math.ceil(ttl * 1000))


def parse_url_options(url: str) -> dict[str, Any]:
    """Validated, typed connection options from a backend URL's query; ``ValueError`` if unknown."""
    out = dict(_DEFAULTS)
    for name, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if name not in URL_OPTIONS:
            raise ValueError(f"backend URL {url!r}: unknown option {name!r} (allowed: {sorted(URL_OPTIONS)})")
        try:
            out[name] = URL_QUERY_ARGUMENT_PARSERS[name](value)
        except (TypeError, ValueError):
            raise ValueError(f"backend URL {url!r}: bad value {value!r} for {name!r}") from None
    return out


@contextlib.contextmanager
def mapped_errors(where: str) -> Iterator[None]:
    """Translate redis-py exceptions into the backend's error types."""
    try:
        yield
    except ResponseError as e:
        # pipeline errors quote the command, values included: keep only the server's message
        msg = str(e).rpartition("caused error: ")[2][:300]
        if isinstance(e, OutOfMemoryError) or msg.startswith("OOM"):
            raise BackendFull(f"{where}: OOM {msg}") from e
        raise BackendError(f"{where}: {msg}") from e
    # RedisClusterException ("cannot be connected", every node gone) is no RedisError
    except (RedisError, RedisClusterException, OSError, TimeoutError) as e:
        raise BackendError(f"{where}: {type(e).__name__}: {e}") from e


class RedisBackend(StorageBackend):
    """One Redis server (or, via the subclass, a cluster) behind the StorageBackend interface."""

    name = "redis"

    def __init__(self, url: str, client: Any = None) -> None:
        """``url`` for a single node; subclasses pass a ready ``client`` (same command API)."""
        self.url = url
        if client is None:
            parts = urlsplit(url)
            if parts.query:
                parse_url_options(url)  # reject unknown options with a clear message
            base = parts._replace(query="").geturl()
            client = aioredis.Redis.from_url(base, **parse_url_options(url))
        self._client = client
        self._set_add = client.register_script(_SET_ADD)
        self._set_remove = client.register_script(_SET_REMOVE)

    async def _ready(self) -> Any:
        """The client, ready for commands (the cluster subclass loads its slot map first)."""
        return self._client

    @property
    def _where(self) -> str:
        parts = urlsplit(self.url)  # host and port only: never echo credentials into errors
        return f"{self.name} {parts.netloc.rpartition('@')[2]}"

    async def _pipeline(self, commands: Sequence[_Command]) -> list[Any]:
        """Run (method, args, kwargs) commands as one non-transactional pipeline; results in order."""
        if not commands:
            return []
        with mapped_errors(self._where):
            pipe = (await self._ready()).pipeline(transaction=False)
            for method, args, kwargs in commands:
                getattr(pipe, method)(*args, **kwargs)
            return list(await pipe.execute())

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return await self._pipeline([("get", (k,), {}) for k in keys])

    async def put_many(self, items: Sequence[tuple[str, bytes]], ttl: float | None) -> None:
        px = ttl_ms(ttl)
        await self._pipeline([("set", (k, v), {"px": px}) for k, v in items])

    async def put_if_absent(self, key: str, value: bytes, ttl: float | None) -> bool:
        px = ttl_ms(ttl)
        with mapped_errors(self._where):
            return bool(await (await self._ready()).set(key, value, px=px, nx=True))

    async def exists_many(self, keys: Sequence[str]) -> list[bool]:
        return [bool(n) for n in await self._pipeline([("exists", (k,), {}) for k in keys])]

    async def delete_many(self, keys: Sequence[str]) -> int:
        # UNLINK frees multi-MiB values off the server's main thread; raw command because the cluster
        # pipeline's unlink()/delete() are multi-key helpers that run at once instead of queueing
        cmds: list[_Command] = [("execute_command", ("UNLINK", k), {}) for k in dict.fromkeys(keys)]
        return sum(await self._pipeline(cmds))

    async def set_ttl(self, keys: Sequence[str], ttl: float | None) -> None:
        px = ttl_ms(ttl)
        cmds: list[_Command] = [
            ("persist", (k,), {}) if px is None else ("pexpire", (k, px), {}) for k in keys
        ]
        await self._pipeline(cmds)

    async def get_ttl(self, key: str) -> float | None:
        with mapped_errors(self._where):
            ms = await (await self._ready()).pttl(key)
        if ms == -2:
            raise KeyError(key)
        return None if ms == -1 else ms / 1000.0

    async def set_add(self, key: str, members: Sequence[bytes], ttl: float | None) -> int:
        px = ttl_ms(ttl) or 0
        with mapped_errors(self._where):
            await self._ready()
            return int(await self._set_add(keys=[key], args=[px, *members]))

    async def set_remove(self, key: str, members: Sequence[bytes]) -> int:
        if not members:
            return len(await self.set_members(key))
        with mapped_errors(self._where):
            await self._ready()
            return int(await self._set_remove(keys=[key], args=list(members)))

    async def set_members(self, key: str) -> set[bytes]:
        with mapped_errors(self._where):
            return set(await (await self._ready()).smembers(key))

    async def scan(self, match: str) -> AsyncIterator[str]:
        with mapped_errors(self._where):
            async for key in (await self._ready()).scan_iter(match=match, count=1000):
                yield key.decode() if isinstance(key, bytes) else key

    async def _node_infos(self) -> list[tuple[dict[str, Any], int]]:
        """(INFO memory+stats, key count) of every primary."""
        with mapped_errors(self._where):
            client = await self._ready()
            info = {**await client.info("memory"), **await client.info("stats")}
            return [(info, int(await client.dbsize()))]

    async def stats(self) -> BackendStats:
        nodes = await self._node_infos()
        caps = [int(i.get("maxmemory", 0)) for i, _ in nodes]
        return BackendStats(
            name=self.name,
            used_bytes=sum(int(i.get("used_memory", 0)) for i, _ in nodes),
            # one unbounded node makes the whole store unbounded (0)
            capacity_bytes=0 if not all(caps) else sum(caps),
            keys=sum(n for _, n in nodes),
            evictions=sum(int(i.get("evicted_keys", 0)) for i, _ in nodes),
        )

    async def ping(self) -> bool:
        with mapped_errors(self._where):
            return bool(await (await self._ready()).ping())

    async def close(self) -> None:
        with contextlib.suppress(RedisError, RedisClusterException, OSError):
            await self._client.aclose()
