"""Remote-backed mode of the sparse backends: ``prefill(..., remote=ServiceChunkFetcher)`` keeps only the
resident parts on the node and reads every offloaded row from a live kvstream server.

For each of the four methods (each offloads rows: ShadowKV's values, PQCache's and ClusterKV's K/V, ALISA's
INT8 copy) against local mode: bit-identical logits over several teacher-forced steps (level 0 is lossless
float32), the same device-resident bytes, host-resident bytes that drop by exactly the offloaded rows, no
tensor spanning the context in the state other than what the method keeps resident by definition, and
the caller's dense KV released. Reuses the live server and context fixtures of test_sparse_service.
"""

from __future__ import annotations

import asyncio
import gc
import re
import weakref
from typing import Any

import pytest
import torch

from client.api import AsyncKVCacheClient
from client.sparse import DecodeState, SparseIndex, get_backend
from client.sparse.base import NodeBytes, state_tensors
from client.sparse.decode import SparseDecoder
from client.sparse.service import ServiceChunkFetcher, build_and_store_indexes, fetch_index, row_layouts
from tests.test_sparse_service import BUDGET, CHUNK, MODEL, STORED, client, ctx, live  # noqa: F401  (fixtures)

STEPS = 6
WINDOW = 4  # ClusterKV: a window of generated tokens is absorbed (node-only host rows) within STEPS
PARAMS: dict[str, dict[str, Any]] = {
    "shadowkv": {},
    "pqcache": {},
    "clusterkv": {"window": WINDOW, "window_clusters": 2},
    "alisa": {},
}
# Tensors spanning (almost) the whole context that each method keeps resident by definition.
RESIDENT_BY_DEFINITION = {
    "shadowkv": r"layers\[\d+\]\.u",  # low-rank pre-RoPE key factor U [T, r]
    "pqcache": r"layers\[\d+\]\.codes",  # PQ codes of the middle region
    "clusterkv": r"(layers\[\d+\]|index)\.order",  # cluster-order token ids
    "alisa": r"layers\[\d+\]\.(importance|prefill_share)",  # per-token importance [T]
}


@pytest.fixture(scope="module")
def node(ctx: dict[str, Any]) -> dict[str, Any]:  # noqa: F811  (fixture)
    """``ctx`` with the KV/queries of the node's own prefill of the stored prefix (``SparseDecoder.prefill``
    computes exactly these): stored at level 0, the service's rows are then the node's rows bit for bit
    (a forward over a longer sequence may round differently)."""
    res = ctx["model"].forward(ctx["ids"][:STORED], return_queries=True)
    return {**ctx, "kv": res.kv, "q": res.queries}


