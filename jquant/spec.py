"""``QuantSpec`` (how to quantize one leaf) and rules (which leaves get which spec).

Rules are an ordered list of ``(pattern, spec | None)``. A leaf's path is its tree key
path joined by ``/`` (``layers/0/self_attn/q_proj/kernel``; NNX ``State``'s trailing
``value`` attribute is dropped, so the same rules serve NNX and linen trees). The first
pattern that ``re.search``-es the path wins; ``None`` keeps the leaf in float; a leaf no
rule matches stays float.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from jquant.errors import SpecError
from jquant.formats import BLOCKFLOAT_FORMATS, FIXED_BITS, FORMATS, GGML_FORMATS, RANGE_FORMATS, Grid

GRANULARITIES = ("tensor", "channel", "group")
RANGES = ("minmax", "percentile", "mse", "kl")
ZERO_TYPES = ("int", "float")
SCALE_DTYPES = ("float16", "bfloat16", "float32")


_FIELD_TYPES = {"format": str, "bits": int, "granularity": str, "group_size": int, "symmetric": bool,
                "full_range": bool, "zero_type": str, "range": str, "percentile": float, "mse_grid": int,
                "mse_max_shrink": float, "mse_norm": float, "kl_bins": int, "kl_candidates": int, "method": str,
                "scale_dtype": str, "axis": int, "word_bits": int}
_TYPE_NAMES = {str: "a string", int: "an integer", bool: "a bool (true/false)", float: "a number"}


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How to quantize one weight. Validates itself on construction.

    Attributes:
      format: ``int``, ``nf4``, ``fp4_e2m1``, ``fp8_e4m3``, ``fp8_e5m2``, ``binary``, ``ternary``,
        ``bcq`` (binary-coding quantization, method ``bcq``), or a
        GGUF block type (``q4_0 q4_1 q5_0 q5_1 q8_0 q2_k q3_k q4_k q5_k q6_k``, method ``kquant``),
        which fixes bits, blocks and zero itself: granularity, group_size, symmetric and
        zero_type are then ignored; or a block-scaled float (``mxfp4 mxfp8_e4m3 mxfp8_e5m2 nvfp4``,
        method ``blockfloat``), likewise fixed by its format.
      bits: code width (1–8) for ``int``, number of bit planes (1–4) for ``bcq``; fixed by the
        other formats (may be left None).
      granularity: ``tensor`` (one scale), ``channel`` (one per output column, i.e. per slice
        across the reduction axis) or ``group`` (``group_size`` consecutive inputs share one).
      group_size: inputs per group along ``axis`` (``group`` only); a ragged last group is fine.
      symmetric: absmax grid around 0 (no zero stored) vs. an asymmetric grid.
      full_range: symmetric ``int`` only: use ``-2^(b-1)`` too (GGUF Q4_0 style), scale set by
        the signed extreme; otherwise the restricted range ``±(2^(b-1)-1)``.
      zero_type: asymmetric only: ``int`` zero point (0 exactly on the grid) or ``float`` minimum.
      range: range calibration: ``minmax``, ``percentile``, ``mse``, ``kl``.
      percentile, mse_grid, mse_max_shrink, mse_norm, kl_bins, kl_candidates: its options.
      method: the quantizer, a name in :mod:`jquant.quantizers` (``rtn``, ``gptq``, ``hqq``, ...).
      options: method options, a mapping (stored as sorted pairs so the spec stays hashable);
        checked against the method's options dataclass (names, types, ranges) on construction.
      scale_dtype: storage dtype of scales and float minima; default float16, but float32 for
        the FP8 formats (absmax/448 and absmax/57344 fall below float16's normal range for
        typical weights).
      axis: the reduction (input) axis groups run along; 0 for Flax kernels ``(in, out)``.
      word_bits: packing word, 32 (uint32) or 8 (uint8).
    """

    format: str = "int"
    bits: int | None = None
    granularity: str = "group"
    group_size: int = 128
    symmetric: bool = True
    full_range: bool = False
    zero_type: str = "int"
    range: str = "minmax"
    percentile: float = 99.9
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_norm: float = 2.4
    kl_bins: int = 2048
    kl_candidates: int = 128
    method: str = "rtn"
    options: Any = ()
    scale_dtype: str | None = None
    axis: int = 0
    word_bits: int = 32

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
        # Field types first: a string "false" must not pass for a bool, nor 2.5 for an int.
        for name, kind in _FIELD_TYPES.items():
            v = getattr(self, name)
            if v is None and name in ("bits", "scale_dtype"):
                continue
            if kind is int and isinstance(v, np.integer):
                set_(name, int(v))
                continue
            if kind is float and isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
                if not math.isfinite(float(v)):
                    raise SpecError(f"{name} must be a finite number, got {v!r}")
                continue
            if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                raise SpecError(f"{name} must be {_TYPE_NAMES[kind]}, got {v!r} ({type(v).__name__})")
        if self.format not in FORMATS:
            raise SpecError(f"unknown format {self.format!r}; valid: {', '.join(FORMATS)}")
        if self.format in FIXED_BITS:
            fixed = FIXED_BITS[self.format]
            if self.bits not in (None, fixed):
                raise SpecError(f"format {self.format!r} has {fixed} bits, got bits={self.bits!r}")
            set_("bits", fixed)
        elif self.bits is None:
            set_("bits", 4)
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 8:
            raise SpecError(f"bits must be an integer in 1..8, got {self.bits!r}")
        if self.format == "int" and self.symmetric and self.bits < 2:
            raise SpecError("a symmetric int grid needs bits >= 2 (1 bit: use format='binary' or symmetric=False)")
        if self.granularity not in GRANULARITIES:
            raise SpecError(f"unknown granularity {self.granularity!r}; valid: {', '.join(GRANULARITIES)}")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 1:
            raise SpecError(f"group_size must be an integer >= 1, got {self.group_size!r}")
        block_format = self.format in GGML_FORMATS + BLOCKFLOAT_FORMATS  # the type fixes scale and zero
        if self.format != "int" and not self.symmetric and not block_format:
            raise SpecError(f"format {self.format!r} is symmetric (absmax or mean-abs scaled); use symmetric=True")
        if self.full_range and not (self.format == "int" and self.symmetric):
            raise SpecError("full_range applies to symmetric int grids only")
        if self.zero_type not in ZERO_TYPES:
            raise SpecError(f"unknown zero_type {self.zero_type!r}; valid: {', '.join(ZERO_TYPES)}")
        if self.range not in RANGES:
            raise SpecError(f"unknown range calibration {self.range!r}; valid: {', '.join(RANGES)}")
        if self.range != "minmax" and self.format not in RANGE_FORMATS:
            how = "its blocks' own scale rule" if block_format or self.format == "bcq" else "mean-abs"
            raise SpecError(f"format {self.format!r} sets its scale by {how}; range={self.range!r} does not apply")
        if not 0.0 < float(self.percentile) <= 100.0:
            raise SpecError(f"percentile must be in (0, 100], got {self.percentile!r}")
        if self.mse_grid < 1 or not 0.0 < self.mse_max_shrink < 1.0 or self.mse_norm <= 0:
            raise SpecError("mse options need mse_grid >= 1, 0 < mse_max_shrink < 1, mse_norm > 0; got "
                            f"{self.mse_grid}, {self.mse_max_shrink}, {self.mse_norm}")
        if self.kl_bins < 2 or self.kl_candidates < 1:
            raise SpecError(f"kl options need kl_bins >= 2 and kl_candidates >= 1, got {self.kl_bins}, {self.kl_candidates}")
        if not isinstance(self.method, str):
            raise SpecError(f"method must be a string, got {self.method!r}")
        if self.scale_dtype is None:
            set_("scale_dtype", "float32" if self.format.startswith("fp8") else "float16")
        if self.scale_dtype not in SCALE_DTYPES:
            raise SpecError(f"unknown scale_dtype {self.scale_dtype!r}; valid: {', '.join(SCALE_DTYPES)}")
        if self.word_bits not in (8, 32):
            raise SpecError(f"word_bits must be 8 or 32, got {self.word_bits!r}")
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise SpecError(f"axis must be an integer, got {self.axis!r}")
        opts = self.options
        if isinstance(opts, Mapping):
            opts = tuple(sorted(opts.items()))
        elif not (isinstance(opts, (tuple, list)) and all(isinstance(o, (tuple, list)) and len(o) == 2
                                                          and isinstance(o[0], str) for o in opts)):
            raise SpecError(f"method options must be a mapping of option names to values, got {self.options!r}")
        try:
            hash(tuple(opts))
        except TypeError as e:
            raise SpecError(f"method options must be hashable values, got {self.options!r}") from e
        set_("options", tuple(opts))
        from jquant.quantizers import registry  # the methods import this module

        registry.check_spec(self)

    @property
    def grid(self) -> Grid:
        return Grid(self.format, self.bits, self.symmetric, self.full_range, self.zero_type, self.scale_dtype)

    @property
    def option_dict(self) -> dict:
        return dict(self.options)

    def describe(self) -> str:
        """A short human name, e.g. ``int4 g128 asym`` or ``nf4 channel``."""
        name = f"{self.format}{self.bits}" if self.format in ("int", "bcq") else self.format
        if self.format in GGML_FORMATS + BLOCKFLOAT_FORMATS:  # the block type fixes granularity and zero
            return " ".join([self.method, name] if self.method != "rtn" else [name])
        gran = {"group": f"g{self.group_size}", "channel": "channel", "tensor": "tensor"}[self.granularity]
        parts = [name, gran]
        if self.format == "int":
            parts.append("sym" if self.symmetric else ("asym" if self.zero_type == "int" else "asym-fmin"))
        if self.range != "minmax":
            parts.append(self.range)
        if self.method != "rtn":
            parts.insert(0, self.method)
        return " ".join(parts)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantSpec:
        """Build from a plain mapping (a recipe entry); unknown keys are an error."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise SpecError(f"unknown QuantSpec field(s) {sorted(unknown)}; valid: {sorted(fields)}")
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["options"] = dict(self.options)
        return d


Rule = tuple[str, "QuantSpec | None"]


def path_str(keypath: Sequence[Any]) -> str:
    """``/``-joined string of a JAX key path; NNX's trailing ``.value`` is dropped."""
    parts = []
    for k in keypath:
        if isinstance(k, jax.tree_util.DictKey):
            parts.append(str(k.key))
        elif isinstance(k, jax.tree_util.SequenceKey):
            parts.append(str(k.idx))
        elif isinstance(k, jax.tree_util.GetAttrKey):
            parts.append(k.name)
        elif isinstance(k, jax.tree_util.FlattenedIndexKey):
            parts.append(str(k.key))
        else:
            parts.append(str(k))
    if parts and parts[-1] == "value":
        parts = parts[:-1]
    return "/".join(parts)


