"""Number formats: the grids codes live on, and how a range becomes scale and zero.

Every function here works on a *grouped view* ``x`` of shape ``(G, S, R)``: ``G`` groups
along the reduction axis, ``S`` elements per group (the ragged last group is padded
with NaN, which every reduction ignores), ``R`` independent columns. Parameters have
shape ``(G, 1, R)``. Codes are unsigned integers in ``[0, 2**bits)``.

Formats and their dequantization ``x̂(c)`` (``s`` scale, ``z`` integer zero, ``m`` float minimum):

=============  ====  ======================================================================
``int`` sym     b    x̂ = (c − 2^(b−1))·s;  restricted: s = absmax/(2^(b−1)−1), q ∈ ±(2^(b−1)−1);
                      full range: s = m/(−2^(b−1)) with m the signed extreme (GGUF Q4_0 style)
``int`` asym    b    integer zero (GPTQ/AWQ): x̂ = (c − z)·s, s = (hi−lo)/(2^b−1), z = round(−lo/s),
                      the range widened to hold 0 so 0 is exactly on the grid;
                      float minimum (GGUF Q4_1 / HQQ): x̂ = c·s + m, s = (hi−lo)/(2^b−1), m = lo
``nf4``         4    x̂ = NF4[c]·s, s = absmax (QLoRA normal-float codebook, arXiv:2305.14314)
``fp4_e2m1``    4    x̂ = E2M1[c]·s, s = absmax/6 (OCP MX FP4)
``fp8_e4m3``    8    x̂ = E4M3[c]·s, s = absmax/448
``fp8_e5m2``    8    x̂ = E5M2[c]·s, s = absmax/57344
``binary``      1    x̂ = (2c − 1)·β, c = [x ≥ α], α = mean(x), β = mean|x| (BitNet, arXiv:2310.11453)
``ternary``     2    x̂ = (c − 1)·γ, c − 1 = clip(round(x/γ), −1, 1), γ = mean|x| (BitNet b1.58 absmean,
                      arXiv:2402.17764)
``bcq``        1–4   x̂ = Σ_{i<b} α_i·(2·bit_i(c) − 1): b binary planes, α_i ≥ 0 per group, the scale
                      stored with a leading plane axis ``(b,) + param_shape`` (binary-coding
                      quantization, arXiv:1802.00150; method ``bcq``, :mod:`jquant.quantizers.bcq`)
=============  ====  ======================================================================

Codes are always computed from the scale *as stored* (rounded to ``scale_dtype``), so the
codes and the stored parameters agree exactly, as in the reference GPTQ and GGUF code.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax
import ml_dtypes
import numpy as np

# Grids the element-wise quantizers (rtn, gptq, hqq) produce.
GRID_FORMATS = ("int", "nf4", "fp4_e2m1", "fp8_e4m3", "fp8_e5m2", "binary", "ternary")
# GGUF block types, byte for byte llama.cpp's (see jquant.quantizers.kquant; bits are nominal).
GGML_FORMATS = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
# Binary-coding quantization: sums of ±α_i bit planes, fitted by jquant.quantizers.bcq alone.
BCQ_FORMATS = ("bcq",)
BCQ_MAX_BITS = 4
# Block-scaled floats: OCP MX (E8M0 scale per 32) and NVIDIA NVFP4 (E4M3 scale per 16 plus a
# float32 tensor scale); codes are block bytes (see jquant.quantizers.blockfloat).
BLOCKFLOAT_FORMATS = ("mxfp4", "mxfp8_e4m3", "mxfp8_e5m2", "nvfp4")
FORMATS = GRID_FORMATS + GGML_FORMATS + BCQ_FORMATS + BLOCKFLOAT_FORMATS
FIXED_BITS = {"mxfp4": 4, "mxfp8_e4m3": 8, "mxfp8_e5m2": 8, "nvfp4": 4,
              "nf4": 4, "fp4_e2m1": 4, "fp8_e4m3": 8, "fp8_e5m2": 8, "binary": 1, "ternary": 2,
              "q4_0": 4, "q4_1": 4, "q5_0": 5, "q5_1": 5, "q8_0": 8, "q2_k": 2, "q3_k": 3, "q4_k": 4, "q5_k": 5,
              "q6_k": 6}
CODEBOOK_FORMATS = ("nf4", "fp4_e2m1", "fp8_e4m3", "fp8_e5m2")
# Formats whose scale is set by a range (and so by range calibration).
RANGE_FORMATS = ("int",) + CODEBOOK_FORMATS

# The QLoRA NF4 codebook (quantiles of N(0,1) normalised to [-1, 1], with an exact 0).
NF4_VALUES = np.array(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
     -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
     0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
     0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=np.float32,
)

class Grid(NamedTuple):
    """The static description of a grid: everything encode/decode need besides arrays."""

    fmt: str = "int"
    bits: int = 4
    symmetric: bool = True
    full_range: bool = False
    zero_type: str = "int"  # asymmetric only: "int" zero point or "float" minimum
    scale_dtype: str = "float16"


_FLOAT_DTYPES = {
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
}


@functools.cache
def codebook(fmt: str) -> np.ndarray:
    """Float32 value of every code of a codebook format (NaN for codes that are not numbers)."""
    if fmt == "nf4":
        return NF4_VALUES
    dt = _FLOAT_DTYPES[fmt]
    bits = FIXED_BITS[fmt]
    raw = np.arange(2**bits, dtype=np.uint8)
    if bits == 4:  # ml_dtypes stores fp4 one value per byte, low nibble
        vals = raw.view(dt)
    else:
        vals = raw.view(dt)
    return vals.astype(np.float32)


def format_max(fmt: str) -> float:
    """Largest finite magnitude of a codebook format's grid."""
    cb = codebook(fmt)
    return float(np.max(np.abs(cb[np.isfinite(cb)])))  # e5m2 has ±Inf codes


