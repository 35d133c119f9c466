"""BCQ: binary-coding quantization, data-free (Xu et al., "Alternating Multi-bit Quantization
for Recurrent Neural Networks", arXiv:1802.00150; the weight format of LUT-GEMM,
arXiv:2206.09557, and ShiftAddLLM, arXiv:2406.05981).

Each group of ``group_size`` consecutive inputs (axis 0 of a Flax kernel ``(in, out)``, one
group per output column) is written as a sum of ``k = spec.bits`` (1–4) scaled binary planes,

    w ≈ ŵ = Σ_{i<k} α_i·b_i,    b_i ∈ {−1, +1}^S,  α_i ≥ 0 per group,

so the ``2^k`` values a group can take, ``Σ_i ±α_i``, are not evenly spaced (unlike an int
grid). The fit, per group:

1. **Greedy initialisation**: ``r = w``; for ``i < k``: ``b_i = sign(r)`` (``sign(0) = +1``),
   ``α_i = mean|r|`` (rounded to ``scale_dtype``), ``r −= α_i·b_i``.
2. **Alternating refinement**, ``iters`` rounds, each: (a) the α's by least squares given the
   planes, the ``k×k`` normal equations ``(BᵀB)·α = Bᵀw`` (``BᵀB`` holds integers; solved by
   an unrolled semidefinite LDLᵀ, so a singular system, e.g. two planes equal or opposite on
   the whole group, takes its basic solution: a plane that is a combination of earlier
   planes over the group gets α = 0, the others their least squares), then ``α ← |α|`` (flipping a
   plane's sign gives the same values) rounded to ``scale_dtype``; (b) the planes given the
   α's: every element takes the code ``c ∈ [0, 2^k)`` whose value ``Σ_i α_i·(2·bit_i(c) − 1)``
   is nearest (exhaustive over the ``2^k ≤ 16`` values; ties to the higher code, so
   ``sign(0) = +1`` for one plane).

Codes are always the nearest ones for the α's *as stored*, so each group's error
``Σ(w − ŵ)²`` is a function of its stored α's alone. Step (a) minimises it for fixed planes
and (b) for fixed α's, so in exact arithmetic a round never increases it; in float32 with
rounded α's a group takes a round's α's only if its error (float32, as computed here) does
not increase, so the error of every group never increases across rounds. The loop stops
early when no group strictly improves.

Storage (format ``bcq``): codes hold the ``k`` planes (bit ``i`` of a code is plane ``i``),
packed along axis 0 like ``k``-bit int codes; ``scale`` is ``(k,) + param_shape``
(``(k, G, N)`` for a kernel ``(K, N)``): ``scale[i]`` is plane ``i``'s α in the layout every
other format stores its scale in, so :class:`jquant.qtensor.GroupLayout`, dequantization
and checkpoints need no other change. Bits per weight: ``k + 16·k/group_size`` with
float16 α's. There is no packed kernel (``pallas_kernels.layout`` refuses ``bcq``; matmuls
dequantize through XLA).

One jitted solve (``lax.while_loop`` over rounds, vectorised over groups and columns).
Options (:class:`BCQOptions`): ``iters`` (15).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from jquant import formats
from jquant.errors import NonFiniteError, SpecError, at
from jquant.qtensor import GroupLayout, QTensor
from jquant.quantizers.registry import Method, options_of, register
from jquant.quantizers.rtn import check_weight, layout_for, pack_qtensor
from jquant.spec import QuantSpec

MAX_ITERS = 1000
# A pivot of the LDLᵀ of BᵀB below this fraction of its diagonal entry counts as 0 (the
# plane depends on the earlier ones). BᵀB holds integers, so true pivots of a regular
# system are far above it in practice; a round that goes wrong anyway is rejected by the
# per-group error check.
PIVOT_TOL = 1e-5


@dataclasses.dataclass(frozen=True)
class BCQOptions:
    """BCQ options, read from ``QuantSpec.options``.

    ``iters``: rounds of alternating refinement after the greedy initialisation
    (0 ≤ iters ≤ 1000; 0 keeps the greedy α's, with each element's nearest code).
    """

    iters: int = 15

    def validate(self) -> None:
        if not 0 <= self.iters <= MAX_ITERS:
            raise SpecError(f"BCQ iters must be in 0..{MAX_ITERS}, got {self.iters}")


def _store(v, scale_dtype: str):
    return v.astype(scale_dtype).astype(jnp.float32)


def _signs(codes, k: int):
    """``b_i = 2·bit_i(c) − 1`` as float32, a list of ``k`` arrays shaped like ``codes``."""
    c = codes.astype(jnp.uint32)
    return [((c >> i) & 1).astype(jnp.float32) * 2.0 - 1.0 for i in range(k)]


def nearest(x, valid, alpha):
    """Each element's nearest code for the α's, and each group's error.

    Args:
      x: float32 grouped view ``(G, S, R)`` with padding set to 0.
      valid: bool ``(G, S, R)``, False on the padding of a ragged last group.
      alpha: float32 ``(G, k, R)``, the α's as stored.

    Returns:
      ``(codes, err)``: uint8 codes ``(G, S, R)`` in ``[0, 2^k)`` (0 on padding) and float32
      ``err`` ``(G, 1, R)``, the group's ``Σ(x − ŵ)²`` over valid elements. The value of each
      code is summed plane 0 first, as :func:`jquant.formats.bcq_decode` does; ties go to
      the higher code.
    """
    k = alpha.shape[1]
    best_d = jnp.full(x.shape, jnp.inf, jnp.float32)
    best_c = jnp.zeros(x.shape, jnp.uint8)
    for c in range(2**k):
        v = None
        for i in range(k):
            t = alpha[:, i : i + 1, :] * (1.0 if (c >> i) & 1 else -1.0)
            v = t if v is None else v + t
        d = jnp.square(x - v)
        take = d <= best_d
        best_d = jnp.where(take, d, best_d)
        best_c = jnp.where(take, jnp.uint8(c), best_c)
    best_c = jnp.where(valid, best_c, jnp.uint8(0))
    err = jnp.sum(jnp.where(valid, best_d, 0.0), axis=1, keepdims=True)
    return best_c, err


def solve_normal(M, rhs):
    """Solve ``M·α = rhs`` for symmetric positive semidefinite ``M`` ``(..., k, k)``, ``rhs``
    ``(..., k)``, by an unrolled LDLᵀ (``k ≤ 4``). A pivot at or below ``PIVOT_TOL`` times its
    diagonal entry is taken as 0: that unknown (a plane that is a combination of the
    earlier ones) gets 0 and the others solve the rest, which for a consistent singular
    system (``rhs = Bᵀw``) is its basic solution (every solution gives the same ``B·α``).
    Returns ``α`` ``(..., k)``, float32."""
    k = M.shape[-1]
    L = [[None] * k for _ in range(k)]
    d, dinv = [None] * k, [None] * k
    for j in range(k):
        dj = M[..., j, j]
        for m in range(j):
            dj = dj - L[j][m] * L[j][m] * d[m]
        ok = dj > PIVOT_TOL * jnp.maximum(M[..., j, j], 1.0)
        d[j] = jnp.where(ok, dj, 0.0)
        dinv[j] = jnp.where(ok, 1.0 / jnp.where(ok, dj, 1.0), 0.0)
        for i in range(j + 1, k):
            lij = M[..., i, j]
            for m in range(j):
                lij = lij - L[i][m] * L[j][m] * d[m]
            L[i][j] = lij * dinv[j]
    z = [None] * k
    for j in range(k):
        zj = rhs[..., j]
        for m in range(j):
            zj = zj - L[j][m] * z[m]
        z[j] = zj
    a = [None] * k
    for j in reversed(range(k)):
        aj = z[j] * dinv[j]
        for i in range(j + 1, k):
            aj = aj - L[i][j] * a[i]
        a[j] = aj
    return jnp.stack(a, axis=-1)


def greedy(x, valid, k: int, scale_dtype: str):
    """Greedy α's ``(G, k, R)`` (stored precision) and planes: ``b_i = sign(r)`` (``sign(0) =
    +1``), ``α_i = mean|r|`` over the group's valid elements, ``r −= α_i·b_i``. Returns
    ``(alpha, codes)``, the codes being the greedy planes (bit ``i`` = plane ``i``)."""
    n = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1).astype(jnp.float32)
    r = x
    alphas, codes = [], jnp.zeros(x.shape, jnp.uint8)
    for i in range(k):
        pos = r >= 0
        a = _store(jnp.sum(jnp.where(valid, jnp.abs(r), 0.0), axis=1, keepdims=True) / n, scale_dtype)
        r = jnp.where(valid, r - jnp.where(pos, a, -a), 0.0)
        alphas.append(a)
        codes = codes | jnp.where(pos & valid, jnp.uint8(1 << i), jnp.uint8(0))
    return jnp.concatenate(alphas, axis=1), codes


def refine_alpha(x, valid, codes, k: int, scale_dtype: str):
    """Step (a): the least-squares α's ``(G, k, R)`` for the planes of ``codes``, made
    non-negative and rounded to ``scale_dtype``."""
    b = [jnp.where(valid, s, 0.0) for s in _signs(codes, k)]
    M = [[None] * k for _ in range(k)]
    for i in range(k):
        for j in range(i, k):
            M[i][j] = M[j][i] = jnp.sum(b[i] * b[j], axis=1)  # (G, R), integers
    Mm = jnp.stack([jnp.stack(row, axis=-1) for row in M], axis=-2)  # (G, R, k, k)
    rhs = jnp.stack([jnp.sum(bi * x, axis=1) for bi in b], axis=-1)  # (G, R, k)
    a = jnp.abs(solve_normal(Mm, rhs))
    a = jnp.where(jnp.isfinite(a), a, 0.0)
    return _store(jnp.moveaxis(a, -1, 1), scale_dtype)  # (G, k, R)


@functools.partial(jax.jit, static_argnames=("k", "scale_dtype"))
def bcq_solve(xg, iters, *, k: int, scale_dtype: str = "float16"):
    """Greedy initialisation and ``iters`` rounds of alternating refinement on a grouped view.

    Args:
      xg: float grouped view ``(G, S, R)``, NaN on the padding of a ragged last group
        (:meth:`jquant.qtensor.GroupLayout.to_groups`).
      iters: number of rounds (an int or a traced int32; the loop stops earlier when no
        group strictly improves).
      k: bit planes, 1–4.
      scale_dtype: storage dtype of the α's.

    Returns:
      ``(alpha, codes, err, err_greedy, err0, rounds, overflow)``: stored-precision α's
      ``(G, k, R)`` (float32 values), the nearest codes ``(G, S, R)`` uint8 for them, each
      group's error ``Σ(w − ŵ)²`` ``(G, 1, R)`` at the end, the error of the plain greedy fit
      (greedy planes and α's), the error after the initialisation (greedy α's, nearest
      codes), the rounds run (int32), and whether any α the solve computed (greedy or least
      squares) overflowed ``scale_dtype`` (bool; the fit would then be bounded by the storage
      dtype, which :func:`bcq_quantize` refuses).
    """
    valid = ~jnp.isnan(xg)
    x = jnp.where(valid, xg.astype(jnp.float32), 0.0)
    a0, gcodes = greedy(x, valid, k, scale_dtype)
    g_hat = formats.bcq_decode(gcodes, jnp.moveaxis(a0, 1, 0)[:, :, None, :], k)
    err_greedy = jnp.sum(jnp.where(valid, jnp.square(x - g_hat), 0.0), axis=1, keepdims=True)
    c0, e0 = nearest(x, valid, a0)

    def cond(carry):
        i, _, _, _, improved, _ = carry
        return (i < iters) & improved

    def body(carry):
        i, a, c, e, _, over = carry
        a_new = refine_alpha(x, valid, c, k, scale_dtype)
        over = over | ~jnp.all(jnp.isfinite(a_new))
        c_new, e_new = nearest(x, valid, a_new)
        take = e_new <= e  # (G, 1, R): accept only what does not increase the group's error
        a = jnp.where(take, a_new, a)
        c = jnp.where(take, c_new, c)
        improved = jnp.any(take & (e_new < e))
        e = jnp.where(take, e_new, e)
        return i + 1, a, c, e, improved, over

    init = (jnp.int32(0), a0, c0, e0, jnp.bool_(True), ~jnp.all(jnp.isfinite(a0)))
    rounds, a, c, e, _, over = lax.while_loop(cond, body, init)
    return a, c, e, err_greedy, e0, rounds, over


@functools.partial(jax.jit, static_argnames=("spec", "lay"))
def _bcq(w, iters, *, spec: QuantSpec, lay: GroupLayout):
    xg = lay.to_groups(w.astype(jnp.float32))
    a, c, e, eg, _, rounds, over = bcq_solve(xg, iters, k=spec.bits, scale_dtype=spec.scale_dtype)
    scale = jnp.stack([lay.params_to_stored(a[:, i : i + 1, :]) for i in range(spec.bits)])  # (k,) + param_shape
    qt = pack_qtensor(lay.from_groups(c), scale, None, lay, spec, w.dtype, method="bcq", scale_stored=True)
    return qt, jnp.sum(e), jnp.sum(eg), rounds, over, jnp.max(jnp.abs(w)).astype(jnp.float32)


def bcq_quantize(w, spec: QuantSpec, *, path: str | None = None) -> tuple[QTensor, dict]:
    """BCQ-quantize ``w`` (a Flax kernel is ``(in, out)``; groups run along ``spec.axis``).

    ``spec`` must have format ``bcq`` and ``bits`` 1–4 (the number of bit planes); any
    granularity (a ragged last group is fine); ``scale_dtype`` (float16 default) stores
    the α's, and codes are the nearest ones for the stored values. ``spec.options`` holds
    :class:`BCQOptions`.

    Returns the QTensor (codes ``k``-bit, packed along ``axis``; scale ``(k,) +
    param_shape`` in ``scale_dtype``) and ``{"loss": Σ(w − ŵ)²/numel, "loss_greedy": the
    same for the plain greedy fit, "iters": rounds run}``.

    Raises:
      SpecError: a format other than ``bcq``, bits outside 1–4, or bad options.
      ShapeError: a group larger than the axis, an empty array or a scalar.
      DTypeError, NonFiniteError: a non-floating weight, or NaN/Inf in it; NonFiniteError
        also when an α the solve computes overflows ``scale_dtype`` (the fit would be
        bounded by it: use ``scale_dtype='float32'``), or a group's α's all underflow to 0
        (checked by ``quantize_weight``).
    """
    _check(spec, path)
    opts = options_of(spec)
    w = jnp.asarray(w)
    check_weight(w, path)
    lay = layout_for(w.shape, spec, path)
    qt, e, eg, rounds, over, big = _bcq(w, jnp.int32(opts.iters), spec=spec, lay=lay)
    if bool(over):
        raise NonFiniteError(at(path, f"BCQ α's overflow {spec.scale_dtype} (largest finite "
                                      f"{float(jnp.finfo(spec.scale_dtype).max):.6g}); the weight's largest |w| is "
                                      f"{float(big):.6g}; use scale_dtype='float32' in the QuantSpec"))
    n = max(w.size, 1)
    return qt, {"loss": float(e) / n, "loss_greedy": float(eg) / n, "iters": int(rounds)}


def _check(spec: QuantSpec, path: str | None = None) -> None:
    if spec.format != "bcq":
        raise SpecError(at(path, f"BCQ writes format 'bcq'; got {spec.describe()} (use format='bcq')"))
    if not 1 <= spec.bits <= formats.BCQ_MAX_BITS:
        raise SpecError(at(path, f"BCQ takes 1..{formats.BCQ_MAX_BITS} bit planes (bits), got bits={spec.bits} "
                                 f"(2^bits values are searched per element)"))




def _method(w, spec: QuantSpec, stats, *, path: str | None = None):
    return bcq_quantize(w, spec, path=path)


register(Method("bcq", _method, options=BCQOptions, formats=formats.BCQ_FORMATS, check=_check,
                paper="arXiv:1802.00150 (alternating multi-bit quantization; LUT-GEMM arXiv:2206.09557)",
                summary="binary-coding quantization: w ≈ Σ α_i·b_i per group, greedy start then alternating "
                        "least-squares α's and nearest codes; data-free"))
