"""The sparse-recall backends on top of the kvstream service: indexes stored as sidecars, KV rows on demand.

* **Index build, once per stored context, where the context is stored** (preloading operator or storing
  worker, never the inference node): :func:`build_sidecars` / :func:`build_and_store_indexes` build each
  backend's :class:`~client.sparse.base.SparseIndex` over exactly the stored full-chunk prefix and upload
  it as the sidecar ``sparse.<backend>`` of the context's **last** chunk. The context id is the last
  chunk's key, a hash chained over the whole token prefix, so that sidecar belongs to exactly this context.
  Indexes are per context, not per chunk: ShadowKV's SVD and landmarks outliers, PQCache's codebooks,
  ClusterKV's clusters and ALISA's importance all span the whole context.
* **Index fetch instead of build** on the inference node: :func:`fetch_index` (asyncio client) or
  :meth:`ServiceChunkFetcher.fetch_index` (blocking) stream only the last chunk with its sidecar.
* **KV rows on demand**: :class:`ServiceChunkFetcher` reads the stored KV in ranged ``StreamContext``
  requests (adjacent chunks coalesced into one stream), decodes and LRU-caches whole chunks, and serves
  token rows; :meth:`ServiceChunkFetcher.for_backend` / :meth:`~ServiceChunkFetcher.attach` turn it into a
  backend's pluggable ``fetch(layer, name, rows)`` (run on the backend's :class:`Prefetcher` threads).
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch

import codec
from client.api import AsyncKVCacheClient, KVStreamError, StoreResult, _BlobAssembler
from client.sparse.alisa import quantize_with
from client.sparse.base import DecodeState, SparseIndex, get_backend
from client.sparse.prefetch import FetchFn
from kvstore.keys import ModelKey, token_array
from kvstore.rpc import pb, pb_grpc
from kvstore.wire import DEFAULT_PART_BYTES, model_to_pb

SIDECAR_PREFIX = "sparse."  # the store allows [A-Za-z0-9._-] in sidecar names (no "/")
DEFAULT_BACKENDS = ("shadowkv", "pqcache", "clusterkv", "alisa")
DEFAULT_CACHE_BYTES = 64 << 20
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 8 << 20), ("grpc.max_send_message_length", 8 << 20)]


class IndexUnavailable(LookupError):
    """The service has no usable index: context not stored, no such sidecar, or it failed verification."""


def sidecar_name(backend: str) -> str:
    """Name of the sidecar holding ``backend``'s index: ``sparse.<backend>``."""
    return SIDECAR_PREFIX + backend


def _stored_chunks(model: ModelKey, token_ids: Sequence[int] | np.ndarray) -> int:
    n = len(token_array(token_ids)) // model.chunk_tokens
    if n == 0:
        raise ValueError(f"no full chunk: need at least {model.chunk_tokens} token ids")
    return n


# ----- build and store ------------------------------------------------------------------------------


def build_sidecars(
    model: ModelKey,
    token_ids: Sequence[int] | np.ndarray,
    kv: torch.Tensor,
    backends: Iterable[str] = DEFAULT_BACKENDS,
    *,
    queries: torch.Tensor | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    rope_theta: float = 10000.0,
    device: torch.device | str = "cpu",
) -> list[dict[str, bytes]]:
    """Per-chunk sidecars for ``client.store(..., sidecars=...)``: every backend's serialised index on the
    last full chunk, nothing on the others.

    ``kv`` ``[layers, 2, >= stored tokens, kv_heads, head_dim]`` (post-RoPE keys, any float dtype) is cut
    to the stored prefix (the full chunks of ``token_ids``) before building, as are ``queries``
    ``[layers, >= stored tokens, n_heads, head_dim]`` (post-RoPE, from position 0; ALISA needs them).
    ``params`` holds per-backend constructor arguments; decode with a backend built with the same ones.
    """
    n_chunks = _stored_chunks(model, token_ids)
    n = n_chunks * model.chunk_tokens
    if kv.dim() != 5 or kv.shape[1] != 2 or kv.shape[2] < n:
        raise ValueError(f"kv must be [layers, 2, >= {n} tokens, kv_heads, head_dim], got {tuple(kv.shape)}")
    if queries is not None and queries.shape[1] < n:
        raise ValueError(f"queries cover {queries.shape[1]} positions, the stored prefix {n}")
    kv_p = kv[:, :, :n]
    q_p = queries[:, :n] if queries is not None else None
    last: dict[str, bytes] = {}
    for name in backends:
        backend = get_backend(
            name, 1.0, device=device, rope_theta=rope_theta, **dict((params or {}).get(name, {}))
        )
        last[sidecar_name(name)] = backend.build_index(kv_p, q_p).to_bytes()
    return [{} for _ in range(n_chunks - 1)] + [last]


