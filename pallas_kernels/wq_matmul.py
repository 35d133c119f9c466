"""Weight-only packed low-bit matmul ``y = x @ dequant(W)`` as a Pallas kernel (Triton backend).

One program computes a ``(bm, bn)`` tile of ``y``. It walks K in tiles of ``bk`` rows: it
loads the activation tile, the ``w`` uint32 word planes of the weight tile (``bits/8`` bytes
per weight, the only weight traffic), unpacks the codes in registers
(:func:`pallas_kernels.unpack.unpack_planes`), decodes them with the tile's group scales
and zeros into the activation dtype and accumulates the dot in float32. The float weight
never exists in memory. Scales are read one row per group: when ``bk`` lies inside a group
the tile uses a single ``(1, bn)`` row, otherwise ``bk / group`` rows are broadcast over
their groups. Ragged M and N edges are masked on load and store. For small M, where one
program per ``(M, N)`` tile leaves most of a GPU idle, ``split_k`` programs share each tile's
K range and write float32 partial sums that are added afterwards (split-K).

Supported weights (see :mod:`pallas_kernels.layout`): ``int`` 1–8 bits symmetric or
asymmetric (integer zero or float minimum), BitNet binary and ternary; per-tensor, per-
channel or groups of any size dividing K; act-order through the ``perm`` layout (the
activations are permuted once, scales stay contiguous).

:func:`wq_matmul_reference` is the pure-jnp reference: dequantize with
:meth:`jquant.qtensor.QTensor.dequantize` and ``jnp.dot`` in float32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from jquant.formats import decode
from jquant.qtensor import QTensor
from pallas_kernels import tuning
from pallas_kernels.layout import (
    KernelUnsupported,
    KernelWeight,
    activation_rows,
    kernel_weight,
    pick_bk,
    tile_origin,
)
from pallas_kernels.unpack import block_layout, unpack_planes


def _kernel(*refs, M, N, K, bits, grid, group, bm, bn, bk, has_zero, split):
    x_ref, w_ref, s_ref = refs[:3]
    z_ref = refs[3] if has_zero else None
    o_ref = refs[-1]
    n, w = block_layout(bits)
    T = bk // n
    m0, n0, rmask, cmask = tile_origin(bm, bn, M, N)
    xdt = x_ref.dtype
    per_tile = bk // group if bk > group else 0  # groups in a tile (0: the tile sits in one group)

    def params(ref, k0):
        if per_tile == 0:
            p = plt.load(ref.at[pl.ds(k0 // group, 1), pl.ds(n0, bn)], mask=cmask[None, :], other=0)
            return p.astype(jnp.float32)  # (1, bn)
        p = plt.load(ref.at[pl.ds(k0 // group, per_tile), pl.ds(n0, bn)], mask=cmask[None, :], other=0)
        p = p.astype(jnp.float32)[:, None, :]
        return jnp.broadcast_to(p, (per_tile, group, bn)).reshape(bk, bn)

    def body(t, acc):
        k0 = t * bk
        x = plt.load(x_ref.at[pl.ds(m0, bm), pl.ds(k0, bk)], mask=rmask[:, None], other=0)
        planes = [plt.load(w_ref.at[pl.ds(t * T, T), jnp.int32(p), pl.ds(n0, bn)], mask=cmask[None, :], other=0)
                  for p in range(w)]
        q = unpack_planes(planes, bits)
        s = params(s_ref, k0)
        z = params(z_ref, k0) if has_zero else None
        wt = decode(q, s, z, grid).astype(xdt)
        return acc + jnp.dot(x, wt, preferred_element_type=jnp.float32)

    if split == 1:
        acc = jax.lax.fori_loop(0, K // bk, body, jnp.zeros((bm, bn), jnp.float32))
        plt.store(o_ref.at[pl.ds(m0, bm), pl.ds(n0, bn)], acc.astype(o_ref.dtype),
                  mask=rmask[:, None] & cmask[None, :])
        return
    # Split-K: program (i, j, s) covers the s-th of `split` equal runs of K tiles and writes a
    # float32 partial sum; the partials are added outside the kernel.
    steps = K // bk // split
    s_idx = pl.program_id(2)
    acc = jax.lax.fori_loop(s_idx * steps, (s_idx + 1) * steps, body, jnp.zeros((bm, bn), jnp.float32))
    plt.store(o_ref.at[s_idx, pl.ds(m0, bm), pl.ds(n0, bn)], acc, mask=rmask[:, None] & cmask[None, :])


def wq_matmul_kw(x2, kw: KernelWeight, *, config: tuning.Config | None = None, interpret: bool = False,
                 out=None):
    """``x2 @ W`` for a :class:`KernelWeight` and 2-D activations ``(M, K)`` (already permuted,
    :func:`pallas_kernels.layout.activation_rows`)."""
    M = x2.shape[0]
    cfg = config or tuning.lookup("wq", M, kw.N, kw.K, kw.bits)
    bk = pick_bk(kw.K, kw.group, kw.bits, cfg.bk)
    bm, bn = cfg.bm, cfg.bn
    tiles = kw.K // bk
    split = max(d for d in range(1, min(cfg.split_k, tiles) + 1) if tiles % d == 0)
    has_zero = kw.zero is not None
    args = [x2, kw.codes, kw.scale] + ([kw.zero] if has_zero else [])
    out_shape = (M, kw.N) if split == 1 else (split, M, kw.N)
    out_dtype = x2.dtype if split == 1 else jnp.float32
    aliases = {}
    if out is not None:  # write into a given buffer (tests poison it so unwritten tiles show)
        if out.shape != out_shape or out.dtype != out_dtype:
            raise KernelUnsupported(f"out must be {out_shape} {jnp.dtype(out_dtype).name} (split_k={split}), "
                                    f"got {out.shape} {out.dtype}")
        aliases = {len(args): 0}
        args.append(out)
    kern = functools.partial(_kernel, M=M, N=kw.N, K=kw.K, bits=kw.bits, grid=kw.grid, group=kw.group,
                             bm=bm, bn=bn, bk=bk, has_zero=has_zero, split=split)
    grid = (pl.cdiv(M, bm), pl.cdiv(kw.N, bn)) + (() if split == 1 else (split,))
    y = pl.pallas_call(
        kern,
        out_shape=jax.ShapeDtypeStruct(out_shape, out_dtype),
        grid=grid,
        input_output_aliases=aliases,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret,
        name=f"wq{kw.bits}_{kw.kind}_matmul",
    )(*args)
    return y if split == 1 else y.sum(axis=0).astype(x2.dtype)


def wq_matmul(x, qt: QTensor, *, config: tuning.Config | None = None, interpret: bool = False, out=None):
    """``x @ qt`` with the packed kernel; ``x`` is ``(..., K)`` in bf16, f16 or f32.

    Args:
      x: activations; the result has their dtype and leading shape.
      qt: a 2-D QTensor ``(K, N)`` the kernels support (see :func:`pallas_kernels.layout.kernel_weight`).
      config: block sizes; default from the tuning table for this shape and device.
      interpret: run the kernel in Pallas interpret mode (any backend, e.g. CPU tests).
      out: optional buffer the kernel writes into (aliased): ``(M, N)`` in ``x``'s dtype, or
        with split-K the float32 partials ``(split, M, N)``.
    Raises:
      KernelUnsupported: the weight or shape is outside what the kernel handles.
    """
    kw = kernel_weight(qt)
    y = wq_matmul_kw(activation_rows(x, kw), kw, config=config, interpret=interpret, out=out)
    return y.reshape(x.shape[:-1] + (kw.N,))


def wq_matmul_reference(x, qt: QTensor):
    """The pure-jnp reference: ``x @ dequantize(W)`` with the weight in ``x``'s dtype, f32 accumulation."""
    w = qt.dequantize(x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
