"""Shape checks and small helpers shared by the torch twins and the Triton launchers."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def next_pow2(n: int, minimum: int = 1) -> int:
    """Smallest power of two >= max(n, minimum) (Triton block sizes must be powers of two)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def gqa_group(n_heads: int, n_kv_heads: int) -> int:
    """Query heads per KV head; query head ``h`` reads KV head ``h // group``."""
    if n_kv_heads <= 0 or n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv_heads} KV heads")
    return n_heads // n_kv_heads


def check_float(name: str, t: torch.Tensor, ndim: int) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16/bfloat16/float32, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_index(name: str, idx: torch.Tensor, n_kv_heads: int) -> None:
    if idx.dtype != torch.int64 or idx.dim() != 2 or idx.shape[0] != n_kv_heads:
        raise ValueError(f"{name} must be int64 [{n_kv_heads}, K], got {idx.dtype} {tuple(idx.shape)}")


def check_group_reduce(group_reduce: str) -> None:
    if group_reduce not in ("max", "sum"):
        raise ValueError(f"group_reduce must be 'max' or 'sum', got {group_reduce!r}")


def reduce_group(x: torch.Tensor, group_reduce: str) -> torch.Tensor:
    """Reduce ``[Hkv, G, ...]`` over the GQA group axis 1."""
    return x.amax(dim=1) if group_reduce == "max" else x.sum(dim=1)


def dot_mode(*dtypes: torch.dtype) -> str:
    """How a Triton kernel multiplies tiles of these dtypes (a ``DOT`` constexpr).

    ``"fp16"``: all float16, native tensor-core dot. ``"tf32"``: all 16-bit (bf16 present): upcast to float32
    and use TF32, whose 11-bit significand holds fp16/bf16 values exactly, so products stay exact (and the
    Triton interpreter cannot run bf16 dots). ``"ieee"``: anything float32 or dequantised, exact fp32 dot.
    """
    if all(t == torch.float16 for t in dtypes):
        return "fp16"
    if all(t in (torch.float16, torch.bfloat16) for t in dtypes):
        return "tf32"
    return "ieee"
