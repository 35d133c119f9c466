"""The AWQ checkpoint format, GEMM packing (AutoAWQ, transformers, vLLM; arXiv:2306.00978).

Per quantized linear (Flax layout ``(in, out)`` = ``(K, N)``), 4-bit codes only:

- ``qweight`` int32 ``(K, N/8)``: eight codes of one input row packed along the output
  dimension in AutoAWQ's interleaved order — nibble ``i`` of word ``j`` holds column
  ``8j + [0, 2, 4, 6, 1, 3, 5, 7][i]``;
- ``qzeros`` int32 ``(G, N/8)``: zero points packed the same way (no off-by-one);
- ``scales`` float16 ``(G, N)``; groups are contiguous (AWQ has no act-order).

``quantization_config``: ``{"quant_method": "awq", "bits": 4, "group_size": …,
"zero_point": …, "version": "gemm", "modules_to_not_convert": […]}``.
"""

from __future__ import annotations

import numpy as np

from jquant.errors import FormatError
from jquant.interop.base import IntParts, Scheme, int_qtensor

ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])
SUFFIXES = ("qweight", "qzeros", "scales")


def _pack(codes: np.ndarray) -> np.ndarray:
    """``(R, N)`` 4-bit codes -> ``(R, N/8)`` int32 in AWQ's order."""
    R, N = codes.shape
    c = codes.reshape(R, N // 8, 8)[:, :, ORDER].astype(np.uint32)
    words = np.zeros((R, N // 8), np.uint32)
    for i in range(8):
        words |= c[:, :, i] << np.uint32(4 * i)
    return words.view(np.int32)


def _unpack(words: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_pack`: ``(R, W)`` int32 -> ``(R, 8W)`` uint8."""
    w = np.asarray(words).view(np.uint32)
    R, W = w.shape
    out = np.empty((R, W, 8), np.uint8)
    for i in range(8):
        out[:, :, ORDER[i]] = (w >> np.uint32(4 * i)) & 0xF
    return out.reshape(R, W * 8)


def to_tensors(parts: IntParts, name: str) -> dict[str, np.ndarray]:
    """``{qweight, qzeros, scales}`` of one linear.

    Raises:
      FormatError: not 4 bits, act-order, output features not a multiple of 8, a group size
        that does not divide the input features, scales float16 cannot hold exactly.
    """
    s, (K, N) = parts.scheme, parts.codes.shape
    if s.bits != 4:
        raise FormatError(f"{name}: {s.bits}-bit weights; the AWQ GEMM format holds 4-bit weights only")
    if s.desc_act:
        raise FormatError(f"{name}: act-order (g_idx) weights; AWQ groups input rows contiguously: export it as "
                          "GPTQ, or quantize without act_order")
    if N % 8:
        raise FormatError(f"{name}: {N} output features; AWQ packs 8 per int32, so it must be a multiple of 8")
    if s.group_size != -1 and K % s.group_size:
        raise FormatError(f"{name}: {K} input features is not a multiple of the group size {s.group_size} "
                          "(AWQ has no ragged last group)")
    scales = parts.scale.astype(np.float16)
    if not np.array_equal(scales.astype(np.float32), parts.scale.astype(np.float32)):
        raise FormatError(f"{name}: scales stored as {parts.scale.dtype} are not all exact in float16 (AWQ's scale "
                          "dtype); quantize with scale_dtype='float16'")
    if (parts.zero > 15).any():
        raise FormatError(f"{name}: zero points up to {int(parts.zero.max())}; AWQ's 4-bit qzeros hold 0..15")
    return {"qweight": _pack(parts.codes), "qzeros": _pack(parts.zero), "scales": scales}


def from_tensors(t: dict[str, np.ndarray], scheme: Scheme, shape: tuple[int, int], *, name: str, dtype):
    """A QTensor from one linear's AWQ tensors, value for value what AWQ's kernels compute.

    Raises:
      FormatError: tensors whose shapes or dtypes disagree with ``scheme`` and ``shape``.
    """
    K, N = shape
    gs = scheme.group_size
    if scheme.bits != 4:
        raise FormatError(f"{name}: bits={scheme.bits}; the AWQ GEMM format holds 4-bit weights only")
    if N % 8 or (gs != -1 and (gs < 1 or K % gs)):
        raise FormatError(f"{name}: (in, out) = ({K}, {N}) with group size {gs}: AWQ needs out % 8 == 0 and "
                          "in a multiple of the group size")
    G = 1 if gs == -1 else K // gs
    for k, shp, kind in (("qweight", (K, N // 8), "i"), ("qzeros", (G, N // 8), "i"), ("scales", (G, N), "f")):
        a = t.get(k)
        if a is None:
            raise FormatError(f"{name}.{k}: missing (an AWQ linear stores qweight, qzeros and scales)")
        ok = (a.dtype.kind in "iu" and a.dtype.itemsize == 4) if kind == "i" else (
            a.dtype.kind == "f" or a.dtype.name == "bfloat16")
        if tuple(a.shape) != shp or not ok:
            raise FormatError(f"{name}.{k}: {a.dtype} {tuple(a.shape)}, but 4-bit group size {gs} on an (in, out) = "
                              f"({K}, {N}) linear needs {'int32' if kind == 'i' else 'float'} {shp}")
    zero = _unpack(t["qzeros"]).astype(np.int32)
    return int_qtensor(_unpack(t["qweight"]), t["scales"], zero, None, bits=4, group_size=gs, dtype=dtype,
                       method="awq", name=name)


def quantization_config(schemes: dict[str, Scheme], skipped: list[str]) -> dict:
    """AutoAWQ's ``quantization_config`` (one scheme for every quantized linear).

    Raises:
      FormatError: linears of different bits or group sizes (AWQ configs state one).
    """
    kinds = {(s.bits, s.group_size) for s in schemes.values()}
    if not schemes:
        raise FormatError("no quantized linear to export in the AWQ format")
    if len(kinds) > 1:
        raise FormatError(f"the AWQ config states one bits/group size for every linear; these differ: "
                          f"{sorted(kinds)} (export mixed schemes as GPTQ or compressed-tensors)")
    bits, gs = kinds.pop()
    return {"quant_method": "awq", "bits": bits, "group_size": gs,
            "zero_point": not all(s.sym for s in schemes.values()), "version": "gemm",
            "modules_to_not_convert": sorted({m.split(".")[-1] for m in skipped}) or None}


def parse_config(qc: dict, where: str):
    """``scheme_of(module) -> Scheme | None`` from AutoAWQ's ``quantization_config``.

    Raises:
      FormatError: bits other than 4, a version other than ``gemm``, a bad group size.
    """
    bits = qc.get("bits", qc.get("w_bit"))
    gs = qc.get("group_size", qc.get("q_group_size"))
    version = str(qc.get("version", "gemm")).lower()
    if bits != 4:
        raise FormatError(f"{where}: bits={bits!r}; AWQ checkpoints hold 4-bit weights")
    if version != "gemm":
        raise FormatError(f"{where}: version={version!r}; jquant reads AWQ's GEMM packing ('gemm'), not "
                          "gemv / marlin / exllama repacks")
    if not isinstance(gs, int) or isinstance(gs, bool) or not (gs == -1 or gs >= 1):
        raise FormatError(f"{where}: group_size={gs!r}; valid: -1 or a positive integer")
    skip = qc.get("modules_to_not_convert") or []
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        raise FormatError(f"{where}: modules_to_not_convert must be a list of names, got {skip!r}")
    scheme = Scheme(4, gs, not qc.get("zero_point", True), False)

    def scheme_of(module: str) -> Scheme | None:
        return None if any(m in module for m in skip) else scheme

    return scheme_of
