"""Batched k-means building blocks (assignment, centroid update, seeded init): torch twins.

The Triton kernels with the same signatures live in :mod:`kernels.kmeans_triton`; the Lloyd loop itself is
:func:`kernels.ops.kmeans`, which dispatches each step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels._common import check_float

METRICS = ("cosine", "l2")
NORM_EPS = 1e-12


def check_assign_inputs(x: torch.Tensor, centroids: torch.Tensor, metric: str) -> None:
    """Validate the shapes/dtypes documented on :func:`kmeans_assign`."""
    check_float("x", x, 3)
    check_float("centroids", centroids, 3)
    if centroids.shape[0] != x.shape[0] or centroids.shape[2] != x.shape[2]:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match x {tuple(x.shape)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")


def check_update_inputs(
    x: torch.Tensor, assign: torch.Tensor, n_clusters: int, prev: torch.Tensor | None
) -> None:
    """Validate the shapes/dtypes documented on :func:`kmeans_update`."""
    check_float("x", x, 3)
    if assign.dtype != torch.int64 or assign.shape != x.shape[:2]:
        raise ValueError(
            f"assign must be int64 {tuple(x.shape[:2])}, got {assign.dtype} {tuple(assign.shape)}"
        )
    if n_clusters < 1:
        raise ValueError(f"n_clusters must be >= 1, got {n_clusters}")
    if prev is not None and prev.shape != (x.shape[0], n_clusters, x.shape[2]):
        raise ValueError(f"prev must be [{x.shape[0]}, {n_clusters}, {x.shape[2]}], got {tuple(prev.shape)}")


def kmeans_assign(x: torch.Tensor, centroids: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """Nearest centroid of every point.

    Args:
        x: ``[B, N, D]`` float points.
        centroids: ``[B, C, D]`` float.
        metric: ``"cosine"`` (argmax of cosine similarity; both sides normalised here) or ``"l2"``
            (argmin of squared distance, computed as argmax of ``2 x.c - |c|^2``).

    Returns ``[B, N]`` int64; exact ties go to the lowest centroid id.
    """
    xf, cf = x.float(), centroids.float()
    if metric == "cosine":
        scores = F.normalize(xf, dim=-1, eps=NORM_EPS) @ F.normalize(cf, dim=-1, eps=NORM_EPS).transpose(1, 2)
    else:
        scores = 2.0 * (xf @ cf.transpose(1, 2)) - cf.pow(2).sum(-1).unsqueeze(1)
    return scores.argmax(dim=-1)


def kmeans_update(
    x: torch.Tensor, assign: torch.Tensor, n_clusters: int, prev: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of the (raw, un-normalised) points assigned to each cluster.

    Args:
        x: ``[B, N, D]`` float points.
        assign: ``[B, N]`` int64 cluster ids in ``[0, n_clusters)``.
        n_clusters: ``C``.
        prev: optional ``[B, C, D]`` previous centroids; an empty cluster keeps its row
            (zeros without ``prev``).

    Returns ``[B, C, D]`` float32.
    """
    b, _, d = x.shape
    sums = torch.zeros(b, n_clusters, d, dtype=torch.float32, device=x.device)
    sums.scatter_add_(1, assign.unsqueeze(-1).expand(-1, -1, d), x.float())
    counts = torch.zeros(b, n_clusters, dtype=torch.float32, device=x.device)
    counts.scatter_add_(1, assign, torch.ones_like(assign, dtype=torch.float32))
    means = sums / counts.clamp(min=1.0).unsqueeze(-1)
    fallback = torch.zeros_like(means) if prev is None else prev.float()
    return torch.where((counts > 0).unsqueeze(-1), means, fallback)


def kmeans_init(x: torch.Tensor, n_clusters: int, seed: int, metric: str = "cosine") -> torch.Tensor:
    """k-means++ seeding: initial centroids ``[B, C, D]`` float32, rows of ``x``.

    Each next centre is drawn with probability proportional to the distance (squared L2, or ``1 - cos`` for
    cosine) to the nearest centre chosen so far. The uniform draws come from a CPU generator seeded by
    ``seed`` and the sampling is a cumsum + searchsorted on ``x``'s device, so the pick is deterministic and
    needs no host sync; ``C`` small launches in total, about the cost of one Lloyd iteration.
    """
    b, n, _ = x.shape
    if not 1 <= n_clusters <= n:
        raise ValueError(f"n_clusters must be in [1, {n}], got {n_clusters}")
    draws = torch.rand(b, n_clusters, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    draws = draws.to(x.device)
    xf = x.float()
    pts = F.normalize(xf, dim=-1, eps=NORM_EPS) if metric == "cosine" else xf
    rows = torch.arange(b, device=x.device)

    def dist(centre: torch.Tensor) -> torch.Tensor:  # [B, D] -> [B, N]
        if metric == "cosine":
            return (1.0 - (pts * centre[:, None]).sum(-1)).clamp(min=0.0)
        return (pts - centre[:, None]).pow(2).sum(-1)

    picks = [(draws[:, 0] * n).long().clamp(max=n - 1)]
    nearest = dist(pts[rows, picks[0]])
    for i in range(1, n_clusters):
        cdf = nearest.double().cumsum(dim=1)
        pick = torch.searchsorted(cdf, draws[:, i : i + 1] * cdf[:, -1:], right=True).squeeze(1)
        pick = pick.clamp(max=n - 1)
        picks.append(pick)
        nearest = torch.minimum(nearest, dist(pts[rows, pick]))
    return xf[rows[:, None], torch.stack(picks, dim=1)]
