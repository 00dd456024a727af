"""Malformed requests to every RPC, over a real socket: each gets a clear non-OK status; no store change.

Each generated request carries at least one defect (bad model spec, token ids, chunk hashes, context
reference, part framing, level, blob bytes, message order). The server must answer with a client-error
status (never INTERNAL / UNKNOWN, and never hang: every call has a deadline, so a hang shows up as
DEADLINE_EXCEEDED, which fails the test) and the backend's keys, values and pins must be exactly what they
were before. The server runs on its own event loop thread; the test drives it with the blocking gRPC API.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import codec
from kvstore.backends import BackendError, open_backend
from kvstore.backends.base import StorageBackend
from kvstore.config import ServerConfig
from kvstore.keys import KV_DTYPES, KV_LAYOUTS, InvalidKeyError, ModelKey
from kvstore.rpc import pb, pb_grpc
from kvstore.server import KVStreamServer
from kvstore.store import ChunkBlobs
from kvstore.wire import MAX_PART_BYTES, model_from_pb, model_to_pb, split_parts

FUZZ = settings(
    max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
DEADLINE_S = 5.0
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.OUT_OF_RANGE,
}
MODEL = ModelKey("fuzz", chunk_tokens=8)
N_CHUNKS = 2
NAME_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-/@:+"


def _blobs() -> list[dict[int, bytes]]:
    g = torch.Generator().manual_seed(7)
    kv = torch.randn(2, 2, N_CHUNKS * MODEL.chunk_tokens, 2, 4, generator=g).half()
    n = MODEL.chunk_tokens
    return [{lv: codec.encode(kv[:, :, i * n : (i + 1) * n], lv) for lv in (0, 2)} for i in range(N_CHUNKS)]


BLOBS = _blobs()
IDS = list(range(100, 100 + N_CHUNKS * MODEL.chunk_tokens))  # the seeded context
FRESH_IDS = list(range(500, 500 + N_CHUNKS * MODEL.chunk_tokens))  # a context that is never stored


# ----- the server under test ---------------------------------------------------------------------


class _Harness:
    """A KVStreamServer on a memory backend, on an event loop thread of its own."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.backend: StorageBackend = open_backend("memory://")
        cfg = ServerConfig(listen="127.0.0.1:0", health_interval=60, grace_seconds=0.1)
        self.server = self.run(self._make(cfg))
        self.channel = grpc.insecure_channel(self.server.address)
        self.stub = pb_grpc.KVStreamStub(self.channel)

    async def _make(self, cfg: ServerConfig) -> KVStreamServer:
        srv = KVStreamServer(cfg, backend=self.backend)
        await srv.start()
        await srv.store.put(MODEL, IDS, [ChunkBlobs(b) for b in BLOBS], name="seeded")
        await srv.store.put(MODEL, IDS[: MODEL.chunk_tokens], [ChunkBlobs(BLOBS[0])], pin=True)
        return srv

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    async def _snapshot(self) -> dict[str, tuple[object, bool]]:
        out: dict[str, tuple[object, bool]] = {}
        keys = [k async for k in self.backend.scan("*")]
        for k in sorted(keys):
            try:
                value: object = await self.backend.get(k)
            except BackendError:  # a set (refcounts, pins)
                value = frozenset(await self.backend.set_members(k))
            out[k] = (value, await self.backend.get_ttl(k) is None)
        return out

    def snapshot(self) -> dict[str, tuple[object, bool]]:
        """Every key with its value and whether it is pinned."""
        return dict(self.run(self._snapshot()))

    def close(self) -> None:
        self.channel.close()
        self.run(self.server.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def harness() -> Iterator[_Harness]:
    h = _Harness()
    try:
        yield h
    finally:
        h.close()


def expect_client_error(h: _Harness, call: Callable[[], object]) -> grpc.StatusCode:
    """Run ``call``; it must fail with a client-error status and leave the store as it was."""
    before = h.snapshot()
    with pytest.raises(grpc.RpcError) as err:
        call()
    code = err.value.code()  # type: ignore[attr-defined]
    assert code in CLIENT_ERRORS, f"{code}: {err.value.details()}"  # type: ignore[attr-defined]
    assert err.value.details(), "no error message"  # type: ignore[attr-defined]
    assert h.snapshot() == before, "a rejected request changed the store"
    return code


# ----- strategies ---------------------------------------------------------------------------------


def _invalid_spec(spec: pb.ModelSpec) -> bool:
    try:
        model_from_pb(spec)
    except InvalidKeyError:
        return True
    return False


def _bad_name(allow_empty: bool) -> st.SearchStrategy[str]:
    too_long = st.text(alphabet=NAME_CHARS, min_size=201, max_size=230)
    bad_chars = st.text(min_size=1, max_size=20).filter(lambda s: not set(s) <= set(NAME_CHARS))
    return st.one_of(too_long, bad_chars, *([] if allow_empty else [st.just("")]))


@st.composite
def bad_specs(draw: st.DrawFn) -> pb.ModelSpec:
    """A ModelSpec with one invalid field (the others valid)."""
    spec = model_to_pb(MODEL)
    field = draw(st.sampled_from(["namespace", "model_id", "revision", "dtype", "kv_layout", "chunk_tokens"]))
    if field == "chunk_tokens":
        spec.chunk_tokens = draw(st.integers(65537, 2**32 - 1))
    elif field in ("dtype", "kv_layout"):
        allowed = (*KV_DTYPES, *KV_LAYOUTS, "")  # "" means the default
        setattr(spec, field, draw(st.text(min_size=1, max_size=12).filter(lambda v: v not in allowed)))
    else:
        setattr(spec, field, draw(_bad_name(allow_empty=field == "revision")))
        if field == "namespace" and not spec.namespace:
            spec.namespace = "\x00"  # "" means "default": keep it invalid
    assert _invalid_spec(spec)
    return spec


token_lists = st.lists(st.integers(0, 2**32 - 1), max_size=40)
bad_hash_lists = st.lists(st.binary(max_size=40), min_size=1, max_size=6).filter(
    lambda hs: any(len(h) != 32 for h in hs)
)


@st.composite
def bad_refs(draw: st.DrawFn) -> pb.ContextRef:
    """A ContextRef that is malformed or names no stored context."""
    ref = pb.ContextRef(model=model_to_pb(MODEL))
    kind = draw(st.sampled_from(["none", "short_id", "unknown_id", "bad_name", "unknown_name", "ids"]))
    if kind == "short_id":
        ref.context_id = draw(st.binary(max_size=40).filter(lambda b: len(b) != 32))
    elif kind == "unknown_id":
        ref.context_id = draw(st.binary(min_size=32, max_size=32))
    elif kind == "bad_name":
        ref.name = draw(_bad_name(allow_empty=False))
    elif kind == "unknown_name":
        ref.name = draw(st.text(alphabet=NAME_CHARS, min_size=1, max_size=30).filter(lambda s: s != "seeded"))
    elif kind == "ids":
        which = draw(st.sampled_from(["bad_spec", "short", "unknown"]))
        if which == "bad_spec":
            ref.model.CopyFrom(draw(bad_specs()))
            ref.token_ids.ids.extend(IDS)
        elif which == "short":
            ref.token_ids.ids.extend(draw(st.lists(st.integers(0, 2**32 - 1), max_size=7)))
        else:
            ref.token_ids.ids.extend(FRESH_IDS)
    return ref


def _valid_put(part_bytes: int) -> list[pb.PutChunksRequest]:
    msgs = [
        pb.PutChunksRequest(
            header=pb.PutHeader(model=model_to_pb(MODEL), token_ids=pb.TokenIds(ids=FRESH_IDS))
        )
    ]
    for i, per_level in enumerate(BLOBS):
        for lv, blob in per_level.items():
            for off, data in split_parts(blob, part_bytes):
                part = pb.ChunkPart(chunk_index=i, level=lv, total_size=len(blob), offset=off, data=data)
                msgs.append(pb.PutChunksRequest(part=part))
    msgs.append(pb.PutChunksRequest(commit=pb.Commit()))
    return msgs


def _parts(msgs: Sequence[pb.PutChunksRequest]) -> list[int]:
    return [i for i, m in enumerate(msgs) if m.WhichOneof("item") == "part"]


def _set_blob(
    msgs: list[pb.PutChunksRequest], index: int, level: int, blob: bytes
) -> list[pb.PutChunksRequest]:
    """``msgs`` with the parts of (chunk ``index``, ``level``) replaced by one part carrying ``blob``."""
    out: list[pb.PutChunksRequest] = []
    for m in msgs:
        if m.WhichOneof("item") == "part" and (m.part.chunk_index, m.part.level) == (index, level):
            if m.part.offset == 0:
                part = pb.ChunkPart(chunk_index=index, level=level, total_size=len(blob), data=blob)
                out.append(pb.PutChunksRequest(part=part))
            continue
        out.append(m)
    return out


PUT_DEFECTS = [
    "no_header", "no_commit", "two_headers", "after_commit", "empty_msg", "bad_spec", "few_tokens",
    "bad_offset", "bad_total", "swap_parts", "bad_level", "wrong_level", "bad_index", "random_blob",
    "truncated_blob", "corrupt_blob", "missing_chunk", "bad_sidecar", "empty_stream",
]  # fmt: skip


@st.composite
def bad_puts(draw: st.DrawFn) -> tuple[str, list[pb.PutChunksRequest]]:
    """A PutChunks stream for a fresh context with one defect; returns (defect, messages)."""
    msgs = _valid_put(part_bytes=draw(st.sampled_from([64, 100, 1 << 20])))
    defect = draw(st.sampled_from(PUT_DEFECTS))
    parts = _parts(msgs)
    pick = draw(st.sampled_from(parts))
    part = msgs[pick].part
    if defect == "no_header":
        msgs = msgs[1:]
    elif defect == "no_commit":
        msgs = msgs[:-1]
    elif defect == "two_headers":
        msgs.insert(draw(st.integers(1, len(msgs) - 1)), msgs[0])
    elif defect == "after_commit":
        msgs.append(draw(st.sampled_from([msgs[0], msgs[pick], msgs[-1]])))
    elif defect == "empty_msg":
        msgs.insert(draw(st.integers(1, len(msgs) - 1)), pb.PutChunksRequest())
    elif defect == "bad_spec":
        msgs[0].header.model.CopyFrom(draw(bad_specs()))
    elif defect == "few_tokens":
        del msgs[0].header.token_ids.ids[draw(st.integers(0, MODEL.chunk_tokens - 1)) :]
    elif defect == "bad_offset":
        part.offset = draw(st.integers(0, 2**64 - 1).filter(lambda o: o != part.offset))
    elif defect == "bad_total":
        total = part.total_size
        new_total = draw(st.integers(0, 2**64 - 1).filter(lambda t: t != total))
        for i in parts:  # consistent across the blob's parts, so only the size itself is wrong
            p = msgs[i].part
            if (p.chunk_index, p.level) == (part.chunk_index, part.level):
                p.total_size = new_total
    elif defect == "swap_parts":
        same = [i for i in parts if (msgs[i].part.chunk_index, msgs[i].part.level) == (part.chunk_index, 0)]
        a, b = same[0], same[-1]
        if a == b:  # a one-part blob: send it twice instead
            msgs.insert(a + 1, msgs[a])
        else:
            msgs[a], msgs[b] = msgs[b], msgs[a]
    elif defect == "bad_level":
        part.level = draw(st.integers(0, 2**32 - 1).filter(lambda lv: lv not in codec.LEVELS))
    elif defect == "wrong_level":  # a level-0 blob declared as level 2 (and no real level 2)
        msgs = _set_blob(msgs, 0, 2, b"")
        msgs = [m for m in msgs if not (m.WhichOneof("item") == "part" and m.part.level == 2)]
        for m in msgs:
            if m.WhichOneof("item") == "part" and m.part.chunk_index == 0:
                m.part.level = 2
    elif defect == "bad_index":
        part.chunk_index = draw(st.integers(N_CHUNKS, 2**32 - 1))
    elif defect == "random_blob":
        msgs = _set_blob(msgs, part.chunk_index, part.level, draw(st.binary(min_size=1, max_size=3000)))
    elif defect == "truncated_blob":
        blob = BLOBS[part.chunk_index][part.level]
        msgs = _set_blob(msgs, part.chunk_index, part.level, blob[: draw(st.integers(1, len(blob) - 1))])
    elif defect == "corrupt_blob":
        flipped = bytearray(BLOBS[part.chunk_index][part.level])
        flipped[draw(st.integers(0, len(flipped) - 1))] ^= draw(st.integers(1, 255))
        msgs = _set_blob(msgs, part.chunk_index, part.level, bytes(flipped))
    elif defect == "missing_chunk":
        gone = draw(st.integers(0, N_CHUNKS - 1))
        msgs = [m for m in msgs if not (m.WhichOneof("item") == "part" and m.part.chunk_index == gone)]
    elif defect == "bad_sidecar":
        name = draw(_bad_name(allow_empty=False).filter(lambda s: s != ""))
        side = pb.ChunkPart(chunk_index=0, sidecar=name, total_size=3, data=b"abc")
        msgs.insert(len(msgs) - 1, pb.PutChunksRequest(part=side))
    elif defect == "empty_stream":
        msgs = []
    return defect, msgs


START_DEFECTS = [
    "report_first", "empty_stream", "bad_spec", "bad_level", "bad_policy", "big_parts", "bad_sidecar",
    "no_query", "bad_hashes", "few_tokens_bad_spec",
]  # fmt: skip


@st.composite
def bad_streams(draw: st.DrawFn) -> tuple[str, list[pb.StreamContextRequest]]:
    """A StreamContext request stream with one defect; returns (defect, messages)."""
    start = pb.StreamStart(model=model_to_pb(MODEL), token_ids=pb.TokenIds(ids=IDS), level=0)
    defect = draw(st.sampled_from(START_DEFECTS))
    report = pb.StreamContextRequest(report=pb.ThroughputReport(chunk_index=0, bytes_per_second=1e6))
    if defect == "report_first":
        return defect, [report, pb.StreamContextRequest(start=start)]
    if defect == "empty_stream":
        return defect, []
    if defect in ("bad_spec", "few_tokens_bad_spec"):
        start.model.CopyFrom(draw(bad_specs()))
        if defect == "few_tokens_bad_spec":
            start.token_ids.CopyFrom(pb.TokenIds(ids=draw(token_lists)))
    elif defect == "bad_level":
        start.level = draw(st.integers(0, 2**32 - 1).filter(lambda lv: lv not in codec.LEVELS))
    elif defect == "bad_policy":  # 0 and 1 are defined; proto3 enums keep unknown values
        start.policy = draw(st.integers(2, 2**31 - 1))  # type: ignore[assignment]
    elif defect == "big_parts":
        start.max_part_bytes = draw(st.integers(MAX_PART_BYTES + 1, 2**32 - 1))
    elif defect == "bad_sidecar":
        start.sidecars.append(draw(_bad_name(allow_empty=False)))
    elif defect == "no_query":
        start.ClearField("token_ids")
    elif defect == "bad_hashes":
        start.chunk_hashes.CopyFrom(pb.ChunkHashes(hashes=draw(bad_hash_lists)))
    return defect, [pb.StreamContextRequest(start=start)]


# ----- tests ------------------------------------------------------------------------------------


@FUZZ
@given(spec=bad_specs(), ids=token_lists)
def test_lookup_bad_spec(harness: _Harness, spec: pb.ModelSpec, ids: list[int]) -> None:
    req = pb.LookupRequest(model=spec, token_ids=pb.TokenIds(ids=ids))
    assert expect_client_error(harness, lambda: harness.stub.Lookup(req, timeout=DEADLINE_S)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


@FUZZ
@given(hashes=st.one_of(st.none(), bad_hash_lists))
def test_lookup_bad_query(harness: _Harness, hashes: list[bytes] | None) -> None:
    req = pb.LookupRequest(model=model_to_pb(MODEL))
    if hashes is not None:
        req.chunk_hashes.CopyFrom(pb.ChunkHashes(hashes=hashes))
    assert expect_client_error(harness, lambda: harness.stub.Lookup(req, timeout=DEADLINE_S)) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


@FUZZ
@given(ref=bad_refs(), rpc=st.sampled_from(["GetContext", "Delete", "Pin", "Unpin"]))
def test_context_rpcs_bad_ref(harness: _Harness, ref: pb.ContextRef, rpc: str) -> None:
    req: Any = ref if rpc in ("GetContext", "Delete") else pb.PinRequest(context=ref)
    method = getattr(harness.stub, rpc)
    expect_client_error(harness, lambda: method(req, timeout=DEADLINE_S))


@settings(FUZZ, max_examples=150)
@given(case=bad_puts())
def test_put_malformed(harness: _Harness, case: tuple[str, list[pb.PutChunksRequest]]) -> None:
    _, msgs = case
    expect_client_error(harness, lambda: harness.stub.PutChunks(iter(msgs), timeout=DEADLINE_S))


@FUZZ
@given(case=bad_streams())
def test_stream_malformed(harness: _Harness, case: tuple[str, list[pb.StreamContextRequest]]) -> None:
    _, msgs = case

    def call() -> None:
        for _ in harness.stub.StreamContext(iter(msgs), timeout=DEADLINE_S):
            pass

    expect_client_error(harness, call)


@FUZZ
@given(namespace=st.text(max_size=40), model_id=st.text(max_size=40), limit=st.integers(0, 2**32 - 1))
def test_list_and_stat_random(harness: _Harness, namespace: str, model_id: str, limit: int) -> None:
    """List/Stat take free-form filters: any value is answered (OK or a client error), nothing changes."""
    before = harness.snapshot()
    for call in (
        lambda: harness.stub.List(pb.ListRequest(namespace=namespace, model_id=model_id, limit=limit),
                                  timeout=DEADLINE_S),
        lambda: harness.stub.Stat(pb.StatRequest(namespace=namespace), timeout=DEADLINE_S),
    ):  # fmt: skip
        try:
            call()
        except grpc.RpcError as e:
            assert e.code() in CLIENT_ERRORS, f"{e.code()}: {e.details()}"  # type: ignore[attr-defined]
    assert harness.snapshot() == before


def test_second_start_mid_stream_is_rejected(harness: _Harness) -> None:
    """A StreamStart after the first one is out of order and must not be silently ignored."""
    start = pb.StreamContextRequest(
        start=pb.StreamStart(model=model_to_pb(MODEL), token_ids=pb.TokenIds(ids=IDS), level=0)
    )

    def call() -> None:
        for _ in harness.stub.StreamContext(iter([start, start]), timeout=DEADLINE_S):
            pass

    expect_client_error(harness, call)


def test_seeded_context_still_intact(harness: _Harness) -> None:
    """The valid path works on the same server, so the rejections above are not a broken server."""
    req = pb.LookupRequest(model=model_to_pb(MODEL), token_ids=pb.TokenIds(ids=IDS))
    assert harness.stub.Lookup(req, timeout=DEADLINE_S).prefix_chunks == N_CHUNKS
    resp = harness.stub.PutChunks(iter(_valid_put(100)), timeout=DEADLINE_S)
    assert resp.stored_chunks == N_CHUNKS
    harness.stub.Delete(
        pb.ContextRef(model=model_to_pb(MODEL), context_id=resp.context_id), timeout=DEADLINE_S
    )
