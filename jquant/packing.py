"""Bit packing of 1–8-bit codes into uint8 or uint32 words.

Codes are unsigned integers in ``[0, 2**bits)``. They are packed along one axis (by
convention the reduction axis 0 of a Flax kernel ``(in_features, out_features)``, so a
word holds consecutive input rows of one output column, as in GPTQ's ``qweight``).

Widths that do not divide the word (3, 5, 6, 7 bits) cross word boundaries: a *block*
of ``n = word_bits / gcd(bits, word_bits)`` codes fills exactly ``w = bits·n / word_bits``
words (e.g. 32 three-bit codes in 3 uint32 words), so nothing is wasted but the
padding of the last block. Bit ``i·bits`` of the block's bit stream is the low bit of
code ``i``; the stream is laid little-endian across the block's words.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from jquant.errors import ShapeError, SpecError

WORD_DTYPES = {8: jnp.uint8, 32: jnp.uint32}


def _check(bits: int, word_bits: int) -> None:
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise SpecError(f"bits must be an integer in 1..8, got {bits!r}")
    if word_bits not in WORD_DTYPES:
        raise SpecError(f"word_bits must be 8 or 32, got {word_bits!r}")


def block_layout(bits: int, word_bits: int = 32) -> tuple[int, int]:
    """``(codes per block, words per block)`` for a bit width and word size."""
    _check(bits, word_bits)
    g = math.gcd(bits, word_bits)
    return word_bits // g, bits // g


def packed_length(length: int, bits: int, word_bits: int = 32) -> int:
    """Number of words that ``length`` codes occupy along the packed axis."""
    n, w = block_layout(bits, word_bits)
    return -(-length // n) * w


def pack(codes, bits: int, axis: int = 0, word_bits: int = 32):
    """Pack unsigned ``codes`` (any integer dtype, values < 2**bits) along ``axis``.

    Args:
      codes: integer array; values outside ``[0, 2**bits)`` are masked to ``bits`` bits.
      bits: code width, 1..8.
      axis: the axis to pack along; its length is padded with zeros to a whole block.
      word_bits: 8 (uint8 words) or 32 (uint32 words).

    Returns:
      ``uint8``/``uint32`` array whose ``axis`` has length
      ``packed_length(codes.shape[axis], bits, word_bits)``; other axes unchanged.
    """
    n, w = block_layout(bits, word_bits)
    codes = jnp.asarray(codes)
    if codes.ndim == 0:
        raise ShapeError("pack needs at least one axis")
    axis = axis % codes.ndim
    x = jnp.moveaxis(codes, axis, 0)
    length, rest = x.shape[0], x.shape[1:]
    nblocks = -(-length // n)
    pad = nblocks * n - length
    x = x.astype(jnp.uint32) & jnp.uint32((1 << bits) - 1)
    if pad:
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * len(rest))
    x = x.reshape((nblocks, n) + rest)
    word_mask = jnp.uint32((1 << word_bits) - 1) if word_bits < 32 else None
    words = [jnp.zeros((nblocks,) + rest, jnp.uint32) for _ in range(w)]
    for i in range(n):
        j, off = divmod(i * bits, word_bits)
        v = x[:, i]
        words[j] = words[j] | (v << off)
        if off + bits > word_bits:  # the code spills into the next word
            words[j + 1] = words[j + 1] | (v >> (word_bits - off))
    if word_mask is not None:
        words = [wd & word_mask for wd in words]
    out = jnp.stack(words, axis=1).reshape((nblocks * w,) + rest).astype(WORD_DTYPES[word_bits])
    return jnp.moveaxis(out, 0, axis)


def unpack(packed, bits: int, length: int, axis: int = 0, word_bits: int = 32, dtype=jnp.uint8):
    """Inverse of :func:`pack`: the first ``length`` codes along ``axis``, exactly.

    Returns an array of ``dtype`` (uint8 by default) whose ``axis`` has ``length`` entries.
    """
    n, w = block_layout(bits, word_bits)
    packed = jnp.asarray(packed)
    axis = axis % packed.ndim
    x = jnp.moveaxis(packed, axis, 0)
    rest = x.shape[1:]
    if x.shape[0] % w:
        raise ShapeError(f"packed axis length {x.shape[0]} is not a multiple of {w} words per block")
    nblocks = x.shape[0] // w
    if length > nblocks * n or length < 0:
        raise ShapeError(f"cannot unpack {length} codes from {nblocks * n} packed codes")
    x = x.astype(jnp.uint32).reshape((nblocks, w) + rest)
    mask = jnp.uint32((1 << bits) - 1)
    vals = []
    for i in range(n):
        j, off = divmod(i * bits, word_bits)
        v = x[:, j] >> off
        if off + bits > word_bits:
            v = v | (x[:, j + 1] << (word_bits - off))
        vals.append(v & mask)
    out = jnp.stack(vals, axis=1).reshape((nblocks * n,) + rest)[:length]
    return jnp.moveaxis(out.astype(dtype), 0, axis)
