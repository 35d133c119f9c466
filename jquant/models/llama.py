"""A Flax NNX Llama-family decoder (Llama 1-3, SmolLM, Mistral, Qwen2) that accepts QTensor weights.

Architecture (arXiv:2302.13971, arXiv:2307.09288): token embedding, ``num_hidden_layers``
pre-norm decoder blocks (RMSNorm → grouped-query attention with rotary embeddings
(arXiv:2104.09864, arXiv:2305.13245) → residual; RMSNorm → SwiGLU MLP (arXiv:2002.05202) →
residual), final RMSNorm, lm_head (or the tied embedding). Numerics follow Hugging Face
``transformers`` (``LlamaForCausalLM``): RMSNorm in float32, rotary embeddings in the
``rotate_half`` convention, softmax in float32.

Every linear weight is a Flax kernel ``(in_features, out_features)`` (Hugging Face's
``(out, in)`` is transposed once by the converters) and may be a float array or a
:class:`jquant.qtensor.QTensor`: every matmul goes through :func:`jquant.models.layers.dense`.

Parameter paths (``nnx.state(model)``), named as in Hugging Face so quantization rules read
naturally::

    embed_tokens/embedding                                   (vocab, hidden)
    layers/<i>/input_layernorm/scale                         (hidden,)
    layers/<i>/self_attn/{q,k,v}_proj/kernel                 (hidden, heads*head_dim) / (hidden, kv_heads*head_dim)
    layers/<i>/self_attn/{q,k,v}_proj/bias                   only with attention_bias (Qwen2)
    layers/<i>/self_attn/o_proj/kernel                       (heads*head_dim, hidden)
    layers/<i>/post_attention_layernorm/scale                (hidden,)
    layers/<i>/mlp/{gate,up}_proj/kernel                     (hidden, intermediate)
    layers/<i>/mlp/down_proj/kernel                          (intermediate, hidden)
    norm/scale                                               (hidden,)
    lm_head/kernel                                           (hidden, vocab), absent when tied

Block-wise access for calibration: ``model.embed(tokens)``, ``model.layers[i](h, positions)``
and ``model.head(h)`` compose to the full forward; ``model.layers[i].forward_with_inputs(h)``
also returns the input of every linear of the block.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.core import FrozenDict

from jquant.errors import CheckpointError, UnsupportedModelError
from jquant.models._values import flag, positive_float, short, size, token_id
from jquant.models.layers import Embed, Linear, RMSNorm
from pallas_kernels.dispatch import get_backend, use_backend

Array = jax.Array

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
_HF_ARCHITECTURE = {v: k for k, v in _ARCHITECTURES.items()}


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------

def _check_rope_scaling(rs) -> None:
    """The numbers of a ``rope_scaling`` mapping read from a file: finite positive floats."""
    if rs is None:
        return
    if not isinstance(rs, Mapping):
        raise CheckpointError(f"rope_scaling={short(rs)}: must be a mapping or null")
    rope_type = rs.get("rope_type", rs.get("type", "default"))
    if not isinstance(rope_type, str):
        raise CheckpointError(f"rope_scaling rope_type={short(rope_type)}: must be a string")
    for key in ("factor", "low_freq_factor", "high_freq_factor", "partial_rotary_factor"):
        if rs.get(key) is not None:
            positive_float(rs[key], f"rope_scaling {key}")
    if rs.get("original_max_position_embeddings") is not None:
        size(rs["original_max_position_embeddings"], "rope_scaling original_max_position_embeddings")
    if rope_type == "llama3" and rs.get("low_freq_factor") == rs.get("high_freq_factor") is not None:
        raise CheckpointError(f"rope_scaling low_freq_factor = high_freq_factor = {rs['low_freq_factor']}: "
                              "llama3 scaling needs them to differ")


def _check_freq_factors(factors, head_dim: int) -> tuple[float, ...]:
    """``factors`` as ``head_dim/2`` float32 values in a tuple, or UnsupportedModelError."""
    n = head_dim // 2
    what = f"LlamaConfig.rope_freq_factors={short(factors)}"
    try:
        arr = np.asarray(factors, dtype=np.float64)
    except (TypeError, ValueError):
        raise UnsupportedModelError(f"{what}: must be {n} (head_dim/2) finite positive numbers") from None
    if arr.shape != (n,):
        raise UnsupportedModelError(f"{what}: has shape {arr.shape}; must be {n} (head_dim/2) numbers")
    with np.errstate(over="ignore"):
        arr = arr.astype(np.float32)
    bad = np.flatnonzero(~(np.isfinite(arr) & (arr > 0)))
    if bad.size:
        raise UnsupportedModelError(f"{what}: value {bad[0]} is {arr[bad[0]]} in float32; every factor divides a "
                                    "rotary frequency and must be a finite positive float32 number")
    return tuple(float(x) for x in arr)


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Hyper-parameters of a Llama-family decoder. Frozen, hashable, validated on construction.

    Attributes:
      vocab_size, hidden_size, intermediate_size, num_hidden_layers, num_attention_heads:
        the usual sizes.
      num_key_value_heads: KV heads for grouped-query attention (default: ``num_attention_heads``).
      head_dim: per-head size (default: ``hidden_size // num_attention_heads``).
      rms_norm_eps: RMSNorm epsilon.
      rope_theta: rotary base.
      rope_scaling: ``None`` or a mapping with ``rope_type`` in ``"default"``, ``"linear"``
        (``factor``), ``"llama3"`` (``factor``, ``low_freq_factor``, ``high_freq_factor``,
        ``original_max_position_embeddings``). Stored as a ``FrozenDict`` so the config hashes.
      rope_freq_factors: ``None`` or ``head_dim/2`` finite positive numbers, kept as a tuple of
        float32 values (so the config hashes): rotary pair ``i`` turns at ``inv_freq[i] /
        rope_freq_factors[i]``. This is llama.cpp's ``rope_freqs.weight`` (the ``freq_factors`` of
        ``ggml_rope_ext``), in which its converter stores Llama 3.1+ ``llama3`` scaling. With
        ``linear`` scaling both divide, as in llama.cpp; with ``llama3`` scaling it is refused (the
        same rescaling would be applied twice). See :func:`rope_inv_freq`.
      max_position_embeddings: the context the model was trained for (informational; caches
        are sized by the caller).
      tie_word_embeddings: logits are ``h @ embedding.T`` and there is no ``lm_head``.
      attention_bias: q/k/v projections have biases (Qwen2; Llama with ``attention_bias``).
      attention_out_bias: o_proj has a bias (Llama with ``attention_bias``; not Qwen2).
      mlp_bias: gate/up/down projections have biases (Llama ``mlp_bias``).
      sliding_window: attend only to the last ``sliding_window`` positions (Mistral), or ``None``.
      model_type: ``"llama"``, ``"mistral"`` or ``"qwen2"`` (kept for export).
      bos_token_id, eos_token_id: kept for export and generation.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: Mapping[str, Any] | None = None
    rope_freq_factors: tuple[float, ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None

    def __post_init__(self):
        set_ = functools.partial(object.__setattr__, self)
        if self.num_key_value_heads is None:
            set_("num_key_value_heads", self.num_attention_heads)
        if self.head_dim is None:
            set_("head_dim", self.hidden_size // max(self.num_attention_heads, 1))
        if isinstance(self.eos_token_id, list):
            set_("eos_token_id", tuple(self.eos_token_id))
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
                raise UnsupportedModelError(f"LlamaConfig.{name}={v!r}: must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"LlamaConfig: num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"LlamaConfig.head_dim={self.head_dim}: rotary embeddings need an even head_dim")
        if self.model_type not in self.MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {self.model_type!r} is not supported by {type(self).__name__}; supported: "
                f"{', '.join(self.MODEL_TYPES)}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise UnsupportedModelError(f"LlamaConfig.sliding_window={self.sliding_window}: must be positive or None")
        rs = self.rope_scaling
        if rs is not None:
            rs = dict(rs)
            rope_type = rs.pop("rope_type", rs.pop("type", "default"))
            rs.pop("rope_theta", None)
            if rope_type not in SUPPORTED_ROPE_TYPES:
                raise UnsupportedModelError(
                    f"rope_scaling rope_type {rope_type!r} is not supported; supported: "
                    f"{', '.join(SUPPORTED_ROPE_TYPES)}")
            if float(rs.get("partial_rotary_factor", 1.0)) != 1.0:
                raise UnsupportedModelError(
                    f"rope_scaling partial_rotary_factor={rs['partial_rotary_factor']}: only 1.0 is supported")
            rs.pop("partial_rotary_factor", None)
            if rope_type == "default":
                rs = None
            else:
                needed = {"linear": ("factor",),
                          "llama3": ("factor", "low_freq_factor", "high_freq_factor")}[rope_type]
                missing = [k for k in needed if k not in rs]
                if missing:
                    raise UnsupportedModelError(
                        f"rope_scaling of type {rope_type!r} lacks {', '.join(missing)}")
                if rope_type == "llama3":
                    rs.setdefault("original_max_position_embeddings", self.max_position_embeddings)
                rs = FrozenDict({"rope_type": rope_type, **rs})
        set_("rope_scaling", rs)
        if self.rope_freq_factors is not None:
            set_("rope_freq_factors", _check_freq_factors(self.rope_freq_factors, self.head_dim))
            if rs is not None and rs["rope_type"] == "llama3":
                raise UnsupportedModelError(
                    "LlamaConfig: rope_freq_factors together with rope_scaling of type 'llama3' is not supported "
                    "(llama.cpp stores llama3 scaling as the factors; applying both rescales twice): give one of them")

    # What the shared modules ask a config (a family's config class overrides these).
    MODEL_TYPES = SUPPORTED_MODEL_TYPES
    HF_ARCHITECTURE = None  # config.json "architectures" (None: by model_type)
    hidden_act = "silu"  # the gated MLP's activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" (GeGLU)
    norm_unit_offset = False  # RMSNorm weight is 1 + scale (Gemma)
    qk_norm = False  # RMSNorm over each query and key head before the rotary embedding (Gemma 3)

    @property
    def num_kv_groups(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def query_scale(self) -> float:
        """The factor of the attention scores ``q·k``: ``head_dim ** -0.5``."""
        return 1.0 / math.sqrt(self.head_dim)

    @property
    def embed_scale(self) -> float | None:
        """The factor of the token embeddings (``None``: none)."""
        return None

    @property
    def model_class(self) -> type:
        """The model this config describes."""
        return Llama

    def layer_config(self, layer: int) -> LlamaConfig:
        """The config as layer ``layer``'s attention sees it (its sliding window and rotary
        settings); every layer of a Llama-family model is the same."""
        return self

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> LlamaConfig:
        """Build a config from a Hugging Face ``config.json`` dict.

        Accepts ``model_type`` ``llama`` (incl. SmolLM), ``mistral`` and ``qwen2``, with the
        rotary settings either as ``rope_theta`` + ``rope_scaling`` (transformers 4) or as
        ``rope_parameters`` (transformers 5).

        Raises:
          UnsupportedModelError: another ``model_type``, an activation other than SiLU, an
            unsupported rope type, or Qwen2 sliding-window layers.
          CheckpointError: a value that no model can have (a zero, negative or non-integer size,
            a string where a boolean belongs, a non-finite float), naming the key and value.
          KeyError: a required key is missing (``read_config`` turns it into a CheckpointError).
        """
        if not isinstance(d, Mapping):
            raise CheckpointError(f"config must be a JSON object (mapping), got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type is None:
            archs = d.get("architectures") or []
            archs = [a for a in archs if isinstance(a, str) and a in _ARCHITECTURES] if isinstance(archs, list) else []
            model_type = _ARCHITECTURES[archs[0]] if archs else None
        if not isinstance(model_type, str) or model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model_type {short(model_type)} (architectures {short(d.get('architectures'))}) is not supported; "
                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}, gemma3_text")
        act = d.get("hidden_act", d.get("hidden_activation", "silu"))
        if act not in ("silu", "swish"):
            raise UnsupportedModelError(f"{model_type}: hidden_act {short(act)} is not supported; supported: silu")

        rope_theta = d.get("rope_theta")
        rope_scaling = d.get("rope_scaling")
        rp = d.get("rope_parameters")
        if rp is not None and not isinstance(rp, Mapping):
            raise CheckpointError(f"rope_parameters={short(rp)}: must be a mapping or null")
        if isinstance(rp, Mapping):
            rp = dict(rp)
            rope_theta = rp.pop("rope_theta", rope_theta)
            rope_scaling = rp if rp else rope_scaling
        if rope_theta is None:
            rope_theta = 10000.0
        _check_rope_scaling(rope_scaling)

        def opt(key, check, default):
            return default if d.get(key) is None else check(d[key], key)

        hidden = size(d["hidden_size"], "hidden_size")
        heads = size(d["num_attention_heads"], "num_attention_heads")
        if d.get("head_dim") is None and hidden % heads:
            raise CheckpointError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads} "
                                  "(and head_dim is absent)")
        kw = dict(
            vocab_size=size(d["vocab_size"], "vocab_size"),
            hidden_size=hidden,
            intermediate_size=size(d["intermediate_size"], "intermediate_size"),
            num_hidden_layers=size(d["num_hidden_layers"], "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=opt("num_key_value_heads", size, heads),
            head_dim=opt("head_dim", size, hidden // heads),
            rms_norm_eps=opt("rms_norm_eps", positive_float, 1e-6),
            rope_theta=positive_float(rope_theta, "rope_theta"),
            rope_scaling=rope_scaling,
            max_position_embeddings=opt("max_position_embeddings", size, 2048),
            tie_word_embeddings=opt("tie_word_embeddings", flag, False),
            model_type=model_type,
            bos_token_id=token_id(d.get("bos_token_id"), "bos_token_id"),
            eos_token_id=token_id(d.get("eos_token_id"), "eos_token_id"),
        )
        if model_type == "llama":
            kw["attention_bias"] = kw["attention_out_bias"] = opt("attention_bias", flag, False)
            kw["mlp_bias"] = opt("mlp_bias", flag, False)
        elif model_type == "mistral":
            kw["sliding_window"] = opt("sliding_window", size, None)
        elif model_type == "qwen2":
            kw["attention_bias"] = True
            layer_types = d.get("layer_types") or []
            if not isinstance(layer_types, list):
                raise CheckpointError(f"layer_types={short(layer_types)}: must be a list")
            sliding = opt("use_sliding_window", flag, False) or any(t == "sliding_attention" for t in layer_types)
            if sliding:
                raise UnsupportedModelError(
                    "qwen2: use_sliding_window=True (per-layer sliding-window attention) is not supported")
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict (``rope_theta``/``rope_scaling`` form).

        ``rope_freq_factors`` have no ``config.json`` field: factors that are all 1 are left out,
        others are written as the ``llama3`` ``rope_scaling`` that reproduces them (see
        :func:`_llama3_from_freq_factors`).

        Raises:
          UnsupportedModelError: ``rope_freq_factors`` that no ``llama3`` scaling reproduces to
            float32 precision, or that come with ``linear`` scaling (config.json would describe
            another model).
        """
        d: dict[str, Any] = {
            "architectures": [self.HF_ARCHITECTURE or _HF_ARCHITECTURE[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": _hf_rope_scaling(self),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id,
            "torch_dtype": "float32",
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.attention_bias
            d["mlp_bias"] = self.mlp_bias
        elif self.model_type == "mistral":
            d["sliding_window"] = self.sliding_window
        elif self.model_type == "qwen2":
            d["use_sliding_window"] = False
        return d


# --------------------------------------------------------------------------------------------
# Rotary embeddings
# --------------------------------------------------------------------------------------------

def rope_inv_freq(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies ``Float[np.ndarray, "head_dim/2"]`` (float32), as HF computes them.

    ``default``: ``1 / theta**(2i/d)``; ``linear``: divided by ``factor``; ``llama3``: the
    Llama 3.1 piecewise scaling (long wavelengths divided by ``factor``, short ones kept, a
    smooth interpolation between). ``config.rope_freq_factors`` (llama.cpp's ``rope_freqs``)
    divide the default ones first, in float32, as ggml's rope does (``theta_i = p *
    base**(-2i/d) / freq_factors[i]``, then times ``1/factor`` for ``linear``).
    """
    return _rope_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling, config.rope_freq_factors)


@functools.lru_cache(maxsize=64)
def _rope_inv_freq(dim: int, theta: float, scaling: FrozenDict | None,
                   freq_factors: tuple[float, ...] | None = None) -> np.ndarray:
    exponent = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv_freq = (np.float32(1.0) / (np.float32(theta) ** exponent)).astype(np.float32)
    if freq_factors is not None:  # never with llama3 scaling (LlamaConfig refuses it)
        inv_freq = (inv_freq / np.asarray(freq_factors, dtype=np.float32)).astype(np.float32)
    if scaling is None:
        return inv_freq
    rope_type = scaling["rope_type"]
    factor = float(scaling["factor"])
    if rope_type == "linear":
        return (inv_freq / np.float32(factor)).astype(np.float32)
    # llama3
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old_ctx = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = np.float32(2 * math.pi) / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / np.float32(factor), inv_freq).astype(np.float32)
    smooth = ((old_ctx / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


# Meta's Llama 3.1-3.3 values, which llama.cpp's converter also assumes when config.json lacks them.
_META_LLAMA3 = (1.0, 4.0, 8192)


def _hf_rope_scaling(c: LlamaConfig) -> dict[str, Any] | None:
    """``config.json``'s ``rope_scaling`` for ``c`` (see :meth:`LlamaConfig.to_hf_dict`)."""
    rs = None if c.rope_scaling is None else dict(c.rope_scaling)
    if c.rope_freq_factors is None or all(f == 1.0 for f in c.rope_freq_factors):
        return rs  # dividing by 1 is exact
    if rs is not None:
        raise UnsupportedModelError(
            f"rope_freq_factors={short(c.rope_freq_factors)} with rope_scaling {short(rs)}: a Hugging Face "
            "config.json cannot express both; export refused")
    return _llama3_from_freq_factors(c)


def _llama3_from_freq_factors(c: LlamaConfig) -> dict[str, Any]:
    """The ``llama3`` ``rope_scaling`` whose inverse frequencies equal ``c``'s to float32 precision.

    llama.cpp's converter turns ``llama3`` scaling into per-pair factors (1 for short wavelengths,
    ``factor`` for long ones, ``1 / ((1 - s) / factor + s)`` between) and keeps none of its
    parameters; they are recovered here. ``factor`` is the largest factor. Tried in turn: Meta's
    Llama 3.1-3.3 values (``low_freq_factor`` 1, ``high_freq_factor`` 4,
    ``original_max_position_embeddings`` 8192), then the values fitted to the factors between 1
    and ``factor`` (at least two needed): ``s`` is linear in ``1/wavelen``, which gives both
    boundary wavelengths; ``low_freq_factor`` is taken as 1 (only the ratios to the original
    context matter), the rest rounded to the fewest digits that still reproduce the factors.
    A candidate is accepted when :func:`rope_inv_freq` of it is within :func:`_llama3_rtol` of
    ``rope_inv_freq(c)``: the float32 rounding of the formula, as transformers and llama.cpp
    disagree for the same parameters.

    Raises:
      UnsupportedModelError: no candidate reproduces the factors.
    """
    ff = np.asarray(c.rope_freq_factors, dtype=np.float64)
    inv_freq = _rope_inv_freq(c.head_dim, c.rope_theta, None)
    want = _rope_inv_freq(c.head_dim, c.rope_theta, None, c.rope_freq_factors)
    factor = float(np.format_float_positional(np.float32(ff.max()), unique=True))  # 7.9, not 7.900000095…
    for low, high, old in _llama3_candidates(ff, inv_freq):
        rs = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
              "original_max_position_embeddings": old}
        got = _rope_inv_freq.__wrapped__(c.head_dim, c.rope_theta, FrozenDict(rs))
        if np.all(np.abs(got - want) <= _llama3_rtol(inv_freq, factor, low, high, old) * want):
            return rs
    raise UnsupportedModelError(
        f"rope_freq_factors={short(c.rope_freq_factors)} (head_dim={c.head_dim}, rope_theta={c.rope_theta}) are "
        "not llama3 rope scaling for any parameters found; a Hugging Face config.json cannot express them, "
        "so the export is refused")


def _llama3_rtol(inv_freq: np.ndarray, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """Per-pair relative tolerance ``Float[np.ndarray, "head_dim/2"]`` between two float32
    evaluations of the same llama3 scaling (transformers' and llama.cpp's).

    The smoothing ``s = (x - low) / (high - low)``, ``x = old / wavelen``, is computed by
    cancellation: ``x`` carries about 2 ulps of rounding (``wavelen = 2 pi / inv_freq``, then
    ``old / wavelen``), which move ``g = (1 - s) / factor + s`` (the inverse of the factor)
    relatively by ``2 ulps * (1 - 1/factor) * x / (high - low) / g``: up to about
    ``2 * factor * high / (high - low)`` ulps where ``s`` is near 0. The tolerance is 4 ulps times
    (1 + that amplification) in the interpolated pairs, 4 ulps elsewhere. (Measured on
    converter-written factors for 400 random settings: at most a quarter of it.)
    """
    eps = float(np.finfo(np.float32).eps)
    x = old * inv_freq.astype(np.float64) / (2 * math.pi)
    medium = (x >= low) & (x <= high)
    s = np.clip((x - low) / (high - low), 0.0, 1.0)
    g = (1 - s) / factor + s
    return 4 * eps * (1 + np.where(medium, (1 - 1 / factor) * 2 * x / ((high - low) * g), 0.0))


def _llama3_candidates(ff: np.ndarray, inv_freq: np.ndarray):
    """``(low_freq_factor, high_freq_factor, original_max_position_embeddings)`` to try for the
    factors ``ff`` of the unscaled ``inv_freq`` (see :func:`_llama3_from_freq_factors`)."""
    yield _META_LLAMA3
    factor = ff.max()
    mid = (ff > 1) & (ff < factor)
    if mid.sum() < 2:
        return
    s = (1 / ff[mid] - 1 / factor) / (1 - 1 / factor)  # 1/ff = (1 - s)/factor + s
    u = inv_freq[mid].astype(np.float64) / (2 * math.pi)  # 1/wavelen
    alpha, beta = np.polyfit(u, s, 1)  # s = (u - 1/low_wavelen) / (1/high_wavelen - 1/low_wavelen)
    if not alpha > 0:
        return
    u_low = -beta / alpha
    u_high = u_low + 1 / alpha
    if not 0 < u_low < u_high:
        return
    old = round(1 / u_low)  # low_freq_factor = old / low_wavelen ~ 1
    if old < 1:
        return
    seen = set()
    for digits in range(1, 10):
        cand = (float(f"{old * u_low:.{digits}g}"), float(f"{old * u_high:.{digits}g}"), old)
        if cand not in seen and cand[0] < cand[1]:
            seen.add(cand)
            yield cand


def rope_cos_sin(positions: Array, config: LlamaConfig, dtype) -> tuple[Array, Array]:
    """``cos, sin`` of shape ``positions.shape + (head_dim,)`` in ``dtype`` (computed in float32)."""
    inv_freq = jnp.asarray(rope_inv_freq(config))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def _rotate_half(x: Array) -> Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotate ``x`` ``(batch, seq, heads, head_dim)`` by ``cos, sin`` ``(batch, seq, head_dim)``."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + _rotate_half(x) * sin


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

class KVCache(NamedTuple):
    """Preallocated key/value cache (a pytree).

    Attributes:
      k, v: one ``Float[Array, "batch kv_heads max_len head_dim"]`` per layer (heads-major,
        so attention reads a run of slots without transposing the cache), or, for a layer
        whose attention quantizes keys and values (``Attention.kv_quant``), its
        :class:`jquant.activations.TokenCodes`: codes ``uint8`` ``(batch, kv_heads, max_len,
        head_dim or head_dim/2)`` with per-token-and-head scales (and zeros).
      index: ``int32`` scalar, the number of positions already written (slot ``j`` holds
        position ``j``).
    """

    k: tuple[Any, ...]
    v: tuple[Any, ...]
    index: Array

    @property
    def max_len(self) -> int:
        k0 = self.k[0]
        return (k0.codes if hasattr(k0, "codes") else k0).shape[2]

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (codes, scales and zeros counted)."""
        return sum(x.nbytes for x in jax.tree_util.tree_leaves((self.k, self.v)))


_ATTN_CHUNK = 128  # queries per block of causal attention without a cache
_KV_SEGMENT = 128  # cache slots per step of attention over a KV cache


def _read_slots(entry, start, seg: int, spec, hd: int, dtype) -> Array:
    """Slots ``start .. start + seg`` of a cache entry (an array or quantized codes), ``(b, kv, seg, hd)``."""
    def cut(a):
        return jax.lax.dynamic_slice(a, (0, 0, start, 0), (*a.shape[:2], seg, a.shape[3]))

    if spec is None:
        return cut(entry).astype(dtype)
    from jquant.activations import dequantize_tokens

    return dequantize_tokens(jax.tree.map(cut, entry), spec, hd, dtype)  # codes, scales (and zeros)


def _write_slots(entry, new: Array, start, spec):
    """``entry`` with ``new`` ``(b, kv, t, hd)`` written from slot ``start`` (quantized when
    ``spec`` is given)."""
    def put(a, x):
        return jax.lax.dynamic_update_slice(a, x.astype(a.dtype), (0, 0, start) + (0,) * (a.ndim - 3))

    if spec is None:
        return put(entry, new)
    from jquant.activations import quantize_tokens

    return jax.tree.map(put, entry, quantize_tokens(new, spec))  # codes, scales (and zeros)


def _cached_attention(q: Array, k_cache, v_cache, q_slot: Array, sliding_window: int | None,
                      scale: float, dtype, spec=None) -> Array:
    """Attention of ``q`` ``(b, kv, g, t, hd)`` over the filled part of a heads-major cache
    ``(b, kv, S, hd)`` (or its quantized codes, dequantized segment by segment with ``spec``):
    segments of ``_KV_SEGMENT`` slots up to the last query's slot, with an online softmax
    (running max and sum in float32), so a step's cost grows with the filled length, not with
    the preallocated one. Returns ``(b, kv, g, t, hd)`` in ``dtype``."""
    b, kvh, g, t, hd = q.shape
    S = (k_cache if spec is None else k_cache.codes).shape[2]
    seg = min(S, _KV_SEGMENT)
    filled = q_slot[-1] + 1
    n_seg = (filled + seg - 1) // seg

    def body(i, carry):
        m, l, acc = carry
        s0 = i * seg
        st = jnp.minimum(s0, S - seg)  # the last segment may overlap the one before: masked by s0
        kk = _read_slots(k_cache, st, seg, spec, hd, dtype)
        vv = _read_slots(v_cache, st, seg, spec, hd, dtype)
        sc = jnp.einsum("bkgtd,bksd->bkgts", q, kk, preferred_element_type=jnp.float32) * scale
        slots = st + jnp.arange(seg, dtype=jnp.int32)
        mask = (slots[None, :] >= s0) & (slots[None, :] <= q_slot[:, None])
        if sliding_window is not None:
            mask &= slots[None, :] > q_slot[:, None] - sliding_window
        sc = jnp.where(mask, sc, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(sc, axis=-1))
        p = jnp.exp(sc - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + jnp.sum(p, axis=-1)
        acc = acc * corr[..., None] + jnp.einsum("bkgts,bksd->bkgtd", p.astype(dtype), vv,
                                                 preferred_element_type=jnp.float32)
        return m_new, l, acc

    m0 = jnp.full((b, kvh, g, t), jnp.finfo(jnp.float32).min, jnp.float32)
    init = (m0, jnp.zeros((b, kvh, g, t), jnp.float32), jnp.zeros((b, kvh, g, t, hd), jnp.float32))
    _, l, acc = jax.lax.fori_loop(0, n_seg, body, init)
    return (acc / l[..., None]).astype(dtype)


def _default_positions(batch: int, seq: int, start) -> Array:
    return jnp.broadcast_to(jnp.asarray(start, jnp.int32) + jnp.arange(seq, dtype=jnp.int32), (batch, seq))


class Attention(nnx.Module):
    """Grouped-query causal self-attention with rotary embeddings.

    Query head ``h`` uses KV head ``h // num_kv_groups`` (HF ``repeat_kv``). What differs by
    family or layer comes from ``config.layer_config(layer)``: the sliding window and rotary
    settings of the layer, the score factor (``query_scale``), and with ``qk_norm`` an
    RMSNorm over each query and key head before the rotation (params ``q_norm/scale``,
    ``k_norm/scale`` ``(head_dim,)``; Gemma 3). Static ``kv_quant``: a quantizer of the keys
    (after the rotary embedding) and values per token and head
    (:func:`jquant.activations.set_quantizers`), or ``None``.
    """

    def __init__(self, config: LlamaConfig, *, layer: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config.layer_config(layer)
        self.config = c
        d, h, kv, hd = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = Linear(d, h * hd, use_bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d, kv * hd, use_bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d, kv * hd, use_bias=c.attention_bias, dtype=dtype, rngs=rngs)
        self.o_proj = Linear(h * hd, d, use_bias=c.attention_out_bias, dtype=dtype, rngs=rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, eps=c.rms_norm_eps, dtype=dtype, unit_offset=c.norm_unit_offset)
            self.k_norm = RMSNorm(hd, eps=c.rms_norm_eps, dtype=dtype, unit_offset=c.norm_unit_offset)
        self.kv_quant = None  # a jquant.activations.ActQuantSpec for the keys and values

    def __call__(self, x: Array, positions: Array, kv: tuple[Array, Array] | None = None,
                 index: Array | int = 0, capture: dict | None = None):
        """Attention over ``x`` ``(batch, seq, hidden)``.

        Args:
          positions: ``Int[Array, "batch seq"]`` rotary positions.
          kv: optional ``(k_cache, v_cache)`` ``(batch, max_len, kv_heads, head_dim)``; the new
            keys/values are written at slot ``index`` and attention runs over the whole cache.
          index: first cache slot of ``x`` (also the causal-mask offset).
          capture: if a dict, ``'o_proj'`` is set to the input of ``o_proj``.
        Returns:
          ``(out (batch, seq, hidden), new_kv or None)``.
        """
        out, kv = self.heads(x, positions, kv, index)
        if capture is not None:
            capture["o_proj"] = out
        return self.o_proj(out), kv

    def heads(self, x: Array, positions: Array, kv: tuple[Array, Array] | None = None,
              index: Array | int = 0) -> tuple[Array, tuple[Array, Array] | None]:
        """Attention up to ``o_proj``: the concatenated heads ``(batch, seq, heads*head_dim)``
        (the input of ``o_proj``), and the new cache; arguments as :meth:`__call__`."""
        c = self.config
        b, t, _ = x.shape
        g = c.num_kv_groups
        q = self.q_proj(x).reshape(b, t, c.num_attention_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_key_value_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope_cos_sin(positions, c, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.kv_quant is not None and kv is None:  # what a cache would hold: keys after the rotation, values
            from jquant.activations import fake_quant

            k, v = fake_quant(k, self.kv_quant), fake_quant(v, self.kv_quant)

        q_slot = jnp.asarray(index, jnp.int32) + jnp.arange(t, dtype=jnp.int32)
        kvh, hd = c.num_key_value_heads, c.head_dim
        # Heads-major layout, so both products are plain batched matmuls over (batch, kv head):
        # the g query heads of a KV head are stacked along the rows.
        q = q.reshape(b, t, kvh, g, hd).transpose(0, 2, 3, 1, 4)  # (b, kv, g, t, hd)
        if kv is not None:
            start = jnp.asarray(index, jnp.int32)
            k_cache = _write_slots(kv[0], k.transpose(0, 2, 1, 3), start, self.kv_quant)
            v_cache = _write_slots(kv[1], v.transpose(0, 2, 1, 3), start, self.kv_quant)
            out = _cached_attention(q, k_cache, v_cache, q_slot, c.sliding_window, c.query_scale, x.dtype,
                                    self.kv_quant)
            out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.num_attention_heads * hd)
            return out, (k_cache, v_cache)
        k_slot = q_slot
        # Without a cache, slot == position index: a chunk of queries needs the keys up to its
        # last query only, so causal attention runs in chunks of _ATTN_CHUNK queries and skips
        # the masked upper blocks (about half the products and exponentials at 512 tokens).
        kT = k.transpose(0, 2, 3, 1)  # (b, kv, hd, s)
        v = v.transpose(0, 2, 1, 3)  # (b, kv, s, hd)
        outs = []
        for c0 in range(0, t, _ATTN_CHUNK):
            c1 = min(t, c0 + _ATTN_CHUNK)
            qc = q[:, :, :, c0:c1].reshape(b, kvh, g * (c1 - c0), hd)
            scores = jnp.matmul(qc, kT[..., :c1], preferred_element_type=jnp.float32)
            scores = scores.reshape(b, kvh, g, c1 - c0, c1) * c.query_scale
            qs, ks = q_slot[c0:c1, None], k_slot[None, :c1]
            mask = ks <= qs
            if c.sliding_window is not None:
                mask &= ks > qs - c.sliding_window
            scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype).reshape(b, kvh, g * (c1 - c0), c1)
            outs.append(jnp.matmul(probs, v[:, :, :c1]).reshape(b, kvh, g, c1 - c0, hd))
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=3)
        out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, c.num_attention_heads * hd)
        return out, kv


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True)}


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``; ``act`` is ``config.hidden_act``: SiLU
    (SwiGLU, Llama) or tanh-approximated GELU (GeGLU, Gemma)."""

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.act = c.hidden_act
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, use_bias=c.mlp_bias, dtype=dtype, rngs=rngs)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, use_bias=c.mlp_bias, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, capture: dict | None = None) -> Array:
        a = self.gated(x)
        if capture is not None:
            capture["down_proj"] = a
        return self.down_proj(a)

    def gated(self, x: Array) -> Array:
        """``act(gate(x)) * up(x)``: the input of ``down_proj``."""
        return _ACTIVATIONS[self.act](self.gate_proj(x)) * self.up_proj(x)


class DecoderBlock(nnx.Module):
    """One pre-norm decoder block: ``h + attn(norm(h))``, then ``h + mlp(norm(h))``.

    For true-sequential calibration (GPTQ, arXiv:2210.17323) the block also runs in
    :meth:`calibration_stage` pieces, one per group of :attr:`LINEAR_GROUPS`.
    """

    # The block's linears in groups that share one input, in the order the forward pass
    # reaches them; with each group, the operation that produces its input, where a
    # per-input-channel scale can be folded (AWQ): a norm weight ("scale") or the output
    # columns of a kernel ("columns").
    LINEAR_GROUPS = (
        (("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), ("scale", "input_layernorm/scale")),
        (("self_attn/o_proj",), ("columns", "self_attn/v_proj/kernel")),
        (("mlp/gate_proj", "mlp/up_proj"), ("scale", "post_attention_layernorm/scale")),
        (("mlp/down_proj",), ("columns", "mlp/up_proj/kernel")),
    )

    def __init__(self, config: LlamaConfig, *, layer: int = 0, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.input_layernorm = self._norm(config, dtype)
        self.self_attn = Attention(config, layer=layer, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = self._norm(config, dtype)
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)

    @staticmethod
    def _norm(config: LlamaConfig, dtype) -> RMSNorm:
        return RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype, unit_offset=config.norm_unit_offset)

    # Where a family's block differs (Gemma 3 normalises the attention and MLP outputs too).
    def pre_mlp_norm(self, h: Array) -> Array:
        """The norm before the MLP."""
        return self.post_attention_layernorm(h)

    def attn_out(self, a: Array) -> Array:
        """What the residual stream adds of the attention output ``a`` (after o_proj)."""
        return a

    def mlp_out(self, m: Array) -> Array:
        """What the residual stream adds of the MLP output ``m`` (after down_proj)."""
        return m

    def _forward(self, h, positions, kv, index, capture):
        b, t, _ = h.shape
        if positions is None:
            positions = _default_positions(b, t, index)
        x = self.input_layernorm(h)
        attn_cap = {} if capture is not None else None
        a, kv = self.self_attn(x, positions, kv, index, attn_cap)
        h = h + self.attn_out(a)
        x2 = self.pre_mlp_norm(h)
        mlp_cap = {} if capture is not None else None
        h = h + self.mlp_out(self.mlp(x2, mlp_cap))
        if capture is not None:
            for name in ("q_proj", "k_proj", "v_proj"):
                capture[f"self_attn/{name}"] = x
            capture["self_attn/o_proj"] = attn_cap["o_proj"]
            capture["mlp/gate_proj"] = x2
            capture["mlp/up_proj"] = x2
            capture["mlp/down_proj"] = mlp_cap["down_proj"]
        return h, kv

    def __call__(self, h: Array, positions: Array | None = None,
                 kv: tuple[Array, Array] | None = None, index: Array | int = 0):
        """Apply the block to hidden states.

        Args:
          h: ``Float[Array, "batch seq hidden"]``.
          positions: ``Int[Array, "batch seq"]`` rotary positions; default ``index + arange(seq)``.
          kv: optional ``(k_cache, v_cache)`` of this layer (see :class:`KVCache`).
          index: cache slot of ``h[:, 0]``; the causal mask is by slot.
        Returns:
          ``(h_out, new_kv)``; ``new_kv`` is ``None`` when ``kv`` is.
        """
        return self._forward(h, positions, kv, index, None)

    def calibration_stage(self, k: int, carry: dict[str, Array],
                          positions: Array | None = None) -> tuple[dict[str, Array], Array | None]:
        """Stage ``k`` of the block, for true-sequential calibration.

        Stage ``k`` (``0 <= k < len(LINEAR_GROUPS)``) runs the part of the block between the
        input of group ``k - 1`` and the input of group ``k``, with whatever weights the block
        holds then (the pipeline has quantized groups ``< k`` in place); stage
        ``len(LINEAR_GROUPS)`` finishes the block. Each part of the block runs in exactly one
        stage, so the stages together cost one forward pass.

        Args:
          k: the stage.
          carry: what the previous stage returned; stage 0 takes ``{"h": block input}``
            ``(batch, seq, hidden)``.
          positions: rotary positions (default ``arange(seq)``).
        Returns:
          ``(carry, x)``: ``x`` is the input of group ``k``'s linears (``None`` for the last
          stage, whose carry is ``{"h": block output}``).
        """
        h = carry["h"]
        if k == 0:
            return {"h": h}, self.input_layernorm(h)
        if k == 1:
            b, t, _ = h.shape
            if positions is None:
                positions = _default_positions(b, t, 0)
            a, _ = self.self_attn.heads(self.input_layernorm(h), positions)
            return {"h": h, "a": a}, a
        if k == 2:
            h = h + self.attn_out(self.self_attn.o_proj(carry["a"]))
            return {"h": h}, self.pre_mlp_norm(h)
        if k == 3:
            a = self.mlp.gated(self.pre_mlp_norm(h))
            return {"h": h, "a": a}, a
        if k == 4:
            return {"h": h + self.mlp_out(self.mlp.down_proj(carry["a"]))}, None
        raise ValueError(f"calibration_stage: k={k} outside 0..{len(self.LINEAR_GROUPS)}")

    def forward_with_inputs(self, h: Array, positions: Array | None = None) -> tuple[Array, dict[str, Array]]:
        """The block output and the input of each of its linears (for calibration).

        Returns:
          ``(h_out, inputs)`` with ``inputs`` keyed by the linear's path inside the block:
          ``'self_attn/q_proj'``, ``'self_attn/k_proj'``, ``'self_attn/v_proj'`` (the same
          array: the normed block input ``(batch, seq, hidden)``), ``'self_attn/o_proj'``
          (attention output before o_proj, ``(batch, seq, heads*head_dim)``),
          ``'mlp/gate_proj'``, ``'mlp/up_proj'`` (the same array: normed post-attention
          hidden states) and ``'mlp/down_proj'`` (``silu(gate) * up``, ``(batch, seq,
          intermediate)``). Each value ``x`` satisfies ``linear_out = x @ kernel (+ bias)``.
        """
        capture: dict[str, Array] = {}
        out, _ = self._forward(h, positions, None, 0, capture)
        return out, capture


class Llama(nnx.Module):
    """Llama-family causal LM. See the module docstring for parameter paths.

    Call: ``model(tokens, positions=None, cache=None) -> (logits, cache)``.
    Block-wise: ``model.embed(tokens)`` → ``model.layers[i](h, positions)`` → ``model.head(h)``.
    """

    BLOCK = DecoderBlock

    def __init__(self, config: LlamaConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([self.BLOCK(config, layer=i, dtype=dtype, rngs=rngs)
                                for i in range(config.num_hidden_layers)])
        self.norm = self.BLOCK._norm(config, dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear(config.hidden_size, config.vocab_size, dtype=dtype, rngs=rngs))

    def embed(self, tokens: Array) -> Array:
        """``Int[Array, "batch seq"]`` → hidden states ``Float[Array, "batch seq hidden"]``
        (times ``config.embed_scale`` in the model's dtype where the family scales them)."""
        h = self.embed_tokens(tokens, self.dtype)
        if self.config.embed_scale is not None:
            h = h * jnp.asarray(self.config.embed_scale, jnp.float32).astype(self.dtype)
        return h

    def head(self, h: Array) -> Array:
        """Final RMSNorm and lm_head (or tied embedding): ``(batch, seq, hidden)`` → logits ``(batch, seq, vocab)``."""
        h = self.norm(h)
        if self.lm_head is None:
            return self.embed_tokens.attend(h)
        return self.lm_head(h)

    def hidden(self, tokens: Array) -> Array:
        """The last block's output (before the final norm) ``(batch, seq, hidden)``, no cache:
        ``head(hidden(tokens))`` are the logits of ``self(tokens)``."""
        b, t = tokens.shape
        positions = _default_positions(b, t, 0)
        h = self.embed(tokens)
        for layer in self.layers:
            h, _ = layer(h, positions)
        return h

    def init_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        """An empty :class:`KVCache` for ``batch`` sequences of up to ``max_len`` positions (codes
        for the layers whose attention quantizes keys and values)."""
        c = self.config
        dtype = self.dtype if dtype is None else dtype
        shape = (batch, c.num_key_value_heads, max_len, c.head_dim)

        def entry(layer):
            spec = layer.self_attn.kv_quant
            if spec is None:
                return jnp.zeros(shape, dtype)
            from jquant.activations import quantize_tokens

            # the codes, scales and zeros of max_len zero vectors: their shapes and dtypes
            return jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: quantize_tokens(jnp.zeros(shape, dtype), spec)))

        return KVCache(tuple(entry(layer) for layer in self.layers), tuple(entry(layer) for layer in self.layers),
                       jnp.zeros((), jnp.int32))

    def __call__(self, tokens: Array, positions: Array | None = None,
                 cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
        """Forward pass.

        Args:
          tokens: ``Int[Array, "batch seq"]``.
          positions: ``Int[Array, "batch seq"]`` rotary positions; default
            ``cache.index + arange(seq)`` (``arange(seq)`` without a cache).
          cache: optional :class:`KVCache`; ``tokens`` are written at ``cache.index`` and
            attend to everything before. The caller keeps ``cache.index + seq <= max_len``.
        Returns:
          ``(logits Float[Array, "batch seq vocab"], updated cache or None)``.
        """
        b, t = tokens.shape
        index = cache.index if cache is not None else jnp.zeros((), jnp.int32)
        if positions is None:
            positions = _default_positions(b, t, index)
        h = self.embed(tokens)
        ks, vs = [], []
        for i, layer in enumerate(self.layers):
            kv = (cache.k[i], cache.v[i]) if cache is not None else None
            h, kv = layer(h, positions, kv, index)
            if cache is not None:
                ks.append(kv[0])
                vs.append(kv[1])
        logits = self.head(h)
        new_cache = KVCache(tuple(ks), tuple(vs), index + t) if cache is not None else None
        return logits, new_cache


# --------------------------------------------------------------------------------------------
# Functional API
# --------------------------------------------------------------------------------------------

def init_model(config: LlamaConfig, *, dtype=jnp.float32, key: Array | int = 0) -> Llama:
    """A randomly initialised model (kernels ~ N(0, 0.02²), norms 1)."""
    return config.model_class(config, dtype=dtype, rngs=nnx.Rngs(params=key))


def abstract_model(config: LlamaConfig, *, dtype=jnp.float32) -> Llama:
    """The model with ``jax.ShapeDtypeStruct`` leaves (no memory), for converters to fill."""
    return nnx.eval_shape(lambda: config.model_class(config, dtype=dtype, rngs=nnx.Rngs(0)))


def forward(graphdef: nnx.GraphDef, state: nnx.State, tokens: Array, positions: Array | None = None,
            cache: KVCache | None = None) -> tuple[Array, KVCache | None]:
    """Jitted pure forward: ``nnx.merge(graphdef, state)(tokens, positions, cache)``.

    ``state`` may hold float arrays or ``QTensor`` leaves; ``graphdef`` is static. The packed
    matmul backend in effect (:func:`pallas_kernels.get_backend`) is part of the jit key.
    """
    return _forward(graphdef, state, tokens, positions, cache, get_backend())


@functools.partial(jax.jit, static_argnums=(0, 5))
def _forward(graphdef, state, tokens, positions, cache, backend):
    with use_backend(backend):
        model = nnx.merge(graphdef, state)
        return model(tokens, positions, cache)


def _pick(logits: Array, key: Array | None, temperature: float, top_k: int | None) -> Array:
    """Greedy (``temperature == 0``) or sampled next tokens ``(batch,)`` from ``(batch, vocab)``.

    Sampling inverts the CDF of ``softmax(logits / temperature)`` at one uniform draw per
    row: the same distribution as ``jax.random.categorical``'s Gumbel-max, with one random
    number per row instead of one per vocabulary entry (6× faster at a 49k vocabulary).
    """
    logits = logits.astype(jnp.float32)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
    return jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _generate(graphdef, state, prompt, key, max_new_tokens, temperature, top_k, eos_token_id, backend):
    with use_backend(backend):
        return _generate_body(graphdef, state, prompt, key, max_new_tokens, temperature, top_k, eos_token_id)


def _generate_body(graphdef, state, prompt, key, max_new_tokens, temperature, top_k, eos_token_id):
    model = nnx.merge(graphdef, state)
    b, t = prompt.shape
    cache = model.init_cache(b, t + max_new_tokens)
    logits, cache = model(prompt, cache=cache)
    keys = None if key is None else jax.random.split(key, max_new_tokens)
    tok = _pick(logits[:, -1], None if keys is None else keys[0], temperature, top_k)
    out = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(tok)
    done = jnp.zeros((b,), bool) if eos_token_id is None else tok == eos_token_id

    def step(i, carry):
        out, tok, cache, done = carry
        logits, cache = model(tok[:, None], cache=cache)
        nxt = _pick(logits[:, -1], None if keys is None else keys[i], temperature, top_k)
        if eos_token_id is not None:
            nxt = jnp.where(done, eos_token_id, nxt)
            done = done | (nxt == eos_token_id)
        out = jax.lax.dynamic_update_slice(out, nxt[:, None], (0, i))
        return out, nxt, cache, done

    out, *_ = jax.lax.fori_loop(1, max_new_tokens, step, (out, tok, cache, done))
    return jnp.concatenate([prompt, out], axis=1)


def generate(model: Llama, prompt_tokens, max_new_tokens: int, *, key: Array | None = None,
             temperature: float = 0.0, top_k: int | None = None,
             eos_token_id: int | None = None) -> Array:
    """Autoregressive generation with a preallocated KV cache, jitted end to end.

    Args:
      model: a :class:`Llama` (float or QTensor weights).
      prompt_tokens: ``Int[Array, "batch seq"]`` (or ``"seq"``, then the result is 1-D too).
      max_new_tokens: number of tokens to generate (static).
      key: PRNG key, required when ``temperature > 0``.
      temperature: 0 for greedy decoding; otherwise logits are divided by it and sampled.
      top_k: sample among the ``top_k`` most likely tokens only.
      eos_token_id: once a sequence emits it, the rest of that sequence is ``eos_token_id``
        (shapes stay static: always ``max_new_tokens`` are produced).
    Returns:
      ``Int[Array, "batch seq+max_new_tokens"]``: the prompt followed by the new tokens.
    """
    prompt = jnp.asarray(prompt_tokens, jnp.int32)
    squeeze = prompt.ndim == 1
    if squeeze:
        prompt = prompt[None]
    if max_new_tokens < 1:
        return prompt[0] if squeeze else prompt
    temperature = float(temperature)
    if temperature < 0:
        raise ValueError(f"temperature={temperature}: must be >= 0")
    if temperature > 0 and key is None:
        raise ValueError("temperature > 0 needs an explicit PRNG key (key=jax.random.key(...))")
    if temperature == 0.0:
        key = None
    graphdef, state = nnx.split(model)
    out = _generate(graphdef, state, prompt, key, int(max_new_tokens), temperature,
                    None if top_k is None else int(top_k), eos_token_id, get_backend())
    return out[0] if squeeze else out
