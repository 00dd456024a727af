"""The common interface of the sparse-recall backends, their shared state and the registry.

Conventions (every backend):

* KV layout ``[layers, 2, T, kv_heads, head_dim]`` (index 0 = post-RoPE keys, 1 = values), float.
* ``budget`` is a fraction of the prefill context ``T``; every step attends to exactly
  :func:`budget_tokens` distinct context tokens per selection head, sink/local/outlier tokens included,
  plus every generated token (always exact, never counted in the budget).
* A *selection head* is a KV head for backends that select per KV head (ShadowKV, PQCache, ALISA,
  sink+local) and a query head for those that select per query head (oracle, ClusterKV).
* Decode queries are post-RoPE ``[n_heads, head_dim]``; query head ``h`` reads KV head ``h // group``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, is_dataclass
from typing import Any, ClassVar, NamedTuple, Protocol

import torch

from client.sparse import sidecar
from client.sparse.prefetch import FetchFn, HostStore, Prefetcher, Ticket
from kernels import ops

ParamValue = sidecar.ParamValue


def budget_tokens(budget: float, context_len: int) -> int:
    """Attended context tokens for a budget fraction: ``round(budget * T)`` clamped to ``[1, T]``."""
    if not budget > 0:
        raise ValueError(f"budget must be > 0, got {budget}")
    if budget >= 1:  # the whole context (also for inf, which floor() cannot take)
        return context_len
    return min(context_len, max(1, math.floor(budget * context_len + 0.5)))


def default_sink(context_len: int) -> int:
    """Attention-sink tokens when a backend is not told: ~1% of the context, between 1 and 32."""
    return max(1, min(32, round(0.01 * context_len)))


@dataclass
class SparseIndex:
    """A backend's prefill-time index: scalar ``params`` and named tensors (stacked over layers).

    Serialises to the sidecar format of :mod:`client.sparse.sidecar` (never pickle).
    """

    backend: str
    params: dict[str, ParamValue]
    tensors: dict[str, torch.Tensor]

    def to_bytes(self) -> bytes:
        return sidecar.encode(self)

    @classmethod
    def from_bytes(cls, blob: bytes | bytearray | memoryview) -> SparseIndex:
        """Parse a sidecar; raises :class:`~client.sparse.sidecar.SidecarError` on corrupt input."""
        return sidecar.decode(blob)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def layer(self, name: str, layer: int, device: torch.device | str) -> torch.Tensor:
        """A compact copy of tensor ``name`` of one layer (``tensors[name][layer]``) on ``device``."""
        return resident(self.tensors[name][layer], device)

    def subset(self, names: Iterable[str]) -> SparseIndex:
        """The same index with only the tensors ``names`` (shared, not copied); params kept whole."""
        keep = set(names)
        tensors = {n: t for n, t in self.tensors.items() if n in keep}
        return SparseIndex(self.backend, dict(self.params), tensors)


def resident(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A compact copy of ``t`` on ``device``: never a view that would keep a larger host tensor alive (and
    be counted by :meth:`SparseBackend.resident_bytes`)."""
    return t.detach().to(device=device, copy=True, memory_format=torch.contiguous_format)


class TokenBuffer:
    """Exact K/V of generated tokens of one layer: growable ``[kv_heads, n, head_dim]``."""

    def __init__(self, n_kv: int, head_dim: int, device: torch.device, dtype: torch.dtype, cap: int = 64):
        self._k = torch.empty(n_kv, cap, head_dim, device=device, dtype=dtype)
        self._v = torch.empty_like(self._k)
        self.n = 0
        self.first_pos = 0  # absolute position of the oldest buffered token

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add one token: ``k``/``v`` ``[kv_heads, head_dim]``."""
        if self.n == self._k.shape[1]:
            self._k = torch.cat([self._k, torch.empty_like(self._k)], 1)
            self._v = torch.cat([self._v, torch.empty_like(self._v)], 1)
        self._k[:, self.n] = k
        self._v[:, self.n] = v
        self.n += 1

    def pop_front(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return the ``n`` oldest tokens ``([kv_heads, n, D], [kv_heads, n, D])``."""
        k, v = self._k[:, :n].clone(), self._v[:, :n].clone()
        self._k[:, : self.n - n] = self._k[:, n : self.n].clone()
        self._v[:, : self.n - n] = self._v[:, n : self.n].clone()
        self.n -= n
        self.first_pos += n
        return k, v

    @property
    def k(self) -> torch.Tensor:
        return self._k[:, : self.n]

    @property
    def v(self) -> torch.Tensor:
        return self._v[:, : self.n]


