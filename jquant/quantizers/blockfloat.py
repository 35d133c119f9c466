"""Block-scaled floating point: OCP Microscaling MXFP4 / MXFP8 (OCP Microscaling Formats (MX)
Specification v1.0, 2023) and NVIDIA NVFP4 (NVIDIA Blackwell NVFP4: E2M1 elements, an FP8
E4M3 scale per 16 elements and one FP32 scale per tensor; TensorRT-Model-Optimizer's
weight recipe). No arXiv id.

Formats (``QuantSpec.format``, method ``blockfloat``; a Flax kernel ``(in, out)``, blocks
along the input axis 0):

==============  =====  ===============================================  ======================  ==========
format          block  block bytes (one GGUF-style row = K / block)     scale rule              bits/weight
==============  =====  ===============================================  ======================  ==========
``mxfp4``        32    1 E8M0 byte + 16 bytes of E2M1 nibbles            llama.cpp (see below)   4.25
                       (gguf ``MXFP4``, llama.cpp ``block_mxfp4``)
``mxfp8_e4m3``   32    1 E8M0 byte + 32 E4M3 bytes                       OCP, emax 8             8.25
``mxfp8_e5m2``   32    1 E8M0 byte + 32 E5M2 bytes                       OCP, emax 15            8.25
``nvfp4``        16    per 64: 4 UE4M3 bytes + 32 bytes of nibbles       NVIDIA two-level        4.5 + 32/numel
                       (gguf ``NVFP4``, llama.cpp ``block_nvfp4``)
==============  =====  ===============================================  ======================  ==========

E8M0 is a biased exponent: byte ``e`` is ``2^(e − 127)`` (127 = 2^0, 255 = NaN). The OCP rule:
``shared_exp = floor(log2(amax)) − emax_elem`` (clamped to E8M0's range), elements
``x / 2^shared_exp`` rounded to nearest-even in the element format, saturating
(E2M1 ±6, E4M3 ±448, E5M2 ±57344). NVFP4: ``s = amax_tensor / (448·6)`` (float32, the QTensor's
``scale``, 1.0 for an all-zero tensor), block scale ``b = E4M3(amax_block / (6·s))`` (round to
nearest even), element ``E2M1(x / (b·s))``; dequantized ``E2M1·b·s``.

**MXFP4 follows llama.cpp / gguf-py byte for byte** (``quantize_row_mxfp4_ref`` and
``gguf.quants.MXFP4``; the tests check against gguf-py, whose formula is the C code's), which
differs from the OCP rule in three places:

- the exponent is ``floor(log2f(amax))`` with a float32 ``log2``: for ``amax`` just below a
  power of two (within about ``|k|·2^-24`` relative, ``k = log2 amax``) the float32 logarithm
  rounds up to ``k`` and the block gets the next larger scale (OCP: the exact floor). This is
  reproduced exactly, without a logarithm, by comparing the mantissa with thresholds of a
  correctly rounded float32 ``log2`` (:data:`_LOG2F_BUMP`; NumPy's and glibc's ``log2f`` are
  correctly rounded on every float32 just below a power of two, which the tests check);
- elements are the codebook entry nearest to ``x`` (``|d·k − x|`` in float32), the first
  entry winning ties, so a tie goes to the smaller magnitude (OCP: to the even code). For
  ``x / 2^shared_exp`` = 0.75, 1.75, 3.5 this gives 0.5, 1.5, 3 where the spec gives 1, 2, 4
  (at 0.25, 1.25, 2.5, 5 both give the smaller);
- blocks with ``amax < 2^-125`` store exponent byte 0 here; gguf-py casts the negative
  exponent to uint8 (platform-defined). Such blocks (and byte 0/1 exponents, which need
  float32 subnormals that XLA's CPU backend flushes to zero) are outside the byte-exact
  guarantee; weights never have them.

E8M0 byte 255 decodes to NaN here (the spec's NaN); gguf-py decodes it as ``2^128``. No
quantizer writes it.

**NVFP4** uses gguf's ``NVFP4`` byte layout (super-blocks of 64 = four scale blocks of 16:
4 UE4M3 scale bytes, then per sub-block 8 bytes, byte ``j`` = element ``j`` low nibble,
element ``j + 8`` high nibble), so the input length must be a multiple of 64, and
``dequantize`` equals gguf-py's NVFP4 dequantizer times ``s`` bit for bit. llama.cpp's NVFP4
has no tensor scale (its ``quantize_row_nvfp4_ref`` takes ``b = UE4M3(amax_block / 6)``, so
typical weights' scales sit in E4M3's subnormal range), and its ``ggml_fp32_to_ue4m3``
(gguf-py's ``fp32_to_ue4m3``) rounds ties up, writes 448 for every value from 248 up (all
that round to 256 or more) and 7·2^-9 for the subnormals that round to 2^-6. jquant follows
NVIDIA's two-level recipe instead (the tensor scale is the QTensor's ``scale`` child; with
``s = 1`` the bytes are valid llama.cpp blocks), rounds block scales to nearest even as E4M3
casts do (equal to gguf-py's encoder below 248 except at ties, which the tests check), and
elements to nearest even (NVIDIA's ``cvt.rn.satfinite.e2m1x2``). A block whose scale rounds
to 0 (``amax_block < 2^-10 / 448 · amax_tensor``) dequantizes to zeros.

**MXFP8** has no GGUF type; its blocks use the same pattern (E8M0 byte, then the 32 codes
in order: E4M3 or E5M2 bytes as ``ml_dtypes`` stores them).

Why a method of its own and not formats of ``rtn``: ``rtn``'s QTensors are packed codes plus
a float ``scale`` array per group; here the scales are part of each block's bytes (E8M0 /
UE4M3), as in :mod:`jquant.quantizers.kquant`, so these formats share kquant's
representation (``codes`` uint8 ``(K / QK · type_size, N)``, column ``n`` = GGUF-style row
``n``; ``scale`` None except NVFP4's tensor scale), its dequantize dispatch and its kernel
refusal, rather than adding a second representation to ``rtn``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant import formats
from jquant.errors import ShapeError, SpecError, at
from jquant.formats import BLOCKFLOAT_FORMATS, FIXED_BITS, Grid
from jquant.qtensor import QTensor
from jquant.quantizers.registry import Method, register

#: elements sharing one scale
BLOCK = {"mxfp4": 32, "mxfp8_e4m3": 32, "mxfp8_e5m2": 32, "nvfp4": 16}
#: elements per stored block (the input length must be a multiple): gguf's NVFP4 block is 64
ROW_BLOCK = {"mxfp4": 32, "mxfp8_e4m3": 32, "mxfp8_e5m2": 32, "nvfp4": 64}
#: bytes per stored block
TYPE_SIZE = {"mxfp4": 17, "mxfp8_e4m3": 33, "mxfp8_e5m2": 33, "nvfp4": 36}
#: largest exponent of the element format (OCP ``emax_elem``)
EMAX = {"mxfp4": 2, "mxfp8_e4m3": 8, "mxfp8_e5m2": 15}
_FP8 = {"mxfp8_e4m3": jnp.float8_e4m3fn, "mxfp8_e5m2": jnp.float8_e5m2}
_FP8_MAX = {"mxfp8_e4m3": 448.0, "mxfp8_e5m2": 57344.0}
E4M3_MAX = 448.0
E2M1_MAX = 6.0

_F32 = jnp.float32
#: E2M1 values doubled, by code (gguf/llama.cpp ``kvalues_mxfp4``): sign bit 3
KVALUES = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.float32)
#: midpoints between consecutive E2M1 magnitudes (0, .5, 1, 1.5, 2, 3, 4, 6)
_E2M1_MIDS = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)


def _ue4m3_half_table() -> np.ndarray:
    """gguf-py's ``NVFP4.ue4m3_to_fp32`` (llama.cpp ``ggml_ue4m3_to_fp32``) for every byte, in
    float32: half the unsigned E4M3 value (bit 7 ignored; 0 and 0x7F decode to 0)."""
    x = np.arange(256)
    exp = (x >> 3) & 0xF
    man = (x & 7).astype(np.float32)
    raw = np.where(exp == 0, man * np.float32(2.0**-9),
                   (np.float32(1) + man / np.float32(8)) * np.float32(2.0) ** (exp.astype(np.float32) - 7))
    return np.where((x == 0) | (x == 0x7F), np.float32(0), raw.astype(np.float32) * np.float32(0.5)).astype(np.float32)


_UE4M3_HALF = _ue4m3_half_table()


def _log2f_bump_table() -> np.ndarray:
    """``T[n + 150]``: the smallest float32 mantissa ``m`` in ``[1, 2)`` for which a correctly
    rounded float32 ``log2(m · 2^(n−1))`` equals the integer ``n`` (2.0 where it never does).
    ``log2 = n − ε`` with ``ε = −log2(m/2)`` rounds to ``n`` iff ``ε`` is at most half the float32
    spacing on ``n``'s lower side (a tie goes to ``n``, whose significand is even)."""
    out = np.full(300, 2.0, np.float32)
    for n in range(-149, 150):
        if n == 0:
            continue
        a = abs(n)
        lg = int(np.floor(np.log2(a)))
        if n > 0:
            gap = 2.0 ** (lg - 24) if a == 2**lg else 2.0 ** (lg - 23)  # spacing just below n
        else:
            gap = 2.0 ** (lg - 23)  # n − ε is further from 0: spacing just above |n|
        t = 2.0 ** (1.0 - gap / 2)  # float64 is ample: t is far from any float32 midpoint
        f = np.float32(t)
        if float(f) < t:
            f = np.nextafter(f, np.float32(3))
        out[n + 150] = min(f, np.float32(2.0))
    return out


