"""Range calibration: which clipping range ``[lo, hi]`` each group's grid covers.

All functions take a grouped view ``x`` of shape ``(G, S, R)`` (NaN-padded, see
:mod:`jquant.formats`) and return ``(lo, hi)`` of shape ``(G, 1, R)``.

- ``minmax``: the group's min and max.
- ``percentile``: symmetric grids clip |x| at its ``p``-th percentile; asymmetric ones clip
  at the ``(100−p)``-th and ``p``-th percentiles of x.
- ``mse``: the GPTQ/AWQ grid search: shrink the min-max range by factors
  ``1, 1−1/grid, …, 1−max_shrink`` and keep, per group, the factor whose quantization
  error ``Σ|x − Q(x)|^norm`` is smallest (GPTQ uses norm 2.4, grid 100, max shrink 0.8).
- ``kl``: the entropy calibration of TensorRT (Migacz, "8-bit inference with TensorRT",
  2017): histogram |x|, and for each candidate threshold compare the clipped histogram P
  (outliers folded into the last bin) with its ``2^(b−1)``-level quantization Q; keep
  the threshold of least KL(P‖Q). Meant for per-tensor or per-channel ranges with many
  values; with few values per group the histogram is too sparse to say much.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant import formats


def minmax(x):
    return formats.group_min_max(x)


def percentile(x, *, symmetric: bool, p: float):
    lo, hi = formats.group_min_max(x)
    if symmetric:
        t = jnp.nanpercentile(jnp.abs(x), p, axis=1, keepdims=True)
        return jnp.maximum(lo, -t), jnp.minimum(hi, t)
    return (jnp.nanpercentile(x, 100.0 - p, axis=1, keepdims=True),
            jnp.nanpercentile(x, p, axis=1, keepdims=True))


def mse(x, g: formats.Grid, *, grid: int, max_shrink: float, norm: float):
    """Per-group shrink factor of least ``Σ|x − Q(x)|^norm`` on grid ``g``."""
    x = x.astype(jnp.float32)
    lo0, hi0 = formats.group_min_max(x)
    valid = ~jnp.isnan(x)
    xz = jnp.where(valid, x, 0.0)
    steps = max(1, int(max_shrink * grid))

    def err_at(p):
        lo, hi = p * lo0, p * hi0
        s, z = formats.params_from_range(lo, hi, g)
        q = formats.decode(formats.encode(xz, s, z, g), s, z, g)
        return jnp.sum(jnp.where(valid, jnp.abs(q - xz) ** norm, 0.0), axis=1, keepdims=True)

    def body(i, carry):
        best, best_p = carry
        p = 1.0 - i / grid
        e = err_at(p)
        better = e < best
        return jnp.where(better, e, best), jnp.where(better, p, best_p)

    init = (err_at(1.0), jnp.ones_like(lo0))
    _, best_p = lax.fori_loop(1, steps + 1, body, init)
    return best_p * lo0, best_p * hi0


def kl(x, *, bits: int, symmetric: bool, bins: int, candidates: int):
    """TensorRT-style entropy calibration of the |x| threshold; returns ``(lo, hi)``."""
    x = x.astype(jnp.float32)
    G, S, R = x.shape
    lo, hi = formats.group_min_max(x)
    nlev = 2 ** (bits - 1) if symmetric else 2**bits
    nlev = min(nlev, bins)
    # One histogram per (group, column) unit: units (U, S).
    u = jnp.moveaxis(x, 1, 2).reshape(G * R, S)
    valid = ~jnp.isnan(u)
    a = jnp.where(valid, jnp.abs(u), 0.0)
    amax = jnp.max(a, axis=1, keepdims=True)
    width = jnp.where(amax > 0, amax / bins, 1.0)
    idx = jnp.clip(jnp.floor(a / width), 0, bins - 1).astype(jnp.int32)
    U = u.shape[0]
    hist = jnp.zeros((U, bins), jnp.float32).at[jnp.arange(U)[:, None], idx].add(valid.astype(jnp.float32))
    total = jnp.sum(hist, axis=1, keepdims=True)
    cum = jnp.cumsum(hist, axis=1)
    k = jnp.arange(bins)
    cands = jnp.asarray(np.unique(np.linspace(nlev, bins, max(1, min(candidates, bins - nlev + 1))).round().astype(np.int32)))

    def kl_at(i):
        inside = k < i
        # P: the histogram clipped at bin i, outliers folded into its last bin.
        outliers = total[:, 0] - cum[:, i - 1]
        p = jnp.where(inside, hist, 0.0).at[:, i - 1].add(outliers)
        # Q: hist[:i] merged into nlev levels, each level's mass spread over its nonzero bins.
        lev = jnp.minimum((k * nlev) // i, nlev - 1)
        nz = (p > 0) & inside
        hin = jnp.where(inside, hist, 0.0)
        qsum = jax.vmap(lambda h: jax.ops.segment_sum(h, lev, num_segments=nlev))(hin)
        qcnt = jax.vmap(lambda h: jax.ops.segment_sum(h, lev, num_segments=nlev))(nz.astype(jnp.float32))
        q = jnp.where(nz, (qsum / jnp.maximum(qcnt, 1.0))[:, lev], 0.0)
        pn = p / jnp.maximum(jnp.sum(p, axis=1, keepdims=True), 1e-30)
        qn = q / jnp.maximum(jnp.sum(q, axis=1, keepdims=True), 1e-30)
        qn = jnp.where((pn > 0) & (qn == 0), 1e-10, qn)
        return jnp.sum(jnp.where(pn > 0, pn * (jnp.log(pn) - jnp.log(qn)), 0.0), axis=1)

    def body(j, carry):
        best, best_i = carry
        i = cands[j]
        d = kl_at(i)
        better = d < best
        return jnp.where(better, d, best), jnp.where(better, i, best_i)

    init = (jnp.full((U,), jnp.inf), jnp.full((U,), bins, jnp.int32))
    _, best_i = lax.fori_loop(0, cands.shape[0], body, init)
    t = (best_i.astype(jnp.float32) * width[:, 0]).reshape(G, R)[:, None, :]
    return jnp.maximum(lo, -t), jnp.minimum(hi, t)
