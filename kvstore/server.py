"""The kvstream gRPC server (``grpc.aio``): a thin layer over ``ChunkStore``; health, reflection, metrics.

Runs on any asyncio loop (the CLI uses uvloop). Every RPC goes through one wrapper that maps exceptions to
status codes, records Prometheus metrics and writes one ``key=value`` log line per request.

Security (all optional, see ``docs/operator-runbook.md``): TLS or mutual TLS on the listening port;
bearer tokens (``kvstore.auth``) checked by the same wrapper, each limited to its namespaces and byte
quota. Health and reflection are not wrapped and stay open.

Status codes: INVALID_ARGUMENT (bad spec / ids / level / blob / part order / oversized part or blob),
NOT_FOUND (unknown context), RESOURCE_EXHAUSTED (backend full, request limits, namespace quota),
UNAUTHENTICATED (missing or unknown token), PERMISSION_DENIED (namespace not allowed for the token),
UNAVAILABLE (backend error, namespace busy, this front end at max_data_streams), DEADLINE_EXCEEDED.
A failed request leaves the store as it was: uploads are buffered until Commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import xxhash
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import codec
from client.adaptation import RECOMPUTE, AdaptivePlanner
from kvstore.auth import WILDCARD, Tenant, TokenTable
from kvstore.backends import open_backend
from kvstore.backends.base import BackendError, BackendFull, StorageBackend
from kvstore.config import ServerConfig
from kvstore.keys import DEFAULT_NAMESPACE, InvalidKeyError, ModelKey
from kvstore.metrics import Metrics
from kvstore.rpc import pb, pb_grpc
from kvstore.store import (
    ChunkBlobs,
    ChunkStore,
    ContextNotFound,
    ContextQuery,
    InvalidRequest,
    LimitExceeded,
    NamespaceBusy,
    PutResult,
    QuotaExceeded,
    check_context_name,
    check_sidecar_name,
)
from kvstore.wire import MAX_PART_BYTES, model_from_pb

log = logging.getLogger("kvstore.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["KVStream"].full_name
_DEADLINE_FLOOR_S = 0.02  # always keep this much time for the trailer
_HALF_CLOSE_WAIT_S = 2.0  # how long a finished stream waits for the client to stop writing


async def _drain(requests: Any, seconds: float) -> None:
    """Read and drop what the client still sends, until it half-closes or ``seconds`` pass.

    Ending a client-streaming call while the client is still writing makes grpc.aio report the
    failed write as INTERNAL "Internal error from Core" instead of our status (grpc/grpc#36066):
    a rejected upload would lose its reason. Nothing read here is kept.
    """
    with contextlib.suppress(Exception):
        async with asyncio.timeout(seconds):
            async for _ in requests:
                pass


class RpcFailure(Exception):
    """Raised inside a handler to end the call with ``code``."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _invalid(message: str) -> RpcFailure:
    return RpcFailure(grpc.StatusCode.INVALID_ARGUMENT, message)


# Status messages travel percent-encoded in one HTTP/2 header (grpc-message); the peer's default
# metadata limit is 8 KiB, and a longer message (a quoted multi-megabyte name) makes it reset the
# connection (RESOURCE_EXHAUSTED + GOAWAY) instead of reporting the error. 1 KiB of UTF-8 encodes to
# at most 3 KiB.
MAX_STATUS_MESSAGE_BYTES = 1024


def clip_message(message: str, limit: int = MAX_STATUS_MESSAGE_BYTES) -> str:
    """``message`` cut to at most ``limit`` UTF-8 bytes, saying how much was cut."""
    raw = message.encode()
    if len(raw) <= limit:
        return message
    head = raw[: limit - 40].decode(errors="ignore")
    return f"{head}... [{len(raw) - len(head.encode())} more bytes]"


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status code and message (at most ``MAX_STATUS_MESSAGE_BYTES``) a handler exception maps to."""
    code, message = _status_of(exc)
    return code, clip_message(message)


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcFailure):
        return exc.code, str(exc)
    if isinstance(exc, InvalidRequest | InvalidKeyError | codec.CodecError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, ContextNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, LimitExceeded | BackendFull):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc)
    if isinstance(exc, NamespaceBusy):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, BackendError):
        return grpc.StatusCode.UNAVAILABLE, f"backend error: {exc}"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


@dataclass
class _Call:
    """Per-request accounting filled in by a handler."""

    bytes_in: int = 0
    bytes_out: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    peer: str = ""  # read when the call starts: context.peer() of a call whose connection was reset segfaults
    tenant: Tenant | None = None  # the caller's token entry; None when authentication is off


# ----- level policies ---------------------------------------------------------------------------


class LevelPolicy(Protocol):
    """Chooses the codec level (or ``RECOMPUTE``) of each streamed chunk, in context order.

    ``pace`` is awaited before each chunk, ``choose`` is called right before it is sent, ``guess`` earlier,
    for the read-ahead of the next chunk (a wrong guess only costs a second storage read). ``sent`` and
    ``observe`` feed the server's own send measurement and the client's throughput reports.
    """

    def observe(self, report: pb.ThroughputReport) -> None: ...

    async def pace(self) -> None:
        """Returns when the next chunk may be sent."""
        ...

    def choose(self, chunk: pb.ChunkInfo) -> int:
        """Level to send for ``chunk`` (one of its stored levels), or ``RECOMPUTE``."""
        ...

    def guess(self, chunk: pb.ChunkInfo) -> int:
        """Likely level of ``chunk`` (the next one), for the storage read-ahead."""
        ...

    def sent(self, chunk: pb.ChunkInfo, level: int, nbytes: int, seconds: float) -> None:
        """``chunk`` went out at ``level``: ``nbytes`` handed to gRPC in ``seconds`` (flow control incl.)."""
        ...


class FixedLevelPolicy:
    """The requested level, else the nearest stored one: the next smaller-size (higher) level first."""

    def __init__(self, level: int) -> None:
        self.level = level

    def observe(self, report: pb.ThroughputReport) -> None:
        """Fixed: reports do not change the choice."""

    async def pace(self) -> None:
        """Fixed: as fast as flow control allows."""

    def choose(self, chunk: pb.ChunkInfo) -> int:
        stored = sorted(lv.level for lv in chunk.levels)
        if self.level in stored:
            return self.level
        smaller = [lv for lv in stored if lv > self.level]
        return smaller[0] if smaller else stored[-1]

    def guess(self, chunk: pb.ChunkInfo) -> int:
        return self.choose(chunk)

    def sent(self, chunk: pb.ChunkInfo, level: int, nbytes: int, seconds: float) -> None:
        """Fixed: nothing to learn."""


# First throughput estimate when the client sends no hint: a conservative 100 Mbit/s; the first chunk
# may come out smaller than needed, later ones are re-planned from measurements.
DEFAULT_BANDWIDTH_BPS = 100e6 / 8
MIN_BANDWIDTH_BPS = 1e3  # 8 kbit/s: the slowest link a hint may claim


class AdaptiveLevelPolicy:
    """``LEVEL_POLICY_ADAPTIVE``: re-plans the remaining chunks before each one (``AdaptivePlanner``).

    Throughput: the client's reports (goodput over its last chunk arrivals) feed the planner's estimate
    (a harmonic mean of recent samples, starting from the client's hint); the server's own send time
    only when it is lower, because socket and HTTP/2 buffers make a send look faster than the link but
    never slower. Time left: ``(1 - SLO_MARGIN) x slo - elapsed`` minus the delivery time, at the current
    estimate, of the bytes sent but not yet reported received (still in buffers or on the wire), and the
    prefill time of the recompute markers already sent after the head (the client runs those after the
    stream, one after another; a later re-plan must not spend that time on bytes).
    Pacing: a chunk is sent only while fewer than ``IN_FLIGHT_CHUNKS`` earlier ones are unreported, so
    each choice is made with a fresh measurement instead of minutes of data vanishing into buffers
    (bounded wait: twice the predicted delivery time of the unreported bytes, for clients that do not
    report). Chunks at the head of the stream may be marked recompute while all chunks before them were
    too (their prefill on the client overlaps the rest of the stream).
    """

    IN_FLIGHT_CHUNKS = 2
    SLO_MARGIN = 0.05  # fraction of the SLO kept back for jitter that no estimate sees coming

    def __init__(
        self, chunks: Sequence[pb.ChunkInfo], start: pb.StreamStart, started: float | None = None
    ) -> None:
        self._pos = {c.index: i for i, c in enumerate(chunks)}
        tokens = max((c.token_end - c.token_start for c in chunks), default=0)
        rate, decode_rate = start.recompute_tokens_per_second, start.decode_tokens_per_second
        # Hints below MIN_BANDWIDTH_BPS count as that: pacing waits grow with 1 / bandwidth.
        hint, floor = start.bandwidth_hint_bps, start.bandwidth_floor_bps
        self.planner = AdaptivePlanner(
            [{lv.level: lv.size_bytes for lv in c.levels} for c in chunks] or [{0: 0}],
            start.slo_ms / 1e3,
            bandwidth_bps=max(hint, MIN_BANDWIDTH_BPS) if hint else DEFAULT_BANDWIDTH_BPS,
            bandwidth_weight=4 if hint else 1,  # a measured hint: trusted like 4 samples
            bandwidth_floor_bps=max(floor, MIN_BANDWIDTH_BPS) if floor else None,
            recompute_seconds=tokens / rate if rate > 0 else None,
            decode_seconds=tokens / decode_rate if decode_rate > 0 else None,
            max_level=start.max_level if start.HasField("max_level") else None,
        )
        self._head = start.start_chunk == 0  # still inside a run of recompute chunks from token 0
        # Recompute markers sent after the head: the client prefills them after the stream, one by one.
        self._owed_seconds = 0.0
        self._sizes: dict[int, int] = {}  # chunk index -> bytes sent
        self._unacked: set[int] = set()  # chunks sent but not yet reported received
        self._t0 = time.perf_counter() if started is None else started  # the SLO clock (perf_counter)
        self._next_levels: tuple[int, int] | None = None  # (chunk position, level) of the last plan
        self._reported = asyncio.Event()

    def observe(self, report: pb.ThroughputReport) -> None:
        size = self._sizes.get(report.chunk_index, 0)
        if report.bytes_per_second > 0 and size:
            # Like hints, reports below MIN_BANDWIDTH_BPS count as that (a denormal rate would make
            # the sample's time infinite and the estimate zero).
            self.planner.observe(size, size / max(report.bytes_per_second, MIN_BANDWIDTH_BPS))
            self._unacked -= {i for i in self._unacked if i <= report.chunk_index}
            self._reported.set()
        if report.decode_seconds > 0:
            self.planner.observe_decode(report.decode_seconds)

    async def pace(self) -> None:
        while len(self._unacked) >= self.IN_FLIGHT_CHUNKS:
            self._reported.clear()
            unacked = sum(self._sizes[i] for i in self._unacked)
            try:
                await asyncio.wait_for(self._reported.wait(), 2 * unacked / self.planner.bandwidth + 0.05)
            except TimeoutError:
                return

    def _time_left(self) -> float:
        unacked = sum(self._sizes[i] for i in self._unacked)
        elapsed = time.perf_counter() - self._t0
        in_flight = unacked / self.planner.planning_bandwidth
        return self.planner.slo * (1 - self.SLO_MARGIN) - elapsed - in_flight - self._owed_seconds

    def choose(self, chunk: pb.ChunkInfo) -> int:
        pos = self._pos[chunk.index]
        time_left = self._time_left()
        plan = self.planner.plan(pos, time_left, head_recompute=self._head)
        log.debug(
            "adaptive chunk=%d time_left_ms=%.1f planning_bps=%.0f decode_ms=%.1f plan=%s fits=%s",
            chunk.index, time_left * 1e3, self.planner.planning_bandwidth,
            (self.planner.decode_seconds or 0) * 1e3, plan.levels, plan.fits,
        )
        self._head = self._head and plan.levels[0] == RECOMPUTE
        self._next_levels = (pos + 1, plan.levels[1]) if len(plan.levels) > 1 else None
        return plan.levels[0]

    def guess(self, chunk: pb.ChunkInfo) -> int:
        if self._next_levels is not None and self._next_levels[0] == self._pos[chunk.index]:
            return self._next_levels[1]
        return self.planner.plan(self._pos[chunk.index], self._time_left(), head_recompute=False).levels[0]

    def sent(self, chunk: pb.ChunkInfo, level: int, nbytes: int, seconds: float) -> None:
        if level == RECOMPUTE:
            if not self._head:  # a head marker's prefill overlaps the stream (planned that way)
                self._owed_seconds += self.planner.recompute_seconds or 0.0
            return
        self._sizes[chunk.index] = nbytes
        self._unacked.add(chunk.index)
        if seconds > 0 and nbytes / seconds < self.planner.bandwidth:
            self.planner.observe(nbytes, seconds)


def make_policy(
    start: pb.StreamStart, chunks: Sequence[pb.ChunkInfo], started: float | None = None
) -> LevelPolicy:
    """The policy a ``StreamStart`` asks for; raises ``RpcFailure`` for unsupported ones.

    ``chunks`` are the chunks to stream, ``started`` the ``time.perf_counter()`` the request arrived at.
    """
    if start.policy == pb.LEVEL_POLICY_ADAPTIVE:
        if not 0 < start.slo_ms < math.inf:
            raise _invalid("LEVEL_POLICY_ADAPTIVE needs a finite slo_ms > 0")
        rates = ("recompute_tokens_per_second", "decode_tokens_per_second")
        for name in (*rates, "bandwidth_hint_bps", "bandwidth_floor_bps"):
            if not 0 <= getattr(start, name) < math.inf:  # also rejects NaN
                raise _invalid(f"{name} must be finite and >= 0")
        if start.HasField("max_level") and start.max_level not in codec.LEVELS:
            raise _invalid(f"unknown max_level {start.max_level}; levels are {list(codec.LEVELS)}")
        return AdaptiveLevelPolicy(chunks, start, started)
    if start.policy != pb.LEVEL_POLICY_FIXED:
        raise _invalid(f"unknown level policy {start.policy}")
    if start.level not in codec.LEVELS:
        raise _invalid(f"unknown level {start.level}; levels are {list(codec.LEVELS)}")
    return FixedLevelPolicy(start.level)


# ----- servicer ---------------------------------------------------------------------------------


@dataclass
class _Loaded:
    info: pb.ChunkInfo
    level: int
    blob: bytes
    sidecars: list[tuple[str, bytes]]


@dataclass
class _Assembly:
    """One blob being reassembled from ordered parts."""

    total: int
    buf: bytearray = field(default_factory=bytearray)


class KVStreamServicer(pb_grpc.KVStreamServicer):
    """Implements every RPC of ``kvstream.v1.KVStream`` on a ``ChunkStore``."""

    def __init__(
        self, store: ChunkStore, config: ServerConfig, metrics: Metrics, tokens: TokenTable | None = None
    ) -> None:
        self.store = store
        self.config = config
        self.metrics = metrics
        self.tokens = tokens
        self._data_streams = 0  # PutChunks + StreamContext calls in progress
        self._buffered_put_bytes = 0  # bytes all PutChunks calls in progress hold until their Commit

    # -- admission: authentication and the data-stream cap ---------------------------------------

    @contextlib.contextmanager
    def _admit(self, context: Any, call: _Call, data_stream: bool) -> Iterator[None]:
        """Authenticate the call (sets ``call.tenant``) and, for data streams, hold one of the slots."""
        if self.tokens is not None:
            call.tenant = self.tokens.authenticate(context.invocation_metadata())
            if call.tenant is None:
                raise RpcFailure(
                    grpc.StatusCode.UNAUTHENTICATED, "missing or unknown token (authorization: Bearer ...)"
                )
            call.extra["tenant"] = call.tenant.name
        if not data_stream:
            yield
            return
        if self._data_streams >= self.config.max_data_streams:
            self.metrics.rejected.labels("data_streams").inc()
            # UNAVAILABLE, not RESOURCE_EXHAUSTED: the cap is this front end's, and clients move on to
            # another front end (or back off) after UNAVAILABLE only.
            raise RpcFailure(
                grpc.StatusCode.UNAVAILABLE,
                f"front end busy: too many concurrent data streams "
                f"(max_data_streams={self.config.max_data_streams})",
            )
        self._data_streams += 1
        try:
            yield
        finally:
            self._data_streams -= 1

    @staticmethod
    def _authorize(call: _Call, namespace: str) -> None:
        """PERMISSION_DENIED unless the caller's token covers ``namespace`` (``"*"`` = the whole store)."""
        if call.tenant is not None and not call.tenant.allows(namespace):
            what = "the whole store" if namespace == WILDCARD else f"namespace {namespace!r}"
            raise RpcFailure(
                grpc.StatusCode.PERMISSION_DENIED, f"token {call.tenant.name} may not access {what}"
            )

    # -- accounting wrapper ----------------------------------------------------------------------

    def _finish(self, method: str, code: grpc.StatusCode, start: float, call: _Call, context: Any) -> None:
        elapsed = time.perf_counter() - start
        self.metrics.requests.labels(method, code.name).inc()
        self.metrics.latency.labels(method).observe(elapsed)
        self.metrics.bytes_in.inc(call.bytes_in)
        self.metrics.bytes_out.inc(call.bytes_out)
        extra = "".join(f" {k}={v}" for k, v in call.extra.items())
        log.info(
            "rpc method=%s code=%s duration_ms=%.2f bytes_in=%d bytes_out=%d peer=%s%s",
            method,
            code.name,
            elapsed * 1e3,
            call.bytes_in,
            call.bytes_out,
            call.peer,
            extra,
        )

    @staticmethod
    def _cancel_code(context: Any) -> grpc.StatusCode:
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED

    def _unexpected(self, method: str, exc: BaseException) -> None:
        code, _ = status_of(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("rpc method=%s unexpected error", method, exc_info=exc)

    @contextlib.asynccontextmanager
    async def _rpc(
        self, method: str, context: Any, data_stream: bool, requests: Any = None
    ) -> AsyncIterator[_Call]:
        """One RPC's frame, shared by unary and streaming handlers: admission (auth, stream cap), the
        mapping of exceptions to a status with a message, metrics and the per-request log line."""
        call, start, code = _Call(peer=context.peer()), time.perf_counter(), grpc.StatusCode.OK
        try:
            with self._admit(context, call, data_stream):
                yield call
        except asyncio.CancelledError:
            code = self._cancel_code(context)
            raise
        except Exception as exc:
            self._unexpected(method, exc)
            if isinstance(exc, NamespaceBusy):
                self.metrics.rejected.labels("namespace_busy").inc()
            code, message = status_of(exc)
            if requests is not None:  # a client-streaming call: let the client finish writing first
                await _drain(requests, _HALF_CLOSE_WAIT_S)
            await context.abort(code, message)
        finally:
            self._finish(method, code, start, call, context)

    @staticmethod
    def _unary(method: str, data_stream: bool = False) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Wrap a handler ``fn(self, request, context, call)``; its work is bounded by the call deadline.

        ``data_stream`` calls count against ``max_data_streams``.
        """

        def deco(fn: Callable[..., Awaitable[Any]]) -> Any:
            @functools.wraps(fn)
            async def wrapper(self: KVStreamServicer, request: Any, context: Any) -> Any:
                requests = request if hasattr(request, "__aiter__") else None  # PutChunks' stream
                async with self._rpc(method, context, data_stream, requests) as call:
                    async with asyncio.timeout(context.time_remaining()):
                        return await fn(self, request, context, call)

            return wrapper

        return deco

    @staticmethod
    def _streaming(method: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Wrap an async-generator handler ``fn(self, request_iterator, context, call)``."""

        def deco(fn: Callable[..., AsyncIterator[Any]]) -> Any:
            @functools.wraps(fn)
            async def wrapper(
                self: KVStreamServicer, request_iterator: Any, context: Any
            ) -> AsyncIterator[Any]:
                self.metrics.streams_active.inc()
                try:
                    async with self._rpc(method, context, True) as call:
                        async for item in fn(self, request_iterator, context, call):
                            yield item
                finally:
                    self.metrics.streams_active.dec()

            return wrapper

        return deco

    # -- helpers ---------------------------------------------------------------------------------

    def _model(self, spec: pb.ModelSpec, call: _Call) -> ModelKey:
        """The validated model of a request, after checking the caller may use its namespace."""
        model = model_from_pb(spec)
        self._authorize(call, model.namespace)
        return model

    def _query(self, ref: pb.ContextRef, call: _Call) -> tuple[ModelKey, ContextQuery]:
        kind = ref.WhichOneof("ref")
        if kind is None:
            raise _invalid("a context reference needs token_ids, context_id or name")
        if kind == "token_ids":
            # Token ids salt the chunk keys, so they need the full model spec.
            return self._model(ref.model, call), ContextQuery(token_ids=list(ref.token_ids.ids))
        # A context id or name only needs the namespace; the rest of the spec may be left empty.
        model = (
            self._model(ref.model, call)
            if ref.model.model_id
            else ModelKey("any", namespace=ref.model.namespace or DEFAULT_NAMESPACE)
        )
        self._authorize(call, model.namespace)
        if kind == "context_id":
            return model, ContextQuery(context_id=bytes(ref.context_id))
        return model, ContextQuery(name=ref.name)

    # -- unary RPCs ------------------------------------------------------------------------------

    @_unary("Lookup")
    async def Lookup(self, request: pb.LookupRequest, context: Any, call: _Call) -> pb.LookupResponse:
        model = self._model(request.model, call)
        which = request.WhichOneof("query")
        if which == "token_ids":
            res = await self.store.lookup(model, token_ids=list(request.token_ids.ids))
        elif which == "chunk_hashes":
            res = await self.store.lookup(model, hashes=list(request.chunk_hashes.hashes))
        else:
            raise _invalid("Lookup needs token_ids or chunk_hashes")
        call.extra["prefix_chunks"] = res.prefix_chunks
        return pb.LookupResponse(
            prefix_chunks=res.prefix_chunks,
            prefix_tokens=res.prefix_tokens,
            chunks=res.chunks,
            chunk_tokens=res.chunk_tokens,
        )

    @_unary("GetContext")
    async def GetContext(self, request: pb.ContextRef, context: Any, call: _Call) -> pb.ContextInfo:
        model, query = self._query(request, call)
        return await self.store.get_context(model, query)

    @_unary("Delete")
    async def Delete(self, request: pb.ContextRef, context: Any, call: _Call) -> pb.DeleteResponse:
        model, query = self._query(request, call)
        freed = await asyncio.shield(self.store.delete(model, query))  # finish once started
        return pb.DeleteResponse(deleted=True, chunks_freed=freed)

    @_unary("List")
    async def List(self, request: pb.ListRequest, context: Any, call: _Call) -> pb.ListResponse:
        self._authorize(call, request.namespace or DEFAULT_NAMESPACE)
        infos = await self.store.list_contexts(request.namespace, request.model_id, request.limit)
        return pb.ListResponse(contexts=infos)

    @_unary("Stat")
    async def Stat(self, request: pb.StatRequest, context: Any, call: _Call) -> pb.StatResponse:
        self._authorize(call, request.namespace or WILDCARD)
        return await self.store.stat(request.namespace)

    async def _pin(self, request: pb.PinRequest, pinned: bool, call: _Call) -> pb.PinResponse:
        model, query = self._query(request.context, call)
        is_pinned, chunks = await asyncio.shield(self.store.set_pinned(model, query, pinned))
        return pb.PinResponse(pinned=is_pinned, chunks=chunks)

    @_unary("Pin")
    async def Pin(self, request: pb.PinRequest, context: Any, call: _Call) -> pb.PinResponse:
        return await self._pin(request, True, call)

    @_unary("Unpin")
    async def Unpin(self, request: pb.PinRequest, context: Any, call: _Call) -> pb.PinResponse:
        return await self._pin(request, False, call)

    # -- PutChunks -------------------------------------------------------------------------------

    def _add_part(
        self, part: pb.ChunkPart, n_chunks: int, blobs: dict[tuple[int, int, str], _Assembly]
    ) -> int:
        """Append one part to its blob; returns the bytes added. Raises ``RpcFailure`` on any violation."""
        where = f"chunk {part.chunk_index} " + (
            f"sidecar {part.sidecar!r}" if part.sidecar else f"level {part.level}"
        )
        if part.chunk_index >= n_chunks:
            raise _invalid(f"{where}: chunk_index out of range (the context has {n_chunks} full chunks)")
        if part.sidecar:
            try:
                check_sidecar_name(part.sidecar)
            except InvalidRequest as e:
                raise _invalid(f"{where}: {e}") from None
        elif part.level not in codec.LEVELS:
            raise _invalid(f"{where}: unknown level; levels are {list(codec.LEVELS)}")
        if len(part.data) > MAX_PART_BYTES:
            raise _invalid(f"{where}: part of {len(part.data)} bytes is larger than {MAX_PART_BYTES}")
        if part.total_size > self.config.max_blob_bytes:
            raise _invalid(
                f"{where}: blob of {part.total_size} bytes is larger than {self.config.max_blob_bytes}"
            )
        key = (part.chunk_index, 0 if part.sidecar else part.level, part.sidecar)
        asm = blobs.get(key)
        if asm is None:
            asm = blobs[key] = _Assembly(part.total_size)
        elif asm.total != part.total_size:
            raise _invalid(f"{where}: total_size changed from {asm.total} to {part.total_size}")
        elif len(asm.buf) == asm.total:
            raise _invalid(f"{where}: blob sent twice")
        if part.offset != len(asm.buf):
            raise _invalid(
                f"{where}: part at offset {part.offset}, expected {len(asm.buf)} (parts out of order)"
            )
        if part.offset + len(part.data) > asm.total:
            raise _invalid(
                f"{where}: part ends at {part.offset + len(part.data)}, past total_size {asm.total}"
            )
        if not part.data and asm.total:
            raise _invalid(f"{where}: empty part")
        asm.buf += part.data
        return len(part.data)

    @_unary("PutChunks", data_stream=True)
    async def PutChunks(self, request_iterator: Any, context: Any, call: _Call) -> pb.PutChunksResponse:
        try:
            return await self._put_chunks(request_iterator, call)
        finally:  # the call's blobs are freed: they no longer count against max_buffered_put_bytes
            self._buffered_put_bytes -= call.bytes_in

    async def _put_chunks(self, request_iterator: Any, call: _Call) -> pb.PutChunksResponse:
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            raise _invalid("empty PutChunks stream: send a PutHeader first") from None
        if first.WhichOneof("item") != "header":
            raise _invalid("the first PutChunks message must be a PutHeader")
        header = first.header
        model = self._model(header.model, call)
        hashes = self.store.context_hashes(model, list(header.token_ids.ids))
        if not hashes:
            raise _invalid(
                f"no full chunk: {len(header.token_ids.ids)} token ids < chunk_tokens {model.chunk_tokens}"
            )
        if header.name:
            check_context_name(header.name)
        quota = call.tenant.quota_bytes if call.tenant is not None else 0
        blobs: dict[tuple[int, int, str], _Assembly] = {}
        commit: pb.Commit | None = None
        async for msg in it:
            kind = msg.WhichOneof("item")
            if commit is not None:
                raise _invalid("no message may follow Commit")
            if kind == "part":
                added = self._add_part(msg.part, len(hashes), blobs)
                call.bytes_in += added
                self._buffered_put_bytes += added
                if self._buffered_put_bytes > self.config.max_buffered_put_bytes:
                    busy = (
                        f"this front end is buffering {self._buffered_put_bytes} bytes of uploads"
                        f" (max_buffered_put_bytes {self.config.max_buffered_put_bytes}); nothing was stored"
                    )
                    if call.bytes_in > self.config.max_buffered_put_bytes:  # would never fit
                        raise LimitExceeded(busy)
                    # Other uploads fill it: UNAVAILABLE sends the client on to another front end.
                    self.metrics.rejected.labels("buffered_puts").inc()
                    raise RpcFailure(grpc.StatusCode.UNAVAILABLE, f"front end busy: {busy}")
                if call.bytes_in > self.config.max_put_bytes:
                    raise LimitExceeded(f"PutChunks carries more than {self.config.max_put_bytes} bytes")
                if quota and call.bytes_in > quota:  # fail early instead of buffering a hopeless upload
                    raise LimitExceeded(
                        f"namespace {model.namespace!r}: upload of more than {quota} bytes exceeds"
                        f" quota_bytes {quota} by itself; nothing was stored"
                    )
            elif kind == "commit":
                commit = msg.commit
            else:
                raise _invalid("a second PutHeader" if kind == "header" else "an empty PutChunksRequest")
        if commit is None:
            raise _invalid("the stream ended without Commit; nothing was stored")
        chunks = [ChunkBlobs({}) for _ in hashes]
        for index, level, sidecar in sorted(blobs):
            asm = blobs.pop((index, level, sidecar))  # its buffer is freed once copied: one blob at a time
            if len(asm.buf) != asm.total:
                what = f"sidecar {sidecar!r}" if sidecar else f"level {level}"
                raise _invalid(f"chunk {index} {what}: got {len(asm.buf)} of {asm.total} bytes")
            if sidecar:
                chunks[index].sidecars[sidecar] = bytes(asm.buf)
            else:
                chunks[index].levels[level] = bytes(asm.buf)
        ttl = None if header.ttl_seconds == 0 else float(header.ttl_seconds)
        metadata = dict(commit.metadata)

        async def budget() -> int:
            return await self._quota_left(model.namespace, hashes[-1], quota)

        async def commit_put() -> PutResult:
            try:
                # The store checks the budget again under the namespace's lease, with its commit: two
                # uploads on two front ends that each fit cannot both pass.
                return await self.store.put(
                    model,
                    list(header.token_ids.ids),
                    chunks,
                    ttl=ttl,
                    pin=header.pin,
                    name=header.name,
                    metadata=metadata,
                    byte_budget=budget if quota else None,
                )
            except QuotaExceeded as e:
                raise LimitExceeded(
                    f"namespace {model.namespace!r} quota exceeded: {quota - e.budget} bytes stored in"
                    f" other contexts + {e.total_bytes} in this one > quota_bytes {quota};"
                    " nothing was committed"
                ) from None

        # Once validated, the commit runs to completion even if the client goes away: a half-written
        # commit would leave chunk records without their manifest.
        res = await asyncio.shield(commit_put())
        call.extra.update(chunks=res.stored_chunks, dedup=res.dedup_chunks)
        return pb.PutChunksResponse(
            context_id=res.context_id,
            stored_chunks=res.stored_chunks,
            stored_tokens=res.stored_tokens,
            bytes_written=res.bytes_written,
            dedup_chunks=res.dedup_chunks,
        )

    async def _quota_left(self, namespace: str, context_id: bytes, quota: int) -> int:
        """Bytes the context ``context_id`` may hold without taking ``namespace`` over ``quota``.

        Usage is the ``total_bytes`` of the namespace's other committed contexts (a chunk shared by
        several contexts counts in each: conservative); the context's own manifest after the put is
        checked against the rest by ``ChunkStore.put``, under the namespace's lease.
        """
        infos = await self.store.context_infos(namespace)
        return quota - sum(i.total_bytes for i in infos if i.context_id != context_id)

    # -- StreamContext ---------------------------------------------------------------------------

    async def _load(
        self, model: ModelKey, info: pb.ChunkInfo, level: int, sidecars: Sequence[str], cached: bool
    ) -> _Loaded | None:
        blob = await self.store.read_blob(model, info, level, cached=cached)
        if blob is None:
            return None
        extra = []
        for name in sidecars:
            if name in info.sidecars:
                data = await self.store.read_sidecar(model, info, name)
                if data is None:
                    return None
                extra.append((name, data))
        return _Loaded(info, level, blob, extra)

    @staticmethod
    def _parts(loaded: _Loaded, part_bytes: int) -> list[pb.StreamContextResponse]:
        info = loaded.info
        out = []
        for sidecar, blob in [("", loaded.blob), *loaded.sidecars]:
            offsets = range(0, max(len(blob), 1), part_bytes)
            for off in offsets:
                last = off + part_bytes >= len(blob)
                out.append(
                    pb.StreamContextResponse(
                        chunk=pb.ChunkData(
                            chunk_index=info.index,
                            level=0 if sidecar else loaded.level,
                            sidecar=sidecar,
                            total_size=len(blob),
                            offset=off,
                            data=blob[off : off + part_bytes],  # a one-part blob is not copied here
                            xxh3_64=xxhash.xxh3_64_intdigest(blob) if last else 0,
                            last=last,
                            token_start=info.token_start,
                            token_end=info.token_end,
                        )
                    )
                )
        return out

    @_streaming("StreamContext")
    async def StreamContext(self, request_iterator: Any, context: Any, call: _Call) -> AsyncIterator[Any]:
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            raise _invalid("empty StreamContext stream: send a StreamStart first") from None
        if first.WhichOneof("msg") != "start":
            raise _invalid("the first StreamContext message must be a StreamStart")
        start = first.start
        received = time.perf_counter()
        model = self._model(start.model, call)
        part_bytes = start.max_part_bytes or self.config.max_part_bytes
        if part_bytes > MAX_PART_BYTES:
            raise _invalid(f"max_part_bytes {part_bytes} is larger than {MAX_PART_BYTES}")
        for name in start.sidecars:
            check_sidecar_name(name)
        which = start.WhichOneof("query")
        if which == "token_ids":
            res = await self.store.lookup(model, token_ids=list(start.token_ids.ids))
        elif which == "chunk_hashes":
            res = await self.store.lookup(model, hashes=list(start.chunk_hashes.hashes))
        else:
            raise _invalid("StreamStart needs token_ids or chunk_hashes")
        end = (
            len(res.chunks)
            if not start.max_chunks
            else min(len(res.chunks), start.start_chunk + start.max_chunks)
        )
        chunks = res.chunks[start.start_chunk : end]
        policy = make_policy(start, chunks, received)
        yield pb.StreamContextResponse(
            header=pb.StreamHeader(
                prefix_chunks=res.prefix_chunks,
                prefix_tokens=res.prefix_tokens,
                chunks=chunks,
                chunk_tokens=res.chunk_tokens,
            )
        )

        async def read_reports() -> None:
            # Runs beside the send loop so throughput reports reach the policy while chunks flow.
            async for msg in it:
                if msg.WhichOneof("msg") != "report":
                    raise _invalid("only ThroughputReport messages may follow the StreamStart")
                report = msg.report
                if not (math.isfinite(report.bytes_per_second) and math.isfinite(report.decode_seconds)):
                    raise _invalid("ThroughputReport bytes_per_second and decode_seconds must be finite")
                policy.observe(report)

        def check_reports() -> None:
            # A protocol error on the request side ends the stream with that error, not silently.
            if reports.done() and not reports.cancelled() and (exc := reports.exception()) is not None:
                raise exc

        reports = asyncio.create_task(read_reports())
        sidecars = list(start.sidecars)
        cached = not start.from_storage

        def load(pos: int, level: int) -> tuple[int, int, asyncio.Task[_Loaded | None]]:
            return pos, level, asyncio.create_task(self._load(model, chunks[pos], level, sidecars, cached))

        def read_ahead(pos: int) -> tuple[int, int, asyncio.Task[_Loaded | None]] | None:
            # The chunk the policy expects next, at the level it expects (nothing for a recompute marker).
            if pos >= len(chunks) or (level := policy.guess(chunks[pos])) == RECOMPUTE:
                return None
            return load(pos, level)

        sent, reason, cause = 0, "", ""  # cause: the bounded metric label of ``reason``
        send_rate = 0.0  # bytes/s measured over the previous chunks (flow control included)
        # Storage read-ahead of the next chunk at the level the policy expects: (position, level, task).
        pending = read_ahead(0)
        try:
            for i, info in enumerate(chunks):
                check_reports()
                await policy.pace()
                level = policy.choose(info)  # decided only now, from everything measured so far
                if level == RECOMPUTE:
                    # No bytes: the client prefills these tokens itself (sidecars are skipped too).
                    yield pb.StreamContextResponse(
                        chunk=pb.ChunkData(
                            chunk_index=info.index,
                            recompute=True,
                            last=True,
                            token_start=info.token_start,
                            token_end=info.token_end,
                        )
                    )
                    policy.sent(info, RECOMPUTE, 0, 0.0)
                    sent += 1
                    continue
                if pending is None or pending[:2] != (i, level):
                    if pending is not None:
                        pending[2].cancel()
                    pending = load(i, level)
                task = pending[2]
                remaining = context.time_remaining()
                try:
                    timeout = None if remaining is None else max(remaining - _DEADLINE_FLOOR_S, 0.0)
                    loaded = await asyncio.wait_for(asyncio.shield(task), timeout)
                except TimeoutError:
                    reason, cause = f"deadline: stopped before chunk {info.index}", "deadline"
                    break
                pending = read_ahead(i + 1)
                if loaded is None:
                    reason, cause = f"chunk {info.index}: missing or corrupt", "missing_or_corrupt"
                    break
                size = len(loaded.blob) + sum(len(d) for _, d in loaded.sidecars)
                remaining = context.time_remaining()
                if remaining is not None:
                    need = _DEADLINE_FLOOR_S + (1.5 * size / send_rate if send_rate else 0.0)
                    if remaining < need:
                        reason, cause = f"deadline: stopped before chunk {info.index}", "deadline"
                        break
                t0 = time.perf_counter()
                for msg in self._parts(loaded, part_bytes):
                    yield msg
                seconds = time.perf_counter() - t0
                call.bytes_out += size
                self.metrics.sent_level_bytes.labels(str(loaded.level)).inc(len(loaded.blob))
                send_rate = size / max(seconds, 1e-6)
                policy.sent(info, level, size, seconds)
                sent += 1
        except BaseException:
            reports.cancel()
            raise
        finally:
            if pending is not None:
                pending[2].cancel()
        if reason:
            self.metrics.streams_truncated.labels(cause).inc()
        call.extra.update(chunks=sent, truncated=bool(reason))
        yield pb.StreamContextResponse(
            trailer=pb.StreamTrailer(
                verified_chunks=sent,
                verified_tokens=sent * res.chunk_tokens,
                truncated=bool(reason),
                reason=reason,
            )
        )
        # Let the client half-close before the call ends: a throughput report still in flight when
        # the server finishes would fail the client's whole call (INTERNAL) despite our OK status.
        try:
            await asyncio.wait_for(reports, _HALF_CLOSE_WAIT_S)
        except (TimeoutError, asyncio.CancelledError):
            reports.cancel()


# ----- server -----------------------------------------------------------------------------------


class TlsCertificates:
    """The server's TLS files (``tls_cert``/``tls_key``, and ``tls_client_ca`` for mutual TLS), reloadable.

    ``credentials()`` are dynamic: gRPC asks :meth:`_fetch` at every new handshake, which hands over a
    configuration staged by :meth:`reload` once; established connections keep theirs. Files are checked
    with :mod:`ssl` (PEM parses, the key matches the certificate) before they are staged, so a bad file is
    an error for the reload, never for the next client's handshake.
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self._initial = self._load()
        self._staged: grpc.ServerCertificateConfiguration | None = None
        self._lock = threading.Lock()  # _fetch runs on gRPC's threads

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cfg = self.config
        check = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            check.load_cert_chain(cfg.tls_cert, cfg.tls_key)
            if cfg.tls_client_ca:
                check.load_verify_locations(cfg.tls_client_ca)
        except ssl.SSLError as e:
            files = f"{cfg.tls_cert} / {cfg.tls_key} / {cfg.tls_client_ca or '-'}"
            raise OSError(f"TLS files {files}: {e}") from None
        ca = Path(cfg.tls_client_ca).read_bytes() if cfg.tls_client_ca else None
        pair = (Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=bool(self.config.tls_client_ca)
        )

    def reload(self) -> None:
        """Re-read the files for every later handshake; raises ``OSError`` (nothing staged) if bad."""
        staged = self._load()
        with self._lock:
            self._staged = staged

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        with self._lock:
            staged, self._staged = self._staged, None
        return staged


class KVStreamServer:
    """One kvstream server: gRPC (KVStream, health, reflection) plus an optional /metrics endpoint.

    ``backend`` overrides ``config.backend`` (tests pass an open backend). ``start()`` binds
    ``config.listen`` (port 0 = any free port; the bound one is in ``port``).
    """

    def __init__(self, config: ServerConfig, backend: StorageBackend | None = None) -> None:
        self.config = config
        self.metrics = Metrics()
        self.backend = backend if backend is not None else open_backend(config.backend)
        self.store = ChunkStore(
            self.backend,
            default_ttl=config.default_ttl,
            metrics=self.metrics,
            max_blob_bytes=config.max_blob_bytes,
            max_context_chunks=config.max_context_chunks,
            hot_cache_bytes=config.hot_cache_bytes,
        )
        self.health = health.aio.HealthServicer()
        self.port = 0
        self.metrics_port = 0
        self._servicer: KVStreamServicer | None = None
        self._tls: TlsCertificates | None = None
        self._server: grpc.aio.Server | None = None
        self._http: Any = None
        self._health_task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        host = self.config.listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def reload(self) -> bool:
        """Re-read the token file and the TLS files, where configured (``kvstore serve`` does on SIGHUP).

        Rotates or revokes tokens and certificates without a restart: later requests use the new token
        table, later TLS handshakes the new certificates. Anything that does not load keeps what is
        running (logged), so a typo never locks every tenant out. Returns whether everything loaded.
        """
        ok = True
        if self.config.auth_tokens:
            ok = self._reload_tokens()
        if self._tls is not None:
            try:
                self._tls.reload()
                log.info("reload tls_cert=%s", self.config.tls_cert)
            except OSError as e:
                log.error("reload TLS failed, keeping the running certificates: %s", e)
                ok = False
        return ok

    def _reload_tokens(self) -> bool:
        path = self.config.auth_tokens
        if self._servicer is None:
            return False
        try:
            tokens = TokenTable.from_file(path, allow_empty=True)  # emptied: every token revoked
        except (OSError, ValueError) as e:
            kept = len(self._servicer.tokens or ())
            log.error("reload tokens=%s failed, keeping the previous %d tokens: %s", path, kept, e)
            return False
        self._servicer.tokens = tokens
        log.info("reload tokens=%s entries=%d", path, len(tokens))
        if not len(tokens):
            log.warning("reload tokens=%s lists no token: every request is rejected until it does", path)
        return True

    async def start(self) -> None:
        cfg = self.config
        options = [
            ("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes),
            ("grpc.max_concurrent_streams", cfg.max_concurrent_streams),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options, maximum_concurrent_rpcs=cfg.max_concurrent_rpcs)
        tokens = TokenTable.from_file(cfg.auth_tokens) if cfg.auth_tokens else None
        if tokens is not None and not cfg.tls_cert:
            log.warning(
                "auth tokens=%d without TLS: bearer tokens cross the network in clear text", len(tokens)
            )
        servicer = KVStreamServicer(self.store, cfg, self.metrics, tokens)
        self._servicer = servicer
        pb_grpc.add_KVStreamServicer_to_server(servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            self._tls = TlsCertificates(cfg) if cfg.tls_cert else None
            self.port = (
                server.add_insecure_port(cfg.listen)
                if self._tls is None
                else server.add_secure_port(cfg.listen, self._tls.credentials())
            )
        except RuntimeError as e:
            raise OSError(f"cannot listen on {cfg.listen}: {e}") from None
        if self.port == 0:
            raise OSError(f"cannot listen on {cfg.listen}")
        await server.start()
        self._server = server
        await self._probe()
        self._health_task = asyncio.create_task(self._health_loop())
        if cfg.metrics_port:
            try:
                self._http, self.metrics_port = self.metrics.serve_http(cfg.metrics_port, cfg.metrics_addr)
            except OSError as e:
                await self.stop(0)  # the gRPC port is open already: close it (and the backend)
                raise OSError(f"cannot serve metrics on {cfg.metrics_addr}:{cfg.metrics_port}: {e}") from None

    async def _probe(self) -> None:
        """One backend probe: sets health and refreshes the store gauges."""
        try:
            async with asyncio.timeout(max(self.config.health_interval, 1.0)):
                await self.backend.ping()
                stats = await self.backend.stats()
            self.metrics.store_used_bytes.set(stats.used_bytes)
            self.metrics.store_keys.set(stats.keys)
            self.metrics.store_evictions.set(stats.evictions)
            self.metrics.store_partial_read_failures.set(stats.partial_read_failures)
            status = health_pb2.HealthCheckResponse.SERVING
            self.metrics.backend_up.set(1)
        except Exception as e:  # noqa: BLE001 - anything a probe raises means the backend cannot serve
            reason = str(e) or f"{type(e).__name__} (no answer within the probe timeout)"
            log.warning("health backend=%s status=NOT_SERVING reason=%r", self.backend.name, reason)
            status = health_pb2.HealthCheckResponse.NOT_SERVING
            self.metrics.backend_up.set(0)
        for name in ("", SERVICE_NAME):
            await self.health.set(name, status)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            await self._probe()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting RPCs, let in-flight ones finish for ``grace`` seconds, close the backend."""
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await self.health.enter_graceful_shutdown()
        if self._server is not None:
            await self._server.stop(self.config.grace_seconds if grace is None else grace)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        await self.backend.close()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()
