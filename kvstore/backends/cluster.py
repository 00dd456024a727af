"""Redis Cluster backend (``redis+cluster://host:port[,host:port...]``), stateless front ends.

Same commands as the single-node backend (it is a subclass): multi-key operations are pipelines of
single-key commands, which ``redis.asyncio.cluster.RedisCluster`` splits per node by slot, so the hot path
never issues a cross-slot command. ``put_if_absent`` is ``SET NX``; set updates are single-key Lua
scripts, routed by their one key. Keys sharing a ``{hash tag}`` (``kvs:{ns:hash}:L2``, ``...:rec``,
``...:refs``) land in the same slot. ``scan`` walks every primary; ``stats`` sums over primaries.

Fault isolation: ``get_many_available`` (the lookup path) reads every node's keys as one pipeline, all
nodes concurrently, each bounded by ``node_timeout`` seconds (URL option, default 1). The keys of a node
that fails or times out read as misses (``None``), so a lookup still returns the prefix that lives on
healthy shards; a background slot-map refresh then follows a failover. Only when *every* node failed does
it raise ``BackendError``. ``get``/``get_many`` (a put reading the old manifest and records, deletes) and
writes keep the strict path: they raise on failure, so no unreachable record is ever taken for absent.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from redis.asyncio.cluster import ClusterNode, PipelineCommand, RedisCluster
from redis.exceptions import AskError, MovedError, RedisClusterException, TryAgainError

from kvstore.backends.base import BackendError, BackendStats
from kvstore.backends.redis import RedisBackend, mapped_errors, parse_url_options

log = logging.getLogger("kvstore.backends.cluster")

DEFAULT_NODE_TIMEOUT_S = 1.0
_WARN_EVERY_S = 10.0  # one warning per failing node per this interval, not one per request
_REDIRECTS = (MovedError, AskError, TryAgainError)  # answers that a routed retry resolves


def _node_timeout_option(url: str) -> tuple[str, float]:
    """``url`` without its ``node_timeout`` query option, and that option's value (seconds)."""
    parts = urlsplit(url)
    timeout, rest = DEFAULT_NODE_TIMEOUT_S, []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if name != "node_timeout":
            rest.append((name, value))
            continue
        try:
            timeout = float(value)
        except ValueError:
            timeout = math.nan
        if not (timeout > 0 and math.isfinite(timeout)):
            raise ValueError(f"backend URL {url!r}: node_timeout must be seconds > 0, got {value!r}")
    return parts._replace(query=urlencode(rest)).geturl(), timeout


