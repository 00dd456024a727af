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
