"""Hugging Face checkpoint import/export for the Llama family (Llama, SmolLM, Mistral, Qwen2) and Gemma 3.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or shards
listed in ``model.safetensors.index.json``. Import reads tensor by tensor with
``safetensors.safe_open`` into an abstract model (``nnx.eval_shape``), so the full weights
are never held twice and no PyTorch model is built. Linear weights are transposed once from
HF's ``(out, in)`` to Flax's ``(in, out)``; export transposes back.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.errors import CheckpointError, FormatError, UnsupportedModelError
from jquant.models._values import MAX_SIZE, finite, short
from jquant.models.layers import is_qtensor
from jquant.models.gemma import Gemma3Config
from jquant.models.llama import Llama, LlamaConfig, abstract_model

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": ("input_layernorm", "scale"),
    "post_attention_layernorm.weight": ("post_attention_layernorm", "scale"),
    # Gemma 3
    "pre_feedforward_layernorm.weight": ("pre_feedforward_layernorm", "scale"),
    "post_feedforward_layernorm.weight": ("post_feedforward_layernorm", "scale"),
    "self_attn.q_norm.weight": ("self_attn", "q_norm", "scale"),
    "self_attn.k_norm.weight": ("self_attn", "k_norm", "scale"),
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
      CheckpointError: missing, unreadable, truncated or non-object ``config.json``; a missing
        field; a zero, negative, non-integer or otherwise impossible value (named with the file).
      UnsupportedModelError: an architecture other than llama / mistral / qwen2 / gemma3_text.
    """
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file}: config.json not found (is {path} a Hugging Face model directory?)")
    d = _read_json(cfg_file, "config.json")
    try:
        if d.get("model_type") in ("gemma3", "gemma3_text"):
            return Gemma3Config.from_hf_dict(d)
        return LlamaConfig.from_hf_dict(d)
    except (UnsupportedModelError, CheckpointError) as e:
        raise type(e)(f"{cfg_file}: {e}") from e
    except KeyError as e:
        raise CheckpointError(f"{cfg_file}: config.json lacks the field {e}") from e


