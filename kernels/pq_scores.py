"""Product-quantisation asymmetric distance scores (PQCache): torch twin.

The Triton kernels with the same signature live in :mod:`kernels.pq_scores_triton`.
"""

from __future__ import annotations

import torch

from kernels._common import check_float, check_group_reduce, gqa_group, reduce_group


def check_inputs(q: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, group_reduce: str) -> None:
    """Validate the shapes/dtypes documented on :func:`pq_scores`."""
    check_float("q", q, 2)
    check_float("codebooks", codebooks, 4)
    n_kv, m, n_codes, dsub = codebooks.shape
    if m * dsub != q.shape[1]:
        raise ValueError(f"codebooks {tuple(codebooks.shape)}: M * D//M must equal head_dim {q.shape[1]}")
    if n_codes > 256:
        raise ValueError(f"uint8 codes address at most 256 centroids, codebooks have {n_codes}")
    if codes.dtype != torch.uint8 or codes.dim() != 3 or codes.shape[0] != n_kv or codes.shape[2] != m:
        raise ValueError(f"codes must be uint8 [{n_kv}, N, {m}], got {codes.dtype} {tuple(codes.shape)}")
    gqa_group(q.shape[0], n_kv)
    check_group_reduce(group_reduce)


def pq_scores(
    q: torch.Tensor, codebooks: torch.Tensor, codes: torch.Tensor, group_reduce: str = "max"
) -> torch.Tensor:
    """Approximate logits ``q . k_n`` from PQ codes.

    Args:
        q: ``[H, D]`` float queries.
        codebooks: ``[Hkv, M, 2**b, D // M]`` float sub-space centroids.
        codes: ``[Hkv, N, M]`` uint8 centroid id of each token in each sub-space (values < 2**b).
        group_reduce: ``"max"`` or ``"sum"`` over the GQA group.

    Per query head, ``LUT[m, c] = q[m*D/M:(m+1)*D/M] . codebooks[m, c]`` and
    ``score[n] = sum_m LUT[m, codes[n, m]]``.
    Returns ``[Hkv, N]`` float32.
    """
    n_kv, m, n_codes, dsub = codebooks.shape
    group = gqa_group(q.shape[0], n_kv)
    qs = q.float().view(n_kv, group, m, dsub)
    lut = torch.einsum("hgmd,hmcd->hgmc", qs, codebooks.float())  # [Hkv, G, M, 2**b]
    n = codes.shape[1]
    gather_idx = codes.long().permute(0, 2, 1).unsqueeze(1).expand(n_kv, group, m, n)
    scores = torch.gather(lut, 3, gather_idx).sum(dim=2)  # [Hkv, G, N]
    return reduce_group(scores, group_reduce)
