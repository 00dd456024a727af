"""GPU kernels (Triton) for the sparse-recall backends, each with a plain-torch twin of the same math.

Use :mod:`kernels.ops`; it picks the Triton kernel for CUDA tensors and the torch twin elsewhere
(``KVSTREAM_KERNELS=triton|torch|auto`` overrides). Triton is optional and imported on first use.
"""

from kernels import ops
from kernels.dispatch import choose_backend, triton_available

__all__ = ["choose_backend", "ops", "triton_available"]
