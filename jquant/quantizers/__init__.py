"""Quantization methods, one module each, behind one interface (:mod:`.registry`).

==============  ============================================================================================  ==============================
method          what it does                                                                                  statistics
==============  ============================================================================================  ==============================
``rtn``         round to nearest on a range-calibrated grid                                                   none
``gptq``        GPTQ, error feedback through the Hessian (arXiv:2210.17323)                                   ``hessian``
``hqq``         half-quadratic proximal solve of the zero point (and scale)                                   none
``awq``         activation-aware input scales folded into the preceding op, then RTN/GPTQ (arXiv:2306.00978)  ``act_abs_mean``, ``hessian``
``kquant``      GGUF block types Q4_0..Q8_0, k-quants Q2_K..Q6_K (llama.cpp)                                  ``act_sq_mean`` (imatrix only)
``bcq``         binary-coding quantization Σ α_i·b_i per group (arXiv:1802.00150)                             none
``blockfloat``  OCP MX (MXFP4, MXFP8) and NVIDIA NVFP4 block-scaled floats                                    none
``outliers``    LLM.int8: large-activation inputs kept in float16, the rest RTN (arXiv:2208.07339)            ``act_abs_max``
==============  ============================================================================================  ==============================

``quantize(w, spec, stats=None)`` runs whichever method ``spec.method`` names; the
calibration pipeline collects the statistics a method declares (:mod:`.stats`).
"""

from jquant.quantizers import awq, bcq, blockfloat, gptq, hqq, kquant, outliers, rtn  # noqa: F401  (each registers its method)
from jquant.quantizers.registry import Method, available, get, needs_data, quantize_weight, register
from jquant.quantizers.stats import STATISTICS, collect


def quantize(w, spec, stats=None, *, path: str | None = None):
    """Quantize one array with the method ``spec.method`` names; returns the QTensor.

    ``w`` is a float array (a Flax kernel is ``(in, out)``, groups along ``spec.axis``);
    ``stats`` holds the input statistics a data-driven method needs (``{name: array}``).
    """
    return quantize_weight(w, spec, stats, path=path)[0]


__all__ = ["Method", "STATISTICS", "available", "collect", "get", "needs_data", "quantize", "quantize_weight",
           "register"]
