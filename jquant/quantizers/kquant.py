"""GGUF block quantization: the classic types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) and the k-quants
(Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), ported from llama.cpp's reference quantizers
(``ggml/src/ggml-quants.c``: ``quantize_row_*_ref``, ``make_qx_quants``, ``make_q3_quants``,
``make_qkx2_quants``, and with an importance matrix ``quantize_row_*_impl``,
``make_qkx3_quants``, ``make_qp_quants``); no paper, no arXiv id.

A GGUF tensor is a list of rows of ``K`` weights (a Hugging Face / GGUF weight ``(out, in)``
has one row per output); each row is cut into blocks of 32 (classic types) or super-blocks
of 256 (k-quants, with 16 or 8 sub-blocks whose scales and minima are themselves quantized
against an f16 super-block scale), and every block becomes ``type_size`` bytes in GGML's
``block_*`` struct layout. :func:`quantize_blocks` / :func:`dequantize_blocks` work on rows
``(R, K)`` and bytes ``(R, K / QK * type_size)``.

Numerics follow the C code operation for operation in float32, so the bytes match it:
sums are sequential (as the C loops), every division is a true IEEE division
(:func:`jquant.formats.div`), ``nearest_int`` is the C bit trick (round half to even,
the same garbage for out-of-range values), and every product that feeds an addition is
rounded on its own (``_p``), because XLA's CPU backend would otherwise fuse it into an FMA
(C compiled without ``-ffp-contract``, NumPy and gguf-py never fuse). Byte equality is
checked on CPU (tests: gguf-py's quantizers for Q4_0–Q8_0, an independent NumPy port of
the C code for the rest; gguf-py's dequantizers for all ten). One deliberate choice: a
block of all zeros stores the C reference's ``+0`` maximum, as gguf-py does for ``+0.0``
inputs.

In jquant a GGML QTensor keeps Flax's kernel layout ``(in, out)``: ``codes`` is uint8
``(K / QK * type_size, N)`` and column ``n`` holds the bytes of GGUF row ``n`` (so the GGUF
tensor's bytes are ``codes.T``); ``scale`` and ``zero`` are None. The method ``kquant``
(options :class:`KQuantOptions`) quantizes ``(in, out)`` kernels with ``in`` a multiple of
the block; ``fallback=True`` uses llama.cpp ``llama-quantize``'s fallback type otherwise.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant import formats
from jquant.errors import DataError, ShapeError, SpecError, at
from jquant.formats import FIXED_BITS, GGML_FORMATS, Grid
from jquant.qtensor import QTensor
from jquant.quantizers.registry import Method, options_of, register

QK_K = 256
#: weights per block
BLOCK = {"q4_0": 32, "q4_1": 32, "q5_0": 32, "q5_1": 32, "q8_0": 32,
         "q2_k": QK_K, "q3_k": QK_K, "q4_k": QK_K, "q5_k": QK_K, "q6_k": QK_K}
#: bytes per block (``sizeof(block_*)`` in ggml-common.h)
TYPE_SIZE = {"q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24, "q8_0": 34,
             "q2_k": 84, "q3_k": 110, "q4_k": 144, "q5_k": 176, "q6_k": 210}
#: what llama.cpp's ``llama-quantize`` uses when a row length is not a multiple of the
#: block (``tensor_type_fallback`` in ``src/llama-quant.cpp``); the block-32 types have none
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}
#: types whose blocks store a minimum (or an f16 ``m``) besides the scale
_WITH_MIN = ("q4_1", "q5_1", "q2_k", "q4_k", "q5_k")

_F32 = jnp.float32
_EPS = np.float32(1e-15)  # GROUP_MAX_EPS


# ---------------------------------------------------------------------------------------
# The C helpers, vectorised over blocks: arrays are (B, n), one block (or sub-block) a row.
# ---------------------------------------------------------------------------------------
_OPAQUE = threading.local()


@contextlib.contextmanager
def _opaque_zero(z):
    """While tracing: ``z``, a −0.0 the compiler cannot see (a runtime argument), for :func:`_p`."""
    old = getattr(_OPAQUE, "zero", None)
    _OPAQUE.zero = z
    try:
        yield
    finally:
        _OPAQUE.zero = old


def _p(x):
    """A product rounded to float32 on its own before it is added to anything: ``x + z``
    with ``z`` a −0.0 only known at run time, so the compiler can neither drop the addition
    nor fuse the product into a later one; if it fuses the product into this addition,
    ``fma(a, b, −0)`` is the rounded product exactly. (Outside :func:`quantize_blocks` /
    :func:`dequantize_blocks` a constant ``+0`` stands in, which the compiler may fold.)"""
    z = getattr(_OPAQUE, "zero", None)
    return x + (jnp.zeros((), _F32) if z is None else z)


def _div(a, b):
    return formats.div(jnp.asarray(a, _F32), b)


def _ni(v):
    """``nearest_int``: ``v + 1.5·2²³`` in float32, the low mantissa bits as the integer
    (round half to even; the C code's result for out-of-range values as well)."""
    t = _p(jnp.asarray(v, _F32)) + np.float32(12582912.0)
    i = lax.bitcast_convert_type(t, jnp.int32)
    return (i & 0x7FFFFF) - 0x400000


def _f(i):
    return jnp.asarray(i).astype(_F32)


def _seqsum(t, *, first: bool = False):
    """Sum over the last axis in C loop order (``s = 0; s += t[i]``; ``first``: ``s = t[0]``)."""
    t = _p(t)
    n = t.shape[-1]
    if n <= 32:
        acc = t[..., 0] if first else jnp.zeros(t.shape[:-1], _F32) + t[..., 0]
        for i in range(1, n):
            acc = acc + t[..., i]
        return acc
    tt = jnp.moveaxis(t, -1, 0)
    init = tt[0] if first else jnp.zeros(t.shape[:-1], _F32) + tt[0]
    return lax.fori_loop(1, n, lambda i, acc: acc + tt[i], init)


def _absmax_signed(x):
    """``(amax, max)``: the largest ``|x|`` of each row and the signed value there (first
    occurrence; ``+0`` when the row is all zeros, as the C loop leaves it)."""
    idx = jnp.argmax(jnp.abs(x), axis=-1, keepdims=True)
    mx = jnp.take_along_axis(x, idx, axis=-1)[..., 0]
    amax = jnp.abs(mx)
    return amax, jnp.where(amax > 0, mx, jnp.zeros((), _F32))


def _col(a):
    return a[..., None]


def _f16(v):
    """``GGML_FP32_TO_FP16`` and back: the value an f16 field stores."""
    return v.astype(jnp.float16).astype(_F32)


def _f16_bytes(v):
    return lax.bitcast_convert_type(v.astype(jnp.float16), jnp.uint8)  # (..., 2), little-endian


def _f16_from(b):
    """``(..., 2)`` little-endian bytes -> the f16 value as float32 ``(...)``."""
    return lax.bitcast_convert_type(b.astype(jnp.uint8), jnp.float16).astype(_F32)


def _u8(i):
    """An int stored into a ``uint8_t`` (wraps)."""
    return (i & 0xFF).astype(jnp.int32)


def _i8(i):
    """An int stored into an ``int8_t`` (wraps)."""
    return ((i + 128) & 0xFF) - 128


def make_qx_quants(x, nmax: int, qw=None):
    """``make_qx_quants(n, nmax, x, L, rmse_type=1, qw)``: symmetric scale of each row of
    ``x`` ``(B, n)`` by a weighted least-squares search over 19 candidate grids (weights ``qw``
    or ``x²``). Returns ``(scale (B,), L (B, n) in [0, 2·nmax))``."""
    amax, mx = _absmax_signed(x)
    allzero = amax < _EPS
    w = x * x if qw is None else qw
    wx = w * x

    def grid(iscale):
        l = jnp.clip(_ni(_col(iscale) * x), -nmax, nmax - 1)
        lf = _f(l)
        return l + nmax, _seqsum(wx * lf), _seqsum(w * lf * lf)

    L, sumlx, suml2 = grid(_div(np.float32(-nmax), mx))
    scale = jnp.where(suml2 != 0, _div(sumlx, suml2), 0.0)
    best = scale * sumlx

    def body(k, c):
        L, scale, best = c
        is_ = _f(jnp.where(k < 9, k - 9, k - 8))
        Ln, slx, sl2 = grid(_div(-(np.float32(nmax) + _p(np.float32(0.1) * is_)), mx))
        take = (sl2 > 0) & (slx * slx > best * sl2)
        sc = _div(slx, sl2)
        return (jnp.where(_col(take), Ln, L), jnp.where(take, sc, scale), jnp.where(take, sc * slx, best))

    L, scale, best = lax.fori_loop(0, 18, body, (L, scale, best))
    return jnp.where(allzero, 0.0, scale), jnp.where(_col(allzero), 0, L)


def make_q3_quants(x, nmax: int = 4):
    """``make_q3_quants(n, nmax, x, L, do_rmse=true)``: ``x²``-weighted symmetric scale with up
    to 5 passes of coordinate descent over the codes. Returns ``(scale (B,), L in [0, 2·nmax))``."""
    amax, mx = _absmax_signed(x)
    allzero = amax < _EPS
    n = x.shape[-1]
    l = jnp.clip(_ni(_col(_div(np.float32(-nmax), mx)) * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = _seqsum(wx * _f(l))
    suml2 = _seqsum(w * _f(l) * _f(l))

    def body(t, c):
        L, sumlx, suml2 = c
        i = t % n
        xi, wi, wxi = x[:, i], w[:, i], wx[:, i]
        Li = _f(L[:, i])
        slx = sumlx - _p(wxi * Li)
        sl2 = suml2 - _p(wi * Li * Li)
        new_l = jnp.clip(_ni(_div(xi * sl2, slx)), -nmax, nmax - 1)
        nf = _f(new_l)
        slx2 = slx + _p(wxi * nf)
        sl22 = sl2 + _p(wi * nf * nf)
        acc = (slx > 0) & (new_l != L[:, i]) & (sl22 > 0) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
        L = L.at[:, i].set(jnp.where(acc, new_l, L[:, i]))
        return L, jnp.where(acc, slx2, sumlx), jnp.where(acc, sl22, suml2)

    L, sumlx, suml2 = lax.fori_loop(0, 5 * n, body, (l, sumlx, suml2))
    scale = jnp.where(suml2 > 0, _div(sumlx, suml2), 0.0)
    return jnp.where(allzero, 0.0, scale), jnp.where(_col(allzero), 0, L + nmax)


def _make_qkx(x, w, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool, v3: bool):
    """``make_qkx2_quants`` (``v3=False``) / ``make_qkx3_quants`` (``v3=True``, weights given):
    asymmetric scale and minimum of each row of ``x`` ``(B, n)`` for the weighted error, by a
    search over ``nstep + 1`` grids with a least-squares refit of both. Returns ``(scale (B,),
    the_min (B,) = −minimum ≥ 0, L (B, n) in [0, nmax])``."""
    mn = jnp.min(x, axis=-1)
    mx = jnp.max(x, axis=-1)
    sum_w = _seqsum(w, first=True)
    sum_x = _seqsum(w * x, first=True)
    mn = jnp.where(mn > 0, 0.0, mn)
    degenerate = (mx <= mn) if v3 else (mx == mn)
    iscale = _div(np.float32(nmax), mx - mn)
    scale = _div(np.float32(1.0), iscale)
    L = jnp.clip(_ni(_col(iscale) * (x - _col(mn))), 0, nmax)

    def err(scale, mn, L):
        diff = _p(_col(scale) * _f(L)) + _col(mn) - x
        diff = jnp.abs(diff) if use_mad else diff * diff
        return _seqsum(w * diff)

    best = err(scale, mn, L)

    def body(is_, c):
        L, best, scale, mn = c
        iscale = _div(_p(np.float32(rdelta) * _f(is_)) + np.float32(rmin) + np.float32(nmax), mx - mn)
        v = _col(iscale) * (x - _col(mn))
        if v3:
            Laux = jnp.where(v > 0, _ni(jnp.where(v < nmax, v, np.float32(nmax))), 0)
        else:
            Laux = jnp.clip(_ni(v), 0, nmax)
        lf = _f(Laux)
        wl = w * lf
        sum_l, sum_l2, sum_xl = _seqsum(wl), _seqsum(wl * lf), _seqsum(wl * x)
        D = _p(sum_w * sum_l2) - _p(sum_l * sum_l)
        this_scale = _div(_p(sum_w * sum_xl) - _p(sum_x * sum_l), D)
        this_min = _div(_p(sum_l2 * sum_x) - _p(sum_l * sum_xl), D)
        pos = this_min > 0
        this_min = jnp.where(pos, 0.0, this_min)
        this_scale = jnp.where(pos, _div(sum_xl, sum_l2), this_scale)
        cur = err(this_scale, this_min, Laux)
        take = (D > 0) & (cur < best)
        return (jnp.where(_col(take), Laux, L), jnp.where(take, cur, best), jnp.where(take, this_scale, scale),
                jnp.where(take, this_min, mn))

    L, best, scale, mn = lax.fori_loop(0, nstep + 1, body, (L, best, scale, mn))
    return jnp.where(degenerate, 0.0, scale), -mn, jnp.where(_col(degenerate), 0, L)


def make_qkx2_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    return _make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad, v3=False)


def make_qkx3_quants(x, w, nmax, rmin, rdelta, nstep, use_mad):
    return _make_qkx(x, w, nmax, rmin, rdelta, nstep, use_mad, v3=True)


def make_qp_quants(x, nmax: int, qw):
    """``make_qp_quants(n, nmax, x, L, quant_weights)``: a non-negative scale for the
    (non-negative) sub-block scales or minima ``x`` ``(B, n)``, weighted by ``qw``: 9 candidate
    grids, then up to 5 passes of coordinate descent. Returns ``(scale (B,), L (B, n) uint8
    values)``."""
    n = x.shape[-1]
    mx = jnp.maximum(jnp.max(x, axis=-1), 0.0)
    allzero = mx < _EPS
    iscale = _div(np.float32(nmax), mx)
    L0 = _u8(_ni(_col(iscale) * x))
    scale = _div(np.float32(1.0), iscale)

    def mse(scale, l):
        diff = x - _p(_col(scale) * _f(l))
        return _seqsum(qw * diff * diff)

    best = mse(scale, L0)

    def search(k, c):
        best, iscale = c
        is_ = _f(jnp.where(k < 4, k - 4, k - 3))
        iscale_is = _div(_p(np.float32(0.1) * is_) + np.float32(nmax), mx)
        l = jnp.minimum(nmax, _ni(_col(iscale_is) * x))
        m = mse(_div(np.float32(1.0), iscale_is), l)
        take = m < best
        return jnp.where(take, m, best), jnp.where(take, iscale_is, iscale)

    best, iscale = lax.fori_loop(0, 8, search, (best, iscale))
    l = jnp.minimum(nmax, _ni(_col(iscale) * x))
    wx = qw * x
    sumlx = _seqsum(wx * _f(l))
    suml2 = _seqsum(qw * _f(l) * _f(l))

    def body(t, c):
        L, sumlx, suml2 = c
        i = t % n
        xi, wi, wxi = x[:, i], qw[:, i], wx[:, i]
        Li = _f(L[:, i])
        slx = sumlx - _p(wxi * Li)
        sl2 = suml2 - _p(wi * Li * Li)
        new_l = jnp.minimum(nmax, _ni(_div(xi * sl2, slx)))
        nf = _f(new_l)
        slx2 = slx + _p(wxi * nf)
        sl22 = sl2 + _p(wi * nf * nf)
        acc = (slx > 0) & (sl2 > 0) & (new_l != L[:, i]) & (slx2 * slx2 * suml2 > sumlx * sumlx * sl22)
        L = L.at[:, i].set(jnp.where(acc, _u8(new_l), L[:, i]))
        return L, jnp.where(acc, slx2, sumlx), jnp.where(acc, sl22, suml2)

    L, sumlx, suml2 = lax.fori_loop(0, 5 * n, body, (_u8(l), sumlx, suml2))
    scale = jnp.where(suml2 > 0, _div(sumlx, suml2), 0.0)
    return jnp.where(allzero, 0.0, scale), jnp.where(_col(allzero), 0, L)


# ---------------------------------------------------------------------------------------
# Bit packing (uint8 arrays; values are int32 in [0, 255] until the final cast)
# ---------------------------------------------------------------------------------------
def _nibbles(lo, hi):
    return (lo & 0xF) | ((hi & 0xF) << 4)


def _bits_le(b):
    """``(B, 8m)`` 0/1 values -> ``(B, m)`` bytes, bit ``j`` of the stream in byte ``j // 8``."""
    B, n = b.shape
    return jnp.sum(b.reshape(B, n // 8, 8) << jnp.arange(8), axis=-1)


def _pack2(L):
    """2-bit codes of a super-block ``(B, 256)`` -> ``qs`` ``(B, 64)`` (k-quant order)."""
    B = L.shape[0]
    c = L.reshape(B, 2, 4, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(B, 64)


def _unpack2(qs):
    B = qs.shape[0]
    q = qs.reshape(B, 2, 1, 32) >> (2 * jnp.arange(4)).reshape(1, 1, 4, 1)
    return (q & 3).reshape(B, 256)


def _pack_k4_scales(ls, lm):
    """``(B, 8)`` 6-bit scales and minima -> the 12 ``scales`` bytes of Q4_K/Q5_K."""
    lo = _u8(ls[:, :4] | ((ls[:, 4:] >> 4) << 6))
    mid = _u8(lm[:, :4] | ((lm[:, 4:] >> 4) << 6))
    hi = _u8((ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4))
    return jnp.concatenate([lo, mid, hi], axis=-1)


def _unpack_k4_scales(q):
    """``get_scale_min_k4`` for j = 0..7: ``(sc, m)`` ``(B, 8)``."""
    d, m, md = q[:, 0:4], q[:, 4:8], q[:, 8:12]
    sc = jnp.concatenate([d & 63, (md & 0xF) | ((d >> 6) << 4)], axis=-1)
    mn = jnp.concatenate([m & 63, (md >> 4) | ((m >> 6) << 4)], axis=-1)
    return sc, mn


def _pack_q3_scales(l):
    """``(B, 16)`` 6-bit values -> the 12 ``scales`` bytes of Q3_K."""
    lo = (l[:, :8] & 0xF) | ((l[:, 8:] & 0xF) << 4)
    h = (l >> 4) & 3  # (B, 16): j = 4k + m goes to byte 8 + m, bits 2k
    hi = h[:, 0:4] | (h[:, 4:8] << 2) | (h[:, 8:12] << 4) | (h[:, 12:16] << 6)
    return jnp.concatenate([lo, hi], axis=-1)


def _unpack_q3_scales(s):
    lo = jnp.concatenate([s[:, :8] & 0xF, s[:, :8] >> 4], axis=-1)
    hi = jnp.concatenate([(s[:, 8:12] >> (2 * k)) & 3 for k in range(4)], axis=-1)
    return lo | (hi << 4)


def _bytes(*parts):
    return jnp.concatenate([p.astype(jnp.uint8) for p in parts], axis=-1)


# ---------------------------------------------------------------------------------------
# Block quantizers: x (B, QK) float32 [, qw (B, QK) importance, sigma2 (B,) of the row]
# ---------------------------------------------------------------------------------------
def _sigma_weights(x, qw, sigma2):
    return qw * jnp.sqrt(_col(sigma2) + _p(x * x))


def _q_sym32(x, qw, sigma2, nmax: int):
    """Q4_0 / Q5_0 (``nmax`` 8 / 16): ``(d (B,) float32 as computed, L (B, 32) in [0, 2·nmax))``."""
    if qw is None:
        _, mx = _absmax_signed(x)
        d = _div(mx, np.float32(-nmax))
        iv = jnp.where(d != 0, _div(np.float32(1.0), d), 0.0)
        q = jnp.trunc(_p(x * _col(iv)) + np.float32(nmax + 0.5)).astype(jnp.int32)
        return d, jnp.minimum(2 * nmax - 1, _i8(q))
    d, L = make_qx_quants(x, nmax, _sigma_weights(x, qw, sigma2))
    return d, L


def _q_asym32(x, qw, sigma2, nmax: int):
    """Q4_1 / Q5_1 (``nmax`` 15 / 31): ``(d, m, L in [0, nmax])``."""
    if qw is None:
        mn, mx = jnp.min(x, axis=-1), jnp.max(x, axis=-1)
        d = _div(mx - mn, np.float32(nmax))
        iv = jnp.where(d != 0, _div(np.float32(1.0), d), 0.0)
        q = jnp.trunc(_p((x - _col(mn)) * _col(iv)) + np.float32(0.5)).astype(jnp.int32)
        q = jnp.minimum(15, _i8(q)) if nmax == 15 else _u8(q)
        return d, mn, q
    d, the_min, L = make_qkx3_quants(x, _sigma_weights(x, qw, sigma2), nmax, -0.9, 0.05, 36, False)
    return d, -the_min, L


def _qh_bytes(L):
    return _bits_le((L >> 4) & 1)


def _quant_q4_0(x, qw, sigma2):
    d, L = _q_sym32(x, qw, sigma2, 8)
    return _bytes(_f16_bytes(d), _nibbles(L[:, :16], L[:, 16:]))


def _quant_q5_0(x, qw, sigma2):
    d, L = _q_sym32(x, qw, sigma2, 16)
    return _bytes(_f16_bytes(d), _qh_bytes(L), _nibbles(L[:, :16], L[:, 16:]))


def _quant_q4_1(x, qw, sigma2):
    d, m, L = _q_asym32(x, qw, sigma2, 15)
    return _bytes(_f16_bytes(d), _f16_bytes(m), _nibbles(L[:, :16], L[:, 16:]))


def _quant_q5_1(x, qw, sigma2):
    d, m, L = _q_asym32(x, qw, sigma2, 31)
    return _bytes(_f16_bytes(d), _f16_bytes(m), _qh_bytes(L), _nibbles(L[:, :16], L[:, 16:]))


def _roundf(v):
    """C ``roundf``: half away from zero, exactly (``floor(2·frac)`` never rounds)."""
    a = jnp.abs(v)
    fl = jnp.floor(a)
    return jnp.sign(v) * (fl + jnp.floor(2 * (a - fl)))


def _quant_q8_0(x, qw, sigma2):
    amax = jnp.max(jnp.abs(x), axis=-1)
    d = _div(amax, np.float32(127))
    iv = jnp.where(d != 0, _div(np.float32(1.0), d), 0.0)
    q = _roundf(x * _col(iv)).astype(jnp.int32)
    return _bytes(_f16_bytes(d), _u8(q))


def _sub(x, n):
    """Super-blocks ``(B, 256)`` -> sub-blocks ``(B·256/n, n)``."""
    return x.reshape(-1, n)


def _superblock_sigma2(x, twice: bool):
    s = _seqsum(x * x)
    return _div(2 * s if twice else s, np.float32(QK_K))


def _quant_q2_k(x, qw, sigma2):
    B = x.shape[0]
    xs = _sub(x, 16)
    if qw is None:
        sc, mn, L = make_qkx2_quants(xs, jnp.abs(xs), 3, -0.5, 0.1, 15, True)
        sc, mn = sc.reshape(B, 16), mn.reshape(B, 16)
        max_scale = jnp.maximum(jnp.max(sc, axis=-1), 0.0)
        max_min = jnp.maximum(jnp.max(mn, axis=-1), 0.0)
        has_s, has_m = max_scale > 0, max_min > 0
        ls = _u8(_ni(_col(_div(np.float32(15), max_scale)) * sc))
        byte = jnp.where(_col(has_s), ls, 0)
        d = jnp.where(has_s, _div(max_scale, np.float32(15)), 0.0)
        lm = _ni(_col(_div(np.float32(15), max_min)) * mn)
        byte = jnp.where(_col(has_m), _u8(byte | (lm << 4)), byte)
        dmin = jnp.where(has_m, _div(max_min, np.float32(15)), 0.0)
    else:
        s2 = _superblock_sigma2(x, twice=False)
        w = _sigma_weights(x, qw, s2).reshape(-1, 16)
        sw = _seqsum(w).reshape(B, 16)
        sc, mn, L = make_qkx3_quants(xs, w, 3, -0.9, 0.05, 36, False)
        d, Ls = make_qp_quants(sc.reshape(B, 16), 15, sw)
        dmin, Lm = make_qp_quants(mn.reshape(B, 16), 15, sw)
        byte = _u8(Ls | (Lm << 4))
    df, dminf = _f16(d), _f16(dmin)
    dq = _col(_col(df) * _f(byte & 0xF))
    mq = _col(_col(dminf) * _f(byte >> 4))
    xr = x.reshape(B, 16, 16)
    lq = jnp.clip(_ni(_div(xr + mq, dq)), 0, 3)
    L = jnp.where(dq != 0, lq, L.reshape(B, 16, 16)).reshape(B, QK_K)
    return _bytes(byte, _pack2(L), _f16_bytes(d), _f16_bytes(dmin))


def _quant_q3_k(x, qw, sigma2):
    B = x.shape[0]
    xs = _sub(x, 16)
    if qw is None:
        sc, L = make_q3_quants(xs, 4)
        sc = sc.reshape(B, 16)
        idx = jnp.argmax(jnp.abs(sc), axis=-1, keepdims=True)
        max_scale = jnp.take_along_axis(sc, idx, axis=-1)[:, 0]
        max_scale = jnp.where(jnp.abs(max_scale) > 0, max_scale, 0.0)
        has = max_scale != 0
        iscale = _div(np.float32(-32), max_scale)
        l = jnp.clip(_i8(_ni(_col(iscale) * sc)), -32, 31) + 32
        l = jnp.where(_col(has), l, 0)
        d = jnp.where(has, _div(np.float32(1.0), iscale), 0.0)
    else:
        s2 = _superblock_sigma2(x, twice=True)
        w = _sigma_weights(x, qw, s2).reshape(-1, 16)
        sw = _seqsum(w).reshape(B, 16)
        sc, L = make_qx_quants(xs, 4, w)
        d, l = make_qx_quants(sc.reshape(B, 16), 32, sw)
    sbytes = _u8(_pack_q3_scales(l))
    dq = _col(_col(_f16(d)) * _f(_unpack_q3_scales(sbytes) - 32))
    lq = jnp.clip(_ni(_div(x.reshape(B, 16, 16), dq)), -4, 3) + 4
    L = jnp.where(dq != 0, lq, L.reshape(B, 16, 16)).reshape(B, QK_K)
    high = (L > 3).astype(jnp.int32)
    L = L - 4 * high
    hmask = jnp.sum(high.reshape(B, 8, 32) << jnp.arange(8).reshape(1, 8, 1), axis=1)
    return _bytes(hmask, _pack2(L), sbytes, _f16_bytes(d))


def _quant_k45(x, qw, nmax: int):
    """Q4_K (``nmax`` 15) / Q5_K (31): ``(head bytes d|dmin|scales (B, 16), L (B, 256))``."""
    B = x.shape[0]
    xs = _sub(x, 32)
    if qw is None:
        av = jnp.sqrt(_div(_seqsum(xs * xs), np.float32(32)))
        w = _col(av) + jnp.abs(xs)
        rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
        sc, mn, L = make_qkx2_quants(xs, w, nmax, rmin, 0.1, nstep, False)
        sc, mn = sc.reshape(B, 8), mn.reshape(B, 8)
        max_scale = jnp.maximum(jnp.max(sc, axis=-1), 0.0)
        max_min = jnp.maximum(jnp.max(mn, axis=-1), 0.0)
        inv_s = jnp.where(max_scale > 0, _div(np.float32(63), max_scale), 0.0)
        inv_m = jnp.where(max_min > 0, _div(np.float32(63), max_min), 0.0)
        ls = jnp.minimum(63, _u8(_ni(_col(inv_s) * sc)))
        lm = jnp.minimum(63, _u8(_ni(_col(inv_m) * mn)))
        d, dmin = _div(max_scale, np.float32(63)), _div(max_min, np.float32(63))
    else:
        s2 = _superblock_sigma2(x, twice=True)
        w = _sigma_weights(x, qw, s2).reshape(-1, 32)
        sw = _seqsum(w).reshape(B, 8)
        sc, mn, L = make_qkx3_quants(xs, w, nmax, -0.9, 0.05, 36, False)
        d, ls = make_qp_quants(sc.reshape(B, 8), 63, sw)
        dmin, lm = make_qp_quants(mn.reshape(B, 8), 63, sw)
        if nmax == 31:
            ls, lm = jnp.minimum(63, ls), jnp.minimum(63, lm)
    sbytes = _pack_k4_scales(ls, lm)
    s, m = _unpack_k4_scales(sbytes)
    dq = _col(_col(_f16(d)) * _f(s))
    mq = _col(_col(_f16(dmin)) * _f(m))
    lq = jnp.clip(_ni(_div(x.reshape(B, 8, 32) + mq, dq)), 0, nmax)
    L = jnp.where(dq != 0, lq, L.reshape(B, 8, 32)).reshape(B, QK_K)
    return _bytes(_f16_bytes(d), _f16_bytes(dmin), sbytes), L


def _quant_q4_k(x, qw, sigma2):
    head, L = _quant_k45(x, qw, 15)
    c = L.reshape(-1, 4, 2, 32)
    return _bytes(head, _nibbles(c[:, :, 0], c[:, :, 1]).reshape(-1, 128))


def _quant_q5_k(x, qw, sigma2):
    head, L = _quant_k45(x, qw, 31)
    B = L.shape[0]
    c = L.reshape(B, 4, 2, 32)  # (chunk, low/high half, j)
    hb = (c >> 4) & 1
    qh = jnp.sum(hb.reshape(B, 8, 32) << jnp.arange(8).reshape(1, 8, 1), axis=1)  # bit 2·chunk + half
    ql = _nibbles(c[:, :, 0], c[:, :, 1]).reshape(B, 128)
    return _bytes(head, qh, ql)


def _quant_q6_k(x, qw, sigma2):
    B = x.shape[0]
    xs = _sub(x, 16)
    sc, L = make_qx_quants(xs, 32, None if qw is None else qw.reshape(-1, 16))
    sc = sc.reshape(B, 16)
    idx = jnp.argmax(jnp.abs(sc), axis=-1, keepdims=True)
    max_scale = jnp.take_along_axis(sc, idx, axis=-1)[:, 0]
    zero_block = jnp.abs(max_scale) < _EPS
    iscale = _div(np.float32(-128), max_scale)
    d = _div(np.float32(1.0), iscale)
    s8 = _i8(jnp.minimum(127, _ni(_col(iscale) * sc)))
    dq = _col(_col(_f16(d)) * _f(s8))
    lq = jnp.clip(_ni(_div(x.reshape(B, 16, 16), dq)), -32, 31) + 32
    L = jnp.where(dq != 0, lq, L.reshape(B, 16, 16)).reshape(B, 2, 4, 32)  # (half, quarter, l)
    ql = jnp.concatenate([_nibbles(L[:, :, 0], L[:, :, 2]), _nibbles(L[:, :, 1], L[:, :, 3])], axis=-1)
    qh = (L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4) | ((L[:, :, 3] >> 4) << 6)
    out = _bytes(ql.reshape(B, 128), qh.reshape(B, 64), _u8(s8), _f16_bytes(d))
    return jnp.where(_col(zero_block), jnp.zeros_like(out), out)


_QUANT = {"q4_0": _quant_q4_0, "q4_1": _quant_q4_1, "q5_0": _quant_q5_0, "q5_1": _quant_q5_1,
          "q8_0": _quant_q8_0, "q2_k": _quant_q2_k, "q3_k": _quant_q3_k, "q4_k": _quant_q4_k,
          "q5_k": _quant_q5_k, "q6_k": _quant_q6_k}


# ---------------------------------------------------------------------------------------
# Block dequantizers: data (B, type_size) int32 -> (B, QK) float32, as gguf-py / ggml do
# ---------------------------------------------------------------------------------------
def _lo_hi(qs):
    return jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _qh_bits(qh4):
    return (jnp.repeat(qh4, 8, axis=-1) >> jnp.tile(jnp.arange(8), 4)) & 1


def _deq_q4_0(b):
    return _col(_f16_from(b[:, :2])) * _f(_lo_hi(b[:, 2:]) - 8)


def _deq_q4_1(b):
    return _p(_col(_f16_from(b[:, :2])) * _f(_lo_hi(b[:, 4:]))) + _col(_f16_from(b[:, 2:4]))


def _deq_q5_0(b):
    q = _lo_hi(b[:, 6:]) | (_qh_bits(b[:, 2:6]) << 4)
    return _col(_f16_from(b[:, :2])) * _f(q - 16)


def _deq_q5_1(b):
    q = _lo_hi(b[:, 8:]) | (_qh_bits(b[:, 4:8]) << 4)
    return _p(_col(_f16_from(b[:, :2])) * _f(q)) + _col(_f16_from(b[:, 2:4]))


def _deq_q8_0(b):
    return _col(_f16_from(b[:, :2])) * _f(_i8(b[:, 2:]))


def _deq_q2_k(b):
    B = b.shape[0]
    sc, d, dmin = b[:, :16], _f16_from(b[:, 80:82]), _f16_from(b[:, 82:84])
    dl = _col(d) * _f(sc & 0xF)
    ml = _col(dmin) * _f(sc >> 4)
    q = _f(_unpack2(b[:, 16:80])).reshape(B, 16, 16)
    return (_p(_col(dl) * q) - _col(_p(ml))).reshape(B, QK_K)


def _deq_q3_k(b):
    B = b.shape[0]
    hm, qs, s, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16_from(b[:, 108:110])
    dl = _col(d) * _f(_unpack_q3_scales(s) - 32)
    high = (hm.reshape(B, 1, 32) >> jnp.arange(8).reshape(1, 8, 1)) & 1
    q = _unpack2(qs) - 4 * (1 - high.reshape(B, QK_K))
    return (_col(dl) * _f(q).reshape(B, 16, 16)).reshape(B, QK_K)


def _deq_k45(b, q):
    B = b.shape[0]
    d, dmin = _f16_from(b[:, 0:2]), _f16_from(b[:, 2:4])
    s, m = _unpack_k4_scales(b[:, 4:16])
    dk = _col(d) * _f(s)
    dm = _col(dmin) * _f(m)
    return (_p(_col(dk) * _f(q).reshape(B, 8, 32)) - _col(_p(dm))).reshape(B, QK_K)


def _deq_q4_k(b):
    B = b.shape[0]
    qs = b[:, 16:144].reshape(B, 4, 1, 32) >> jnp.array([0, 4]).reshape(1, 1, 2, 1)
    return _deq_k45(b, (qs & 0xF).reshape(B, QK_K))


def _deq_q5_k(b):
    B = b.shape[0]
    qh, qs = b[:, 16:48], b[:, 48:176]
    ql = (qs.reshape(B, 4, 1, 32) >> jnp.array([0, 4]).reshape(1, 1, 2, 1)) & 0xF
    hb = (qh.reshape(B, 1, 32) >> jnp.arange(8).reshape(1, 8, 1)) & 1
    return _deq_k45(b, ql.reshape(B, QK_K) | (hb.reshape(B, QK_K) << 4))


def _deq_q6_k(b):
    B = b.shape[0]
    ql, qh, sc, d = b[:, :128], b[:, 128:192], _i8(b[:, 192:208]), _f16_from(b[:, 208:210])
    lo = (ql.reshape(B, 2, 1, 64) >> jnp.array([0, 4]).reshape(1, 1, 2, 1)) & 0xF  # (half, nib, 64)
    hi = (qh.reshape(B, 2, 1, 32) >> (2 * jnp.arange(4)).reshape(1, 1, 4, 1)) & 3  # (half, k, 32)
    q = lo.reshape(B, 2, 4, 32) | (hi << 4)
    dl = _col(d) * _f(sc)
    return (_col(dl) * _f(q - 32).reshape(B, 16, 16)).reshape(B, QK_K)


_DEQUANT = {"q4_0": _deq_q4_0, "q4_1": _deq_q4_1, "q5_0": _deq_q5_0, "q5_1": _deq_q5_1, "q8_0": _deq_q8_0,
            "q2_k": _deq_q2_k, "q3_k": _deq_q3_k, "q4_k": _deq_q4_k, "q5_k": _deq_q5_k, "q6_k": _deq_q6_k}


# ---------------------------------------------------------------------------------------
# Public block codec
# ---------------------------------------------------------------------------------------
def _check_qtype(qtype: str) -> None:
    if qtype not in BLOCK:
        raise SpecError(f"unknown GGML block type {qtype!r}; valid: {', '.join(BLOCK)}")


def row_bytes(qtype: str, K: int) -> int:
    """Bytes of one row of ``K`` weights (``ggml_row_size``)."""
    _check_qtype(qtype)
    return K // BLOCK[qtype] * TYPE_SIZE[qtype]


@functools.partial(jax.jit, static_argnames=("qtype",))
def _quantize_blocks(rows, importance, zero, *, qtype: str):
    R, K = rows.shape
    qk = BLOCK[qtype]
    with _opaque_zero(zero):
        x = rows.astype(_F32)
        qw = sigma2 = None
        if importance is not None:
            qw = jnp.broadcast_to(importance.astype(_F32).reshape(1, K // qk, qk), (R, K // qk, qk)).reshape(-1, qk)
            if qk == 32:  # the classic types' impl take sigma² over the whole row
                sigma2 = jnp.repeat(_div(_seqsum(x * x), np.float32(K)), K // qk)
        out = _QUANT[qtype](x.reshape(-1, qk), qw, sigma2)
    return out.astype(jnp.uint8).reshape(R, -1)


def _neg_zero():
    return jnp.asarray(np.float32(-0.0))


def quantize_blocks(rows, qtype: str, importance=None):
    """Quantize rows into GGML blocks, byte for byte as llama.cpp's reference quantizers.

    Args:
      rows: float ``(R, K)`` (cast to float32), ``K`` a multiple of the type's block
        (:data:`BLOCK`: 32 or 256). A GGUF row is one output's weights: for a Flax kernel
        ``(in, out)`` pass its transpose.
      qtype: ``q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k``.
      importance: optional float32 ``(K,)`` per-input-channel weights (llama.cpp's imatrix:
        the mean ``x²`` of the layer's input); selects the importance-weighted quantizers
        (``quantize_row_*_impl``; Q8_0 has none and ignores it, as llama.cpp does).

    Returns:
      uint8 ``(R, K / QK · type_size)``: each row's blocks in GGML's ``block_*`` layout.

    Jitted inside (per type and shape); loops only where the reference searches. Called
    inside a caller's ``jit`` it works too, but the compiler then sees the constant that
    keeps products out of FMAs and may fuse them: bytes can differ from llama.cpp's by an
    ulp's rounding there (still a valid quantization).

    Raises:
      ShapeError: ``rows`` not 2-D, ``K`` not a multiple of the block, ``importance`` not ``(K,)``.
      SpecError: an unknown ``qtype``.
    """
    _check_qtype(qtype)
    rows = jnp.asarray(rows)
    if rows.ndim != 2 or rows.shape[1] % BLOCK[qtype]:
        raise ShapeError(f"quantize_blocks takes rows (R, K) with K a multiple of {BLOCK[qtype]} for {qtype}, "
                         f"got shape {tuple(rows.shape)}")
    K = rows.shape[1]
    if importance is not None:
        importance = jnp.asarray(importance)
        if tuple(importance.shape) != (K,):
            raise ShapeError(f"importance must have shape ({K},) (one weight per input channel), "
                             f"got {tuple(importance.shape)}")
        if qtype == "q8_0":  # quantize_q8_0 ignores quant_weights
            importance = None
    return _quantize_blocks(rows, importance, _neg_zero(), qtype=qtype)


#: the integer grid each classic block type holds: (bits, symmetric); their blocks are 32 long
INT_GRIDS = {"q4_0": (4, True), "q5_0": (5, True), "q8_0": (8, True), "q4_1": (4, False), "q5_1": (5, False)}


def blocks_from_codes(qtype: str, codes, d, m=None):
    """GGML blocks of a classic type from integer codes and their float16 parameters: the
    block bytes holding exactly ``(codes - 2**(bits-1))·d`` (Q4_0, Q5_0, Q8_0) or
    ``codes·d + m`` (Q4_1, Q5_1).

    Args:
      codes: ``(B, 32)`` integers in ``[0, 2**bits)``, one block a row.
      d, m: ``(B,)`` float16-exact scales and minima (``m`` for Q4_1/Q5_1 only).
    Returns:
      uint8 ``(B, type_size)``.
    Raises:
      SpecError: a type that is not one of :data:`INT_GRIDS`.
    """
    if qtype not in INT_GRIDS:
        raise SpecError(f"blocks_from_codes builds {', '.join(INT_GRIDS)}, not {qtype!r}")
    L = jnp.asarray(codes, jnp.int32)
    d = jnp.asarray(d, jnp.float16)
    if qtype == "q8_0":
        return _bytes(_f16_bytes(d), _u8(L - 128))
    parts = [_f16_bytes(d)] + ([] if m is None or INT_GRIDS[qtype][1] else [_f16_bytes(jnp.asarray(m, jnp.float16))])
    if qtype in ("q5_0", "q5_1"):
        parts.append(_qh_bytes(L))
    return _bytes(*parts, _nibbles(L[:, :16], L[:, 16:]))


@functools.partial(jax.jit, static_argnames=("qtype", "K"))
def _dequantize_blocks(data, zero, *, qtype: str, K: int):
    R = data.shape[0]
    with _opaque_zero(zero):
        b = data.astype(jnp.int32).reshape(-1, TYPE_SIZE[qtype])
        return _DEQUANT[qtype](b).reshape(R, K)


def dequantize_blocks(data, qtype: str, K: int):
    """The float32 ``(R, K)`` rows that GGML blocks ``data`` (uint8 ``(R, K / QK · type_size)``)
    stand for, bit for bit as ggml's ``dequantize_row_*`` and gguf-py's dequantizers (jitted
    inside; usable inside ``jit``, with the caveat of :func:`quantize_blocks`).

    Raises:
      ShapeError: ``data`` not ``(R, K / QK · type_size)``.
      SpecError: an unknown ``qtype``.
    """
    _check_qtype(qtype)
    data = jnp.asarray(data)
    nb = row_bytes(qtype, K)
    if K % BLOCK[qtype] or data.ndim != 2 or data.shape[1] != nb:
        raise ShapeError(f"{qtype} rows of K={K} take data of shape (R, {nb}), got {tuple(data.shape)}")
    return _dequantize_blocks(data, _neg_zero(), qtype=qtype, K=K)


# ---------------------------------------------------------------------------------------
# QTensor and the ``kquant`` method
# ---------------------------------------------------------------------------------------
def grid_for(qtype: str, scale_dtype: str = "float16") -> Grid:
    """The QTensor grid of a GGML type (format, nominal bits; symmetric unless it stores a minimum)."""
    return Grid(qtype, FIXED_BITS[qtype], qtype not in _WITH_MIN, False, "float", "float16")


def dequantize_qtensor(qt: QTensor, dtype=None):
    """A GGML QTensor (codes uint8 ``(K / QK · type_size, N)``) as its float ``(K, N)`` array."""
    K, N = qt.shape
    w = dequantize_blocks(qt.codes.T, qt.format, K).T
    return w.astype(jnp.dtype(dtype or qt.dtype))


@dataclasses.dataclass(frozen=True)
class KQuantOptions:
    """Options of ``kquant`` (``QuantSpec.options``).

    ``imatrix``: weight the quantization by the mean ``x²`` of each input channel
    (statistic ``act_sq_mean``, llama.cpp's importance matrix; needs calibration).
    ``fallback``: when the input length ``in`` is not a multiple of the type's block, use
    llama.cpp ``llama-quantize``'s fallback type (:data:`FALLBACK`) instead of failing.
    """

    imatrix: bool = False
    fallback: bool = False




def _stats(spec) -> tuple[str, ...]:
    return ("act_sq_mean",) if options_of(spec).imatrix else ()


def resolve_type(qtype: str, K: int, fallback: bool, path: str | None = None) -> str:
    """The GGML type to use for rows of ``K`` weights: ``qtype``, or with ``fallback`` llama.cpp's
    fallback type when ``K`` is not a multiple of ``qtype``'s block.

    Raises:
      ShapeError: ``K`` fits neither (naming the path, the length, the block, the fallback).
    """
    qk = BLOCK[qtype]
    if K % qk == 0:
        return qtype
    fb = FALLBACK.get(qtype)
    if fb is not None and fallback and K % BLOCK[fb] == 0:
        return fb
    if fb is None:
        hint = ("llama.cpp's llama-quantize has no fallback for this type (it refuses the tensor); "
                "keep this leaf in float (a None rule) or use another type")
    elif K % BLOCK[fb] == 0:
        hint = (f"llama.cpp's llama-quantize falls back to {fb.upper()} for such tensors: pass "
                f"options={{'fallback': True}} to do the same, or keep this leaf in float")
    else:
        hint = (f"llama.cpp's fallback {fb.upper()} needs a multiple of {BLOCK[fb]} too, so llama-quantize "
                "keeps such tensors in F16: keep this leaf in float (a None rule)")
    raise ShapeError(at(path, f"{qtype} quantizes rows in blocks of {qk}, but the input axis (axis 0) has "
                              f"length {K}, not a multiple of {qk}; {hint}"))


def kquant_quantize(w, spec, importance=None, *, path: str | None = None) -> tuple[QTensor, dict]:
    """Quantize a Flax kernel ``w`` ``(in, out)`` to the GGML type ``spec.format``.

    Each output column is one GGUF row of ``in`` weights. ``importance``: optional float
    ``(in,)`` (``act_sq_mean``) for the importance-weighted quantizers. The spec's
    granularity, group size, symmetry and zero type do not apply (the type fixes them).

    Returns:
      the QTensor (format: the type used, which differs from ``spec.format`` after a
      fallback; codes uint8 ``(in / QK · type_size, out)``, no scale or zero) and
      ``{"type": the type used, "fallback": 0/1}``.

    Raises:
      ShapeError: ``w`` not 2-D, ``spec.axis`` not 0, ``in`` not a multiple of the block
        (unless ``fallback`` finds a type), ``importance`` not ``(in,)``.
      DTypeError, NonFiniteError: as :func:`jquant.quantize` (non-float or non-finite ``w``).
    """
    from jquant.quantizers.rtn import check_weight

    opts = options_of(spec)
    w = jnp.asarray(w)
    check_weight(w, path)
    if w.ndim != 2 or spec.axis % max(w.ndim, 1) != 0:
        raise ShapeError(at(path, f"kquant takes 2-D kernels (in, out) with the blocks along axis 0; got shape "
                                  f"{tuple(w.shape)}, axis {spec.axis}"))
    K, N = w.shape
    qtype = resolve_type(spec.format, K, opts.fallback, path)
    if importance is not None:
        importance = jnp.asarray(importance, _F32)
        if importance.shape != (K,):
            raise ShapeError(at(path, f"act_sq_mean must have shape ({K},) for a kernel of shape {(K, N)}, "
                                      f"got {tuple(importance.shape)}"))
        bad = ~jnp.isfinite(importance) | (importance < 0)
        if bool(jnp.any(bad)):
            raise DataError(at(path, f"importance matrix (act_sq_mean) holds {int(jnp.sum(bad))} NaN/Inf or negative "
                                     "value(s); it must be finite and >= 0 (mean x² of the layer's inputs)"))
        # A block whose inputs all had zero importance (dead in calibration) would be fitted to
        # nothing and come out as zeros: such blocks are quantized unweighted instead.
        QK = BLOCK[qtype]
        dead = jnp.all(importance.reshape(K // QK, QK) == 0, axis=1)
        if bool(jnp.any(dead)):
            importance = jnp.where(jnp.repeat(dead, QK), 1.0, importance)
    codes = quantize_blocks(w.T, qtype, importance).T
    qt = QTensor(codes, None, None, None, shape=(K, N), dtype=jnp.dtype(w.dtype).name, grid=grid_for(qtype),
                 granularity="group", group_size=BLOCK[qtype], axis=0, word_bits=8, method="kquant")
    return qt, {"type": qtype, "fallback": int(qtype != spec.format)}


def _method(w, spec, stats, *, path: str | None = None):
    return kquant_quantize(w, spec, stats.get("act_sq_mean"), path=path)


register(Method("kquant", _method, stats=_stats, options=KQuantOptions, formats=GGML_FORMATS,
                paper="llama.cpp ggml/src/ggml-quants.c (reference quantizers); no arXiv id",
                summary="GGUF block types Q4_0..Q8_0 and k-quants Q2_K..Q6_K, byte-exact with llama.cpp's "
                        "reference quantizers; optional importance matrix (act_sq_mean)"))