@dataclass
class FetchStats:
    """Data movement counters of one decode state (host->device rows and bytes, cache hits/misses)."""

    bytes_fetched: int = 0
    rows_fetched: int = 0
    units_hit: int = 0
    units_missed: int = 0
    steps: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.units_hit + self.units_missed
        return self.units_hit / total if total else 0.0


class RemoteRows(Protocol):
    """A ``fetch`` (:data:`~client.sparse.prefetch.FetchFn`) that serves some of a backend's offloaded tensors
    from outside the node (the kvstream service) and the rest from the node's host store."""

    def __call__(self, layer: int, name: str, rows: torch.Tensor) -> torch.Tensor: ...

    def serves(self, name: str) -> bool:
        """Whether rows of offloaded tensor ``name`` come from outside the node (never from its store)."""
        ...

    @property
    def index_tensors(self) -> frozenset[str]:
        """Index tensors this fetch reads (e.g. ClusterKV's ``order``): the state keeps them."""
        ...

    @property
    def cached_bytes(self) -> int:
        """Host bytes its own cache holds now (bounded; may be shared by every state it serves)."""
        ...


class RowSource(Protocol):
    """Where a remote-backed state reads its offloaded rows, e.g.
    :class:`~client.sparse.service.ServiceChunkFetcher` of the context being decoded."""

    def for_backend(self, index: SparseIndex, local: FetchFn | None = None) -> RemoteRows:
        """A fetch for a backend decoding with ``index``; rows it does not serve come from ``local``."""
        ...


class NodeBytes(NamedTuple):
    """Bytes a decode state holds on the inference node, by role (see :meth:`DecodeState.node_bytes`)."""

    device: int  # resident parts on the compute device (per-layer state + generated tokens)
    host: int  # host store + index tensors the state references, not already counted as device
    fetch_cache: int  # the remote fetcher's chunk cache (0 in local mode; bounded, may be shared)


