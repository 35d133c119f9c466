"""The GPTQ checkpoint format (AutoGPTQ, GPTQModel, transformers/optimum; arXiv:2210.17323).

Per quantized linear ``<module>`` of a safetensors checkpoint (PyTorch names, Flax layout
``(in, out)`` = ``(K, N)``):

- ``qweight`` int32 ``(K·bits/32, N)``: codes packed along the input dimension, the low bits
  first; 3-bit codes run across word boundaries (32 codes in 3 words) — jquant's own packing,
  so ``qweight`` is a QTensor's ``codes`` viewed as int32;
- ``qzeros`` int32 ``(G, N·bits/32)``: zero points packed the same way along the output
  dimension. The ``gptq`` (v1) format stores ``zero - 1`` (the historical off-by-one; a zero of
  0 cannot be written), ``gptq_v2`` stores ``zero``;
- ``scales`` float16 ``(G, N)``; ``g_idx`` int32 ``(K,)`` (the group of every input row; not
  ``arange(K) // group_size`` under act-order, ``desc_act``);
- ``bias`` when the linear has one.

``quantize_config.json`` and ``config.json``'s ``quantization_config`` say ``bits``,
``group_size`` (-1: per channel), ``sym``, ``desc_act``, ``checkpoint_format``, and per-module
overrides in GPTQModel's ``dynamic`` (``"+:regex": {...}`` overrides, ``"-:regex"`` not
quantized).
"""

from __future__ import annotations

import re

import numpy as np

from jquant.errors import FormatError
from jquant.interop.base import IntParts, Scheme, contiguous_g_idx, int_qtensor, pack_np, unpack_np

BITS = (2, 3, 4, 8)
CHECKPOINT_FORMATS = ("gptq", "gptq_v2")
SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def pack_factor(bits: int) -> int:
    """Codes per packing block: rows of ``K`` must come in multiples of it (32 for 3 bits)."""
    return 32 if bits == 3 else 32 // bits


def to_tensors(parts: IntParts, name: str, checkpoint_format: str = "gptq") -> dict[str, np.ndarray]:
    """``{qweight, qzeros, scales, g_idx}`` of one linear.

    Raises:
      FormatError: bits GPTQ cannot hold, in/out features not a multiple of the packing block,
        scales that float16 cannot hold exactly, or a zero point of 0 in the v1 format.
    """
    bits, K, N = parts.scheme.bits, *parts.codes.shape
    if bits not in BITS:
        raise FormatError(f"{name}: {bits}-bit weights; the GPTQ format holds {', '.join(map(str, BITS))} bits")
    n = pack_factor(bits)
    if K % n or N % n:
        raise FormatError(f"{name}: shape (in, out) = ({K}, {N}); GPTQ packs {bits}-bit codes in blocks of {n}, so "
                          f"both must be multiples of {n}")
    scales = parts.scale.astype(np.float16)
    if not np.array_equal(scales.astype(np.float32), parts.scale.astype(np.float32)):
        raise FormatError(f"{name}: scales stored as {parts.scale.dtype} are not all exact in float16 (GPTQ's "
                          "scale dtype); quantize with scale_dtype='float16'")
    zero = parts.zero
    if checkpoint_format == "gptq":
        if (zero == 0).any():
            g, o = np.argwhere(zero == 0)[0]
            raise FormatError(f"{name}: zero point 0 (group {g}, column {o}); the GPTQ v1 format stores zero - 1 and "
                              "cannot hold it: export with checkpoint_format 'gptq_v2'")
        zero = zero - 1
    elif checkpoint_format != "gptq_v2":
        raise FormatError(f"checkpoint_format {checkpoint_format!r} unknown; valid: {', '.join(CHECKPOINT_FORMATS)}")
    if (zero >= 2 ** bits).any():
        raise FormatError(f"{name}: zero points up to {int(parts.zero.max())} do not fit the {bits}-bit qzeros of "
                          f"{checkpoint_format}")
    return {"qweight": pack_np(parts.codes, bits, axis=0), "qzeros": pack_np(zero.astype(np.uint8), bits, axis=1),
            "scales": scales, "g_idx": parts.g_idx.astype(np.int32)}


