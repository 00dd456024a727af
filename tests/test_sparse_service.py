"""Sparse-recall backends on the kvstream service (client/sparse/service.py), against a live in-process
server over a real socket with a memory backend the test can corrupt.

Indexes built where the context is stored are fetched bit-exact; decoding with a fetched index (never
built on the node) and with KV rows pulled from the service gives bit-identical logits; the chunk fetcher
returns exactly the stored rows and asks only for the chunks it lacks (counted by a gRPC interceptor);
a damaged sidecar fails loudly. Blocking service calls run on worker threads: the server shares this
test's event loop (one grpc.aio loop per process, grpc/grpc#25364).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from client.api import AsyncKVCacheClient
from client.model import Llama2c
from client.sparse import SidecarError, SparseIndex, get_backend
from client.sparse.decode import SparseDecoder
from client.sparse.service import (
    DEFAULT_BACKENDS,
    IndexUnavailable,
    ServiceChunkFetcher,
    build_and_store_indexes,
    fetch_index,
    row_layouts,
    sidecar_name,
)
from kvstore.backends.memory import MemoryBackend
from kvstore.envelope import Envelope, Kind, open_envelope, seal
from kvstore.keys import ModelKey, chunk_hashes
from kvstore.preload import BOS_ID
from kvstore.server import KVStreamServer
from kvstore.store import sidecar_key
from tests.support import kvctl, memory_server

CHUNK = 64
STORED = 5 * CHUNK  # the context: 5 full chunks ...
TAIL = 20  # ... plus a partial chunk that is not stored (nor indexed)
BUDGET = 0.25
MODEL = ModelKey("stories260K", dtype="float32", chunk_tokens=CHUNK)


@pytest.fixture(scope="module")
def ctx(model_path: Path) -> dict[str, Any]:
    """The stories260K model, a sampled context (stored prefix + tail) and its prefill KV / queries."""
    m = Llama2c.from_file(model_path)
    ids = m.sample(STORED + TAIL + 8, seed=7)
    res = m.forward(ids[: STORED + TAIL], return_queries=True)
    # The stored prefix is exactly what a node's own prefill of it computes: a forward over more tokens
    # can differ in the last bit (other matmul blocking), and the tests compare decodes bit for bit.
    head = m.forward(ids[:STORED], return_queries=True)
    assert res.queries is not None and head.queries is not None
    kv = torch.cat([head.kv, res.kv[:, :, STORED:]], 2)
    q = torch.cat([head.queries, res.queries[:, STORED:]], 1)
    return {"model": m, "ids": ids[: STORED + TAIL], "next": ids[STORED:], "kv": kv, "q": q}


def local_index(ctx: dict[str, Any], backend: str) -> SparseIndex:
    """The index built on the node, over exactly the stored prefix."""
    b = get_backend(backend, BUDGET)
    return b.build_index(ctx["kv"][:, :, :STORED], ctx["q"][:, :STORED])


@pytest.fixture
async def live() -> AsyncIterator[KVStreamServer]:
    async with memory_server() as srv:
        yield srv


@pytest.fixture
async def client(live: KVStreamServer) -> AsyncIterator[AsyncKVCacheClient]:
    async with AsyncKVCacheClient(live.address) as c:
        yield c


class StartRecorder(grpc.StreamStreamClientInterceptor):  # type: ignore[misc]
    """Records ``(start_chunk, max_chunks, sidecars)`` of every StreamContext a channel opens."""

    def __init__(self) -> None:
        self.starts: list[tuple[int, int, list[str]]] = []

    def intercept_stream_stream(self, continuation: Callable[..., Any], details: Any, requests: Any) -> Any:
        def tap() -> Iterator[Any]:
            for req in requests:
                if req.WhichOneof("msg") == "start":
                    s = req.start
                    self.starts.append((s.start_chunk, s.max_chunks, list(s.sidecars)))
                yield req

        return continuation(details, tap())


def assert_same_index(a: SparseIndex, b: SparseIndex) -> None:
    assert (a.backend, a.params) == (b.backend, b.params)
    assert a.tensors.keys() == b.tensors.keys()
    for name, t in a.tensors.items():
        assert t.dtype == b.tensors[name].dtype and torch.equal(t, b.tensors[name]), name


# ----- index build and fetch ------------------------------------------------------------------------


async def test_stored_indexes_fetch_bit_exact(client: AsyncKVCacheClient, ctx: dict[str, Any]) -> None:
    ids = ctx["ids"]
    # A context stored earlier (two levels, metadata), then indexed by the storing worker.
    await client.store(MODEL, ids, ctx["kv"][:, :, :STORED], levels=[0, 2], metadata={"src": "doc"})
    res = await build_and_store_indexes(client, MODEL, ids, ctx["kv"], queries=ctx["q"])
    assert res.stored_tokens == STORED and res.dedup_chunks == STORED // CHUNK and res.bytes_written > 0
    info = await client.get_context(MODEL, ids)
    assert [lv.level for lv in info.level_bytes] == [0, 2]  # the re-put kept the manifest complete
    assert dict(info.metadata) == {"src": "doc"}
    look = await client.lookup(MODEL, ids)
    assert [list(c.sidecars) for c in look.chunks[:-1]] == [[]] * (STORED // CHUNK - 1)
    assert sorted(look.chunks[-1].sidecars) == sorted(sidecar_name(b) for b in DEFAULT_BACKENDS)

    recorder = StartRecorder()
    with ServiceChunkFetcher(client.addresses, MODEL, ids, interceptors=[recorder]) as fetcher:
        for backend in DEFAULT_BACKENDS:
            want = local_index(ctx, backend)
            assert_same_index(await fetch_index(client, MODEL, ids, backend), want)
            assert_same_index(await asyncio.to_thread(fetcher.fetch_index, backend), want)
    last = STORED // CHUNK - 1
    assert recorder.starts == [(last, 1, [sidecar_name(b)]) for b in DEFAULT_BACKENDS]  # last chunk only


async def test_missing_or_damaged_index_fails_loudly(
    live: KVStreamServer, client: AsyncKVCacheClient, ctx: dict[str, Any]
) -> None:
    ids = ctx["ids"]
    with pytest.raises(IndexUnavailable, match="not stored"):
        await fetch_index(client, MODEL, ids, "shadowkv")
    await build_and_store_indexes(client, MODEL, ids, ctx["kv"], ["shadowkv"], levels=[0])
    with pytest.raises(IndexUnavailable, match="no sidecar 'sparse.pqcache'"):
        await fetch_index(client, MODEL, ids, "pqcache")

    backend = live.backend
    assert isinstance(backend, MemoryBackend)
    key = sidecar_key(MODEL.namespace, chunk_hashes(MODEL, ids)[-1], sidecar_name("shadowkv"))
    (raw,) = await backend.get_many([key])
    assert raw is not None
    body = open_envelope(key, raw, Kind.SIDECAR).body

    # Damage caught by the store's envelope check: the server withholds the chunk.
    bad = bytearray(raw)
    bad[len(bad) // 2] ^= 0x40
    await backend.put(key, bytes(bad), None)
    with pytest.raises(IndexUnavailable, match="could not read.*missing or corrupt"):
        await fetch_index(client, MODEL, ids, "shadowkv")

    # Damage under a valid envelope (e.g. a faulty writer): the sidecar's own checksum catches it.
    bad_body = bytearray(body)
    bad_body[len(bad_body) // 2] ^= 0x01
    await backend.put(key, seal(key, Envelope(Kind.SIDECAR, MODEL.model_id, bytes(bad_body))), None)
    with pytest.raises(SidecarError, match="checksum"):
        await fetch_index(client, MODEL, ids, "shadowkv")
    with ServiceChunkFetcher(client.addresses, MODEL, ids) as fetcher, pytest.raises(SidecarError):
        await asyncio.to_thread(fetcher.fetch_index, "shadowkv")


# ----- decoding with the fetched index and remote KV ------------------------------------------------


def _decode(
    ctx: dict[str, Any], backend: str, index: SparseIndex, fetcher: ServiceChunkFetcher | None
) -> Any:
    """Teacher-forced logits of 6 steps after a prefill of the stored prefix, with ``index`` given."""
    b = get_backend(backend, BUDGET)

    def no_build(*_: Any, **__: Any) -> SparseIndex:
        raise AssertionError("the index must not be built on the inference node")

    b.build_index = no_build  # type: ignore[method-assign]
    dec = SparseDecoder(ctx["model"], b)
    try:
        logits = [dec.prefill(ctx["ids"][:STORED], index=index)]
        assert dec.state is not None
        if fetcher is not None:
            fetcher.attach(dec.state)
        logits += [dec.step(tok) for tok in ctx["next"][:6]]
        return torch.stack(logits), dec.state.stats.rows_fetched
    finally:
        dec.close()


@pytest.mark.parametrize("backend", DEFAULT_BACKENDS)
async def test_decode_with_fetched_index_and_remote_kv(
    client: AsyncKVCacheClient, ctx: dict[str, Any], backend: str
) -> None:
    ids = ctx["ids"]
    await build_and_store_indexes(client, MODEL, ids, ctx["kv"], [backend], queries=ctx["q"], levels=[0])
    want, rows_local = _decode(ctx, backend, local_index(ctx, backend), None)
    fetched = await fetch_index(client, MODEL, ids, backend)
    got, _ = await asyncio.to_thread(_decode, ctx, backend, fetched, None)
    assert torch.equal(got, want)
    with ServiceChunkFetcher(client.addresses, MODEL, ids, level=0) as fetcher:
        remote, rows_remote = await asyncio.to_thread(_decode, ctx, backend, fetched, fetcher)
        assert torch.equal(remote, want)  # rows pulled from the service (lossless) are the host's rows
        assert rows_remote == rows_local
        if row_layouts(fetched):  # offloaded rows that are stored KV rows come from the service
            assert fetcher.stats.chunks > 0 and set(fetcher.stats.levels) == {0}
        else:
            assert fetcher.stats.requests == 0


# ----- the chunk fetcher ----------------------------------------------------------------------------


async def test_chunk_fetcher_rows_exact_and_only_needed_chunks(
    client: AsyncKVCacheClient, ctx: dict[str, Any]
) -> None:
    ids, kv = ctx["ids"], ctx["kv"][:, :, :STORED]
    await client.store(MODEL, ids, kv, levels=[0, 1])
    n_kv = kv.shape[3]
    gen = torch.Generator().manual_seed(0)

    def tokens_in(chunks: list[int], n: int = 12) -> torch.Tensor:
        pool = torch.cat([torch.arange(c * CHUNK, (c + 1) * CHUNK) for c in chunks])
        tok = pool[torch.randint(len(pool), (n_kv, n, 1), generator=gen)]
        tok[:, : len(chunks), 0] = torch.tensor(chunks) * CHUNK  # every chunk is hit
        tok[0, -1] = -1  # padding reads as zeros
        return tok

    def expected(layer: int, tok: torch.Tensor) -> torch.Tensor:
        t = tok.clamp(min=0)[..., 0]
        heads = torch.arange(n_kv)[:, None]
        rows = torch.cat([kv[layer, 0][t, heads], kv[layer, 1][t, heads]], -1)
        return torch.where(tok >= 0, rows, 0.0)

    recorder = StartRecorder()
    with ServiceChunkFetcher(client.addresses, MODEL, ids, level=0, interceptors=[recorder]) as f:
        for chunks, layer, streams in (
            ([0, 1, 3], 2, [(0, 2), (3, 1)]),  # adjacent chunks coalesce into one stream
            ([1, 2, 4], 4, [(2, 1), (4, 1)]),  # chunk 1 is cached (a blob spans every layer)
            ([0, 4], 0, []),  # all cached
        ):
            recorder.starts.clear()
            tok = tokens_in(chunks)
            got = await asyncio.to_thread(f.gather, layer, tok)
            assert torch.equal(got, expected(layer, tok))
            assert [(s, n) for s, n, _ in recorder.starts] == streams
        assert f.stats.chunks == 5 and f.stats.requests == 4 and set(f.stats.levels) == {0}

    one_chunk = kv[:, :, :CHUNK].numel() * kv.element_size()
    with ServiceChunkFetcher(client.addresses, MODEL, ids, cache_bytes=one_chunk) as small:
        for c in (0, 1, 0):
            await asyncio.to_thread(small.chunks, [c])
        assert small.stats.chunks == 3  # LRU by bytes: chunk 0 was evicted by chunk 1


async def test_values_only_and_random_row_sets(client: AsyncKVCacheClient, ctx: dict[str, Any]) -> None:
    ids, kv = ctx["ids"], ctx["kv"][:, :, :STORED]
    await client.store(MODEL, ids, kv, levels=[0])
    gen = torch.Generator().manual_seed(1)
    with ServiceChunkFetcher(client.addresses, MODEL, ids) as f:
        for trial in range(4):
            tok = torch.randint(-1, STORED, (kv.shape[3], 9, 3), generator=gen)
            layer = trial % kv.shape[0]
            got = await asyncio.to_thread(f.gather, layer, tok, (1,))
            want = kv[layer, 1][tok.clamp(min=0), torch.arange(kv.shape[3])[:, None, None]]
            want = torch.where(tok[..., None] >= 0, want, 0.0).reshape(got.shape)
            assert torch.equal(got, want)
        with pytest.raises(IndexError):
            await asyncio.to_thread(f.gather, 0, torch.full((kv.shape[3], 1, 1), STORED))


@pytest.mark.parametrize("backend", ["shadowkv", "pqcache", "clusterkv"])
async def test_remote_fetch_matches_host_store(
    client: AsyncKVCacheClient, ctx: dict[str, Any], backend: str
) -> None:
    """The row layouts mirror each backend's host store bit for bit (rows of padding aside)."""
    ids, kv = ctx["ids"], ctx["kv"][:, :, :STORED]
    await client.store(MODEL, ids, kv, levels=[0])
    index = local_index(ctx, backend)
    state = get_backend(backend, BUDGET, prefetch_workers=0).prefill(kv, index=index)
    gen = torch.Generator().manual_seed(2)
    with ServiceChunkFetcher(client.addresses, MODEL, ids) as f:
        remote = f.for_backend(index, local=state.store.fetch)
        for layer in range(kv.shape[0]):
            for name, layout in row_layouts(index).items():
                n_rows = state.store.get(layer, name).shape[1]
                assert n_rows == layout.n_rows(layer, STORED)
                rows = torch.randint(-1, n_rows, (kv.shape[3], 7), generator=gen)
                got = await asyncio.to_thread(remote, layer, name, rows)
                want = state.store.fetch(layer, name, rows)
                ok = rows >= 0
                assert got.shape == want.shape and torch.equal(got[ok], want[ok])
        if backend == "clusterkv":  # rows past the context (absorbed generated tokens) stay on the node
            extra = torch.randn(kv.shape[3], 5, 2 * kv.shape[4])
            state.store.put(0, "kv", torch.cat([state.store.get(0, "kv"), extra], 1))
            rows = torch.tensor([[0, STORED - 3, STORED - 2]] * kv.shape[3])  # N = STORED - sink rows
            n = row_layouts(index)["kv"].n_rows(0, STORED)
            rows[:, 1:] = torch.tensor([n, n + 4])
            got = await asyncio.to_thread(remote, 0, "kv", rows)
            assert torch.equal(got, state.store.fetch(0, "kv", rows))
    state.close()