def group_min_max(x):
    """Per-group min and max of a grouped view ``(G, S, R)``, ignoring NaN padding; ``(G,1,R)``.

    Reduced by halving: the elementwise min (max) of the two halves of axis 1, ``log2(S)``
    times, both in step. Exact (min and max do not depend on the order), and XLA fuses the
    levels into loops over ``R`` that read ``x`` about once; its own reduce over a middle
    axis, behind the NaN mask, ran 7× slower (a 940 MB weight: 0.91 s against 0.13 s).
    """
    nan = jnp.isnan(x)
    lo, hi = jnp.where(nan, jnp.inf, x), jnp.where(nan, -jnp.inf, x)
    while lo.shape[1] > 1:
        h, odd = lo.shape[1] // 2, lo.shape[1] % 2
        lo2, hi2 = jnp.minimum(lo[:, :h], lo[:, h:2 * h]), jnp.maximum(hi[:, :h], hi[:, h:2 * h])
        if odd:  # the odd one out joins the first
            lo2 = jnp.concatenate([jnp.minimum(lo2[:, :1], lo[:, 2 * h:]), lo2[:, 1:]], axis=1)
            hi2 = jnp.concatenate([jnp.maximum(hi2[:, :1], hi[:, 2 * h:]), hi2[:, 1:]], axis=1)
        lo, hi = lo2, hi2
    return lo, hi


def _nanmean(x):
    valid = ~jnp.isnan(x)
    return jnp.sum(jnp.where(valid, x, 0.0), axis=1, keepdims=True) / jnp.maximum(
        jnp.sum(valid, axis=1, keepdims=True), 1
    )


def _store(v, scale_dtype):
    """Round a parameter to its storage dtype and back to float32 (what decode will see)."""
    return v.astype(scale_dtype).astype(jnp.float32)


def _safe(s):
    return jnp.where(s == 0, 1.0, s)


def div(a, b):
    """IEEE ``a / b`` with broadcasting, never ``a * (1/b)``.

    XLA's simplifier turns a division by a broadcast (a scalar or a per-group scale) into a
    multiplication by the reciprocal, which is off by an ulp often enough to flip roundings.
    Here the divisor is ``where(isnan(a), 1, b)``: a select, not a broadcast, so the rewrite
    does not apply, and equal to ``b`` wherever it matters (a NaN ``a`` gives NaN either way).
    It fuses into the division's loop: no full-size temporary (an ``optimization_barrier`` on
    the broadcast divisor, the earlier way, wrote and read one: 8 bytes a value more).
    Codes and scales so match references (and GGUF's C code) exactly.
    """
    a = jnp.asarray(a, jnp.result_type(a, jnp.float32))
    return a / jnp.where(jnp.isnan(a), jnp.asarray(1.0, a.dtype), jnp.asarray(b, a.dtype))


def params_from_range(lo, hi, grid: Grid):
    """Scale (and zero) of range formats from a clipping range ``[lo, hi]`` (shapes ``(G,1,R)``).

    Returns ``(scale, zero)``: float32 values equal to what is stored; ``zero`` is None for
    symmetric grids, an integer-valued float32 for ``zero_type='int'``, a float minimum for
    ``zero_type='float'``.
    """
    fmt, bits, symmetric, full_range, zero_type, scale_dtype = grid
    lo = lo.astype(jnp.float32)
    hi = hi.astype(jnp.float32)
    if fmt in CODEBOOK_FORMATS:
        absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        return _store(div(absmax, format_max(fmt)), scale_dtype), None
    if symmetric:
        half = 2 ** (bits - 1)
        if full_range:
            extreme = jnp.where(jnp.abs(lo) > jnp.abs(hi), lo, hi)
            return _store(div(extreme, -half), scale_dtype), None
        absmax = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
        return _store(div(absmax, half - 1), scale_dtype), None
    maxq = 2**bits - 1
    if zero_type == "int":
        lo = jnp.minimum(lo, 0.0)
        hi = jnp.maximum(hi, 0.0)
        s = _store(div(hi - lo, maxq), scale_dtype)
        z = jnp.clip(jnp.round(div(-lo, _safe(s))), 0, maxq)
        return s, z
    # The step is taken from the *stored* minimum, so hi stays on the grid although m was rounded.
    m = _store(lo, scale_dtype)
    s = _store(div(hi - m, maxq), scale_dtype)
    return s, m


