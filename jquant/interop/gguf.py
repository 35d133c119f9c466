"""GGUF export of a quantized Llama-family or Gemma 3 model, for llama.cpp and the ``gguf``
package.

Every linear must be a QTensor of a GGML block type (``kquant``: Q4_0 … Q8_0, Q2_K … Q6_K;
``blockfloat``: MXFP4), whose codes *are* the GGUF blocks, or an integer QTensor a classic
block type holds exactly (group 32 with float16 scales: symmetric 4/5/8 bits are Q4_0/Q5_0/
Q8_0, asymmetric 4/5 bits with a float16 minimum are Q4_1/Q5_1). Float parameters are
written as F32 (or ``float_type``), unless the source GGUF holds a tensor whose values are
exactly ours: then its bytes are copied (the shipped models' Q8_0 embeddings).

Metadata: copied from the source GGUF when the model was loaded from one (tokenizer
included); otherwise built from the config and a Hugging Face BPE tokenizer, as llama.cpp's
``convert_hf_to_gguf.py`` writes them. The llama architecture's q/k rows are permuted as
llama.cpp expects (inverse of the import's un-permutation); Gemma's norms are written as
``1 + w``.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import jax
import numpy as np

from jquant import formats
from jquant.errors import CheckpointError, FormatError
from jquant.qtensor import QTensor

FLOAT_TYPES = ("F32", "F16")
_FILE_TYPE = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1",
              "q5_0": "MOSTLY_Q5_0", "q5_1": "MOSTLY_Q5_1", "q8_0": "MOSTLY_Q8_0", "q2_k": "MOSTLY_Q2_K",
              "q3_k": "MOSTLY_Q3_K_M", "q4_k": "MOSTLY_Q4_K_M", "q5_k": "MOSTLY_Q5_K_M", "q6_k": "MOSTLY_Q6_K",
              "mxfp4": "MOSTLY_MXFP4_MOE"}


def _arch(config) -> str:
    mt = config.model_type
    if mt.startswith("gemma3"):
        return "gemma3"
    if mt == "qwen2":
        return "qwen2"
    if mt in ("llama", "mistral"):
        return "llama"
    raise FormatError(f"GGUF export writes llama, qwen2 and gemma3 architectures; the model is {mt!r}")


def _int_blocks(qt: QTensor, where: str) -> tuple[str, np.ndarray]:
    """An integer QTensor as classic GGML blocks ``(N, row_bytes)``, when a type holds it exactly."""
    from jquant.interop.base import int_parts
    from jquant.quantizers import kquant

    g = qt.grid
    K, N = qt.shape
    grid = (g.bits, bool(g.symmetric))
    qtype = next((t for t, gr in kquant.INT_GRIDS.items() if gr == grid), None)
    ok = (qtype is not None and qt.granularity == "group" and qt.group_size == 32 and K % 32 == 0
          and g.scale_dtype == "float16" and qt.g_idx is None and qt.perm is None and qt.outlier_idx is None
          and (g.symmetric or g.zero_type == "float"))
    if not ok:
        raise FormatError(f"{where} ({qt!r}): GGUF holds GGML block types; this integer QTensor is not one (a "
                          "classic type needs group size 32, float16 scales, no act-order, and symmetric 4/5/8 bits "
                          "or asymmetric 4/5 bits with a float minimum (zero_type='float')). Quantize it with "
                          "method 'kquant' (any of Q4_0 … Q6_K), or export GPTQ/AWQ/compressed-tensors")
    codes = np.asarray(jax.device_get(qt.unpacked_codes())).T.reshape(N * K // 32, 32)  # blocks of row n
    d = np.asarray(jax.device_get(qt.scale)).T.reshape(-1)
    m = None if g.symmetric else np.asarray(jax.device_get(qt.zero)).astype(np.float16).T.reshape(-1)
    blocks = np.asarray(jax.device_get(kquant.blocks_from_codes(qtype, codes, d, m)))
    return qtype, blocks.reshape(N, -1)


def _blocks(qt: QTensor, where: str) -> tuple[str, np.ndarray]:
    """``(type, (N, row_bytes) uint8)`` of a quantized kernel ``(K, N)``: its GGUF rows."""
    if qt.grid.fmt in formats.GGML_FORMATS or qt.grid.fmt == "mxfp4":
        if qt.outlier_idx is not None:
            raise FormatError(f"{where}: has LLM.int8 outlier rows; GGUF has no place for them")
        return qt.grid.fmt, np.ascontiguousarray(np.asarray(jax.device_get(qt.codes)).T)
    if qt.grid.fmt == "int":
        return _int_blocks(qt, where)
    raise FormatError(f"{where} ({qt!r}): format {qt.grid.fmt!r} has no GGML block type; valid: "
                      f"{', '.join(formats.GGML_FORMATS)}, mxfp4, or int grids a classic type holds")


def _permute_rows(a: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (``LlamaModel.permute``) for rows ``(out, ...)``."""
    return a.reshape(n_head, 2, a.shape[0] // n_head // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def _copy_fields(w, reader, skip) -> None:
    import gguf

    for key, value in reader.fields.items():
        if key in skip or key.startswith("GGUF."):
            continue
        vtype, itype = reader.field_types[key]
        if vtype == gguf.GGUFValueType.ARRAY:
            vals = value if isinstance(value, list) else np.asarray(value).tolist()
            w.add_key_value(key, vals, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType(itype))
        else:
            w.add_key_value(key, value, gguf.GGUFValueType(vtype))


def _config_fields(w, config, arch: str) -> None:
    """The architecture metadata llama.cpp reads, from the config."""
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_freq_base(float(config.rope_theta))
    head_dim = config.head_dim or config.hidden_size // config.num_attention_heads
    if head_dim * config.num_attention_heads != config.hidden_size or arch == "gemma3":
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    import gguf

    rs = config.rope_scaling
    if rs is not None:
        if rs.get("rope_type") != "linear":
            raise FormatError(f"GGUF export writes linear rope scaling (and llama3 as rope_freqs); the config has "
                              f"{rs!r}")
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rs["factor"]))
    if arch == "gemma3":
        w.add_sliding_window(config.sliding_window)
        w.add_sliding_window_pattern([t == "sliding_attention" for t in config.layer_types])
        w.add_key_value("gemma3.rope.freq_base_swa", float(config.rope_local_base_freq),
                        gguf.GGUFValueType.FLOAT32)


def _tokenizer_fields(w, tokenizer, config) -> None:
    """A Hugging Face byte-level BPE tokenizer as llama.cpp's ``gpt2`` vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = json.loads(backend.to_str()) if backend is not None else {}
    model = spec.get("model") or {}
    byte_level = '"ByteLevel"' in json.dumps(spec.get("pre_tokenizer") or {})
    if model.get("type") != "BPE" or not byte_level:
        raise FormatError("GGUF export of a Hugging Face model needs its byte-level BPE tokenizer (tokenizer.json); "
                          f"this one is {model.get('type') or type(tokenizer).__name__}"
                          f"{'' if byte_level else ' without a ByteLevel pre-tokenizer'}: export from a GGUF source "
                          "instead (jquant quantize --model file.gguf)")
    vocab = backend.get_vocab(with_added_tokens=True)
    n = config.vocab_size
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [5] * n  # UNUSED
    for tok, i in vocab.items():
        if i < n:
            tokens[i], types[i] = tok, 1  # NORMAL
    for added in spec.get("added_tokens") or []:
        if added["id"] < n:
            types[added["id"]] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    for attr, add in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                      ("unk_token_id", w.add_unk_token_id), ("pad_token_id", w.add_pad_token_id)):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            add(int(v))
    if getattr(tokenizer, "chat_template", None):
        w.add_chat_template(tokenizer.chat_template)


def save_gguf(model, config, path: str | os.PathLike, *, source: str | os.PathLike | None = None, tokenizer=None,
              float_type: str = "F32", overwrite: bool = False) -> dict:
    """Write a quantized model as a GGUF file llama.cpp loads.

    Args:
      model: a :class:`~jquant.models.Llama` / ``Gemma3`` whose linears are GGML-block
        QTensors (or integer ones a classic type holds exactly); float linears are allowed.
      config: its config.
      path: the ``.gguf`` file to write (atomically).
      source: the GGUF file the model was loaded from: its metadata and tokenizer are
        copied, and its tensors reused where our values are exactly theirs.
      tokenizer: without ``source``, the model's Hugging Face (byte-level BPE) tokenizer.
      float_type: ``F32`` (exact) or ``F16`` for float parameters not taken from ``source``
        (norms and biases stay F32, as llama.cpp's converter writes them).
    Returns:
      ``{"path", "bytes", "types": {ggml type: tensor count}, "copied": [names reused from
      the source]}``.
    Raises:
      FormatError: a quantized linear no GGML type holds, online rotations or activation
        quantizers, an unsupported architecture or rope scaling, a non-BPE tokenizer.
      CheckpointError: ``path`` exists (without ``overwrite``); no tokenizer and no source.
    """
    import gguf
    from flax import nnx

    from jquant.interop.hf import _check_graph
    from jquant.models.gguf import ROPE_FREQS, _reader, path_to_gguf_name

    if float_type not in FLOAT_TYPES:
        raise FormatError(f"float_type {float_type!r}; valid: {', '.join(FLOAT_TYPES)}")
    _check_graph(model)
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: exists; pass overwrite=True / --overwrite")
    reader = None
    if source is not None and str(source).endswith(".gguf"):
        reader = _reader(source)
    arch = reader.fields.get("general.architecture") if reader is not None else _arch(config)
    if reader is None and tokenizer is None:
        raise CheckpointError("GGUF export needs the model's tokenizer (or the source GGUF file to copy it from)")
    src = {t.name: t for t in reader.tensors} if reader is not None else {}
    n_heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    w = gguf.GGUFWriter(str(tmp), arch)
    if reader is not None:
        _copy_fields(w, reader, skip={"general.architecture", "general.file_type", "general.alignment",
                                      "general.quantization_version"})
    else:
        if arch == "gemma3":
            raise FormatError("GGUF export of a Gemma 3 model from a Hugging Face directory is not supported (its "
                              "SentencePiece vocabulary is not written here): quantize the GGUF file instead "
                              "(jquant quantize --model gemma3-270m or --model FILE.gguf) and export that")
        w.add_name(f"jquant {arch}")
        _config_fields(w, config, arch)
        _tokenizer_fields(w, tokenizer, config)
    types: Counter = Counter()
    copied = []
    tensors = []
    for p, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        p = tuple(p)
        name = path_to_gguf_name(p, arch)
        where = "/".join(map(str, p))
        value = var.get_value()
        heads = next((h for k, h in n_heads.items() if f".{k}." in name), None) if arch == "llama" else None
        if isinstance(value, QTensor) and p[-1] == "kernel":
            qtype, rows = _blocks(value, where)
            if heads is not None:
                rows = _permute_rows(rows, heads)
            tensors.append((name, rows, gguf.GGMLQuantizationType[qtype.upper()]))
            types[qtype] += 1
            continue
        if isinstance(value, QTensor):
            raise FormatError(f"{where} ({value!r}): GGUF export quantizes linears; this parameter is quantized "
                              "in a layout GGUF does not hold (leave it float in the recipe)")
        arr = np.asarray(jax.device_get(value), np.float32)
        if p[-1] == "kernel":
            arr = arr.T
        if heads is not None:
            arr = _permute_rows(arr, heads)
        if config.norm_unit_offset and p[-1] == "scale":
            arr = arr + np.float32(1)
        t = src.get(name)
        if t is not None and t.tensor_type.name not in ("F32",) and arr.ndim == 2:
            from gguf import quants

            theirs = np.asarray(quants.dequantize(t.data, t.tensor_type), np.float32).reshape(arr.shape)
            if np.array_equal(theirs, arr):
                tensors.append((name, np.asarray(t.data), t.tensor_type))
                types[t.tensor_type.name.lower()] += 1
                copied.append(name)
                continue
        if arr.ndim == 2 and float_type == "F16":
            tensors.append((name, arr.astype(np.float16), gguf.GGMLQuantizationType.F16))
            types["F16"] += 1
        else:
            tensors.append((name, np.ascontiguousarray(arr), gguf.GGMLQuantizationType.F32))
            types["F32"] += 1
    factors = getattr(config, "rope_freq_factors", None)
    if factors is not None:
        tensors.append((ROPE_FREQS, np.asarray(factors, np.float32), gguf.GGMLQuantizationType.F32))
    quantized = Counter({k: v for k, v in types.items() if k not in ("F32", "F16")})
    main = quantized.most_common(1)[0][0] if quantized else float_type
    w.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPE.get(main, "GUESSED")))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for name, data, qtype in tensors:
        if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(name, data)
        else:
            w.add_tensor(name, data, raw_dtype=qtype)
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return {"path": str(path), "bytes": path.stat().st_size, "types": dict(types), "copied": copied}