async def build_and_store_indexes(
    client: AsyncKVCacheClient,
    model: ModelKey | str,
    token_ids: Sequence[int] | np.ndarray,
    kv: torch.Tensor,
    backends: Iterable[str] = DEFAULT_BACKENDS,
    *,
    queries: torch.Tensor | None = None,
    params: Mapping[str, Mapping[str, Any]] | None = None,
    rope_theta: float = 10000.0,
    levels: Iterable[int] | None = None,
    pin: bool = False,
    device: torch.device | str = "cpu",
) -> StoreResult:
    """Build each backend's index once and store it as sidecar ``sparse.<backend>`` of the last chunk.

    Arguments as in :func:`build_sidecars`. A put must carry a codec level for every chunk, so the KV is
    encoded too: if the context is already committed, at exactly the levels its manifest lists (the
    server keeps its existing blobs, content-addressed, and the manifest's byte counts stay complete)
    and keeping its name, metadata and remaining TTL; otherwise at ``levels`` (default: every level).
    Chunk records merge, so sidecars stored earlier stay. Returns the put's result.
    """
    mk = client.model(model)
    sidecars = build_sidecars(
        mk, token_ids, kv, backends, queries=queries, params=params, rope_theta=rope_theta, device=device
    )
    n = len(sidecars) * mk.chunk_tokens
    ttl: float | None = None
    metadata: dict[str, str] = {}
    try:
        info = await client.get_context(mk, token_array(token_ids)[:n])
        levels = [lv.level for lv in info.level_bytes]
        metadata = dict(info.metadata)
        ttl = info.ttl_seconds if info.ttl_seconds > 0 else None
    except KVStreamError as e:
        if e.code != grpc.StatusCode.NOT_FOUND:
            raise
    blobs = codec.encode_context(
        kv[:, :, :n].to(getattr(torch, mk.dtype)), mk.chunk_tokens, tuple(levels or codec.LEVELS)
    )
    return await client.store(
        mk, token_ids, blobs=blobs, sidecars=sidecars, pin=pin, ttl=ttl, metadata=metadata
    )


# ----- index fetch ----------------------------------------------------------------------------------


def _index_request(
    model: ModelKey, token_ids: Sequence[int] | np.ndarray, backend: str, part_bytes: int
) -> Any:
    """StreamStart for the last stored chunk only, with ``backend``'s sidecar, at the smallest level (the
    server always sends one codec blob with a chunk; it is read and dropped)."""
    n_chunks = _stored_chunks(model, token_ids)
    return pb.StreamStart(
        model=model_to_pb(model),
        token_ids=pb.TokenIds(ids=token_array(token_ids).tolist()),
        start_chunk=n_chunks - 1,
        max_chunks=1,
        policy=pb.LEVEL_POLICY_FIXED,
        level=max(codec.LEVELS),
        sidecars=[sidecar_name(backend)],
        max_part_bytes=part_bytes,
    )