class ClusterBackend(RedisBackend):
    """A Redis Cluster reached through any of its nodes (seeds); topology is discovered and followed.

    ``node_timeout`` bounds each node's share of a ``get_many_available``; ``node_read_failures`` counts,
    by node name (``host:port``), the reads that failed or timed out and were answered as misses.
    """

    name = "redis-cluster"

    def __init__(
        self, url: str, client: RedisCluster, *, node_timeout: float = DEFAULT_NODE_TIMEOUT_S
    ) -> None:
        if not node_timeout > 0:
            raise ValueError(f"node_timeout must be > 0 seconds, got {node_timeout!r}")
        super().__init__(url, client=client)
        self.node_timeout = float(node_timeout)
        self.node_read_failures: collections.Counter[str] = collections.Counter()
        self._warned_at: dict[str, float] = {}
        self._refresh: asyncio.Task[None] | None = None
        self._refreshed_at = -math.inf

    @classmethod
    def from_url(cls, url: str) -> ClusterBackend:
        """``redis+cluster://[user:pass@]h1:p1,h2:p2?socket_timeout=5&node_timeout=1`` (``rediss+cluster`` =
        TLS). ``node_timeout``: seconds one node may take in a lookup's multi-key read
        (``get_many_available``) before its keys count as misses (default 1)."""
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
        redis_url, node_timeout = _node_timeout_option(url)
        opts = parse_url_options(redis_url)
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
        return cls(url, RedisCluster(**kwargs), node_timeout=node_timeout)

    async def _ready(self) -> RedisCluster:
        # Load the slot map before the first command: redis-py 8.1 loads it lazily, and when many
        # concurrent first commands race that load, some fail on half-opened connections.
        return await self._client.initialize()  # a flag check once loaded

    async def get_many_available(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values of ``keys``, each node read concurrently; keys of a node that fails or exceeds
        ``node_timeout`` read as ``None``. ``get``/``get_many`` stay strict (they raise): a put must
        never mistake an unreachable manifest for a missing one."""
        if not keys:
            return []
        with mapped_errors(self._where):
            client = await self._ready()
            by_node: dict[str, tuple[ClusterNode, list[int]]] = {}  # node name -> (node, key positions)
            try:
                for i, key in enumerate(keys):
                    node = client.get_node_from_key(key)
                    if node is None:
                        raise RedisClusterException(f"no node serves the slot of {key!r}")
                    by_node.setdefault(node.name, (node, []))[1].append(i)
            except RedisClusterException as e:
                raise BackendError(f"{self._where}: {e}") from e
        groups = list(by_node.values())
        reads = (self._read_node(client, node, [keys[i] for i in idx]) for node, idx in groups)
        values = await asyncio.gather(*reads)
        if all(v is None for v in values):
            failed = ", ".join(n.name for n, _ in groups)
            raise BackendError(f"{self._where}: every node of the read failed ({failed})")
        out: list[bytes | None] = [None] * len(keys)
        for (_, idx), got in zip(groups, values, strict=True):
            for i, value in zip(idx, got or [None] * len(idx), strict=True):
                out[i] = value
        return out

    async def _read_node(
        self, client: RedisCluster, node: ClusterNode, keys: list[str]
    ) -> list[bytes | None] | None:
        """GETs of ``keys`` on ``node`` in one round trip; None (counted, logged) if the node failed."""

        async def read() -> list[bytes | None]:
            # Straight to the node, not via the cluster pipeline: on a connection error that one closes
            # every node's connections (in-flight reads on healthy shards included) and retries.
            cmds = [PipelineCommand(i, "GET", key) for i, key in enumerate(keys)]
            await node.execute_pipeline(cmds)
            out = []
            for cmd in cmds:
                result = cmd.result
                if isinstance(result, _REDIRECTS):
                    # the slot moved (resharding, failover): a routed GET follows and records the move
                    result = await client.execute_command("GET", *cmd.args[1:])
                elif isinstance(result, Exception):
                    raise result
                out.append(result)
            return out

        try:
            return await asyncio.wait_for(read(), self.node_timeout)
        except Exception as e:  # any failure of this node, TimeoutError included; cancellation passes
            self._node_failed(client, node, e)
            return None

    async def stats(self) -> BackendStats:
        stats = await super().stats()
        return dataclasses.replace(stats, partial_read_failures=sum(self.node_read_failures.values()))

    def _node_failed(self, client: RedisCluster, node: ClusterNode, exc: Exception) -> None:
        self.node_read_failures[node.name] += 1
        now = time.monotonic()
        if now - self._warned_at.get(node.name, -math.inf) >= _WARN_EVERY_S:
            self._warned_at[node.name] = now
            why = f"{type(exc).__name__}: {exc}" if str(exc) else f"no answer in {self.node_timeout:g} s"
            log.warning("cluster node %s failed a read (%s); its keys read as misses", node.name, why)
        # One slot-map refresh at a time, at most one per node_timeout: a failover moves the dead node's
        # slots to its replica, and only a refresh tells us (its connections fail rather than redirect).
        if (self._refresh is None or self._refresh.done()) and now - self._refreshed_at >= self.node_timeout:
            self._refreshed_at = now
            self._refresh = asyncio.create_task(self._refresh_slots(client, node.name))

    async def _refresh_slots(self, client: RedisCluster, failed: str) -> None:
        try:
            # the failed node is asked last; a hung one cannot hold the refresh forever
            await asyncio.wait_for(
                client.nodes_manager.initialize(last_failed_node_name=failed), 10 * self.node_timeout
            )
        except Exception as e:
            log.info("cluster slot-map refresh failed: %s: %s", type(e).__name__, e)

    async def close(self) -> None:
        if self._refresh is not None:
            self._refresh.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresh
        await super().close()

    async def _node_infos(self) -> list[tuple[dict[str, Any], int]]:
        out = []
        with mapped_errors(self._where):
            await self._ready()
            for node in self._client.get_primaries():
                memory = await self._client.info("memory", target_nodes=node)
                stats = await self._client.info("stats", target_nodes=node)
                out.append(({**memory, **stats}, int(await self._client.dbsize(target_nodes=node))))
        return out
