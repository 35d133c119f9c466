"""Quantization-aware training: fake quantization with a straight-through estimator and
learned step sizes (LSQ / LSQ+), driven by Optax.

- :mod:`jquant.qat.fake_quant`: :func:`lsq_fake_quant` (learned scales and zero points of
  integer grids, the LSQ gradients), :func:`ste_fake_quant` (any format, identity gradient),
  :func:`init_params` (from an RTN / GPTQ / HQQ result), :func:`to_qtensor` (the QTensor
  holding exactly the trained forward values).
- :mod:`jquant.qat.train`: :func:`train` (the Optax loop: distillation or next-token loss,
  data-parallel, checkpoints with exact resume), :class:`QATConfig`, :class:`QATResult`.
"""

from jquant.qat.fake_quant import grad_scale, init_params, lsq_fake_quant, ste_fake_quant, to_qtensor
from jquant.qat.train import QATConfig, QATResult, batch_indices, train

__all__ = ["QATConfig", "QATResult", "batch_indices", "grad_scale", "init_params", "lsq_fake_quant",
           "ste_fake_quant", "to_qtensor", "train"]
