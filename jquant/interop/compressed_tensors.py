"""The compressed-tensors ``pack-quantized`` format (llm-compressor writes it, vLLM and
transformers load it).

Per quantized linear (PyTorch layout ``(out, in)`` = ``(N, K)`` on disk):

- ``weight_packed`` int32 ``(N, ceil(K·bits/32))``: each output row's codes packed along the
  input dimension as one dense little-endian bit stream (32 codes in ``bits`` words), stored
  as ``code - 2**(bits-1)`` offset back, i.e. the unsigned codes of jquant's own packing;
- ``weight_scale`` ``(N, G)`` (``G = 1`` per channel) in the scale dtype;
- ``weight_zero_point`` int32 ``(ceil(N·bits/32), G)``: asymmetric zero points packed the same
  way along the output dimension (absent when symmetric);
- ``weight_shape`` int64 ``[N, K]``; ``weight_g_idx`` int32 ``(K,)`` in checkpoints written
  with the (since removed) ``actorder: group``: read, never written.

The value is ``(q - zp) * scale`` with signed ``q, zp`` — ``(code - zero) * scale`` in
jquant's unsigned terms. ``quantization_config``: ``quant_method: compressed-tensors``,
``format: pack-quantized``, ``config_groups`` of weight schemes with their ``targets``
(``Linear`` or ``re:`` module regexes), ``ignore``.
"""

from __future__ import annotations

import math
import re

import numpy as np

from jquant import packing
from jquant.errors import FormatError
from jquant.interop.base import IntParts, Scheme, int_qtensor, pack_np, unpack_np

SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")
FORMAT = "pack-quantized"


def _words(length: int, bits: int) -> int:
    return math.ceil(length * bits / 32)


