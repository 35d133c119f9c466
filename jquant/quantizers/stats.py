"""Statistics of a linear layer's input that data-driven methods ask for.

A method declares the names of the statistics it needs (:attr:`Method.stats`); the
calibration pipeline collects exactly the union of them for every group of linears that
share one input, in one pass over the calibration batches, and hands each linear a
``{name: array}`` mapping. Every statistic is a running reduction over the input rows
``x`` (``(..., in)``, all leading axes are rows), jit-compatible, and kept in float32:

================  =========  ==================================================================
name              shape      value over ``n`` input rows
================  =========  ==================================================================
``hessian``       (in, in)   ``H = 2·XᵀX/n`` (GPTQ's Hessian of the layer-wise squared error)
``act_sq_mean``   (in,)      ``mean_t x_t,j²`` per input channel (llama.cpp's importance matrix)
``act_abs_mean``  (in,)      ``mean_t |x_t,j|`` per input channel (AWQ's activation magnitude)
``act_abs_max``   (in,)      ``max_t |x_t,j|`` per input channel (LLM.int8's outlier features)
================  =========  ==================================================================

Means are running means (the old value rescaled by ``n/(n+m)``), so they stay O(1)
however many batches come. Inside ``shard_map`` with the batch split over a mesh axis,
``update(state, x, axis_name)`` reduces the batch's partial sums (``psum``; ``pmax`` for
the maximum) over that axis, so every device holds the statistic of the whole batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jquant.errors import DataError, NonFiniteError, ShapeError, SpecError

_HP = lax.Precision.HIGHEST


class Hessian(NamedTuple):
    """Running mean ``H = 2·XᵀX/n`` (float32) over ``n`` input rows."""

    H: jax.Array
    n: jax.Array

    @classmethod
    def zeros(cls, features: int) -> Hessian:
        return cls(jnp.zeros((features, features), jnp.float32), jnp.zeros((), jnp.float32))


_GRAM_BLOCK = 512  # columns per block of the Gram matrix's upper triangle


def gram(x) -> jax.Array:
    """``xᵀx`` for ``x`` ``(rows, k)``: the blocks on and above the diagonal, in column blocks
    of about ``_GRAM_BLOCK``, the ones below mirrored from them (``xᵀx`` is symmetric), so
    ``(b+1)/2b`` of the products of ``b`` blocks (0.75 at two). Each block is the product
    of the same columns as in the full ``xᵀx``, summed over the same rows. A diagonal block
    is averaged with its transpose: a tiled GEMM need not sum ``(i, j)`` and ``(j, i)`` in the
    same order (seen on one CPU: 0.2% of the entries an ulp apart), and the result must be
    exactly symmetric."""
    k = x.shape[-1]
    nb = max(1, round(k / _GRAM_BLOCK))

    def prod(a, b, diagonal):
        p = lax.dot_general(a, b, (((0,), (0,)), ((), ())), precision=_HP)
        return (p + p.T) * 0.5 if diagonal else p

    if nb == 1:
        return prod(x, x, True)
    edges = [(k * i // nb, k * (i + 1) // nb) for i in range(nb)]
    blk = {(i, j): prod(x[:, a0:a1], x[:, b0:b1], i == j)
           for i, (a0, a1) in enumerate(edges) for j, (b0, b1) in enumerate(edges) if j >= i}
    return jnp.concatenate([jnp.concatenate([blk[i, j] if j >= i else blk[j, i].T for j in range(nb)], axis=1)
                            for i in range(nb)], axis=0)


def _psum(v, axis_name):
    return v if axis_name is None else lax.psum(v, axis_name)


@functools.partial(jax.jit, static_argnames="axis_name")
def hessian_update(h: Hessian, x, axis_name=None) -> Hessian:
    """Fold a batch of inputs ``x`` (``(..., in)``) into the running mean.

    ``H ← H·n/(n+m) + 2·xᵀx/(n+m)``: the old sum is rescaled rather than the new batch
    added to a growing sum, so the values stay O(1) however many batches come. With
    ``axis_name`` (inside ``shard_map``), ``x`` is this device's share of the batch and ``m``
    and ``xᵀx`` are summed over the axis.
    """
    x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
    m = _psum(jnp.float32(x.shape[0]), axis_name)
    n = h.n + m
    xs = x * jnp.sqrt(2.0 / n)
    H = h.H * (h.n / n) + _psum(gram(xs), axis_name)
    return Hessian(H, n)


class Statistic(NamedTuple):
    """One running statistic: ``init(features) -> state``, ``update(state, x) -> state``
    (jit-compatible, ``x`` of shape ``(..., in)``), ``finalize(state) -> array``."""

    name: str
    doc: str
    init: Callable[[int], Any]
    update: Callable[..., Any]  # (state, x, axis_name=None) -> state
    finalize: Callable[[Any], jax.Array]


def _pmax(v, axis_name):
    return v if axis_name is None else lax.pmax(v, axis_name)


def _rows(x):
    return x.reshape(-1, x.shape[-1]).astype(jnp.float32)


def _mean_stat(name: str, doc: str, f: Callable) -> Statistic:
    """A running per-channel mean of ``f(x)``."""

    def init(k):
        return (jnp.zeros((k,), jnp.float32), jnp.zeros((), jnp.float32))

    def update(st, x, axis_name=None):
        mean, n = st
        x = _rows(x)
        m = _psum(jnp.float32(x.shape[0]), axis_name)
        n2 = n + m
        return (mean * (n / n2) + _psum(jnp.sum(f(x), axis=0), axis_name) / n2, n2)

    return Statistic(name, doc, init, update, lambda st: st[0])


STATISTICS: dict[str, Statistic] = {
    "hessian": Statistic("hessian", "H = 2·XᵀX/n, (in, in)", Hessian.zeros, hessian_update, lambda h: h.H),
    "act_sq_mean": _mean_stat("act_sq_mean", "mean x² per input channel, (in,)", jnp.square),
    "act_abs_mean": _mean_stat("act_abs_mean", "mean |x| per input channel, (in,)", jnp.abs),
    "act_abs_max": Statistic(
        "act_abs_max", "max |x| per input channel, (in,)",
        lambda k: jnp.zeros((k,), jnp.float32),
        lambda st, x, axis_name=None: jnp.maximum(st, _pmax(jnp.max(jnp.abs(_rows(x)), axis=0), axis_name)),
        lambda st: st),
}


def check_names(names: Sequence[str], who: str) -> tuple[str, ...]:
    """``names`` as a tuple, or a SpecError naming ``who`` and the known statistics."""
    names = tuple(names)
    bad = [n for n in names if n not in STATISTICS]
    if bad:
        raise SpecError(f"{who}: unknown statistic(s) {bad}; known: {', '.join(STATISTICS)}")
    return names


class Collector(NamedTuple):
    """Several statistics of one input, collected together (one pass over the batches)."""

    names: tuple[str, ...]

    def init(self, features: int) -> dict[str, Any]:
        return {n: STATISTICS[n].init(features) for n in self.names}

    def update(self, state: Mapping[str, Any], x, axis_name=None) -> dict[str, Any]:
        return {n: STATISTICS[n].update(state[n], x, axis_name) for n in self.names}

    def finalize(self, state: Mapping[str, Any]) -> dict[str, jax.Array]:
        return {n: STATISTICS[n].finalize(state[n]) for n in self.names}


def collect(names: Sequence[str], batches) -> dict[str, jax.Array]:
    """The statistics ``names`` of an iterable of input batches (each ``(..., in)``).

    A convenience for scripts and tests; the calibration pipeline folds the update into its
    own jitted block function instead.
    """
    c = Collector(check_names(sorted(set(names)), "collect"))
    state = None
    upd = jax.jit(c.update)
    features = None
    for i, x in enumerate(batches):
        x = jnp.asarray(x)
        if x.ndim < 1 or x.size == 0:
            raise DataError(f"collect: batch {i} of shape {tuple(x.shape)} holds no input rows")
        if features is None:
            features = x.shape[-1]
            state = c.init(features)
        elif x.shape[-1] != features:
            raise ShapeError(f"collect: batch {i} has {x.shape[-1]} input features, the first had {features}")
        state = upd(state, x)
    if state is None:
        raise DataError("collect: no input batches were given")
    out = c.finalize(state)
    for k, v in out.items():
        if not bool(jnp.all(jnp.isfinite(v))):
            raise NonFiniteError(f"collect: statistic {k!r} holds NaN/Inf (NaN/Inf in the inputs)")
    return out