def compile_rules(rules: Sequence[Rule], spec_type: type = QuantSpec,
                  what: str = "rule") -> list[tuple[re.Pattern, Any]]:
    """Validate ``(pattern, spec | None)`` rules and compile their patterns; ``spec_type`` is
    the class a spec must be (``QuantSpec`` for weights, ``ActQuantSpec`` for activations),
    ``what`` names a rule in the errors."""
    if isinstance(rules, spec_type):
        raise SpecError("rules must be a list of (pattern, spec) pairs; for one spec everywhere use [('.*', spec)]")
    out = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
            raise SpecError(f"{what} {i} must be a (pattern, spec | None) pair, got {rule!r}")
        pat, spec = rule
        if spec is not None and not isinstance(spec, spec_type):
            raise SpecError(f"{what} {i} ({pat!r}): expected a {spec_type.__name__} or None, got {type(spec).__name__}")
        try:
            out.append((re.compile(pat), spec))
        except (re.error, TypeError) as e:  # TypeError: a pattern that is not a string
            raise SpecError(f"{what} {i}: invalid pattern {pat!r}: {e}") from e
    return out


def match(path: str, compiled) -> tuple[int, QuantSpec | None]:
    """Index and spec of the first rule matching ``path``; ``(-1, None)`` when none does."""
    for i, (pat, spec) in enumerate(compiled):
        if pat.search(path):
            return i, spec
    return -1, None