def offloaded_bytes(backend: str, kv: torch.Tensor, index: SparseIndex) -> int:
    """Bytes of the rows the method offloads (host store in local mode, service in remote mode)."""
    n_layers, _, t, n_kv, d = kv.shape
    if backend == "shadowkv":
        c = int(index.params["chunk"])
        return n_layers * n_kv * (t // c) * c * d * 4  # float32 values of whole chunks
    if backend == "pqcache":
        return n_layers * n_kv * t * 2 * d * 4  # float32 K|V of every token
    if backend == "clusterkv":
        return n_layers * n_kv * (t - int(index.params["sink"])) * 2 * d * 4  # K|V in cluster order
    return n_layers * t * n_kv * 2 * d  # ALISA: int8 K|V of every token


def kept_index_bytes(backend: str, kv: torch.Tensor, index: SparseIndex) -> int:
    """Index tensors a remote-backed state keeps: those the remote fetch reads to address the service."""
    n_layers, _, t, n_kv, d = kv.shape
    if backend == "clusterkv":
        return n_layers * n_kv * (t - int(index.params["sink"])) * 4  # int32 order
    if backend == "alisa":
        return 2 * n_layers * n_kv * 2 * d * 4  # float32 scale and zero per channel
    return 0


def long_tensors(state: DecodeState, backend: str) -> list[str]:
    """Paths of tensors with a dim of at least ``T - budget`` that the method does not keep by definition."""
    t = state.context_len
    span = t - get_backend(backend, BUDGET).budget_tokens(t)
    allowed = re.compile(RESIDENT_BY_DEFINITION[backend])
    tensors = state_tensors(state)
    return [p for p, x in tensors if max(x.shape, default=0) >= span and not allowed.fullmatch(p)]


def decode(
    data: dict[str, Any], backend: str, index: SparseIndex, remote: ServiceChunkFetcher | None
) -> tuple[torch.Tensor, NodeBytes, list[str], list[tuple[int, str, int]]]:
    """Teacher-forced logits of STEPS steps after a prefill of the stored prefix; the state's node bytes,
    its long tensors and its host store entries ``(layer, name, first_row)`` at the end."""
    dec = SparseDecoder(data["model"], get_backend(backend, BUDGET, **PARAMS[backend]))
    try:
        logits = [dec.prefill(data["ids"][:STORED], index=index, remote=remote)]
        logits += [dec.step(tok) for tok in data["next"][:STEPS]]
        st = dec.state
        assert st is not None
        store = [(layer, name, st.store.first_row(layer, name)) for (layer, name), _ in st.store.items()]
        return torch.stack(logits), st.node_bytes(), long_tensors(st, backend), store
    finally:
        dec.close()


def prefill_releases_kv(data: dict[str, Any], backend: str, index: SparseIndex, remote: Any) -> DecodeState:
    """Prefill from a private copy of the dense KV, drop it, and check that nothing kept it alive."""
    kv = data["kv"].clone()
    ref, kv_storage = weakref.ref(kv), kv.untyped_storage().data_ptr()
    state = get_backend(backend, BUDGET, **PARAMS[backend]).prefill(kv, index=index, remote=remote)
    assert all(x.untyped_storage().data_ptr() != kv_storage for _, x in state_tensors(state))
    del kv
    gc.collect()
    assert ref() is None, "the decode state keeps the caller's dense KV alive"
    return state


@pytest.mark.parametrize("backend", list(PARAMS))
async def test_remote_mode_matches_local_without_host_copies(
    client: AsyncKVCacheClient,  # noqa: F811  (fixture)
    node: dict[str, Any],
    backend: str,
) -> None:
    ids, kv = node["ids"], node["kv"]
    await build_and_store_indexes(client, MODEL, ids, node["kv"], [backend], queries=node["q"], levels=[0])
    index = await fetch_index(client, MODEL, ids, backend)
    served = set(row_layouts(index))
    assert served, f"{backend} offloads rows the service can serve"

    want, local, local_long, local_store = await asyncio.to_thread(decode, node, backend, index, None)
    assert local_long, "local mode keeps full-context host copies (the check below can fail)"
    assert {name for _, name, _ in local_store} == served

    chunk_bytes = kv[:, :, :CHUNK].numel() * kv.element_size()
    with ServiceChunkFetcher(client.addresses, MODEL, ids, level=0, cache_bytes=2 * chunk_bytes) as remote:
        got, remote_bytes, long, store = await asyncio.to_thread(decode, node, backend, index, remote)
        assert torch.equal(got, want)  # lossless level 0: the service's rows are the host copies' rows
        assert remote.stats.chunks > 0 and set(remote.stats.levels) == {0}
        assert remote_bytes.fetch_cache <= 2 * chunk_bytes  # bounded by the fetcher, not by the context

        requests = remote.stats.requests
        state = await asyncio.to_thread(prefill_releases_kv, node, backend, index, remote)
        assert remote.stats.requests == requests  # prefill reads nothing: the resident parts come from kv
        assert state.store.items() == []  # no host copy at all right after a remote-backed prefill
        assert set(state.index.tensors) == set(state.remote.index_tensors if state.remote else ())
        state.close()
    local_state = await asyncio.to_thread(prefill_releases_kv, node, backend, index, None)
    local_state.close()

    # Only the resident parts: nothing spans the context but what the method keeps by definition.
    assert long == [], long
    # Host rows in remote mode are the node's own (ClusterKV's absorbed generated tokens), past the context.
    n_rows = {name: layout.n_rows(0, STORED) for name, layout in row_layouts(index).items()}
    assert all(first >= n_rows[name] for _, name, first in store if name in n_rows), store
    node_rows = 0
    if backend == "clusterkv":  # every decoded (non-dense) layer absorbed one window into its host store
        assert len(store) == kv.shape[0] - 1
        node_rows = (kv.shape[0] - 1) * kv.shape[3] * WINDOW * 2 * kv.shape[4] * 4

    # Same resident parts on the device; the host drops by exactly the offloaded rows (and unused index).
    assert remote_bytes.device == local.device
    kept = kept_index_bytes(backend, kv, index) + node_rows
    offloaded = offloaded_bytes(backend, kv, index)
    assert remote_bytes.host == kept
    assert local.host >= kept + offloaded
    fraction = kept / (kept + offloaded)  # e.g. ClusterKV: 4 B of order per 2*D*4 B of K|V (+ window rows)
    assert remote_bytes.host <= fraction * local.host, (remote_bytes, local, fraction)
    assert fraction < 0.1, fraction  # far below: every method offloads most of its per-token bytes


async def test_remote_rows_of_an_empty_selection(
    client: AsyncKVCacheClient,  # noqa: F811  (fixture)
    node: dict[str, Any],
) -> None:
    # ALISA asks for the rows missing from its cache; once its selection is stable that is none.
    kv = node["kv"]
    n_kv, d = kv.shape[3], kv.shape[4]
    await build_and_store_indexes(client, MODEL, node["ids"], kv, ["alisa"], queries=node["q"], levels=[0])
    with ServiceChunkFetcher(client.addresses, MODEL, node["ids"], level=0) as remote:
        rows = await asyncio.to_thread(remote.gather, 0, torch.zeros(n_kv, 0, 1, dtype=torch.int64))
    assert rows.shape == (n_kv, 0, 2 * d)


async def test_remote_fetcher_must_cover_the_context(
    client: AsyncKVCacheClient,  # noqa: F811  (fixture)
    ctx: dict[str, Any],  # noqa: F811  (fixture)
) -> None:
    """A fetcher of another (shorter) stored context cannot back the state, and remote excludes fetch."""
    ids = ctx["ids"]
    await build_and_store_indexes(client, MODEL, ids, ctx["kv"], ["shadowkv"], levels=[0])
    index = await fetch_index(client, MODEL, ids, "shadowkv")
    backend = get_backend("shadowkv", BUDGET)
    kv = ctx["kv"][:, :, :STORED]
    short = ServiceChunkFetcher(client.addresses, MODEL, ids[: STORED - CHUNK])
    with short, pytest.raises(ValueError, match="stored context"):
        backend.prefill(kv, index=index, remote=short)
    remote = ServiceChunkFetcher(client.addresses, MODEL, ids)
    with remote, pytest.raises(ValueError, match="not both"):
        backend.prefill(kv, index=index, remote=remote, fetch=lambda *a: torch.zeros(0))
