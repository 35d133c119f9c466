"""The kernels lower to Triton for CUDA, checked on a CPU-only machine.

``jit(...).trace(...).lower(lowering_platforms=("cuda",))`` runs the Pallas→Triton lowering
without a GPU: an op the Triton backend cannot express (a non-power-of-two tile, an
unsupported primitive) fails here rather than on the first GPU run. Compiling the Triton IR
to PTX still needs a GPU.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import random_qtensor

from pallas_kernels import Config, int_matmul, tuning, wq_matmul


def _lowers_to_triton(f, *args):
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return "xla.gpu.triton" in text


@pytest.mark.parametrize("kind,bits,group", [("asym_int", 4, 64), ("sym", 4, 128), ("asym_int", 3, 64),
                                             ("asym_float", 2, 32), ("sym", 8, None), ("ternary", 2, None),
                                             ("binary", 1, 128)])
@pytest.mark.parametrize("M", [1, 16, 300])
def test_wq_kernel_lowers_for_every_regime(kind, bits, group, M):
    rng = np.random.default_rng(0)
    qt, _ = random_qtensor(rng, 1024, 512, kind=kind, bits=bits, group=group)
    x = jnp.zeros((M, 1024), jnp.bfloat16)
    cfg = tuning.lookup("wq", M, 512, 1024, bits, device="none")  # the default for this M
    assert _lowers_to_triton(jax.jit(lambda x, qt: wq_matmul(x, qt, config=cfg)), x, qt)


def test_int_kernel_lowers():
    rng = np.random.default_rng(0)
    qt, _ = random_qtensor(rng, 1024, 512, kind="sym", bits=8, group=None, scale_dtype="float32")
    xq, sx = jnp.zeros((16, 1024), jnp.int8), jnp.ones((16, 1))
    f = jax.jit(lambda xq, sx, qt: int_matmul(xq, sx, qt, config=Config(64, 64, 128, 4, 3)))
    assert _lowers_to_triton(f, xq, sx, qt)
