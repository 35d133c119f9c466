"""The kernel view of a QTensor: which weights a packed-matmul kernel can read, and how.

A QTensor already stores what the kernels read: codes packed along K (axis 0 of a Flax
kernel ``(K, N)``) into uint32 words, GPTQ-style, and scales/zeros of shape
``(K / group, N)``. :func:`kernel_weight` checks a QTensor fits and returns the arrays in
kernel shape; anything it cannot take raises :class:`KernelUnsupported` naming the reason,
so dispatch can fall back to the XLA path and say why.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jquant.errors import ShapeError
from jquant.formats import BLOCKFLOAT_FORMATS, GGML_FORMATS, Grid
from jquant.qtensor import QTensor
from pallas_kernels.unpack import block_layout


class KernelUnsupported(ShapeError):
    """A QTensor (or shape) the packed kernels do not handle; the message says why."""


class KernelWeight(NamedTuple):
    """A QTensor in kernel form.

    ``codes``: uint32 ``(K / n, w, N)`` (blocks of ``n`` codes in ``w`` words);
    ``scale``/``zero``: ``(K / group, N)`` (``zero`` None for kinds without one);
    ``perm``: int32 ``(K,)`` to apply to activations (act-order kernel layout) or None.
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array | None
    perm: jax.Array | None
    kind: str
    grid: Grid
    bits: int
    K: int
    N: int
    group: int


def decode_kind(qt: QTensor) -> str:
    g = qt.grid
    if g.fmt in GGML_FORMATS:
        raise KernelUnsupported(f"GGUF block format {g.fmt!r} has no packed kernel (dequantized through XLA)")
    if g.fmt == "bcq":
        raise KernelUnsupported("bcq (binary-coding) weights have no packed kernel (dequantized through XLA)")
    if g.fmt in BLOCKFLOAT_FORMATS:
        raise KernelUnsupported(f"block-scaled float format {g.fmt!r} has no packed kernel (dequantized through XLA)")
    if g.fmt == "int":
        if g.symmetric:
            return "sym"
        return "asym_int" if g.zero_type == "int" else "asym_float"
    if g.fmt in ("binary", "ternary"):
        return g.fmt
    raise KernelUnsupported(f"format {g.fmt!r} has no packed kernel (codebook formats dequantize through XLA)")


def kernel_weight(qt: QTensor) -> KernelWeight:
    """Check ``qt`` fits the packed kernels and return it in kernel shape."""
    if not isinstance(qt, QTensor):
        raise KernelUnsupported(f"expected a QTensor, got {type(qt).__name__}")
    if qt.grid.fmt in GGML_FORMATS + BLOCKFLOAT_FORMATS + ("bcq",):  # refused before the layout checks read scale/codes
        decode_kind(qt)
    if len(qt.shape) != 2 or qt.axis != 0:
        raise KernelUnsupported(f"kernels take 2-D (K, N) weights packed along axis 0; got shape {qt.shape} "
                                f"axis {qt.axis}")
    if qt.word_bits != 32:
        raise KernelUnsupported(f"kernels read uint32 words; this QTensor packs into {qt.word_bits}-bit words")
    if qt.g_idx is not None:
        raise KernelUnsupported("act-order QTensor with g_idx: convert it once with "
                                "jquant.qtensor.act_order_to_perm (or pallas_kernels.prepare) so groups are contiguous")
    kind = decode_kind(qt)
    K, N = qt.shape
    bits = qt.bits
    n, w = block_layout(bits)
    lay = qt.layout
    group = lay.size if qt.granularity == "group" else K
    if K % group:
        raise KernelUnsupported(f"K={K} is not a multiple of the group size {group} (ragged last group)")
    if K % n:
        raise KernelUnsupported(f"K={K} is not a multiple of {n}, the {bits}-bit packing block")
    if K % 16:
        raise KernelUnsupported(f"K={K} is not a multiple of 16 (the smallest K tile)")
    pick_bk(K, group, bits, K)  # some K tile must fit, or no kernel can walk this weight
    codes = qt.codes.reshape(K // n, w, N)
    scale = qt.scale
    zero = qt.zero if kind in ("asym_int", "asym_float") else None
    if qt.granularity == "tensor":
        scale = jnp.broadcast_to(scale.reshape(1, 1), (1, N))
        zero = None if zero is None else jnp.broadcast_to(zero.reshape(1, 1), (1, N))
    return KernelWeight(codes, scale, zero, qt.perm, kind, qt.grid, bits, K, N, group)


def pick_bk(K: int, group: int, bits: int, target: int, min_bk: int = 16) -> int:
    """The largest power-of-two K tile ``≤ target`` that divides K, holds whole packing blocks
    and either holds whole groups or sits inside one; at least ``min_bk`` (16, a Triton dot's
    minimum K for 16-bit operands; 32 for 8-bit ones)."""
    n, _ = block_layout(bits)
    bk = 1 << (max(target, min_bk).bit_length() - 1)
    while bk >= min_bk:
        if K % bk == 0 and bk % n == 0 and (bk % group == 0 or group % bk == 0):
            return bk
        bk //= 2
    raise KernelUnsupported(f"no K tile fits K={K}, group {group}, {bits}-bit blocks of {n} codes "
                            f"(a power of two ≥ {min_bk} dividing K)")


def activation_rows(x, kw: KernelWeight):
    """Activations ``(..., K)`` as the 2-D ``(M, K)`` rows a kernel multiplies, permuted into the
    weight's stored row order when it has one; reshape the result to ``x.shape[:-1] + (N,)``."""
    if x.shape[-1] != kw.K:
        raise KernelUnsupported(f"activations have K={x.shape[-1]}, the weight K={kw.K}")
    x2 = x.reshape(-1, kw.K)
    return x2 if kw.perm is None else jnp.take(x2, kw.perm, axis=1)


def tile_origin(bm: int, bn: int, M: int, N: int):
    """Inside a kernel on a ``(M/bm, N/bn)`` grid: the tile's first row and column and the masks
    of its rows and columns that lie inside the ``(M, N)`` output (the Triton lowering adds no
    bounds masks of its own)."""
    m0, n0 = pl.program_id(0) * bm, pl.program_id(1) * bn
    return m0, n0, (m0 + jnp.arange(bm)) < M, (n0 + jnp.arange(bn)) < N
