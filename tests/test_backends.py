"""One suite for every StorageBackend: memory, embedded (LMDB), redis, redis-cluster.

Redis tests run against real servers started by deploy/redis_cluster.py (skipped without redis-server
unless KVSTREAM_REQUIRE_REDIS=1).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import lmdb
import pytest

from deploy.redis_cluster import LocalCluster, RedisProcess, start_server
from kvstore.backends import (
    BackendError,
    BackendFull,
    StorageBackend,
    default_backend_url,
    open_backend,
    parse_size,
)
from kvstore.backends.cluster import ClusterBackend
from kvstore.backends.embedded import EmbeddedBackend
from kvstore.backends.memory import MemoryBackend

MiB = 1 << 20
ALL = ["memory", "embedded", "redis", "redis-cluster"]


def _blob(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _flush_cluster(cluster: LocalCluster) -> None:
    for node in cluster.primaries():
        with node.client() as c:
            c.flushall()


@pytest.fixture(params=ALL)
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """URL of an empty backend of each kind (Redis ones are flushed session servers)."""
    kind = request.param
    if kind == "memory":
        return "memory://"
    if kind == "embedded":
        return f"embedded://{tmp_path}/db"
    if kind == "redis":
        srv: RedisProcess = request.getfixturevalue("redis_server")
        with srv.client() as c:
            c.flushall()
        return srv.url
    cluster: LocalCluster = request.getfixturevalue("redis_cluster")
    _flush_cluster(cluster)
    return cluster.url


@pytest.fixture
async def backend(backend_url: str) -> AsyncIterator[StorageBackend]:
    b = open_backend(backend_url)
    try:
        yield b
    finally:
        await b.close()


async def _wait_gone(b: StorageBackend, key: str, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while (await b.exists_many([key]))[0]:
        assert time.monotonic() < deadline, f"{key} did not expire"
        await asyncio.sleep(0.05)


# -- the shared suite -------------------------------------------------------------------------------


async def test_put_get_overwrite(backend: StorageBackend) -> None:
    assert await backend.ping()
    assert await backend.get("kvs:{t:1}:L2") is None
    await backend.put("kvs:{t:1}:L2", b"v1", None)
    assert await backend.get("kvs:{t:1}:L2") == b"v1"
    await backend.put("kvs:{t:1}:L2", b"v2-longer", 60)
    assert await backend.get("kvs:{t:1}:L2") == b"v2-longer"
    await backend.put("kvs:{t:1}:L2", b"", None)  # empty values are values, not misses
    assert await backend.get("kvs:{t:1}:L2") == b""


async def test_get_many_order_and_missing(backend: StorageBackend) -> None:
    items = [(f"kvs:{{t:{i}}}:rec", f"value-{i}".encode()) for i in range(20)]
    await backend.put_many(items, 60)
    keys = [k for k, _ in items]
    want: list[bytes | None] = [v for _, v in items]
    order = list(range(20)) + [99]
    random.Random(1).shuffle(order)
    got = await backend.get_many([keys[i] if i < 20 else "kvs:{t:missing}:rec" for i in order])
    assert got == [want[i] if i < 20 else None for i in order]
    assert await backend.exists_many([keys[3], "kvs:{t:nope}:rec"]) == [True, False]
    assert await backend.get_many([]) == []


async def test_put_if_absent_race(backend: StorageBackend) -> None:
    key = "kvs:{t:race}:man"
    results = await asyncio.gather(*(backend.put_if_absent(key, f"w{i}".encode(), 60) for i in range(40)))
    assert sum(results) == 1
    assert await backend.get(key) == f"w{results.index(True)}".encode()
    assert not await backend.put_if_absent(key, b"late", None)


async def test_ttl_expiry_and_pins(backend: StorageBackend) -> None:
    await backend.put("kvs:{t:ttl}:a", b"a", 0.4)
    await backend.put("kvs:{t:ttl}:p", b"p", None)
    remaining = await backend.get_ttl("kvs:{t:ttl}:a")
    assert remaining is not None and 0 < remaining <= 0.4
    assert await backend.get_ttl("kvs:{t:ttl}:p") is None
    with pytest.raises(KeyError):
        await backend.get_ttl("kvs:{t:ttl}:missing")
    await _wait_gone(backend, "kvs:{t:ttl}:a")
    assert await backend.get("kvs:{t:ttl}:a") is None
    with pytest.raises(KeyError):
        await backend.get_ttl("kvs:{t:ttl}:a")
    assert await backend.get("kvs:{t:ttl}:p") == b"p"
    with pytest.raises(ValueError):
        await backend.put("kvs:{t:ttl}:z", b"z", 0)


async def test_set_ttl(backend: StorageBackend) -> None:
    await backend.put_many([("kvs:{t:st}:a", b"a"), ("kvs:{t:st}:b", b"b")], 0.5)
    await backend.set_ttl(["kvs:{t:st}:a", "kvs:{t:st}:missing"], None)  # pin; missing is ignored
    assert await backend.get_ttl("kvs:{t:st}:a") is None
    assert not (await backend.exists_many(["kvs:{t:st}:missing"]))[0]
    await backend.set_ttl(["kvs:{t:st}:b"], 100)
    ttl_b = await backend.get_ttl("kvs:{t:st}:b")
    assert ttl_b is not None and 99 < ttl_b <= 100
    await backend.set_ttl(["kvs:{t:st}:a"], 0.3)
    await _wait_gone(backend, "kvs:{t:st}:a")
    assert await backend.get("kvs:{t:st}:b") == b"b"


async def test_sets(backend: StorageBackend) -> None:
    key = "kvs:{t:s}:refs"
    assert await backend.set_members(key) == set()
    assert await backend.set_add(key, [b"c1", b"c2"], None) == 2
    assert await backend.set_add(key, [b"c2", b"c3"], None) == 3
    assert await backend.set_members(key) == {b"c1", b"c2", b"c3"}
    assert await backend.get_ttl(key) is None
    assert await backend.set_add(key, [b"c4"], 60) == 4
    ttl = await backend.get_ttl(key)
    assert ttl is not None and 59 < ttl <= 60
    assert await backend.set_remove(key, [b"c1", b"nope"]) == 3
    assert await backend.set_remove(key, [b"c2", b"c3", b"c4"]) == 0
    assert await backend.exists_many([key]) == [False]  # an emptied set is deleted
    assert await backend.set_remove(key, [b"x"]) == 0
    assert await backend.set_add(key, [], None) == 0  # adding nothing creates nothing
    assert await backend.exists_many([key]) == [False]
    await backend.set_add(key, [b"m"], 0.3)
    await _wait_gone(backend, key)


async def test_wrong_type(backend: StorageBackend) -> None:
    await backend.put("kvs:{t:w}:blob", b"x", None)
    await backend.set_add("kvs:{t:w}:set", [b"m"], None)
    with pytest.raises(BackendError):
        await backend.set_add("kvs:{t:w}:blob", [b"m"], None)
    with pytest.raises(BackendError):
        await backend.get("kvs:{t:w}:set")
    await backend.put("kvs:{t:w}:set", b"now a blob", None)  # SET replaces any type
    assert await backend.get("kvs:{t:w}:set") == b"now a blob"


async def test_delete(backend: StorageBackend) -> None:
    await backend.put_many([("kvs:{t:d}:a", b"a"), ("kvs:{t:d}:b", b"b")], None)
    await backend.set_add("kvs:{t:d}:refs", [b"r"], None)
    assert await backend.delete_many(["kvs:{t:d}:a", "kvs:{t:d}:refs", "kvs:{t:d}:zz", "kvs:{t:d}:a"]) == 2
    assert await backend.get_many(["kvs:{t:d}:a", "kvs:{t:d}:b"]) == [None, b"b"]
    assert await backend.set_members("kvs:{t:d}:refs") == set()
    assert await backend.delete_many([]) == 0


async def test_scan(backend: StorageBackend) -> None:
    mine = {f"kvs:{{a:{i:04x}}}:L2" for i in range(50)}
    other = {f"kvs:{{b:{i:04x}}}:L2" for i in range(10)}
    await backend.put_many([(k, b"x") for k in sorted(mine | other)], 60)
    await backend.set_add("kvs:{a:ctx}:man", [b"m"], None)
    got = [k async for k in backend.scan("kvs:{a:*")]
    assert len(got) == len(set(got)) and set(got) == mine | {"kvs:{a:ctx}:man"}
    assert {k async for k in backend.scan("kvs:{a:*}:L2")} == mine
    assert [k async for k in backend.scan("nothing:*")] == []


async def test_scan_follows_redis_glob_rules(backend: StorageBackend) -> None:
    # The same answers from every backend as from Redis: "\\" escapes, "^" negates a set, ranges.
    keys = ["g:a*", "g:a\\b", "g:ab", "g:^x", "g:bx", "g:ax", "g:a?c", "g:abc"]
    await backend.put_many([(k, b"x") for k in keys], 60)
    for pattern, want in (
        ("g:a\\*", {"g:a*"}),
        ("g:[^a]x", {"g:^x", "g:bx"}),
        ("g:[a-b]x", {"g:ax", "g:bx"}),
        ("g:a\\?c", {"g:a?c"}),
        ("g:a?c", {"g:a?c", "g:abc"}),
    ):
        assert {k async for k in backend.scan(pattern)} == want, pattern


async def test_large_values(backend: StorageBackend) -> None:
    big = {f"kvs:{{t:big{i}}}:L2": _blob(n, i) for i, n in enumerate([6 * MiB, 4 * MiB, 4 * MiB + 1])}
    await backend.put_many(list(big.items()), None)
    assert await backend.get_many(list(big)) == list(big.values())


async def test_stats(backend: StorageBackend) -> None:
    await backend.put_many([(f"kvs:{{t:{i}}}:L2", _blob(64 * 1024, i)) for i in range(8)], 60)
    await backend.set_add("kvs:{t:0}:refs", [b"a", b"b"], None)
    st = await backend.stats()
    assert st.name == backend.name
    assert st.keys == 9
    assert st.used_bytes >= 8 * 64 * 1024
    assert st.evictions == 0
    assert st.capacity_bytes >= 0


# -- capacity: LRU eviction never touches pinned keys; a write that cannot fit is refused ----------------


@pytest.fixture(scope="module")
def small_redis(redis_bin: str) -> Iterator[RedisProcess]:
    """A redis-server with a tiny maxmemory and the volatile-lru policy (only TTL keys are evicted)."""
    srv = start_server(maxmemory="12mb", policy="volatile-lru")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=["memory", "embedded", "redis"])
async def small_backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StorageBackend]:
    """A backend holding about 12 MiB."""
    if request.param == "memory":
        b: StorageBackend = open_backend("memory://?capacity=12MiB")
    elif request.param == "embedded":
        b = open_backend(f"embedded://{tmp_path}/db?capacity=12MiB")
    else:
        srv: RedisProcess = request.getfixturevalue("small_redis")
        with srv.client() as c:
            c.flushall()
            c.config_resetstat()
        b = open_backend(srv.url)
    try:
        yield b
    finally:
        await b.close()


async def test_eviction_spares_pinned(small_backend: StorageBackend) -> None:
    pinned = {f"kvs:{{p:{i}}}:L2": _blob(MiB, 100 + i) for i in range(3)}
    await small_backend.put_many(list(pinned.items()), None)
    for i in range(30):  # 30 MiB of TTL keys through a 12 MiB store
        await small_backend.put(f"kvs:{{e:{i}}}:L2", _blob(MiB, i), 600)
    st = await small_backend.stats()
    assert st.evictions > 0
    assert await small_backend.get_many(list(pinned)) == list(pinned.values())
    assert await small_backend.get("kvs:{e:29}:L2") == _blob(MiB, 29)  # the newest survives


async def test_full_of_pins_refuses_writes(small_backend: StorageBackend) -> None:
    stored: dict[str, bytes] = {}
    with pytest.raises(BackendFull):
        for i in range(40):
            key, value = f"kvs:{{f:{i}}}:L2", _blob(MiB, i)
            await small_backend.put(key, value, None)
            stored[key] = value
    assert 4 <= len(stored) < 40
    assert await small_backend.get_many(list(stored)) == list(stored.values())


@pytest.mark.parametrize("kind", ["memory", "embedded"])
async def test_lru_order(kind: str, tmp_path: Path) -> None:
    b = open_backend(
        "memory://?capacity=1000" if kind == "memory" else f"embedded://{tmp_path}?capacity=1000"
    )
    try:
        for name in "abc":
            await b.put(name, b"x" * 299, 60)  # 300 bytes each with the key
        assert await b.get("a") == b"x" * 299  # a is now more recent than b
        await b.put("d", b"y" * 299, 60)
        assert await b.exists_many(list("abcd")) == [True, False, True, True]
        assert (await b.stats()).evictions == 1
        with pytest.raises(BackendFull):
            await b.put("huge", b"z" * 2000, 60)
        assert await b.exists_many(list("acd")) == [True, True, True]
    finally:
        await b.close()


@pytest.mark.parametrize("kind", ["memory", "embedded"])
async def test_expired_keys_make_room_before_live_ones(kind: str, tmp_path: Path) -> None:
    b = open_backend("memory://?capacity=700" if kind == "memory" else f"embedded://{tmp_path}?capacity=700")
    try:
        await b.put("a", b"x" * 299, 3600)  # live, and the least recently used
        await b.put("b", b"y" * 299, 0.05)
        await asyncio.sleep(0.1)  # b expired, but no purge ran since (they are rate-limited)
        await b.put("c", b"z" * 299, 3600)
        assert await b.get("a") == b"x" * 299
    finally:
        await b.close()


async def test_a_write_that_does_not_grow_the_store_needs_no_room(tmp_path: Path) -> None:
    b = EmbeddedBackend(tmp_path / "db")
    await b.put("pinned", b"x" * 2000, None)
    await b.set_add("refs", [b"ctx1", b"ctx2"], None)
    await b.close()
    b = EmbeddedBackend(tmp_path / "db", capacity=1000)  # reopened below what it holds
    try:
        assert await b.set_remove("refs", [b"ctx1"]) == 1  # a delete must not fail for want of room
        with pytest.raises(BackendFull):
            await b.put("more", b"y" * 10, 60)
    finally:
        await b.close()


# -- embedded only ------------------------------------------------------------------------------------


async def test_embedded_restart_keeps_data_ttl_and_recency(tmp_path: Path) -> None:
    path = tmp_path / "db"
    b = EmbeddedBackend(path, capacity=1000)
    await b.put("pinned", b"p" * 94, None)  # 100 bytes
    await b.put("old", b"o" * 297, 3600)  # 300 bytes
    await b.put("new", b"n" * 297, 3600)
    await b.set_add("refs", [b"r1", b"r2"], None)
    await b.put("gone", b"g", 0.2)
    await b.close()
    await b.close()  # idempotent
    with pytest.raises(BackendError):
        await b.get("old")

    time.sleep(0.25)
    b = EmbeddedBackend(path, capacity=1000)
    try:
        assert await b.get_many(["pinned", "old", "new", "gone"]) == [b"p" * 94, b"o" * 297, b"n" * 297, None]
        assert await b.set_members("refs") == {b"r1", b"r2"}
        ttl = await b.get_ttl("old")
        assert ttl is not None and 3590 < ttl <= 3600
        assert await b.get_ttl("pinned") is None
        await b.put("newest", b"x" * 294, 3600)  # 1008 bytes: one TTL key must go
        assert await b.exists_many(["old", "new", "pinned", "refs"]) == [False, True, True, True]
    finally:
        await b.close()


async def test_embedded_recency_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "db"
    b = EmbeddedBackend(path, capacity=1000)
    for name in ("k1", "k2", "k3"):
        await b.put(name, b"v" * 298, 3600)
    await b.get("k1")  # stamps are flushed lazily; close must persist them
    await b.close()
    b = EmbeddedBackend(path, capacity=1000)
    try:
        await b.put("k4", b"v" * 298, 3600)  # evicts the least recent: k2
        assert await b.exists_many(["k1", "k2", "k3", "k4"]) == [True, False, True, True]
        st = await b.stats()
        assert (st.keys, st.evictions, st.used_bytes) == (3, 1, 900)
    finally:
        await b.close()
    b = EmbeddedBackend(path)
    try:
        assert (await b.stats()).evictions == 1  # the counter is persistent
    finally:
        await b.close()


async def test_embedded_single_owner(tmp_path: Path) -> None:
    b = EmbeddedBackend(tmp_path)
    try:
        with pytest.raises(BackendError, match="in use"):
            EmbeddedBackend(tmp_path)
    finally:
        await b.close()
    await EmbeddedBackend(tmp_path).close()  # released on close
    (tmp_path / "other").mkdir()
    env = lmdb.open(str(tmp_path / "other"), max_dbs=3)
    with env.begin(write=True) as txn:
        txn.put(b"format", b"NOTKVS", db=env.open_db(b"info", txn=txn))
    env.close()
    with pytest.raises(BackendError, match="format"):
        EmbeddedBackend(tmp_path / "other")


async def test_embedded_rot_is_a_miss(tmp_path: Path) -> None:
    b = EmbeddedBackend(tmp_path)
    try:
        await b.put("k", b"good value", None)
        with b._env.begin(write=True) as txn:  # flip bytes behind the backend's back
            txn.put(b"k", b"evil value", db=b._data)
        assert await b.get("k") is None
        assert await b.exists_many(["k"]) == [False]  # the rotten record was deleted
    finally:
        await b.close()


async def test_embedded_map_grows(tmp_path: Path) -> None:
    b = EmbeddedBackend(tmp_path, map_size=16 * MiB)
    try:
        values = [_blob(4 * MiB, i) for i in range(8)]
        for i, v in enumerate(values):
            await b.put(f"k{i}", v, None)
        assert b._env.info()["map_size"] > 16 * MiB
        assert await b.get_many([f"k{i}" for i in range(8)]) == values
    finally:
        await b.close()


# -- redis only ---------------------------------------------------------------------------------------


async def test_redis_oom_is_backend_full(redis_bin: str) -> None:
    srv = start_server(maxmemory="6mb", policy="noeviction")
    b = open_backend(srv.url)
    try:
        stored: dict[str, bytes] = {}
        with pytest.raises(BackendFull, match="OOM"):
            for i in range(20):
                await b.put(f"kvs:{{o:{i}}}:L2", _blob(MiB, i), 600)
                stored[f"kvs:{{o:{i}}}:L2"] = _blob(MiB, i)
        assert stored and await b.get_many(list(stored)) == list(stored.values())
        with pytest.raises(BackendFull):
            await b.set_add("kvs:{o:0}:refs", [_blob(2 * MiB, 7)], None)  # the script path maps OOM too
    finally:
        await b.close()
        srv.stop()


@pytest.mark.parametrize("url", ["redis://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1"])
async def test_redis_unreachable_is_backend_error(url: str) -> None:
    b = open_backend(url + "?socket_connect_timeout=1")  # the cluster client's error is no RedisError
    try:
        with pytest.raises(BackendError):
            await b.ping()
        with pytest.raises(BackendError):
            await b.get_many(["a", "b"])
    finally:
        await b.close()


# -- redis cluster only -------------------------------------------------------------------------------


async def test_cluster_spreads_and_colocates(redis_cluster: LocalCluster) -> None:
    _flush_cluster(redis_cluster)
    b = open_backend(redis_cluster.url)
    assert isinstance(b, ClusterBackend)
    try:
        keys = [f"kvs:{{c:{i:04x}}}:L2" for i in range(60)]
        await b.put_many([(k, k.encode()) for k in keys], 600)
        tagged = ["kvs:{c:beef}:L2", "kvs:{c:beef}:rec"]
        await b.put_many([(k, b"t") for k in tagged], None)
        await b.set_add("kvs:{c:beef}:refs", [b"r"], None)
        primaries = redis_cluster.primaries()
        assert len(primaries) == 3
        holders: list[set[str]] = []
        for node in primaries:
            with node.client() as c:
                holders.append({k.decode() for k in c.keys("kvs:*")})
        assert all(len(h) > 0 for h in holders)  # every primary got some keys
        assert sum(len(h) for h in holders) == 63
        assert sum({*tagged, "kvs:{c:beef}:refs"} <= h for h in holders) == 1  # one node holds the group
        assert {k async for k in b.scan("kvs:{c:*")} == set(keys) | set(tagged) | {"kvs:{c:beef}:refs"}
        assert (await b.stats()).keys == 63
    finally:
        await b.close()


# -- factory ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "",
        "ftp://host/x",
        "memory://host",
        "memory://?capacity=12XB",
        "memory://?size=1GiB",
        "embedded://",
        "embedded:///tmp/x?capacity=-1",
        "redis://",
        "redis://localhost:6379/0?bogus=1",
        "redis://localhost:6379/0?socket_timeout=soon",
        "redis+cluster://",
        "redis+cluster://h1:7000,h2",
        "redis+cluster://h1:7000/3",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError) as err:
        open_backend(url)
    assert "\n" not in str(err.value)


async def test_factory_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mem = open_backend("memory://?capacity=1.5KiB")
    assert isinstance(mem, MemoryBackend) and (await mem.stats()).capacity_bytes == 1536
    plain = open_backend(str(tmp_path / "plain"))
    assert isinstance(plain, EmbeddedBackend) and plain.path == tmp_path / "plain"
    await plain.close()
    emb = open_backend(f"embedded://{tmp_path}/e?capacity=10GiB")
    assert isinstance(emb, EmbeddedBackend) and (await emb.stats()).capacity_bytes == 10 << 30
    await emb.close()
    assert [parse_size(s) for s in ("123", "1KB", "2 MiB", "1.5GiB")] == [123, 1000, 2 * MiB, 3 << 29]
    monkeypatch.setenv("KVSTREAM_DATA", str(tmp_path / "data"))
    assert default_backend_url() == f"embedded://{tmp_path}/data"
    cl = open_backend("redis+cluster://user:pw@127.0.0.1:7000,[::1]:7001?socket_timeout=2")
    assert isinstance(cl, ClusterBackend)
    await cl.close()
