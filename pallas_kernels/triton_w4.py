"""The W4 weight-only matmul written directly in Triton and called through jax-triton.

An optional comparison point for the Pallas kernel (:mod:`pallas_kernels.wq_matmul`), behind
the ``gpu`` extra (``pip install 'jquant[gpu]'``: jax-triton, and Triton with it). It reads the
same QTensor layout: 4-bit codes packed along K, eight per uint32 word (GPTQ ``qweight``
order), a ``(K / group, N)`` float16/float32 scale and, for asymmetric weights, a uint8 zero.

Where the Pallas kernel unpacks a tile with a broadcast and a reshape, this one gathers:
row ``k`` of the tile loads word ``k // 8`` (each word is fetched by eight rows and served
from L1) and shifts it by ``4·(k % 8)``, the classic GPTQ-Triton formulation. K tiles lie
inside one group, so a tile needs one row of scales.

Running it needs a CUDA GPU; :func:`compile_for` compiles the Triton kernel to PTX for a given
architecture without one (Triton ships ptxas), which is how CPU-only CI checks it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.layout import KernelUnsupported, activation_rows, kernel_weight

try:
    import triton
    import triton.language as tl
except ImportError:  # the gpu extra is not installed
    triton = None


def available() -> bool:
    """Whether Triton and jax-triton can be imported here."""
    if triton is None:
        return False
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        return False
    return True


if triton is not None:

    @triton.jit
    def _w4_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, K,
                   GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_k = tl.arange(0, BK)
        m_ok = offs_m < M
        n_ok = offs_n < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, K, BK):
            kk = k0 + offs_k
            x = tl.load(x_ptr + offs_m[:, None] * K + kk[None, :], mask=m_ok[:, None], other=0.0)
            words = tl.load(w_ptr + (kk[:, None] // 8) * N + offs_n[None, :], mask=n_ok[None, :], other=0)
            q = (words >> ((kk[:, None] % 8) * 4).to(tl.uint32)) & 0xF
            g = k0 // GROUP
            s = tl.load(s_ptr + g * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
            if HAS_ZERO:
                z = tl.load(z_ptr + g * N + offs_n, mask=n_ok, other=0).to(tl.float32)
                w = (q.to(tl.float32) - z[None, :]) * s[None, :]
            else:
                w = (q.to(tl.float32) - 8.0) * s[None, :]
            acc += tl.dot(x, w.to(x.dtype))
        tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])


def _check(qt):
    kw = kernel_weight(qt)
    if kw.bits != 4 or kw.kind not in ("sym", "asym_int") or kw.perm is not None:
        raise KernelUnsupported("the Triton W4 kernel takes 4-bit int weights (symmetric or integer zero) "
                                f"without perm; got {kw.bits}-bit {kw.kind}")
    return kw


def _block_k(group: int, bk: int) -> int:
    bk = min(bk, group)
    if bk < 16 or bk & (bk - 1) or group % bk:
        raise KernelUnsupported(f"K tile {bk} must be a power of two ≥ 16 dividing the group size {group}")
    return bk


def w4_matmul(x, qt, *, bm: int = 16, bn: int = 64, bk: int = 128, num_warps: int = 4, num_stages: int = 3):
    """``x @ qt`` for activations ``(..., K)`` in bf16/f16 and a W4 QTensor, on a CUDA GPU."""
    if not available():
        raise RuntimeError("the Triton W4 kernel needs the gpu extra: pip install 'jquant[gpu]' (jax-triton, triton)")
    import jax_triton as jt

    kw = _check(qt)
    x2 = activation_rows(x, kw)
    M = x2.shape[0]
    bk = _block_k(kw.group, bk)
    codes = kw.codes.reshape(kw.K // 8, kw.N)
    zero = kw.zero if kw.zero is not None else jnp.zeros((1, kw.N), jnp.uint8)
    y = jt.triton_call(
        x2, codes, kw.scale, zero, kernel=_w4_kernel,
        out_shape=jax.ShapeDtypeStruct((M, kw.N), x.dtype),
        grid=(triton.cdiv(M, bm), triton.cdiv(kw.N, bn)),
        num_warps=num_warps, num_stages=num_stages,
        M=M, N=kw.N, K=kw.K, GROUP=kw.group, HAS_ZERO=kw.zero is not None, BM=bm, BN=bn, BK=bk)
    return y.reshape(x.shape[:-1] + (kw.N,))


def compile_for(arch: int = 90, *, dtype: str = "bf16", scale_dtype: str = "fp16", group: int = 128,
                has_zero: bool = True, bm: int = 16, bn: int = 64, bk: int = 128, num_warps: int = 4,
                num_stages: int = 3):
    """Compile the kernel to PTX/cubin for ``sm_<arch>`` without a GPU; returns Triton's compiled kernel."""
    if triton is None:
        raise RuntimeError("Triton is not installed (the gpu extra)")
    import os
    import tempfile

    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not knobs.cache.dir:  # jax-triton blanks TRITON_CACHE_DIR when imported
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="jquant-triton-")

    sig = {"x_ptr": f"*{dtype}", "w_ptr": "*u32", "s_ptr": f"*{scale_dtype}", "z_ptr": "*u8",
           "y_ptr": f"*{dtype}", "M": "i32", "N": "i32", "K": "i32",
           "GROUP": "constexpr", "HAS_ZERO": "constexpr", "BM": "constexpr", "BN": "constexpr", "BK": "constexpr"}
    consts = {"GROUP": group, "HAS_ZERO": has_zero, "BM": bm, "BN": bn, "BK": _block_k(group, bk)}
    src = ASTSource(fn=_w4_kernel, signature=sig, constexprs=consts)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
