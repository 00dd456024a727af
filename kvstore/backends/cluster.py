"""Redis Cluster backend (``redis+cluster://host:port[,host:port...]``), stateless front ends.

Same commands as the single-node backend (it is a subclass): multi-key operations are pipelines of
single-key commands, which ``redis.asyncio.cluster.RedisCluster`` splits per node by slot, so the hot path
never issues a cross-slot command. ``put_if_absent`` is ``SET NX``; set updates are single-key Lua
scripts, routed by their one key. Keys sharing a ``{hash tag}`` (``kvs:{ns:hash}:L2``, ``...:rec``,
``...:refs``) land in the same slot. ``scan`` walks every primary; ``stats`` sums over primaries.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio.cluster import ClusterNode, RedisCluster

from kvstore.backends.redis import RedisBackend, mapped_errors, parse_url_options


class ClusterBackend(RedisBackend):
    """A Redis Cluster reached through any of its nodes (seeds); topology is discovered and followed."""

    name = "redis-cluster"

    def __init__(self, url: str, client: RedisCluster) -> None:
        super().__init__(url, client=client)

    @classmethod
    def from_url(cls, url: str) -> ClusterBackend:
        """``redis+cluster://[user:pass@]h1:p1,h2:p2?socket_timeout=5`` (``rediss+cluster`` = TLS)."""
        parts = urlsplit(url)
        auth, _, hosts = parts.netloc.rpartition("@")
        if parts.path not in ("", "/"):
            raise ValueError(f"backend URL {url!r}: a cluster has only database 0, drop the path")
        seeds: list[ClusterNode] = []
        for hp in filter(None, hosts.split(",")):
            host, _, port = hp.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"backend URL {url!r}: seed {hp!r} is not host:port")
            seeds.append(ClusterNode(host.strip("[]"), int(port)))
        if not seeds:
            raise ValueError(f"backend URL {url!r}: no seed host:port")
        user, _, password = auth.partition(":")
        opts = parse_url_options(url)
        opts.pop("protocol", None)
        max_conn = opts.pop("max_connections", None)
        kwargs: dict[str, Any] = {
            "startup_nodes": seeds,
            "username": unquote(user) or None,
            "password": unquote(password) or None,
            "ssl": parts.scheme.lower().startswith("rediss"),
            **opts,
        }
        if max_conn is not None:
            kwargs["max_connections"] = max_conn
        return cls(url, RedisCluster(**kwargs))

    async def _ready(self) -> RedisCluster:
        # Load the slot map before the first command: redis-py 8.1 loads it lazily, and when many
        # concurrent first commands race that load, some fail on half-opened connections.
        return await self._client.initialize()  # a flag check once loaded

    async def _node_infos(self) -> list[tuple[dict[str, Any], int]]:
        out = []
        with mapped_errors(self._where):
            await self._ready()
            for node in self._client.get_primaries():
                memory = await self._client.info("memory", target_nodes=node)
                stats = await self._client.info("stats", target_nodes=node)
                out.append(({**memory, **stats}, int(await self._client.dbsize(target_nodes=node))))
        return out
