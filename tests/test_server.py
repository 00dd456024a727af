"""The gRPC server over real sockets: round trips, bad inputs, deadlines, cancellation, health, metrics."""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import torch
import xxhash
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import codec
from kvstore.backends import BackendError, open_backend
from kvstore.config import ServerConfig
from kvstore.keys import ModelKey, chunk_hashes
from kvstore.rpc import pb, pb_grpc
from kvstore.server import KVStreamServer, clip_message
from kvstore.wire import MAX_PART_BYTES, model_to_pb, split_parts

ROOT = Path(__file__).resolve().parents[1]
MODEL = ModelKey("stories260K", chunk_tokens=64)
CHANNEL_OPTS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


def _chunks(kv: torch.Tensor, n: int, levels: Sequence[int] = (0,)) -> list[dict[int, bytes]]:
    return [
        {lv: codec.encode(kv[:, :, i * n : (i + 1) * n], lv) for lv in levels}
        for i in range(kv.shape[2] // n)
    ]


def _small_kv(tokens: int, seed: int = 0, shape: tuple[int, int, int] = (2, 2, 4)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    layers, heads, dim = shape
    return torch.randn(layers, 2, tokens, heads, dim, generator=g).half()


def put_messages(
    model: ModelKey,
    ids: Sequence[int],
    chunks: Sequence[dict[int, bytes]],
    *,
    part_bytes: int = 1 << 20,
    commit: bool = True,
    pin: bool = False,
    name: str = "",
) -> list[pb.PutChunksRequest]:
    msgs = [
        pb.PutChunksRequest(
            header=pb.PutHeader(model=model_to_pb(model), token_ids=pb.TokenIds(ids=ids), pin=pin, name=name)
        )
    ]
    for i, blobs in enumerate(chunks):
        for lv, blob in blobs.items():
            for off, data in split_parts(blob, part_bytes):
                part = pb.ChunkPart(chunk_index=i, level=lv, total_size=len(blob), offset=off, data=data)
                msgs.append(pb.PutChunksRequest(part=part))
    if commit:
        msgs.append(pb.PutChunksRequest(commit=pb.Commit(metadata={"src": "test"})))
    return msgs


async def _aiter(msgs: Sequence[object]) -> AsyncIterator[object]:
    for m in msgs:
        yield m


async def stream_context(
    stub: pb_grpc.KVStreamStub,
    model: ModelKey,
    ids: Sequence[int],
    level: int = 0,
    timeout: float | None = None,
    **start: object,
) -> tuple[pb.StreamHeader, dict[int, bytes], pb.StreamTrailer, list[pb.ChunkData]]:
    """Run StreamContext; returns header, reassembled blobs by chunk (xxh3 checked), trailer, raw parts."""
    req = pb.StreamContextRequest(
        start=pb.StreamStart(model=model_to_pb(model), token_ids=pb.TokenIds(ids=ids), level=level, **start)
    )
    header = trailer = None
    blobs: dict[int, bytearray] = {}
    parts: list[pb.ChunkData] = []
    async for resp in stub.StreamContext(_aiter([req]), timeout=timeout):
        kind = resp.WhichOneof("msg")
        if kind == "header":
            header = resp.header
        elif kind == "chunk":
            c = resp.chunk
            parts.append(c)
            buf = blobs.setdefault(c.chunk_index, bytearray())
            assert c.offset == len(buf)
            buf += c.data
            if c.last:
                assert len(buf) == c.total_size and xxhash.xxh3_64_intdigest(bytes(buf)) == c.xxh3_64
        else:
            trailer = resp.trailer
    assert header is not None and trailer is not None
    return header, {k: bytes(v) for k, v in blobs.items()}, trailer, parts


@pytest.fixture
async def server() -> AsyncIterator[KVStreamServer]:
    cfg = ServerConfig(listen="127.0.0.1:0", backend="memory://", health_interval=0.1, grace_seconds=0.1)
    srv = KVStreamServer(cfg, backend=open_backend("memory://"))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop(0)


@pytest.fixture
async def channel(server: KVStreamServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTS) as ch:
        yield ch


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> pb_grpc.KVStreamStub:
    return pb_grpc.KVStreamStub(channel)


def _count(srv: KVStreamServer, name: str, **labels: str) -> float:
    return srv.metrics.registry.get_sample_value(name, labels) or 0.0


# ----- round trips ------------------------------------------------------------------------------


async def test_real_model_round_trip_is_bit_exact(stub: pb_grpc.KVStreamStub, model_path: Path) -> None:
    from client.model import Llama2c

    m = Llama2c.from_file(model_path)
    # Seeded ids over the whole vocabulary (m.sample is autoregressive and slow on CPU); the KV is real.
    ids = torch.randint(
        0, m.config.vocab_size, (256 + 17,), generator=torch.Generator().manual_seed(3)
    ).tolist()
    kv = m.forward(ids).kv.to(torch.float16)
    resp = await stub.PutChunks(_aiter(put_messages(MODEL, ids, _chunks(kv, 64))))
    assert (resp.stored_chunks, resp.stored_tokens, resp.dedup_chunks) == (4, 256, 0)
    look = await stub.Lookup(pb.LookupRequest(model=model_to_pb(MODEL), token_ids=pb.TokenIds(ids=ids)))
    assert (look.prefix_chunks, look.prefix_tokens, look.chunk_tokens) == (4, 256, 64)
    assert [c.token_start for c in look.chunks] == [0, 64, 128, 192]

    header, blobs, trailer, _ = await stream_context(stub, MODEL, ids, level=0)
    assert header.prefix_chunks == 4 and not trailer.truncated
    assert (trailer.verified_chunks, trailer.verified_tokens) == (4, 256)
    out = codec.decode_context([blobs[i] for i in range(4)])
    assert out.dtype == torch.float16 and torch.equal(out, kv[:, :, :256])

    again = await stub.PutChunks(_aiter(put_messages(MODEL, ids, _chunks(kv, 64))))
    assert (again.dedup_chunks, again.bytes_written) == (4, 0)


async def test_blobs_larger_than_4mib_travel_in_parts(
    server: KVStreamServer, stub: pb_grpc.KVStreamStub
) -> None:
    model = ModelKey("big", chunk_tokens=64)
    kv = _small_kv(128, shape=(5, 32, 128))  # 5.2 MB per chunk of random fp16: ~5 MB lossless
    chunks = _chunks(kv, 64)
    assert min(len(c[0]) for c in chunks) > 4 << 20
    ids = list(range(128))
    resp = await stub.PutChunks(_aiter(put_messages(model, ids, chunks)))
    assert resp.bytes_written == sum(len(c[0]) for c in chunks)
    _, blobs, trailer, parts = await stream_context(stub, model, ids, max_part_bytes=1 << 20)
    assert trailer.verified_chunks == 2 and max(len(p.data) for p in parts) == 1 << 20
    assert [blobs[0], blobs[1]] == [chunks[0][0], chunks[1][0]]
    assert _count(server, "kvstream_sent_bytes_total") == sum(len(c[0]) for c in chunks)


async def test_fixed_level_falls_back_to_nearest_stored(stub: pb_grpc.KVStreamStub) -> None:
    kv = _small_kv(64)
    ids = list(range(64))
    await stub.PutChunks(_aiter(put_messages(ModelKey("m", chunk_tokens=64), ids, _chunks(kv, 64, (0, 3)))))
    for asked, got in ((0, 0), (3, 3), (1, 3), (4, 3)):
        _, _, _, parts = await stream_context(stub, ModelKey("m", chunk_tokens=64), ids, level=asked)
        assert {p.level for p in parts} == {got}


async def test_management_rpcs(stub: pb_grpc.KVStreamStub) -> None:
    model = ModelKey("m", chunk_tokens=16)
    kv = _small_kv(64)
    ids = list(range(64))
    put = await stub.PutChunks(_aiter(put_messages(model, ids, _chunks(kv, 16), name="doc-1")))
    ref = pb.ContextRef(model=pb.ModelSpec(namespace="default"), name="doc-1")
    info = await stub.GetContext(ref)
    assert info.context_id == put.context_id and info.num_chunks == 4 and 0 < info.ttl_seconds <= 86400
    assert info.metadata["src"] == "test"
    pin = await stub.Pin(pb.PinRequest(context=ref))
    assert (pin.pinned, pin.chunks) == (True, 4)
    assert (await stub.GetContext(ref)).ttl_seconds == -1
    listed = await stub.List(pb.ListRequest())
    assert [c.name for c in listed.contexts] == ["doc-1"] and listed.contexts[0].pinned
    stat = await stub.Stat(pb.StatRequest())
    assert (stat.backend, stat.contexts, stat.pinned_contexts) == ("memory", 1, 1) and stat.keys > 0
    unpin = await stub.Unpin(pb.PinRequest(context=ref))
    assert not unpin.pinned and (await stub.GetContext(ref)).ttl_seconds > 0
    deleted = await stub.Delete(pb.ContextRef(model=model_to_pb(model), token_ids=pb.TokenIds(ids=ids)))
    assert (deleted.deleted, deleted.chunks_freed) == (True, 4)
    assert (await stub.Stat(pb.StatRequest())).keys == 0


# ----- bad input ---------------------------------------------------------------------------------


def _blob(level: int = 0) -> bytes:
    return codec.encode(_small_kv(16), level)


def _patched(blob: bytes, offset: int, value: int) -> bytes:
    b = bytearray(blob)
    b[offset] = value
    return bytes(b)


def _bad_puts() -> Iterator[tuple[str, list[pb.PutChunksRequest]]]:
    m = ModelKey("bad", chunk_tokens=16)
    ids = list(range(16))
    good = put_messages(m, ids, [{0: _blob()}])
    blob = _blob()
    yield "missing header", good[1:]
    yield "empty stream", []
    yield "no commit", good[:-1]
    yield "truncated container", put_messages(m, ids, [{0: blob[:-9]}])
    yield (
        "incomplete blob",
        [
            good[0],
            pb.PutChunksRequest(part=pb.ChunkPart(chunk_index=0, total_size=len(blob), data=blob[:100])),
            good[-1],
        ],
    )
    yield (
        "corrupted payload",
        put_messages(m, ids, [{0: _patched(blob, len(blob) // 2, blob[len(blob) // 2] ^ 1)}]),
    )
    yield "wrong container version", put_messages(m, ids, [{0: _patched(blob, 4, 2)}])
    yield (
        "declared level != blob level",
        [
            good[0],
            pb.PutChunksRequest(part=pb.ChunkPart(chunk_index=0, level=2, total_size=len(blob), data=blob)),
            good[-1],
        ],
    )
    yield (
        "unknown level",
        [
            good[0],
            pb.PutChunksRequest(part=pb.ChunkPart(chunk_index=0, level=9, total_size=len(blob), data=blob)),
            good[-1],
        ],
    )
    yield (
        "dtype differs from the spec",
        put_messages(ModelKey("bad", dtype="float32", chunk_tokens=16), ids, [{0: blob}]),
    )
    yield (
        "chunk_tokens differs from the blob",
        put_messages(ModelKey("bad", chunk_tokens=8), ids, [{0: blob}, {0: blob}]),
    )
    yield (
        "parts out of order",
        put_messages(m, ids, [{0: blob}], part_bytes=256)[:1]
        + list(reversed(put_messages(m, ids, [{0: blob}], part_bytes=256)[1:-1]))
        + good[-1:],
    )
    yield (
        "oversized part",
        [
            good[0],
            pb.PutChunksRequest(
                part=pb.ChunkPart(
                    chunk_index=0, total_size=MAX_PART_BYTES + 1, data=b"\0" * (MAX_PART_BYTES + 1)
                )
            ),
            good[-1],
        ],
    )
    yield (
        "blob over the size limit",
        [
            good[0],
            pb.PutChunksRequest(part=pb.ChunkPart(chunk_index=0, total_size=1 << 40, data=blob)),
            good[-1],
        ],
    )
    yield (
        "chunk index out of range",
        [
            good[0],
            pb.PutChunksRequest(part=pb.ChunkPart(chunk_index=1, total_size=len(blob), data=blob)),
            good[-1],
        ],
    )
    yield "missing chunk", put_messages(m, list(range(32)), [{0: blob}])
    yield "too few tokens", put_messages(m, ids[:15], [])
    yield "bad spec", put_messages(ModelKey("bad"), ids, [])[:1]
    yield "two headers", good[:1] + good
    yield "message after commit", good + good[1:2]
    yield (
        "bad sidecar name",
        [
            good[0],
            good[1],
            pb.PutChunksRequest(part=pb.ChunkPart(chunk_index=0, sidecar="a b", total_size=1, data=b"x")),
            good[-1],
        ],
    )


@pytest.mark.parametrize(("case", "msgs"), list(_bad_puts()), ids=[c for c, _ in _bad_puts()])
async def test_bad_put_is_invalid_argument_and_changes_nothing(
    server: KVStreamServer, stub: pb_grpc.KVStreamStub, case: str, msgs: list[pb.PutChunksRequest]
) -> None:
    if case == "bad spec":
        msgs[0].header.model.dtype = "int8"
    before = await server.backend.stats()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PutChunks(_aiter(msgs))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details()
    assert (await server.backend.stats()).keys == before.keys == 0


async def test_a_refused_upload_keeps_its_status_while_the_client_is_still_writing(
    stub: pb_grpc.KVStreamStub,
) -> None:
    # Refused at the header while 16 MB more are on their way: ending the call at once made grpc.aio
    # report the client's next write as INTERNAL, losing the reason (grpc/grpc#36066).
    model = ModelKey("m", chunk_tokens=16)
    header = put_messages(model, list(range(16)), [{0: _blob()}])[0]
    part = pb.ChunkPart(chunk_index=0, level=0, total_size=1 << 24, offset=1 << 16, data=bytes(1 << 16))
    for _ in range(20):  # the first part is out of order; 255 more follow it
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.PutChunks(_aiter([header, *[pb.PutChunksRequest(part=part)] * 256]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()


async def test_put_over_the_request_limit_is_resource_exhausted(
    server: KVStreamServer, stub: pb_grpc.KVStreamStub
) -> None:
    server.config.max_put_bytes = 1000
    msgs = put_messages(ModelKey("m", chunk_tokens=16), list(range(16)), [{0: _blob(), 2: _blob(2)}])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PutChunks(_aiter(msgs))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (await server.backend.stats()).keys == 0


async def test_uploads_together_are_bounded_by_max_buffered_put_bytes(
    server: KVStreamServer, stub: pb_grpc.KVStreamStub
) -> None:
    # One slow upload holds its blobs until Commit; a second one past the front end's budget is refused.
    model = ModelKey("m", chunk_tokens=16)
    first = put_messages(model, list(range(16)), [{0: _blob(), 2: _blob(2)}])
    second = put_messages(model, list(range(1, 17)), [{0: _blob()}])
    server.config.max_buffered_put_bytes = len(first[1].part.data) + len(second[1].part.data) // 2
    holding = asyncio.Event()

    async def slow_first() -> AsyncIterator[pb.PutChunksRequest]:
        yield first[0]
        yield first[1]
        holding.set()
        await asyncio.sleep(0.5)
        for m in first[2:]:
            yield m

    slow = asyncio.ensure_future(stub.PutChunks(slow_first()))
    await holding.wait()
    await asyncio.sleep(0.1)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.PutChunks(_aiter(second))
    # Busy with other uploads: UNAVAILABLE, which clients retry on another front end.
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "front end busy" in (err.value.details() or "") and "max_buffered_put_bytes" in err.value.details()
    server.config.max_buffered_put_bytes = 1 << 30
    assert (await slow).stored_chunks == 1
    assert (await stub.PutChunks(_aiter(second))).stored_chunks == 1  # the budget was given back
    server.config.max_buffered_put_bytes = len(second[1].part.data) // 2
    with pytest.raises(grpc.aio.AioRpcError) as err:  # too large for this front end even when idle
        await stub.PutChunks(_aiter(put_messages(model, list(range(2, 18)), [{0: _blob()}])))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    server.config.max_buffered_put_bytes = 1 << 30
    assert server._servicer is not None and server._servicer._buffered_put_bytes == 0


async def test_unknown_context_and_bad_queries(server: KVStreamServer, stub: pb_grpc.KVStreamStub) -> None:
    spec = model_to_pb(ModelKey("m", chunk_tokens=16))
    unknown = pb.ContextRef(model=spec, context_id=b"\1" * 32)
    for call in (
        stub.GetContext(unknown),
        stub.Delete(unknown),
        stub.Pin(pb.PinRequest(context=unknown)),
        stub.GetContext(pb.ContextRef(model=spec, name="nope")),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    for call in (
        stub.GetContext(pb.ContextRef(model=spec)),
        stub.GetContext(pb.ContextRef(model=spec, context_id=b"short")),
        stub.Lookup(pb.LookupRequest(model=spec, chunk_hashes=pb.ChunkHashes(hashes=[b"x" * 31]))),
        stub.Lookup(pb.LookupRequest(model=spec)),
        stub.Lookup(
            pb.LookupRequest(
                model=pb.ModelSpec(model_id="m", kv_layout="TLHD"), token_ids=pb.TokenIds(ids=[1])
            )
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    look = await stub.Lookup(pb.LookupRequest(model=spec, token_ids=pb.TokenIds(ids=range(100))))
    assert look.prefix_chunks == 0
    assert _count(server, "kvstream_requests_total", method="GetContext", code="NOT_FOUND") == 2


async def test_chunk_hashes_of_another_chunk_size_are_refused(
    server: KVStreamServer, stub: pb_grpc.KVStreamStub
) -> None:
    # Hash queries carry the model spec separately; a spec whose chunk_tokens differs from the one the
    # hashes were made with would give wrong token counts and count the caller's mistake as corruption.
    model, ids = ModelKey("m", chunk_tokens=16), list(range(64))
    await stub.PutChunks(_aiter(put_messages(model, ids, _chunks(_small_kv(64), 16))))
    hashes = pb.ChunkHashes(hashes=chunk_hashes(model, ids))
    for from_storage in (False, True):  # through the hot cache (which the first pass fills), then past it
        _, blobs, trailer, _ = await stream_context(
            stub, model, [], chunk_hashes=hashes, from_storage=from_storage
        )
        assert sorted(blobs) == [0, 1, 2, 3] and trailer.verified_tokens == 64 and not trailer.truncated
        wrong = model_to_pb(ModelKey("m", chunk_tokens=32))
        look = stub.Lookup(pb.LookupRequest(model=wrong, chunk_hashes=hashes))
        stream = stream_context(stub, ModelKey("m", chunk_tokens=32), [], chunk_hashes=hashes)
        for call in (look, stream):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "16-token chunk" in err.value.details() and "chunk_tokens 32" in err.value.details()
    assert _count(server, "kvstream_corrupt_records_total", kind="chunk") == 0


async def test_huge_bad_values_give_a_clipped_message(server: KVStreamServer) -> None:
    # The error quotes the value; unclipped, a 200 KB name overflowed the 8 KiB metadata limit and the
    # client saw its connection reset (RESOURCE_EXHAUSTED) instead of INVALID_ARGUMENT.
    async with grpc.aio.insecure_channel(server.address) as ch:  # default (8 KiB) metadata limit
        stub = pb_grpc.KVStreamStub(ch)
        model = ModelKey("m", chunk_tokens=16)
        calls = [
            stub.Lookup(
                pb.LookupRequest(
                    model=pb.ModelSpec(model_id="\u00e9" * 100_000, chunk_tokens=16),
                    token_ids=pb.TokenIds(ids=[1] * 16),
                )
            ),
            stub.PutChunks(_aiter(put_messages(model, [1] * 16, [], name="\u2603" * 200_000))),
        ]
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
            assert len(err.value.details().encode()) <= 1024 and "more bytes]" in err.value.details()
        assert (await stub.Stat(pb.StatRequest())).keys == 0  # same channel still works
    assert clip_message("short") == "short"


async def test_stream_bad_start(stub: pb_grpc.KVStreamStub) -> None:
    spec = model_to_pb(ModelKey("m", chunk_tokens=16))
    cases = {
        "LEVEL_POLICY_ADAPTIVE needs a finite slo_ms > 0": pb.StreamStart(
            model=spec, token_ids=pb.TokenIds(ids=[1] * 16), policy=pb.LEVEL_POLICY_ADAPTIVE
        ),
        "max_part_bytes": pb.StreamStart(
            model=spec, token_ids=pb.TokenIds(ids=[1] * 16), max_part_bytes=8 << 20
        ),
        "unknown level": pb.StreamStart(model=spec, token_ids=pb.TokenIds(ids=[1] * 16), level=7),
        "bandwidth_hint_bps must be finite": pb.StreamStart(
            model=spec,
            token_ids=pb.TokenIds(ids=[1] * 16),
            policy=pb.LEVEL_POLICY_ADAPTIVE,
            slo_ms=100,
            bandwidth_hint_bps=float("inf"),
        ),
        "unknown max_level": pb.StreamStart(
            model=spec,
            token_ids=pb.TokenIds(ids=[1] * 16),
            policy=pb.LEVEL_POLICY_ADAPTIVE,
            slo_ms=100,
            max_level=9,
        ),
    }
    for needle, start in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stub.StreamContext(_aiter([pb.StreamContextRequest(start=start)])):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and needle in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async for _ in stub.StreamContext(_aiter([pb.StreamContextRequest(report=pb.ThroughputReport())])):
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def _stream_with_reports(
    stub: pb_grpc.KVStreamStub, start: pb.StreamStart, bytes_per_second: float
) -> pb.StreamTrailer:
    """Adaptive stream that answers every chunk with a report of ``bytes_per_second``; returns the trailer."""
    requests: asyncio.Queue[pb.StreamContextRequest | None] = asyncio.Queue()
    await requests.put(pb.StreamContextRequest(start=start))

    async def outgoing() -> AsyncIterator[pb.StreamContextRequest]:
        while (msg := await requests.get()) is not None:
            yield msg

    trailer = None
    async for resp in stub.StreamContext(outgoing(), timeout=20):
        if resp.WhichOneof("msg") == "chunk" and resp.chunk.last:
            report = pb.ThroughputReport(
                chunk_index=resp.chunk.chunk_index, bytes_per_second=bytes_per_second, decode_seconds=1e-3
            )
            await requests.put(pb.StreamContextRequest(report=report))
            if not math.isfinite(bytes_per_second):  # the server ends the call: writing more would race it
                await requests.put(None)
        elif resp.WhichOneof("msg") == "trailer":
            trailer = resp.trailer
            await requests.put(None)
    assert trailer is not None
    return trailer


async def test_adaptive_stream_survives_extreme_reports(stub: pb_grpc.KVStreamStub) -> None:
    # Denormal and huge rates are clamped like hints; non-finite ones are the client's error.
    model = ModelKey("m", chunk_tokens=16)
    ids = list(range(16 * 6))
    await stub.PutChunks(_aiter(put_messages(model, ids, _chunks(_small_kv(len(ids)), 16, levels=(0, 1)))))
    start = pb.StreamStart(
        model=model_to_pb(model),
        token_ids=pb.TokenIds(ids=ids),
        policy=pb.LEVEL_POLICY_ADAPTIVE,
        slo_ms=60_000,
        bandwidth_hint_bps=1e9,
        recompute_tokens_per_second=1e3,
    )
    for rate in (5e-324, 1e-300, 1.0, 1e300):
        trailer = await _stream_with_reports(stub, start, rate)
        assert not trailer.truncated and trailer.verified_chunks == 6, (rate, trailer)
    for rate in (float("nan"), float("inf")):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await _stream_with_reports(stub, start, rate)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "finite" in err.value.details()


async def test_corrupt_stored_chunk_truncates_the_stream(
    server: KVStreamServer, stub: pb_grpc.KVStreamStub
) -> None:
    model = ModelKey("m", chunk_tokens=16)
    ids = list(range(64))
    await stub.PutChunks(_aiter(put_messages(model, ids, _chunks(_small_kv(64), 16))))
    look = await stub.Lookup(pb.LookupRequest(model=model_to_pb(model), token_ids=pb.TokenIds(ids=ids)))
    key = f"kvs:{{default:{look.chunks[2].hash.hex()}}}:L0"
    raw = bytearray((await server.backend.get_many([key]))[0] or b"")
    raw[60] ^= 0xFF  # bit rot inside the stored envelope
    await server.backend.put_many([(key, bytes(raw))], 3600)
    header, blobs, trailer, _ = await stream_context(stub, model, ids)
    assert header.prefix_chunks == 4 and sorted(blobs) == [0, 1]
    assert trailer.truncated and trailer.verified_chunks == 2 and "chunk 2" in trailer.reason
    assert _count(server, "kvstream_corrupt_records_total", kind="chunk") == 1
    # One fixed label per cause: chunk indexes in labels would grow the series without bound.
    assert _count(server, "kvstream_streams_truncated_total", reason="missing_or_corrupt") == 1
    assert _count(server, "kvstream_streams_truncated_total", reason="chunk 2") == 0


# ----- deadlines and cancellation ----------------------------------------------------------------


def _slow_reads(server: KVStreamServer, delay: float) -> list[int]:
    """Make every blob read take ``delay`` seconds; returns the list of chunk indexes read."""
    reads: list[int] = []
    real = server.store.read_blob

    async def slow(model: ModelKey, info: pb.ChunkInfo, level: int, *, cached: bool = True) -> bytes | None:
        reads.append(info.index)
        await asyncio.sleep(delay)
        return await real(model, info, level, cached=cached)

    server.store.read_blob = slow  # type: ignore[method-assign]
    return reads


async def test_deadline_gives_a_truncated_trailer(server: KVStreamServer, stub: pb_grpc.KVStreamStub) -> None:
    model = ModelKey("m", chunk_tokens=16)
    ids = list(range(16 * 20))
    await stub.PutChunks(_aiter(put_messages(model, ids, _chunks(_small_kv(len(ids)), 16))))
    _slow_reads(server, 0.05)
    t0 = time.perf_counter()
    header, blobs, trailer, _ = await stream_context(stub, model, ids, timeout=0.4)
    assert time.perf_counter() - t0 < 0.5  # the deadline plus scheduling on a busy machine
    assert header.prefix_chunks == 20 and trailer.truncated and trailer.reason.startswith("deadline")
    assert 0 < trailer.verified_chunks == len(blobs) < 20
    assert _count(server, "kvstream_streams_truncated_total", reason="deadline") == 1
    # A deadline far below one backend read: a truncated trailer or DEADLINE_EXCEEDED, never a hang.
    t0 = time.perf_counter()
    try:
        _, _, trailer, _ = await stream_context(stub, model, ids, timeout=0.005)
        assert trailer.truncated
    except grpc.aio.AioRpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.perf_counter() - t0 < 1.0


async def test_client_cancel_stops_the_server(server: KVStreamServer, stub: pb_grpc.KVStreamStub) -> None:
    model = ModelKey("m", chunk_tokens=16)
    ids = list(range(16 * 30))
    await stub.PutChunks(_aiter(put_messages(model, ids, _chunks(_small_kv(len(ids)), 16))))
    reads = _slow_reads(server, 0.03)
    start = pb.StreamStart(model=model_to_pb(model), token_ids=pb.TokenIds(ids=ids))
    call = stub.StreamContext(_aiter([pb.StreamContextRequest(start=start)]))
    async for resp in call:
        if resp.WhichOneof("msg") == "chunk":
            break
    call.cancel()
    for _ in range(100):
        if _count(server, "kvstream_requests_total", method="StreamContext", code="CANCELLED"):
            break
        await asyncio.sleep(0.01)
    assert _count(server, "kvstream_requests_total", method="StreamContext", code="CANCELLED") == 1
    assert _count(server, "kvstream_streams_active") == 0
    n = len(reads)
    await asyncio.sleep(0.2)
    assert len(reads) == n < 10  # the backend is no longer read


# ----- health, reflection, metrics -------------------------------------------------------------------


async def test_health_follows_the_backend(server: KVStreamServer, channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "kvstream.v1.KVStream"):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING

    async def down() -> bool:
        raise BackendError("connection refused")

    server.backend.ping = down  # type: ignore[method-assign]
    for _ in range(50):
        resp = await health.Check(health_pb2.HealthCheckRequest(service=""))
        if resp.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            break
        await asyncio.sleep(0.05)
    assert resp.status == health_pb2.HealthCheckResponse.NOT_SERVING


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    req = reflection_pb2.ServerReflectionRequest(list_services="")
    async for resp in stub.ServerReflectionInfo(_aiter([req])):
        names = {s.name for s in resp.list_services_response.service}
        break
    assert {"kvstream.v1.KVStream", "grpc.health.v1.Health"} <= names


async def test_metrics_endpoint_serves_counters(server: KVStreamServer, stub: pb_grpc.KVStreamStub) -> None:
    await stub.Stat(pb.StatRequest())
    http, port = server.metrics.serve_http(0, "127.0.0.1")
    try:
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        )
    finally:
        http.shutdown()  # type: ignore[attr-defined]
        http.server_close()  # type: ignore[attr-defined]
    assert re.search(r'kvstream_requests_total\{code="OK",method="Stat"\} 1\.0', body)
    assert "kvstream_request_seconds_bucket" in body and "kvstream_store_keys" in body


# ----- the CLI server: restart keeps data -----------------------------------------------------------


def _start_cli(data: Path) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvstore",
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--backend",
            f"embedded://{data}",
            "--log-level",
            "WARNING",
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.match(r"kvstore listening on (\S+) backend=embedded://", line)
    if not m:
        proc.kill()
        raise AssertionError(f"no ready line: {line!r} {proc.communicate()[1]}")
    return proc, m.group(1)


def _stop_cli(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


async def test_restart_keeps_data(tmp_path: Path) -> None:
    model = ModelKey("m", chunk_tokens=16)
    ids = list(range(48))
    chunks = _chunks(_small_kv(48), 16)
    proc, addr = await asyncio.to_thread(_start_cli, tmp_path / "data")
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            resp = await pb_grpc.KVStreamStub(ch).PutChunks(
                _aiter(put_messages(model, ids, chunks, name="keep"))
            )
            assert resp.stored_chunks == 3
    finally:
        await asyncio.to_thread(_stop_cli, proc)
    proc, addr = await asyncio.to_thread(_start_cli, tmp_path / "data")
    try:
        async with grpc.aio.insecure_channel(addr) as ch:
            stub = pb_grpc.KVStreamStub(ch)
            info = await stub.GetContext(pb.ContextRef(model=pb.ModelSpec(), name="keep"))
            assert info.num_chunks == 3
            _, blobs, trailer, _ = await stream_context(stub, model, ids)
            assert not trailer.truncated and [blobs[i] for i in range(3)] == [c[0] for c in chunks]
    finally:
        await asyncio.to_thread(_stop_cli, proc)