def _fit(words: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Words truncated or zero-padded to ``n`` along ``axis`` (compressed-tensors keeps
    ``ceil(len·bits/32)`` words, jquant whole packing blocks)."""
    have = words.shape[axis]
    if have >= n:
        return np.take(words, np.arange(n), axis=axis)
    pad = [(0, 0)] * words.ndim
    pad[axis] = (0, n - have)
    return np.pad(words, pad)


def to_tensors(parts: IntParts, name: str) -> dict[str, np.ndarray]:
    """``{weight_packed, weight_scale, [weight_zero_point], weight_shape}`` of one linear.

    Raises:
      FormatError: act-order weights (compressed-tensors 0.20 removed ``actorder: group``),
        a group size that does not divide the input features.
    """
    s, (K, N) = parts.scheme, parts.codes.shape
    if s.desc_act:
        raise FormatError(f"{name}: act-order (g_idx) weights; compressed-tensors no longer stores g_idx "
                          "(actorder 'group' was removed): export it as GPTQ, or quantize without act_order")
    if s.group_size != -1 and K % s.group_size:
        raise FormatError(f"{name}: {K} input features is not a multiple of the group size {s.group_size} "
                          "(compressed-tensors has no ragged last group)")
    out = {"weight_packed": np.ascontiguousarray(_fit(pack_np(parts.codes, s.bits, axis=0), _words(K, s.bits), 0).T),
           "weight_scale": np.ascontiguousarray(parts.scale.T),
           "weight_shape": np.array([N, K], np.int64)}
    if not s.sym:
        out["weight_zero_point"] = _fit(pack_np(parts.zero.T.astype(np.uint8), s.bits, axis=0), _words(N, s.bits), 0)
    return out


def from_tensors(t: dict[str, np.ndarray], scheme: Scheme, shape: tuple[int, int], *, name: str, dtype):
    """A QTensor from one linear's pack-quantized tensors, value for value.

    Raises:
      FormatError: tensors whose shapes or dtypes disagree with ``scheme`` and ``shape`` (the
        stored ``weight_shape`` included), a missing zero point of an asymmetric scheme.
    """
    K, N = shape
    bits, gs = scheme.bits, scheme.group_size
    if gs != -1 and (gs < 1 or K % gs):
        raise FormatError(f"{name}: group size {gs} does not divide the {K} input features")
    G = 1 if gs == -1 else K // gs
    need = {"weight_packed": ((N, _words(K, bits)), "i"), "weight_scale": ((N, G), "f")}
    if not scheme.sym:
        need["weight_zero_point"] = ((_words(N, bits), G), "i")
    for k, (shp, kind) in need.items():
        a = t.get(k)
        if a is None:
            raise FormatError(f"{name}.{k}: missing ({'asymmetric ' if not scheme.sym else ''}pack-quantized linears "
                              f"store {', '.join(need)})")
        if kind == "f" and a.ndim == 1 and a.shape == (N,):  # per-channel scales stored flat
            a = t[k] = a.reshape(N, 1)
        if kind == "f" and a.size == 1 and G == 1:  # per-tensor: one scale for every channel
            a = t[k] = np.broadcast_to(a.reshape(1, 1), (N, 1))
        ok = (a.dtype.kind in "iu" and a.dtype.itemsize == 4) if kind == "i" else (
            a.dtype.kind == "f" or a.dtype.name == "bfloat16")
        if tuple(a.shape) != shp or not ok:
            raise FormatError(f"{name}.{k}: {a.dtype} {tuple(a.shape)}, but {bits}-bit "
                              f"{'channel' if gs == -1 else f'group {gs}'} weights of (out, in) = ({N}, {K}) need "
                              f"{'int32' if kind == 'i' else 'float'} {shp}")
    ws = t.get("weight_shape")
    if ws is not None and [int(v) for v in np.asarray(ws).reshape(-1)] != [N, K]:
        raise FormatError(f"{name}.weight_shape: {np.asarray(ws).tolist()}, but the model config implies {[N, K]}")
    words = np.ascontiguousarray(_fit(np.asarray(t["weight_packed"]).T, packing.packed_length(K, bits), 0))
    scale = np.ascontiguousarray(np.asarray(t["weight_scale"]).T)
    if scheme.sym:
        zero = np.full((G, N), 2 ** (bits - 1), np.int32)
    else:
        zw = _fit(np.asarray(t["weight_zero_point"]), packing.packed_length(N, bits), 0)
        zero = unpack_np(zw, bits, N, axis=0).T.astype(np.int32)
    g_idx = t.get("weight_g_idx")
    if g_idx is not None:
        g_idx = np.asarray(g_idx)
        if g_idx.shape != (K,) or g_idx.dtype.kind not in "iu":
            raise FormatError(f"{name}.weight_g_idx: {g_idx.dtype} {g_idx.shape}; valid: int32 ({K},)")
    return int_qtensor(None, scale, zero, g_idx, bits=bits, group_size=gs, dtype=dtype, method="rtn", name=name,
                       packed=words, shape=(K, N))


def _weights_args(s: Scheme, scale_dtype: str) -> dict:
    return {"num_bits": s.bits, "type": "int", "symmetric": s.sym,
            "strategy": "channel" if s.group_size == -1 else "group",
            "group_size": None if s.group_size == -1 else s.group_size, "dynamic": False,
            "scale_dtype": f"torch.{scale_dtype}", **({} if s.sym else {"zp_dtype": "torch.int8"})}


def quantization_config(schemes: dict[str, Scheme], skipped: list[str], scale_dtypes: dict[str, str],
                        version: str) -> dict:
    """The ``quantization_config``: one config group per scheme; when every quantized linear
    shares one scheme it targets ``Linear`` with the float linears in ``ignore``, else each
    group lists its modules as ``re:`` targets."""
    if not schemes:
        raise FormatError("no quantized linear to export in the compressed-tensors format")
    by: dict[tuple, list[str]] = {}
    for mod, s in schemes.items():
        by.setdefault((s, scale_dtypes[mod]), []).append(mod)
    groups = {}
    for i, ((s, sd), mods) in enumerate(sorted(by.items(), key=lambda kv: -len(kv[1]))):
        targets = ["Linear"] if len(by) == 1 else [f"re:^{re.escape(m)}$" for m in mods]
        groups[f"group_{i}"] = {"targets": targets, "weights": _weights_args(s, sd), "input_activations": None,
                                "output_activations": None, "format": FORMAT}
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": groups, "ignore": sorted(skipped), "kv_cache_scheme": None,
            "global_compression_ratio": None, "version": version}


def _match(target: str, module: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], module) is not None
    return target == module or target == "Linear" or module.endswith("." + target)


def parse_config(qc: dict, where: str):
    """``scheme_of(module) -> Scheme | None`` from a compressed-tensors ``quantization_config``
    (integer weight schemes in the pack-quantized format; activation schemes are refused).

    Raises:
      FormatError: another format (``float-quantized``, ``naive-quantized``, ``nvfp4``, …),
        float weights, block strategies, activation quantization, malformed groups.
    """
    fmt = qc.get("format")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise FormatError(f"{where}: config_groups must be a non-empty mapping, got {groups!r}")
    rules = []
    for gname, g in groups.items():
        w = g.get("weights") if isinstance(g, dict) else None
        gfmt = (g.get("format") if isinstance(g, dict) else None) or fmt
        what = f"{where}: config_groups.{gname}"
        if gfmt != FORMAT:
            raise FormatError(f"{what}: format {gfmt!r}; jquant reads {FORMAT!r} (integer weights)")
        if not isinstance(w, dict):
            raise FormatError(f"{what}: weights must be a mapping of quantization args, got {w!r}")
        if g.get("input_activations") or g.get("output_activations"):
            raise FormatError(f"{what}: quantizes activations; jquant reads weight-only pack-quantized checkpoints")
        bits, typ, sym = w.get("num_bits", 8), w.get("type", "int"), w.get("symmetric", True)
        strategy, gs = w.get("strategy"), w.get("group_size")
        if typ != "int" or not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 8:
            raise FormatError(f"{what}: weights {typ} {bits!r}-bit; valid: int, 1..8 bits")
        if not isinstance(sym, bool):
            raise FormatError(f"{what}: symmetric={sym!r}; valid: true or false")
        if strategy in ("channel", "tensor"):
            gs = -1
        elif strategy == "group":
            if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
                raise FormatError(f"{what}: group strategy with group_size={gs!r}; valid: a positive integer")
        else:
            raise FormatError(f"{what}: strategy {strategy!r}; valid: group, channel, tensor")
        targets = g.get("targets")
        if not isinstance(targets, list) or not all(isinstance(x, str) for x in targets):
            raise FormatError(f"{what}: targets must be a list of names, got {targets!r}")
        for x in targets:
            if x.startswith("re:"):
                try:
                    re.compile(x[3:])
                except re.error as e:
                    raise FormatError(f"{what}: target {x!r} is not a regex ({e})") from None
        rules.append((targets, Scheme(bits, gs, sym, bool(w.get("actorder") == "group"))))
    ignore = qc.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(x, str) for x in ignore):
        raise FormatError(f"{where}: ignore must be a list of names, got {ignore!r}")

    def scheme_of(module: str) -> Scheme | None:
        if any(_match(x, module) and x != "Linear" for x in ignore):
            return None
        specific = [s for targets, s in rules if any(_match(x, module) and x != "Linear" for x in targets)]
        if specific:
            return specific[0]
        generic = [s for targets, s in rules if "Linear" in targets]
        return generic[0] if generic else None

    return scheme_of