_LOG2F_BUMP = _log2f_bump_table()


def _check_format(fmt: str) -> None:
    if fmt not in BLOCK:
        raise SpecError(f"unknown block-scaled float format {fmt!r}; valid: {', '.join(BLOCK)}")


def row_bytes(fmt: str, K: int) -> int:
    """Bytes of one row of ``K`` weights."""
    _check_format(fmt)
    return K // ROW_BLOCK[fmt] * TYPE_SIZE[fmt]


def bits_per_weight(fmt: str, numel: int) -> float:
    """Storage per weight: 4.25 (MXFP4), 8.25 (MXFP8), ``4.5 + 32 / numel`` (NVFP4)."""
    _check_format(fmt)
    return 8.0 * TYPE_SIZE[fmt] / ROW_BLOCK[fmt] + (32.0 / numel if fmt == "nvfp4" else 0.0)


# ---------------------------------------------------------------------------------------
# Scales and element encoders, vectorised over blocks: x (B, n) float32
# ---------------------------------------------------------------------------------------
def _exponent(a):
    """``(floor(log2 a), mantissa in [1, 2))`` of float32 ``a > 0`` from its bits (exact;
    subnormals give exponent −127, which every caller clamps)."""
    bits = lax.bitcast_convert_type(a, jnp.int32)
    k = ((bits >> 23) & 0xFF) - 127
    m = lax.bitcast_convert_type((bits & 0x7FFFFF) | 0x3F800000, _F32)
    return k, m


