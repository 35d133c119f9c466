"""Activation and KV-cache quantization: dynamic per-token quantizers placed on the inputs of a
model's linears by rules, and on the keys and values its attention stores.

The quantizer (:func:`fake_quant`) is a quantize–dequantize in float32 along the last axis,
per token (one scale, and with ``symmetric=False`` one integer zero, per row or per group of
``group_size`` values of a row), computed from the values themselves at run time, as QuaRot
(arXiv:2404.00456) and SpinQuant (arXiv:2405.16406) quantize activations and the KV cache:

- symmetric: ``s = clip · max|x| / (2^(b−1) − 1)``, ``q = clamp(round(x / s), −(2^(b−1) − 1),
  2^(b−1) − 1)``, ``x̂ = q·s``;
- asymmetric: ``lo = clip · min(x, 0)``, ``hi = clip · max(x, 0)``, ``s = (hi − lo) / (2^b − 1)``,
  ``z = round(−lo / s)``, ``q = clamp(round(x / s) + z, 0, 2^b − 1)``, ``x̂ = (q − z)·s``;
- a row (group) of zeros gets ``s = 1``.

The gradient passes straight through (STE: ``x + stop_gradient(x̂ − x)``), so the same
quantizer serves learned rotations and QAT. Integer kernels that consume the codes instead of
``x̂`` (``pallas_kernels.int_matmul``) compute the same numbers.

Placing them: :func:`set_quantizers` returns the model with an :class:`ActQuantSpec` on the
input of every linear whose kernel path a rule matches (``layers/3/mlp/down_proj/kernel``),
and optionally one on the keys (after the rotary embedding) and values of every attention
layer. The specs are static attributes of the modules (part of the graph, not of the
parameter state), so a checkpoint restores onto a model of either kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jquant.errors import SpecError, settings_from_dict, short

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ActQuantSpec:
    """Dynamic per-token quantization of an activation ``(..., n)`` along its last axis.

    Attributes:
      bits: 2..8.
      symmetric: symmetric (no zero) or asymmetric with an integer zero.
      group_size: values per scale along the last axis (``None``: the whole row, one scale per
        token; for the KV cache, the whole head). Must divide the axis.
      clip_ratio: the range is shrunk to ``clip_ratio`` times the row's extremes before
        rounding, in ``(0, 1]`` (QuaRot clips activations at 0.9 and the KV cache at 0.95).

    Raises:
      SpecError: a value outside the ranges above.
    """

    bits: int = 8
    symmetric: bool = True
    group_size: int | None = None
    clip_ratio: float = 1.0

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise SpecError(f"activation quantization bits={short(self.bits)}: must be an integer in 2..8")
        if not isinstance(self.symmetric, bool):
            raise SpecError(f"activation quantization symmetric={short(self.symmetric)}: must be true or false")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise SpecError(f"activation quantization group_size={short(self.group_size)}: must be a positive "
                            "integer or null (the whole row)")
        if isinstance(self.clip_ratio, bool) or not isinstance(self.clip_ratio, (int, float)) \
                or not 0.0 < self.clip_ratio <= 1.0:
            raise SpecError(f"activation quantization clip_ratio={short(self.clip_ratio)}: must be in (0, 1]")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> ActQuantSpec:
        return settings_from_dict(cls, d, "activation quantization spec")

    def describe(self) -> str:
        g = "" if self.group_size is None else f" g{self.group_size}"
        clip = "" if self.clip_ratio == 1.0 else f" clip {self.clip_ratio:g}"
        return f"{'sym' if self.symmetric else 'asym'} int{self.bits} per token{g}{clip}"


class TokenCodes(NamedTuple):
    """Per-token codes of an activation ``(..., n)`` (a pytree: what a quantized KV cache holds).

    Attributes:
      codes: ``uint8`` ``(..., n)``, or ``(..., n/2)`` with two 4-bit (or narrower) codes per
        byte (the low nibble holds the even position); symmetric codes are offset by
        ``2^(b−1) − 1`` so they are unsigned.
      scale: ``float32`` ``(..., n/group)``.
      zero: ``uint8`` ``(..., n/group)`` (asymmetric), or ``None``.
    """

    codes: Array
    scale: Array
    zero: Array | None


def _groups(n: int, spec: ActQuantSpec) -> int:
    g = n if spec.group_size is None else spec.group_size
    if n % g:
        raise SpecError(f"activation quantization group_size={g} does not divide the last axis ({n})")
    return g


def quantize_tokens(x: Array, spec: ActQuantSpec) -> TokenCodes:
    """``x`` ``(..., n)`` quantized per token (see the module doc) into :class:`TokenCodes`.

    Raises:
      SpecError: ``spec.group_size`` does not divide ``n``.
    """
    n = x.shape[-1]
    g = _groups(n, spec)
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], n // g, g)
    clip = jnp.float32(spec.clip_ratio)
    if spec.symmetric:
        qmax = 2 ** (spec.bits - 1) - 1
        amax = jnp.max(jnp.abs(xf), axis=-1, keepdims=True) * clip
        s = jnp.where(amax > 0, amax / qmax, 1.0)
        c, z = jnp.clip(jnp.round(xf / s), -qmax, qmax) + qmax, None
    else:
        qmax = 2 ** spec.bits - 1
        lo = jnp.minimum(jnp.min(xf, axis=-1, keepdims=True), 0.0) * clip
        hi = jnp.maximum(jnp.max(xf, axis=-1, keepdims=True), 0.0) * clip
        s = jnp.where(hi > lo, (hi - lo) / qmax, 1.0)
        z = jnp.round(-lo / s)
        c = jnp.clip(jnp.round(xf / s) + z, 0, qmax)
        z = z[..., 0].astype(jnp.uint8)
    c = c.reshape(x.shape).astype(jnp.uint8)
    if spec.bits <= 4 and n % 2 == 0:
        c = c[..., 0::2] | (c[..., 1::2] << 4)
    return TokenCodes(c, s[..., 0], z)


def dequantize_tokens(t: TokenCodes, spec: ActQuantSpec, n: int, dtype=jnp.float32) -> Array:
    """The values ``(..., n)`` of :class:`TokenCodes` (computed in float32, cast to ``dtype``)."""
    c = t.codes
    if c.shape[-1] != n:  # two codes per byte
        c = jnp.stack([c & 0xF, c >> 4], axis=-1).reshape(*c.shape[:-1], n)
    g = _groups(n, spec)
    cf = c.astype(jnp.float32).reshape(*c.shape[:-1], n // g, g)
    off = (2 ** (spec.bits - 1) - 1) if spec.symmetric else t.zero.astype(jnp.float32)[..., None]
    return ((cf - off) * t.scale[..., None]).reshape(*c.shape[:-1], n).astype(dtype)


def fake_quant(x: Array, spec: ActQuantSpec) -> Array:
    """``x`` ``(..., n)`` quantized and dequantized per token (see the module doc); same shape and
    dtype, computed in float32; gradient straight through.

    Raises:
      SpecError: ``spec.group_size`` does not divide ``n``.
    """
    deq = dequantize_tokens(quantize_tokens(x, spec), spec, x.shape[-1], x.dtype)
    return (x + jax.lax.stop_gradient(deq - x)).astype(x.dtype)


def set_quantizers(model, rules: Sequence[tuple[str, ActQuantSpec | None]] = (),
                   kv_cache: ActQuantSpec | None = None):
    """A copy of ``model`` whose linears quantize their inputs and whose attention layers
    quantize the keys and values they attend over (and cache).

    Args:
      model: a :class:`jquant.models.Llama` / :class:`~jquant.models.Gemma3` (float or QTensor
        weights; left unchanged).
      rules: ``(pattern, ActQuantSpec | None)`` over the paths of the linears' kernels
        (``layers/0/self_attn/q_proj/kernel``); the first match wins, ``None`` or no match
        keeps the input in float.
      kv_cache: the quantizer of every attention layer's keys (after the rotary embedding)
        and values, per token and head along ``head_dim`` (``group_size`` within the head),
        or ``None``.
    Returns:
      ``(model, placed)``: the new model and ``{kernel path: spec}`` of the linears given one.
    Raises:
      SpecError: a bad rule or spec; a rule that matches no linear (a misspelt pattern would
        silently quantize nothing); a group size that does not divide an input or head size.
    """
    from jquant.models.layers import Linear
    from jquant.models.llama import Attention
    from jquant.spec import compile_rules, match

    compiled = compile_rules(rules, ActQuantSpec, "activation rule")
    new = nnx.clone(model)
    placed, used = {}, set()
    for path, node in nnx.iter_graph(new):
        kpath = "/".join(map(str, path)) + "/kernel"
        if isinstance(node, Linear):
            i, spec = match(kpath, compiled)
            if i >= 0:
                used.add(i)
            if spec is not None and spec.group_size is not None and node.in_features % spec.group_size:
                raise SpecError(f"{kpath}: activation group_size={spec.group_size} does not divide its "
                                f"{node.in_features} inputs")
            node.input_quant = spec
            if spec is not None:
                placed[kpath] = spec
        elif isinstance(node, Attention):
            hd = node.config.head_dim
            if kv_cache is not None and kv_cache.group_size is not None and hd % kv_cache.group_size:
                raise SpecError(f"KV-cache group_size={kv_cache.group_size} does not divide head_dim={hd}")
            node.kv_quant = kv_cache
    unused = [f"{i} ({compiled[i][0].pattern!r})" for i in range(len(compiled)) if i not in used]
    if unused:
        raise SpecError(f"activation rule(s) {', '.join(unused)} match no linear's kernel path "
                        "(e.g. 'layers/0/mlp/down_proj/kernel')")
    return new, placed
