"""Tests of the sparse-recall backends (client/sparse): budgets, exactness, GQA, sidecar, prefetch."""

from __future__ import annotations

import json
import math
import struct
import time
from typing import Any

import pytest
import torch
import xxhash

from client.model import Llama2c
from client.sparse import SidecarError, SparseIndex, alisa, budget_tokens, get_backend, list_backends, sidecar
from client.sparse.base import FetchStats, SelectionCache, SparseBackend
from client.sparse.eval import attention_metrics
from client.sparse.prefetch import HostStore, Prefetcher
from client.sparse.shadowkv import split_budget
from kernels import ops

T_CTX = 192  # prefill tokens
T_ALL = 216  # prefill + decoded
SMALL = {  # parameters scaled to a ~200-token context
    "oracle": {},
    "sink_local": {},
    "shadowkv": {"chunk": 4, "local_chunks": 2},
    "pqcache": {"block": 16, "cache_tokens": 64, "cache_topk": 2},
    "clusterkv": {},
    "alisa": {},
}
EXACT = {  # settings under which every attended K/V is exact
    **SMALL,
    "shadowkv": {"chunk": 4, "local_chunks": 2, "rank": 32},
    "alisa": {"kv_bits": None},
}


@pytest.fixture(scope="module")
def real() -> dict[str, Any]:
    m = Llama2c.from_file()
    ids = m.sample(T_ALL, seed=3)
    res = m.forward(ids, return_queries=True)
    return {"model": m, "ids": ids, "kv": res.kv, "q": res.queries}


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [H, D], k/v [N, Hkv, D] -> [H, D]."""
    idx = torch.arange(k.shape[0]).expand(k.shape[1], -1)
    return ops.sparse_decode_attention(q, k.transpose(0, 1), v.transpose(0, 1), idx)


def run_steps(
    backend: SparseBackend, real: dict[str, Any], steps: int, **prefill_kw: Any
) -> list[torch.Tensor]:
    kv, q = real["kv"], real["q"]
    state = backend.prefill(kv[:, :, :T_CTX], queries=q[:, :T_CTX], **prefill_kw)
    outs = []
    for t in range(T_CTX, T_CTX + steps):
        for layer in range(kv.shape[0]):
            outs.append(backend.decode_step(state, layer, q[layer, t], kv[layer, 0, t], kv[layer, 1, t]))
    state.close()
    return outs


def test_registry() -> None:
    assert list_backends() == sorted(SMALL)
    for name in SMALL:
        b = get_backend(name, 0.125)
        assert b.name == name and b.budget == 0.125
    with pytest.raises(KeyError, match="unknown sparse backend"):
        get_backend("nope", 0.1)
    with pytest.raises(ValueError):
        get_backend("oracle", 0.0)


def test_budget_tokens() -> None:
    assert budget_tokens(0.125, 448) == 56
    assert budget_tokens(0.0625, 448) == 28
    assert budget_tokens(2.0, 100) == 100 == budget_tokens(float("inf"), 100)
    assert budget_tokens(1e-6, 100) == 1


@pytest.mark.parametrize("name", sorted(SMALL))
@pytest.mark.parametrize("budget", [0.03, 0.0625, 0.125, 0.25, 0.6])
def test_exact_budget(real: dict[str, Any], name: str, budget: float) -> None:
    kv, q = real["kv"], real["q"]
    backend = get_backend(name, budget, **SMALL[name])
    state = backend.prefill(kv[:, :, :T_CTX], queries=q[:, :T_CTX])
    n_heads, n_kv = q.shape[2], kv.shape[3]
    k = budget_tokens(budget, T_CTX)
    for t in range(T_CTX, T_CTX + 3):
        for layer in range(kv.shape[0]):
            backend.decode_step(state, layer, q[layer, t], kv[layer, 0, t], kv[layer, 1, t])
            sel = state.last_selection[layer]
            assert sel is not None
            assert sel.shape == (n_heads if backend.per_query_head else n_kv, k)
            assert int(sel.min()) >= 0 and int(sel.max()) < T_CTX
            for row in sel:
                assert row.unique().numel() == k  # no duplicates: exactly k distinct tokens
    state.close()


def test_regions_are_kept(real: dict[str, Any]) -> None:
    kv, q = real["kv"], real["q"]
    budget = 0.125
    k = budget_tokens(budget, T_CTX)
    b_pq = get_backend("pqcache", budget, sink=3, **SMALL["pqcache"])
    sink, local, _ = b_pq.regions(T_CTX)
    b_sl = get_backend("sink_local", budget, sink=3)
    b_ck = get_backend("clusterkv", budget, sink=3)
    b_sk = get_backend("shadowkv", budget, **SMALL["shadowkv"])
    split = b_sk.split(T_CTX)
    b_al = get_backend("alisa", budget)
    must = {
        b_pq: set(range(sink)) | set(range(T_CTX - local, T_CTX)),
        b_sl: set(range(3)) | set(range(T_CTX - (k - 3), T_CTX)),
        b_ck: set(range(3)),
        b_sk: set(range(T_CTX - split.local, T_CTX)),
        b_al: set(range(T_CTX - round(k * 0.5), T_CTX)),
    }
    for backend, tokens in must.items():
        state = backend.prefill(kv[:, :, :T_CTX], queries=q[:, :T_CTX])
        backend.decode_step(state, 2, q[2, T_CTX], kv[2, 0, T_CTX], kv[2, 1, T_CTX])
        sel = state.last_selection[2]
        assert sel is not None
        for row in sel:
            assert tokens <= set(row.tolist()), backend.name
        state.close()


def test_shadowkv_split_is_exact() -> None:
    for total in range(1, 200):
        s = split_budget(total, 199, chunk=4, local_chunks=2, outlier_chunks=3)
        assert s.local + 4 * (s.outlier_chunks + s.selected_chunks) == total
        assert s.outlier_chunks + s.selected_chunks <= s.candidates


@pytest.mark.parametrize("name", sorted(SMALL))
def test_full_budget_is_dense(real: dict[str, Any], name: str) -> None:
    kv, q = real["kv"], real["q"]
    outs = run_steps(get_backend(name, 1.0, **EXACT[name]), real, steps=4)
    i = 0
    for t in range(T_CTX, T_CTX + 4):
        for layer in range(kv.shape[0]):
            ref = dense_attention(q[layer, t], kv[layer, 0, : t + 1], kv[layer, 1, : t + 1])
            torch.testing.assert_close(outs[i], ref, atol=2e-5, rtol=1e-4)
            i += 1


@pytest.mark.parametrize(
    ("name", "budget", "extra"),
    [
        *((name, 0.1, {}) for name in sorted(SMALL)),
        ("alisa", 0.1, {"local_ratio": 0.0}),  # no local window at all
        ("alisa", 0.5 / T_CTX, {}),  # one token of budget: round(0.5) = 0 local tokens
    ],
)
def test_selection_plus_generated_is_exact(
    real: dict[str, Any], name: str, budget: float, extra: dict[str, Any]
) -> None:
    """The output equals exact attention over the reported selection plus every generated token."""
    kv, q = real["kv"], real["q"]
    backend = get_backend(name, budget, **{**EXACT[name], **extra})
    state = backend.prefill(kv[:, :, :T_CTX], queries=q[:, :T_CTX])
    n_heads, n_kv, d = q.shape[2], kv.shape[3], kv.shape[4]
    group = n_heads // n_kv
    for t in range(T_CTX, T_CTX + 5):
        for layer in (1, 3):
            out = backend.decode_step(state, layer, q[layer, t], kv[layer, 0, t], kv[layer, 1, t])
            sel = state.last_selection[layer]
            assert sel is not None
            gen = state.generated[layer]
            torch.testing.assert_close(gen.k, kv[layer, 0, T_CTX : t + 1].transpose(0, 1), rtol=0, atol=0)
            sel_q = sel.repeat_interleave(n_heads // sel.shape[0], 0)
            for h in range(n_heads):
                pos = torch.cat([sel_q[h], torch.arange(T_CTX, t + 1)])
                kk, vv = kv[layer, 0, pos, h // group], kv[layer, 1, pos, h // group]
                p = torch.softmax(kk @ q[layer, t, h] / math.sqrt(d), 0)
                torch.testing.assert_close(out[h], p @ vv, atol=2e-5, rtol=1e-4)
    state.close()


def test_gqa_granularity(real: dict[str, Any]) -> None:
    kv, q = real["kv"], real["q"]
    k = budget_tokens(0.125, T_CTX)
    oracle = get_backend("oracle", 0.125)
    state = oracle.prefill(kv[:, :, :T_CTX])
    oracle.decode_step(state, 1, q[1, T_CTX], kv[1, 0, T_CTX], kv[1, 1, T_CTX])
    sel = state.last_selection[1]
    assert sel is not None
    group = q.shape[2] // kv.shape[3]
    for h in range(q.shape[2]):  # oracle = exact top-k per *query* head
        want = (kv[1, 0, :T_CTX, h // group] @ q[1, T_CTX, h]).topk(k).indices
        assert set(sel[h].tolist()) == set(want.tolist())
    assert not get_backend("shadowkv", 0.1).per_query_head and get_backend("clusterkv", 0.1).per_query_head


@pytest.mark.parametrize("name", sorted(SMALL))
def test_sidecar_round_trip(real: dict[str, Any], name: str) -> None:
    kv, q = real["kv"], real["q"]
    backend = get_backend(name, 0.125, **SMALL[name])
    index = backend.build_index(kv[:, :, :T_CTX], q[:, :T_CTX])
    blob = index.to_bytes()
    back = SparseIndex.from_bytes(blob)
    assert back.backend == name and back.params == index.params
    assert back.tensors.keys() == index.tensors.keys()
    for key, t in index.tensors.items():
        assert back.tensors[key].dtype == t.dtype
        torch.testing.assert_close(back.tensors[key], t, rtol=0, atol=0)
    a = run_steps(get_backend(name, 0.125, **SMALL[name]), real, 2, index=index)
    b = run_steps(get_backend(name, 0.125, **SMALL[name]), real, 2, index=back)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_sidecar_rejects_corruption(real: dict[str, Any]) -> None:
    index = get_backend("clusterkv", 0.1).build_index(real["kv"][:, :, :T_CTX])
    blob = bytearray(index.to_bytes())
    for pos in (len(blob) // 2, 30, len(blob) - 1):  # payload, header, checksum
        bad = bytearray(blob)
        bad[pos] ^= 0x40
        with pytest.raises(SidecarError, match="checksum"):
            SparseIndex.from_bytes(bytes(bad))
    with pytest.raises(SidecarError, match="magic"):
        SparseIndex.from_bytes(b"NOTANIDX" + bytes(blob[8:]))
    with pytest.raises(SidecarError, match="version"):
        SparseIndex.from_bytes(bytes(blob[:8]) + struct.pack("<H", 99) + bytes(blob[10:]))
    with pytest.raises(SidecarError, match="length|truncated"):
        SparseIndex.from_bytes(bytes(blob[:-5]))
    with pytest.raises(SidecarError, match="truncated"):
        SparseIndex.from_bytes(b"KVSP")
    with pytest.raises(SidecarError, match="unknown backend"):
        SparseIndex("mystery", {}, {}).to_bytes()
    with pytest.raises(ValueError, match="built by"):
        get_backend("pqcache", 0.1).prefill(real["kv"][:, :, :T_CTX], index=index)


def _forged_sidecar(header: bytes, payload: bytes = b"") -> bytes:
    """A sidecar with a valid frame and checksum around ``header`` (JSON text): only its content is bad."""
    body = sidecar._FIXED.pack(
        sidecar.MAGIC, sidecar.FORMAT_VERSION, sidecar.BACKEND_IDS["clusterkv"], 0, len(header), len(payload)
    )
    body += header + payload
    return body + sidecar._CHECKSUM.pack(xxhash.xxh3_64_intdigest(body))


def test_sidecar_rejects_forged_headers() -> None:
    entry = {"name": "x", "dtype": "uint8", "shape": [8], "offset": 0, "nbytes": 8}
    cases = {
        "not valid JSON": b"[" * 100_000 + b"]" * 100_000,  # deep nesting: RecursionError in json
        "JSON scalars": json.dumps({"backend": "clusterkv", "params": {"t": [1, 2]}, "tensors": []}).encode(),
        "twice": json.dumps({"backend": "clusterkv", "params": {}, "tensors": [entry, entry]}).encode(),
    }
    for needle, header in cases.items():
        with pytest.raises(SidecarError, match=needle):
            SparseIndex.from_bytes(_forged_sidecar(header, bytes(8)))


def test_edge_shapes_get_a_clamped_sink_or_a_clear_error() -> None:
    kv = torch.randn(1, 2, 4, 2, 8)
    for t in (3, 4):  # a context no longer than the sink: clamped when built and when checked
        get_backend("clusterkv", 1.0, sink=4).prefill(kv[:, :, :t])
    with pytest.raises(ValueError, match="head_dim must be even"):
        get_backend("shadowkv", 0.5, chunk=4, local_chunks=1).prefill(torch.randn(1, 2, 20, 2, 3))


def test_prefetcher_overlaps_slow_fetch() -> None:
    delay, n_layers = 0.04, 6
    data = [torch.full((2, 3), float(i)) for i in range(n_layers)]

    def slow_fetch(i: int) -> list[torch.Tensor]:
        time.sleep(delay)
        return [data[i].clone()]

    def pipeline(pf: Prefetcher) -> tuple[float, list[torch.Tensor]]:
        t0 = time.perf_counter()
        got = []
        ticket = pf.submit(lambda: slow_fetch(0))
        for i in range(n_layers):
            (x,) = ticket.result()
            if i + 1 < n_layers:  # fetch layer i+1 while "computing" layer i
                ticket = pf.submit(lambda j=i + 1: slow_fetch(j))  # type: ignore[misc]
            time.sleep(delay)  # compute of layer i
            got.append(x * 2)
        return time.perf_counter() - t0, got

    serial_s, serial = pipeline(Prefetcher("cpu", workers=0))
    overlap_s, overlapped = pipeline(pf := Prefetcher("cpu", workers=2))
    pf.close()
    for a, b in zip(serial, overlapped, strict=True):
        assert torch.equal(a, b)
    assert serial_s >= 2 * n_layers * delay * 0.95
    assert overlap_s < 0.75 * serial_s, (overlap_s, serial_s)


@pytest.mark.parametrize(
    "name,params",
    [
        ("pqcache", {"prefetch_codes": True}),
        ("alisa", {}),
        ("shadowkv", {"chunk": 4, "local_chunks": 2}),
        ("clusterkv", {}),
    ],
)
def test_backend_with_injected_slow_fetch(real: dict[str, Any], name: str, params: dict[str, Any]) -> None:
    calls: list[tuple[int, str]] = []
    store_holder: dict[str, HostStore] = {}

    def slow(layer: int, what: str, rows: torch.Tensor) -> torch.Tensor:
        calls.append((layer, what))
        time.sleep(0.002)
        return store_holder["store"].fetch(layer, what, rows)

    ref = run_steps(get_backend(name, 0.125, prefetch_workers=0, **params), real, 3)
    backend = get_backend(name, 0.125, prefetch_workers=2, **params)
    kv, q = real["kv"], real["q"]
    state = backend.prefill(kv[:, :, :T_CTX], queries=q[:, :T_CTX], fetch=slow)
    store_holder["store"] = state.store
    outs = []
    for t in range(T_CTX, T_CTX + 3):
        for layer in range(kv.shape[0]):
            outs.append(backend.decode_step(state, layer, q[layer, t], kv[layer, 0, t], kv[layer, 1, t]))
    assert calls, "the injected fetch was never used"
    assert state.stats.bytes_fetched > 0
    state.close()
    for a, b in zip(ref, outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_selection_cache_diff() -> None:
    cache, st = SelectionCache(), FetchStats()
    loads: list[torch.Tensor] = []

    def load(miss: torch.Tensor) -> list[torch.Tensor]:
        loads.append(miss.clone())
        return [miss.clamp(min=0).float()[:, :, None, None] * 10]

    ids1 = torch.tensor([[1, 2, 3], [4, 5, 6]])
    (p1,) = cache.update(ids1, load, st)
    assert torch.equal(p1[..., 0, 0], ids1.float() * 10)
    ids2 = torch.tensor([[3, 9, 1], [6, 5, 4]])
    (p2,) = cache.update(ids2, load, st)
    # hits stay in their slots, the miss (9) replaces the stale unit (2)
    assert cache.ids is not None and torch.equal(cache.ids, torch.tensor([[1, 9, 3], [4, 5, 6]]))
    assert torch.equal(p2[..., 0, 0], cache.ids.float() * 10)
    assert torch.equal(loads[-1], torch.tensor([[9], [-1]]))  # only the miss is loaded, padded per head
    assert (st.units_hit, st.units_missed) == (5, 7)


def test_clusterkv_window_is_clustered(real: dict[str, Any]) -> None:
    kv, q = real["kv"], real["q"]
    backend = get_backend("clusterkv", 0.25, window=8, window_clusters=2)
    state = backend.prefill(kv[:, :, :T_CTX])
    n_before = state.layers[1].order.shape[1]
    for t in range(T_CTX, T_CTX + 12):
        backend.decode_step(state, 1, q[1, t], kv[1, 0, t], kv[1, 1, t])
    assert state.layers[1].order.shape[1] == n_before + 8  # one window absorbed
    assert state.generated[1].n == 4
    sel = state.last_selection[1]
    assert sel is not None and sel.shape[1] == budget_tokens(0.25, T_CTX)
    # the absorbed window's tokens are now ordinary, selectable cluster members with their exact K/V
    absorbed = state.layers[1].order[:, n_before:]
    assert set(absorbed[0].tolist()) == set(range(T_CTX, T_CTX + 8))


def test_pqcache_block_cache_hits(real: dict[str, Any]) -> None:
    kv, q = real["kv"], real["q"]
    backend = get_backend("pqcache", 0.125, block=8, cache_tokens=96, cache_topk=8)
    state = backend.prefill(kv[:, :, :T_CTX])
    bytes_per_step = []
    for _ in range(4):  # the same query again and again: the block cache must absorb the fetches
        before = state.stats.bytes_fetched
        backend.decode_step(state, 2, q[2, T_CTX], kv[2, 0, T_CTX], kv[2, 1, T_CTX])
        bytes_per_step.append(state.stats.bytes_fetched - before)
    assert state.stats.units_hit > 0
    assert bytes_per_step[-1] < bytes_per_step[0]
    state.close()


def test_real_model_beats_sink_local(real: dict[str, Any]) -> None:
    """Every method has lower attention-output error than sink+local on a real stories260K context."""
    kv, q = real["kv"], real["q"]
    errs = {}
    for name, params in SMALL.items():
        index = get_backend(name, 0.125, **params).build_index(kv[:, :, :T_CTX], q[:, :T_CTX])
        m = attention_metrics(name, params, 0.125, index, kv[:, :, : T_CTX + 8], q[:, : T_CTX + 8], T_CTX)
        errs[name] = m["out_err"]
    for name in ("shadowkv", "pqcache", "clusterkv", "alisa"):
        assert errs[name] < errs["sink_local"], errs
    assert errs["oracle"] < min(errs[n] for n in ("shadowkv", "pqcache", "clusterkv", "alisa")), errs


def test_alisa_index_carries_quantisation_params_not_int8_rows(real: dict[str, Any]) -> None:
    kv, q = real["kv"][:, :, :T_CTX], real["q"][:, :T_CTX]
    backend = get_backend("alisa", 0.25)
    index = backend.build_index(kv, q)
    assert set(index.tensors) == {"importance", "scale", "zero"}
    assert index.nbytes < kv.numel() * 4 / 16  # the INT8 rows alone would be a quarter of float32
    # The rows the node derives at prefill are the index's quantisation of its KV, element for element.
    state = backend.prefill(kv, index=index)
    rows = state.fetch(0, "kv_q", torch.arange(T_CTX)[None])
    flat = torch.cat([kv[0, 0], kv[0, 1]], -1).reshape(T_CTX, -1)
    scale, zero = index.tensors["scale"][0], index.tensors["zero"][0]
    assert torch.equal(rows[0], alisa.quantize_with(flat, scale, zero))
    state.close()
