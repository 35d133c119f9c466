"""The weight-only packed matmul kernel in Pallas interpret mode, against a float64 reference.

Every case draws fresh random codes, scales, zeros and activations, poisons the output
buffer with NaN (the kernel writes into it through an alias, so a tile it skips stays NaN)
and compares with the NumPy product of the raw draws. The same cases check the pure-jnp
reference beside the kernel and the chunked XLA path.
"""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import assert_close, expected, random_qtensor

from pallas_kernels import Config, KernelUnsupported, wq_matmul, wq_matmul_reference, xla_matmul

# (M, K, N, kind, bits, group, dtype, config)
CASES = [
    (1, 256, 128, "asym_int", 4, 64, jnp.bfloat16, Config(16, 64, 128, 4, 3)),
    (3, 576, 96, "asym_int", 4, 64, jnp.bfloat16, Config(16, 32, 64, 4, 2)),  # SmolLM2 K, ragged N
    (16, 256, 64, "asym_int", 4, 32, jnp.float16, Config(16, 32, 128, 4, 2)),
    (17, 256, 64, "sym", 4, 128, jnp.float32, Config(16, 32, 64, 4, 2)),  # ragged M, bk < group
    (64, 512, 128, "sym", 4, None, jnp.bfloat16, Config(32, 64, 128, 4, 3)),  # per-channel
    (5, 256, 80, "asym_float", 4, 32, jnp.float32, Config(16, 32, 64, 4, 2)),  # Q4_1-style float minimum
    (130, 256, 96, "asym_int", 8, 64, jnp.bfloat16, Config(64, 32, 64, 4, 2)),  # W8
    (4, 256, 64, "sym", 8, None, jnp.float16, Config(16, 64, 256, 4, 2)),
    (2, 256, 64, "asym_int", 3, 64, jnp.bfloat16, Config(16, 32, 64, 4, 2)),  # W3: codes cross words
    (33, 512, 48, "sym", 3, 128, jnp.float32, Config(16, 16, 128, 4, 2)),
    (1, 256, 64, "asym_int", 2, 32, jnp.bfloat16, Config(16, 32, 128, 4, 2)),  # W2
    (9, 128, 40, "asym_float", 2, 64, jnp.float32, Config(16, 16, 32, 4, 2)),
    (7, 256, 64, "ternary", 2, None, jnp.bfloat16, Config(16, 32, 64, 4, 2)),  # BitNet b1.58
    (7, 256, 64, "binary", 1, 128, jnp.float32, Config(16, 32, 64, 4, 2)),  # BitNet binary
    (6, 320, 64, "asym_int", 5, 64, jnp.float32, Config(16, 32, 64, 4, 2)),
    (6, 192, 64, "sym", 6, 32, jnp.float32, Config(16, 32, 64, 4, 2)),
    (6, 256, 64, "asym_int", 7, 128, jnp.float32, Config(16, 32, 256, 4, 2)),
    # split-K (small M): programs share a tile's K range, partials summed after
    (1, 576, 96, "asym_int", 4, 64, jnp.bfloat16, Config(16, 32, 64, 4, 2, split_k=3)),  # 9 tiles: 3 runs
    (4, 1024, 64, "sym", 3, 128, jnp.float16, Config(16, 32, 128, 4, 2, split_k=4)),
    (2, 512, 40, "asym_float", 2, 32, jnp.float32, Config(16, 16, 32, 4, 2, split_k=8)),
]


def _ids(c):
    M, K, N, kind, bits, group, dtype, _ = c
    return f"M{M}-K{K}-N{N}-{kind}{bits}-g{group or 'ch'}-{jnp.dtype(dtype).name}"


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_kernel_matches_float64_reference(case):
    M, K, N, kind, bits, group, dtype, cfg = case
    rng = np.random.default_rng(zlib.crc32(_ids(case).encode()))
    qt, deq = random_qtensor(rng, K, N, kind=kind, bits=bits, group=group)
    x = jnp.asarray(rng.normal(size=(M, K)), dtype)
    ref = expected(x, deq, dtype)
    tiles = K // min(cfg.bk, K)
    split = max(d for d in range(1, min(cfg.split_k, tiles) + 1) if tiles % d == 0)
    poison = jnp.full((M, N), jnp.nan, dtype) if split == 1 else jnp.full((split, M, N), jnp.nan, jnp.float32)
    y = wq_matmul(x, qt, config=cfg, interpret=True, out=poison)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_close(y, ref, dtype)
    assert_close(wq_matmul_reference(x, qt), ref, dtype)
    assert_close(xla_matmul(x, qt), ref, dtype)


def test_act_order_perm_layout():
    """Rows stored permuted (act-order kernel layout): the kernel permutes the activations."""
    rng = np.random.default_rng(1)
    qt, deq = random_qtensor(rng, 256, 64, kind="asym_int", bits=4, group=64, perm=True)
    x = jnp.asarray(rng.normal(size=(5, 256)), jnp.float32)
    ref = expected(x, deq, jnp.float32)
    assert_close(wq_matmul(x, qt, config=Config(16, 32, 64, 4, 2), interpret=True), ref, jnp.float32)
    assert_close(wq_matmul_reference(x, qt), ref, jnp.float32)
    assert_close(xla_matmul(x, qt), ref, jnp.float32)


def test_leading_batch_dims_and_jit():
    rng = np.random.default_rng(2)
    qt, deq = random_qtensor(rng, 128, 32, kind="sym", bits=4, group=32)
    x = jnp.asarray(rng.normal(size=(2, 3, 128)), jnp.float32)
    f = jax.jit(lambda x, qt: wq_matmul(x, qt, config=Config(16, 32, 32, 4, 2), interpret=True))
    y = f(x, qt)
    assert y.shape == (2, 3, 32)
    assert_close(y.reshape(6, 32), expected(x.reshape(6, 128), deq, jnp.float32), jnp.float32)


def test_unsupported_weights_are_named():
    rng = np.random.default_rng(3)
    qt, _ = random_qtensor(rng, 128, 32, kind="sym", bits=4, group=32)
    x = jnp.ones((2, 96), jnp.float32)
    with pytest.raises(KernelUnsupported, match="K=96"):
        wq_matmul(x, qt, interpret=True)
    import jquant as jq

    nf4 = jq.quantize(jnp.ones((128, 32)), jq.QuantSpec(format="nf4", granularity="group", group_size=32))
    with pytest.raises(KernelUnsupported, match="nf4"):
        wq_matmul(jnp.ones((2, 128)), nf4, interpret=True)
    ragged = jq.quantize(jnp.ones((100, 32)), jq.QuantSpec(bits=4, granularity="group", group_size=64))
    with pytest.raises(KernelUnsupported, match="group size"):
        wq_matmul(jnp.ones((2, 100)), ragged, interpret=True)
