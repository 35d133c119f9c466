"""Gemma 3 (the text decoder) as a Flax NNX model that accepts QTensor weights.

Architecture (Gemma 3 technical report, arXiv:2503.19786): token embedding scaled by
``sqrt(hidden)``; ``num_hidden_layers`` blocks, each ``h + post_attention_norm(attn(
input_norm(h)))`` then ``h + post_feedforward_norm(mlp(pre_feedforward_norm(h)))``; final
RMSNorm; logits through the tied embedding. Every RMSNorm weighs by ``1 + w`` (the parameter
is zero-centred) and multiplies in float32 before casting back (HF ``Gemma3RMSNorm``); queries
and keys get their own per-head RMSNorm before the rotary embedding; the MLP is GeGLU with the
tanh-approximated GELU; scores are scaled by ``query_pre_attn_scalar ** -0.5``. Layers
alternate local sliding-window attention (rotary base ``rope_local_base_freq``, no rope
scaling) and global attention (``rope_theta`` with ``rope_scaling``), by ``layer_types``
(by default five local layers, then one global). Numerics follow Hugging Face
``transformers`` (``Gemma3ForCausalLM``).

The module reuses the Llama family's machinery (:mod:`jquant.models.llama`): the attention
with its KV cache, the gated MLP, the block's calibration stages, generation. Parameter paths
add four to Llama's, named as in Hugging Face::

    layers/<i>/self_attn/{q,k}_norm/scale              (head_dim,)
    layers/<i>/post_attention_layernorm/scale          (hidden,)   after attention, before the residual
    layers/<i>/pre_feedforward_layernorm/scale         (hidden,)   before the MLP
    layers/<i>/post_feedforward_layernorm/scale        (hidden,)   after the MLP, before the residual

Every ``…/scale`` of a norm holds HF's ``w`` (the norm weighs by ``1 + w``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jquant.errors import CheckpointError, UnsupportedModelError
from jquant.models._values import flag, positive_float, short, size, token_id
from jquant.models.llama import DecoderBlock, Llama, LlamaConfig, _check_rope_scaling

Array = jax.Array

SLIDING, FULL = "sliding_attention", "full_attention"
GEMMA3_MODEL_TYPES = ("gemma3_text",)
_DEFAULT_PATTERN = 6  # HF / llama.cpp: every sixth layer is global


def default_layer_types(num_layers: int, pattern: int = _DEFAULT_PATTERN) -> tuple[str, ...]:
    """``pattern - 1`` sliding-window layers, then one global layer, repeated (HF's
    ``sliding_window_pattern``; llama.cpp's ``set_swa_pattern``)."""
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class Gemma3Config(LlamaConfig):
    """Hyper-parameters of a Gemma 3 text decoder (HF ``Gemma3TextConfig``); the fields of
    :class:`LlamaConfig` plus:

    Attributes:
      query_pre_attn_scalar: scores are ``q·k / sqrt(query_pre_attn_scalar)``.
      rope_local_base_freq: the rotary base of the sliding-window layers (``rope_theta`` and
        ``rope_scaling`` are the global layers').
      layer_types: ``"sliding_attention"`` or ``"full_attention"`` per layer (default: every
        sixth layer global).
      sliding_window: the window of the sliding-window layers (a query attends to itself and
        the ``sliding_window - 1`` positions before it).

    Raises:
      UnsupportedModelError: a value the model does not implement (see :meth:`from_hf_dict`).
    """

    MODEL_TYPES = GEMMA3_MODEL_TYPES
    HF_ARCHITECTURE = "Gemma3ForCausalLM"
    hidden_act = "gelu_pytorch_tanh"
    norm_unit_offset = True
    qk_norm = True

    head_dim: int | None = 256
    rope_theta: float = 1_000_000.0
    tie_word_embeddings: bool = True
    sliding_window: int | None = 4096
    model_type: str = "gemma3_text"
    query_pre_attn_scalar: float = 256.0
    rope_local_base_freq: float = 10_000.0
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.layer_types is None:
            object.__setattr__(self, "layer_types", default_layer_types(self.num_hidden_layers))
        lt = tuple(self.layer_types)
        object.__setattr__(self, "layer_types", lt)
        if len(lt) != self.num_hidden_layers or any(t not in (SLIDING, FULL) for t in lt):
            raise UnsupportedModelError(
                f"Gemma3Config.layer_types={short(list(lt))}: must list {self.num_hidden_layers} values, each "
                f"{SLIDING!r} or {FULL!r}")
        if SLIDING in lt and self.sliding_window is None:
            raise UnsupportedModelError("Gemma3Config: sliding-window layers need sliding_window")
        positive_float(self.query_pre_attn_scalar, "Gemma3Config.query_pre_attn_scalar")
        positive_float(self.rope_local_base_freq, "Gemma3Config.rope_local_base_freq")

    @property
    def query_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    @property
    def model_class(self) -> type:
        return Gemma3

    def layer_config(self, layer: int) -> Gemma3Config:
        """Layer ``layer``'s view: the config of a model whose every layer were like this one.
        A global layer has no sliding window; a sliding-window layer has the local rotary base
        and no rope scaling."""
        kind = self.layer_types[layer]
        same = (kind,) * self.num_hidden_layers
        if kind == FULL:
            return dataclasses.replace(self, sliding_window=None, layer_types=same)
        return dataclasses.replace(self, rope_theta=self.rope_local_base_freq, rope_scaling=None, layer_types=same)

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> Gemma3Config:
        """Build a config from a Hugging Face ``gemma3_text`` ``config.json`` dict (the rotary
        settings as ``rope_theta`` / ``rope_local_base_freq`` / ``rope_scaling`` or as
        transformers 5's per-layer-type ``rope_parameters``).

        Raises:
          UnsupportedModelError: what the model does not implement: attention or final logit
            soft-capping, bidirectional attention, an activation other than tanh-GELU, an
            unsupported rope type, a multimodal ``gemma3`` config (load its text model).
          CheckpointError: a value no model can have (named with its key).
        """
        if not isinstance(d, Mapping):
            raise CheckpointError(f"config must be a JSON object (mapping), got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type == "gemma3":
            raise UnsupportedModelError(
                "model_type 'gemma3' is the multimodal Gemma 3 (vision tower + text model); only the text decoder "
                "'gemma3_text' (Gemma3ForCausalLM, e.g. Gemma 3 270M and 1B) is supported")
        if model_type not in GEMMA3_MODEL_TYPES:
            raise UnsupportedModelError(f"model_type {short(model_type)} is not a Gemma 3 text model")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if d.get(key) is not None:
                raise UnsupportedModelError(f"gemma3_text: {key}={short(d[key])} is not implemented (Gemma 3 has "
                                            "none; soft-capping is Gemma 2's); expected null")
        if d.get("use_bidirectional_attention"):
            raise UnsupportedModelError("gemma3_text: use_bidirectional_attention=true (EmbeddingGemma) is not "
                                        "supported; only causal attention")
        act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu_tanh"):
            raise UnsupportedModelError(f"gemma3_text: hidden_activation {short(act)} is not supported; "
                                        "supported: gelu_pytorch_tanh")
        rope_theta, local_theta = d.get("rope_theta"), d.get("rope_local_base_freq")
        rope_scaling = d.get("rope_scaling")
        rp = d.get("rope_parameters")
        if rp is not None:
            if not isinstance(rp, Mapping):
                raise CheckpointError(f"rope_parameters={short(rp)}: must be a mapping or null")
            full, local = rp.get(FULL), rp.get(SLIDING)
            if full is None and local is None:  # one set for every layer type
                full = rp
            for name, part in ((FULL, full), (SLIDING, local)):
                if part is not None and not isinstance(part, Mapping):
                    raise CheckpointError(f"rope_parameters[{name!r}]={short(part)}: must be a mapping")
            if full is not None:
                full = dict(full)
                rope_theta = full.pop("rope_theta", rope_theta)
                rope_scaling = full if full.get("rope_type", full.get("type", "default")) != "default" else None
            if local is not None:
                local = dict(local)
                local_theta = local.pop("rope_theta", local_theta)
                if local.get("rope_type", local.get("type", "default")) != "default":
                    raise UnsupportedModelError(f"gemma3_text: rope scaling of the sliding-window layers "
                                                f"({short(local)}) is not supported")
        _check_rope_scaling(rope_scaling)

        def opt(key, check, default):
            return default if d.get(key) is None else check(d[key], key)

        heads = size(d["num_attention_heads"], "num_attention_heads")
        layers = size(d["num_hidden_layers"], "num_hidden_layers")
        layer_types = d.get("layer_types")
        if layer_types is None:
            pattern = opt("sliding_window_pattern", size, _DEFAULT_PATTERN)
            layer_types = default_layer_types(layers, pattern)
        elif not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise CheckpointError(f"layer_types={short(layer_types)}: must be a list of strings")
        return cls(
            vocab_size=size(d["vocab_size"], "vocab_size"),
            hidden_size=size(d["hidden_size"], "hidden_size"),
            intermediate_size=size(d["intermediate_size"], "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=opt("num_key_value_heads", size, heads),
            head_dim=opt("head_dim", size, 256),
            rms_norm_eps=opt("rms_norm_eps", positive_float, 1e-6),
            rope_theta=positive_float(1_000_000.0 if rope_theta is None else rope_theta, "rope_theta"),
            rope_local_base_freq=positive_float(10_000.0 if local_theta is None else local_theta,
                                                "rope_local_base_freq"),
            rope_scaling=rope_scaling,
            max_position_embeddings=opt("max_position_embeddings", size, 131_072),
            tie_word_embeddings=opt("tie_word_embeddings", flag, True),
            attention_bias=opt("attention_bias", flag, False),
            attention_out_bias=opt("attention_bias", flag, False),
            sliding_window=opt("sliding_window", size, 4096),
            query_pre_attn_scalar=opt("query_pre_attn_scalar", positive_float, 256.0),
            layer_types=tuple(layer_types),
            model_type="gemma3_text",
            bos_token_id=token_id(d.get("bos_token_id", 2), "bos_token_id"),
            eos_token_id=token_id(d.get("eos_token_id", 1), "eos_token_id"),
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """A Hugging Face ``gemma3_text`` ``config.json`` dict."""
        d = super().to_hf_dict()
        q = float(self.query_pre_attn_scalar)
        d.pop("hidden_act")
        d.update(hidden_activation=self.hidden_act, rope_local_base_freq=self.rope_local_base_freq,
                 attention_bias=self.attention_bias, sliding_window=self.sliding_window,
                 layer_types=list(self.layer_types), query_pre_attn_scalar=int(q) if q.is_integer() else q,
                 final_logit_softcapping=None, attn_logit_softcapping=None)
        return d


class Gemma3DecoderBlock(DecoderBlock):
    """A Gemma 3 block: Llama's, with the attention and MLP outputs normalised before the
    residual adds (``post_attention_layernorm``, ``post_feedforward_layernorm``) and the MLP
    input by ``pre_feedforward_layernorm``.

    AWQ folds its scales into a ``1 + w`` norm (fold kind ``"scale+1"``).
    """

    LINEAR_GROUPS = (
        (("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), ("scale+1", "input_layernorm/scale")),
        (("self_attn/o_proj",), ("columns", "self_attn/v_proj/kernel")),
        (("mlp/gate_proj", "mlp/up_proj"), ("scale+1", "pre_feedforward_layernorm/scale")),
        (("mlp/down_proj",), ("columns", "mlp/up_proj/kernel")),
    )

    def __init__(self, config: Gemma3Config, *, layer: int = 0, dtype=jnp.float32, rngs):
        super().__init__(config, layer=layer, dtype=dtype, rngs=rngs)
        self.pre_feedforward_layernorm = self._norm(config, dtype)
        self.post_feedforward_layernorm = self._norm(config, dtype)

    def pre_mlp_norm(self, h: Array) -> Array:
        return self.pre_feedforward_layernorm(h)

    def attn_out(self, a: Array) -> Array:
        return self.post_attention_layernorm(a)

    def mlp_out(self, m: Array) -> Array:
        return self.post_feedforward_layernorm(m)


class Gemma3(Llama):
    """Gemma 3 causal LM (text). The same interface as :class:`jquant.models.Llama`:
    ``model(tokens, positions=None, cache=None) -> (logits, cache)``, ``embed`` / ``layers`` /
    ``head`` block-wise, :func:`jquant.models.generate`."""

    BLOCK = Gemma3DecoderBlock
