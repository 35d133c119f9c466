"""Hugging Face checkpoint import/export for the Llama family (Llama, SmolLM, Mistral, Qwen2).

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``. Import reads tensor by tensor with
``safetensors.safe_open`` into an abstract model (``nnx.eval_shape``), so the full weights
are never held twice and no PyTorch model is built. Linear weights are transposed once from
HF's ``(out, in)`` to Flax's ``(in, out)``; export transposes back.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.errors import CheckpointError, UnsupportedModelError
from jquant.models.layers import is_qtensor
from jquant.models.llama import Llama, LlamaConfig, abstract_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": ("input_layernorm", "scale"),
    "post_attention_layernorm.weight": ("post_attention_layernorm", "scale"),
}
for _p in ("q_proj", "k_proj", "v_proj", "o_proj"):
    _LAYER_NAMES[f"self_attn.{_p}.weight"] = ("self_attn", _p, "kernel")
    _LAYER_NAMES[f"self_attn.{_p}.bias"] = ("self_attn", _p, "bias")
for _p in ("gate_proj", "up_proj", "down_proj"):
    _LAYER_NAMES[f"mlp.{_p}.weight"] = ("mlp", _p, "kernel")
    _LAYER_NAMES[f"mlp.{_p}.bias"] = ("mlp", _p, "bias")
_TOP_NAMES = {
    "model.embed_tokens.weight": ("embed_tokens", "embedding"),
    "model.norm.weight": ("norm", "scale"),
    "lm_head.weight": ("lm_head", "kernel"),
}
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def hf_name_to_path(name: str) -> tuple[str | int, ...] | None:
    """Map a HF tensor name to our parameter path (``None`` if it is not a parameter of ours).

    ``model.layers.3.self_attn.q_proj.weight`` → ``('layers', 3, 'self_attn', 'q_proj', 'kernel')``.
    """
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _LAYER_RE.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return ("layers", int(m.group(1)), *_LAYER_NAMES[m.group(2)])
    return None


def path_to_hf_name(path: tuple) -> str:
    """Inverse of :func:`hf_name_to_path`."""
    path = tuple(path)
    for k, v in _TOP_NAMES.items():
        if v == path:
            return k
    if path and path[0] == "layers":
        for k, v in _LAYER_NAMES.items():
            if v == tuple(path[2:]):
                return f"model.layers.{path[1]}.{k}"
    raise KeyError(f"no Hugging Face name for parameter path {'/'.join(map(str, path))}")


def _is_kernel(path: tuple) -> bool:
    return path[-1] == "kernel"


def read_config(path: str | os.PathLike) -> LlamaConfig:
    """``LlamaConfig`` from ``<path>/config.json``.

    Raises:
      CheckpointError: missing or unreadable ``config.json``.
      UnsupportedModelError: an architecture other than llama / mistral / qwen2.
    """
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: config.json not found (is {path} a Hugging Face model directory?)")
    try:
        d = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{cfg_file}: cannot parse config.json ({e})") from e
    try:
        return LlamaConfig.from_hf_dict(d)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{cfg_file}: {e}") from e
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: config.json lacks the field {e}") from e


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: cannot read the shard index ({e})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists shard(s) that do not exist: {', '.join(str(path / s) for s in missing)}")
        return [path / s for s in shards]
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file (expected {SINGLE_FILE} or {INDEX_FILE})")
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, np.ndarray]]:
    """Yield ``(name, file, numpy array)`` one tensor at a time (bf16 via ``ml_dtypes``)."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="numpy") as h:
                flax_handle = None
                for k in list(h.keys()):
                    if h.get_slice(k).get_dtype() in ("BF16", "F8_E4M3", "F8_E5M2"):
                        # numpy has no bfloat16: read through the flax backend, bring to host.
                        if flax_handle is None:
                            flax_handle = safe_open(str(f), framework="flax")
                        arr = np.asarray(jax.device_get(flax_handle.get_tensor(k)))
                    else:
                        arr = h.get_tensor(k)
                    yield k, f, arr
        except Exception as e:  # safetensors raises SafetensorError (an Exception subclass) or OSError
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from e


