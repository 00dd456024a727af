"""Public kernel API: validates inputs, then runs the Triton kernel or its torch twin.

Backend choice: :mod:`kernels.dispatch`.

Every function here has a torch twin of the same name and signature in ``kernels/<kernel>.py`` and a Triton
implementation in ``kernels/<kernel>_triton.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kernels import centroid_scores as _cs
from kernels import codec_decode as _cd
from kernels import gather_rope as _gr
from kernels import kmeans as _km
from kernels import pq_scores as _pq
from kernels import sparse_attention as _sa
from kernels.dispatch import choose_backend, triton_module


def codec_decode(
    blob: bytes | bytearray | memoryview, device: str | torch.device = "cuda", out: torch.Tensor | None = None
) -> torch.Tensor:
    """Decode a codec blob to ``[layers, 2, tokens, kv_heads, head_dim]`` (the blob's dtype) on ``device``.

    Lossy blobs are entropy-decoded and dequantized on the GPU by a Triton kernel (the compressed bytes are
    what crosses PCIe); lossless ones, and every blob off-GPU, use :func:`codec.decode` on the CPU. With
    ``out`` (same shape and dtype, any strides, e.g. a token slice of a preallocated cache) the result is
    written there and returned. Raises :class:`codec.CodecError` for malformed or corrupt blobs.
    See :func:`kernels.codec_decode.codec_decode`.
    """
    # choose_backend decides from tensors: an empty one (no allocation) stands in for the target device
    probe = out if out is not None else torch.empty(0, device=device)
    if choose_backend(probe) == "triton":
        fn = triton_module("codec_decode_triton").codec_decode
    else:
        fn = _cd.codec_decode
    result: torch.Tensor = fn(blob, device, out)
    return result


def sparse_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor | None,
    scale: float | None = None,
    k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention over selected positions: q ``[H, D]``, k/v ``[Hkv, N, D]`` (float, or int8 with
    ``k_scale``/``v_scale`` ``[Hkv, D]``), idx ``[Hkv, K]`` int64 (-1 = padding; ``None`` = every position,
    in place) -> ``[H, D]`` in ``q.dtype``.

    See :func:`kernels.sparse_attention.sparse_decode_attention` for the full contract.
    """
    _sa.check_inputs(q, k, v, idx, k_scale, v_scale)
    if choose_backend(q, k, v, idx) == "triton":
        fn = triton_module("sparse_attention_triton").sparse_decode_attention
    else:
        fn = _sa.sparse_decode_attention
    out: torch.Tensor = fn(q, k, v, idx, scale, k_scale, v_scale)
    return out


def decode_attention_parts(
    q: torch.Tensor,
    k_parts: Sequence[torch.Tensor],
    v_parts: Sequence[torch.Tensor],
    scale: float | None = None,
) -> torch.Tensor:
    """Decode attention over K/V in parts ``[Hkv, N_i, D]`` as if concatenated along the tokens: q ``[H, D]``
    -> ``[H, D]`` in ``q.dtype``. See :func:`kernels.sparse_attention.decode_attention_parts`."""
    _sa.check_parts(q, k_parts, v_parts)
    if choose_backend(q, *k_parts, *v_parts) == "triton":
        fn = triton_module("sparse_attention_triton").decode_attention_parts
    else:
        fn = _sa.decode_attention_parts
    out: torch.Tensor = fn(q, k_parts, v_parts, scale)
    return out


def score_centroids(
    q: torch.Tensor,
    centroids: torch.Tensor,
    group_reduce: str = "max",
    softmax: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """q ``[H, D]`` vs centroids ``[Hkv, C, D]`` -> ``[Hkv, C]`` float32 (optional per-head softmax over C,
    then max/sum over the GQA group). See :func:`kernels.centroid_scores.score_centroids`."""
    _cs.check_inputs(q, centroids, group_reduce)
    if choose_backend(q, centroids) == "triton":
        fn = triton_module("centroid_scores_triton").score_centroids
    else:
        fn = _cs.score_centroids
    out: torch.Tensor = fn(q, centroids, group_reduce, softmax, scale)
    return out


def pq_scores(
    q: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, group_reduce: str = "max"
) -> torch.Tensor:
    """PQ asymmetric-distance logits: q ``[H, D]``, codebooks ``[Hkv, M, 2**b, D//M]``, codes ``[Hkv, N, M]``
    uint8 -> ``[Hkv, N]`` float32. See :func:`kernels.pq_scores.pq_scores`."""
    _pq.check_inputs(q, codebooks, codes, group_reduce)
    if choose_backend(q, codebooks, codes) == "triton":
        fn = triton_module("pq_scores_triton").pq_scores
    else:
        fn = _pq.pq_scores
    out: torch.Tensor = fn(q, codebooks, codes, group_reduce)
    return out


def gather_rope_keys(
    u: torch.Tensor,
    sv: torch.Tensor,
    idx: torch.Tensor,
    positions: torch.Tensor | None = None,
    theta: float = 10000.0,
    rope_style: str = "interleaved",
) -> torch.Tensor:
    """ShadowKV key rebuild ``RoPE(U[idx] @ SV_h)``: u ``[N, r]``, sv ``[r, Hkv, D]``, idx ``[Hkv, K]`` int64
    (-1 -> zero row) -> ``[Hkv, K, D]``. See :func:`kernels.gather_rope.gather_rope_keys`."""
    _gr.check_inputs(u, sv, idx, positions, rope_style)
    if choose_backend(u, sv, idx, positions) == "triton":
        fn = triton_module("gather_rope_triton").gather_rope_keys
    else:
        fn = _gr.gather_rope_keys
    out: torch.Tensor = fn(u, sv, idx, positions, theta, rope_style)
    return out


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Nearest centroid: x ``[B, N, D]``, centroids ``[B, C, D]`` -> ``[B, N]`` int64.
    See :func:`kernels.kmeans.kmeans_assign`."""
    _km.check_assign_inputs(x, centroids, metric)
    if choose_backend(x, centroids) == "triton":
        fn = triton_module("kmeans_triton").kmeans_assign
    else:
        fn = _km.kmeans_assign
    out: torch.Tensor = fn(x, centroids, metric)
    return out


def kmeans_update(
    x: torch.Tensor, assign: torch.Tensor, n_clusters: int, prev: torch.Tensor | None = None
) -> torch.Tensor:
    """Cluster means: x ``[B, N, D]``, assign ``[B, N]`` int64 -> ``[B, C, D]`` float32; empty clusters keep
    ``prev`` (or zeros). See :func:`kernels.kmeans.kmeans_update`."""
    _km.check_update_inputs(x, assign, n_clusters, prev)
    if choose_backend(x, assign, prev) == "triton":
        fn = triton_module("kmeans_triton").kmeans_update
    else:
        fn = _km.kmeans_update
    out: torch.Tensor = fn(x, assign, n_clusters, prev)
    return out


def kmeans(
    x: torch.Tensor, n_clusters: int, iters: int = 10, metric: str = "cosine", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batched Lloyd k-means.

    Args:
        x: ``[B, N, D]`` float points (e.g. post-RoPE keys per KV head).
        n_clusters: ``C`` (``1 <= C <= N``).
        iters: Lloyd iterations (fixed count, no host sync for convergence checks).
        metric: ``"cosine"`` (assign by cosine similarity, centroids = mean of raw members, as ClusterKV) or
            ``"l2"``.
        seed: seeds the k-means++ initialisation (:func:`kernels.kmeans.kmeans_init`).

    Returns ``(centroids [B, C, D] float32, assign [B, N] int64)``; ``assign`` is the nearest-centroid
    assignment for the returned centroids. Empty clusters keep their previous centroid.
    """
    if iters < 0:
        raise ValueError(f"iters must be >= 0, got {iters}")
    centroids = _km.kmeans_init(x, n_clusters, seed, metric)
    for _ in range(iters):
        assign = kmeans_assign(x, centroids, metric)
        centroids = kmeans_update(x, assign, n_clusters, prev=centroids)
    return centroids, kmeans_assign(x, centroids, metric)
