"""Kernels: torch twins against naive dense math, Triton kernels (interpreter, CPU tensors) against the twins.

Triton runs under ``TRITON_INTERPRET=1`` (set by a module fixture before any Triton kernel module is imported;
``kernels`` imports those lazily), so the tests run on CPU and keep tensors small.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from kernels import centroid_scores as cs_twin
from kernels import gather_rope as gr_twin
from kernels import kmeans as km_twin
from kernels import ops
from kernels import pq_scores as pq_twin
from kernels import sparse_attention as sa_twin
from kernels.dispatch import choose_backend

DTYPES = [torch.float32, torch.float16]
TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module", autouse=True)
def _interpret() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRITON_INTERPRET", "1")
        yield


def _triton(name: str) -> ModuleType:
    pytest.importorskip("triton")
    import importlib

    return importlib.import_module(f"kernels.{name}_triton")


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOL[dtype]
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _qkv(g: torch.Generator, n_heads: int, n_kv: int, n: int, d: int) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(shape, generator=g) for shape in ((n_heads, d), (n_kv, n, d), (n_kv, n, d)))


def _idx(n_kv: int, k: int, n: int, seed: int, pad_every: int = 0) -> torch.Tensor:
    """Distinct random positions per KV head, optionally with every ``pad_every``-th entry set to -1."""
    g = _gen(seed)
    idx = torch.stack([torch.randperm(n, generator=g)[:k] for _ in range(n_kv)])
    if pad_every:
        idx[:, ::pad_every] = -1
    return idx


# ----------------------------------------------------------------------------------------- real model data


@pytest.fixture(scope="module")
def real() -> dict[str, torch.Tensor]:
    """Layer-2 post-RoPE keys/values ``[Hkv=4, T, 8]``, last-step queries ``[8, 8]`` and the full cache."""
    from client.model import Llama2c

    model = Llama2c.from_file()
    ids = model.sample(64, seed=3)
    res = model.forward(ids, return_queries=True)
    assert res.queries is not None
    layer = 2
    return {
        "k": res.kv[layer, 0].transpose(0, 1).contiguous(),
        "v": res.kv[layer, 1].transpose(0, 1).contiguous(),
        "q": res.queries[layer, -1].contiguous(),
        "kv": res.kv,
    }


# ----------------------------------------------------------------------------- sparse decode attention


def _dense_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    group = q.shape[0] // k.shape[0]
    kk = k.float().repeat_interleave(group, 0)
    vv = v.float().repeat_interleave(group, 0)
    return F.scaled_dot_product_attention(q.float()[:, None], kk, vv, scale=scale)[:, 0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n_heads", "n_kv", "d"), [(4, 4, 64), (8, 2, 128), (8, 1, 64), (8, 4, 8)])
def test_sparse_attention_twin_all_indices_is_dense_sdpa(
    n_heads: int, n_kv: int, d: int, dtype: torch.dtype
) -> None:
    g = _gen(0)
    n = 37
    q = torch.randn(n_heads, d, generator=g).to(dtype)
    k = torch.randn(n_kv, n, d, generator=g).to(dtype)
    v = torch.randn(n_kv, n, d, generator=g).to(dtype)
    idx = torch.arange(n).repeat(n_kv, 1)
    out = sa_twin.sparse_decode_attention(q, k, v, idx)
    assert out.dtype == dtype and out.shape == (n_heads, d)
    _close(out, _dense_sdpa(q, k, v), dtype)


def test_sparse_attention_twin_subset_padding_and_empty() -> None:
    g = _gen(1)
    q, k, v = _qkv(g, 8, 2, 50, 64)
    idx = _idx(2, 20, 50, seed=1)
    out = sa_twin.sparse_decode_attention(q, k, v, idx, scale=0.3)
    kg = torch.stack([k[h, idx[h]] for h in range(2)])
    vg = torch.stack([v[h, idx[h]] for h in range(2)])
    ref = F.scaled_dot_product_attention(
        q[:, None], kg.repeat_interleave(4, 0), vg.repeat_interleave(4, 0), scale=0.3
    )[:, 0]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    padded = torch.cat([idx, torch.full((2, 7), -1)], dim=1)[:, torch.randperm(27, generator=g)]
    torch.testing.assert_close(sa_twin.sparse_decode_attention(q, k, v, padded, scale=0.3), out)
    empty = idx.clone()
    empty[1] = -1
    res = sa_twin.sparse_decode_attention(q, k, v, empty, scale=0.3)
    assert torch.equal(res[4:], torch.zeros(4, 64))
    torch.testing.assert_close(res[:4], out[:4])
    # No position selected at all (the Triton kernel's contract too): zeros, not an error.
    assert torch.equal(sa_twin.sparse_decode_attention(q, k, v, idx[:, :0]), torch.zeros(8, 64))
    assert torch.equal(sa_twin.sparse_decode_attention(q, k[:, :0], v[:, :0], None), torch.zeros(8, 64))


def _int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = x.abs().amax(dim=1) / 127.0  # channel-wise over tokens: [Hkv, D]
    return torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8), scale


def test_sparse_attention_twin_int8_equals_dequantised() -> None:
    g = _gen(2)
    q, k, v = _qkv(g, 8, 2, 40, 64)
    (kq, ks), (vq, vs) = _int8(k), _int8(v)
    idx = _idx(2, 25, 40, seed=2, pad_every=5)
    out = sa_twin.sparse_decode_attention(q, kq, vq, idx, k_scale=ks, v_scale=vs)
    ref = sa_twin.sparse_decode_attention(q, kq.float() * ks[:, None], vq.float() * vs[:, None], idx)
    torch.testing.assert_close(out, ref)
    # INT8 channel-wise quantisation stays close to full precision (ALISA's claim, loosely).
    assert (out - sa_twin.sparse_decode_attention(q, k, v, idx)).abs().max() < 0.05


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16])
@pytest.mark.parametrize(
    ("n_heads", "n_kv", "d", "n", "k_sel", "pad"),
    [(4, 4, 64, 70, 45, 3), (8, 2, 128, 50, 33, 0), (8, 1, 64, 200, 150, 7), (8, 4, 8, 30, 1, 0)],
)
def test_sparse_attention_triton_matches_twin(
    n_heads: int, n_kv: int, d: int, n: int, k_sel: int, pad: int, dtype: torch.dtype
) -> None:
    tr = _triton("sparse_attention")
    g = _gen(3)
    q = torch.randn(n_heads, d, generator=g).to(dtype)
    k = torch.randn(n_kv, n, d, generator=g).to(dtype)
    v = torch.randn(n_kv, n, d, generator=g).to(dtype)
    idx = _idx(n_kv, k_sel, n, seed=3, pad_every=pad)
    _close(tr.sparse_decode_attention(q, k, v, idx), sa_twin.sparse_decode_attention(q, k, v, idx), dtype)


def test_sparse_attention_triton_edge_cases() -> None:
    tr = _triton("sparse_attention")
    g = _gen(4)
    q, k, v = _qkv(g, 8, 2, 90, 64)
    # Empty selections: whole head, and whole splits (the first 64 entries of head 0 are padding).
    idx = _idx(2, 90, 90, seed=4)
    idx[1] = -1
    idx[0, :64] = -1
    out = tr.sparse_decode_attention(q, k, v, idx)
    assert torch.equal(out[4:], torch.zeros(4, 64))
    torch.testing.assert_close(out, sa_twin.sparse_decode_attention(q, k, v, idx), atol=2e-5, rtol=2e-5)
    assert torch.equal(tr.sparse_decode_attention(q, k, v, idx[:, :0]), torch.zeros(8, 64))
    # INT8 K/V with channel scales, fp16 queries; strided (non-contiguous) K.
    (kq, ks), (vq, vs) = _int8(k), _int8(v)
    idx = _idx(2, 41, 90, seed=5, pad_every=4)
    q16 = q.half()
    _close(
        tr.sparse_decode_attention(q16, kq, vq, idx, None, ks, vs),
        sa_twin.sparse_decode_attention(q16, kq, vq, idx, None, ks, vs),
        torch.float16,
    )
    kt = torch.randn(2, 64, 90, generator=g).transpose(1, 2)
    _close(
        tr.sparse_decode_attention(q, kt, v, idx, 0.2),
        sa_twin.sparse_decode_attention(q, kt, v, idx, 0.2),
        torch.float32,
    )


@pytest.mark.parametrize(("n_heads", "n_kv", "d"), [(4, 4, 64), (8, 2, 128), (8, 1, 64)])
def test_decode_attention_parts_equals_attention_over_the_concatenation(
    n_heads: int, n_kv: int, d: int
) -> None:
    g = _gen(6)
    q = torch.randn(n_heads, d, generator=g)
    sizes = [3, 0, 70, 1]  # an empty part, odd lengths
    kv = [torch.randn(2, n_kv, n, d, generator=g) for n in sizes]
    wide = torch.randn(n_kv, 5, 2 * d, generator=g)  # strided parts, as ClusterKV's [K | V] rows give them
    k_parts = [x[0] for x in kv] + [wide[..., :d]]
    v_parts = [x[1] for x in kv] + [wide[..., d:]]
    k, v = torch.cat(k_parts, 1), torch.cat(v_parts, 1)
    out = sa_twin.decode_attention_parts(q, k_parts, v_parts, scale=0.2)
    concat = sa_twin.sparse_decode_attention(q, k, v, None, scale=0.2)
    torch.testing.assert_close(out, concat, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(out, _dense_sdpa(q, k, v, scale=0.2), atol=2e-5, rtol=2e-5)
    # idx=None is "every position, in place": the same as the full index.
    full = torch.arange(k.shape[1]).expand(n_kv, -1)
    every = sa_twin.sparse_decode_attention(q, k, v, None)
    assert torch.equal(every, sa_twin.sparse_decode_attention(q, k, v, full))
    tr = _triton("sparse_attention")
    _close(tr.decode_attention_parts(q, k_parts, v_parts, 0.2), out, torch.float32)
    _close(tr.sparse_decode_attention(q, k, v, None), every, torch.float32)
    # Nothing to attend: zeros; mismatched parts: a clear error.
    empty = [torch.zeros(n_kv, 0, d)]
    assert torch.equal(ops.decode_attention_parts(q, empty, empty), torch.zeros(n_heads, d))
    with pytest.raises(ValueError, match="part 0"):
        ops.decode_attention_parts(q, [k], [v[:, :-1]])
    with pytest.raises(ValueError, match="as many"):
        ops.decode_attention_parts(q, [k], [])


def test_sparse_attention_real_model(real: dict[str, torch.Tensor]) -> None:
    q, k, v = real["q"], real["k"], real["v"]
    t = k.shape[1]
    dense = _dense_sdpa(q, k, v)
    full = torch.arange(t).repeat(4, 1)
    torch.testing.assert_close(sa_twin.sparse_decode_attention(q, k, v, full), dense, atol=1e-5, rtol=1e-5)
    # Top-16 per KV head by group-max logits plus sink/local segments, with padding.
    logits = torch.einsum("hgd,hnd->hn", q.view(4, 2, 8), k)
    top = logits[:, 2:-4].topk(16, dim=1).indices + 2
    idx = torch.cat(
        [torch.arange(2).repeat(4, 1), top, torch.arange(t - 4, t).repeat(4, 1), torch.full((4, 3), -1)], 1
    )
    tr = _triton("sparse_attention")
    _close(
        tr.sparse_decode_attention(q, k, v, idx), sa_twin.sparse_decode_attention(q, k, v, idx), torch.float32
    )
    _close(
        tr.sparse_decode_attention(q.half(), k.half(), v.half(), idx),
        sa_twin.sparse_decode_attention(q.half(), k.half(), v.half(), idx),
        torch.float16,
    )


# ------------------------------------------------------------------------------------- centroid scoring


@pytest.mark.parametrize("group_reduce", ["max", "sum"])
@pytest.mark.parametrize("softmax", [True, False])
def test_score_centroids_twin_vs_naive(group_reduce: str, softmax: bool) -> None:
    g = _gen(5)
    q, c = torch.randn(8, 16, generator=g), torch.randn(2, 11, 16, generator=g)
    out = cs_twin.score_centroids(q, c, group_reduce, softmax, scale=0.5)
    for h in range(2):
        rows = []
        for j in range(4):
            s = torch.tensor([float(q[h * 4 + j] @ c[h, i]) * 0.5 for i in range(11)])
            rows.append(torch.softmax(s, 0) if softmax else s)
        stack = torch.stack(rows)
        ref = stack.max(0).values if group_reduce == "max" else stack.sum(0)
        torch.testing.assert_close(out[h], ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n_heads", "n_kv", "d", "n_c"), [(4, 4, 64, 70), (8, 2, 128, 33), (8, 1, 64, 1)])
def test_score_centroids_triton_matches_twin(
    n_heads: int, n_kv: int, d: int, n_c: int, dtype: torch.dtype
) -> None:
    tr = _triton("centroid_scores")
    g = _gen(6)
    q = torch.randn(n_heads, d, generator=g).to(dtype)
    c = torch.randn(n_kv, n_c, d, generator=g).to(dtype)
    for group_reduce in ("max", "sum"):
        for softmax in (True, False):
            a = tr.score_centroids(q, c, group_reduce, softmax)
            assert a.dtype == torch.float32 and a.shape == (n_kv, n_c)
            torch.testing.assert_close(
                a, cs_twin.score_centroids(q, c, group_reduce, softmax), atol=1e-5, rtol=1e-5
            )


def test_score_centroids_real_landmarks(real: dict[str, torch.Tensor]) -> None:
    tr = _triton("centroid_scores")
    q, k = real["q"], real["k"]
    landmarks = k.view(4, -1, 4, 8).mean(dim=2)  # ShadowKV: mean of each 4-token chunk, [Hkv, T/4, D]
    for group_reduce in ("max", "sum"):
        a = tr.score_centroids(q, landmarks, group_reduce, True)
        torch.testing.assert_close(
            a, cs_twin.score_centroids(q, landmarks, group_reduce), atol=1e-6, rtol=1e-5
        )
        if group_reduce == "sum":
            torch.testing.assert_close(a.sum(1), torch.full((4,), 2.0))  # two softmax rows per KV head


# --------------------------------------------------------------------------------------------- PQ scores


def _pq_reconstruct(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Decoded keys ``[Hkv, N, D]``: concatenation of each sub-space's chosen centroid."""
    n_kv, m, _, _ = codebooks.shape
    parts = [torch.stack([codebooks[h, j, codes[h, :, j].long()] for h in range(n_kv)]) for j in range(m)]
    return torch.cat(parts, dim=-1)


