"""GGUF import: synthetic tiny files written like llama.cpp, and the real SmolLM2 Q4_1 model."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VOCAB, tiny_hf_model, torch_logits
from flax import nnx
from gguf_writer import llama_cpp_permute, write_gguf

from jquant.errors import CheckpointError, UnsupportedModelError
from jquant.models import (abstract_model, config_from_gguf, default_model_path, generate, gguf_name_to_path,
                           gguf_q4_1_blocks, load, load_gguf, read_gguf_tensor, rope_inv_freq, save_hf, unpermute_qk)

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tokens(seed=0, batch=2, seq=16):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq))


def _kernel(model, name):
    node = model
    for k in gguf_name_to_path(name):
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return np.asarray(node.get_value())


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    for n_head, rows in [(4, 64), (2, 32), (9, 576)]:
        w = rng.standard_normal((rows, 8))
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
        b = rng.standard_normal(rows)
        np.testing.assert_array_equal(unpermute_qk(llama_cpp_permute(b, n_head), n_head), b)
    # on a 1-head example the layouts are: llama.cpp interleaves the two halves (GPT-J pairs)
    np.testing.assert_array_equal(llama_cpp_permute(np.arange(8), 1), [0, 4, 1, 5, 2, 6, 3, 7])


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
def test_f32_gguf_recovers_hf_model(tmp_path, tie, kv_heads):
    tmodel = tiny_hf_model(tie=tie, kv_heads=kv_heads)
    write_gguf(tmp_path / "m.gguf", tmodel)
    model, config, tok = load_gguf(tmp_path / "m.gguf", tokenizer=False)
    assert tok is None and config.tie_word_embeddings == tie and config.num_key_value_heads == kv_heads
    toks = _tokens()
    diff = float(np.abs(np.asarray(model(jnp.asarray(toks))[0]) - torch_logits(tmodel, toks)).max())
    assert diff < 1e-4, diff
    np.testing.assert_array_equal(
        _kernel(model, "blk.1.attn_k.weight"), tmodel.model.layers[1].self_attn.k_proj.weight.detach().numpy().T)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q4_1_gguf_matches_transformers_gguf_loader(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    tmodel = tiny_hf_model(kind=arch, kv_heads=2)
    write_gguf(tmp_path / "m.gguf", tmodel, arch=arch, qtype="Q4_1")
    model, config, _ = load_gguf(tmp_path / "m.gguf", tokenizer=False)
    assert config.model_type == arch and config.attention_bias == (arch == "qwen2")
    ref_model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    toks = _tokens()
    ref = torch_logits(ref_model, toks)
    diff = float(np.abs(np.asarray(model(jnp.asarray(toks))[0]) - ref).max())
    assert np.abs(ref).max() > 1.0 and diff < 1e-4, diff


def _blocks_reference(path, name, n_head):
    """An independent decode of the Q4_1 bytes: ``gguf.quants.dequantize`` + llama.cpp inverse."""
    raw, ttype, shape = read_gguf_tensor(path, name)
    w = gguf.quants.dequantize(raw, ttype).reshape(shape)
    return unpermute_qk(w, n_head).T if n_head else w.T


@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.1.attn_k.weight", "blk.0.ffn_down.weight",
                                  "token_embd.weight"])
def test_q4_1_blocks(tmp_path, name):
    tmodel = tiny_hf_model(kv_heads=2)
    write_gguf(tmp_path / "m.gguf", tmodel, qtype="Q4_1")
    model, config, _ = load_gguf(tmp_path / "m.gguf", tokenizer=False)
    d, m, codes = gguf_q4_1_blocks(tmp_path / "m.gguf", name)
    n_in, n_out = codes.shape
    assert d.dtype == m.dtype == np.float16 and codes.dtype == np.uint8
    assert d.shape == m.shape == (n_in // 32, n_out) and codes.max() <= 15
    w = d.astype(np.float32).repeat(32, 0) * codes + m.astype(np.float32).repeat(32, 0)
    n_head = {"attn_q": 4, "attn_k": 2}.get(name.split(".")[2] if name.startswith("blk") else "", 0)
    np.testing.assert_array_equal(w, _blocks_reference(tmp_path / "m.gguf", name, n_head))
    loaded = _kernel(model, name)
    np.testing.assert_array_equal(w, loaded if name != "token_embd.weight" else loaded.T)


def test_unknown_tensor_type(tmp_path):
    tmodel = tiny_hf_model()
    write_gguf(tmp_path / "m.gguf", tmodel,
               replace={"blk.1.ffn_up.weight": np.zeros((160, 64), np.int32)})
    with pytest.raises(CheckpointError, match="'blk.1.ffn_up.weight' has GGML type I32"):
        load_gguf(tmp_path / "m.gguf", tokenizer=False)


def test_bad_gguf_files(tmp_path):
    tmodel = tiny_hf_model()
    write_gguf(tmp_path / "m.gguf", tmodel)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_gguf(tmp_path / "cut.gguf", tokenizer=False)
    with pytest.raises(CheckpointError, match="not found"):
        load_gguf(tmp_path / "absent.gguf", tokenizer=False)
    with pytest.raises(CheckpointError, match="no tensor 'nope'"):
        read_gguf_tensor(tmp_path / "m.gguf", "nope")
    with pytest.raises(CheckpointError, match="is F32, not Q4_1"):
        gguf_q4_1_blocks(tmp_path / "m.gguf", "blk.0.attn_q.weight")


# -- Llama 3.x: rope_freqs.weight (llama3 rope scaling as llama.cpp stores it) -------------

# head_dim 16, rope_theta 1e4: the wavelengths 2*pi*1e4**(i/8) are 6.3, 19.9, 62.8, 199, ... so with an
# original context of 64 (low/high wavelengths 64 and 16) pair 0 keeps its frequency, pairs 1 and 2
# are interpolated and pairs 3-7 are divided by 8.
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}
SEQ = 96  # longer than the original context


def _llama3_model():
    tmodel = tiny_hf_model(rope_scaling=dict(LLAMA3))  # a copy: transformers adds rope_theta to it
    # config.json also states it at the top level, where llama.cpp's converter reads it (default 8192)
    tmodel.config.original_max_position_embeddings = LLAMA3["original_max_position_embeddings"]
    return tmodel


def _rel_err(out, ref) -> float:
    return float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())


def _with_config(model, config):
    """``model``'s parameters under another config (the config is static, in the graph)."""
    _, state = nnx.split(model)
    return nnx.merge(nnx.graphdef(abstract_model(config)), state)


