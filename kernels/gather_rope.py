"""ShadowKV key rebuild: gather low-rank rows, project per KV head, apply RoPE: torch twin.

The Triton kernel with the same signature lives in :mod:`kernels.gather_rope_triton`.
"""

from __future__ import annotations

import torch

from kernels._common import check_float, check_index

ROPE_STYLES = ("interleaved", "half")


def check_inputs(
    u: torch.Tensor, sv: torch.Tensor, idx: torch.Tensor, positions: torch.Tensor | None, rope_style: str
) -> None:
    """Validate the shapes/dtypes documented on :func:`gather_rope_keys`."""
    check_float("u", u, 2)
    check_float("sv", sv, 3)
    if sv.shape[0] != u.shape[1]:
        raise ValueError(f"u {tuple(u.shape)} and sv {tuple(sv.shape)} disagree on the rank")
    if sv.shape[2] % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {sv.shape[2]}")
    check_index("idx", idx, sv.shape[1])
    if positions is not None and (positions.shape != idx.shape or positions.dtype != torch.int64):
        raise ValueError(
            f"positions must be int64 {tuple(idx.shape)}, got {positions.dtype} {tuple(positions.shape)}"
        )
    if rope_style not in ROPE_STYLES:
        raise ValueError(f"rope_style must be one of {ROPE_STYLES}, got {rope_style!r}")


def rope_inv_freq(head_dim: int, theta: float, device: torch.device) -> torch.Tensor:
    """``theta ** (-2i / head_dim)`` for ``i < head_dim // 2``, float32 (computed in float64 like llama2c)."""
    exps = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return (float(theta) ** (-exps)).to(torch.float32).to(device)


def out_dtype(u: torch.Tensor, sv: torch.Tensor) -> torch.dtype:
    return torch.promote_types(u.dtype, sv.dtype)


def gather_rope_keys(
    u: torch.Tensor,
    sv: torch.Tensor,
    idx: torch.Tensor,
    positions: torch.Tensor | None = None,
    theta: float = 10000.0,
    rope_style: str = "interleaved",
) -> torch.Tensor:
    """Rebuild post-RoPE keys of selected tokens from a low-rank pre-RoPE factorisation ``K_h ~ U @ SV_h``.

    Args:
        u: ``[N, r]`` float left factor shared by all KV heads.
        sv: ``[r, Hkv, D]`` float right factor (singular values folded in).
        idx: ``[Hkv, K]`` int64 token rows of ``u``; ``-1`` is padding and yields a zero row.
        positions: optional ``[Hkv, K]`` int64 RoPE positions (default: ``idx``).
        theta: RoPE base.
        rope_style: ``"interleaved"`` rotates pairs ``(2i, 2i+1)`` (llama2.c / Meta); ``"half"`` rotates
            ``(i, i + D/2)`` (HF ``rotate_half``). Both use frequency ``theta ** (-2i/D)``.

    Angles are ``float32(position) * float32(inv_freq)`` as in HF Llama. Returns ``[Hkv, K, D]`` in
    ``promote_types(u.dtype, sv.dtype)`` (float32 accumulation).
    """
    d = sv.shape[2]
    valid = idx >= 0
    rows = u[idx.clamp(min=0)].float()  # [Hkv, K, r]
    x = torch.einsum("hkr,rhd->hkd", rows, sv.float())
    pos = (idx if positions is None else positions).to(torch.float32)
    ang = pos.unsqueeze(-1) * rope_inv_freq(d, theta, u.device)  # [Hkv, K, D/2]
    cos, sin = ang.cos(), ang.sin()
    if rope_style == "interleaved":
        x0, x1 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)
    else:
        x0, x1 = x[..., : d // 2], x[..., d // 2 :]
        out = torch.cat((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    out = out * valid.unsqueeze(-1)
    return out.to(out_dtype(u, sv))