def _read_json(file: Path, what: str, limit: int = 64 << 20):
    """A JSON file that must hold an object; refused if larger than ``limit`` bytes."""
    try:
        n = file.stat().st_size
        if n > limit:
            raise CheckpointError(f"{file}: {what} is {n} bytes; at most {limit} are expected")
        d = json.loads(file.read_bytes())
    except (OSError, ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file}: cannot parse {what} ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: {what} must hold a JSON object, not {type(d).__name__} {short(d)}")
    return d


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def refuse_pickle(file: Path) -> CheckpointError:
    """The error for a PyTorch pickle checkpoint: jquant never unpickles (it can run arbitrary code)."""
    return CheckpointError(
        f"{file}: pickle-based PyTorch weights ({file.suffix}) are refused: unpickling a file can run arbitrary "
        "code. Convert the checkpoint to safetensors in a trusted environment, e.g. `transformers."
        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)`, and load that")


def _shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, checked to exist and to lie inside ``path``."""
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{index}: 'weight_map' must be a non-empty mapping of tensor name to shard file "
                                  f"name, got {short(weight_map)}")
        files = []
        for s in sorted(set(weight_map.values())):
            f = path / s
            # lexical check: symlinks inside the directory (the Hugging Face cache's blobs) stay allowed
            if Path(s).is_absolute() or not Path(s).parts or ".." in Path(s).parts:
                raise CheckpointError(f"{index}: shard {s!r} lies outside the checkpoint directory {path}; "
                                      "shards must be plain file names inside it")
            if f.suffix in PICKLE_SUFFIXES:
                raise refuse_pickle(f)
            if f.suffix != ".safetensors":
                raise CheckpointError(f"{index}: shard {s!r} is not a .safetensors file")
            files.append(f)
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(
                f"{index} lists shard(s) that do not exist: {', '.join(map(str, missing))}")
        return files
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(f for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise refuse_pickle(pickles[0])
        raise CheckpointError(f"{path}: no *.safetensors file (expected {SINGLE_FILE} or {INDEX_FILE})")
    return files


# safetensors dtype -> bytes per element; float parameters may be stored in the _FLOAT ones only.
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_FLOAT = ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2")
_MAX_HEADER = 100 << 20  # the safetensors library's own limit


class _Entry(NamedTuple):
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


def _safetensors_header(f: Path) -> dict[str, _Entry]:
    """The tensor table of a safetensors file, every field and range checked before any data is read.

    Format: ``u64`` header length ``n``, ``n`` bytes of JSON ``{name: {dtype, shape, data_offsets:
    [begin, end]}, "__metadata__": {...}}``, then the data (offsets relative to its start).
    """
    try:
        with open(f, "rb") as fh:
            size_ = os.fstat(fh.fileno()).st_size
            head = fh.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{f}: {size_} bytes, too short for a safetensors header (truncated file)")
            n = struct.unpack("<Q", head)[0]
            if n > min(size_ - 8, _MAX_HEADER):
                raise CheckpointError(f"{f}: declares a {n}-byte header but the file has {size_} bytes "
                                      f"(valid: at most {min(size_ - 8, _MAX_HEADER)}): truncated or corrupt safetensors file")
            raw = fh.read(n)
    except OSError as e:
        raise CheckpointError(f"{f}: cannot read ({e})") from e
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CheckpointError(f"{f}: the safetensors header is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{f}: the safetensors header must be a JSON object, got {short(header)}")
    data_size = size_ - 8 - n
    out = {}
    for name, e in header.items():
        if name == "__metadata__":
            continue
        bad = f"{f}: tensor {name!r}: header entry {short(e)}"
        if not isinstance(e, dict) or not {"dtype", "shape", "data_offsets"} <= set(e):
            raise CheckpointError(f"{bad} needs dtype, shape and data_offsets")
        dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in _ITEMSIZE:
            raise CheckpointError(f"{bad}: unknown dtype {short(dtype)}; valid: {', '.join(_ITEMSIZE)}")
        if not isinstance(shape, list) or len(shape) > 8 or not all(
                isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_SIZE for d in shape):
            raise CheckpointError(f"{bad}: shape must be a list of at most 8 integers in 0..{MAX_SIZE}")
        if not (isinstance(offs, list) and len(offs) == 2 and all(
                isinstance(o, int) and not isinstance(o, bool) for o in offs) and 0 <= offs[0] <= offs[1] <= data_size):
            raise CheckpointError(f"{bad}: data_offsets must be [begin, end] with 0 <= begin <= end <= {data_size} "
                                  "(the data size): truncated or corrupt file")
        need = math.prod(shape) * _ITEMSIZE[dtype]
        if offs[1] - offs[0] != need:
            raise CheckpointError(f"{bad}: {dtype} {shape} needs {need} bytes but data_offsets span "
                                  f"{offs[1] - offs[0]}")
        out[name] = _Entry(dtype, tuple(shape), offs[0], offs[1])
    ranges = sorted((e.begin, e.end, k) for k, e in out.items() if e.end > e.begin)
    for (b0, e0, k0), (b1, _, k1) in zip(ranges, ranges[1:]):
        if e0 > b1:
            raise CheckpointError(f"{f}: tensor {k0!r} (bytes {b0}..{e0}) overlaps tensor {k1!r} (from byte {b1})")
    return out


def _read_tensors(f: Path, names: list[str], dtypes: dict[str, str]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, numpy array)`` one tensor at a time (bf16 / fp8 via ``ml_dtypes``)."""
    from safetensors import safe_open

    try:
        with safe_open(str(f), framework="numpy") as h:
            flax_handle = None
            for k in names:
                if dtypes[k] in ("BF16", "F8_E4M3", "F8_E5M2"):
                    # numpy has no bfloat16: read through the flax backend, bring to host.
                    if flax_handle is None:
                        flax_handle = safe_open(str(f), framework="flax")
                    arr = np.asarray(jax.device_get(flax_handle.get_tensor(k)))
                else:
                    arr = h.get_tensor(k)
                yield k, arr
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

    (For models that do not fit in memory, :func:`stream_hf` reads the decoder blocks one
    at a time.)

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` (or shards with
        ``model.safetensors.index.json``).
      dtype: parameter dtype of the model (weights are cast once, on the host).
    Returns:
      ``(model, config)``; kernels in Flax ``(in, out)`` layout.
    Raises:
      CheckpointError: missing config/shard/tensor, corrupt or truncated file (every header
        field and data range is checked before data is read), a tensor whose shape does not
        match the config or whose dtype is not floating point, a tensor stored twice, a shard
        index naming a missing file or one outside the directory, an unexpected tensor, or
        pickle weights (``.bin``/``.pt``/``.pth``/``.ckpt``: never unpickled).
      UnsupportedModelError: an unsupported architecture.
    """
    model, config, _ = _load(Path(path), dtype, lazy=False)
    return model, config


def stream_hf(path: str | os.PathLike, dtype=jnp.float32):
    """Open a Hugging Face checkpoint directory with its decoder blocks left on disk.

    Every check of :func:`load_hf` runs first (all headers, shapes and dtypes); the
    embedding, final norm and head are read; each block's tensors are read only when asked
    for, so a model far larger than memory can be quantized block by block
    (:func:`jquant.calibrate.quantize_model` with ``read_block``).

    Returns:
      ``(model, config, read_block)``: ``model``'s blocks hold ``jax.ShapeDtypeStruct``
      leaves (no memory); ``read_block(i)`` returns block ``i``'s ``nnx.State`` (float
      ``dtype``, kernels ``(in, out)``), read from the safetensors files tensor by tensor.
    Raises:
      as :func:`load_hf`; CheckpointError also for a pre-quantized checkpoint (its blocks
      are read whole by ``load_hf``).
    """
    return _load(Path(path), dtype, lazy=True)


def _load(path: Path, dtype, lazy: bool):
    if not path.is_dir():
        if path.suffix in PICKLE_SUFFIXES:
            raise refuse_pickle(path)
        raise CheckpointError(f"{path}: not a directory (load_hf expects a Hugging Face model directory)")
    config = read_config(path)
    files = _shard_files(path)
    headers = {f: _safetensors_header(f) for f in files}
    where: dict[str, Path] = {}
    for f, entries in headers.items():
        for name in entries:
            if name in where:
                raise CheckpointError(f"{f}: tensor {name!r} is also in {where[name]}; each tensor must be stored once")
            where[name] = f
    layers = {int(m.group(1)) for m in map(_LAYER_RE.match, where) if m}
    if config.num_hidden_layers > len(layers):  # checked before building a model of that many layers
        raise CheckpointError(f"{path / 'config.json'}: num_hidden_layers={config.num_hidden_layers}, but the "
                              f"checkpoint has tensors for {len(layers)} layer(s) ({short(sorted(layers))})")
    model = abstract_model(config, dtype=dtype)
    qreader = _quantized_reader(path)
    if lazy and qreader is not None:
        raise CheckpointError(f"{path}: a pre-quantized checkpoint is read whole (load_hf), not streamed")
    quantized: dict[tuple, tuple[str, dict[str, tuple[Path, _Entry]]]] = {}  # kernel path -> (module, parts)
    plan: dict[Path, list[tuple[str, nnx.Variable, tuple]]] = {f: [] for f in files}
    for f, entries in headers.items():
        for name, e in entries.items():
            if _IGNORED.search(name):
                continue
            p = hf_name_to_path(name)
            if p is None and qreader is not None and "." in name:  # a packed tensor of a quantized linear?
                module, suffix = name.rsplit(".", 1)
                qp = hf_name_to_path(module + ".weight")
                if suffix in qreader.suffixes and qp is not None and _is_kernel(qp):
                    quantized.setdefault(qp, (module, {}))[1][suffix] = (f, e)
                    continue
            if p is None:
                raise CheckpointError(
                    f"{f}: unexpected tensor {name!r} {e.shape}: not part of a {config.model_type} "
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
            if e.dtype not in _FLOAT:
                raise CheckpointError(f"{f}: tensor {name!r} has dtype {e.dtype}; parameters must be stored as "
                                      f"floating point ({', '.join(_FLOAT)})")
            want = tuple(var.get_value().shape)
            want = want[::-1] if _is_kernel(p) else want  # as stored: HF (out, in)
            if e.shape != want:
                raise CheckpointError(
                    f"{f}: tensor {name!r} has shape {e.shape}, but config.json implies {want}")
            plan[f].append((name, var, p))
    loaded = {p for items in plan.values() for _, _, p in items}
    for qp, (module, parts) in quantized.items():
        if qp in loaded:
            raise CheckpointError(f"{path}: {module} is stored both as a float weight and quantized "
                                  f"({', '.join(sorted(parts))})")
        try:
            _get_variable(model, qp)
        except KeyError:
            raise CheckpointError(f"{path}: unexpected quantized module {module!r}: the config has no parameter "
                                  f"{'/'.join(map(str, qp))}") from None
        if qp[0] == "lm_head" and config.tie_word_embeddings:
            raise CheckpointError(f"{path}: {module} is stored quantized, but tie_word_embeddings is set (the "
                                  "head is the embedding)")
        loaded.add(qp)
    missing = [v_path for v_path, _ in _iter_param_paths(model) if v_path not in loaded]
    if missing:
        names = ", ".join(path_to_hf_name(p) for p in missing[:8])
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise CheckpointError(f"{path}: missing tensor(s) {names}{more} in {', '.join(f.name for f in files)}")
    blocks: dict[int, list[tuple[Path, str, tuple]]] = {}  # lazy: block -> its tensors, read on demand
    for f, items in plan.items():
        if lazy:
            for name, _, p in items:
                if p[0] == "layers":
                    blocks.setdefault(p[1], []).append((f, name, p[2:]))
            items = [it for it in items if it[2][0] != "layers"]
        dtypes = {name: headers[f][name].dtype for name, _, _ in items}
        for (name, var, p), (_, arr) in zip(items, _read_tensors(f, list(dtypes), dtypes)):
            var.set_value(_host_value(arr, f, name, headers[f][name].dtype, p, dtype))
    for qp, (module, parts) in quantized.items():
        var = _get_variable(model, qp)
        scheme = qreader.scheme_of(module)
        if scheme is None:
            raise FormatError(f"{path}: {module} is stored quantized ({', '.join(sorted(parts))}), but the "
                              "quantization_config leaves it in float")
        t = {}
        for suffix, (f, e) in parts.items():
            name = f"{module}.{suffix}"
            for _, arr in _read_tensors(f, [name], {name: e.dtype}):
                if e.dtype in _FLOAT:
                    finite(arr, f"{f}: tensor {name!r} ({e.dtype})")
                t[suffix] = arr
        want = tuple(var.get_value().shape)
        files = sorted({str(f) for f, _ in parts.values()})
        var.set_value(qreader.from_tensors(t, scheme, want, name=f"{', '.join(files)}: {module}", dtype=dtype))
    if not lazy:
        return model, config, None

    def read_block(i: int) -> nnx.State:
        """Block ``i``'s parameters, read from disk now (nothing of it is cached)."""
        if i not in blocks:
            raise CheckpointError(f"{path}: no decoder block {i} (the model has {config.num_hidden_layers})")
        values = {}
        for f in sorted({f for f, _, _ in blocks[i]}):
            items = [(name, rel) for g, name, rel in blocks[i] if g == f]
            dtypes = {name: headers[f][name].dtype for name, _ in items}
            for (name, rel), (_, arr) in zip(items, _read_tensors(f, list(dtypes), dtypes)):
                values["/".join(map(str, rel))] = _host_value(arr, f, name, headers[f][name].dtype, rel, dtype)
        _, abstract = nnx.split(model.layers[i])
        from jquant.spec import path_str

        return jax.tree_util.tree_map_with_path(lambda kp, _: values[path_str(kp)], abstract)

    return model, config, read_block


def _host_value(arr: np.ndarray, f: Path, name: str, stored: str, p: tuple, dtype):
    """A tensor as read, checked finite, transposed to Flax's ``(in, out)`` if a kernel, cast."""
    finite(arr, f"{f}: tensor {name!r} ({stored})")
    if _is_kernel(p):
        arr = arr.T
    return jnp.asarray(np.ascontiguousarray(arr).astype(dtype))


def _quantized_reader(path: Path):
    """The interop reader of a pre-quantized checkpoint (``quantization_config`` in its
    ``config.json``), or None for a float one."""
    qc = _read_json(path / "config.json", "config.json").get("quantization_config")
    if qc is None:
        return None
    from jquant.interop import reader

    return reader(qc, f"{path / 'config.json'}: quantization_config")


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
