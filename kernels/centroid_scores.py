"""Query-vs-centroid (landmark) scoring with per-head softmax and GQA group reduction: torch twin.

The Triton kernel with the same signature lives in :mod:`kernels.centroid_scores_triton`.
"""

from __future__ import annotations

import math

import torch

from kernels._common import check_float, check_group_reduce, gqa_group, reduce_group


def check_inputs(q: torch.Tensor, centroids: torch.Tensor, group_reduce: str) -> None:
    """Validate the shapes/dtypes documented on :func:`score_centroids`."""
    check_float("q", q, 2)
    check_float("centroids", centroids, 3)
    if centroids.shape[2] != q.shape[1]:
        raise ValueError(f"centroids {tuple(centroids.shape)} must end in head_dim {q.shape[1]}")
    gqa_group(q.shape[0], centroids.shape[0])
    check_group_reduce(group_reduce)


def score_centroids(
    q: torch.Tensor,
    centroids: torch.Tensor,
    group_reduce: str = "max",
    softmax: bool = True,
    scale: float | None = None,
) -> torch.Tensor:
    """Score centroids/landmarks against one decode query.

    Args:
        q: ``[H, D]`` float queries.
        centroids: ``[Hkv, C, D]`` float landmarks or cluster centroids.
        group_reduce: ``"max"`` or ``"sum"`` over the ``H // Hkv`` query heads sharing a KV head.
        softmax: softmax over ``C`` per query head before the group reduction.
        scale: logit scale, default ``1/sqrt(D)``.

    Returns ``[Hkv, C]`` float32 (feed to ``torch.topk``).
    """
    n_heads, d = q.shape
    n_kv = centroids.shape[0]
    group = gqa_group(n_heads, n_kv)
    s = 1.0 / math.sqrt(d) if scale is None else float(scale)
    logits = torch.einsum("hgd,hcd->hgc", q.float().view(n_kv, group, d), centroids.float()) * s
    if softmax:
        logits = torch.softmax(logits, dim=-1)
    return reduce_group(logits, group_reduce)
