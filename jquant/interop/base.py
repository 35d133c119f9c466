"""What every pre-quantized checkpoint format shares: integer weights with a scale and an
integer zero point per group of input rows, optionally act-ordered (``g_idx``).

A format module (``gptq.py``, ``awq.py``, ``compressed_tensors.py``) turns :class:`IntParts`
into its tensors and back; :func:`int_parts` takes a :class:`~jquant.qtensor.QTensor` apart
(refusing what no integer format can hold) and :func:`int_qtensor` builds one, so the
packing, scales and zeros of jquant stay in one place.

Layout: Flax ``(in, out)``. ``codes`` ``(K, N)`` uint8 in ``[0, 2**bits)``, ``scale`` and
``zero`` ``(G, N)``, ``g_idx`` ``(K,)`` int32; the value of a weight is
``(codes[k, n] - zero[g, n]) * scale[g, n]`` with ``g = g_idx[k]``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jquant import packing
from jquant.errors import FormatError
from jquant.formats import Grid
from jquant.qtensor import QTensor


class Scheme(NamedTuple):
    """The quantization config of one linear, as checkpoint configs state it."""

    bits: int
    group_size: int  # -1: one group over the whole input (per output channel)
    sym: bool
    desc_act: bool  # act-order: g_idx is not arange(K) // group_size


class IntParts(NamedTuple):
    """An integer-quantized weight in logical row order (numpy, host)."""

    codes: np.ndarray  # (K, N) uint8
    scale: np.ndarray  # (G, N) float (the stored dtype)
    zero: np.ndarray  # (G, N) int32; 2**(bits-1) everywhere for a symmetric grid
    g_idx: np.ndarray  # (K,) int32
    scheme: Scheme


def contiguous_g_idx(k: int, group_size: int) -> np.ndarray:
    """``arange(k) // group_size`` (all zeros for ``group_size == -1``)."""
    if group_size == -1:
        return np.zeros(k, np.int32)
    return (np.arange(k) // group_size).astype(np.int32)


def int_parts(qt, name: str, *, fmt: str) -> IntParts:
    """Take an integer QTensor apart into :class:`IntParts` for the checkpoint format ``fmt``.

    Accepts ``int`` grids of 1–8 bits with an integer zero point (or symmetric), per-group,
    per-channel or per-tensor scales along axis 0 of a 2-D ``(in, out)`` kernel, in the
    act-order layouts ``g_idx`` or ``perm`` (returned in logical row order).

    Raises:
      FormatError: anything else (codebook or block formats, a float minimum instead of an
        integer zero point, LLM.int8 outlier rows, another axis), naming ``name``.
    """
    if not isinstance(qt, QTensor):
        raise FormatError(f"{name}: is a float array, not a QTensor; {fmt} stores quantized linears")
    where = f"{name} ({qt!r})"
    if qt.grid.fmt != "int":
        raise FormatError(f"{where}: {fmt} stores integer grids; this weight has format {qt.grid.fmt!r} "
                          "(export it as GGUF, or quantize it with an int format)")
    if len(qt.shape) != 2 or qt.axis != 0:
        raise FormatError(f"{where}: {fmt} stores 2-D (in, out) kernels grouped along axis 0; got shape {qt.shape}, "
                          f"axis {qt.axis}")
    if qt.outlier_idx is not None:
        raise FormatError(f"{where}: has {qt.outlier_idx.shape[0]} LLM.int8 outlier row(s) kept in float; {fmt} "
                          "has no place for them")
    if not qt.grid.symmetric and qt.grid.zero_type != "int":
        raise FormatError(f"{where}: its asymmetric grid stores a float minimum (zero_type='float'); {fmt} stores "
                          "an integer zero point: quantize with zero_type='int'")
    K, N = qt.shape
    stored = dataclasses.replace(qt, perm=None, g_idx=None)
    codes = np.asarray(jax.device_get(stored.unpacked_codes()))
    lay = qt.layout
    G = lay.groups
    scale = np.asarray(jax.device_get(qt.scale))
    if qt.grid.symmetric:
        zero = np.full(scale.shape, 2 ** (qt.bits - 1), np.int32)
    else:
        zero = np.asarray(jax.device_get(qt.zero)).astype(np.int32)
    if qt.granularity == "tensor":  # one scale: the same for every output channel
        scale = np.broadcast_to(scale.reshape(1, 1), (1, N)).copy()
        zero = np.broadcast_to(zero.reshape(1, 1), (1, N)).copy()
    group_size = -1 if qt.granularity in ("channel", "tensor") or G == 1 and lay.size == K else lay.size
    if qt.perm is not None:  # stored row j is logical row perm[j], stored groups contiguous
        perm = np.asarray(jax.device_get(qt.perm))
        logical = np.empty_like(codes)
        logical[perm] = codes
        codes = logical
        g_idx = np.empty(K, np.int32)
        g_idx[perm] = contiguous_g_idx(K, group_size)
    elif qt.g_idx is not None:
        g_idx = np.asarray(jax.device_get(qt.g_idx)).astype(np.int32)
    else:
        g_idx = contiguous_g_idx(K, group_size)
    desc_act = not np.array_equal(g_idx, contiguous_g_idx(K, group_size))
    return IntParts(codes, scale, zero, g_idx, Scheme(qt.bits, group_size, bool(qt.grid.symmetric), desc_act))


def int_qtensor(codes, scale, zero, g_idx, *, bits: int, group_size: int, dtype, method: str,
                name: str, packed=None, shape: tuple[int, int] | None = None) -> QTensor:
    """A QTensor holding exactly ``(codes - zero[g_idx]) * scale[g_idx]``.

    Args:
      codes: ``(K, N)`` integers in ``[0, 2**bits)``; or None with ``packed``, the codes
        already in jquant's packing (``uint32`` words along K: GPTQ's ``qweight``) and ``shape``
        ``(K, N)``, taken as they are (no unpacking).
      scale: ``(G, N)`` floats, kept in their dtype (the QTensor's ``scale_dtype``).
      zero: ``(G, N)`` integers; all ``2**(bits-1)`` makes a symmetric QTensor (no zero stored).
      g_idx: ``(K,)`` group of every input row, or None for ``arange(K) // group_size``;
        contiguous ones are dropped, others kept (act-order).
      group_size: rows per group, or -1 for one group (per output channel).
      dtype: the float dtype the weight dequantizes to.
      name: the checkpoint tensor, for messages.
    Raises:
      FormatError: values outside what the QTensor can hold (codes or zeros out of range,
        group indices out of range, shapes that disagree).
    """
    scale = np.asarray(scale)
    zero = np.asarray(zero)
    if packed is not None:
        K, N = shape
        words = packing.packed_length(K, bits)
        packed = np.asarray(packed).view(np.uint32)
        if packed.shape != (words, N):
            raise FormatError(f"{name}: packed codes {packed.shape}; {bits}-bit ({K}, {N}) codes take {(words, N)}")
    else:
        codes = np.asarray(codes)
        K, N = codes.shape
    G = 1 if group_size == -1 else -(-K // group_size)
    if scale.shape != (G, N) or zero.shape != (G, N):
        raise FormatError(f"{name}: scales {scale.shape} and zeros {zero.shape} must both be {(G, N)} for a "
                          f"({K}, {N}) weight with group size {group_size}")
    if packed is None and codes.size and int(codes.max()) >= 2 ** bits:
        raise FormatError(f"{name}: codes reach {int(codes.max())}; {bits}-bit codes lie in [0, {2 ** bits})")
    if zero.size and (int(zero.min()) < 0 or int(zero.max()) > 255):
        raise FormatError(f"{name}: zero points in [{int(zero.min())}, {int(zero.max())}]; valid: [0, 255]")
    if not np.issubdtype(scale.dtype, np.floating) and scale.dtype != jnp.bfloat16:
        raise FormatError(f"{name}: scales have dtype {scale.dtype}; valid: a float dtype")
    if g_idx is not None:
        g_idx = np.asarray(g_idx).astype(np.int64)
        if g_idx.shape != (K,):
            raise FormatError(f"{name}: g_idx has shape {g_idx.shape}; valid: ({K},), a group per input row")
        if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= G):
            raise FormatError(f"{name}: g_idx holds groups in [{g_idx.min()}, {g_idx.max()}]; valid: [0, {G})")
        if np.array_equal(g_idx, contiguous_g_idx(K, group_size)):
            g_idx = None
    sym = bool(zero.size) and bool(np.all(zero == 2 ** (bits - 1)))
    grid = Grid("int", bits, sym, False, "int", jnp.dtype(scale.dtype).name)
    if packed is None:
        packed = packing.pack(codes, bits, axis=0)
    return QTensor(
        codes=jnp.asarray(packed), scale=jnp.asarray(scale), zero=None if sym else jnp.asarray(zero.astype(np.uint8)),
        g_idx=None if g_idx is None else jnp.asarray(g_idx.astype(np.int32)), shape=(K, N),
        dtype=jnp.dtype(dtype).name, grid=grid, granularity="channel" if group_size == -1 else "group",
        group_size=K if group_size == -1 else group_size, axis=0, method=method)


def pack_np(codes: np.ndarray, bits: int, axis: int = 0) -> np.ndarray:
    """:func:`jquant.packing.pack` on the host, as int32 words (the checkpoints' dtype)."""
    return np.asarray(jax.device_get(packing.pack(codes, bits, axis=axis))).view(np.int32)


def unpack_np(words: np.ndarray, bits: int, length: int, axis: int = 0) -> np.ndarray:
    """:func:`jquant.packing.unpack` of int32/uint32 words on the host, as uint8 codes."""
    return np.asarray(jax.device_get(packing.unpack(np.asarray(words).view(np.uint32), bits, length, axis=axis)))
