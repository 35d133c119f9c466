"""The jax-triton W4 kernel (the ``gpu`` extra's comparison variant).

Without a GPU it cannot run, but Triton compiles it to PTX and a cubin for Hopper (sm_90)
and Ampere (sm_80) here, which catches type and layout errors in the kernel. On a CUDA
machine with jax-triton it also runs against the reference.
"""

import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence Triton 3.9's notice about its default

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_cases import assert_close, expected, random_qtensor

triton = pytest.importorskip("triton", reason="Triton is part of the dev/gpu extras")
from pallas_kernels import KernelUnsupported, triton_w4  # noqa: E402


@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("has_zero,bm,bn,bk,group", [(True, 16, 64, 128, 128), (False, 64, 128, 64, 64),
                                                     (True, 128, 128, 32, 32)])
def test_compiles_to_cubin(arch, has_zero, bm, bn, bk, group):
    k = triton_w4.compile_for(arch, has_zero=has_zero, bm=bm, bn=bn, bk=bk, group=group)
    assert len(k.asm["cubin"]) > 1000
    ptx = k.asm["ptx"]
    assert f".target sm_{arch}" in ptx
    assert "mma" in ptx  # the dot runs on tensor cores


def test_rejects_other_layouts():
    rng = np.random.default_rng(0)
    qt3, _ = random_qtensor(rng, 256, 64, kind="asym_int", bits=3, group=64)
    with pytest.raises(KernelUnsupported, match="4-bit"):
        triton_w4._check(qt3)
    for group, bk in ((96, 64), (96, 128), (8, 64)):
        with pytest.raises(KernelUnsupported, match="power of two"):
            triton_w4._block_k(group, bk)


@pytest.mark.skipif(jax.default_backend() != "gpu" or not triton_w4.available(), reason="needs a CUDA GPU and jax-triton")
def test_runs_on_gpu():  # pragma: no cover - GPU only
    rng = np.random.default_rng(1)
    qt, deq = random_qtensor(rng, 1024, 512, kind="asym_int", bits=4, group=128)
    x = jnp.asarray(rng.normal(size=(7, 1024)), jnp.bfloat16)
    assert_close(triton_w4.w4_matmul(x, qt), expected(x, deq, jnp.bfloat16), jnp.bfloat16)
