"""Fake quantization for training: quantize–dequantize in the forward pass, a straight-through
estimator (STE) in the backward pass, and learned step sizes and zero points.

- :func:`lsq_fake_quant`: integer grids with a *learned* scale (and zero point) per group:
  LSQ (Esser et al., arXiv:1902.08153) and LSQ+ (Bhalgat et al., arXiv:2004.09576). The
  forward value is exactly what the converted :class:`~jquant.qtensor.QTensor` dequantizes to
  (the scale rounded to its storage dtype, the zero point to an integer, the codes by
  :func:`jquant.formats.encode`), so :func:`to_qtensor` after training loses nothing. The
  backward pass (``jax.custom_vjp``) is the papers':

  - weight: ``1`` where the code is not clipped, ``0`` where it is (STE);
  - scale: ``round(w/s) - w/s`` unclipped, ``c - z`` (the clipped code's offset) clipped;
    times LSQ's gradient scale ``1/sqrt(S·Q_P)`` (``S`` weights per scale, ``Q_P`` the
    largest positive code);
  - zero point (asymmetric): ``0`` unclipped, ``-s`` clipped, with the same gradient scale.

- :func:`ste_fake_quant`: any format and method of the package with its scales computed from
  the weight (RTN / k-quant blocks …), gradient straight through (identity).

Shapes: a kernel ``w`` in Flax layout ``(in, out)``; ``scale`` and ``zero`` in the QTensor's
stored layout (``(G, out)`` for groups along ``in``), float32 while training.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from jquant import formats
from jquant.errors import SpecError
from jquant.qtensor import QTensor
from jquant.spec import QuantSpec


def _check_lsq(spec: QuantSpec) -> None:
    if spec.format != "int" or (not spec.symmetric and spec.zero_type != "int"):
        raise SpecError(f"learned step sizes train integer grids (format 'int', symmetric or with an integer zero "
                        f"point); got format {spec.format!r}"
                        + ("" if spec.format != "int" else f", zero_type {spec.zero_type!r}")
                        + ": use ste_fake_quant for a fixed-scale straight-through estimate")


def _q_range(grid) -> tuple[int, int, int]:
    """``(lowest code, highest code, Q_P)``: codes are unsigned; Q_P the largest positive level."""
    bits = grid.bits
    if grid.symmetric:
        half = 2 ** (bits - 1)
        return (0 if grid.full_range else 1), 2 ** bits - 1, half - 1
    return 0, 2 ** bits - 1, 2 ** bits - 1


def _stored(v, dtype: str):
    return v.astype(dtype).astype(jnp.float32)


def _forward(xg, s, z, grid):
    """Exact quantize–dequantize of grouped ``xg`` ``(G, S, R)`` with ``(G, 1, R)`` params."""
    s = _stored(s, grid.scale_dtype)
    if grid.symmetric:
        c = formats.encode(xg, s, None, grid)
        return formats.decode(c, s, None, grid), c, s, None
    lo, hi, _ = _q_range(grid)
    zi = jnp.clip(jnp.round(z), lo, hi)
    c = formats.encode(xg, s, zi, grid)
    return formats.decode(c, s, zi, grid), c, s, zi


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _lsq(xg, s, z, grid, gscale):
    return _forward(xg, s, z, grid)[0]


def _lsq_fwd(xg, s, z, grid, gscale):
    y, c, s_st, zi = _forward(xg, s, z, grid)
    return y, (xg, c, s_st, zi)


def _lsq_bwd(grid, gscale, res, g):
    xg, c, s, zi = res
    lo, hi, _ = _q_range(grid)
    v = formats.div(xg.astype(jnp.float32), s)
    half = 2 ** (grid.bits - 1)
    if grid.symmetric:
        unclipped = jnp.abs(jnp.round(v)) <= half - 1 if not grid.full_range else (
            (jnp.round(v) >= -half) & (jnp.round(v) <= half - 1))
        offset = c.astype(jnp.float32) - half  # the clipped code's level
    else:
        r = jnp.round(v) + zi
        unclipped = (r >= lo) & (r <= hi)
        offset = c.astype(jnp.float32) - zi
    gf = g.astype(jnp.float32)
    dx = jnp.where(unclipped, gf, 0.0).astype(xg.dtype)
    ds_el = jnp.where(unclipped, jnp.round(v) - v, offset)
    ds = jnp.sum(gf * ds_el, axis=1, keepdims=True) * gscale
    if grid.symmetric:
        dz = None
    else:
        dz = jnp.sum(jnp.where(unclipped, 0.0, -s) * gf, axis=1, keepdims=True) * gscale
    return dx, ds, dz


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def grad_scale(spec: QuantSpec, shape) -> float:
    """LSQ's gradient scale ``1/sqrt(S·Q_P)`` for a kernel of ``shape`` under ``spec``."""
    from jquant.quantizers.rtn import layout_for

    _, _, qp = _q_range(spec.grid)
    return 1.0 / math.sqrt(layout_for(tuple(shape), spec).size * qp)


