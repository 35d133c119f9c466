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
from jquant.errors import DTypeError, ShapeError, SpecError
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

    def __post_init__(self):
        check_parts(self)

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


# ---------------------------------------------------------------------------------------
# Parts against metadata
# ---------------------------------------------------------------------------------------
_PARTS = ("codes", "scale", "zero", "g_idx", "perm", "outlier_idx", "outlier_w")


def _is_array(a) -> bool:
    """Arrays, tracers and abstract values (ShapeDtypeStruct, ShapedArray); not the
    placeholder leaves (``object()``, None, ints of ``in_axes``) jax unflattens pytrees with."""
    return isinstance(getattr(a, "shape", None), tuple) and hasattr(a, "dtype")


def _kind_ok(dtype, kind: str) -> bool:
    if dtype == jax.dtypes.float0:  # cotangents of integer parts
        return True
    return {"float": jnp.issubdtype(dtype, jnp.floating), "int": jnp.issubdtype(dtype, jnp.integer),
            "number": jnp.issubdtype(dtype, jnp.number) and not jnp.issubdtype(dtype, jnp.complexfloating)}.get(
        kind, dtype == jnp.dtype(kind))


def _expected_parts(qt) -> dict[str, tuple[tuple[int, ...] | None, str, str]]:
    """``{part: (shape or None when it must be absent, dtype kind, why)}`` for a QTensor's metadata."""
    shape, axis, fmt, bits = qt.shape, qt.axis, qt.grid.fmt, qt.grid.bits
    want: dict[str, tuple[tuple[int, ...] | None, str, str]] = {p: (None, "", "") for p in _PARTS[:5]}
    if fmt in formats.GGML_FORMATS + formats.BLOCKFLOAT_FORMATS:
        if fmt in formats.GGML_FORMATS:
            from jquant.quantizers.kquant import BLOCK as row_block, TYPE_SIZE as type_size
        else:
            from jquant.quantizers.blockfloat import ROW_BLOCK as row_block, TYPE_SIZE as type_size
        if len(shape) != 2 or axis != 0 or shape[0] % row_block[fmt]:
            raise ShapeError(f"a {fmt} QTensor has a 2-D shape (in, out) with blocks along axis 0 and in a "
                             f"multiple of {row_block[fmt]}; got shape {shape}, axis {axis}")
        K, N = shape
        want["codes"] = ((K // row_block[fmt] * type_size[fmt], N), "uint8",
                         f"{K // row_block[fmt]} blocks of {type_size[fmt]} bytes per column")
        if fmt == "nvfp4":
            want["scale"] = ((1, 1), "float", "the NVFP4 float32 tensor scale (or None)")
    else:
        K = shape[axis]
        try:
            words = packing.packed_length(K, bits, qt.word_bits)
        except SpecError as e:
            raise SpecError(f"QTensor of format {fmt}: {e}") from None
        word = jnp.dtype(packing.WORD_DTYPES[qt.word_bits]).name
        want["codes"] = (shape[:axis] + (words,) + shape[axis + 1:], word,
                         f"{K} {bits}-bit codes along axis {axis} packed into {words} {word} words")
        lay = qt.layout
        why = (f"{qt.granularity}" + (f" {lay.size}" if qt.granularity == "group" else "")
               + f" along axis {axis} of {shape}: {lay.groups} group(s)")
        if fmt == "bcq":
            want["scale"] = ((bits,) + lay.param_shape, "float", f"one α per bit plane ({bits}) and group; {why}")
        else:
            want["scale"] = (lay.param_shape, "float", why)
        if fmt == "int" and not qt.grid.symmetric:
            want["zero"] = (lay.param_shape, "int" if qt.grid.zero_type == "int" else "float",
                            f"{qt.grid.zero_type} zero of an asymmetric grid; {why}")
        want["g_idx"] = ((K,), "int", f"a group per index along axis {axis} (act-order)")
        want["perm"] = ((K,), "int", f"a logical row per stored row along axis {axis}")
    return want


def check_parts(qt) -> None:
    """Check a QTensor's arrays against its static metadata (shapes and dtypes, not values).

    Shapes are checked for concrete arrays, tracers and abstract values alike (they are
    static); leaves that are not arrays (the placeholders jax unflattens pytrees with) are
    skipped. Parts may share leading batch axes (a QTensor stacked by ``tree_map`` for
    ``vmap``/``scan``). Values (finite scales, indices in range) are checked by
    :func:`check_values`, which reads the arrays.

    Raises:
      SpecError: metadata no QTensor can have (format, granularity, axis, word size, dtype).
      ShapeError: a part of the wrong shape, or a part present (absent) that the format
        does not store (needs).
      DTypeError: a part of the wrong dtype.
    """
    from jquant.spec import GRANULARITIES

    shape = qt.shape
    if not isinstance(shape, tuple) or not all(isinstance(d, (int, np.integer)) and d >= 0 for d in shape):
        raise SpecError(f"QTensor shape must be a tuple of non-negative ints, got {shape!r}")
    if qt.grid.fmt not in formats.FORMATS:
        raise SpecError(f"QTensor format {qt.grid.fmt!r} unknown; valid: {', '.join(formats.FORMATS)}")
    if qt.granularity not in GRANULARITIES:
        raise SpecError(f"QTensor granularity {qt.granularity!r} unknown; valid: {', '.join(GRANULARITIES)}")
    if qt.word_bits not in packing.WORD_DTYPES:
        raise SpecError(f"QTensor word_bits must be 8 or 32, got {qt.word_bits!r}")
    if not isinstance(qt.axis, (int, np.integer)) or not 0 <= qt.axis < len(shape):
        raise SpecError(f"QTensor axis must be in 0..{len(shape) - 1} for shape {shape}, got {qt.axis!r}")
    if qt.granularity == "group" and not (isinstance(qt.group_size, (int, np.integer)) and qt.group_size >= 1):
        raise SpecError(f"QTensor group_size must be an integer >= 1, got {qt.group_size!r}")
    try:
        ok = jnp.issubdtype(jnp.dtype(qt.dtype), jnp.floating)
    except TypeError:
        ok = False
    if not ok:
        raise SpecError(f"QTensor dtype (of the original array) must name a float dtype, got {qt.dtype!r}")
    want = _expected_parts(qt)
    desc = f"{qt.grid.fmt}{qt.grid.bits if qt.grid.fmt in ('int', 'bcq') else ''} QTensor of shape {shape}"
    prefix = None  # leading batch axes shared by every part
    n_out = None
    for part in _PARTS:
        a = getattr(qt, part)
        if not _is_array(a):
            continue
        if part in ("outlier_idx", "outlier_w"):
            if part == "outlier_idx":
                n_out = a.shape[-1] if a.ndim else -1
                exp, kind, why = (None if not a.ndim else (n_out,)), "int", "indices of rows kept in float"
            else:
                n = n_out if n_out is not None else (a.shape[-len(shape)] if a.ndim >= len(shape) else -1)
                exp, kind, why = (n,) + shape[1:], "float", f"{n} row(s) of the logical shape kept in float"
            if exp is None:
                raise ShapeError(f"{desc}: outlier_idx must be 1-D (n,), got a scalar")
        else:
            exp, kind, why = want[part]
            if exp is None:
                if part == "scale" and qt.grid.fmt in formats.BLOCKFLOAT_FORMATS + formats.GGML_FORMATS:
                    why = f"{qt.grid.fmt} stores its scales in the code blocks"
                raise ShapeError(f"{desc}: has a {part} of shape {tuple(a.shape)}, but {qt.grid.fmt}"
                                 f"{' symmetric' if qt.grid.fmt == 'int' and qt.grid.symmetric else ''} stores no {part}"
                                 + (f" ({why})" if why else "") + "; valid: None")
        got = tuple(a.shape)
        lead = len(got) - len(exp)
        if lead < 0 or got[lead:] != exp:
            raise ShapeError(f"{desc}: {part} has shape {got}, expected {exp} ({why})")
        if prefix is None:
            prefix = got[:lead]
        elif got[:lead] != prefix:
            raise ShapeError(f"{desc}: {part} has leading (batch) axes {got[:lead]}, other parts {prefix}; "
                             "stacked parts must share them")
        if not _kind_ok(a.dtype, kind):
            raise DTypeError(f"{desc}: {part} has dtype {jnp.dtype(a.dtype).name}, expected "
                             f"{'a ' + kind + 'ing' if kind == 'float' else ('an integer' if kind == 'int' else kind)}"
                             f" dtype ({why})")
    if not _is_array(qt.codes):  # placeholder leaves (jax internals, tree_map to non-arrays)
        return
    for part in ("scale", "zero"):
        if want[part][0] is not None and getattr(qt, part) is None and not (part == "scale" and qt.grid.fmt == "nvfp4"):
            raise ShapeError(f"{desc}: {part} is None, but the format needs one of shape {want[part][0]} "
                             f"({want[part][2]})")
    if qt.g_idx is not None and qt.perm is not None:
        raise ShapeError(f"{desc}: has both g_idx and perm; an act-order QTensor has one of them")
    if (qt.outlier_idx is None) != (qt.outlier_w is None):
        raise ShapeError(f"{desc}: outlier_idx and outlier_w come together; got only "
                         f"{'outlier_idx' if qt.outlier_w is None else 'outlier_w'}")


def check_values(qt, path: str | None = None) -> None:
    """Check the values a QTensor's metadata constrains, reading the arrays (host sync):
    finite floating scales, zeros and outlier rows; ``g_idx`` in ``[0, groups)``; ``perm`` a
    permutation; ``outlier_idx`` in ``[0, shape[0])``. Skipped for tracers. Call it where
    arrays are read anyway (checkpoint save and restore), not per use.

    Raises:
      NonFiniteError: NaN/Inf in a stored scale, zero or outlier row.
      ShapeError: an index part out of range.
    """
    from jquant.errors import NonFiniteError, at

    for part in _PARTS:
        a = getattr(qt, part)
        if a is None or isinstance(a, jax.core.Tracer) or not _is_array(a) or isinstance(a, jax.ShapeDtypeStruct):
            continue
        v = np.asarray(a)
        if part in ("scale", "zero", "outlier_w") and jnp.issubdtype(v.dtype, jnp.floating):
            bad = ~np.isfinite(v.astype(np.float32))
            if bad.any():
                first = tuple(int(i) for i in np.argwhere(bad)[0])
                raise NonFiniteError(at(path, f"{int(bad.sum())} of {v.size} stored {part} value(s) are NaN/Inf "
                                              f"(first at index {first}: {v[first]}); stored parameters must be "
                                              "finite"))
        elif part in ("g_idx", "perm", "outlier_idx") and v.size:
            hi = {"g_idx": qt.layout.groups, "perm": qt.shape[qt.axis], "outlier_idx": qt.shape[0]}[part]
            if v.min() < 0 or v.max() >= hi:
                raise ShapeError(at(path, f"{part} holds values in [{v.min()}, {v.max()}]; valid: [0, {hi})"))
            if part == "perm" and v.ndim == 1 and len(np.unique(v)) != v.size:
                raise ShapeError(at(path, f"perm repeats rows ({v.size - len(np.unique(v))} duplicates); it must "
                                          f"be a permutation of 0..{hi - 1}"))


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
