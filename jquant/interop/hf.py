"""Pre-quantized Hugging Face checkpoints: write a quantized Flax model in the GPTQ, AWQ or
compressed-tensors format, and read those formats back into QTensors without dequantizing.

A directory holds ``config.json`` (with ``quantization_config``), ``model.safetensors``, the
tokenizer files, and for GPTQ ``quantize_config.json``. Quantized linears are stored as their
format's packed tensors under the module's name (``model.layers.0.self_attn.q_proj.qweight``);
every other parameter as a float ``.weight`` in the model's dtype.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from jquant.errors import CheckpointError, FormatError
from jquant.interop import awq, compressed_tensors, gptq
from jquant.interop.base import Scheme, int_parts

EXPORT_FORMATS = ("gptq", "gptq_v2", "awq", "compressed-tensors")


class Reader(NamedTuple):
    """How to read one pre-quantized format: the tensor suffixes of a quantized linear, its
    scheme by module name (None: not quantized), and the tensors -> QTensor conversion."""

    name: str
    suffixes: tuple[str, ...]
    scheme_of: Callable[[str], Scheme | None]
    from_tensors: Callable[..., Any]


def reader(qc: Any, where: str) -> Reader:
    """The :class:`Reader` for a ``quantization_config``.

    Raises:
      FormatError: a config that is not a mapping, an unknown ``quant_method`` (bitsandbytes,
        fp8, … are named), or invalid fields of a known one.
    """
    if not isinstance(qc, dict):
        raise FormatError(f"{where}: quantization_config must be a mapping, got {type(qc).__name__}")
    method = str(qc.get("quant_method", "")).lower()
    if method == "gptq":
        scheme_of, fmt = gptq.parse_config(qc, where)
        return Reader("gptq", gptq.SUFFIXES, scheme_of,
                      lambda t, s, shape, **kw: gptq.from_tensors(t, s, shape, checkpoint_format=fmt, **kw))
    if method == "awq":
        return Reader("awq", awq.SUFFIXES, awq.parse_config(qc, where), awq.from_tensors)
    if method == "compressed-tensors":
        return Reader("compressed-tensors", compressed_tensors.SUFFIXES, compressed_tensors.parse_config(qc, where),
                      compressed_tensors.from_tensors)
    raise FormatError(f"{where}: quant_method {qc.get('quant_method')!r} is not read; valid: gptq, awq, "
                      "compressed-tensors (pack-quantized)")


def _module(path: tuple) -> str:
    from jquant.models.hf import path_to_hf_name

    return path_to_hf_name(path).removesuffix(".weight")


def _check_graph(model) -> None:
    """Refuse models whose graph does more than the HF architecture: online rotations and
    activation / KV-cache quantizers have no place in these formats."""
    from flax import nnx

    from jquant.models.layers import Linear
    from jquant.models.llama import Attention

    for p, node in nnx.iter_graph(model):
        where = "/".join(map(str, p))
        if isinstance(node, Linear) and (node.input_transform is not None or node.input_quant is not None):
            raise FormatError(f"{where}: has an online input {'rotation' if node.input_transform else 'quantizer'}; "
                              "GPTQ/AWQ/compressed-tensors checkpoints hold weight-only models (export a recipe "
                              "without activation quantization or online Hadamard rotations)")
        if isinstance(node, Attention) and node.kv_quant is not None:
            raise FormatError(f"{where}: quantizes its KV cache; these formats hold weight-only models")


def save_quantized(model, config, path: str | os.PathLike, fmt: str, tokenizer=None, *,
                   float_dtype=None, overwrite: bool = False) -> dict:
    """Write a model whose linears are QTensors as a pre-quantized HF checkpoint.

    Args:
      model: a :class:`~jquant.models.Llama` / ``Gemma3`` with QTensor kernels (``jquant
        quantize`` output restored into it).
      config: its :class:`~jquant.models.LlamaConfig`.
      path: output directory (created; refused if it holds a checkpoint, unless ``overwrite``).
      fmt: ``gptq`` (v1, what every GPTQ loader reads), ``gptq_v2``, ``awq``,
        ``compressed-tensors``.
      tokenizer: a ``transformers`` tokenizer, saved beside the weights.
      float_dtype: dtype of the parameters stored in float (embedding, norms, float linears);
        default the model's (exact). ``float16``/``bfloat16`` halve a float32 model's embedding.
    Returns:
      a report: ``{"format", "quantized": [module], "float": [module], "dequantized":
      [parameter], "bytes": int}`` (``dequantized``: quantized parameters outside the linears,
      e.g. an embedding, that the format stores in float).
    Raises:
      FormatError: an unknown format, or a quantized linear the format cannot express (named,
        with what would be valid); nothing is written then.
    """
    from safetensors.numpy import save_file

    from jquant import __version__
    from jquant.models.hf import INDEX_FILE, SINGLE_FILE, _is_kernel, _iter_param_paths, path_to_hf_name
    from jquant.qtensor import QTensor

    if fmt not in EXPORT_FORMATS:
        raise FormatError(f"export format {fmt!r} unknown; valid: {', '.join(EXPORT_FORMATS)} (and gguf)")
    _check_graph(model)
    path = Path(path)
    if (path / "config.json").exists() and not overwrite:
        raise CheckpointError(f"{path}: holds a checkpoint already (config.json); pass overwrite=True / --overwrite")
    import jax.numpy as jnp

    try:
        dtype = np.dtype(jnp.dtype(float_dtype or model.dtype))
    except TypeError:
        raise FormatError(f"float_dtype {float_dtype!r}; valid: float32, float16, bfloat16") from None
    if dtype.name not in ("float32", "float16", "bfloat16"):
        raise FormatError(f"float_dtype {dtype.name!r}; valid: float32, float16, bfloat16")
    tensors: dict[str, np.ndarray] = {}
    schemes: dict[str, Scheme] = {}
    scale_dtypes: dict[str, str] = {}
    skipped, dequantized = [], []
    for p, var in _iter_param_paths(model):
        w = var.get_value()
        name = path_to_hf_name(p)
        linear = _is_kernel(p)
        if linear and isinstance(w, QTensor):
            module = _module(p)
            parts = int_parts(w, "/".join(map(str, p)), fmt=fmt)
            if fmt in ("gptq", "gptq_v2"):
                t = gptq.to_tensors(parts, module, checkpoint_format=fmt)
            elif fmt == "awq":
                t = awq.to_tensors(parts, module)
            else:
                t = compressed_tensors.to_tensors(parts, module)
            for k, a in t.items():
                tensors[f"{module}.{k}"] = a
            schemes[module] = parts.scheme
            scale_dtypes[module] = parts.scale.dtype.name
            continue
        if isinstance(w, QTensor):
            dequantized.append("/".join(map(str, p)))
            w = w.dequantize(dtype)
        arr = np.asarray(jax.device_get(w))
        if linear:
            skipped.append(_module(p))
            arr = arr.T
        tensors[name] = np.ascontiguousarray(arr.astype(dtype) if arr.dtype != dtype else arr)
    if fmt in ("gptq", "gptq_v2"):
        qc = gptq.quantization_config(schemes, [m for m in skipped if m != "lm_head"], fmt, __version__)
    elif fmt == "awq":
        qc = awq.quantization_config(schemes, skipped)
    else:
        qc = compressed_tensors.quantization_config(schemes, skipped, scale_dtypes, _ct_version())
    path = path.resolve()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if dtype.name == "bfloat16":
            from safetensors.flax import save_file as save_flax

            save_flax({k: jnp.asarray(v) for k, v in tensors.items()}, str(tmp / SINGLE_FILE),
                      metadata={"format": "pt"})
        else:
            save_file(tensors, str(tmp / SINGLE_FILE), metadata={"format": "pt"})
        d = config.to_hf_dict()
        d["torch_dtype"] = {"float32": "float32", "float16": "float16"}.get(dtype.name, "bfloat16")
        d["quantization_config"] = qc
        (tmp / "config.json").write_text(json.dumps(d, indent=2) + "\n")
        if fmt in ("gptq", "gptq_v2"):
            (tmp / "quantize_config.json").write_text(json.dumps(qc, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if path.exists():  # files replaced one by one: what else the directory holds stays, but for
            # the weights and configs of an earlier export, which would contradict this one
            for f in [*path.glob("model*.safetensors"), path / INDEX_FILE, path / "quantize_config.json"]:
                if f.is_file() and not (tmp / f.name).exists():
                    f.unlink()
            for f in tmp.iterdir():
                os.replace(f, path / f.name)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    return {"format": fmt, "quantized": sorted(schemes), "float": sorted(skipped), "dequantized": dequantized,
            "bytes": size, "weights_bytes": (path / SINGLE_FILE).stat().st_size}


def _ct_version() -> str:
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # noqa: BLE001  (not installed: the format does not need the package)
        return "0.20.0"