def lsq_fake_quant(w, scale, zero, spec: QuantSpec, *, lsq_grad_scale: bool = True):
    """Quantize–dequantize ``w`` with learned ``scale`` (and ``zero``), LSQ gradients.

    Args:
      w: float kernel (any rank; groups along ``spec.axis``).
      scale: float32 in the stored layout (``QTensor.scale``'s shape).
      zero: float32 in the stored layout for asymmetric grids (rounded to an integer in the
        forward pass), None for symmetric ones.
      spec: an ``int`` QuantSpec (symmetric, or asymmetric with ``zero_type='int'``).
      lsq_grad_scale: multiply the scale and zero gradients by ``1/sqrt(S·Q_P)`` (LSQ).
    Returns:
      ``w``'s shape and dtype: exactly ``to_qtensor(w, scale, zero, spec).dequantize()``.
    Raises:
      SpecError: a grid LSQ does not train (see :func:`ste_fake_quant` for the others).
    """
    from jquant.quantizers.rtn import layout_for

    _check_lsq(spec)
    lay = layout_for(tuple(w.shape), spec)
    xg = lay.to_groups(w.astype(jnp.float32))
    sg = lay.params_from_stored(jnp.asarray(scale, jnp.float32))
    zg = None if spec.symmetric else lay.params_from_stored(jnp.asarray(zero, jnp.float32))
    if zg is None:
        zg = jnp.zeros_like(sg)  # unused by symmetric grids; its cotangent is dropped
    gs = grad_scale(spec, w.shape) if lsq_grad_scale else 1.0
    y = _lsq(xg, sg, zg, spec.grid, gs)
    return lay.from_groups(y).astype(w.dtype)


def init_params(w, spec: QuantSpec, qt: QTensor | None = None) -> dict:
    """Trainable ``{"scale", "zero"}`` (float32, stored layout) from a quantized result: ``qt``
    (RTN / GPTQ / HQQ output of the same grid, contiguous groups), or the RTN of ``w``.

    Raises:
      SpecError: a grid LSQ does not train, or a ``qt`` of another grid or act-order layout.
    """
    from jquant.quantizers.rtn import quantize

    _check_lsq(spec)
    if qt is None:
        qt = quantize(w, dataclasses.replace(spec, method="rtn"))
    if qt.grid.fmt != "int" or qt.grid.bits != spec.bits or bool(qt.grid.symmetric) != bool(spec.symmetric) \
            or qt.g_idx is not None or qt.perm is not None:
        raise SpecError(f"init_params: the starting QTensor ({qt!r}) must have the spec's grid ({spec.bits}-bit "
                        f"{'symmetric' if spec.symmetric else 'asymmetric'}) and contiguous groups"
                        + (" (GPTQ's act-order without static groups stores a g_idx; use static_groups: true)"
                           if qt.g_idx is not None or qt.perm is not None else ""))
    zero = None if spec.symmetric else jnp.asarray(qt.zero, jnp.float32)
    return {"scale": jnp.asarray(qt.scale, jnp.float32), "zero": zero}


def to_qtensor(w, scale, zero, spec: QuantSpec, *, method: str = "qat") -> QTensor:
    """The QTensor holding exactly :func:`lsq_fake_quant`'s forward value (codes by
    :func:`jquant.formats.encode` with the stored scale and the rounded zero point)."""
    from jquant.quantizers.rtn import layout_for, pack_qtensor

    _check_lsq(spec)
    lay = layout_for(tuple(w.shape), spec)
    xg = lay.to_groups(jnp.asarray(w).astype(jnp.float32))
    sg = lay.params_from_stored(jnp.asarray(scale, jnp.float32))
    zg = None if spec.symmetric else lay.params_from_stored(jnp.asarray(zero, jnp.float32))
    _, c, s, zi = _forward(xg, sg, zg if zg is not None else jnp.zeros_like(sg), spec.grid)
    return pack_qtensor(lay.from_groups(c), s, zi, lay, spec, jnp.asarray(w).dtype, method=method)


@jax.custom_vjp
def _identity_ste(w, q):
    return q


_identity_ste.defvjp(lambda w, q: (q, None), lambda _, g: (g, jnp.zeros_like(g)))


def ste_fake_quant(w, spec: QuantSpec):
    """Quantize–dequantize ``w`` with any method and format of the package whose scales come
    from ``w`` itself (RTN on every grid; k-quant and block-float blocks), gradient straight
    through to ``w`` (identity: their ranges cover the weights, nothing is clipped)."""
    from jquant.quantizers import quantize_weight

    if spec.method in ("rtn",):
        from jquant.quantizers.rtn import fake_quant

        q = fake_quant(w, spec)
    else:
        q, _ = quantize_weight(w, spec, {})
        q = q.dequantize(w.dtype)
    return _identity_ste(w, jax.lax.stop_gradient(q))
