"""The inference-node client: store and fetch KV caches of reusable contexts over gRPC.

Two flavours with the same methods, like redis-py: ``AsyncKVCacheClient`` (asyncio) and
``KVCacheClient`` (blocking; it drives the async client on a private event-loop thread, so both share
one implementation)::

    from client import KVCacheClient
    from kvstore.keys import ModelKey

    model = ModelKey("stories260K", chunk_tokens=64)
    with KVCacheClient("127.0.0.1:50551") as kvs:
        kvs.store(model, token_ids, kv)                  # kv [layers, 2, tokens, kv_heads, head_dim]
        res = kvs.fetch(model, token_ids, level=0)       # res.kv covers res.prefix_tokens tokens

Fetches are pipelined: chunk ``i+1`` is received while chunk ``i`` decodes on a worker thread, and a
stream that breaks part-way resumes on the next address from the last verified chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import statistics
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
import torch
import xxhash

import codec
from client.adaptation import RECOMPUTE
from kernels import ops as kernel_ops
from kvstore.keys import ModelKey, token_array
from kvstore.rpc import pb, pb_grpc
from kvstore.wire import DEFAULT_PART_BYTES, MAX_PART_BYTES, model_to_pb, split_parts

T = TypeVar("T")

# Statuses after which the same request may succeed on another front end.
_UINT32_MAX = 2**32 - 1  # proto uint32 fields (ttl_seconds, level, max_chunks)
_RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.ABORTED,
    grpc.StatusCode.DATA_LOSS,
}
# A fetch also resumes after INTERNAL: grpc aio reports a connection torn mid-stream (front end killed) as
# "INTERNAL: Internal error from Core", and fetches are read-only with every chunk verified end to end.
_RETRYABLE_FETCH = _RETRYABLE | {grpc.StatusCode.INTERNAL}

# Errors that say the request is wrong: never turned into a partial result.
_CALLER_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


class KVStreamError(RuntimeError):
    """A request failed; ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class LookupResult:
    prefix_chunks: int
    prefix_tokens: int
    chunk_tokens: int
    chunks: list[pb.ChunkInfo]


@dataclass(frozen=True)
class StoreResult:
    context_id: bytes
    stored_chunks: int
    stored_tokens: int
    bytes_written: int
    dedup_chunks: int


@dataclass(frozen=True)
class ChunkReport:
    """What happened to one chunk of a fetch."""

    index: int
    level: int  # codec level, or ``RECOMPUTE`` (-1) for a chunk the server asked the caller to prefill
    nbytes: int
    recv_seconds: float  # previous chunk (or the stream header) received -> this chunk's last part received
    decode_seconds: float
    recompute: bool = False


@dataclass
class FetchResult:
    """A fetched prefix.

    ``kv`` is ``[layers, 2, prefix_tokens, kv_heads, head_dim]`` in the stored dtype on ``device``
    (``None`` when nothing was found, or when every chunk is to be recomputed). ``recompute`` lists token
    ranges ``[start, end)`` inside the prefix that the server asked the caller to prefill locally (their
    KV slots are zero; ``client.model.hf.fill_recompute`` fills them). ``truncated`` says the server found
    fewer verified chunks than its index promised (``reason`` says why). ``seconds`` is the wall time of
    the whole fetch including the decode of the last chunk (the KV is ready when it returns).
    """

    kv: torch.Tensor | None
    prefix_tokens: int
    chunks: list[ChunkReport] = field(default_factory=list)
    recompute: list[tuple[int, int]] = field(default_factory=list)
    truncated: bool = False
    reason: str = ""
    seconds: float = 0.0