def encode(x, scale, zero, grid: Grid):
    """Codes (uint8, in ``[0, 2**bits)``) of ``x`` on the grid given by ``scale``/``zero``."""
    fmt, bits, symmetric, full_range, zero_type, _ = grid
    x = x.astype(jnp.float32)
    if fmt == "int":
        maxq = 2**bits - 1
        if symmetric:
            half = 2 ** (bits - 1)
            lo_q = -half if full_range else -(half - 1)
            q = jnp.clip(jnp.round(div(x, _safe(scale))), lo_q, half - 1)
            c = q + half
        elif zero_type == "int":
            c = jnp.clip(jnp.round(div(x, _safe(scale))) + zero, 0, maxq)
        else:
            c = jnp.clip(jnp.round(div(x - zero, _safe(scale))), 0, maxq)
        return jnp.where(jnp.isnan(c), 0, c).astype(jnp.uint8)
    if fmt == "nf4":
        y = jnp.clip(div(x, _safe(scale)), -1.0, 1.0)
        mids = jnp.asarray((NF4_VALUES[1:] + NF4_VALUES[:-1]) / 2)
        c = jnp.sum(y[..., None] > mids, axis=-1)
        return c.astype(jnp.uint8)
    if fmt in _FLOAT_DTYPES:
        fmax = format_max(fmt)
        y = jnp.clip(div(x, _safe(scale)), -fmax, fmax)
        y = jnp.where(jnp.isnan(y), 0.0, y)
        f = y.astype(_FLOAT_DTYPES[fmt])
        if bits == 8:
            return lax.bitcast_convert_type(f, jnp.uint8)
        # 4-bit floats: find the code by exact match against the codebook (16 entries).
        cb = jnp.asarray(codebook(fmt))
        fv = f.astype(jnp.float32)
        # +0 and -0 both match code 0 first (positive zero), as argmax takes the first hit.
        hit = (fv[..., None] == cb) & ~((fv[..., None] == 0) & (jnp.signbit(fv)[..., None] != jnp.signbit(cb)))
        return jnp.argmax(hit, axis=-1).astype(jnp.uint8)
    raise ValueError(f"encode: not a range format: {fmt}")


def decode(codes, scale, zero, grid: Grid):
    """Float32 values of ``codes`` (the dequantization formula of each format).

    For ``bcq`` the scale has a leading plane axis: ``scale[i]`` (broadcasting against
    ``codes``) is plane ``i``'s α, and ``zero`` is unused.
    """
    fmt, bits, symmetric, _, zero_type, _ = grid
    if fmt == "bcq":
        return bcq_decode(codes, scale, bits)
    c = codes.astype(jnp.float32)
    if fmt == "int":
        if symmetric:
            return (c - 2 ** (bits - 1)) * scale
        if zero_type == "int":
            return (c - zero) * scale
        return c * scale + zero
    if fmt in CODEBOOK_FORMATS:
        return jnp.asarray(codebook(fmt))[codes.astype(jnp.int32)] * scale
    if fmt == "binary":
        return (2.0 * c - 1.0) * scale
    if fmt == "ternary":
        return (c - 1.0) * scale
    raise ValueError(f"decode: unknown format {fmt}")


def quantize_meanabs(x, grid: Grid):
    """BitNet binary/ternary: codes and the mean-abs scale of each group."""
    fmt, scale_dtype = grid.fmt, grid.scale_dtype
    x = x.astype(jnp.float32)
    absmean = _nanmean(jnp.abs(x))
    if fmt == "binary":
        beta = _store(absmean, scale_dtype)
        alpha = _nanmean(x)
        c = (x >= alpha).astype(jnp.uint8)
        return c, beta
    gamma = _store(absmean, scale_dtype)
    q = jnp.clip(jnp.round(div(x, jnp.maximum(gamma, 1e-8))), -1, 1)
    c = jnp.where(jnp.isnan(q), 0, q + 1).astype(jnp.uint8)
    return c, gamma


def bcq_decode(codes, alphas, bits: int):
    """``Σ_{i<bits} α_i·(2·bit_i(c) − 1)`` in float32: bit ``i`` of each code is bit plane
    ``i`` (+1 when set, −1 when clear); ``alphas[i]`` broadcasts against ``codes``.
    The sum runs plane 0 first, the order the quantizer computes its error in."""
    c = codes.astype(jnp.uint32)
    a = jnp.asarray(alphas).astype(jnp.float32)
    out = None
    for i in range(bits):
        b = (((c >> i) & 1).astype(jnp.float32) * 2.0 - 1.0) * a[i]
        out = b if out is None else out + b
    return out
