"""``QTensor``: a quantized array as a pytree (packed codes, scales, zeros, g_idx).

Layout: codes are packed along the reduction ``axis`` (axis 0 of a Flax kernel
``(in_features, out_features)``). Scales and zeros keep the logical shape with ``axis``
replaced by the number of groups ``G`` (``group``/``channel``; ``G = 1`` for channel), or
all ones (``tensor``). ``g_idx`` (act-order) gives, for every index along ``axis``, the
group whose scale it uses. ``perm`` (the kernel layout of act-order, see
:func:`act_order_to_perm`) says the rows along ``axis`` are *stored* permuted: stored row
``j`` is logical row ``perm[j]``, with contiguous groups in stored order, so a matmul
computes ``x[..., perm] @ W_stored`` and needs no per-element gather of scales.

Arrays are pytree children; everything else (shape, dtype, format, bits, …) is static
aux data, so a QTensor goes through ``jit``, ``vmap``, ``tree_map`` and sharding like any
pytree of arrays.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant import formats, packing
from jquant.formats import Grid


# ---------------------------------------------------------------------------------------
# Grouped views: (G, S, R) with groups along the reduction axis, NaN padding.
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GroupLayout:
    """How a logical array maps to its grouped view ``(G, S, R)``."""

    shape: tuple[int, ...]
    axis: int
    granularity: str
    group_size: int

    @property
    def length(self) -> int:  # K, the reduction length
        return self.shape[self.axis]

    @property
    def rest(self) -> tuple[int, ...]:
        return self.shape[: self.axis] + self.shape[self.axis + 1 :]

    @property
    def size(self) -> int:  # S
        if self.granularity == "tensor":
            return int(np.prod(self.shape))
        if self.granularity == "channel":
            return self.length
        return min(self.group_size, self.length)

    @property
    def groups(self) -> int:  # G
        if self.granularity == "group":
            return -(-self.length // self.size)
        return 1

    @property
    def param_shape(self) -> tuple[int, ...]:
        """Stored shape of scale/zero."""
        if self.granularity == "tensor":
            return (1,) * len(self.shape)
        s = list(self.shape)
        s[self.axis] = self.groups
        return tuple(s)

    def to_groups(self, x, pad_value=jnp.nan):
        """Logical array -> grouped view ``(G, S, R)`` (``(1, numel, 1)`` for ``tensor``)."""
        if self.granularity == "tensor":
            return x.reshape(1, -1, 1)
        x = jnp.moveaxis(x, self.axis, 0).reshape(self.length, -1)
        G, S = self.groups, self.size
        pad = G * S - self.length
        if pad:
            x = jnp.pad(x, ((0, pad), (0, 0)), constant_values=pad_value)
        return x.reshape(G, S, x.shape[-1])

    def from_groups(self, xg):
        """Grouped view -> logical array (drops padding)."""
        if self.granularity == "tensor":
            return xg.reshape(self.shape)
        x = xg.reshape(-1, xg.shape[-1])[: self.length]
        x = x.reshape((self.length,) + self.rest)
        return jnp.moveaxis(x, 0, self.axis)

    def params_to_stored(self, p):
        """``(G, 1, R)`` parameters -> stored ``param_shape``."""
        if self.granularity == "tensor":
            return p.reshape(self.param_shape)
        p = p.reshape((self.groups,) + self.rest)
        return jnp.moveaxis(p, 0, self.axis)

    def params_from_stored(self, p):
        """Stored parameters -> ``(G, 1, R)``."""
        if self.granularity == "tensor":
            return p.reshape(1, 1, 1)
        p = jnp.moveaxis(p, self.axis, 0)
        return p.reshape(self.groups, 1, -1)


# ---------------------------------------------------------------------------------------
# QTensor
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class QTensor:
    """A quantized array.

    Children (arrays): ``codes`` (packed uint32/uint8; for the GGML block formats uint8
    ``(K / QK · type_size, N)``, column ``n`` the GGUF blocks of row ``n``, with ``scale``
    and ``zero`` None: see :mod:`jquant.quantizers.kquant`; for the block-scaled floats
    ``mxfp4 mxfp8_* nvfp4`` likewise block bytes, ``scale`` None or NVFP4's float32 ``(1, 1)``
    tensor scale: see :mod:`jquant.quantizers.blockfloat`), ``scale`` (for ``bcq``
    ``(bits,) + param_shape``, one α per bit plane: see :mod:`jquant.quantizers.bcq`), ``zero`` (integer zero
    point as uint8, or float minimum; None for symmetric grids), ``g_idx`` (int32, act-order;
    None when groups are contiguous), ``perm`` (int32: stored row ``j`` along ``axis`` is
    logical row ``perm[j]``; None when rows are stored in order), ``outlier_idx`` (int32
    ``(n,)``) and ``outlier_w`` (float16 ``(n, N)``): input rows kept in float (LLM.int8-style
    outliers, :mod:`jquant.quantizers.outliers`; their codes dequantize to exactly 0 and a
    matmul adds ``x[..., idx] @ outlier_w``; None without outliers).
    Static: ``shape``, ``dtype`` (name of the original float dtype), ``grid``
    (format, bits, symmetric, full_range, zero_type, scale_dtype), ``granularity``,
    ``group_size``, ``axis``, ``word_bits``, ``method`` (which quantizer made it).
    """

    codes: jax.Array
    scale: jax.Array | None
    zero: jax.Array | None
    g_idx: jax.Array | None
    shape: tuple[int, ...]
    dtype: str
    grid: Grid
    granularity: str
    group_size: int
    axis: int
    word_bits: int = 32
    method: str = "rtn"
    perm: jax.Array | None = None
    outlier_idx: jax.Array | None = None
    outlier_w: jax.Array | None = None

    # -- static views ---------------------------------------------------------------
    @property
    def layout(self) -> GroupLayout:
        return GroupLayout(self.shape, self.axis, self.granularity, self.group_size)

    @property
    def bits(self) -> int:
        return self.grid.bits

    @property
    def format(self) -> str:
        return self.grid.fmt

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Real storage: codes + scales + zeros + g_idx + perm + outlier rows and their indices."""
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                   for a in (self.codes, self.scale, self.zero, self.g_idx, self.perm, self.outlier_idx,
                             self.outlier_w) if a is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / max(self.size, 1)

    def __repr__(self) -> str:
        return (f"QTensor({self.format}{self.bits if self.format in ('int', 'bcq') else ''} "
                f"{self.granularity}{self.group_size if self.granularity == 'group' else ''}, "
                f"shape={self.shape}, dtype={self.dtype}, {self.bits_per_weight:.3f} bits/weight)")

    # -- values ------------------------------------------------------------------------
    def unpacked_codes(self):
        """Codes as uint8 in the logical shape."""
        return packing.unpack(self.codes, self.bits, self.shape[self.axis], axis=self.axis,
                              word_bits=self.word_bits)

    def dequantize(self, dtype=None):
        """The float array (``dtype`` defaults to the original dtype)."""
        dtype = jnp.dtype(dtype or self.dtype)
        if self.outlier_idx is not None:  # LLM.int8-style: rows kept in float replace their (zero) codes
            base = dataclasses.replace(self, outlier_idx=None, outlier_w=None).dequantize(dtype)
            return base.at[self.outlier_idx].set(self.outlier_w.astype(dtype))
        if self.grid.fmt in formats.GGML_FORMATS:  # GGUF blocks: codes are the GGUF rows' bytes
            from jquant.quantizers import kquant

            return kquant.dequantize_qtensor(self, dtype)
        if self.grid.fmt in formats.BLOCKFLOAT_FORMATS:  # MX / NVFP4 blocks (+ NVFP4's tensor scale)
            from jquant.quantizers import blockfloat

            return blockfloat.dequantize_qtensor(self, dtype)
        if self.perm is not None:  # stored rows are permuted: dequantize them, then put them back
            stored = dataclasses.replace(self, perm=None).dequantize(dtype)
            return jnp.take(stored, jnp.argsort(self.perm), axis=self.axis)
        lay = self.layout
        codes = self.unpacked_codes()
        scale = self.scale.astype(jnp.float32)
        zero = None if self.zero is None else self.zero.astype(jnp.float32)
        if self.g_idx is not None:
            # Act-order: every index along axis picks its group's parameters.
            scale = jnp.take(scale, self.g_idx, axis=self.axis)
            zero = None if zero is None else jnp.take(zero, self.g_idx, axis=self.axis)
            return formats.decode(codes, scale, zero, self.grid).astype(dtype)
        cg = lay.to_groups(codes, pad_value=0)
        if self.grid.fmt == "bcq":  # scale (bits,) + param_shape: one α per bit plane and group
            sg = jnp.stack([lay.params_from_stored(scale[i]) for i in range(self.bits)])
            return lay.from_groups(formats.decode(cg, sg, None, self.grid)).astype(dtype)
        sg = lay.params_from_stored(scale)
        zg = None if zero is None else lay.params_from_stored(zero)
        return lay.from_groups(formats.decode(cg, sg, zg, self.grid)).astype(dtype)


