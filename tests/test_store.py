"""ChunkStore semantics on every backend: visibility, dedup, refcounted delete, pins, corruption, races."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import torch

import codec
from kvstore.backends import BackendError, BackendFull, StorageBackend, open_backend
from kvstore.envelope import Envelope, Kind, open_envelope, seal
from kvstore.keys import ModelKey, chunk_hashes
from kvstore.rpc import pb
from kvstore.store import (
    MAX_METADATA_BYTES,
    MAX_METADATA_ENTRIES,
    STAGING_TTL_S,
    ChunkBlobs,
    ChunkStore,
    ContextNotFound,
    ContextQuery,
    InvalidRequest,
    NamespaceBusy,
    QuotaExceeded,
    blob_key,
    info_key,
    lease_key,
    legacy_name_key,
    manifest_key,
    name_key,
    record_key,
    refs_key,
    sidecar_key,
)

N = 16  # chunk_tokens


@pytest.fixture(params=["memory", "embedded", "redis", "redis_cluster"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StorageBackend]:
    url = {
        "memory": lambda: "memory://",
        "embedded": lambda: f"embedded://{tmp_path / 'db'}",
        "redis": lambda: request.getfixturevalue("redis_url"),
        "redis_cluster": lambda: request.getfixturevalue("redis_cluster_url"),
    }[request.param]()
    b = open_backend(url)
    try:
        yield b
    finally:
        await b.close()


@pytest.fixture
def model() -> ModelKey:
    # A fresh namespace per test: the Redis fixtures are shared by the whole session.
    return ModelKey("stories260K", namespace=f"t{uuid.uuid4().hex[:12]}", chunk_tokens=N)


@pytest.fixture
def store(backend: StorageBackend) -> ChunkStore:
    return ChunkStore(backend, default_ttl=3600)


def _kv(tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 2, tokens, 2, 4, generator=torch.Generator().manual_seed(seed)).half()


def _blobs(kv: torch.Tensor, levels: Sequence[int] = (0,)) -> list[ChunkBlobs]:
    return [
        ChunkBlobs({lv: codec.encode(kv[:, :, i * N : (i + 1) * N], lv) for lv in levels})
        for i in range(kv.shape[2] // N)
    ]


async def _keys(backend: StorageBackend, model: ModelKey, suffix: str = "*") -> list[str]:
    return sorted([k async for k in backend.scan("kvs:{" + model.namespace + ":*}:" + suffix)])


def _corrupted(store: ChunkStore, kind: Kind) -> float:
    return (
        store.metrics.registry.get_sample_value("kvstream_corrupt_records_total", {"kind": kind.name.lower()})
        or 0
    )


async def test_put_lookup_and_partial_uploads(store: ChunkStore, model: ModelKey) -> None:
    ids = list(range(3 * N + 5))
    kv = _kv(len(ids))
    res = await store.put(model, ids, _blobs(kv), name="doc", metadata={"k": "v"})
    assert (res.stored_chunks, res.stored_tokens, res.dedup_chunks) == (3, 3 * N, 0)
    assert res.context_id == chunk_hashes(model, ids)[-1]
    look = await store.lookup(model, ids + [7] * N)  # a longer query: the stored prefix is found
    assert (look.prefix_chunks, look.prefix_tokens) == (3, 3 * N)
    assert [c.token_end for c in look.chunks] == [N, 2 * N, 3 * N]
    assert (await store.lookup(model, hashes=chunk_hashes(model, ids)[:2])).prefix_chunks == 2
    info = await store.get_context(model, ContextQuery(name="doc"))
    assert info.metadata["k"] == "v" and info.num_tokens == 3 * N and 3500 < info.ttl_seconds <= 3600
    blob = await store.read_blob(model, look.chunks[1], 0)
    assert blob is not None and torch.equal(codec.decode(blob), kv[:, :, N : 2 * N])

    # A put that fails before its manifest is written commits no context.
    other = ModelKey("other", namespace=model.namespace, chunk_tokens=N)
    real_put_many = store.backend.put_many

    async def failing_manifest(items: Sequence[tuple[str, bytes]], ttl: float | None) -> None:
        if any(key.endswith(":man") for key, _ in items):
            raise BackendError("connection lost")
        await real_put_many(items, ttl)

    store.backend.put_many = failing_manifest  # type: ignore[method-assign]
    with pytest.raises(BackendError):
        await store.put(other, ids, _blobs(kv))
    store.backend.put_many = real_put_many  # type: ignore[method-assign]
    assert len(await _keys(store.backend, model, "man")) == 1
    with pytest.raises(ContextNotFound):
        await store.get_context(other, ContextQuery(token_ids=ids))


async def test_invalid_puts_write_nothing(store: ChunkStore, model: ModelKey) -> None:
    ids = list(range(2 * N))
    good = _blobs(_kv(2 * N))
    wide = ChunkBlobs({0: codec.encode(torch.zeros(2, 2, N, 3, 4, dtype=torch.float16), 0)})
    cases: list[tuple[Sequence[ChunkBlobs], str]] = [
        ([good[0], wide], "shape"),
        ([good[0]], "2 full chunks"),
        ([good[0], ChunkBlobs({})], "no codec level"),
        ([good[0], ChunkBlobs({2: good[1].levels[0]})], "declared level 2"),
        ([good[0], ChunkBlobs({0: good[1].levels[0][:-1]})], "chunk 1"),
        ([good[0], ChunkBlobs({0: good[1].levels[0]}, {"bad name": b"x"})], "sidecar name"),
    ]
    for chunks, needle in cases:
        with pytest.raises(InvalidRequest, match=needle):
            await store.put(model, ids, chunks)
    with pytest.raises(InvalidRequest, match="no full chunk"):
        await store.put(model, ids[: N - 1], [])
    with pytest.raises(InvalidRequest):
        await store.put(model, [-1] * N, good[:1])
    with pytest.raises(InvalidRequest, match="dtype"):
        await store.put(ModelKey("m", namespace=model.namespace, dtype="bfloat16", chunk_tokens=N), ids, good)
    assert await _keys(store.backend, model) == []


async def test_shared_prefixes_are_stored_once_and_survive_delete(store: ChunkStore, model: ModelKey) -> None:
    a_ids = list(range(3 * N))
    b_ids = a_ids[: 2 * N] + [9] * N  # shares the first two chunks with a
    kv_a, kv_b = _kv(3 * N, 1), _kv(3 * N, 1)
    kv_b[:, :, 2 * N :] = _kv(N, 2)
    a = await store.put(model, a_ids, _blobs(kv_a))
    b = await store.put(model, b_ids, _blobs(kv_b))
    assert (b.dedup_chunks, b.bytes_written) == (2, len(_blobs(kv_b)[2].levels[0]))
    assert len(await _keys(store.backend, model, "L0")) == 4
    assert len(await _keys(store.backend, model, "man")) == 2

    assert await store.delete(model, ContextQuery(context_id=a.context_id)) == 1  # only a's own chunk
    assert (await store.lookup(model, b_ids)).prefix_chunks == 3
    assert (await store.lookup(model, a_ids)).prefix_chunks == 2  # the shared prefix is still there
    with pytest.raises(ContextNotFound):
        await store.get_context(model, ContextQuery(context_id=a.context_id))
    assert await store.delete(model, ContextQuery(token_ids=b_ids)) == 3
    assert await _keys(store.backend, model) == []


async def test_a_lost_refcount_never_frees_a_chunk_another_context_uses(
    store: ChunkStore, model: ModelKey
) -> None:
    # Refcount sets are plain keys with a TTL that no read touches: LRU eviction can take them first.
    a_ids, b_ids = list(range(2 * N)), list(range(N)) + [9] * N  # chunk 0 shared
    await store.put(model, a_ids, _blobs(_kv(2 * N, 1)))
    await store.put(model, b_ids, _blobs(_kv(2 * N, 1)))
    h0 = chunk_hashes(model, a_ids)[0]
    await store.backend.delete_many([refs_key(model.namespace, h0)])  # evicted
    assert await store.delete(model, ContextQuery(token_ids=b_ids)) == 1  # b's own chunk only
    assert (await store.lookup(model, a_ids)).prefix_chunks == 2


async def test_a_delete_cut_short_can_be_run_again(store: ChunkStore, model: ModelKey) -> None:
    ids = list(range(3 * N))
    await store.put(model, ids, _blobs(_kv(3 * N)), name="doc", pin=True)
    real, calls = store.backend.set_remove, 0

    async def flaky(key: str, members: Sequence[bytes]) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise BackendError("connection reset (injected)")
        return await real(key, members)

    store.backend.set_remove = flaky  # type: ignore[method-assign]
    with pytest.raises(BackendError):
        await store.delete(model, ContextQuery(name="doc"))
    store.backend.set_remove = real  # type: ignore[method-assign]
    await store.delete(model, ContextQuery(name="doc"))  # still findable by name: finishes the job
    for key in await _keys(store.backend, model):  # nothing pinned forever
        assert await store.backend.get_ttl(key) is not None, key


async def test_pin_and_unpin_ttls(store: ChunkStore, model: ModelKey) -> None:
    backend = store.backend
    a_ids, b_ids = list(range(2 * N)), list(range(N)) + [5] * N
    a = await store.put(model, a_ids, _blobs(_kv(2 * N)), ttl=100, pin=True, name="pinned")
    ha, hb = chunk_hashes(model, a_ids), chunk_hashes(model, b_ids)
    assert await backend.get_ttl(blob_key(model.namespace, ha[1], 0)) is None
    assert await backend.get_ttl(manifest_key(model.namespace, a.context_id)) is None
    await store.put(model, b_ids, _blobs(_kv(2 * N)), ttl=50)  # shares chunk 0 with the pinned context
    assert await backend.get_ttl(blob_key(model.namespace, ha[0], 0)) is None  # stays pinned
    assert 0 < (await backend.get_ttl(blob_key(model.namespace, hb[1], 0)) or 0) <= 50
    info = await store.get_context(model, ContextQuery(name="pinned"))
    assert info.pinned and info.ttl_seconds == -1
    assert (await store.stat(model.namespace)).pinned_contexts == 1

    assert await store.set_pinned(model, ContextQuery(name="pinned"), False) == (False, 2)
    for key in (
        blob_key(model.namespace, ha[0], 0),
        record_key(model.namespace, ha[1]),
        manifest_key(model.namespace, a.context_id),
    ):
        assert 90 < (await backend.get_ttl(key) or 0) <= 100, key
    info = await store.get_context(model, ContextQuery(name="pinned"))
    assert not info.pinned and 90 < info.ttl_seconds <= 100


async def test_corrupt_records_give_a_shorter_verified_prefix(store: ChunkStore, model: ModelKey) -> None:
    ids = list(range(4 * N))
    await store.put(model, ids, _blobs(_kv(4 * N)))
    hashes = chunk_hashes(model, ids)
    key = record_key(model.namespace, hashes[2])
    raw = bytearray((await store.backend.get_many([key]))[0] or b"")
    raw[-12] ^= 0x01
    await store.backend.put_many([(key, bytes(raw))], 3600)
    look = await store.lookup(model, ids)
    assert look.prefix_chunks == 2 and _corrupted(store, Kind.CHUNK_RECORD) == 1

    # A valid record stored under another chunk's key is rejected too (the envelope binds the key).
    rec0 = (await store.backend.get_many([record_key(model.namespace, hashes[0])]))[0]
    await store.backend.put_many([(record_key(model.namespace, hashes[1]), rec0 or b"")], 3600)
    assert (await store.lookup(model, ids)).prefix_chunks == 1
    assert _corrupted(store, Kind.CHUNK_RECORD) == 2

    # A corrupt blob is a miss on read, never wrong bytes.
    bkey = blob_key(model.namespace, hashes[0], 0)
    raw = bytearray((await store.backend.get_many([bkey]))[0] or b"")
    raw[100] ^= 0x80
    await store.backend.put_many([(bkey, bytes(raw))], 3600)
    assert await store.read_blob(model, look.chunks[0], 0) is None
    assert _corrupted(store, Kind.CHUNK) == 1


async def test_a_corrupt_blob_is_rewritten_by_the_next_put(store: ChunkStore, model: ModelKey) -> None:
    ids, kv = list(range(2 * N)), _kv(2 * N)
    await store.put(model, ids, _blobs(kv))
    key = blob_key(model.namespace, chunk_hashes(model, ids)[1], 0)
    raw = bytearray(await store.backend.get(key) or b"")
    raw[-3] ^= 0xFF  # bit rot in the stored envelope
    await store.backend.put_many([(key, bytes(raw))], 3600)
    look = await store.lookup(model, ids)
    assert await store.read_blob(model, look.chunks[1], 0, cached=False) is None  # found: dropped
    assert await store.backend.get(key) is None
    res = await store.put(model, ids, _blobs(kv))  # the producer uploads the context again
    # A record of a newer envelope version is unreadable here but not corrupt: never deleted.
    newer = bytearray(await store.backend.get(key) or b"")
    newer[4] += 1
    await store.backend.put_many([(key, bytes(newer))], 3600)
    assert await store.read_blob(model, look.chunks[1], 0, cached=False) is None
    assert await store.backend.get(key) == bytes(newer)
    await store.backend.delete_many([key])
    res = await store.put(model, ids, _blobs(kv))
    assert res.bytes_written == len(_blobs(kv)[1].levels[0])
    blob = await store.read_blob(model, (await store.lookup(model, ids)).chunks[1], 0)
    assert blob is not None and torch.equal(codec.decode(blob), kv[:, :, N:])


async def test_concurrent_writers_of_one_context(store: ChunkStore, model: ModelKey) -> None:
    ids = list(range(3 * N))
    kv = _kv(3 * N, 4)
    results = await asyncio.gather(*(store.put(model, ids, _blobs(kv, (0, 2))) for _ in range(8)))
    assert len({r.context_id for r in results}) == 1
    assert len(await _keys(store.backend, model, "man")) == 1
    assert len(await _keys(store.backend, model, "rec")) == 3
    look = await store.lookup(model, ids)
    assert look.prefix_chunks == 3 and all([lv.level for lv in c.levels] == [0, 2] for c in look.chunks)
    expected = _blobs(kv, (0, 2))
    for c in look.chunks:
        for lv in (0, 2):
            assert await store.read_blob(model, c, lv) == expected[c.index].levels[lv]
    man_key = manifest_key(model.namespace, results[0].context_id)
    man = pb.Manifest.FromString(
        open_envelope(man_key, (await store.backend.get_many([man_key]))[0] or b"", Kind.MANIFEST).body
    )
    assert list(man.token_ids) == ids and list(man.chunk_hashes) == chunk_hashes(model, ids)


async def test_levels_and_sidecars_accumulate(store: ChunkStore, model: ModelKey) -> None:
    ids = list(range(N))
    kv = _kv(N)
    await store.put(model, ids, _blobs(kv, (0,)))
    lossy = _blobs(kv, (2,))[0]
    lossy.sidecars["sparse.idx"] = b"\x01\x02"
    res = await store.put(model, ids, [lossy])
    assert res.dedup_chunks == 1
    (chunk,) = (await store.lookup(model, ids)).chunks
    assert [lv.level for lv in chunk.levels] == [0, 2] and list(chunk.sidecars) == ["sparse.idx"]
    assert await store.read_sidecar(model, chunk, "sparse.idx") == b"\x01\x02"


async def test_a_reput_keeps_metadata_and_a_rename_frees_the_old_name(
    store: ChunkStore, model: ModelKey
) -> None:
    ids, kv = list(range(2 * N)), _kv(2 * N)
    await store.put(model, ids, _blobs(kv, (0,)), name="doc", metadata={"source": "manual", "v": "1"})
    await store.put(model, ids, _blobs(kv, (2,)), metadata={"v": "2"})  # one more level: no restatement
    info = await store.get_context(model, ContextQuery(name="doc"))
    assert dict(info.metadata) == {"source": "manual", "v": "2"}
    await store.put(model, ids, _blobs(kv, (0,)), name="manual-v2")
    assert (await store.get_context(model, ContextQuery(name="manual-v2"))).context_id == info.context_id
    with pytest.raises(ContextNotFound):
        await store.resolve(model, ContextQuery(name="doc"))  # the old name no longer points here
    await store.delete(model, ContextQuery(name="manual-v2"))
    assert await _keys(store.backend, model) == []  # nothing left behind, no old name key either


async def test_names_are_per_namespace_even_with_colons(store: ChunkStore, model: ModelKey) -> None:
    # The old name key "{ns:name:N}" was shared by ("a", "prod:name:doc") and ("a:name:prod", "doc").
    other = dataclasses.replace(model, namespace=model.namespace + ":name:prod")
    mine = await store.put(model, list(range(N)), _blobs(_kv(N, 1)), name="prod:name:doc")
    theirs = await store.put(other, list(range(N)), _blobs(_kv(N, 2)), name="doc")
    assert await store.resolve(model, ContextQuery(name="prod:name:doc")) == mine.context_id
    assert await store.resolve(other, ContextQuery(name="doc")) == theirs.context_id
    await store.delete(other, ContextQuery(name="doc"))
    assert await store.resolve(model, ContextQuery(name="prod:name:doc")) == mine.context_id

    # A name written in the old format still resolves, but only to a context of this namespace that
    # carries that name (the old key may belong to another namespace).
    ns = model.namespace
    await store.backend.delete_many([name_key(ns, "prod:name:doc")])
    old_key = legacy_name_key(ns, "prod:name:doc")
    await store.backend.put(
        old_key, seal(old_key, Envelope(Kind.NAME_INDEX, model.model_id, mine.context_id)), None
    )
    assert await store.resolve(model, ContextQuery(name="prod:name:doc")) == mine.context_id
    with pytest.raises(ContextNotFound):  # the same old key seen from the colliding namespace
        await store.resolve(dataclasses.replace(model, namespace=ns + ":name:prod"), ContextQuery(name="doc"))
    await store.delete(model, ContextQuery(name="prod:name:doc"))
    assert await store.backend.get(old_key) is None

    # A context named "man": its name key (kvs:{ns:name}:man) is no manifest to list or count as corrupt.
    named = await store.put(model, list(range(N)), _blobs(_kv(N, 3)), name="man")
    assert [c.context_id for c in await store.list_contexts(ns)] == [named.context_id]
    assert _corrupted(store, Kind.MANIFEST) == 0


async def test_a_put_never_shortens_what_a_sharing_context_needs(store: ChunkStore, model: ModelKey) -> None:
    backend, ns = store.backend, model.namespace
    a_ids, b_ids = list(range(2 * N)), list(range(N)) + [7] * N  # chunk 0 shared
    await store.put(model, a_ids, _blobs(_kv(2 * N)), ttl=3000)
    await store.put(model, b_ids, _blobs(_kv(2 * N)), ttl=5)  # a short-lived context over a's chunk 0
    h0, hb1 = chunk_hashes(model, a_ids)[0], chunk_hashes(model, b_ids)[1]
    for key in (blob_key(ns, h0, 0), record_key(ns, h0), refs_key(ns, h0)):
        assert 2900 < (await backend.get_ttl(key) or 0) <= 3000, key  # not 5 s: a would lose its head
    assert 0 < (await backend.get_ttl(record_key(ns, hb1)) or 0) <= 5  # b's own chunk: b's TTL

    # Unpinning (or deleting) a pinned context keeps the longest TTL another context needs.
    # Re-putting a (content-addressed) context with a shorter TTL does not cut it short either.
    await store.put(model, a_ids, _blobs(_kv(2 * N)), ttl=5)
    assert 2900 < (await backend.get_ttl(manifest_key(ns, chunk_hashes(model, a_ids)[-1])) or 0) <= 3000

    c_ids = list(range(N)) + [8] * N
    await store.put(model, c_ids, _blobs(_kv(2 * N)), pin=True)
    assert await backend.get_ttl(record_key(ns, h0)) is None
    await store.set_pinned(model, ContextQuery(token_ids=c_ids), False)  # c's own TTL: 3600 (default)
    assert 3500 < (await backend.get_ttl(record_key(ns, h0)) or 0) <= 3600
    await store.set_pinned(model, ContextQuery(token_ids=c_ids), True)
    await store.delete(model, ContextQuery(token_ids=c_ids))
    assert 2900 < (await backend.get_ttl(record_key(ns, h0)) or 0) <= 3600


async def test_commits_deletes_and_pins_of_a_namespace_do_not_interleave(
    store: ChunkStore, model: ModelKey
) -> None:
    kv = _kv(2 * N, 3)
    ids = list(range(2 * N))
    # Two puts of one context with different levels: both levels stay listed and counted.
    await asyncio.gather(store.put(model, ids, _blobs(kv, (0,))), store.put(model, ids, _blobs(kv, (2,))))
    look = await store.lookup(model, ids)
    assert [[lv.level for lv in c.levels] for c in look.chunks] == [[0, 2], [0, 2]]
    info = await store.get_context(model, ContextQuery(token_ids=ids))
    assert sorted(lv.level for lv in info.level_bytes) == [0, 2]
    # A delete racing a put of a context that shares a chunk: the put's context stays whole.
    b_ids = ids[:N] + [9] * N
    _, b = await asyncio.gather(
        store.delete(model, ContextQuery(token_ids=ids)), store.put(model, b_ids, _blobs(kv, (0,)))
    )
    look = await store.lookup(model, b_ids)
    assert look.prefix_chunks == 2
    for c in look.chunks:
        assert await store.read_blob(model, c, 0, cached=False) is not None, c.index
    # A pin racing the delete of its context: either order, never a context without chunks.
    results = await asyncio.gather(
        store.set_pinned(model, ContextQuery(context_id=b.context_id), True),
        store.delete(model, ContextQuery(context_id=b.context_id)),
        return_exceptions=True,
    )
    assert not [r for r in results if isinstance(r, Exception) and not isinstance(r, ContextNotFound)]
    assert await store.list_contexts(model.namespace) == []


async def test_a_context_counts_the_levels_its_shared_chunks_keep(store: ChunkStore, model: ModelKey) -> None:
    # c stores levels 0 and 4; a (c's first chunk) uploads level 4 only, but level 0 of that chunk is
    # readable through a too, and stays stored after c is deleted: a's manifest must count it.
    kv = _kv(2 * N, 5)
    c_ids = list(range(2 * N))
    both = _blobs(kv, (0, 4))
    await store.put(model, c_ids, both)
    await store.put(model, c_ids[:N], _blobs(kv[:, :, :N], (4,)))
    await store.delete(model, ContextQuery(token_ids=c_ids))
    info = await store.get_context(model, ContextQuery(token_ids=c_ids[:N]))
    assert info.total_bytes == len(both[0].levels[0]) + len(both[0].levels[4])
    # The same for a sidecar (records list sidecar names only: its size is read from storage).
    d_ids = [5] * (2 * N)
    await store.put(model, d_ids, [ChunkBlobs({0: b.levels[0]}, {"idx": b"s" * 5000}) for b in both])
    await store.put(model, d_ids[:N], [ChunkBlobs({0: both[0].levels[0]})])
    await store.delete(model, ContextQuery(token_ids=d_ids))
    info = await store.get_context(model, ContextQuery(token_ids=d_ids[:N]))
    assert info.total_bytes == len(both[0].levels[0]) + 5000


async def test_contexts_of_many_chunks(store: ChunkStore, model: ModelKey) -> None:
    # More chunks than a connection pool has connections (redis-py: 100): per-chunk calls are bounded.
    ids = list(range(150 * N))
    blob = codec.encode(_kv(N), 0)
    await store.put(model, ids, [ChunkBlobs({0: blob}) for _ in range(150)])
    assert (await store.lookup(model, ids)).prefix_chunks == 150
    await store.set_pinned(model, ContextQuery(token_ids=ids), True)
    assert await store.delete(model, ContextQuery(token_ids=ids)) == 150


async def test_a_full_store_can_still_be_emptied() -> None:
    store = ChunkStore(open_backend("memory://?capacity=20000"), default_ttl=3600)
    model = ModelKey("stories260K", namespace="full", chunk_tokens=N)
    stored = []
    with pytest.raises(BackendFull):  # pinned contexts until nothing more fits
        for i in range(100):
            ids = [i] * (2 * N)
            await store.put(model, ids, _blobs(_kv(2 * N, i)), pin=True)
            stored.append(ids)
    assert stored
    await store.set_pinned(model, ContextQuery(token_ids=stored[0]), False)  # no room for a lease key
    assert await store.delete(model, ContextQuery(token_ids=stored[-1])) == 2
    await store.backend.close()


async def test_a_shared_chunk_keeps_every_level_its_record_lists(store: ChunkStore, model: ModelKey) -> None:
    # a stores levels 0 and 2 and a sidecar, short-lived; b pins a context over a's chunk 0 with level 0
    # only. b's record of chunk 0 lists level 2 and the sidecar: they must live (here: be pinned) with b.
    backend, ns = store.backend, model.namespace
    a_ids, b_ids = list(range(N)), list(range(N)) + [7] * N
    kv = _kv(2 * N)
    a_chunk = _blobs(kv[:, :, :N], (0, 2))[0]
    await store.put(model, a_ids, [ChunkBlobs(a_chunk.levels, {"idx": b"S" * 100})], ttl=30)
    await store.put(model, b_ids, _blobs(kv, (0,)), pin=True)
    h0 = chunk_hashes(model, b_ids)[0]
    for key in (blob_key(ns, h0, 0), blob_key(ns, h0, 2), sidecar_key(ns, h0, "idx"), record_key(ns, h0)):
        assert await backend.get_ttl(key) is None, key


async def test_a_refused_put_leaves_no_blobs(store: ChunkStore, model: ModelKey) -> None:
    # Blobs are written before the lease and the quota is checked again under it: concurrent uploads
    # that lose that check must not park their bytes (they are deleted, and staged with a short TTL in
    # case the front end dies before it can).
    ids = list(range(2 * N))
    calls = 0

    async def budget() -> int:  # passes the early check, refuses the one under the lease
        nonlocal calls
        calls += 1
        return 1 << 30 if calls == 1 else 0

    staged: list[float | None] = []
    real_put_if_absent = store.backend.put_if_absent

    async def spy(key: str, value: bytes, ttl: float | None) -> bool:
        if key.endswith(":L0"):
            staged.append(ttl)
        return await real_put_if_absent(key, value, ttl)

    store.backend.put_if_absent = spy  # type: ignore[method-assign]
    with pytest.raises(QuotaExceeded):
        await store.put(model, ids, _blobs(_kv(2 * N)), ttl=10**9, byte_budget=budget)
    store.backend.put_if_absent = real_put_if_absent  # type: ignore[method-assign]
    assert staged == [STAGING_TTL_S] * 2 and await _keys(store.backend, model) == []
    # A blob a committed context lists is never taken: a refused re-put adding level 2 keeps level 0.
    await store.put(model, ids, _blobs(_kv(2 * N)), ttl=10**6)
    calls = 0
    with pytest.raises(QuotaExceeded):
        await store.put(model, ids, _blobs(_kv(2 * N), (0, 2)), byte_budget=budget)
    assert len(await _keys(store.backend, model, "L0")) == 2 and not await _keys(store.backend, model, "L2")
    for key in await _keys(store.backend, model, "L0"):
        assert (await store.backend.get_ttl(key) or 0) > 10**6 - 100


async def test_a_refused_put_never_restages_a_committed_blob(store: ChunkStore, model: ModelKey) -> None:
    # A put whose existence check ran before another put committed the same blob must not overwrite
    # it: the write would replace a pinned (or long) TTL with the short staging one, and a refused
    # commit would leave it so.
    ids = list(range(2 * N))
    await store.put(model, ids, _blobs(_kv(2 * N)), pin=True)
    real_exists = store.backend.exists_many

    async def stale_check(keys: Sequence[str]) -> list[bool]:  # "missing": the check ran earlier
        return [False] * len(keys)

    async def refuse() -> int:
        return 0

    store.backend.exists_many = stale_check  # type: ignore[method-assign]
    with pytest.raises(QuotaExceeded):
        await store.put(model, ids, _blobs(_kv(2 * N)), byte_budget=refuse)
    store.backend.exists_many = real_exists  # type: ignore[method-assign]
    for key in await _keys(store.backend, model, "L0"):
        assert await store.backend.get_ttl(key) is None, key


async def test_a_reput_after_a_delete_cut_short_counts_sidecars_once(
    store: ChunkStore, model: ModelKey
) -> None:
    ids = list(range(3 * N))
    blobs = [ChunkBlobs(c.levels, {"idx": b"S" * 1000}) for c in _blobs(_kv(3 * N))]
    await store.put(model, ids, blobs)
    total = (await store.get_context(model, ContextQuery(token_ids=ids))).total_bytes
    real, calls = store.backend.set_remove, 0

    async def flaky(key: str, members: Sequence[bytes]) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:  # chunk 0 is freed, then the backend fails
            raise BackendError("connection reset (injected)")
        return await real(key, members)

    store.backend.set_remove = flaky  # type: ignore[method-assign]
    with pytest.raises(BackendError):
        await store.delete(model, ContextQuery(token_ids=ids))
    store.backend.set_remove = real  # type: ignore[method-assign]
    await store.put(model, ids, blobs)  # the producer stores it again
    assert (await store.get_context(model, ContextQuery(token_ids=ids))).total_bytes == total


async def test_labels_stored_before_the_limit_keep_the_context_re_puttable(
    store: ChunkStore, model: ModelKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = list(range(N))
    monkeypatch.setattr("kvstore.store.MAX_METADATA_ENTRIES", 200)  # an older release's limit
    await store.put(model, ids, _blobs(_kv(N)), metadata={f"k{i}": "v" for i in range(100)})
    monkeypatch.undo()
    await store.put(model, ids, _blobs(_kv(N), (2,)))  # one more level, no new labels
    with pytest.raises(InvalidRequest, match="metadata"):
        await store.put(model, ids, _blobs(_kv(N)), metadata={"new": "label"})


async def test_metadata_is_a_bounded_label_set(store: ChunkStore, model: ModelKey) -> None:
    ids = list(range(N))
    with pytest.raises(InvalidRequest, match="metadata"):
        await store.put(model, ids, _blobs(_kv(N)), metadata={"k": "v" * MAX_METADATA_BYTES})
    await store.put(model, ids, _blobs(_kv(N)), metadata={f"k{i}": "v" for i in range(MAX_METADATA_ENTRIES)})
    with pytest.raises(InvalidRequest, match="with what the context already has"):  # re-puts add up
        await store.put(model, ids, _blobs(_kv(N)), metadata={"one-more": "v"})
    assert len((await store.get_context(model, ContextQuery(token_ids=ids))).metadata) == MAX_METADATA_ENTRIES


async def test_what_a_context_adds_to_shared_chunks_counts_for_every_sharer(
    store: ChunkStore, model: ModelKey
) -> None:
    # Quotas add up each context's bytes: what b adds to a chunk it shares with a stays when b is
    # deleted (a still holds the chunk), so it must be in a's total too, or a tenant could grow its
    # namespace without bound by putting and deleting such contexts.
    a_ids, b_ids = list(range(N)), list(range(2 * N))
    kv = _kv(2 * N)
    await store.put(model, a_ids, _blobs(kv[:, :, :N], (4,)))
    before = (await store.get_context(model, ContextQuery(token_ids=a_ids))).total_bytes
    b_blobs = _blobs(kv, (0,))
    b_blobs[0] = ChunkBlobs(b_blobs[0].levels, {"idx": b"S" * 2500})
    await store.put(model, b_ids, b_blobs)
    await store.delete(model, ContextQuery(token_ids=b_ids))
    a = await store.get_context(model, ContextQuery(token_ids=a_ids))
    assert a.total_bytes == before + len(b_blobs[0].levels[0]) + 2500
    assert {lv.level for lv in a.level_bytes} == {0, 4}
    assert sum(i.total_bytes for i in await store.context_infos(model.namespace)) == a.total_bytes


async def test_a_reput_adds_to_the_manifest_and_a_budget_refuses_before_writing(
    store: ChunkStore, model: ModelKey
) -> None:
    ids = list(range(2 * N))
    kv = _kv(2 * N)
    lossless, lossy = _blobs(kv, (0,)), _blobs(kv, (2,))
    size = {lv: sum(len(c.levels[lv]) for c in blobs) for lv, blobs in ((0, lossless), (2, lossy))}
    await store.put(model, ids, lossless)
    first = await store.get_context(model, ContextQuery(token_ids=ids))
    await store.put(model, ids, lossy)  # another level in a second put: counted, not replacing level 0
    await store.put(model, ids, lossless)  # a retry of stored blobs adds nothing
    info = await store.get_context(model, ContextQuery(token_ids=ids))
    assert {lv.level: lv.size_bytes for lv in info.level_bytes} == size
    assert info.total_bytes == size[0] + size[2] and info.created_unix == first.created_unix
    keys = await _keys(store.backend, model)
    more = _blobs(kv, (4,))
    with pytest.raises(QuotaExceeded) as err:
        await store.put(model, ids, more, byte_budget=info.total_bytes + 1)
    assert err.value.total_bytes == info.total_bytes + sum(len(c.levels[4]) for c in more)
    assert await _keys(store.backend, model) == keys  # nothing written
    await store.put(model, ids, lossless, byte_budget=info.total_bytes)  # a retry fits exactly


async def test_list_and_stat_by_namespace(store: ChunkStore, model: ModelKey) -> None:
    other = ModelKey("other-model", namespace=model.namespace, chunk_tokens=N)
    elsewhere = ModelKey("stories260K", namespace=model.namespace + ":b", chunk_tokens=N)
    for i, m in enumerate((model, other, elsewhere)):
        await store.put(m, list(range(i, i + N)), _blobs(_kv(N, i)), name=f"c{i}")
    listed = await store.list_contexts(model.namespace)
    assert sorted(c.name for c in listed) == ["c0", "c1"]
    assert [c.name for c in await store.list_contexts(model.namespace, model_id="other-model")] == ["c1"]
    assert len(await store.list_contexts(model.namespace, limit=1)) == 1
    stat = await store.stat(model.namespace)
    assert stat.contexts == 2 and stat.keys > 0 and stat.backend == store.backend.name


async def test_listing_reads_summaries_not_manifests(store: ChunkStore, model: ModelKey) -> None:
    # Manifests hold every token id: List/Stat/quotas must not load them all. Contexts stored before
    # summaries existed (no info key) are still listed from their manifest; a summary whose manifest is
    # gone (evicted, or deleted by an older front end) is not.
    ns = model.namespace
    contexts = [await store.put(model, list(range(i, i + 2 * N)), _blobs(_kv(2 * N, i))) for i in range(3)]
    legacy, gone = contexts[1].context_id, contexts[2].context_id
    await store.backend.delete_many([info_key(ns, legacy), manifest_key(ns, gone)])
    real_get_many, read = store.backend.get_many, []

    async def spy(keys: Sequence[str]) -> list[bytes | None]:
        read.extend(keys)
        return await real_get_many(keys)

    store.backend.get_many = spy  # type: ignore[method-assign]
    listed = await store.list_contexts(ns)
    store.backend.get_many = real_get_many  # type: ignore[method-assign]
    assert sorted(c.context_id for c in listed) == sorted([contexts[0].context_id, legacy])
    assert [k for k in read if k.endswith(":man")] == [manifest_key(ns, legacy)]
    assert (await store.stat(ns)).contexts == 2
    assert {i.context_id: i.total_bytes for i in await store.context_infos(ns)} == {
        c.context_id: c.bytes_written for c in contexts[:2]
    }
    await store.delete(model, ContextQuery(context_id=contexts[0].context_id))
    assert await store.backend.get(info_key(ns, contexts[0].context_id)) is None


async def test_namespace_lease_is_exclusive_and_expires(store: ChunkStore, model: ModelKey) -> None:
    ns = model.namespace
    order: list[str] = []

    async def holder(name: str) -> None:
        async with store.namespace_lease(ns):
            order.append(f"{name}+")
            await asyncio.sleep(0.05)
            order.append(f"{name}-")

    await asyncio.gather(holder("a"), holder("b"))
    assert order in (["a+", "a-", "b+", "b-"], ["b+", "b-", "a+", "a-"])  # never interleaved
    # A holder that died keeps the lease only for its TTL; a waiter gives up with a clear error.
    assert await store.backend.put_if_absent(lease_key(ns), b"dead-front-end", 0.3)
    with pytest.raises(NamespaceBusy, match="busy"):
        async with store.namespace_lease(ns, wait=0.05):
            pass
    async with store.namespace_lease(ns, wait=5.0):
        assert await store.backend.get(lease_key(ns)) not in (None, b"dead-front-end")
    assert await store.backend.get(lease_key(ns)) is None  # released
    # A live holder renews its lease: another front end cannot take it after the TTL.
    peer = ChunkStore(store.backend, default_ttl=3600)
    async with store.namespace_lease(ns, ttl=0.3):
        with pytest.raises(NamespaceBusy):
            async with peer.namespace_lease(ns, wait=0.8):
                pass
