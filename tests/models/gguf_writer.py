"""Write tiny GGUF files from tiny HF models the way llama.cpp's converter does (for tests)."""

from __future__ import annotations

import numpy as np


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp ``convert_hf_to_gguf.py`` ``LlamaModel.permute`` (q: n_head, k: n_head_kv)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def write_gguf(path, tmodel, *, arch: str = "llama", qtype: str = "F32", extra_tensors=None,
               replace=None) -> None:
    """Write ``tmodel`` (a tiny ``LlamaForCausalLM``/``Qwen2ForCausalLM``) as GGUF.

    ``qtype``: storage of the 2-D linear weights (``F32``, ``F16``, ``Q4_1``, ``Q8_0``); norms
    and biases stay F32, the embedding follows ``qtype``. ``replace`` maps GGUF names to arrays
    written as they are (e.g. an int32 tensor); ``extra_tensors`` are added at the end.
    """
    import gguf

    cfg = tmodel.config
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    qt = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // heads)
    w.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_Q4_1)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"t{i}" for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name, arr, quantize):
        if replace and name in replace:
            w.add_tensor(name, replace[name])
            return
        arr = np.ascontiguousarray(arr.astype(np.float32))
        if quantize and qt != gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, gguf.quants.quantize(arr, qt), raw_dtype=qt)
        else:
            w.add_tensor(name, arr)

    sd = {k: v.detach().float().numpy() for k, v in tmodel.state_dict().items()}
    add("token_embd.weight", sd["model.embed_tokens.weight"], True)
    add("output_norm.weight", sd["model.norm.weight"], False)
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"], True)
    for i in range(cfg.num_hidden_layers):
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