def test_pq_scores_twin_equals_dot_with_decoded_keys() -> None:
    g = _gen(7)
    q = torch.randn(8, 32, generator=g)
    cb = torch.randn(2, 4, 16, 8, generator=g)
    codes = torch.randint(0, 16, (2, 45, 4), generator=g, dtype=torch.uint8)
    logits = torch.einsum("hgd,hnd->hgn", q.view(2, 4, 32), _pq_reconstruct(cb, codes))
    torch.testing.assert_close(pq_twin.pq_scores(q, cb, codes, "max"), logits.amax(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pq_twin.pq_scores(q, cb, codes, "sum"), logits.sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("n_heads", "n_kv", "d", "m", "n_codes", "n"),
    [(4, 4, 64, 2, 64, 300), (8, 2, 128, 4, 256, 33), (8, 1, 64, 8, 16, 1), (8, 4, 8, 2, 16, 131)],
)
def test_pq_scores_triton_matches_twin(
    n_heads: int, n_kv: int, d: int, m: int, n_codes: int, n: int, dtype: torch.dtype
) -> None:
    tr = _triton("pq_scores")
    g = _gen(8)
    q = torch.randn(n_heads, d, generator=g).to(dtype)
    cb = torch.randn(n_kv, m, n_codes, d // m, generator=g).to(dtype)
    codes = torch.randint(0, n_codes, (n_kv, n, m), generator=g, dtype=torch.uint8)
    for group_reduce in ("max", "sum"):
        torch.testing.assert_close(
            tr.pq_scores(q, cb, codes, group_reduce),
            pq_twin.pq_scores(q, cb, codes, group_reduce),
            atol=3e-5,
            rtol=1e-5,
        )


def test_pq_scores_real_model(real: dict[str, torch.Tensor]) -> None:
    """PQ of real keys (2 sub-spaces of 4 dims, 16 centroids) with the twin k-means; scores track q.k."""
    tr = _triton("pq_scores")
    q, k = real["q"], real["k"]
    sub = k.view(4, -1, 2, 4).permute(0, 2, 1, 3).reshape(8, -1, 4)  # [Hkv*M, T, D/M]
    cents, assign = km_twin_kmeans(sub, 16)
    cb = cents.view(4, 2, 16, 4)
    codes = assign.view(4, 2, -1).permute(0, 2, 1).to(torch.uint8).contiguous()
    out = tr.pq_scores(q, cb, codes, "sum")
    torch.testing.assert_close(out, pq_twin.pq_scores(q, cb, codes, "sum"), atol=1e-5, rtol=1e-5)
    exact = torch.einsum("hgd,hnd->hn", q.view(4, 2, 8), k)
    for h in range(4):  # the approximation must rank tokens like the exact logits
        assert torch.corrcoef(torch.stack([out[h], exact[h]]))[0, 1] > 0.8


def km_twin_kmeans(x: torch.Tensor, n_clusters: int) -> tuple[torch.Tensor, torch.Tensor]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVSTREAM_KERNELS", "torch")
        return ops.kmeans(x, n_clusters, iters=8, metric="l2", seed=0)


# ------------------------------------------------------------------------------------ gather + RoPE keys


def _rope_half(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """HF Llama ``rotate_half`` RoPE on ``[..., D]`` with positions ``[...]``."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = pos.float()[..., None] * inv
    emb = torch.cat([ang, ang], dim=-1)
    rot = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], dim=-1)
    return x * emb.cos() + rot * emb.sin()


def test_gather_rope_twin_vs_naive() -> None:
    from client.model.llama2c import apply_rope

    g = _gen(9)
    u, sv = torch.randn(40, 6, generator=g), torch.randn(6, 2, 16, generator=g)
    idx = _idx(2, 13, 40, seed=9, pad_every=4)
    pos = torch.randint(0, 500, (2, 13), generator=g)
    keys = torch.einsum("nr,rhd->hnd", u, sv)  # pre-RoPE [Hkv, N, D]
    out_i = gr_twin.gather_rope_keys(u, sv, idx, pos)
    out_h = gr_twin.gather_rope_keys(u, sv, idx, pos, theta=500.0, rope_style="half")
    for h in range(2):
        for j in range(13):
            row = int(idx[h, j])
            if row < 0:
                assert torch.equal(out_i[h, j], torch.zeros(16)) and torch.equal(out_h[h, j], torch.zeros(16))
                continue
            ref_i = apply_rope(keys[h, row][None, None], pos[h, j : j + 1], 10000.0)[0, 0]
            torch.testing.assert_close(out_i[h, j], ref_i, atol=1e-4, rtol=1e-4)
            ref_h = _rope_half(keys[h, row], pos[h, j], 500.0)
            torch.testing.assert_close(out_h[h, j], ref_h, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.bfloat16])
@pytest.mark.parametrize(("n_kv", "d", "rank", "k_sel"), [(2, 64, 20, 40), (4, 128, 48, 33), (1, 8, 5, 3)])
def test_gather_rope_triton_matches_twin(
    n_kv: int, d: int, rank: int, k_sel: int, dtype: torch.dtype
) -> None:
    tr = _triton("gather_rope")
    g = _gen(10)
    n = 60
    u = torch.randn(n, rank, generator=g).to(dtype)
    sv = (torch.randn(rank, n_kv, d, generator=g) / math.sqrt(rank)).to(dtype)
    idx = _idx(n_kv, k_sel, n, seed=10, pad_every=4)
    pos = torch.randint(0, 131072, (n_kv, k_sel), generator=g)
    for style in ("interleaved", "half"):
        for positions in (None, pos):
            a = tr.gather_rope_keys(u, sv, idx, positions, 10000.0, style)
            assert a.dtype == dtype and a.shape == (n_kv, k_sel, d)
            _close(a, gr_twin.gather_rope_keys(u, sv, idx, positions, 10000.0, style), dtype)


def test_gather_rope_real_model_shadowkv_rebuild(real: dict[str, torch.Tensor]) -> None:
    """SVD of real pre-RoPE keys: full rank rebuilds the post-RoPE keys; low rank matches on Triton."""
    from client.model.llama2c import apply_rope

    post = real["kv"][2, 0]  # [T, Hkv, D]
    t = post.shape[0]
    pre = apply_rope(post, torch.arange(t), 10000.0, inverse=True).reshape(t, -1)  # [T, Hkv*D]
    u_full, s, vh = torch.linalg.svd(pre.double(), full_matrices=False)
    idx = _idx(4, 21, t, seed=11, pad_every=5)
    for rank in (32, 4):
        u = u_full[:, :rank].float().contiguous()
        sv = (s[:rank, None] * vh[:rank]).float().view(rank, 4, 8).contiguous()
        out = gr_twin.gather_rope_keys(u, sv, idx)
        if rank == 32:
            ref = post.transpose(0, 1)[torch.arange(4)[:, None], idx.clamp(min=0)] * (idx >= 0)[..., None]
            torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
        tr = _triton("gather_rope")
        torch.testing.assert_close(tr.gather_rope_keys(u, sv, idx), out, atol=2e-5, rtol=2e-5)


# -------------------------------------------------------------------------------------------------- k-means


def test_kmeans_twin_update_vs_naive_and_empty_clusters() -> None:
    g = _gen(12)
    x = torch.randn(2, 30, 5, generator=g)
    assign = torch.randint(0, 4, (2, 30), generator=g)  # cluster 4 and 5 are empty
    prev = torch.randn(2, 6, 5, generator=g)
    out = km_twin.kmeans_update(x, assign, 6, prev)
    for b in range(2):
        for c in range(6):
            members = x[b, assign[b] == c]
            ref = members.mean(0) if len(members) else prev[b, c]
            torch.testing.assert_close(out[b, c], ref)
    assert torch.equal(km_twin.kmeans_update(x, assign, 6)[:, 4:], torch.zeros(2, 2, 5))


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_kmeans_twin_assign_vs_naive(metric: str) -> None:
    g = _gen(13)
    x, c = torch.randn(2, 25, 6, generator=g), torch.randn(2, 5, 6, generator=g)
    out = km_twin.kmeans_assign(x, c, metric)
    for b in range(2):
        for n in range(25):
            if metric == "cosine":
                ref = F.cosine_similarity(x[b, n][None], c[b], dim=-1).argmax()
            else:
                ref = ((x[b, n][None] - c[b]) ** 2).sum(-1).argmin()
            assert int(out[b, n]) == int(ref)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kmeans_recovers_separated_clusters(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "triton":
        pytest.importorskip("triton")
    monkeypatch.setenv("KVSTREAM_KERNELS", backend)
    g = _gen(14)
    centers = torch.randn(2, 4, 16, generator=g) * 10
    truth = torch.randint(0, 4, (2, 80), generator=g)
    x = torch.gather(centers, 1, truth[..., None].expand(-1, -1, 16)) + 0.1 * torch.randn(
        2, 80, 16, generator=g
    )
    for metric in ("l2", "cosine"):
        cents, assign = ops.kmeans(x, 4, iters=10, metric=metric, seed=1)
        assert cents.shape == (2, 4, 16) and assign.dtype == torch.int64
        for b in range(2):  # same partition up to relabelling
            pairs = set(zip(assign[b].tolist(), truth[b].tolist(), strict=True))
            assert len(pairs) == 4
        again = ops.kmeans(x, 4, iters=10, metric=metric, seed=1)
        assert torch.equal(again[1], assign) and torch.equal(again[0], cents)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("n_b", "n", "d", "n_c"), [(2, 150, 64, 10), (1, 70, 128, 40), (4, 33, 8, 7)])
def test_kmeans_triton_steps_match_twin(n_b: int, n: int, d: int, n_c: int, dtype: torch.dtype) -> None:
    tr = _triton("kmeans")
    g = _gen(15)
    x = torch.randn(n_b, n, d, generator=g).to(dtype)
    c = torch.randn(n_b, n_c, d, generator=g)
    for metric in ("cosine", "l2"):
        assert torch.equal(tr.kmeans_assign(x, c, metric), km_twin.kmeans_assign(x, c, metric))
    assign = km_twin.kmeans_assign(x, c, "l2")
    torch.testing.assert_close(
        tr.kmeans_update(x, assign, n_c + 3, None), km_twin.kmeans_update(x, assign, n_c + 3, None)
    )
    torch.testing.assert_close(tr.kmeans_update(x, assign, n_c, c), km_twin.kmeans_update(x, assign, n_c, c))


def test_kmeans_real_keys_triton_vs_torch(
    real: dict[str, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """ClusterKV-style cosine k-means of real keys per KV head: both backends reach the same clustering."""
    pytest.importorskip("triton")
    k = real["k"]
    monkeypatch.setenv("KVSTREAM_KERNELS", "torch")
    c_ref, a_ref = ops.kmeans(k, 6, iters=6, metric="cosine", seed=2)
    monkeypatch.setenv("KVSTREAM_KERNELS", "triton")
    c_tr, a_tr = ops.kmeans(k, 6, iters=6, metric="cosine", seed=2)
    assert (a_tr == a_ref).float().mean() > 0.95
    if torch.equal(a_tr, a_ref):
        torch.testing.assert_close(c_tr, c_ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- dispatch and API


def test_dispatch_env(monkeypatch: pytest.MonkeyPatch) -> None:
    x = torch.zeros(2)
    monkeypatch.setenv("KVSTREAM_KERNELS", "auto")
    assert choose_backend(x) == "torch"  # CPU tensors
    monkeypatch.setenv("KVSTREAM_KERNELS", "torch")
    assert choose_backend(x) == "torch"
    monkeypatch.setenv("KVSTREAM_KERNELS", "bogus")
    with pytest.raises(ValueError):
        choose_backend(x)
    monkeypatch.setenv("KVSTREAM_KERNELS", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError):
        choose_backend(x)


def test_ops_forced_triton_matches_forced_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("triton")
    g = _gen(16)
    q, k, v = _qkv(g, 8, 2, 20, 16)
    idx = _idx(2, 9, 20, seed=16, pad_every=3)
    cb = torch.randn(2, 2, 8, 8, generator=g)
    codes = torch.randint(0, 8, (2, 20, 2), generator=g, dtype=torch.uint8)
    u, sv = torch.randn(20, 4, generator=g), torch.randn(4, 2, 16, generator=g)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("KVSTREAM_KERNELS", backend)
        results[backend] = [
            ops.sparse_decode_attention(q, k, v, idx),
            ops.score_centroids(q, k, "sum"),
            ops.pq_scores(q, cb, codes),
            ops.gather_rope_keys(u, sv, idx, rope_style="half"),
            ops.kmeans_assign(k, k[:, :3], "l2").float(),
            ops.kmeans_update(k, torch.arange(20).repeat(2, 1) % 3, 3),
        ]
    for a, b in zip(results["torch"], results["triton"], strict=True):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=2e-5)


def test_ops_validate_inputs() -> None:
    q, k = torch.randn(8, 16), torch.randn(3, 10, 16)
    with pytest.raises(ValueError):  # 8 heads over 3 KV heads
        ops.sparse_decode_attention(q, k, k, torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError):  # int8 without scales
        ops.sparse_decode_attention(q, k[:2].to(torch.int8), k[:2], torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError):
        ops.score_centroids(q, k[:2], group_reduce="mean")
    with pytest.raises(ValueError):
        ops.gather_rope_keys(
            torch.randn(10, 4), torch.randn(4, 2, 16), torch.zeros(2, 3, dtype=torch.int64), rope_style="neox"
        )
    with pytest.raises(ValueError):
        ops.kmeans(k, 11)


def test_package_imports_without_triton() -> None:
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, kernels\n"
        "from kernels import ops\n"
        "assert not kernels.triton_available()\n"
        "q = torch.randn(4, 8); k = torch.randn(2, 5, 8)\n"
        "out = ops.sparse_decode_attention(q, k, k, torch.arange(5).repeat(2, 1))\n"
        "assert out.shape == (4, 8)\n"
    )
    env = {**os.environ, "KVSTREAM_KERNELS": "auto"}
    subprocess.run(
        [sys.executable, "-c", code], check=True, env=env, cwd=os.path.dirname(os.path.dirname(__file__))
    )
