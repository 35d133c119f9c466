"""The integer (W8A8, W4A4) kernel in Pallas interpret mode, against an exact NumPy reference.

The int32 accumulation is exact, so the kernel's output must equal the float64 product of
the integer codes times both scales up to the final float rounding.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import random_qtensor

from pallas_kernels import (Config, KernelUnsupported, int_matmul, int_matmul_reference, quantize_per_token,
                            w8a8_matmul)


def _np_reference(xq, sx, codes_signed, sw):
    acc = np.asarray(xq, np.int64) @ np.asarray(codes_signed, np.int64)  # exact
    return acc.astype(np.float64) * np.asarray(sx, np.float64) * np.asarray(sw, np.float64).reshape(1, -1)


CASES = [  # (M, K, N, w_bits, a_bits, config)
    (1, 256, 128, 8, 8, Config(16, 64, 128, 4, 3)),
    (19, 512, 80, 8, 8, Config(16, 32, 64, 4, 2)),  # ragged M and N
    (64, 256, 64, 8, 8, Config(32, 32, 256, 4, 2)),
    (5, 256, 64, 4, 4, Config(16, 32, 64, 4, 2)),  # W4A4 (widened to int8)
    (37, 128, 96, 4, 8, Config(16, 32, 32, 4, 2)),  # W4A8
]


@pytest.mark.parametrize("case", CASES, ids=[f"M{c[0]}-K{c[1]}-N{c[2]}-W{c[3]}A{c[4]}" for c in CASES])
def test_int_kernel_exact(case):
    M, K, N, wb, ab, cfg = case
    rng = np.random.default_rng(M * 1000 + K + N + wb)
    qt, _ = random_qtensor(rng, K, N, kind="sym", bits=wb, group=None, scale_dtype="float32")
    signed = np.asarray(qt.unpacked_codes(), np.int64) - 2 ** (wb - 1)
    x = jnp.asarray(rng.normal(size=(M, K)) * 3, jnp.float32)
    xq, sx = quantize_per_token(x, ab)
    qmax = 2 ** (ab - 1) - 1
    assert xq.dtype == jnp.int8 and int(jnp.abs(xq.astype(jnp.int32)).max()) <= qmax
    np.testing.assert_allclose(np.asarray(xq) * np.asarray(sx), np.asarray(x), atol=float(sx.max()) / 2 + 1e-6)
    ref = _np_reference(xq, sx, signed, qt.scale)
    poison = jnp.full((M, N), jnp.nan, jnp.float32)
    y = int_matmul(xq, sx, qt, out_dtype=jnp.float32, config=cfg, interpret=True, out=poison)
    y = np.asarray(y, np.float64)
    assert not np.isnan(y).any()
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    np.testing.assert_allclose(np.asarray(int_matmul_reference(xq, sx, qt), np.float64), ref, rtol=1e-6,
                               atol=1e-6 * np.abs(ref).max())


def test_int_kernel_perm_layout_and_min_tile():
    """Rows stored permuted; and K = 48, where the only 16-row tile is below Triton's int8 dot minimum."""
    rng = np.random.default_rng(9)
    qt, deq = random_qtensor(rng, 256, 32, kind="sym", bits=8, group=None, scale_dtype="float32", perm=True)
    x = jnp.asarray(rng.normal(size=(5, 256)), jnp.float32)
    xq, sx = quantize_per_token(x)
    y = int_matmul(xq, sx, qt, out_dtype=jnp.float32, config=Config(16, 32, 64, 4, 2), interpret=True)
    np.testing.assert_allclose(np.asarray(y), np.asarray(int_matmul_reference(xq, sx, qt)), rtol=1e-6)
    ref = np.asarray(xq, np.float64) * np.asarray(sx, np.float64) @ deq
    assert np.linalg.norm(np.asarray(y) - ref) / np.linalg.norm(ref) < 1e-5
    q48, _ = random_qtensor(rng, 48, 32, kind="sym", bits=8, group=None)
    with pytest.raises(KernelUnsupported, match="≥ 32"):
        int_matmul(jnp.zeros((2, 48), jnp.int8), jnp.ones((2, 1)), q48, interpret=True)


def test_w8a8_close_to_float_matmul():
    """Dynamic W8A8 end to end stays within the quantization error of the float product."""
    rng = np.random.default_rng(7)
    qt, deq = random_qtensor(rng, 256, 64, kind="sym", bits=8, group=None, scale_dtype="float32")
    x = jnp.asarray(rng.normal(size=(8, 256)), jnp.bfloat16)
    y = w8a8_matmul(x, qt, config=Config(16, 32, 64, 4, 2), interpret=True)
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float64) @ deq
    rel = np.linalg.norm(np.asarray(y, np.float64) - ref) / np.linalg.norm(ref)
    assert rel < 0.02, rel


def test_int_kernel_rejects_what_it_cannot_do():
    rng = np.random.default_rng(8)
    grouped, _ = random_qtensor(rng, 128, 32, kind="sym", bits=8, group=32)
    xq = jnp.zeros((2, 128), jnp.int8)
    sx = jnp.ones((2, 1))
    with pytest.raises(KernelUnsupported, match="per-channel"):
        int_matmul(xq, sx, grouped, interpret=True)
    asym, _ = random_qtensor(rng, 128, 32, kind="asym_int", bits=8, group=None)
    with pytest.raises(KernelUnsupported, match="symmetric"):
        int_matmul(xq, sx, asym, interpret=True)
    w3, _ = random_qtensor(rng, 128, 32, kind="sym", bits=3, group=None)
    with pytest.raises(KernelUnsupported, match="4- or 8-bit"):
        int_matmul(xq, sx, w3, interpret=True)
    w8, _ = random_qtensor(rng, 128, 32, kind="sym", bits=8, group=None)
    with pytest.raises(KernelUnsupported, match="int8"):
        int_matmul(xq.astype(jnp.float32), sx, w8, interpret=True)
    with pytest.raises(KernelUnsupported, match="activation bits"):
        quantize_per_token(jnp.ones((2, 4)), 6)