def test_rope_freqs_gguf_matches_transformers_llama3(tmp_path):
    tmodel = _llama3_model()
    write_gguf(tmp_path / "m.gguf", tmodel, rope_freqs=True)
    factors, ttype, shape = read_gguf_tensor(tmp_path / "m.gguf", "rope_freqs.weight")
    assert ttype.name == "F32" and shape == (8,)
    assert factors[0] == 1 and 1 < factors[1] < factors[2] < 8 and (factors[3:] == 8).all()  # all three regimes
    model, config, _ = load_gguf(tmp_path / "m.gguf", tokenizer=False)
    assert config.rope_scaling is None and config.rope_freq_factors == tuple(factors.tolist())
    hf_inv = tmodel.model.rotary_emb.inv_freq.numpy()
    np.testing.assert_allclose(rope_inv_freq(config), hf_inv, rtol=3e-7, atol=0)
    toks = _tokens(seq=SEQ)
    ref = torch_logits(tmodel, toks)
    assert np.abs(ref).max() > 1.0
    err = _rel_err(model(jnp.asarray(toks))[0], ref)
    plain = _with_config(model, dataclasses.replace(config, rope_freq_factors=None))
    err_plain = _rel_err(plain(jnp.asarray(toks))[0], ref)
    print(f"llama3 GGUF vs transformers: rel err {err:.2e} with rope_freqs, {err_plain:.2e} without")
    assert err < 1e-4, err
    assert err_plain > 1e-2, err_plain  # the factors matter: without them the model is another one


def test_rope_freqs_gguf_exports_llama3_config(tmp_path):
    from transformers import AutoModelForCausalLM

    tmodel = _llama3_model()
    write_gguf(tmp_path / "m.gguf", tmodel, rope_freqs=True)
    model, config, _ = load_gguf(tmp_path / "m.gguf", tokenizer=False)
    save_hf(model, config, tmp_path / "hf")
    rs = json.loads((tmp_path / "hf" / "config.json").read_text())["rope_scaling"]
    assert rs == LLAMA3
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    toks = _tokens(seq=SEQ)
    assert _rel_err(torch_logits(back, toks), torch_logits(tmodel, toks)) < 1e-4


@pytest.mark.parametrize("factors, match", [
    (np.ones(7, np.float32), r"has shape \(7,\); \(8,\) \(head_dim/2\) was expected"),
    (np.ones((2, 8), np.float32), r"has shape \(2, 8\)"),
    (np.array([1, 2, np.nan, 8, 8, 8, 8, 8], np.float32), r"1 of 8 values are not finite positive.*value 2 is nan"),
    (np.array([1, 2, 4, 8, 8, 8, 8, -8], np.float32), r"value 7 is -8.0"),
    (np.ones(8, np.int32), r"has GGML type I32; F32 was expected"),
    (np.ones(8, np.float16), r"has GGML type F16; F32 was expected"),
], ids=["length", "2d", "nan", "negative", "i32", "f16"])
def test_bad_rope_freqs(tmp_path, factors, match):
    write_gguf(tmp_path / "m.gguf", tiny_hf_model(), extra_tensors={"rope_freqs.weight": factors})
    for load_ in (config_from_gguf, lambda f: load_gguf(f, tokenizer=False)):
        with pytest.raises(CheckpointError, match=r"m.gguf: GGUF tensor 'rope_freqs.weight' .*" + match):
            load_(tmp_path / "m.gguf")