def from_tensors(t: dict[str, np.ndarray], scheme: Scheme, shape: tuple[int, int], *, name: str, dtype,
                 checkpoint_format: str = "gptq"):
    """A QTensor from one linear's GPTQ tensors, value for value what GPTQ's kernels compute.

    Args:
      t: ``qweight``, ``qzeros``, ``scales``, optionally ``g_idx`` (required when
        ``scheme.desc_act``).
      scheme: the linear's bits, group size, sym, desc_act from the config.
      shape: ``(in, out)`` the model config implies.
    Raises:
      FormatError: tensors whose shapes or dtypes disagree with ``scheme`` and ``shape``,
        ``desc_act`` without ``g_idx``, a v1 zero point that reads as ``2**bits`` for 8 bits.
    """
    bits, gs = scheme.bits, scheme.group_size
    K, N = shape
    if bits not in BITS:
        raise FormatError(f"{name}: bits={bits}; the GPTQ format holds {', '.join(map(str, BITS))} bits")
    if gs != -1 and gs < 1:
        raise FormatError(f"{name}: group_size={gs}; valid: -1 (per channel) or a positive integer")
    G = 1 if gs == -1 else -(-K // gs)
    want = {"qweight": ((K * bits // 32, N), "int"), "qzeros": ((G, N * bits // 32), "int"),
            "scales": ((G, N), "float")}
    for k, (shp, kind) in want.items():
        if k not in t:
            raise FormatError(f"{name}.{k}: missing (a GPTQ linear stores {', '.join(want)} and g_idx)")
        a = t[k]
        ok = np.issubdtype(a.dtype, np.integer) if kind == "int" else a.dtype.kind == "f" or a.dtype.name == "bfloat16"
        if tuple(a.shape) != shp or not ok or (kind == "int" and a.dtype.itemsize != 4):
            raise FormatError(f"{name}.{k}: {a.dtype} {tuple(a.shape)}, but {bits}-bit group size {gs} on an "
                              f"(in, out) = ({K}, {N}) linear needs {'int32' if kind == 'int' else 'float'} {shp}")
    if (K * bits) % 32 or (N * bits) % 32:
        raise FormatError(f"{name}: (in, out) = ({K}, {N}) is not a whole number of packed {bits}-bit words")
    g_idx = t.get("g_idx")
    if g_idx is None and scheme.desc_act:
        raise FormatError(f"{name}.g_idx: missing, but desc_act (act-order) is set: the group of each input row is "
                          "unknown")
    if g_idx is not None:
        if tuple(g_idx.shape) != (K,) or not np.issubdtype(g_idx.dtype, np.integer):
            raise FormatError(f"{name}.g_idx: {g_idx.dtype} {tuple(g_idx.shape)}; valid: int32 ({K},)")
        if not scheme.desc_act and not np.array_equal(g_idx, contiguous_g_idx(K, gs)):
            # GPTQ's own kernels disagree here (the torch ones follow g_idx, exllama's ignore it
            # without desc_act): refuse rather than pick one reading silently.
            raise FormatError(f"{name}.g_idx: not the contiguous groups arange({K}) // {gs}, but desc_act is false; "
                              "the checkpoint contradicts itself (set desc_act: true if the rows are act-ordered)")
    zero = unpack_np(t["qzeros"], bits, N, axis=1).astype(np.int32)
    if checkpoint_format == "gptq":
        zero = zero + 1  # v1: zero - 1 was stored
        if bits == 8 and (zero > 255).any():
            raise FormatError(f"{name}.qzeros: a v1 zero point of 255 reads as 256, which 8-bit GPTQ cannot hold")
    elif checkpoint_format != "gptq_v2":
        raise FormatError(f"{name}: checkpoint_format {checkpoint_format!r} unknown; valid: "
                          f"{', '.join(CHECKPOINT_FORMATS)}")
    # qweight is jquant's own packing (the same little-endian bit stream along K): taken as is
    return int_qtensor(None, t["scales"], zero, g_idx, bits=bits, group_size=gs, dtype=dtype, method="gptq",
                       name=name, packed=t["qweight"], shape=(K, N))


# ---------------------------------------------------------------------------------------
# quantization_config
# ---------------------------------------------------------------------------------------
def quantization_config(schemes: dict[str, Scheme], skipped: list[str], checkpoint_format: str,
                        version: str) -> dict:
    """The ``quantization_config`` for modules ``{hf module name: Scheme}``: the commonest
    scheme at the top level, the others (and the linears left in float) in ``dynamic``."""
    from collections import Counter

    if not schemes:
        raise FormatError("no quantized linear to export in the GPTQ format")
    base = Counter(s._replace(desc_act=False) for s in schemes.values()).most_common(1)[0][0]
    desc_act = any(s.desc_act for s in schemes.values())
    dynamic = {}
    for mod, s in schemes.items():
        if s._replace(desc_act=False) != base:
            dynamic[f"+:^{re.escape(mod)}$"] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
    for mod in skipped:
        dynamic[f"-:^{re.escape(mod)}$"] = {}
    cfg = {"quant_method": "gptq", "bits": base.bits, "group_size": base.group_size, "sym": base.sym,
           "desc_act": desc_act, "checkpoint_format": checkpoint_format, "pack_dtype": "int32",
           "lm_head": any(m == "lm_head" for m in schemes), "static_groups": False, "true_sequential": True,
           "damp_percent": 0.01, "meta": {"quantizer": [f"jquant:{version}"]}}
    if dynamic:
        cfg["dynamic"] = dynamic
    return cfg


def parse_config(qc: dict, where: str):
    """``(scheme_of(module) -> Scheme | None, checkpoint_format)`` from a GPTQ
    ``quantization_config``; ``None``: the module is not quantized (a ``-:`` dynamic rule).

    Raises:
      FormatError: missing or invalid ``bits``/``group_size``/``sym``/``desc_act``, an unknown
        ``checkpoint_format``, a ``dynamic`` entry that is not a mapping or regex.
    """
    fmt = qc.get("checkpoint_format", "gptq")
    if fmt not in CHECKPOINT_FORMATS:
        raise FormatError(f"{where}: checkpoint_format {fmt!r}; valid: {', '.join(CHECKPOINT_FORMATS)} "
                          "(marlin and bitblas repacks are not read)")

    def scheme(d: dict, base: Scheme | None, what: str) -> Scheme:
        bits = d.get("bits", base.bits if base else None)
        gs = d.get("group_size", base.group_size if base else -1)
        sym = d.get("sym", base.sym if base else True)
        desc = d.get("desc_act", base.desc_act if base else False)
        if not isinstance(bits, int) or isinstance(bits, bool) or bits not in BITS:
            raise FormatError(f"{what}: bits={bits!r}; valid: {', '.join(map(str, BITS))}")
        if not isinstance(gs, int) or isinstance(gs, bool) or not (gs == -1 or gs >= 1):
            raise FormatError(f"{what}: group_size={gs!r}; valid: -1 (per channel) or a positive integer")
        if not isinstance(sym, bool) or not isinstance(desc, bool):
            raise FormatError(f"{what}: sym={sym!r}, desc_act={desc!r}; valid: true or false")
        return Scheme(bits, gs, sym, desc)

    base = scheme(qc, None, where)
    dynamic = qc.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise FormatError(f"{where}: dynamic must map module regexes to overrides, got {type(dynamic).__name__}")
    rules = []
    for key, over in dynamic.items():
        neg = key.startswith("-:")
        pat = key[2:] if key[:2] in ("+:", "-:") else key
        try:
            rx = re.compile(pat)
        except re.error as e:
            raise FormatError(f"{where}: dynamic key {key!r} is not a regex ({e})") from None
        if not isinstance(over, dict):
            raise FormatError(f"{where}: dynamic[{key!r}] must be a mapping of overrides, got {over!r}")
        rules.append((rx, None if neg else scheme(over, base, f"{where}: dynamic[{key!r}]")))

    def scheme_of(module: str) -> Scheme | None:
        for rx, s in rules:  # GPTQModel: negative rules skip; the first positive match overrides
            if rx.search(module) and s is None:
                return None
        for rx, s in rules:
            if s is not None and rx.search(module):
                return s
        return base

    return scheme_of, fmt
