"""Backend selection: Triton kernel on CUDA tensors, torch twin elsewhere.

``KVSTREAM_KERNELS`` overrides the choice: ``torch`` always uses the twins, ``triton`` always uses the Triton
kernels (on CPU tensors this needs ``TRITON_INTERPRET=1``, which is how the tests run them),
``auto`` (default) picks Triton when every tensor argument is on CUDA and triton is importable.
Triton modules are imported only when first used, so the package imports (and the twins run)
without triton installed.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import ModuleType
from typing import Literal

import torch

Backend = Literal["triton", "torch"]
ENV_VAR = "KVSTREAM_KERNELS"


@functools.cache
def triton_available() -> bool:
    """True when the ``triton`` package can be imported (it is not imported here)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a broken or deliberately blocked install counts as absent
        return False


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def choose_backend(*tensors: torch.Tensor | None) -> Backend:
    """The backend for a call whose tensor arguments are ``tensors`` (``None`` entries are ignored)."""
    mode = os.environ.get(ENV_VAR, "auto").strip().lower()
    present = [t for t in tensors if t is not None]
    on_cuda = bool(present) and all(t.is_cuda for t in present)
    if mode == "torch":
        return "torch"
    if mode == "triton":
        if not triton_available():
            raise RuntimeError(f"{ENV_VAR}=triton but triton is not installed")
        if not on_cuda and not _interpret_mode():
            raise RuntimeError(f"{ENV_VAR}=triton with non-CUDA tensors needs TRITON_INTERPRET=1")
        return "triton"
    if mode != "auto":
        raise ValueError(f"{ENV_VAR} must be 'triton', 'torch' or 'auto', got {mode!r}")
    return "triton" if on_cuda and triton_available() else "torch"


def triton_module(name: str) -> ModuleType:
    """Import ``kernels.<name>`` (a module defining ``@triton.jit`` kernels) on first use."""
    return importlib.import_module(f"kernels.{name}")
