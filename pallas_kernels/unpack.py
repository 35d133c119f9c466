"""In-register unpacking of packed codes and their decode formulas, written for kernel tiles.

Codes are packed along K the way :mod:`jquant.packing` lays them out: a *block* of
``n = 32 / gcd(bits, 32)`` codes fills ``w = bits·n / 32`` uint32 words, the block's bit
stream little-endian across its words (``w = 1`` for 1, 2, 4 and 8 bits, so a word holds
``32 / bits`` consecutive K rows; 3-bit packs 32 codes into 3 words, crossing word
boundaries). Viewed as ``(K / n, w, N)``, a K-tile of ``bk`` rows is ``w`` word planes of
shape ``(bk / n, bn)``, each a power of two in size, which is what Triton loads want.

Everything here is ``jnp`` on tiles, so it runs inside a Pallas kernel (lowered to Triton on
GPU, or in interpret mode) and equally in plain XLA. Only elementwise ops, broadcasts and one
row-major reshape are used. Decoding codes to values is :func:`jquant.formats.decode` itself
(plain ``jnp`` too), so kernel and reference weights agree bit for bit before the final cast.
"""

from __future__ import annotations

import math

import jax.numpy as jnp


def block_layout(bits: int) -> tuple[int, int]:
    """``(codes per block n, uint32 words per block w)``."""
    g = math.gcd(bits, 32)
    return 32 // g, bits // g


def unpack_planes(planes, bits: int):
    """Codes ``(T·n, bn)`` (uint32) from the ``w`` word planes ``(T, bn)`` of a K-tile.

    Row ``t·n + i`` of the result is code ``i`` of block ``t``: its bits start at bit
    ``bits·i`` of the block's stream, in word ``bits·i // 32`` at shift ``bits·i % 32``, and
    spill into the next word when ``shift + bits > 32``.
    """
    n, w = block_layout(bits)
    if len(planes) != w:
        raise ValueError(f"{bits}-bit blocks have {w} words, got {len(planes)} planes")
    T, bn = planes[0].shape
    mask = jnp.uint32((1 << bits) - 1)
    i = jnp.arange(n, dtype=jnp.int32)[None, :, None]  # (1, n, 1)
    off = i * bits
    lo_word, shift = off // 32, (off % 32).astype(jnp.uint32)
    p3 = [p[:, None, :] for p in planes]  # (T, 1, bn)
    if w == 1:
        q = (p3[0] >> shift) & mask
    else:
        # Select each code's low word and (when it spills) high word among the planes.
        lo = p3[0]
        hi = p3[0]
        for j in range(1, w):
            lo = jnp.where(lo_word == j, p3[j], lo)
            hi = jnp.where(lo_word + 1 == j, p3[j], hi)
        spills = (off % 32) + bits > 32
        hi_shift = jnp.where(spills, 32 - (off % 32), 0).astype(jnp.uint32)
        hi_part = jnp.where(spills, hi << hi_shift, jnp.uint32(0))
        q = ((lo >> shift) | hi_part) & mask
    q = jnp.broadcast_to(q, (T, n, bn))
    return q.reshape(T * n, bn)


def signed_codes(q, bits: int):
    """Symmetric codes as signed integers ``c − 2^(bits−1)`` (int32)."""
    return q.astype(jnp.int32) - (1 << (bits - 1))