class _IndexReader:
    """Consumes the response stream of :func:`_index_request` and yields the verified index."""

    def __init__(self, backend: str, chunk_index: int) -> None:
        self.backend = backend
        self.name = sidecar_name(backend)
        self.chunk_index = chunk_index
        self.assembler = _BlobAssembler()
        self.header: pb.StreamHeader | None = None
        self.reason = ""
        self.blob: bytes | None = None

    def feed(self, resp: pb.StreamContextResponse) -> None:
        kind = resp.WhichOneof("msg")
        if kind == "header":
            self.header = resp.header
        elif kind == "chunk":
            if resp.chunk.chunk_index != self.chunk_index:
                raise KVStreamError(grpc.StatusCode.DATA_LOSS, f"asked for chunk {self.chunk_index} only")
            blob = self.assembler.add(resp.chunk)  # checks every blob's xxh3 end to end
            if blob is not None and resp.chunk.sidecar == self.name:
                self.blob = blob
        elif kind == "trailer":
            self.reason = resp.trailer.reason

    def result(self) -> SparseIndex:
        where = f"{self.backend} index of the context ending at chunk {self.chunk_index}"
        if self.header is None:
            raise KVStreamError(grpc.StatusCode.DATA_LOSS, "stream ended without a header")
        if self.header.prefix_chunks <= self.chunk_index:
            raise IndexUnavailable(
                f"{where}: context not stored (only {self.header.prefix_chunks} of its "
                f"{self.chunk_index + 1} chunks are committed)"
            )
        stored = list(self.header.chunks[0].sidecars) if self.header.chunks else []
        if self.name not in stored:
            raise IndexUnavailable(f"{where}: no sidecar {self.name!r} (stored sidecars: {stored})")
        if self.blob is None:
            raise IndexUnavailable(f"{where}: the server could not read it ({self.reason or 'no data'})")
        index = SparseIndex.from_bytes(self.blob)  # SidecarError on a damaged blob, never a wrong index
        if index.backend != self.backend:
            raise IndexUnavailable(f"{where}: sidecar {self.name!r} holds a {index.backend!r} index")
        return index


async def fetch_index(
    client: AsyncKVCacheClient, model: ModelKey | str, token_ids: Sequence[int] | np.ndarray, backend: str
) -> SparseIndex:
    """Fetch ``backend``'s index of the context ``token_ids`` (its full chunks) from the service.

    One ``StreamContext`` for the last chunk with the sidecar ``sparse.<backend>``; parts are reassembled
    and checked (xxh3) and the sidecar's own checksum verified. Raises :class:`IndexUnavailable` when the
    context or its index is not stored (or failed the server's verification), ``SidecarError`` on damaged
    bytes, ``KVStreamError`` on transport errors (after trying every address).
    """
    mk = client.model(model)
    start = _index_request(mk, token_ids, backend, client.part_bytes)
    last: KVStreamError | None = None
    for address in client.addresses:
        reader = _IndexReader(backend, start.start_chunk)
        call = client._stub(address).StreamContext(timeout=client.timeout)
        try:
            await call.write(pb.StreamContextRequest(start=start))
            await call.done_writing()
            while (resp := await call.read()) is not grpc.aio.EOF:
                reader.feed(resp)
        except grpc.aio.AioRpcError as err:
            last = KVStreamError(err.code(), err.details() or "")
            if err.code() == grpc.StatusCode.UNAVAILABLE:
                continue
            raise last from None
        finally:
            if not call.done():
                call.cancel()
        return reader.result()
    assert last is not None
    raise last


# ----- KV rows on demand ----------------------------------------------------------------------------


@dataclass
class FetcherStats:
    """What a :class:`ServiceChunkFetcher` moved: streams opened, chunks and bytes received, cache use."""

    requests: int = 0
    chunks: int = 0
    bytes: int = 0
    cache_hits: int = 0
    levels: Counter[int] = field(default_factory=Counter)  # chunks received per codec level