# ----- kvctl preload --sparse -------------------------------------------------------------------------


async def test_preload_sparse(
    live: KVStreamServer, client: AsyncKVCacheClient, ctx: dict[str, Any], model_path: Path, tmp_path: Path
) -> None:
    """``kvctl preload --sparse`` stores the indexes with the window; resumes when one is missing."""
    ids = [BOS_ID, *ctx["ids"][1:]]
    doc = tmp_path / "doc.ids"
    doc.write_text(" ".join(map(str, ids)))
    base = ["preload", str(doc), "--model-file", str(model_path), "--chunk-tokens", str(CHUNK)]
    base += ["--dtype", "float32", "--levels", "0", "--json"]
    commands = [
        [*base, "--sparse", "shadowkv,pqcache"],
        [*base, "--sparse", "shadowkv,pqcache,clusterkv"],  # clusterkv missing: stored again
        [*base, "--sparse", "clusterkv"],  # all there: skipped
        [*base, "--sparse", "alisa"],  # needs prefill queries: refused
    ]
    results = await kvctl(live.address, *commands, timeout=120)
    (c1, o1, e1), (c2, o2, e2), (c3, o3, e3), (c4, _, e4) = results
    assert (c1, c2, c3) == (0, 0, 0), e1 + e2 + e3
    assert [json.loads(o)["windows_skipped"] for o in (o1, o2, o3)] == [0, 0, 1]
    assert c4 == 2 and "--sparse" in e4

    look = await client.lookup(MODEL, ids)
    assert look.prefix_chunks == STORED // CHUNK
    assert sorted(look.chunks[-1].sidecars) == ["sparse.clusterkv", "sparse.pqcache", "sparse.shadowkv"]
    assert not any(c.sidecars for c in look.chunks[:-1])
    kv = ctx["model"].forward(ids[:STORED]).kv  # the preload's prefill, in this process
    for backend in ("shadowkv", "pqcache", "clusterkv"):
        got = await fetch_index(client, MODEL, ids, backend)
        want = get_backend(backend, BUDGET).build_index(kv)
        assert got.params == want.params
        assert {n: t.shape for n, t in got.tensors.items()} == {n: t.shape for n, t in want.tensors.items()}
    landmarks = (await fetch_index(client, MODEL, ids, "shadowkv")).tensors["landmarks"]
    assert torch.allclose(landmarks, get_backend("shadowkv", BUDGET).build_index(kv).tensors["landmarks"])
