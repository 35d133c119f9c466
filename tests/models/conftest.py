"""Shared fixtures: tiny random Hugging Face models saved as safetensors directories."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

torch.set_num_threads(1)

VOCAB = 128


def _randomize(model, seed: int) -> None:
    """Re-draw every parameter so logits are O(1) (HF's init makes them ~0 and parity trivial)."""
    g = torch.Generator().manual_seed(seed)
    centre = 0.0 if model.config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # Gemma's norms weigh by 1 + w: a zero-centred w
                p.copy_(centre + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(0.25 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(p.shape[1]))


def tiny_hf_model(kind: str = "llama", *, tie: bool = False, kv_heads: int = 2, rope_scaling=None,
                  seed: int = 0, layers: int = 2, layer_types=None, query_pre_attn_scalar: float = 24):
    """A tiny random float32 ``*ForCausalLM`` (hidden 64, 4 heads, vocab 128); Gemma 3 with
    ``layer_types`` (default: global every third layer from the second) and
    ``query_pre_attn_scalar``."""
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256,
                  rms_norm_eps=1e-5, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=10000.0, rope_scaling=rope_scaling)
        model = transformers.LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = transformers.Qwen2Config(**common, rope_theta=1000000.0)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "mistral":
        cfg = transformers.MistralConfig(**common, rope_theta=10000.0, sliding_window=5)
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "gemma3":
        # Local (window 5, base 1e4) and global (base 1e6, optional rope scaling) layers, a
        # query scale other than head_dim's; the caller passes tie=True for Gemma 3 as shipped.
        common.update(head_dim=16)
        if layer_types is None:
            layer_types = [("sliding_attention", "full_attention")[i % 3 == 1] for i in range(layers)]
        full = {"rope_type": "default", "rope_theta": 1e6} if rope_scaling is None else \
            {**rope_scaling, "rope_theta": 1e6}
        cfg = transformers.Gemma3TextConfig(
            **common, sliding_window=5, layer_types=list(layer_types), query_pre_attn_scalar=query_pre_attn_scalar,
            rope_parameters={"full_attention": full, "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        raise ValueError(kind)
    model.config._attn_implementation = "eager"
    _randomize(model, seed)
    if tie:
        model.tie_weights()
    return model.eval()


@pytest.fixture
def save_tiny(tmp_path):
    """``save_tiny(name, **kw) -> (dir, torch_model)``; extra ``max_shard_size`` shards the file."""

    def make(name: str = "m", max_shard_size=None, **kw):
        model = tiny_hf_model(**kw)
        d = tmp_path / name
        extra = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
        model.save_pretrained(d, safe_serialization=True, **extra)
        return d, model

    return make


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def torch_linear_inputs(model, layer: int, tokens: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Logits of ``model`` on ``tokens`` and the input of every ``nn.Linear`` of decoder layer
    ``layer`` (forward hooks), keyed like ``forward_with_inputs``: ``'self_attn/q_proj'``, …"""
    seen, hooks = {}, []
    for name, mod in model.model.layers[layer].named_modules():
        if isinstance(mod, torch.nn.Linear):
            hooks.append(mod.register_forward_hook(
                lambda m, inp, out, name=name: seen.__setitem__(name.replace(".", "/"), inp[0].numpy())))
    try:
        return torch_logits(model, tokens), seen
    finally:
        for h in hooks:
            h.remove()