@dataclass(frozen=True)
class RowLayout:
    """How a backend's offloaded tensor ``[S = kv_heads, N, ...]`` maps to stored KV.

    Row ``r`` of head ``s`` is ``unit`` consecutive tokens ``r * unit + j`` (or, with ``order``
    ``[layers, kv_heads, N]``, token ``order[layer, s, r]``), each contributing the ``parts`` (0 = keys,
    1 = values) concatenated along the last dim: a row is ``unit * len(parts) * head_dim`` floats.
    With ``heads > 0`` the tensor is ``[1, N, heads * unit * len(parts) * head_dim]``: one row holds every
    KV head (ALISA's selection shared by all heads). With ``quant`` = ``(scale, zero)`` ``[layers, C]``
    the rows are quantised to int8 exactly as local mode derives them from its own KV
    (:func:`client.sparse.alisa.quantize_with`).
    ``uses`` names the index tensors the layout reads (a remote-backed state keeps them).
    """

    parts: tuple[int, ...]
    unit: int = 1
    order: torch.Tensor | None = None
    heads: int = 0
    quant: tuple[torch.Tensor, torch.Tensor] | None = None
    bits: int = 8
    uses: tuple[str, ...] = ()

    def n_rows(self, layer: int, n_tokens: int) -> int:
        """Rows backed by the stored context (later rows, e.g. ClusterKV's absorbed generated tokens,
        live only on the inference node)."""
        return int(self.order.shape[-1]) if self.order is not None else n_tokens // self.unit

    def tokens(self, layer: int, rows: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """Token positions ``[S, n, unit]`` int64 of ``rows`` ``[S, n]`` (-1 for padding / node-only rows)."""
        rows = rows.to("cpu", torch.int64)
        ok = (rows >= 0) & (rows < self.n_rows(layer, n_tokens))
        r = torch.where(ok, rows, 0)
        if self.order is not None:
            tok = self.order[layer].to(torch.int64).gather(1, r)[:, :, None]
        else:
            tok = r[:, :, None] * self.unit + torch.arange(self.unit)
        return torch.where(ok[:, :, None], tok, -1)

    def read(self, fetcher: ServiceChunkFetcher, layer: int, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` ``[S, n]`` of ``layer`` from the service: ``[S, n, row]`` (float32, or int8 with
        ``quant``); padding and node-only rows come back with arbitrary content."""
        tok = self.tokens(layer, rows, fetcher.n_tokens)
        if self.heads:
            tok = tok.expand(self.heads, -1, -1)  # the shared row's tokens, for every head
        out = fetcher.gather(layer, tok, self.parts)
        if self.heads:
            out = out.transpose(0, 1).flatten(1)[None]  # per token: heads side by side (n may be 0)
        if self.quant is not None:
            scale, zero = self.quant
            out = quantize_with(out, scale[layer], zero[layer], self.bits)
        return out


def row_layouts(index: SparseIndex) -> dict[str, RowLayout]:
    """The offloaded tensors of ``index.backend`` that the stored KV can serve, by ``fetch`` name.

    Mirrors the backends' ``_prefill_layer`` host layouts (ShadowKV ``v``: values of ``chunk``-token
    chunks; PQCache ``kv``: K|V per token; ClusterKV ``kv``: K|V in cluster order; ALISA ``kv_q``: K|V of
    every head per token, re-quantised with the index's ``scale``/``zero``); tests compare them with the host
    store bit for bit. Not listed (served by the node's own store): PQCache's prefetched ``codes`` (index
    data) and ClusterKV's absorbed generated tokens (rows past the stored context).
    """
    if index.backend == "shadowkv":
        return {"v": RowLayout((1,), unit=int(index.params["chunk"]))}
    if index.backend == "pqcache":
        return {"kv": RowLayout((0, 1))}
    if index.backend == "clusterkv":
        return {"kv": RowLayout((0, 1), order=index.tensors["order"], uses=("order",))}
    if index.backend == "alisa":
        heads, bits = int(index.params["kv_heads"]), int(index.params["kv_bits"])
        if bits == 32:  # kv_bits=None: ALISA attends float32 rows, exactly the stored ones
            return {"kv_q": RowLayout((0, 1), heads=heads)}
        quant = (index.tensors["scale"], index.tensors["zero"])
        return {"kv_q": RowLayout((0, 1), heads=heads, quant=quant, bits=bits, uses=("scale", "zero"))}
    return {}


class RemoteFetch:
    """A backend's ``fetch(layer, name, rows)`` (see :data:`~client.sparse.prefetch.FetchFn`) that reads
    stored KV through a :class:`ServiceChunkFetcher` and everything else through ``local``
    (a :class:`~client.sparse.base.RemoteRows`)."""

    def __init__(
        self, fetcher: ServiceChunkFetcher, layouts: Mapping[str, RowLayout], local: FetchFn | None = None
    ) -> None:
        self.fetcher = fetcher
        self.layouts = dict(layouts)
        self.local = local

    def serves(self, name: str) -> bool:
        """Whether rows of ``name`` (within the stored context) come from the service."""
        return name in self.layouts

    @property
    def index_tensors(self) -> frozenset[str]:
        return frozenset(n for layout in self.layouts.values() for n in layout.uses)

    @property
    def cached_bytes(self) -> int:
        return self.fetcher.cached_bytes

    def _local(self, layer: int, name: str, rows: torch.Tensor) -> torch.Tensor:
        if self.local is None:
            raise KeyError(f"{name!r} rows of layer {layer} are not stored KV and no local fetch is set")
        return self.local(layer, name, rows)

    def __call__(self, layer: int, name: str, rows: torch.Tensor) -> torch.Tensor:
        layout = self.layouts.get(name)
        if layout is None:
            return self._local(layer, name, rows)
        out = layout.read(self.fetcher, layer, rows)
        node_only = rows.to("cpu") >= layout.n_rows(layer, self.fetcher.n_tokens)
        if bool(node_only.any()):
            there = self._local(layer, name, torch.where(node_only, rows.to("cpu"), -1))
            out = torch.where(node_only[:, :, None], there.to(out.dtype), out)
        return out


class ServiceChunkFetcher:
    """Blocking, thread-safe reader of one stored context's KV rows, chunk-granular, with an LRU cache.

    ``addresses``: one or more equivalent front ends (tried in order when one is unavailable); ``model``
    and ``token_ids`` name the context (its full chunks); chunks come at codec ``level`` (the server falls
    back to the nearest stored level; :attr:`stats` ``.levels`` says what arrived). Decoded chunks
    ``[layers, 2, chunk_tokens, kv_heads, head_dim]`` (stored dtype) are kept up to ``cache_bytes``, least
    recently used evicted first; a blob spans every layer, so one fetch serves all layers.
    ``interceptors`` are gRPC client interceptors added to the channels (tracing, tests).
    """

    def __init__(
        self,
        addresses: str | Sequence[str],
        model: ModelKey,
        token_ids: Sequence[int] | np.ndarray,
        *,
        level: int = codec.LOSSLESS,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        timeout: float = 30.0,
        part_bytes: int = DEFAULT_PART_BYTES,
        interceptors: Sequence[Any] = (),
    ) -> None:
        if level not in codec.LEVELS:
            raise ValueError(f"unknown level {level}; levels are {list(codec.LEVELS)}")
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        if not self.addresses:
            raise ValueError("at least one server address is required")
        self.model = model
        self.token_ids = token_array(token_ids)
        self.n_chunks = _stored_chunks(model, self.token_ids)
        self.n_tokens = self.n_chunks * model.chunk_tokens
        self.level = level
        self.cache_bytes = cache_bytes
        self.timeout = timeout
        self.part_bytes = part_bytes
        self.stats = FetcherStats()
        self._raw = [grpc.insecure_channel(a, options=_CHANNEL_OPTIONS) for a in self.addresses]
        self._stubs = [pb_grpc.KVStreamStub(grpc.intercept_channel(ch, *interceptors)) for ch in self._raw]
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._cached_bytes = 0
        self._inflight: dict[int, Future[torch.Tensor]] = {}

    # -- transport ---------------------------------------------------------------------------------------

    def _stream(self, start: Any) -> Iterator[pb.StreamContextResponse]:
        """Responses of one StreamContext, on the first address that is available."""
        last: grpc.RpcError | None = None
        for stub in self._stubs:
            try:
                # Read whole before using any of it, so a failover to the next address starts clean.
                responses = list(
                    stub.StreamContext(iter([pb.StreamContextRequest(start=start)]), timeout=self.timeout)
                )
            except grpc.RpcError as err:
                last = err
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    continue
                raise KVStreamError(err.code(), err.details() or "") from None
            with self._lock:
                self.stats.requests += 1
            return iter(responses)
        assert last is not None
        raise KVStreamError(last.code(), last.details() or "")

    def fetch_index(self, backend: str) -> SparseIndex:
        """Blocking twin of :func:`fetch_index` for this fetcher's context."""
        start = _index_request(self.model, self.token_ids, backend, self.part_bytes)
        reader = _IndexReader(backend, start.start_chunk)
        for resp in self._stream(start):
            reader.feed(resp)
        return reader.result()

    def _fetch_run(self, first: int, count: int) -> dict[int, torch.Tensor]:
        """Decode chunks ``[first, first + count)``, received in one ranged stream."""
        start = pb.StreamStart(
            model=model_to_pb(self.model),
            token_ids=pb.TokenIds(ids=self.token_ids[: self.n_tokens].tolist()),
            start_chunk=first,
            max_chunks=count,
            policy=pb.LEVEL_POLICY_FIXED,
            level=self.level,
            max_part_bytes=self.part_bytes,
        )
        assembler = _BlobAssembler()
        out: dict[int, torch.Tensor] = {}
        reason = ""
        for resp in self._stream(start):
            kind = resp.WhichOneof("msg")
            if kind == "chunk" and not resp.chunk.sidecar:
                msg = resp.chunk
                if not first <= msg.chunk_index < first + count or msg.chunk_index in out:
                    raise KVStreamError(grpc.StatusCode.DATA_LOSS, f"unexpected chunk {msg.chunk_index}")
                blob = assembler.add(msg)
                if blob is not None:
                    out[msg.chunk_index] = codec.decode(blob)
                    with self._lock:
                        self.stats.chunks += 1
                        self.stats.bytes += len(blob)
                        self.stats.levels[msg.level] += 1
            elif kind == "trailer":
                reason = resp.trailer.reason
        if len(out) != count:
            missing = sorted(set(range(first, first + count)) - set(out))
            raise KVStreamError(
                grpc.StatusCode.DATA_LOSS, f"chunks {missing} not received ({reason or 'not stored'})"
            )
        return out

    # -- chunks ------------------------------------------------------------------------------------------

    def _insert(self, index: int, chunk: torch.Tensor) -> None:
        """Cache a decoded chunk (caller holds the lock), evicting least recently used ones."""
        self._cache[index] = chunk
        self._cached_bytes += chunk.numel() * chunk.element_size()
        while self._cached_bytes > self.cache_bytes and self._cache:
            _, old = self._cache.popitem(last=False)
            self._cached_bytes -= old.numel() * old.element_size()

    def chunks(self, indices: Iterable[int]) -> dict[int, torch.Tensor]:
        """Decoded chunks ``[layers, 2, chunk_tokens, kv_heads, head_dim]`` by index; the missing ones are
        requested in one ranged stream per run of adjacent indices. Concurrent callers share fetches."""
        want = sorted(set(indices))
        if want and not 0 <= want[0] <= want[-1] < self.n_chunks:
            raise IndexError(f"chunk indices {want[0]}..{want[-1]} outside the context's {self.n_chunks}")
        out: dict[int, torch.Tensor] = {}
        waiting: dict[int, Future[torch.Tensor]] = {}
        mine: dict[int, Future[torch.Tensor]] = {}
        with self._lock:
            for i in want:
                if i in self._cache:
                    self._cache.move_to_end(i)
                    out[i] = self._cache[i]
                    self.stats.cache_hits += 1
                elif i in self._inflight:
                    waiting[i] = self._inflight[i]
                else:
                    mine[i] = self._inflight[i] = Future()
        try:
            for first, count in _runs(list(mine)):
                got = self._fetch_run(first, count)
                with self._lock:
                    for i, chunk in got.items():
                        self._insert(i, chunk)
                        del self._inflight[i]
                        mine.pop(i).set_result(chunk)
                out.update(got)
        except BaseException as exc:
            with self._lock:
                for i, fut in mine.items():
                    self._inflight.pop(i, None)
                    fut.set_exception(exc)
            raise
        for i, fut in waiting.items():
            out[i] = fut.result()
        return out

    def gather(self, layer: int, tokens: torch.Tensor, parts: Sequence[int] = (0, 1)) -> torch.Tensor:
        """Stored KV of token positions ``tokens`` ``[S = kv_heads, n, u]`` int64 (``-1`` = padding, read
        as zeros) of ``layer``: ``[S, n, u * len(parts) * head_dim]`` float32 (per token, the ``parts``
        (0 = keys, 1 = values) side by side; head ``s`` of row ``s``)."""
        if tokens.dim() != 3:
            raise ValueError(f"tokens must be [kv_heads, n, u], got {tuple(tokens.shape)}")
        tok = tokens.to("cpu", torch.int64)
        valid = tok >= 0
        if bool((tok >= self.n_tokens).any()):
            raise IndexError(f"token {int(tok.max())} is outside the stored {self.n_tokens} tokens")
        c = self.model.chunk_tokens
        ids = torch.unique(tok[valid] // c)
        chunks = self.chunks(ids.tolist() if ids.numel() else [0])  # [0]: learn the shape when all padding
        order = sorted(chunks)
        stacked = torch.stack([chunks[i][layer] for i in order])[:, list(parts)]  # [m, P, c, Hkv, D]
        if tok.shape[0] != stacked.shape[3]:
            raise ValueError(f"tokens have {tok.shape[0]} rows, the KV {stacked.shape[3]} heads")
        stacked = stacked.permute(0, 2, 3, 1, 4)  # [m, c, Hkv, P, D]
        t = torch.where(valid, tok, 0)
        slot = torch.searchsorted(torch.tensor(order), t // c)
        heads = torch.arange(tok.shape[0])[:, None, None]
        out = stacked[slot, t % c, heads].float()  # [S, n, u, P, D]
        out[~valid] = 0.0
        return out.flatten(2)  # not reshape(..., -1): n may be 0 (nothing missing from the caller's cache)

    # -- backends ----------------------------------------------------------------------------------------

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded chunks held by the LRU now (at most ``cache_bytes`` after each insert)."""
        with self._lock:
            return self._cached_bytes

    def for_backend(self, index: SparseIndex, local: FetchFn | None = None) -> RemoteFetch:
        """A ``fetch`` for a backend decoding with ``index``: stored-KV tensors (:func:`row_layouts`) come
        from the service, the rest from ``local`` (e.g. ``state.store.fetch``). Pass this fetcher as
        ``backend.prefill(..., remote=fetcher)`` for the remote-backed mode (no host copies on the node)."""
        tokens = index.params.get("tokens")
        if tokens != self.n_tokens:
            raise ValueError(f"index of {tokens} tokens, the fetcher's stored context has {self.n_tokens}")
        return RemoteFetch(self, row_layouts(index), local)

    def attach(self, state: DecodeState) -> RemoteFetch:
        """Make a prefilled decode state (``backend.prefill`` or ``SparseDecoder.state``) read its offloaded
        KV from the service from now on; non-KV data still comes from its host store. The host copies stay
        (local mode); ``prefill(..., remote=fetcher)`` does not make them."""
        fetch = self.for_backend(state.index, local=state.store.fetch)
        state.fetch = state.remote = fetch
        return fetch

    def close(self) -> None:
        for ch in self._raw:
            ch.close()

    def __enter__(self) -> ServiceChunkFetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _runs(indices: Sequence[int]) -> list[tuple[int, int]]:
    """``(first, count)`` of each run of consecutive values of sorted ``indices``."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs
