"""Write tiny GGUF files from tiny HF models the way llama.cpp's converter does (for tests)."""

from __future__ import annotations

import math
import struct

import numpy as np


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (q: n_head, k: n_head_kv)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def llama_cpp_rope_freqs(hparams: dict):
    """llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.generate_extra_tensors``: the F32
    ``rope_freqs.weight`` of a ``llama3``-scaled model, or ``None`` for another rope type.

    ``hparams`` is the model's ``config.json`` dict. As in the converter, the arithmetic is on
    torch float32 scalars, the rope parameters come from ``rope_parameters`` (or
    ``rope_scaling``) with its defaults, and ``original_max_position_embeddings`` from the *top
    level* of ``hparams`` (default 8192), not from the rope parameters.
    """
    import torch

    rope_params = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    rope_params.setdefault("rope_theta", hparams.get("rope_theta"))
    if rope_params.get("rope_type", rope_params.get("type", "")).lower() != "llama3":
        return None
    base = rope_params.get("rope_theta", 10000.0)
    if (dim := hparams.get("head_dim")) is None:
        dim = hparams["hidden_size"] // hparams["num_attention_heads"]
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope_params.get("factor", 8.0)
    low_freq_factor = rope_params.get("low_freq_factor", 1.0)
    high_freq_factor = rope_params.get("high_freq_factor", 4.0)
    old_context_len = hparams.get("original_max_position_embeddings", 8192)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    rope_factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(rope_factors, dtype=torch.float32).numpy()


def write_gguf(path, tmodel, *, arch: str = "llama", qtype: str = "F32", extra_tensors=None,
               replace=None, meta=None, rope_freqs: bool = False) -> None:
    """Write ``tmodel`` (a tiny ``LlamaForCausalLM``/``Qwen2ForCausalLM``) as GGUF.

    ``qtype``: storage of the 2-D linear weights (``F32``, ``F16``, ``Q4_1``, ``Q8_0``); norms
    and biases stay F32, the embedding follows ``qtype``. ``replace`` maps GGUF names to arrays
    written as they are (e.g. an int32 tensor); ``extra_tensors`` are added at the end.
    ``meta`` maps metadata keys to ``(value, GGUFValueType[, sub_type])`` written instead of the
    usual value, or to ``None`` to leave the key out. ``rope_freqs``: add ``rope_freqs.weight``
    as llama.cpp's converter does for a ``llama3``-scaled model (:func:`llama_cpp_rope_freqs`,
    which also needs ``original_max_position_embeddings`` at the top level of the config).
    """
    cfg = tmodel.config
    sd = {k: v.detach().float().numpy() for k, v in tmodel.state_dict().items()}
    if rope_freqs:
        factors = llama_cpp_rope_freqs(cfg.to_dict())
        if factors is None:
            raise ValueError(f"rope_freqs=True needs llama3 rope scaling, not {cfg.rope_parameters}")
        extra_tensors = {"rope_freqs.weight": factors, **(extra_tensors or {})}
    write_gguf_state(path, sd, dict(
        layers=cfg.num_hidden_layers, heads=cfg.num_attention_heads, kv_heads=cfg.num_key_value_heads,
        hidden=cfg.hidden_size, intermediate=cfg.intermediate_size, vocab=cfg.vocab_size,
        context=cfg.max_position_embeddings, eps=cfg.rms_norm_eps, tie=cfg.tie_word_embeddings,
        rope_theta=float(cfg.rope_parameters["rope_theta"])),
        arch=arch, qtype=qtype, extra_tensors=extra_tensors, replace=replace, meta=meta)


def _tensor_adder(w, qt, replace=None):
    """``add(name, arr, quantize)``: write a float tensor, in ``qt`` when ``quantize`` (else F32);
    a name in ``replace`` is written as the array given there."""
    import gguf

    def add(name, arr, quantize):
        if replace and name in replace:
            w.add_tensor(name, replace[name])
            return
        arr = np.ascontiguousarray(arr.astype(np.float32))
        if quantize and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, arr)

    return add


def write_gguf_state(path, sd, cfg, *, arch: str = "llama", qtype: str = "F32", extra_tensors=None,
                     replace=None, meta=None) -> None:
    """:func:`write_gguf` from a Hugging Face state dict of float numpy arrays and a dict ``cfg``
    (``layers, heads, kv_heads, hidden, intermediate, vocab, context, eps, tie, rope_theta``)."""
    import gguf

    heads, kv = cfg["heads"], cfg["kv_heads"]
    qt = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(cfg["layers"])
    w.add_context_length(cfg["context"])
    w.add_embedding_length(cfg["hidden"])
    w.add_feed_forward_length(cfg["intermediate"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["eps"])
    w.add_rope_dimension_count(cfg["hidden"] // heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(cfg["vocab"])])
    w.add_token_types([1] * cfg["vocab"])
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    for key, val in (meta or {}).items():
        w.kv_data[0].pop(key, None)
        if val is not None:
            w.add_key_value(key, *val)

    add = _tensor_adder(w, qt, replace)

    add("token_embd.weight", sd["model.embed_tokens.weight"], True)
    add("output_norm.weight", sd["model.norm.weight"], False)
    if not cfg["tie"]:
        add("output.weight", sd["lm_head.weight"], True)
    for i in range(cfg["layers"]):
        for hf, gg in _HF_TO_GGUF.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{kind}"
                if key not in sd:
                    continue
                arr = sd[key]
                if arch == "llama" and gg in ("attn_q", "attn_k"):
                    arr = llama_cpp_permute(arr, heads if gg == "attn_q" else kv)
                add(f"blk.{i}.{gg}.{kind}", arr, arr.ndim == 2)
    for name, arr in (extra_tensors or {}).items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _str(s: bytes | str) -> bytes:
    s = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(s)) + s


def raw_gguf(kv=(), tensors=(), data: bytes = b"", *, n_kv=None, n_tensors=None, version=3,
             alignment=32) -> bytes:
    """Hand-encoded GGUF bytes for hostile-file tests: every count can lie.

    ``kv``: ``(key, type_id, encoded value bytes)``; ``tensors``: ``(name, dims, ggml_type, offset)``
    (``dims`` GGML order); ``data`` follows the header, padded to ``alignment``.
    """
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                len(kv) if n_kv is None else n_kv)
    for key, vtype, value in kv:
        out += _str(key) + struct.pack("<I", vtype) + value
    for name, dims, ttype, offset in tensors:
        out += _str(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ttype, offset)
    return out + b"\0" * (-len(out) % alignment) + data


def kv_string(s: str) -> bytes:
    """A GGUF string value."""
    return _str(s)


def kv_array(itype: int, payload: bytes, n: int) -> bytes:
    """A GGUF array value: element type, declared length ``n``, and the element bytes as given."""
    return struct.pack("<IQ", itype, n) + payload


_HF_TO_GGUF_GEMMA3 = {
    **_HF_TO_GGUF, "post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
}


def write_gemma3_gguf(path, tmodel, *, qtype: str = "F32", swa_pattern: bool = False, meta=None) -> None:
    """Write a tiny ``Gemma3ForCausalLM`` as llama.cpp's converter does: ``gemma3`` metadata,
    every norm weight stored as ``1 + w``, q/k not permuted, tied embedding. llama.cpp
    assumes every sixth layer global; ``swa_pattern=True`` also writes the per-layer
    ``gemma3.attention.sliding_window_pattern`` (true: sliding window)."""
    import gguf

    cfg = tmodel.config
    sd = {k: v.detach().float().numpy() for k, v in tmodel.state_dict().items()}
    qt = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_name("tiny-gemma")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(float(cfg.rope_parameters["full_attention"]["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_sliding_window(cfg.sliding_window)
    if swa_pattern:
        w.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    for key, val in (meta or {}).items():
        w.add_key_value(key, *val)

    add = _tensor_adder(w, qt)

    add("token_embd.weight", sd["model.embed_tokens.weight"], True)
    add("output_norm.weight", sd["model.norm.weight"] + 1, False)
    for i in range(cfg.num_hidden_layers):
        for hf, gg in _HF_TO_GGUF_GEMMA3.items():
            arr = sd[f"model.layers.{i}.{hf}.weight"]
            add(f"blk.{i}.{gg}.weight", arr + 1 if "norm" in gg else arr, arr.ndim == 2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
