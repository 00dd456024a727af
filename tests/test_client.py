"""Client API details that the end-to-end streaming tests do not pin down (real in-process server)."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator

import pytest
import torch

import codec
from benchmarks.ttft_bench import synthetic_context, token_ids
from client import AsyncKVCacheClient, KVCacheClient
from client.api import _FetchState
from kvstore.backends import open_backend
from kvstore.config import ServerConfig
from kvstore.keys import ModelKey
from kvstore.rpc import pb
from kvstore.server import KVStreamServer

SHAPE = (2, 2, 16)  # layers, kv_heads, head_dim


@pytest.fixture
async def server() -> AsyncIterator[KVStreamServer]:
    srv = KVStreamServer(ServerConfig(listen="127.0.0.1:0", grace_seconds=0.1), open_backend("memory://"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


def _client_threads() -> int:
    return sum(t.name == "kvstream-client" for t in threading.enumerate())


def test_a_sync_client_that_fails_to_construct_leaves_no_thread_behind() -> None:
    before = _client_threads()
    for kwargs in ({"addresses": []}, {"addresses": "127.0.0.1:1", "tls_ca": "/nonexistent.pem"}):
        with pytest.raises((ValueError, OSError)):
            KVCacheClient(**kwargs)  # type: ignore[arg-type]
    assert _client_threads() == before


async def test_store_ttl_is_rounded_up_to_whole_seconds(server: KVStreamServer) -> None:
    model = ModelKey("t", chunk_tokens=16)
    ids = token_ids(32, 0)
    kv = synthetic_context(32, 16, SHAPE)
    async with AsyncKVCacheClient(server.address) as c:
        with pytest.raises(ValueError, match="ttl"):
            await c.store(model, ids, kv, levels=[0], ttl=-1)
        await c.store(model, ids, kv, levels=[0], ttl=0.5)  # not 0, which means "the server's default"
        assert 0 < (await c.get_context(model, ids)).ttl_seconds <= 1


async def test_recompute_markers_past_the_first_header_still_give_the_whole_prefix() -> None:
    # A first stream announced 2 chunks (max_chunks, or a context that grew before a resume); the
    # resumed stream's 2 more chunks are recompute markers: kv must cover all 4, zeros where recomputed.
    blobs = codec.encode_context(synthetic_context(64, 16, SHAPE), 16, (0,))
    state = _FetchState(16, "cpu")
    state.on_header(pb.StreamHeader(chunk_tokens=16, chunks=[pb.ChunkInfo(index=i) for i in range(2)]))
    for i in range(2):
        state.on_blob(pb.ChunkData(chunk_index=i, level=0, last=True), blobs[i][0])
    state.on_header(pb.StreamHeader(chunk_tokens=16, chunks=[pb.ChunkInfo(index=i) for i in (2, 3)]))
    for i in (2, 3):
        marker = pb.ChunkData(
            chunk_index=i, recompute=True, last=True, token_start=16 * i, token_end=16 * i + 16
        )
        state.on_recompute(marker)
    res = await state.result()
    assert res.prefix_tokens == 64 and res.recompute == [(32, 48), (48, 64)]
    assert res.kv is not None and res.kv.shape[2] == 64 and not res.kv[:, :, 32:].any()
    want = torch.cat([codec.decode(b[0]) for b in blobs[:2]], dim=2)
    assert torch.equal(res.kv[:, :, :32].view(torch.int16), want.view(torch.int16))


async def test_bad_arguments_are_named_before_any_call(server: KVStreamServer) -> None:
    model = ModelKey("t", chunk_tokens=16)
    ids = token_ids(32, 0)
    kv = synthetic_context(32, 16, SHAPE)
    for part_bytes in (0, -1, 16 << 20):
        with pytest.raises(ValueError, match="part_bytes"):
            AsyncKVCacheClient(server.address, part_bytes=part_bytes)
    async with AsyncKVCacheClient(server.address) as c:
        store_cases: list[tuple[dict[str, object], type[Exception], str]] = [
            ({"ttl": 2**40}, ValueError, "ttl"),
            ({"ttl": float("inf")}, ValueError, "ttl"),
            ({"levels": []}, ValueError, "at least one codec level"),
            ({"metadata": {"a": 1}}, TypeError, "metadata"),
            ({"sidecars": [{"s": b"x"}]}, ValueError, "sidecars has 1 entries for 2 chunks"),
        ]
        for kwargs, exc, needle in store_cases:
            with pytest.raises(exc, match=needle):
                await c.store(model, ids, kv, **kwargs)  # type: ignore[arg-type]
        fetch_cases: list[tuple[dict[str, object], str]] = [
            ({"level": -1}, "level must be one of"),
            ({"level": 9}, "level must be one of"),
            ({"max_chunks": -1}, "max_chunks"),
            ({"max_chunks": 2**32}, "max_chunks"),
            ({"slo": float("inf")}, "slo"),
            ({"slo": 1.0, "bandwidth_hint_bps": float("nan")}, "bandwidth_hint_bps"),
            ({"slo": 1.0, "decode_tokens_per_second": -1.0}, "decode_tokens_per_second"),
        ]
        for kwargs, needle in fetch_cases:
            with pytest.raises(ValueError, match=needle):
                await c.fetch(model, ids, **kwargs)  # type: ignore[arg-type]
        assert (await c.lookup(model, ids)).prefix_chunks == 0  # nothing was stored by the bad calls


async def test_an_error_while_streaming_a_store_is_raised_as_itself(server: KVStreamServer) -> None:
    # grpc.aio turns an exception in the request iterator into a bare CancelledError.
    model = ModelKey("t", chunk_tokens=16)
    ids = token_ids(32, 0)
    blobs = codec.encode_context(synthetic_context(32, 16, SHAPE), 16, (0,))
    async with AsyncKVCacheClient(server.address) as c:
        with pytest.raises(TypeError):
            await c.store(model, ids, blobs=[blobs[0], {0: 12345}])  # type: ignore[dict-item]
        assert (await c.lookup(model, ids)).prefix_chunks == 0
        await c.store(model, ids, blobs=blobs)  # the client still works
        assert (await c.lookup(model, ids)).prefix_chunks == 2