def _get_variable(model: Llama, path: tuple) -> nnx.Variable:
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p, None)
        if node is None:
            raise KeyError(path)
    if not isinstance(node, nnx.Variable):
        raise KeyError(path)
    return node


def load_hf(path: str | os.PathLike, dtype=jnp.float32) -> tuple[Llama, LlamaConfig]:
    """Load a Hugging Face Llama / SmolLM / Mistral / Qwen2 checkpoint directory.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards with
        ``model.safetensors.index.json``).
      dtype: parameter dtype of the model (weights are cast once, on the host).
    Returns:
      ``(model, config)``; kernels in Flax ``(in, out)`` layout.
    Raises:
      CheckpointError: missing config/shard/tensor, corrupt or truncated file, a tensor whose
        shape does not match the config, or an unexpected tensor.
      UnsupportedModelError: an unsupported architecture.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (load_hf expects a Hugging Face model directory)")
    config = read_config(path)
    files = _shard_files(path)
    model = abstract_model(config, dtype=dtype)
    loaded: set[tuple] = set()
    for name, f, arr in _iter_tensors(files):
        if _IGNORED.search(name):
            continue
        p = hf_name_to_path(name)
        if p is None:
            raise CheckpointError(
                f"{f}: unexpected tensor {name!r} {tuple(arr.shape)}: not part of a {config.model_type} "
                f"model with this config (unsupported architecture variant?)")
        if p[0] == "lm_head" and config.tie_word_embeddings:
            continue  # some tied checkpoints also store the (identical) lm_head
        try:
            var = _get_variable(model, p)
        except KeyError:
            raise CheckpointError(
                f"{f}: unexpected tensor {name!r}: the config (attention_bias={config.attention_bias}, "
                f"mlp_bias={config.mlp_bias}, num_hidden_layers={config.num_hidden_layers}, "
                f"tie_word_embeddings={config.tie_word_embeddings}) has no parameter "
                f"{'/'.join(map(str, p))}") from None
        want = tuple(var.get_value().shape)
        if _is_kernel(p):
            if arr.ndim != 2:
                raise CheckpointError(f"{f}: tensor {name!r} has shape {arr.shape}; expected a matrix "
                                      f"{want[::-1]} (out, in)")
            arr = arr.T
        if tuple(arr.shape) != want:
            got = arr.shape[::-1] if _is_kernel(p) else arr.shape
            exp = want[::-1] if _is_kernel(p) else want
            raise CheckpointError(
                f"{f}: tensor {name!r} has shape {tuple(got)}, but config.json implies {tuple(exp)}")
        var.set_value(jnp.asarray(np.ascontiguousarray(arr).astype(dtype)))
        loaded.add(p)
    missing = [v_path for v_path, _ in _iter_param_paths(model) if v_path not in loaded]
    if missing:
        names = ", ".join(path_to_hf_name(p) for p in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {names}{more} in {', '.join(f.name for f in files)}")
    return model, config


def _iter_param_paths(model: nnx.Module) -> Iterator[tuple[tuple, nnx.Variable]]:
    for p, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            yield tuple(p), var


def save_hf(model: Llama, config: LlamaConfig, path: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face directory (``config.json`` + ``model.safetensors``).

    Kernels are transposed back to HF ``(out, in)``. ``QTensor`` leaves are dequantized
    (the export is a float "fake-quant" model), in the model's dtype.

    Returns:
      the directory.
    """
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    dtype = np.dtype(model.dtype)
    for p, var in _iter_param_paths(model):
        w = var.get_value()
        if is_qtensor(w):
            w = w.dequantize(model.dtype)
        arr = np.asarray(jax.device_get(w))
        if arr.dtype != dtype:
            arr = arr.astype(dtype)
        if _is_kernel(p):
            arr = arr.T
        tensors[path_to_hf_name(p)] = np.ascontiguousarray(arr)
    if dtype == jnp.bfloat16:
        from safetensors.flax import save_file as save_flax
        save_flax({k: jnp.asarray(v) for k, v in tensors.items()}, str(path / SINGLE_FILE), metadata={"format": "pt"})
    else:
        save_file(tensors, str(path / SINGLE_FILE), metadata={"format": "pt"})
    d = config.to_hf_dict()
    d["torch_dtype"] = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}.get(dtype, "bfloat16")
    (path / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    return path