def _pow2(k):
    """``2^k`` as float32 for integer ``k`` in ``[-126, 127]`` (built from bits)."""
    return lax.bitcast_convert_type(((k + 127) << 23).astype(jnp.int32), _F32)


def e8m0_gguf(amax):
    """llama.cpp's MXFP4 exponent byte: ``floor(log2f(amax)) − 2 + 127`` (0 when ``amax`` is 0,
    and clamped to 0 below ``2^-125``; see the module docstring)."""
    k, m = _exponent(amax)
    bump = m >= jnp.asarray(_LOG2F_BUMP)[jnp.clip(k + 1 + 150, 0, 299)]
    e = k + bump.astype(jnp.int32) - 2 + 127
    return jnp.where(amax > 0, jnp.clip(e, 0, 254), 0)


def e8m0_ocp(amax, emax: int):
    """The OCP shared-exponent byte: ``floor(log2(amax)) − emax + 127`` clamped to ``[0, 254]``
    (0 for an all-zero block)."""
    k, _ = _exponent(amax)
    return jnp.where(amax > 0, jnp.clip(k - emax + 127, 0, 254), 0)


def e8m0_value(e):
    """Float32 ``2^(e − 127)`` of E8M0 bytes (NaN for 255; 2^-127 for 0 is subnormal)."""
    e = e.astype(jnp.int32)
    v = lax.bitcast_convert_type(jnp.where(e == 0, 0x00400000, e << 23).astype(jnp.int32), _F32)
    return jnp.where(e == 255, jnp.nan, v)


def _e8m0_half(e):
    """``ggml_e8m0_to_fp32_half``: ``2^(e − 128)`` (NaN for 255, see the module docstring)."""
    e = e.astype(jnp.int32)
    bits = jnp.where(e < 2, jnp.left_shift(0x00200000, jnp.clip(e, 0, 1)), (e - 1) << 23)
    return jnp.where(e == 255, jnp.nan, lax.bitcast_convert_type(bits.astype(jnp.int32), _F32))