jax.tree_util.register_dataclass(
    QTensor,
    data_fields=["codes", "scale", "zero", "g_idx", "perm", "outlier_idx", "outlier_w"],
    meta_fields=["shape", "dtype", "grid", "granularity", "group_size", "axis", "word_bits", "method"],
)


def act_order_to_perm(qt: QTensor) -> QTensor:
    """The kernel layout of an act-order QTensor: rows stored by group, plus ``perm``.

    An act-order (``g_idx``) tensor gathers a scale per element along ``axis``. Sorting the
    rows by group (stably) makes the groups contiguous again; the rows are repacked in that
    order and ``perm`` records it, so ``x @ W == x[..., perm] @ W_stored`` and a kernel reads
    scales group by group. The dequantized array is unchanged. QTensors without ``g_idx``
    come back as they are.

    Raises:
      ShapeError: when ``g_idx`` does not give every group ``group_size`` rows (the last
        group may be shorter), so the sorted rows would not form the stored groups.
    """
    from jquant.errors import ShapeError

    if qt.g_idx is None:
        return qt
    if qt.perm is not None:
        raise ShapeError("QTensor has both g_idx and perm")
    g_idx = np.asarray(qt.g_idx)
    lay = qt.layout
    counts = np.bincount(g_idx, minlength=lay.groups)
    want = np.full(lay.groups, lay.size)
    want[-1] = lay.length - lay.size * (lay.groups - 1)
    if counts.shape[0] != lay.groups or not np.array_equal(counts, want):
        raise ShapeError(f"g_idx does not assign {lay.size} rows to each of {lay.groups} groups "
                         f"(counts {counts.tolist()[:8]}...); cannot store it with contiguous groups")
    perm = np.argsort(g_idx, kind="stable").astype(np.int32)
    codes = jnp.take(qt.unpacked_codes(), jnp.asarray(perm), axis=qt.axis)
    packed = packing.pack(codes, qt.bits, axis=qt.axis, word_bits=qt.word_bits)
    return dataclasses.replace(qt, codes=packed, g_idx=None, perm=jnp.asarray(perm))


def is_qtensor(x: Any) -> bool:
    return isinstance(x, QTensor)


def dequantize(x, dtype=None):
    """Dequantize a QTensor; pass float arrays through (optionally cast)."""
    if isinstance(x, QTensor):
        return x.dequantize(dtype)
    return x if dtype is None else jnp.asarray(x).astype(dtype)


def dequantize_tree(tree, dtype=None):
    """Replace every QTensor leaf of a tree by its float array."""
    return jax.tree_util.tree_map(lambda x: dequantize(x, dtype) if is_qtensor(x) else x, tree,
                                  is_leaf=is_qtensor)
