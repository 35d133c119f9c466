"""Bit packing: round trips, lengths, and an independent pure-Python bit-stream packer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jquant
from jquant import packing
from jquant.errors import ShapeError, SpecError


def ref_pack(codes, bits, axis, word_bits):
    """Pure-Python packer: a block of codes is one little-endian bit stream, code i in bits
    [i*bits, (i+1)*bits); the stream is cut into ``word_bits`` words, lowest first. A block
    is the fewest codes that fill whole words: lcm(bits, word_bits) bits."""
    stream_bits = bits * word_bits // math.gcd(bits, word_bits)
    per_block, words_per_block = stream_bits // bits, stream_bits // word_bits
    x = np.moveaxis(np.asarray(codes), axis, 0)
    L, rest = x.shape[0], x.shape[1:]
    x = x.reshape(L, -1)
    nblocks = -(-L // per_block)
    out = np.zeros((nblocks * words_per_block, x.shape[1]), np.uint64)
    for col in range(x.shape[1]):
        for b in range(nblocks):
            stream = 0
            for i in range(per_block):
                k = b * per_block + i
                if k < L:
                    stream |= (int(x[k, col]) & ((1 << bits) - 1)) << (i * bits)
            for j in range(words_per_block):
                out[b * words_per_block + j, col] = (stream >> (j * word_bits)) & ((1 << word_bits) - 1)
    out = out.reshape((nblocks * words_per_block,) + rest).astype(np.uint8 if word_bits == 8 else np.uint32)
    return np.moveaxis(out, 0, axis)


@st.composite
def packing_case(draw):
    bits = draw(st.integers(1, 8))
    word_bits = draw(st.sampled_from([8, 32]))
    ndim = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 40 if ndim == 1 else 9), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, size=shape, dtype=np.uint8)
    codes[rng.random(shape) < 0.2] = 2**bits - 1  # all-ones codes exercise every spill bit
    return bits, word_bits, axis, codes


# pack/unpack run inside jit in jquant (rtn, dequantize); jit here also keeps the
# per-shape cost to one compilation instead of one per eager op.
_pack = jax.jit(jquant.pack, static_argnames=("bits", "axis", "word_bits"))
_unpack = jax.jit(jquant.unpack, static_argnames=("bits", "length", "axis", "word_bits", "dtype"))


@settings(max_examples=40, deadline=None)
@given(packing_case())
def test_pack_roundtrip_length_and_reference(case):
    bits, word_bits, axis, codes = case
    L = codes.shape[axis]
    packed = _pack(codes, bits=bits, axis=axis, word_bits=word_bits)
    assert packed.dtype == (jnp.uint8 if word_bits == 8 else jnp.uint32)
    # Length: lcm(bits, word_bits)-bit blocks, whole blocks only.
    lcm = bits * word_bits // math.gcd(bits, word_bits)
    expect_len = -(-L // (lcm // bits)) * (lcm // word_bits)
    assert packing.packed_length(L, bits, word_bits) == expect_len
    exp_shape = list(codes.shape)
    exp_shape[axis] = expect_len
    assert packed.shape == tuple(exp_shape)
    np.testing.assert_array_equal(np.asarray(packed), ref_pack(codes, bits, axis, word_bits))
    back = _unpack(packed, bits=bits, length=L, axis=axis, word_bits=word_bits)
    assert back.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(back), codes)


@pytest.mark.parametrize("bits,word_bits,L,words", [
    (3, 32, 32, 3), (3, 32, 100, 12), (5, 32, 33, 10), (6, 32, 16, 3), (7, 32, 1, 7),
    (4, 32, 100, 13), (8, 32, 5, 2), (1, 32, 33, 2), (3, 8, 8, 3), (3, 8, 9, 6), (6, 8, 4, 3), (8, 8, 5, 5),
])
def test_packed_length_table(bits, word_bits, L, words):
    assert packing.packed_length(L, bits, word_bits) == words


@pytest.mark.parametrize("bits", [3, 4])
def test_eager_pack_matches_reference(bits):
    """The same check without jit, on one shape (4 x 3 columns, a ragged last block)."""
    rng = np.random.default_rng(bits)
    for word_bits in (8, 32):
        codes = rng.integers(0, 2**bits, size=(3, 37), dtype=np.uint8)
        codes[:, ::4] = 2**bits - 1
        packed = np.asarray(jquant.pack(codes, bits, axis=1, word_bits=word_bits))
        np.testing.assert_array_equal(packed, ref_pack(codes, bits, 1, word_bits))
        np.testing.assert_array_equal(np.asarray(jquant.unpack(packed, bits, 37, axis=1, word_bits=word_bits)), codes)


def test_known_words():
    # Three 3-bit codes 0b101, 0b011, 0b110 -> stream 110_011_101 = 0x19D in the first word.
    packed = np.asarray(jquant.pack(np.array([5, 3, 6], np.uint8), 3, word_bits=32))
    assert packed.tolist() == [0x19D, 0, 0]
    # Code 10 (of 32 three-bit codes) occupies bits 30..32: low two bits in word 0, high bit in word 1.
    c = np.zeros(32, np.uint8)
    c[10] = 0b111
    assert np.asarray(jquant.pack(c, 3, word_bits=32)).tolist() == [0xC0000000, 0x1, 0]
    # 8-bit words: 4-bit codes, low nibble first.
    assert np.asarray(jquant.pack(np.array([0x1, 0xA, 0xF], np.uint8), 4, word_bits=8)).tolist() == [0xA1, 0x0F]


def test_pack_masks_to_bits_and_unpack_dtype():
    codes = np.array([0xFF, 0x13, 7], np.int32)
    packed = jquant.pack(codes, 3, word_bits=8)
    np.testing.assert_array_equal(np.asarray(jquant.unpack(packed, 3, 3, word_bits=8)), [7, 3, 7])
    out = jquant.unpack(packed, 3, 3, word_bits=8, dtype=jnp.int32)
    assert out.dtype == jnp.int32


@pytest.mark.parametrize("bits,word_bits", [(0, 32), (9, 32), (4, 16)])
def test_pack_bad_args(bits, word_bits):
    with pytest.raises(SpecError, match=str(bits) if bits in (0, 9) else "word_bits"):
        jquant.pack(np.zeros(8, np.uint8), bits, word_bits=word_bits)


def test_unpack_bad_lengths():
    packed = jquant.pack(np.zeros(10, np.uint8), 3, word_bits=32)  # 3 words = 32 codes
    with pytest.raises(ShapeError, match="33"):
        jquant.unpack(packed, 3, 33, word_bits=32)
    with pytest.raises(ShapeError, match="multiple of 3"):
        jquant.unpack(packed[:2], 3, 10, word_bits=32)
    with pytest.raises(ShapeError):
        jquant.pack(np.uint8(3), 3)