def _tokens_pb(token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> pb.TokenIds:
    if isinstance(token_ids, torch.Tensor):
        token_ids = token_ids.cpu().numpy()
    return pb.TokenIds(ids=token_array(token_ids).tolist())


def _raise(err: grpc.aio.AioRpcError) -> KVStreamError:
    return KVStreamError(err.code(), err.details() or "")


def prefix_route_key(model: ModelKey, token_ids: Sequence[int] | np.ndarray | torch.Tensor) -> bytes | None:
    """The routing key of a fetch under ``route_by_prefix``: the model's salt and its first chunk of
    tokens (``None`` when there is no full chunk)."""
    head = token_array(np.asarray(token_ids))[: model.chunk_tokens]
    return model.salt() + head.tobytes() if head.size == model.chunk_tokens else None


def rendezvous_order(addresses: Sequence[str], key: bytes) -> list[str]:
    """``addresses`` by rendezvous (highest-random-weight) hashing of ``key``: the same key always gets
    the same order, and adding or removing an address moves only the keys it wins or held."""
    return sorted(addresses, key=lambda a: hashlib.blake2b(key + a.encode()).digest(), reverse=True)


class _BlobAssembler:
    """Reassembles ``ChunkData`` parts into whole blobs and checks their end-to-end checksum."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.started = 0.0

    def add(self, msg: pb.ChunkData) -> bytes | None:
        if not self.parts:
            self.started = time.perf_counter()
        if msg.offset != self.size:
            raise KVStreamError(grpc.StatusCode.DATA_LOSS, f"chunk {msg.chunk_index}: part out of order")
        self.parts.append(msg.data)
        self.size += len(msg.data)
        if not msg.last:
            return None
        blob = b"".join(self.parts)
        self.parts, self.size = [], 0
        if len(blob) != msg.total_size or xxhash.xxh3_64_intdigest(blob) != msg.xxh3_64:
            raise KVStreamError(grpc.StatusCode.DATA_LOSS, f"chunk {msg.chunk_index}: checksum mismatch")
        return blob


class _BearerToken:
    """Adds ``authorization: Bearer <token>`` to the calls of a channel (plaintext or TLS alike)."""

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def _details(self, details: Any) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        metadata.add("authorization", self._value)
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


# One class per call type: grpc.aio files each interceptor under the first call type it implements only.
class _BearerUnaryUnary(_BearerToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerUnaryStream(_BearerToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _BearerStreamUnary(_BearerToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


class _BearerStreamStream(_BearerToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation: Any, details: Any, request_iterator: Any) -> Any:
        return await continuation(self._details(details), request_iterator)


def _bearer_interceptors(token: str) -> list[grpc.aio.ClientInterceptor]:
    kinds = (_BearerUnaryUnary, _BearerUnaryStream, _BearerStreamUnary, _BearerStreamStream)
    return [kind(token) for kind in kinds]


class AsyncKVCacheClient:
    """asyncio client for one or more equivalent front ends (any front end serves any request).

    Security: ``token`` is sent as ``authorization: Bearer <token>`` on every call. ``tls_ca`` (PEM path
    of the CA that signed the server certificate) switches to TLS; ``tls_cert`` + ``tls_key`` add a
    client certificate for servers that require mutual TLS. Without any of them the channel is plaintext.

    Routing: calls go round robin over ``addresses``. With ``route_by_prefix=True`` a fetch goes first to
    the front end that rendezvous hashing picks for its model and first chunk of tokens (then on through
    the others in that fixed order if it fails), so every worker fetching contexts that start alike asks
    the same front end, and the front ends' hot-chunk caches hold different hot sets instead of each
    holding all of them. The price: one front end serves every fetch of a very hot prefix.
    """

    FLOOR_MEMORY_SECONDS = 60.0  # how long a slow per-chunk goodput keeps ``bandwidth_floor`` down

    def __init__(
        self,
        addresses: str | Sequence[str],
        *,
        namespace: str = "default",
        timeout: float = 30.0,
        part_bytes: int = DEFAULT_PART_BYTES,
        channel_options: Sequence[tuple[str, Any]] = (),
        token: str | None = None,
        tls_ca: str | Path | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        route_by_prefix: bool = False,
    ) -> None:
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        self.route_by_prefix = route_by_prefix
        if not self.addresses:
            raise ValueError("at least one server address is required")
        if (tls_cert is None) != (tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together")
        if token is not None and not token:
            raise ValueError("token must not be empty")
        # Files are read now so a wrong path fails here, not on the first request.
        self._credentials = (
            None
            if tls_ca is None and tls_cert is None
            else grpc.ssl_channel_credentials(
                root_certificates=Path(tls_ca).read_bytes() if tls_ca is not None else None,
                private_key=Path(tls_key).read_bytes() if tls_key is not None else None,
                certificate_chain=Path(tls_cert).read_bytes() if tls_cert is not None else None,
            )
        )
        self._interceptors = [] if token is None else _bearer_interceptors(token)
        self.namespace = namespace
        self.timeout = timeout
        if not 1 <= part_bytes <= MAX_PART_BYTES:
            raise ValueError(f"part_bytes must be in [1, {MAX_PART_BYTES}] (the server's part limit)")
        self.part_bytes = part_bytes
        opts = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]
        self._options = opts + list(channel_options)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._next = 0
        # Measured on earlier fetches, first estimates for the next adaptive fetch: goodput in bytes/s and
        # decode speed in KV tokens/s.
        self.bandwidth: float | None = None
        self.decode_rate: float | None = None
        self._goodputs: deque[tuple[float, float]] = deque(maxlen=1024)  # (monotonic time, bytes/s) per chunk

    @property
    def bandwidth_floor(self) -> float | None:
        """Slowest per-chunk goodput (bytes/s) of the last ``FLOOR_MEMORY_SECONDS``, if any.

        Sent with adaptive fetches: the server bets on a large chunk only if the SLO survives the link
        falling back to this rate.
        """
        since = time.monotonic() - self.FLOOR_MEMORY_SECONDS
        return min((g for t, g in self._goodputs if t >= since), default=None)

    # -- plumbing ---------------------------------------------------------------------------------------

    def _stub(self, address: str) -> pb_grpc.KVStreamStub:
        ch = self._channels.get(address)
        if ch is None:
            ch = self._channels[address] = (
                grpc.aio.insecure_channel(address, options=self._options, interceptors=self._interceptors)
                if self._credentials is None
                else grpc.aio.secure_channel(
                    address, self._credentials, options=self._options, interceptors=self._interceptors
                )
            )
        return pb_grpc.KVStreamStub(ch)

    def _rotation(self, key: bytes | None = None) -> list[str]:
        """Addresses in the order to try them: ``rendezvous_order`` of ``key`` when given, else starting
        with the next one in round-robin order (spreads load over front ends)."""
        if key is not None:
            return rendezvous_order(self.addresses, key)
        start = self._next % len(self.addresses)
        self._next += 1
        return self.addresses[start:] + self.addresses[:start]

    async def _unary(self, call: Callable[[pb_grpc.KVStreamStub], Awaitable[T]]) -> T:
        last: grpc.aio.AioRpcError | None = None
        for address in self._rotation():
            try:
                return await call(self._stub(address))
            except grpc.aio.AioRpcError as err:
                if err.code() not in _RETRYABLE:
                    raise _raise(err) from None
                last = err
        assert last is not None
        raise _raise(last)

    def model(self, model: ModelKey | str) -> ModelKey:
        return model if isinstance(model, ModelKey) else ModelKey(model_id=model, namespace=self.namespace)

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()
        self._channels.clear()

    async def __aenter__(self) -> AsyncKVCacheClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- queries ----------------------------------------------------------------------------------------

    async def lookup(self, model: ModelKey | str, token_ids: Sequence[int] | np.ndarray) -> LookupResult:
        """Longest stored prefix of ``token_ids`` and the levels stored for each of its chunks."""
        req = pb.LookupRequest(model=model_to_pb(self.model(model)), token_ids=_tokens_pb(token_ids))
        resp = await self._unary(lambda s: s.Lookup(req, timeout=self.timeout))
        return LookupResult(resp.prefix_chunks, resp.prefix_tokens, resp.chunk_tokens, list(resp.chunks))

    def _ref(
        self, model: ModelKey | str, token_ids: Any = None, context_id: bytes = b"", name: str = ""
    ) -> Any:
        ref = pb.ContextRef(model=model_to_pb(self.model(model)))
        if token_ids is not None:
            ref.token_ids.CopyFrom(_tokens_pb(token_ids))
        elif context_id:
            ref.context_id = context_id
        elif name:
            ref.name = name
        else:
            raise ValueError("give token_ids, context_id or name")
        return ref

    async def get_context(
        self, model: ModelKey | str, token_ids: Any = None, *, context_id: bytes = b"", name: str = ""
    ) -> pb.ContextInfo:
        ref = self._ref(model, token_ids, context_id, name)
        return await self._unary(lambda s: s.GetContext(ref, timeout=self.timeout))

    async def delete(
        self, model: ModelKey | str, token_ids: Any = None, *, context_id: bytes = b"", name: str = ""
    ) -> pb.DeleteResponse:
        ref = self._ref(model, token_ids, context_id, name)
        return await self._unary(lambda s: s.Delete(ref, timeout=self.timeout))

    async def pin(
        self, model: ModelKey | str, token_ids: Any = None, *, context_id: bytes = b"", name: str = ""
    ) -> pb.PinResponse:
        req = pb.PinRequest(context=self._ref(model, token_ids, context_id, name))
        return await self._unary(lambda s: s.Pin(req, timeout=self.timeout))

    async def unpin(
        self, model: ModelKey | str, token_ids: Any = None, *, context_id: bytes = b"", name: str = ""
    ) -> pb.PinResponse:
        req = pb.PinRequest(context=self._ref(model, token_ids, context_id, name))
        return await self._unary(lambda s: s.Unpin(req, timeout=self.timeout))

    async def ls(
        self, model_id: str = "", *, namespace: str | None = None, limit: int = 0
    ) -> list[pb.ContextInfo]:
        req = pb.ListRequest(namespace=namespace or self.namespace, model_id=model_id, limit=limit)
        resp = await self._unary(lambda s: s.List(req, timeout=self.timeout))
        return list(resp.contexts)

    async def stat(self, namespace: str = "") -> pb.StatResponse:
        req = pb.StatRequest(namespace=namespace)
        return await self._unary(lambda s: s.Stat(req, timeout=self.timeout))

    # -- store ------------------------------------------------------------------------------------------

    async def store(
        self,
        model: ModelKey | str,
        token_ids: Sequence[int] | np.ndarray,
        kv: torch.Tensor | None = None,
        *,
        levels: Iterable[int] | None = None,
        blobs: Sequence[dict[int, bytes]] | None = None,
        sidecars: Sequence[dict[str, bytes]] | None = None,
        pin: bool = False,
        ttl: float | None = None,
        name: str = "",
        metadata: dict[str, str] | None = None,
    ) -> StoreResult:
        """Encode and store the full chunks of a context.

        ``kv`` is ``[layers, 2, tokens, kv_heads, head_dim]`` (its dtype must match ``model.dtype``) and is
        encoded at ``levels`` (default: every codec level); or pass pre-encoded ``blobs`` (one dict
        ``level -> codec blob`` per full chunk). ``sidecars`` adds named per-chunk blobs (e.g. sparse
        indexes). The server makes the context visible only after every blob arrived and verified.
        ``ttl``: seconds the context lives unless pinned (rounded up to whole seconds; ``None``: the
        server's default).
        """
        if ttl is not None and not 0 <= ttl <= _UINT32_MAX:
            raise ValueError(f"ttl must be in [0, {_UINT32_MAX}] seconds (0 or None: the server's default)")
        if levels is not None and not (levels := tuple(levels)):
            raise ValueError("levels must name at least one codec level (None: all of them)")
        if metadata is not None and not all(isinstance(x, str) for kv_ in metadata.items() for x in kv_):
            raise TypeError("metadata keys and values must be str")
        mk = self.model(model)
        if blobs is None:
            if kv is None:
                raise ValueError("give kv or blobs")
            blobs = codec.encode_context(kv, mk.chunk_tokens, codec.LEVELS if levels is None else levels)
        if sidecars is not None and len(sidecars) != len(blobs):
            raise ValueError(f"sidecars has {len(sidecars)} entries for {len(blobs)} chunks (one per chunk)")
        header = pb.PutHeader(
            model=model_to_pb(mk),
            token_ids=_tokens_pb(token_ids),
            pin=pin,
            ttl_seconds=math.ceil(ttl) if ttl else 0,  # 0.5 s must not become 0, "the default"
            name=name,
        )

        broken: list[Exception] = []  # raised while producing the request stream

        async def requests() -> AsyncIterator[pb.PutChunksRequest]:
            try:
                async for msg in _put_messages():
                    yield msg
            except Exception as e:  # grpc.aio reports it as a bare CancelledError: keep the real one
                broken.append(e)
                raise

        async def _put_messages() -> AsyncIterator[pb.PutChunksRequest]:
            yield pb.PutChunksRequest(header=header)
            for index, per_level in enumerate(blobs):
                named: list[tuple[int, str, bytes]] = [(lvl, "", b) for lvl, b in sorted(per_level.items())]
                if sidecars is not None:
                    named += [(0, nm, b) for nm, b in sorted(sidecars[index].items())]
                for level, sidecar, blob in named:
                    for offset, data in split_parts(blob, self.part_bytes):
                        yield pb.PutChunksRequest(
                            part=pb.ChunkPart(
                                chunk_index=index,
                                level=level,
                                sidecar=sidecar,
                                total_size=len(blob),
                                offset=offset,
                                data=data,
                            )
                        )
            yield pb.PutChunksRequest(commit=pb.Commit(metadata=metadata or {}))

        try:
            resp = await self._unary(lambda s: s.PutChunks(requests(), timeout=self.timeout))
        except BaseException:
            if broken:
                raise broken[0] from None
            raise
        return StoreResult(
            resp.context_id, resp.stored_chunks, resp.stored_tokens, resp.bytes_written, resp.dedup_chunks
        )

    # -- fetch ------------------------------------------------------------------------------------------

    async def fetch(
        self,
        model: ModelKey | str,
        token_ids: Sequence[int] | np.ndarray,
        *,
        slo: float | None = None,
        level: int | None = None,
        max_level: int | None = None,
        device: str | torch.device = "cpu",
        max_chunks: int = 0,
        recompute_tokens_per_second: float = 0.0,
        decode_tokens_per_second: float | None = None,
        bandwidth_hint_bps: float | None = None,
        on_recompute: Callable[[int, int], None] | None = None,
    ) -> FetchResult:
        """Fetch and decode the longest stored prefix of ``token_ids``.

        Without ``slo`` every chunk comes at ``level`` (default ``codec.DEFAULT_LEVEL``; the server falls
        back to the nearest stored level). With ``slo`` (seconds, for the whole call) the server picks
        each chunk's level adaptively to finish in time (``LEVEL_POLICY_ADAPTIVE``), never coarser than
        ``max_level`` if given (e.g. ``codec.DEFAULT_LEVEL``: the quality the caller accepts), and, if
        ``recompute_tokens_per_second`` (local prefill speed, see
        ``client.adaptation.measure_prefill_tokens_per_second``) is given, may mark chunks *recompute*:
        they carry no bytes, their token ranges are listed in ``FetchResult.recompute`` and their KV
        slots are zeros. ``on_recompute(start, end)`` is called as soon as such a marker arrives (head
        chunks are marked first), so the caller can prefill while the rest streams.
        ``decode_tokens_per_second`` / ``bandwidth_hint_bps`` (bytes/s) default to what this client measured
        on its previous fetches (``decode_rate`` / ``bandwidth``).

        Chunks are decoded on a worker thread while the next one is received. If a front end fails
        mid-stream, the fetch resumes on the next address from the first chunk not yet verified (with the
        SLO time that is left), so the bytes are identical to an unbroken stream. If the stream cannot be
        finished (deadline, every front end failed) after some chunks were verified, those are returned
        with ``truncated=True`` and the ``reason``; with none verified, or for a bad request, it raises.
        """
        if slo is not None and not 0 < slo < math.inf:
            raise ValueError("slo must be a positive, finite number of seconds")
        rates = {
            "recompute_tokens_per_second": recompute_tokens_per_second,
            "decode_tokens_per_second": decode_tokens_per_second or 0.0,
            "bandwidth_hint_bps": bandwidth_hint_bps or 0.0,
        }
        for arg, rate in rates.items():
            if not 0 <= rate < math.inf:
                raise ValueError(f"{arg} must be finite and >= 0")
        for arg, lvl in (("level", level), ("max_level", max_level)):
            if lvl is not None and lvl not in codec.LEVELS:
                raise ValueError(f"{arg} must be one of the codec levels {list(codec.LEVELS)}")
        if not 0 <= max_chunks <= _UINT32_MAX:
            raise ValueError(f"max_chunks must be in [0, {_UINT32_MAX}] (0: all)")
        mk = self.model(model)
        start = pb.StreamStart(
            model=model_to_pb(mk),
            token_ids=_tokens_pb(token_ids),
            policy=pb.LEVEL_POLICY_FIXED if slo is None else pb.LEVEL_POLICY_ADAPTIVE,
            level=codec.DEFAULT_LEVEL if level is None else level,
            max_chunks=max_chunks,
            max_part_bytes=self.part_bytes,
            recompute_tokens_per_second=recompute_tokens_per_second,
            max_level=max_level,
        )
        t0 = time.perf_counter()
        state = _FetchState(mk.chunk_tokens, device, on_recompute)
        last: KVStreamError | None = None
        route = prefix_route_key(mk, token_ids) if self.route_by_prefix else None
        for address in self._rotation(route):
            start.start_chunk = state.next_chunk
            if max_chunks:  # the server counts max_chunks from start_chunk
                if state.next_chunk >= max_chunks:
                    last = None  # every chunk asked for arrived before the stream broke
                    break
                start.max_chunks = max_chunks - state.next_chunk
            if slo is not None:
                # A resumed stream gets the time that is left (at least 1 ms: the server then sends the
                # smallest levels / recompute markers rather than nothing).
                start.slo_ms = max(slo - (time.perf_counter() - t0), 1e-3) * 1e3
                start.decode_tokens_per_second = (
                    decode_tokens_per_second or state.decode_rate or self.decode_rate or 0
                )
                start.bandwidth_hint_bps = bandwidth_hint_bps or state.bandwidth or self.bandwidth or 0
                seen = [*state.goodputs, *filter(None, [self.bandwidth_floor])]
                start.bandwidth_floor_bps = min(seen, default=0.0)
            try:
                await self._stream_once(self._stub(address), start, state)
                last = None  # an earlier front end failed, but this one finished the stream
                break
            except grpc.aio.AioRpcError as err:
                last = _raise(err)
            except KVStreamError as err:  # bytes damaged in transit: another front end may do better
                last = err
            if state.announced and state.next_chunk >= state.announced:
                last = None  # the connection broke after every announced chunk arrived: nothing is missing
                break
            # A front end that stalls before the first chunk (hung, black-holed) is as good as down.
            stalled = last.code == grpc.StatusCode.DEADLINE_EXCEEDED and state.next_chunk == 0
            if last.code not in _RETRYABLE_FETCH and not stalled:
                break  # e.g. DEADLINE_EXCEEDED mid-stream: keep what was verified, say why it is short
        if last is not None and (state.next_chunk == 0 or last.code in _CALLER_ERRORS):
            # Nothing usable (or the request itself is wrong): let running decodes finish quietly.
            await asyncio.gather(*state.decodes, return_exceptions=True)
            raise last
        if last is not None:
            state.truncated = True
            state.reason = f"stream failed after {state.next_chunk} chunks: {last.message}"
        elif not state.truncated and state.next_chunk < min(state.announced, max_chunks or state.announced):
            # A resumed stream's front end found a shorter prefix (evicted chunks, a shard down): its
            # trailer is complete, but the first header promised more.
            state.truncated = True
            state.reason = (
                f"the first front end announced {state.announced} chunks; after a failover only "
                f"{state.next_chunk} could be read"
            )
        result = await state.result()
        result.seconds = time.perf_counter() - t0
        self.bandwidth = state.bandwidth or self.bandwidth
        self.decode_rate = state.decode_rate or self.decode_rate
        now = time.monotonic()
        self._goodputs.extend((now, g) for g in state.goodputs)
        return result

    async def _stream_once(
        self, stub: pb_grpc.KVStreamStub, start: pb.StreamStart, state: _FetchState
    ) -> None:
        # Explicit write()/read() instead of a request iterator: throughput reports are best effort and
        # must never race the end of the call.
        call = stub.StreamContext(timeout=self.timeout)
        await call.write(pb.StreamContextRequest(start=start))
        can_report = True
        assembler = _BlobAssembler()

        async def report(msg: pb.ThroughputReport) -> None:
            nonlocal can_report
            if not can_report:
                return
            try:
                await call.write(pb.StreamContextRequest(report=msg))
            except (grpc.aio.UsageError, grpc.aio.AioRpcError, asyncio.InvalidStateError):
                can_report = False  # the server already finished sending

        try:
            while (resp := await call.read()) is not grpc.aio.EOF:
                kind = resp.WhichOneof("msg")
                if kind == "header":
                    state.on_header(resp.header)
                elif kind == "chunk":
                    msg = resp.chunk
                    if msg.sidecar:
                        continue  # sidecars are consumed by the sparse backends' own fetch path
                    if msg.recompute:
                        state.on_recompute(msg)
                        continue
                    blob = assembler.add(msg)
                    if blob is None:
                        continue
                    goodput = state.on_blob(msg, blob)
                    await report(pb.ThroughputReport(chunk_index=msg.chunk_index, bytes_per_second=goodput))
                    for index, decode_seconds in state.new_decodes():
                        await report(pb.ThroughputReport(chunk_index=index, decode_seconds=decode_seconds))
                elif kind == "trailer":
                    state.truncated = resp.trailer.truncated
                    state.reason = resp.trailer.reason
                    if can_report:
                        can_report = False
                        with contextlib.suppress(grpc.aio.UsageError, grpc.aio.AioRpcError):
                            await call.done_writing()
        finally:
            if not call.done():
                call.cancel()


_decode_streams = threading.local()  # per decode thread: {cuda device index: torch.cuda.Stream}


def _decode_chunk(
    blob: bytes,
    device: str | torch.device,
    out: torch.Tensor | None,
    out_ready: torch.cuda.Event | None = None,
) -> torch.Tensor:
    """Decode one blob on ``device`` and return once the KV is there (called from a worker thread).

    On CUDA the decode runs on a stream of this thread's own, not the default stream the model computes
    on (a prefill of recompute chunks overlaps it), and the thread waits for that stream, so the time
    measured is the decode's and the tensor is complete on every stream when it is handed back.
    ``out_ready``: a ``torch.cuda.Event`` recorded where ``out`` was allocated; the decode waits for it
    (memory the allocator recycled may still be read by work queued on that stream before).
    """
    dev = torch.device(device)
    if dev.type != "cuda":
        return kernel_ops.codec_decode(blob, dev, out=out)
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    streams: dict[int, torch.cuda.Stream] = _decode_streams.__dict__.setdefault("by_device", {})
    if index not in streams:
        streams[index] = torch.cuda.Stream(device=index)
    stream = streams[index]
    with torch.cuda.stream(stream):
        if out_ready is not None:
            stream.wait_event(out_ready)
        result = kernel_ops.codec_decode(blob, dev, out=out)
    if out is None:  # allocated on the side stream, freed by the caller on its own
        result.record_stream(torch.cuda.default_stream(index))
    stream.synchronize()
    return result


class _FetchState:
    """Decoded chunks of one fetch, kept across resumed streams, and what was measured on the way.

    Chunks are decoded straight into one context tensor sized from the first stream header (no final
    concatenation: at 8K tokens of an 8B model that copy is 1 GiB); a chunk that does not fit it (another
    shape, or past the announced count) is decoded on its own and the result is concatenated instead.
    """

    def __init__(
        self,
        chunk_tokens: int,
        device: str | torch.device,
        on_recompute: Callable[[int, int], None] | None = None,
    ) -> None:
        self.chunk_tokens = chunk_tokens
        self.device = device
        self.on_recompute_cb = on_recompute
        self.next_chunk = 0
        self.decodes: list[asyncio.Future[tuple[torch.Tensor | None, float]]] = []
        self.meta: list[tuple[int, int, int, float, bool]] = []  # index, level, nbytes, recv s, recompute
        self.recompute: list[tuple[int, int]] = []
        self.truncated = False
        self.reason = ""
        self._last_arrival = time.perf_counter()
        self._reported = 0  # decodes [0, _reported) were reported to the server (or are recompute)
        self._recv = [0, 0.0]  # bytes, seconds: goodput of this fetch
        self._window: list[tuple[int, float]] = []  # (bytes, seconds) of the last arrivals
        self.goodputs: list[float] = []  # per blob, what was reported to the server (bytes/s)
        self._decode_seconds: list[float] = []  # per decoded chunk
        self._capacity = 0  # chunks announced by the first header
        self._context: torch.Tensor | None = None  # [L, 2, capacity * chunk_tokens, H, D], on device
        self._context_ready: torch.cuda.Event | None = None  # CUDA: recorded where _context was allocated
        self._in_context = True  # every decoded chunk went into _context

    @property
    def bandwidth(self) -> float | None:
        """Goodput of this fetch so far in bytes/s (``None`` before the first blob)."""
        return self._recv[0] / self._recv[1] if self._recv[1] > 0 else None

    @property
    def decode_rate(self) -> float | None:
        """Decode speed of this fetch so far in KV tokens/s, from the median chunk (``None`` before the
        first decode; the median ignores a one-off slow decode such as a JIT compile)."""
        median = statistics.median(self._decode_seconds) if self._decode_seconds else 0.0
        return self.chunk_tokens / median if median > 0 else None

    @property
    def announced(self) -> int:
        """Chunks the first stream's header announced (0 before it arrived)."""
        return self._capacity

    def on_header(self, header: pb.StreamHeader) -> None:
        self._last_arrival = time.perf_counter()
        if header.chunk_tokens:
            self.chunk_tokens = header.chunk_tokens
        if not self._capacity:  # a resumed stream's header lists the chunks from its start_chunk on
            self._capacity = self.next_chunk + len(header.chunks)

    def _slot(self, index: int, blob: bytes) -> torch.Tensor | None:
        """The token slice of the context tensor chunk ``index`` decodes into (``None``: it does not fit)."""
        info = codec.inspect(blob)  # header only; the decode verifies the checksum
        n_layers, _, tokens, heads, dim = info.shape
        if tokens != self.chunk_tokens or index >= self._capacity:
            return None
        want = (n_layers, 2, self._capacity * tokens, heads, dim)
        if self._context is None:
            self._context = torch.empty(want, dtype=info.dtype, device=self.device)
            if self._context.is_cuda:
                self._context_ready = torch.cuda.Event()
                self._context_ready.record()
        elif tuple(self._context.shape) != want or self._context.dtype != info.dtype:
            return None
        return self._context[:, :, index * tokens : (index + 1) * tokens]

    def _check_order(self, index: int) -> None:
        if index != self.next_chunk:
            raise KVStreamError(grpc.StatusCode.DATA_LOSS, f"expected chunk {self.next_chunk}, got {index}")
        self.next_chunk += 1

    def on_blob(self, msg: pb.ChunkData, blob: bytes) -> float:
        """Queue the decode of a verified blob; returns the goodput (bytes/s) to report for it."""
        self._check_order(msg.chunk_index)
        now = time.perf_counter()
        recv_seconds, self._last_arrival = now - self._last_arrival, now
        self._recv[0] += len(blob)
        self._recv[1] += recv_seconds
        # Over the last three arrivals: a stall of this process delays one chunk and shortens the next
        # one's gap by as much, so a window measures the link where a single chunk is off both ways.
        self._window = [*self._window[-2:], (len(blob), recv_seconds)]
        goodput = sum(n for n, _ in self._window) / max(sum(t for _, t in self._window), 1e-9)
        self.goodputs.append(goodput)

        try:
            slot = self._slot(msg.chunk_index, blob)
        except codec.CodecError:
            slot = None  # the decode below raises the error with the rest of the checks
        self._in_context = self._in_context and slot is not None

        def work() -> tuple[torch.Tensor | None, float]:
            t = time.perf_counter()
            out = _decode_chunk(blob, self.device, slot, self._context_ready if slot is not None else None)
            return out, time.perf_counter() - t

        self.decodes.append(asyncio.ensure_future(asyncio.to_thread(work)))
        self.meta.append((msg.chunk_index, msg.level, len(blob), recv_seconds, False))
        return goodput

    def new_decodes(self) -> list[tuple[int, float]]:
        """``(chunk index, decode seconds)`` of the decodes finished since the last call, in order."""
        out = []
        while self._reported < len(self.decodes) and self.decodes[self._reported].done():
            index, _, _, _, recompute = self.meta[self._reported]
            seconds = self.decodes[self._reported].result()[1]
            if not recompute:
                self._decode_seconds.append(seconds)
                out.append((index, seconds))
            self._reported += 1
        return out

    def on_recompute(self, msg: pb.ChunkData) -> None:
        self._check_order(msg.chunk_index)
        self._in_context = self._in_context and msg.chunk_index < self._capacity
        # ``_last_arrival`` stays: a marker carries no bytes, and timing the next blob from it (markers
        # can reach this loop late, batched with that blob's first bytes) would overstate the link.
        done: asyncio.Future[tuple[torch.Tensor | None, float]] = asyncio.get_running_loop().create_future()
        done.set_result((None, 0.0))
        self.decodes.append(done)
        self.meta.append((msg.chunk_index, RECOMPUTE, 0, 0.0, True))
        self.recompute.append((msg.token_start, msg.token_end))
        if self.on_recompute_cb is not None:
            self.on_recompute_cb(msg.token_start, msg.token_end)

    async def result(self) -> FetchResult:
        decoded = await asyncio.gather(*self.decodes)
        self.new_decodes()  # account the decodes that finished after the last report
        tensors = [t for t, _ in decoded if t is not None]
        reports = [
            ChunkReport(i, lvl, n, recv, dec, recompute=rc)
            for (i, lvl, n, recv, rc), (_, dec) in zip(self.meta, decoded, strict=True)
        ]
        kv: torch.Tensor | None = None
        n_tokens = len(self.meta) * self.chunk_tokens
        if tensors and self._in_context and self._context is not None:
            t = self.chunk_tokens
            for i, (*_, recompute) in enumerate(self.meta):
                if recompute:  # recompute chunks: zero slots
                    self._context[:, :, i * t : (i + 1) * t].zero_()
            kv = self._context[:, :, :n_tokens]
            if n_tokens < self._context.shape[2]:
                kv = kv.contiguous()  # a short stream: do not hand out a view pinning the whole buffer
        elif tensors:
            like = tensors[0]
            parts = [
                t if t is not None else like.new_zeros(like.shape)  # recompute chunks: zero slots
                for t, _ in decoded
            ]
            kv = torch.cat(parts, dim=2)
        return FetchResult(kv, n_tokens, reports, self.recompute, self.truncated, self.reason)


class KVCacheClient:
    """Blocking client with the same methods as ``AsyncKVCacheClient`` (which it runs on its own loop)."""

    def __init__(self, addresses: str | Sequence[str], **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvstream-client", daemon=True)
        self._thread.start()
        try:
            self._aio = self._run(self._make(addresses, kwargs))
        except BaseException:  # bad arguments: do not leave the loop's thread behind
            self._stop_loop()
            raise

    @staticmethod
    async def _make(addresses: str | Sequence[str], kwargs: dict[str, Any]) -> AsyncKVCacheClient:
        return AsyncKVCacheClient(addresses, **kwargs)  # channels must be created on the client's loop

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def lookup(self, *args: Any, **kwargs: Any) -> LookupResult:
        return self._run(self._aio.lookup(*args, **kwargs))

    def store(self, *args: Any, **kwargs: Any) -> StoreResult:
        return self._run(self._aio.store(*args, **kwargs))

    def fetch(self, *args: Any, **kwargs: Any) -> FetchResult:
        return self._run(self._aio.fetch(*args, **kwargs))

    def get_context(self, *args: Any, **kwargs: Any) -> pb.ContextInfo:
        return self._run(self._aio.get_context(*args, **kwargs))

    def delete(self, *args: Any, **kwargs: Any) -> pb.DeleteResponse:
        return self._run(self._aio.delete(*args, **kwargs))

    def pin(self, *args: Any, **kwargs: Any) -> pb.PinResponse:
        return self._run(self._aio.pin(*args, **kwargs))

    def unpin(self, *args: Any, **kwargs: Any) -> pb.PinResponse:
        return self._run(self._aio.unpin(*args, **kwargs))

    def ls(self, *args: Any, **kwargs: Any) -> list[pb.ContextInfo]:
        return self._run(self._aio.ls(*args, **kwargs))

    def stat(self, *args: Any, **kwargs: Any) -> pb.StatResponse:
        return self._run(self._aio.stat(*args, **kwargs))

    def model(self, model: ModelKey | str) -> ModelKey:
        return self._aio.model(model)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._aio.close())
            self._stop_loop()

    def __enter__(self) -> KVCacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