def e2m1_nearest_first(x, d_half):
    """llama.cpp's ``best_index_mxfp4``: the code whose ``|d_half · kvalue − x|`` (float32) is
    smallest, the first code in :data:`KVALUES` winning ties. ``x`` ``(B, n)``, ``d_half``
    ``(B, 1)``.

    Computed without the 16-way search (memory stays elementwise): the first-wins minimum is
    the nearest magnitude with ties to the smaller one (``+0`` for zero and for a tie at
    ``−d/2``), because the float32 errors ``|d·k − |x||`` fall strictly up to the nearest entry
    and rise strictly after it (their gaps, multiples of ``d``, dwarf their rounding); so the
    magnitude code counts the steps where the next entry's error is strictly smaller."""
    a = jnp.abs(x)
    mags = KVALUES[:8]
    err = lambda k: jnp.abs(d_half * np.float32(mags[k]) - a)  # noqa: E731
    c = jnp.zeros(x.shape, jnp.int32)
    prev = err(0)
    for k in range(1, 8):
        cur = err(k)
        c = c + (cur < prev).astype(jnp.int32)
        prev = cur
    return jnp.where((x < 0) & (c > 0), c | 8, c)


def e2m1_rne(y):
    """E2M1 codes of ``y`` (already divided by its scale), round to nearest even, saturating
    to ±6; zero magnitudes get code 0 (+0)."""
    a = jnp.abs(y)
    c = jnp.zeros(y.shape, jnp.int32)
    for i, m in enumerate(_E2M1_MIDS):  # a tie at mids[i] goes to code i + 1 when it is even
        up = (a > m) | (a == m) if (i + 1) % 2 == 0 else a > m
        c = c + up.astype(jnp.int32)
    return jnp.where((y < 0) & (c > 0), c | 8, c)


def _nibbles(lo, hi):
    return lo | (hi << 4)


def _quant_mxfp4(x):
    B = x.shape[0]
    e = e8m0_gguf(jnp.max(jnp.abs(x), axis=-1))
    c = e2m1_nearest_first(x, _e8m0_half(e)[:, None])
    return jnp.concatenate([e[:, None], _nibbles(c[:, :16], c[:, 16:])], axis=-1).reshape(B, 17)


