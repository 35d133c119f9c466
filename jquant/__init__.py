"""jquant: quantize the weights (and activations, KV cache) of Flax language models.

The public API. Implementation lives in modules named after each concept.
"""

from jquant import _xla_cpu

_xla_cpu.guard()  # before JAX creates its CPU client: see jquant/_xla_cpu.py

from jquant import errors  # noqa: E402
from jquant.checkpoint import restore, save
from jquant.formats import Grid
from jquant.packing import pack, unpack
from jquant.qtensor import QTensor, dequantize, dequantize_tree, is_qtensor
from jquant.quantizers import quantize
from jquant.quantizers.rtn import fake_quant
from jquant.spec import QuantSpec, path_str
from jquant.tree import quantize_tree, summary

__version__ = "0.1.0"

__all__ = [
    "Grid", "QTensor", "QuantSpec", "dequantize", "dequantize_tree", "errors", "fake_quant", "is_qtensor", "pack",
    "path_str", "quantize", "quantize_tree", "restore", "save", "summary", "unpack",
]
