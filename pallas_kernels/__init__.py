"""Packed low-bit matmul kernels (Pallas, Triton backend) and their dispatch.

- :func:`wq_matmul`: weight-only ``x @ W`` with packed 1–8-bit weights (group scales and
  zeros, BitNet binary/ternary), dequantized in registers inside the matmul tile;
  :func:`wq_matmul_reference` beside it.
- :func:`int_matmul` / :func:`w8a8_matmul`: int8×int8→int32 with per-token activation and
  per-channel weight scales (W8A8; W4A4 widened to int8); :func:`int_matmul_reference`.
- :func:`xla_matmul`: the chunked dequantize-and-dot for CPU (no float weight in memory).
- :func:`qmatmul`: what the models call; picks the backend (:mod:`pallas_kernels.dispatch`).
- :mod:`pallas_kernels.tuning`: block sizes per shape, and :func:`autotune`.
- :mod:`pallas_kernels.triton_w4`: the W4 kernel written in Triton through jax-triton
  (optional, ``pip install jquant[gpu]``).

Every kernel runs in Pallas interpret mode on CPU (``interpret=True``) for tests.
"""

from pallas_kernels.dispatch import (
    BACKENDS,
    explain,
    get_backend,
    prepare,
    qmatmul,
    set_backend,
    use_backend,
)
from pallas_kernels.int_matmul import (
    int_matmul,
    int_matmul_reference,
    quantize_per_token,
    w8a8_matmul,
)
from pallas_kernels.layout import KernelUnsupported, kernel_weight
from pallas_kernels.tuning import Config, autotune
from pallas_kernels.wq_matmul import wq_matmul, wq_matmul_reference
from pallas_kernels.xla_matmul import xla_matmul

__all__ = ["BACKENDS", "Config", "KernelUnsupported", "autotune", "explain", "get_backend", "int_matmul",
    "int_matmul_reference", "kernel_weight", "prepare", "qmatmul", "quantize_per_token", "set_backend",
    "use_backend", "w8a8_matmul", "wq_matmul", "wq_matmul_reference", "xla_matmul"]
