"""Integer matmul with quantized activations: W8A8 (and W4A4) as a Pallas kernel (Triton backend).

``y = (x_q @ w_q) · s_x · s_w``: activations quantized per token (row) to signed ``a_bits``
integers with one float scale per row (:func:`quantize_per_token`), weights symmetric
per-channel ``w_bits`` integers packed in uint32 words (a QTensor of format ``int``,
``symmetric=True``, ``granularity='channel'``). The dot runs on int8 operands with int32
accumulation (tensor-core IMMA on GPU), exact until the final float scaling.

W4A4: Hopper has no 4-bit integer MMA (Ampere's ``mma.s4`` is gone from sm_90), so 4-bit
operands are widened to int8 in registers and use the int8 tensor cores. The activations
still travel at 8 bits here (they are stored as int8 values in ``[-8, 7]``); the weights at
4. That is the fallback this kernel takes where the hardware cannot do better: correct,
with int8 MMA throughput.

:func:`int_matmul_reference` is the pure-jnp reference (int32 dot of the unpacked codes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jquant.qtensor import QTensor
from pallas_kernels import tuning
from pallas_kernels.layout import (
    KernelUnsupported,
    activation_rows,
    kernel_weight,
    pick_bk,
    tile_origin,
)
from pallas_kernels.unpack import block_layout, signed_codes, unpack_planes


def quantize_per_token(x, bits: int = 8):
    """Per-row symmetric quantization of activations ``(..., K)``.

    Returns ``(x_q int8, s_x float32 (..., 1))`` with ``x ≈ x_q · s_x``,
    ``s_x = max|x| / (2^(bits−1) − 1)`` (rows of zeros get scale 1), ``x_q`` in
    ``[−(2^(bits−1) − 1), 2^(bits−1) − 1]``.
    """
    if bits not in (4, 8):
        raise KernelUnsupported(f"activation bits must be 4 or 8, got {bits}")
    qmax = float(2 ** (bits - 1) - 1)
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True)
    s = jnp.where(amax > 0, amax / qmax, 1.0)
    q = jnp.clip(jnp.round(xf / s), -qmax, qmax).astype(jnp.int8)
    return q, s


def _check_weight(qt: QTensor):
    kw = kernel_weight(qt)
    if kw.kind != "sym" or qt.granularity not in ("channel", "tensor"):
        raise KernelUnsupported("the integer kernel takes symmetric per-channel (or per-tensor) int weights; "
                                f"got {kw.kind} {qt.granularity}")
    if kw.bits not in (4, 8):
        raise KernelUnsupported(f"the integer kernel takes 4- or 8-bit weights, got {kw.bits}")
    return kw


def _kernel(*refs, M, N, K, bits, bm, bn, bk):
    xq_ref, sx_ref, w_ref, sw_ref = refs[:4]
    o_ref = refs[-1]
    n, _ = block_layout(bits)
    T = bk // n
    m0, n0, rmask, cmask = tile_origin(bm, bn, M, N)

    def body(t, acc):
        x = plt.load(xq_ref.at[pl.ds(m0, bm), pl.ds(t * bk, bk)], mask=rmask[:, None], other=0)
        words = plt.load(w_ref.at[pl.ds(t * T, T), jnp.int32(0), pl.ds(n0, bn)], mask=cmask[None, :], other=0)
        wq = signed_codes(unpack_planes([words], bits), bits).astype(jnp.int8)
        return acc + jnp.dot(x, wq, preferred_element_type=jnp.int32)

    acc = jax.lax.fori_loop(0, K // bk, body, jnp.zeros((bm, bn), jnp.int32))
    sx = plt.load(sx_ref.at[pl.ds(m0, bm), :], mask=rmask[:, None], other=0)  # (bm, 1)
    sw = plt.load(sw_ref.at[:, pl.ds(n0, bn)], mask=cmask[None, :], other=0)  # (1, bn)
    y = acc.astype(jnp.float32) * sx * sw.astype(jnp.float32)
    plt.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], y.astype(o_ref.dtype), mask=rmask[:, None] & cmask[None, :])


def int_matmul(xq, sx, qt: QTensor, *, out_dtype=jnp.bfloat16, config: tuning.Config | None = None,
               interpret: bool = False, out=None):
    """``(xq @ W_q) · sx · s_w`` for int8 activations ``(..., K)``, their scales ``(..., 1)`` and a
    symmetric per-channel 8- or 4-bit QTensor ``(K, N)``."""
    kw = _check_weight(qt)
    if xq.dtype != jnp.int8:
        raise KernelUnsupported(f"quantized activations must be int8, got {xq.dtype}")
    x2 = activation_rows(xq, kw)
    s2 = sx.reshape(-1, 1).astype(jnp.float32)
    M = x2.shape[0]
    cfg = config or tuning.lookup("int", M, kw.N, kw.K, kw.bits)
    bk = pick_bk(kw.K, kw.K, kw.bits, cfg.bk, min_bk=32)  # Triton's int8 dot needs K ≥ 32
    sw = kw.scale.reshape(1, kw.N)
    args = [x2, s2, kw.codes, sw]
    aliases = {}
    if out is not None:
        if out.shape != (M, kw.N) or out.dtype != jnp.dtype(out_dtype):
            raise KernelUnsupported(f"out must be {(M, kw.N)} {jnp.dtype(out_dtype)}, got {out.shape} {out.dtype}")
        aliases = {len(args): 0}
        args.append(out)
    kern = functools.partial(_kernel, M=M, N=kw.N, K=kw.K, bits=kw.bits, bm=cfg.bm, bn=cfg.bn, bk=bk)
    y = pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct((M, kw.N), out_dtype),
        grid=(pl.cdiv(M, cfg.bm), pl.cdiv(kw.N, cfg.bn)),
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"w{kw.bits}a8_matmul",
    )(*args)
    return y.reshape(xq.shape[:-1] + (kw.N,))


def w8a8_matmul(x, qt: QTensor, *, act_bits: int = 8, **kw):
    """Dynamic W8A8 (or W4A4 with ``act_bits=4`` and a 4-bit weight): quantize ``x`` per token, then
    :func:`int_matmul`; the result has ``x``'s dtype."""
    xq, sx = quantize_per_token(x, act_bits)
    return int_matmul(xq, sx, qt, out_dtype=x.dtype, **kw)


def int_matmul_reference(xq, sx, qt: QTensor, out_dtype=jnp.float32):
    """Pure jnp: int32 dot of the activation codes and the signed weight codes, then both scales."""
    wq = signed_codes(qt.unpacked_codes(), qt.bits)
    if qt.perm is not None:
        wq = jnp.take(wq, jnp.argsort(qt.perm), axis=0)
    acc = jnp.dot(xq.astype(jnp.int32), wq, preferred_element_type=jnp.int32)
    sw = qt.scale.astype(jnp.float32).reshape(1, -1)
    return (acc.astype(jnp.float32) * sx.astype(jnp.float32) * sw).astype(out_dtype)