@dataclass
class DecodeState:
    """Per-sequence decode state of a backend (all layers).

    ``remote`` is set in the remote-backed mode (``prefill(..., remote=...)``): the offloaded tensors it
    serves are not in ``store`` and every read of them goes through ``fetch`` (= ``remote``).
    """

    context_len: int
    n_layers: int
    n_kv_heads: int
    head_dim: int
    device: torch.device
    index: SparseIndex
    layers: list[Any]
    generated: list[TokenBuffer]
    store: HostStore
    fetch: FetchFn
    prefetcher: Prefetcher
    last_selection: list[torch.Tensor | None]
    stats: FetchStats = field(default_factory=FetchStats)
    remote: RemoteRows | None = None

    def offload(self, layer: int, name: str, rows: Callable[[], torch.Tensor]) -> None:
        """Offload tensor ``name`` ``[S, N, ...]`` of ``layer``: into the host store, or nowhere when
        :attr:`remote` serves it (``rows`` is then never called, so the host copy is never even built)."""
        if self.remote is not None and self.remote.serves(name):
            return
        self.store.put(layer, name, rows())

    def node_bytes(self) -> NodeBytes:
        """Node-resident bytes of this state (each storage counted once, by the role it plays).

        ``device``: per-layer resident data (index parts, exact K/V, caches) and generated tokens, i.e.
        what sits in GPU memory on CUDA (on CPU the same tensors, by role). ``host``: the host store and the
        index tensors the state still references. ``fetch_cache``: the remote fetcher's chunk cache.
        In-flight fetches are not counted.
        """
        device: dict[int, int] = {}
        host: dict[int, int] = {}
        for path, t in state_tensors(self):
            role = device if path.startswith(("layers", "generated")) else host
            role[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        host_only = sum(n for ptr, n in host.items() if ptr not in device)
        cache = self.remote.cached_bytes if self.remote is not None else 0
        return NodeBytes(sum(device.values()), host_only, cache)

    def fetch_async(self, layer: int, name: str, rows: torch.Tensor) -> Ticket:
        """Fetch ``rows`` ``[S, n]`` (``-1`` padding) of offloaded ``(layer, name)`` on the prefetcher."""
        fetch = self.fetch
        return self.prefetcher.submit(lambda: [fetch(layer, name, rows)])

    def account(self, rows: torch.Tensor, fetched: torch.Tensor) -> None:
        """Count the valid rows of a completed fetch (``fetched`` ``[S, n, ...]``) in :attr:`stats`."""
        n_valid = int((rows >= 0).sum())
        per_row = fetched[0, 0].numel() * fetched.element_size() if fetched.numel() else 0
        self.stats.rows_fetched += n_valid
        self.stats.bytes_fetched += n_valid * per_row

    def close(self) -> None:
        self.prefetcher.close()


def state_tensors(state: DecodeState) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor ``state`` holds, with its path: ``layers[i].<field>...``, ``generated[i]._k``,
    ``store[i].<name>``, ``index.<name>``. Walks only our own containers (lists, tuples, deques, dataclasses,
    :class:`SelectionCache`, :class:`TokenBuffer`), never tickets, thread pools or futures."""

    def walk(path: str, obj: object) -> Iterator[tuple[str, torch.Tensor]]:
        if isinstance(obj, torch.Tensor):
            yield path, obj
        elif isinstance(obj, list | tuple | deque):
            for i, x in enumerate(obj):
                yield from walk(f"{path}[{i}]", x)
        elif isinstance(obj, SelectionCache | TokenBuffer) or (
            is_dataclass(obj) and not isinstance(obj, type)
        ):
            for name, x in vars(obj).items():
                yield from walk(f"{path}.{name}", x)

    yield from walk("layers", state.layers)
    yield from walk("generated", state.generated)
    for (layer, name), t in state.store.items():
        yield f"store[{layer}].{name}", t
    for name, t in state.index.tensors.items():
        yield f"index.{name}", t


def gather_heads(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` ``[S, K]`` of ``x`` ``[Hkv, N, ...]`` where selection head ``s`` reads KV head
    ``s // (S // Hkv)`` (S = Hkv or a multiple, for per-query-head selection) -> ``[S, K, ...]``."""
    heads = torch.arange(idx.shape[0], device=idx.device) // (idx.shape[0] // x.shape[0])
    return x[heads[:, None], idx]


class Context(NamedTuple):
    """The context part attended at one step: token ids and their (possibly approximated) K/V.

    ``tokens`` ``[S, K]`` int64 absolute positions; ``k``/``v`` are *parts* ``[S, K_i, head_dim]`` float
    whose concatenation along axis 1 is row-aligned with ``tokens`` (e.g. resident sink/static rows, then
    the selected ones); ``S`` is the number of selection heads (KV heads or query heads). Parts, because
    ``decode_step`` appends the generated tokens anyway: one concatenation instead of two copies.
    """

    tokens: torch.Tensor
    k: tuple[torch.Tensor, ...]
    v: tuple[torch.Tensor, ...]


def _members(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per row, whether each entry of ``x`` ``[S, n]`` occurs in the same row of ``ref`` ``[S, n]``."""
    ref_sorted = ref.sort(dim=1).values
    pos = torch.searchsorted(ref_sorted, x).clamp(max=ref.shape[1] - 1)
    return ref_sorted.gather(1, pos) == x


def _first_k(mask: torch.Tensor, k: int) -> torch.Tensor:
    """Column positions of the first ``k`` true entries per row (stable; rows with fewer are padded with
    positions of false entries, masked by the caller)."""
    return torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :k]


class SelectionCache:
    """Device copies of the units (chunks/tokens) selected at the previous step, updated in place.

    Payload tensors are ``[S, slots, unit_rows, ...]``; ``ids`` ``[S, slots]`` says which unit each slot
    holds. A new selection keeps its hits where they are and loads only the missed units, into the slots
    of units no longer selected (ShadowKV's chunk cache, ClusterKV's token cache with R = 1). Slot order
    is arbitrary: read the selection back from :attr:`ids`.
    """

    def __init__(self) -> None:
        self.ids: torch.Tensor | None = None
        self.payload: list[torch.Tensor] = []

    def update(
        self,
        new_ids: torch.Tensor,
        load: Callable[[torch.Tensor], list[torch.Tensor]],
        stats: FetchStats,
    ) -> list[torch.Tensor]:
        """Make the cache hold the units ``new_ids`` ``[S, n]`` (distinct per row); ``load(miss_ids [S, m])``
        (``-1`` padded) returns the missed units' payloads ``[S, m, unit_rows, ...]``. Returns the payloads,
        aligned with :attr:`ids` (a permutation of ``new_ids`` per row)."""
        s, n = new_ids.shape
        if self.ids is None or self.ids.shape != new_ids.shape:
            stats.units_missed += s * n
            # fresh buffers (clone, not contiguous(): a loaded tensor may be a view at any offset, and BLAS
            # rounding can depend on alignment: local and remote rows must give bit-identical steps)
            self.ids, self.payload = new_ids.clone(), [p.clone() for p in load(new_ids)]
            return self.payload
        miss = ~_members(new_ids, self.ids)
        stale = ~_members(self.ids, new_ids)  # as many stale slots as misses in every row
        counts = miss.sum(1)
        m = int(counts.max())
        stats.units_missed += int(counts.sum())
        stats.units_hit += s * n - int(counts.sum())
        if m == 0:
            return self.payload
        valid = torch.arange(m, device=new_ids.device)[None, :] < counts[:, None]
        miss_ids = torch.where(valid, new_ids.gather(1, _first_k(miss, m)), -1)
        loaded = load(miss_ids)
        # Only the valid (row, slot) pairs are written: one indexed copy per payload, padding never moves.
        rows = torch.arange(s, device=new_ids.device)[:, None].expand(s, m)[valid]
        dest = _first_k(stale, m)[valid]
        self.ids[rows, dest] = miss_ids[valid]
        for buf, new in zip(self.payload, loaded, strict=True):
            buf[rows, dest] = new[valid].to(buf.dtype)
        return self.payload


class SparseBackend(ABC):
    """A sparse-recall attention backend: prefill-time index + per-step selection of context tokens.

    Args:
        budget: attended context tokens as a fraction of the prefill context (see :func:`budget_tokens`).
        device: where resident data and compute live (offloaded data stays in host memory).
        rope_theta: the model's RoPE base (ShadowKV recovers pre-RoPE keys with it).
        prefetch_workers: threads of the :class:`~client.sparse.prefetch.Prefetcher` (0 = inline fetches).
    """

    name: ClassVar[str]
    per_query_head: ClassVar[bool] = False  # selection granularity (see module docstring)

    def __init__(
        self,
        budget: float,
        *,
        device: torch.device | str = "cpu",
        rope_theta: float = 10000.0,
        prefetch_workers: int = 2,
    ) -> None:
        budget_tokens(budget, 1)  # validates
        self.budget = float(budget)
        self.device = torch.device(device)
        self.rope_theta = float(rope_theta)
        self.prefetch_workers = prefetch_workers

    def budget_tokens(self, context_len: int) -> int:
        return budget_tokens(self.budget, context_len)

    # --- index --------------------------------------------------------------------------------------------
    @abstractmethod
    def build_index(self, kv: torch.Tensor, queries: torch.Tensor | None = None) -> SparseIndex:
        """Prefill-time index of ``kv`` ``[layers, 2, T, kv_heads, head_dim]`` (float, post-RoPE keys).

        ``queries`` ``[layers, Tq, n_heads, head_dim]``: post-RoPE queries of the last ``Tq <= T`` prefill
        positions, used only by backends whose index needs them (ALISA's accumulated attention).
        Indexes do not depend on the budget, so one service-side sidecar serves every budget.
        """

    def check_index(self, index: SparseIndex, kv: torch.Tensor) -> None:
        """Reject an index built by another backend or for another context shape."""
        if index.backend != self.name:
            raise ValueError(f"index was built by {index.backend!r}, not {self.name!r}")
        want = {
            "layers": kv.shape[0],
            "tokens": kv.shape[2],
            "kv_heads": kv.shape[3],
            "head_dim": kv.shape[4],
        }
        got = {k: index.params.get(k) for k in want}
        if got != want:
            raise ValueError(f"index shape {got} does not match the KV cache {want}")

    @staticmethod
    def shape_params(kv: torch.Tensor) -> dict[str, ParamValue]:
        return {
            "layers": kv.shape[0],
            "tokens": kv.shape[2],
            "kv_heads": kv.shape[3],
            "head_dim": kv.shape[4],
        }

    # --- decode -------------------------------------------------------------------------------------------
    def prefill(
        self,
        kv: torch.Tensor,
        index: SparseIndex | None = None,
        queries: torch.Tensor | None = None,
        fetch: FetchFn | None = None,
        remote: RowSource | None = None,
    ) -> DecodeState:
        """Set up decoding after a prefill of ``kv`` ``[layers, 2, T, kv_heads, head_dim]`` (float).

        ``index`` may come precomputed (a service sidecar); if ``None`` it is built here (``queries`` as in
        :meth:`build_index`). ``fetch`` replaces the default read of offloaded data from host memory.

        ``remote`` (e.g. the :class:`~client.sparse.service.ServiceChunkFetcher` of this context) selects
        the **remote-backed mode**: the offloaded tensors it serves are neither built nor kept on the node
        and every decode-time read of them goes through it; the state keeps the resident parts, the host
        data it does not serve and, of the index, its params and the tensors the remote reads. In both modes
        the returned state holds no reference to ``kv``: the caller may drop it.
        """
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(f"kv must be [layers, 2, T, kv_heads, head_dim], got {tuple(kv.shape)}")
        if fetch is not None and remote is not None:
            raise ValueError("give fetch or remote, not both (remote builds the fetch)")
        if index is None:
            index = self.build_index(kv, queries)
        self.check_index(index, kv)
        n_layers, _, t, n_kv, d = kv.shape
        store = HostStore(pin=self.device.type == "cuda")
        rows = remote.for_backend(index, local=store.fetch) if remote is not None else None
        if fetch is None:
            fetch = rows if rows is not None else store.fetch
        state = DecodeState(
            context_len=t,
            n_layers=n_layers,
            n_kv_heads=n_kv,
            head_dim=d,
            device=self.device,
            index=index,
            layers=[],
            generated=[TokenBuffer(n_kv, d, self.device, torch.float32) for _ in range(n_layers)],
            store=store,
            fetch=fetch,
            prefetcher=Prefetcher(self.device, self.prefetch_workers),
            last_selection=[None] * n_layers,
            remote=rows,
        )
        for layer in range(n_layers):
            state.layers.append(self._prefill_layer(state, layer, kv[layer].float(), index))
        for g in state.generated:
            g.first_pos = t
        if rows is not None:  # the layers copied what they keep; of the index, hold what the remote reads
            state.index = index.subset(rows.index_tensors)
        return state

    @abstractmethod
    def _prefill_layer(self, state: DecodeState, layer: int, kv: torch.Tensor, index: SparseIndex) -> Any:
        """Per-layer state from ``kv`` ``[2, T, kv_heads, head_dim]``: resident tensors to the device (compact
        copies, never views of ``kv``), offloaded ones through :meth:`DecodeState.offload`."""

    @abstractmethod
    def _context(self, state: DecodeState, layer: int, q: torch.Tensor) -> Context:
        """Select exactly ``budget_tokens(T)`` context tokens per selection head for query ``q`` ``[H, D]``
        and return them with their K/V."""

    def _prefetch(self, state: DecodeState, layer: int) -> None:  # noqa: B027 - optional hook
        """Hook: start fetching what ``layer`` needs at its next call (runs while another layer computes)."""

    def _observe(  # noqa: B027 - optional hook
        self, state: DecodeState, layer: int, q: torch.Tensor, k_parts: tuple[torch.Tensor, ...], ctx: Context
    ) -> None:
        """Hook: see the attended keys after a step (ALISA's importance): ``k_parts`` are ``ctx.k``'s parts
        then the generated rows, ``[S, n_i, D]`` each."""

    def decode_step(
        self, state: DecodeState, layer: int, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor
    ) -> torch.Tensor:
        """One decode step of ``layer``: append the generated token's exact ``k_new``/``v_new``
        ``[kv_heads, head_dim]``, select, attend. ``q`` ``[n_heads, head_dim]`` post-RoPE.

        Returns the attention output ``[n_heads, head_dim]`` float32.
        """
        q = q.to(self.device, torch.float32)
        state.generated[layer].append(
            k_new.to(self.device, torch.float32), v_new.to(self.device, torch.float32)
        )
        self._prefetch(state, (layer + 1) % state.n_layers)
        ctx = self._context(state, layer, q)
        state.last_selection[layer] = ctx.tokens
        gen = state.generated[layer]
        gk, gv = gen.k, gen.v
        if ctx.tokens.shape[0] != gk.shape[0]:  # per-query-head selection: expand the exact generated KV
            group = ctx.tokens.shape[0] // gk.shape[0]
            gk, gv = gk.repeat_interleave(group, 0), gv.repeat_interleave(group, 0)
        k_parts, v_parts = (*ctx.k, gk), (*ctx.v, gv)
        out = ops.decode_attention_parts(q, k_parts, v_parts)  # read in place: no concatenated copy
        self._observe(state, layer, q, k_parts, ctx)
        if layer == state.n_layers - 1:
            state.stats.steps += 1
        return out

    def resident_bytes(self, state: DecodeState) -> int:
        """Bytes of this state's per-layer data on the compute device (resident index parts, K/V, caches),
        all layers; generated tokens, host memory and in-flight fetches are not counted
        (:meth:`DecodeState.node_bytes` counts all of them by role)."""
        storages = {
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for path, t in state_tensors(state)
            if path.startswith("layers")
        }
        return sum(storages.values())


_REGISTRY: dict[str, type[SparseBackend]] = {}


def register(cls: type[SparseBackend]) -> type[SparseBackend]:
    """Class decorator adding a backend to the registry under ``cls.name``."""
    if cls.name in _REGISTRY:
        raise ValueError(f"backend {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def get_backend(name: str, budget: float, **params: Any) -> SparseBackend:
    """Instantiate the backend registered as ``name`` with a budget fraction and backend parameters."""
    try:
        cls = _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown sparse backend {name!r}; known: {sorted(_REGISTRY)}") from None
    return cls(budget, **params)


def list_backends() -> list[str]:
    return sorted(_REGISTRY)
