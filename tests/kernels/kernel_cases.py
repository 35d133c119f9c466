"""Random packed weights for the kernel tests, and a float64 NumPy reference of ``x @ W``.

Codes, scales and zeros are drawn directly (not by quantizing), packed with
``jquant.packing.pack`` (tested on its own against a bit-stream packer) into a QTensor, and the
expected product is computed in float64 from the raw draws with the decode formulas of the
format table in ``jquant/formats.py``. Nothing here calls the kernels' unpacking or
``QTensor.dequantize``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jquant import packing
from jquant.formats import Grid
from jquant.qtensor import QTensor

# (name, format, bits, symmetric, zero_type)
KINDS = {
    "sym": ("int", None, True, "int"),
    "asym_int": ("int", None, False, "int"),
    "asym_float": ("int", None, False, "float"),
    "binary": ("binary", 1, True, "int"),
    "ternary": ("ternary", 2, True, "int"),
}


def random_qtensor(rng, K, N, *, kind="asym_int", bits=4, group=64, scale_dtype="float16", perm=False):
    """A QTensor ``(K, N)`` of random codes/scales/zeros, and its float64 dequantized matrix.

    ``group=None`` is per-channel. ``perm=True`` stores the rows permuted (the act-order
    kernel layout) with a random permutation.
    """
    fmt, fixed_bits, symmetric, zero_type = KINDS[kind]
    bits = fixed_bits or bits
    G = 1 if group is None else K // group
    S = K if group is None else group
    top = 3 if kind == "ternary" else 2**bits  # ternary codes are 0, 1, 2
    codes = rng.integers(0, top, size=(K, N)).astype(np.uint8)
    scale = rng.uniform(0.01, 0.1, size=(G, N)).astype(scale_dtype)
    zero = None
    s64 = np.repeat(scale.astype(np.float64), S, axis=0)
    c = codes.astype(np.float64)
    if kind == "sym":
        deq = (c - 2 ** (bits - 1)) * s64
    elif kind == "asym_int":
        zero = rng.integers(0, 2**bits, size=(G, N)).astype(np.uint8)
        deq = (c - np.repeat(zero.astype(np.float64), S, axis=0)) * s64
    elif kind == "asym_float":
        zero = rng.uniform(-0.5, 0.0, size=(G, N)).astype(scale_dtype)
        deq = c * s64 + np.repeat(zero.astype(np.float64), S, axis=0)
    elif kind == "binary":
        deq = (2 * c - 1) * s64
    else:
        deq = (c - 1) * s64
    p = None
    if perm:
        p = rng.permutation(K).astype(np.int32)
        logical = np.empty_like(deq)
        logical[p] = deq  # stored row j is logical row p[j]
        deq = logical
    qt = QTensor(packing.pack(jnp.asarray(codes), bits, axis=0), jnp.asarray(scale),
                 None if zero is None else jnp.asarray(zero), None, shape=(K, N), dtype="float32",
                 grid=Grid(fmt, bits, symmetric, False, zero_type, scale_dtype),
                 granularity="channel" if group is None else "group", group_size=group or 128, axis=0,
                 perm=None if p is None else jnp.asarray(p))
    return qt, deq


def expected(x, deq, dtype):
    """float64 ``x @ W`` with ``W`` rounded to the activation dtype first (as the kernels do)."""
    w = np.asarray(jnp.asarray(deq.astype(np.float32)).astype(dtype).astype(jnp.float32), np.float64)
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64) @ w


def assert_close(y, ref, dtype):
    """Elementwise closeness scaled to the output: f32 tight, 16-bit within a few output ulps."""
    y = np.asarray(jnp.asarray(y).astype(jnp.float32), np.float64)
    assert not np.isnan(y).any(), "output holds NaN: a tile was not written"
    scale = np.abs(ref).max() + 1e-12
    tol = {jnp.float32: 2e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}[jnp.dtype(dtype).type]
    err = np.abs(y - ref).max() / scale
    assert err <= tol, f"max error {err:.3e} of max |y| {scale:.3e} > {tol}"