def test_rope_freqs_only_for_llama_architecture(tmp_path):
    write_gguf(tmp_path / "m.gguf", tiny_hf_model(kind="qwen2"), arch="qwen2",
               extra_tensors={"rope_freqs.weight": np.ones(8, np.float32)})
    with pytest.raises(UnsupportedModelError, match="'rope_freqs.weight'.*in a qwen2 file is not supported"):
        config_from_gguf(tmp_path / "m.gguf")


@pytest.mark.parametrize("meta, linear", [
    ({"llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)}, True),  # no type: llama.cpp reads "linear"
    ({"llama.rope.scaling.type": ("linear", gguf.GGUFValueType.STRING),
      "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)}, True),
    ({"llama.rope.scaling.type": ("none", gguf.GGUFValueType.STRING),
      "llama.rope.scaling.factor": (4.0, gguf.GGUFValueType.FLOAT32)}, False),  # "none" never scales
], ids=["factor-only", "linear", "none"])
def test_gguf_rope_scaling_metadata_as_llama_cpp_reads_it(tmp_path, meta, linear):
    tmodel = tiny_hf_model(rope_scaling={"rope_type": "linear", "factor": 4.0} if linear else None)
    write_gguf(tmp_path / "m.gguf", tmodel, meta=meta)
    model, config, _ = load_gguf(tmp_path / "m.gguf", tokenizer=False)
    assert config.rope_scaling == ({"rope_type": "linear", "factor": 4.0} if linear else None)
    toks = _tokens(seq=SEQ)
    assert _rel_err(model(jnp.asarray(toks))[0], torch_logits(tmodel, toks)) < 1e-4


# -- the real default model ----------------------------------------------------------------

SENTENCE = "The capital of France is Paris, a city known for"


@pytest.fixture(scope="module")
def smollm():
    path = default_model_path()
    model, config, tok = load_gguf(path)
    return path, model, config, tok


@pytest.fixture(scope="module")
def smollm_torch(smollm):
    from transformers import AutoModelForCausalLM

    path = smollm[0]
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.mark.realmodel
def test_smollm2_config_and_tokenizer(smollm):
    path, model, config, tok = smollm
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (49152, 576, 30)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.intermediate_size == 1536 and config.rope_theta == 100000.0 and config.tie_word_embeddings
    assert tok(SENTENCE).input_ids[:5] == [504, 3575, 282, 4649, 314]


@pytest.mark.realmodel
def test_smollm2_logits_match_transformers_gguf(smollm, smollm_torch):
    _, model, _, tok = smollm
    ids = np.asarray([tok(SENTENCE).input_ids])
    ref = torch_logits(smollm_torch, ids)
    out = np.asarray(model(jnp.asarray(ids))[0])
    diff = float(np.abs(out - ref).max())
    print(f"SmolLM2 GGUF max |logit diff| vs transformers: {diff:.3g} (max |logit| {np.abs(ref).max():.1f})")
    assert diff < 1e-3, diff
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.realmodel
@pytest.mark.parametrize("name", ["blk.0.attn_q.weight", "blk.3.attn_k.weight", "blk.29.ffn_down.weight"])
def test_smollm2_q4_1_blocks_reproduce_loaded_kernel(smollm, name):
    path, model, config, _ = smollm
    d, m, codes = gguf_q4_1_blocks(path, name)
    w = d.astype(np.float32).repeat(32, 0) * codes + m.astype(np.float32).repeat(32, 0)
    np.testing.assert_array_equal(w, _kernel(model, name))


@pytest.mark.realmodel
@pytest.mark.slow
def test_smollm2_greedy_generate_matches_transformers(smollm, smollm_torch):
    _, model, _, tok = smollm
    ids = np.asarray([tok(SENTENCE).input_ids])
    with torch.no_grad():
        ref = smollm_torch.generate(torch.tensor(ids), max_new_tokens=8, do_sample=False).numpy()
    out = np.asarray(generate(model, ids, 8))
    np.testing.assert_array_equal(out, ref)


@pytest.mark.realmodel
def test_load_dispatch(smollm):
    path = smollm[0]
    with pytest.raises(CheckpointError, match="expected a Hugging Face model directory or a .gguf"):
        load(path.with_suffix(".txt"))