def _quant_mxfp8(x, fmt):
    e = e8m0_ocp(jnp.max(jnp.abs(x), axis=-1), EMAX[fmt])
    # x / 2^shared_exp as two exact power-of-two products (2^(127 − e) can exceed float32)
    k = 127 - e[:, None]
    y = x * _pow2(k // 2) * _pow2(k - k // 2)
    fmax = _FP8_MAX[fmt]
    f = jnp.clip(y, -fmax, fmax).astype(_FP8[fmt])
    return jnp.concatenate([e[:, None], lax.bitcast_convert_type(f, jnp.uint8).astype(jnp.int32)], axis=-1)


def nvfp4_tensor_scale(w):
    """NVIDIA's per-tensor scale ``amax / (448·6)`` in float32 (1.0 when ``w`` is all zeros)."""
    amax = jnp.max(jnp.abs(jnp.asarray(w, _F32)))
    s = formats.div(amax, np.float32(E4M3_MAX * E2M1_MAX))
    return jnp.where(s > 0, s, np.float32(1.0))


def _quant_nvfp4(x, s):
    """``x`` ``(B, 64)`` -> ``(B, 36)`` gguf NVFP4 blocks, tensor scale ``s`` (float32 scalar)."""
    B = x.shape[0]
    xs = x.reshape(B, 4, 16)
    amax = jnp.max(jnp.abs(xs), axis=-1)  # (B, 4)
    b = formats.div(amax, s * np.float32(E2M1_MAX))
    b8 = jnp.clip(b, 0.0, E4M3_MAX).astype(jnp.float8_e4m3fn)
    sb = lax.bitcast_convert_type(b8, jnp.uint8).astype(jnp.int32)  # never sets bit 7
    denom = b8.astype(_F32) * s
    y = formats.div(xs, jnp.where(denom > 0, denom, 1.0)[..., None])
    c = jnp.where(denom[..., None] > 0, e2m1_rne(y), 0)
    qs = _nibbles(c[..., :8], c[..., 8:]).reshape(B, 32)
    return jnp.concatenate([sb, qs], axis=-1)


@functools.partial(jax.jit, static_argnames=("fmt",))
def _quantize_blocks(rows, s, *, fmt: str):
    R, K = rows.shape
    x = rows.astype(_F32).reshape(-1, ROW_BLOCK[fmt])
    if fmt == "mxfp4":
        out = _quant_mxfp4(x)
    elif fmt == "nvfp4":
        out = _quant_nvfp4(x, s.astype(_F32))
    else:
        out = _quant_mxfp8(x, fmt)
    return out.astype(jnp.uint8).reshape(R, -1)


def _check_rows(rows, fmt: str, what: str):
    _check_format(fmt)
    if rows.ndim != 2 or rows.shape[1] % ROW_BLOCK[fmt]:
        raise ShapeError(f"{what} takes rows (R, K) with K a multiple of {ROW_BLOCK[fmt]} for {fmt}, "
                         f"got shape {tuple(rows.shape)}")


def quantize_blocks(rows, fmt: str, tensor_scale=None):
    """Quantize rows into block bytes (the layouts of the module docstring).

    Args:
      rows: float ``(R, K)`` (cast to float32), ``K`` a multiple of :data:`ROW_BLOCK` (32;
        64 for NVFP4). A GGUF row is one output's weights: for a Flax kernel pass its transpose.
      fmt: ``mxfp4 mxfp8_e4m3 mxfp8_e5m2 nvfp4``.
      tensor_scale: NVFP4 only: the float32 tensor scale ``s`` (default
        :func:`nvfp4_tensor_scale` of ``rows``; ``1.0`` gives llama.cpp-compatible blocks
        without a tensor scale). Ignored by the MX formats.

    Returns:
      uint8 ``(R, K / ROW_BLOCK · TYPE_SIZE)``. MXFP4 bytes equal gguf-py's
      ``gguf.quants.quantize(rows, MXFP4)``. Jitted inside; usable inside ``jit``.

    Raises:
      ShapeError: ``rows`` not 2-D or ``K`` not a multiple of the block.
      SpecError: an unknown format.
    """
    rows = jnp.asarray(rows)
    _check_rows(rows, fmt, "quantize_blocks")
    if fmt == "nvfp4":
        s = nvfp4_tensor_scale(rows) if tensor_scale is None else jnp.asarray(tensor_scale, _F32).reshape(())
    else:
        s = jnp.ones((), _F32)
    return _quantize_blocks(rows, s, fmt=fmt)


# ---------------------------------------------------------------------------------------
# Dequantization: bytes (B, type_size) int32 -> (B, block) float32
# ---------------------------------------------------------------------------------------
def _lo_hi(qs):
    return jnp.concatenate([qs & 0xF, qs >> 4], axis=-1)


def _deq_mxfp4(b):
    """gguf-py / ggml ``dequantize_row_mxfp4``: ``e8m0_half(e) · kvalue``."""
    return _e8m0_half(b[:, :1]) * jnp.asarray(KVALUES)[_lo_hi(b[:, 1:])]


def _deq_mxfp8(b, fmt):
    v = lax.bitcast_convert_type(b[:, 1:].astype(jnp.uint8), _FP8[fmt]).astype(_F32)
    return e8m0_value(b[:, :1]) * v


def _deq_nvfp4(b, s):
    """gguf-py ``NVFP4.dequantize_blocks`` (``ue4m3_half · kvalue``), then times ``s``."""
    B = b.shape[0]
    d = jnp.asarray(_UE4M3_HALF)[b[:, :4]][..., None]  # (B, 4, 1)
    v = jnp.asarray(KVALUES)[_lo_hi(b[:, 4:].reshape(B, 4, 8))]  # (B, 4, 16)
    return ((d * v) * s).reshape(B, 64)


@functools.partial(jax.jit, static_argnames=("fmt", "K"))
def _dequantize_blocks(data, s, *, fmt: str, K: int):
    R = data.shape[0]
    b = data.astype(jnp.int32).reshape(-1, TYPE_SIZE[fmt])
    if fmt == "mxfp4":
        out = _deq_mxfp4(b)
    elif fmt == "nvfp4":
        out = _deq_nvfp4(b, s.astype(_F32))
    else:
        out = _deq_mxfp8(b, fmt)
    return out.reshape(R, K)


def dequantize_blocks(data, fmt: str, K: int, tensor_scale=None):
    """The float32 ``(R, K)`` rows that block bytes ``data`` (uint8 ``(R, row_bytes)``) stand
    for. MXFP4: bit for bit gguf-py's dequantizer (for exponent bytes 2..254); NVFP4: gguf-py's
    dequantizer times ``tensor_scale`` (default 1.0) bit for bit. Jitted inside; usable inside ``jit``.

    Raises:
      ShapeError: ``data`` not ``(R, row_bytes(fmt, K))``.
      SpecError: an unknown format.
    """
    _check_format(fmt)
    data = jnp.asarray(data)
    nb = row_bytes(fmt, K)
    if K % ROW_BLOCK[fmt] or data.ndim != 2 or data.shape[1] != nb:
        raise ShapeError(f"{fmt} rows of K={K} take data of shape (R, {nb}), got {tuple(data.shape)}")
    s = jnp.ones((), _F32) if tensor_scale is None else jnp.asarray(tensor_scale, _F32).reshape(())
    return _dequantize_blocks(data, s, fmt=fmt, K=K)


# ---------------------------------------------------------------------------------------
# QTensor and the ``blockfloat`` method
# ---------------------------------------------------------------------------------------
def grid_for(fmt: str) -> Grid:
    """The QTensor grid of a block-scaled float format (symmetric; element bits)."""
    return Grid(fmt, FIXED_BITS[fmt], True, False, "float", "float32")


def dequantize_qtensor(qt: QTensor, dtype=None):
    """A block-float QTensor (codes uint8 ``(K / QK · type_size, N)``) as its float ``(K, N)`` array."""
    K, N = qt.shape
    w = dequantize_blocks(qt.codes.T, qt.format, K, qt.scale).T
    return w.astype(jnp.dtype(dtype or qt.dtype))


def blockfloat_quantize(w, spec, *, path: str | None = None) -> tuple[QTensor, dict]:
    """Quantize a Flax kernel ``w`` ``(in, out)`` to ``spec.format`` (``mxfp4``, ``mxfp8_e4m3``,
    ``mxfp8_e5m2``, ``nvfp4``); each output column is one GGUF-style row of ``in`` weights. The
    spec's granularity, group size, symmetry, zero type and range do not apply (the format
    fixes them).

    Returns:
      the QTensor (codes uint8 ``(in / QK · type_size, out)``; ``scale`` None, or for NVFP4 the
      float32 ``(1, 1)`` tensor scale) and ``{"tensor_scale": s}`` for NVFP4, else ``{}``.

    Raises:
      ShapeError: ``w`` not 2-D, ``spec.axis`` not 0, ``in`` not a multiple of the block
        (32; 64 for NVFP4, gguf's block of four 16-element scale blocks).
      DTypeError, NonFiniteError: non-float or non-finite ``w`` (as :func:`jquant.quantize`).
    """
    from jquant.quantizers.rtn import check_weight

    fmt = spec.format
    w = jnp.asarray(w)
    check_weight(w, path)
    if w.ndim != 2 or spec.axis % max(w.ndim, 1) != 0:
        raise ShapeError(at(path, f"blockfloat takes 2-D kernels (in, out) with the blocks along axis 0; got shape "
                                  f"{tuple(w.shape)}, axis {spec.axis}"))
    K, N = w.shape
    qk = ROW_BLOCK[fmt]
    if K % qk:
        what = ("gguf's NVFP4 block of four 16-element scale blocks" if fmt == "nvfp4"
                else f"the {fmt} block")
        raise ShapeError(at(path, f"{fmt} quantizes the input axis (axis 0) in blocks of {qk} ({what}), but it has "
                                  f"length {K}, not a multiple of {qk}; keep this leaf in float (a None rule)"))
    info = {}
    scale = None
    if fmt == "nvfp4":
        s = nvfp4_tensor_scale(w)
        scale = s.reshape(1, 1)
        codes = quantize_blocks(w.T, fmt, s).T
        if not isinstance(s, jax.core.Tracer):
            info["tensor_scale"] = float(s)
    else:
        codes = quantize_blocks(w.T, fmt).T
    qt = QTensor(codes, scale, None, None, shape=(K, N), dtype=jnp.dtype(w.dtype).name, grid=grid_for(fmt),
                 granularity="group", group_size=BLOCK[fmt], axis=0, word_bits=8, method="blockfloat")
    return qt, info


def _method(w, spec, stats, *, path: str | None = None):
    return blockfloat_quantize(w, spec, path=path)


register(Method("blockfloat", _method, formats=BLOCKFLOAT_FORMATS,
                paper="OCP Microscaling Formats (MX) Specification v1.0; NVIDIA NVFP4; no arXiv id",
                summary="block-scaled floats: MXFP4 (byte-exact with llama.cpp / gguf-py), MXFP8 E4M3/E5M2 "
                        "(E8M0 scale per 32), NVFP4 (E4M3 scale per 16 + float32 tensor scale, gguf layout)"))
