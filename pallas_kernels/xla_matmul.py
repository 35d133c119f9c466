"""The packed matmul for backends without a Pallas kernel (CPU): chunked dequantize-and-dot in XLA.

``x @ qt.dequantize()`` writes the whole float weight to memory before the dot, four bytes
per weight, which on a CPU costs many times the f32 matmul it replaces. Here a
``lax.scan`` walks K in chunks of ``rows``: each step unpacks and decodes one chunk (the
same tile functions the kernels use, :mod:`pallas_kernels.unpack`) into a small buffer that
stays in cache and accumulates ``x_chunk @ w_chunk`` in float32. Weight traffic from memory
is the packed ``bits/8`` bytes per weight.

That pays when the product is memory-bound (few activation rows: decoding). From
``DEQUANT_ROWS`` activation rows on (prefill, evaluation, calibration) the product is
compute-bound and the whole weight is decoded once and multiplied in one dot instead: the
decode costs ``K·N`` operations against the dot's ``2·M·K·N``, and one large dot runs at
the float matmul's rate (measured on the dev CPU: SmolLM2's layers at 2048 rows ran 1.3–1.7×
faster than the chunked scan, at the float model's speed; BENCHMARKS.md).

Weights the kernels cannot read (codebook formats, ragged groups, other axes) take the
plain dequantize-then-dot route.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jquant.formats import decode
from jquant.qtensor import QTensor
from pallas_kernels.layout import (
    KernelUnsupported,
    KernelWeight,
    activation_rows,
    kernel_weight,
    pick_bk,
)
from pallas_kernels.unpack import block_layout, unpack_planes
from pallas_kernels.wq_matmul import wq_matmul_reference


def _params(p, rows: int, group: int, C: int, N: int):
    """Per-chunk parameters: ``(C, 1, N)`` when a chunk lies in one group, else ``(C, rows, N)``
    is too big, so ``(C, rows // group, 1, N)`` to broadcast over each group's rows."""
    p = p.astype(jnp.float32)
    if rows <= group:
        return jnp.repeat(p, group // rows, axis=0).reshape(C, 1, 1, N)
    return p.reshape(C, rows // group, 1, N)


def chunk_rows(N: int) -> int:
    """Rows per chunk: about 2M decoded floats (8 MB) per step, between 64 and 256 rows.
    Measured on the dev CPU: N = 28672 ran 1.6–1.8× faster with 64 rows than with 256, and
    N = 8192 about the same with 128 or 256 (BENCHMARKS.md)."""
    r = 1 << max(0, ((1 << 21) // max(N, 1)).bit_length() - 1)
    return min(256, max(64, r))


def xla_matmul_kw(x2, kw: KernelWeight, *, rows: int | None = None):
    """``x2 @ W`` for 2-D activations ``(M, K)`` (already permuted,
    :func:`pallas_kernels.layout.activation_rows`) and a :class:`KernelWeight`."""
    M, K = x2.shape
    n, w = block_layout(kw.bits)
    rows = pick_bk(kw.K, kw.group, kw.bits, rows or chunk_rows(kw.N))
    C, N = K // rows, kw.N
    T = rows // n
    codes = kw.codes.reshape(C, T, w, N)
    gpc = max(rows // kw.group, 1)  # groups per chunk
    s = _params(kw.scale, rows, kw.group, C, N)
    z = None if kw.zero is None else _params(kw.zero, rows, kw.group, C, N)
    xc = x2.reshape(M, C, rows).transpose(1, 0, 2)

    def step(acc, inp):
        c, sc, zc, xk = inp
        q = unpack_planes([c[:, j, :] for j in range(w)], kw.bits)  # (rows, N)
        q = q.reshape(gpc, rows // gpc, N)
        wt = decode(q, sc, zc, kw.grid).reshape(rows, N).astype(x2.dtype)
        return acc + jnp.dot(xk, wt, preferred_element_type=jnp.float32), None

    if z is None:
        z = jnp.zeros((C, 1, 1, 1), jnp.float32)
    acc, _ = jax.lax.scan(step, jnp.zeros((M, N), jnp.float32), (codes, s, z, xc))
    return acc.astype(x2.dtype)


DEQUANT_ROWS = 32  # activation rows from which the weight is decoded whole (see module doc)


def xla_matmul(x, qt: QTensor, *, rows: int | None = None):
    """``x @ qt`` in XLA: chunked without materializing the float weight for fewer than
    :data:`DEQUANT_ROWS` activation rows, decoded whole and one dot from there on."""
    if math.prod(x.shape[:-1]) >= DEQUANT_ROWS:
        return wq_matmul_reference(x, qt)
    try:
        kw = kernel_weight(qt)
    except KernelUnsupported:
        return wq_matmul_reference(x, qt)
    return xla_matmul_kw(activation_rows(x, kw), kw, rows=rows).reshape(x.shape[:-1] + (kw.N,))
