"""LLM.int8()-style outlier decomposition (Dettmers et al., arXiv:2208.07339), weight side.

A few hidden features of large language models carry activations of magnitude far above
the rest; every weight that meets them matters, and they ruin a shared int8 scale. LLM.int8
keeps the input features whose activation magnitude exceeds a threshold (6.0 in the paper)
in 16-bit and quantizes the rest. Here the outlier set is found once, from calibration
(statistic ``act_abs_max``, the largest ``|x_j|`` of each input feature ``j`` over the
calibration tokens): for a Flax kernel ``W`` ``(in, out)``, rows ``j`` with
``act_abs_max_j > threshold`` are stored in float16 (``QTensor.outlier_w``, indices in
``QTensor.outlier_idx``), the remaining rows are quantized by RTN on the spec's grid (int8
per output channel for LLM.int8; any grid that holds 0 exactly), with the outlier rows
zeroed first so they neither set a scale nor add anything twice. A matmul computes
``x @ Q + x[..., idx] @ W_idx`` (:func:`pallas_kernels.dispatch.qmatmul`); bits/weight count
the float rows and their int32 indices.

The paper decides per token at run time and also quantizes the activations to int8; this
is weight-only, with the outlier set fixed from calibration.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jquant.errors import NonFiniteError, ShapeError, SpecError, at
from jquant.quantizers.registry import Method, options_of, register
from jquant.quantizers.rtn import check_weight
from jquant.quantizers.rtn import quantize as rtn_quantize
from jquant.spec import QuantSpec


@dataclasses.dataclass(frozen=True)
class OutlierOptions:
    """``threshold`` (> 0): input features whose calibration ``max |x|`` exceeds it stay in
    float16 (LLM.int8's 6.0); ``max_fraction`` (0 < f ≤ 1): at most this fraction of the
    inputs may be outliers (the largest ones are kept), so a bad threshold cannot silently
    turn the layer into a float one."""

    threshold: float = 6.0
    max_fraction: float = 0.1

    def validate(self) -> None:
        if not self.threshold > 0:
            raise SpecError(f"outliers threshold must be > 0, got {self.threshold}")
        if not 0.0 < self.max_fraction <= 1.0:
            raise SpecError(f"outliers max_fraction must be in (0, 1], got {self.max_fraction}")


def _check(spec: QuantSpec, path: str | None = None) -> None:
    if spec.format != "int" or (not spec.symmetric and spec.zero_type != "int"):
        raise SpecError(at(path, "outliers quantizes the other rows on an int grid that holds 0 exactly "
                                 "(symmetric, or an integer zero point); got " + spec.describe()))
    if spec.axis != 0:
        raise SpecError(at(path, f"outliers keeps input rows of a Flax kernel (in, out): axis must be 0, got {spec.axis}"))


def outlier_rows(act_abs_max, threshold: float, max_fraction: float) -> np.ndarray:
    """Sorted int32 indices of the input features whose ``max |x|`` exceeds ``threshold``,
    the largest ``floor(max_fraction·in)`` of them at most."""
    a = np.asarray(act_abs_max, np.float64)
    idx = np.flatnonzero(a > threshold)
    cap = int(np.floor(max_fraction * a.size))
    if idx.size > cap:
        idx = idx[np.argsort(-a[idx], kind="stable")[:cap]]
    return np.sort(idx).astype(np.int32)


def quantize_with_outliers(w, spec: QuantSpec, act_abs_max, *, path: str | None = None):
    """Quantize ``w`` (``(in, out)``) keeping the outlier input rows in float16. Returns
    ``(QTensor, info)`` with ``info = {"outliers": n, "fraction": n/in}``."""
    o = options_of(spec)
    _check(spec, path)
    w = jnp.asarray(w)
    check_weight(w, path)
    if w.ndim != 2:
        raise ShapeError(at(path, f"outliers needs a 2-D kernel (in, out), got shape {tuple(w.shape)}"))
    a = jnp.asarray(act_abs_max)
    if a.shape != (w.shape[0],):
        raise ShapeError(at(path, f"act_abs_max of shape {tuple(a.shape)} does not match the kernel's "
                                  f"{w.shape[0]} inputs"))
    if not bool(jnp.all(jnp.isfinite(a))):
        raise NonFiniteError(at(path, "act_abs_max holds NaN/Inf (NaN/Inf in the calibration activations)"))
    idx = outlier_rows(a, o.threshold, o.max_fraction)
    inner = dataclasses.replace(spec, method="rtn", options=())
    if idx.size == 0:
        qt = rtn_quantize(w, inner, path=path)
        return dataclasses.replace(qt, method="outliers"), {"outliers": 0, "fraction": 0.0}
    j = jnp.asarray(idx)
    big = float(jnp.max(jnp.abs(w[j].astype(jnp.float32))))
    if big > float(jnp.finfo(jnp.float16).max):
        raise NonFiniteError(at(path, f"an outlier row holds |w| = {big:.6g}, beyond float16's 65504 (outlier rows "
                                      "are stored in float16); the weight is not usable at this scale"))
    qt = rtn_quantize(w.at[j].set(0), inner, path=path)
    qt = dataclasses.replace(qt, method="outliers", outlier_idx=j, outlier_w=w[j].astype(jnp.float16))
    return qt, {"outliers": int(idx.size), "fraction": idx.size / w.shape[0]}


def _quantize(w, spec: QuantSpec, stats, *, path: str | None = None):
    return quantize_with_outliers(w, spec, stats["act_abs_max"], path=path)


register(Method("outliers", _quantize, stats=("act_abs_max",), options=OutlierOptions, formats=("int",),
                check=_check, paper="arXiv:2208.07339",
                summary="input features with large calibration activations kept in float16, the rest RTN "
                        "(int8 per channel for LLM.int8)"))
