"""Llama-family model vs Hugging Face transformers, and safetensors import/export."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VOCAB, tiny_hf_model, torch_linear_inputs, torch_logits
from flax import nnx
from gguf_writer import llama_cpp_rope_freqs

from jquant.errors import CheckpointError, UnsupportedModelError
from jquant.models import LlamaConfig, forward, generate, load, load_hf, rope_inv_freq, save_hf

torch = pytest.importorskip("torch")

TOL = 1e-4
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}
LINEAR = {"rope_type": "linear", "factor": 4.0}


def _tokens(seed=0, batch=2, seq=24):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq))


def _check_parity(d, tmodel, seq=24):
    toks = _tokens(seq=seq)
    ref = torch_logits(tmodel, toks)
    model, _ = load_hf(d)
    out, cache = model(jnp.asarray(toks))
    assert cache is None
    diff = float(np.abs(np.asarray(out) - ref).max())
    assert np.abs(ref).max() > 1.0  # the comparison is not between near-zero numbers
    assert diff < TOL, diff
    return model, diff


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv_heads", [2, 4], ids=["gqa", "mha"])
@pytest.mark.parametrize("rope", [None, LINEAR, LLAMA3], ids=["rope-default", "rope-linear", "rope-llama3"])
def test_llama_logits_match_transformers(save_tiny, tie, kv_heads, rope):
    d, tmodel = save_tiny(tie=tie, kv_heads=kv_heads, rope_scaling=rope)
    model, _ = _check_parity(d, tmodel)
    state = nnx.state(model)
    assert ("lm_head" in state) != tie


def test_qwen2_attention_bias_matches_transformers(save_tiny):
    d, tmodel = save_tiny(kind="qwen2", kv_heads=2)
    model, _ = _check_parity(d, tmodel)
    attn = model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None


def test_mistral_sliding_window_matches_transformers(save_tiny):
    d, tmodel = save_tiny(kind="mistral")  # sliding_window=5 < seq 24: the window matters
    _, config = load_hf(d)
    assert config.sliding_window == 5
    _check_parity(d, tmodel)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_long_sequences_in_attention_chunks_match_transformers(save_tiny, kind):
    """300 tokens: causal attention runs in query chunks of 128, 128 and 44 (Mistral's sliding
    window inside them)."""
    from jquant.models import llama

    assert 300 > 2 * llama._ATTN_CHUNK and 300 % llama._ATTN_CHUNK
    d, tmodel = save_tiny(kind=kind)
    _check_parity(d, tmodel, seq=300)


def test_sharded_checkpoint(save_tiny):
    d, tmodel = save_tiny(max_shard_size="40KB")
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) > 2 and (d / "model.safetensors.index.json").is_file()
    _check_parity(d, tmodel)


def test_bf16_checkpoint(save_tiny, tmp_path):
    tmodel = tiny_hf_model().to(torch.bfloat16)
    tmodel.save_pretrained(tmp_path / "bf16")
    model, _ = load_hf(tmp_path / "bf16", dtype=jnp.float32)
    w = model.layers[1].mlp.down_proj.kernel.get_value()
    ref = tmodel.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(w), ref)  # bf16 -> f32 is exact
    m16, _ = load_hf(tmp_path / "bf16", dtype=jnp.bfloat16)
    assert m16.layers[0].self_attn.q_proj.kernel.get_value().dtype == jnp.bfloat16
    toks = jnp.asarray(_tokens(seq=8))
    l16, _ = m16(toks)
    l32, _ = model(toks)
    assert l16.dtype == jnp.bfloat16
    err = float(jnp.abs(l16.astype(jnp.float32) - l32).max() / jnp.abs(l32).max())
    assert err < 0.05, err


def test_kv_cache_matches_full_forward(save_tiny):
    d, tmodel = save_tiny(rope_scaling=LLAMA3)
    model, _ = load_hf(d)
    toks = jnp.asarray(_tokens(seq=20))
    full, _ = model(toks)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(2, 32)
    chunks = []
    for a, b in [(0, 7), (7, 8), (8, 15), (15, 20)]:  # prefill, one token, chunks
        logits, cache = forward(graphdef, state, toks[:, a:b], cache=cache)
        chunks.append(logits)
    assert int(cache.index) == 20
    diff = float(jnp.abs(jnp.concatenate(chunks, axis=1) - full).max())
    assert diff < 1e-5, diff
    ref = torch_logits(tmodel, np.asarray(toks))
    assert float(np.abs(np.asarray(jnp.concatenate(chunks, axis=1)) - ref).max()) < TOL


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_kv_cache_in_segments_matches_full_forward(save_tiny, kind):
    """A cache of 300 slots is read in segments of 128 up to the filled part (the last one
    overlapping the one before); prefill, single tokens and chunks across segment borders
    give the full forward's logits (Mistral: with its sliding window)."""
    from jquant.models import llama

    d, tmodel = save_tiny(kind=kind)
    model, _ = load_hf(d)
    toks = jnp.asarray(_tokens(seq=290))
    full, _ = model(toks)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(2, 300)
    assert cache.max_len == 300 and 300 % llama._KV_SEGMENT
    chunks = []
    for a, b in [(0, 100), (100, 101), (101, 130), (130, 131), (131, 260), (260, 261), (261, 290)]:
        logits, cache = forward(graphdef, state, toks[:, a:b], cache=cache)
        chunks.append(logits)
    diff = float(jnp.abs(jnp.concatenate(chunks, axis=1) - full).max())
    assert diff < 1e-5, diff


def test_sampler_draws_from_the_softmax():
    """Inverse-CDF sampling: frequencies match softmax(logits / T) and top-k is respected."""
    from jquant.models.llama import _pick

    logits = jnp.log(jnp.asarray([[0.5, 0.25, 0.125, 0.0625, 0.0625]] * 20000))
    draws = np.asarray(_pick(logits, jax.random.key(0), 1.0, None))
    freq = np.bincount(draws, minlength=5) / len(draws)
    np.testing.assert_allclose(freq, [0.5, 0.25, 0.125, 0.0625, 0.0625], atol=0.01)
    hot = np.asarray(_pick(logits, jax.random.key(1), 0.5, None))  # T = 0.5 squares the odds
    np.testing.assert_allclose(np.bincount(hot, minlength=5)[:2] / len(hot), [0.7529, 0.1882], atol=0.01)
    top2 = np.asarray(_pick(logits, jax.random.key(2), 1.0, 2))
    assert set(np.unique(top2)) == {0, 1}
    np.testing.assert_allclose(np.mean(top2 == 0), 2 / 3, atol=0.01)


def test_greedy_generate_matches_transformers(save_tiny):
    d, tmodel = save_tiny(kv_heads=2)
    model, _ = load_hf(d)
    prompt = _tokens(seed=3, batch=2, seq=6)
    with torch.no_grad():
        ref = tmodel.generate(torch.as_tensor(prompt), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0, min_new_tokens=12).numpy()
    out = np.asarray(generate(model, prompt, 12))
    np.testing.assert_array_equal(out, ref)
    # 1-D prompt in, 1-D out
    np.testing.assert_array_equal(np.asarray(generate(model, prompt[0], 12)), ref[0])


def test_sampled_generate_is_deterministic_given_key(save_tiny):
    d, _ = save_tiny()
    model, _ = load_hf(d)
    prompt = _tokens(seed=4, batch=1, seq=5)
    a = generate(model, prompt, 10, key=jax.random.key(1), temperature=1.0, top_k=5)
    b = generate(model, prompt, 10, key=jax.random.key(1), temperature=1.0, top_k=5)
    c = generate(model, prompt, 10, key=jax.random.key(2), temperature=1.0, top_k=5)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.shape == (1, 15) and not np.array_equal(np.asarray(a), np.asarray(c))
    # top_k=1 sampling is greedy decoding
    g = generate(model, prompt, 10)
    s = generate(model, prompt, 10, key=jax.random.key(7), temperature=0.7, top_k=1)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(s))
    with pytest.raises(ValueError, match="PRNG key"):
        generate(model, prompt, 3, temperature=1.0)


def test_blockwise_api_and_captured_inputs_match_transformers(save_tiny):
    d, tmodel = save_tiny(kind="qwen2")
    model, _ = load_hf(d)
    toks = _tokens(seq=10)
    # hooks on the torch linears: the independent reference for each linear's input
    ref, seen = torch_linear_inputs(tmodel, 1, toks)

    h = model.embed(jnp.asarray(toks))
    h, _ = model.layers[0](h)
    h1, inputs = model.layers[1].forward_with_inputs(h)
    logits = model.head(h1)
    assert float(np.abs(np.asarray(logits) - ref).max()) < TOL
    assert set(inputs) == set(seen) == {"self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj",
                                        "self_attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"}
    for k in seen:
        np.testing.assert_allclose(np.asarray(inputs[k]), seen[k], atol=2e-5, rtol=0)
    # block output equals the plain call
    h1b, kv = model.layers[1](h)
    assert kv is None and float(jnp.abs(h1b - h1).max()) == 0.0


def test_qtensor_weights_run_through_dense(save_tiny):
    jq = pytest.importorskip("jquant")
    if not hasattr(jq, "quantize") or not hasattr(jq, "QuantSpec"):
        pytest.skip("quantization core not available")
    d, _ = save_tiny(tie=True)
    model, _ = load_hf(d)
    ref_model, _ = load_hf(d)
    spec = jq.QuantSpec(bits=4, group_size=32, symmetric=False)
    n = 0
    for path, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and path[-1] in ("kernel", "embedding"):
            qt = jq.quantize(var.get_value(), spec)
            var.set_value(qt)
            _get(ref_model, path).set_value(qt.dequantize(jnp.float32))
            n += 1
    assert n == 1 + 2 * 7
    toks = jnp.asarray(_tokens(seq=12))
    out, _ = model(toks)
    ref, _ = ref_model(toks)
    assert float(jnp.abs(out - ref).max()) < 1e-5
    g, s = nnx.split(model)
    out_jit, _ = forward(g, s, toks)
    assert float(jnp.abs(out_jit - ref).max()) < 1e-5
    np.testing.assert_array_equal(np.asarray(generate(model, toks, 4)), np.asarray(generate(ref_model, toks, 4)))


def _get(model, path):
    node = model
    for p in path:
        node = node[p] if isinstance(p, int) else getattr(node, p)
    return node


def test_save_hf_round_trip(save_tiny, tmp_path):
    d, tmodel = save_tiny(kind="qwen2", tie=False)
    model, config = load_hf(d)
    out = save_hf(model, config, tmp_path / "exported")
    back = __import__("transformers").AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    toks = _tokens(seq=12)
    np.testing.assert_allclose(torch_logits(back, toks), torch_logits(tmodel, toks), atol=1e-5, rtol=0)
    model2, config2 = load_hf(out)
    assert config2 == config
    m2, c2, tok = load(out)
    assert tok is None and c2 == config


# -- rotary frequencies: an independent float64 reference ------------------------------------

def _inv_freq_f64(dim, theta, scaling, factors=None):
    inv = 1.0 / theta ** (np.arange(0, dim, 2) / dim)
    if factors is not None:  # llama.cpp's rope_freqs: ggml's rope divides by them, then applies linear scaling
        inv = inv / np.asarray(factors, np.float64)
    if scaling is None:
        return inv
    if scaling["rope_type"] == "linear":
        return inv / scaling["factor"]
    f, lo, hi, ctx = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor",
                                           "original_max_position_embeddings"))
    out = []
    for x in inv:
        wl = 2 * math.pi / x
        if wl < ctx / hi:
            out.append(x)
        elif wl > ctx / lo:
            out.append(x / f)
        else:
            s = (ctx / wl - lo) / (hi - lo)
            out.append((1 - s) * x / f + s * x)
    return np.array(out)


@pytest.mark.parametrize("scaling", [None, LINEAR, LLAMA3, dict(LLAMA3, original_max_position_embeddings=8192)])
def test_rope_inv_freq_reference(scaling):
    cfg = LlamaConfig(vocab_size=8, hidden_size=128, intermediate_size=8, num_hidden_layers=1,
                      num_attention_heads=2, rope_theta=500000.0, rope_scaling=scaling)
    got = rope_inv_freq(cfg)
    assert got.dtype == np.float32 and got.shape == (32,)
    np.testing.assert_allclose(got, _inv_freq_f64(64, 500000.0, scaling), rtol=2e-6, atol=0)


# -- rope_freq_factors (llama.cpp's rope_freqs tensor) and their export as llama3 scaling -----

def _config(**kw):
    """head_dim 128, rope_theta 5e5: Llama 3.1/3.2's rotary settings."""
    return LlamaConfig(**dict(dict(vocab_size=8, hidden_size=256, intermediate_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, rope_theta=500000.0, max_position_embeddings=131072), **kw))


def _l3(factor, low, high, ctx):
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": ctx}


@pytest.mark.parametrize("rs", [_l3(8.0, 1.0, 4.0, 8192), _l3(32.0, 1.0, 4.0, 8192), _l3(16.0, 2.0, 8.0, 4096),
                                _l3(4.0, 1.0, 3.0, 1000)], ids=["llama3.1", "llama3.2", "low2", "odd"])
def test_rope_freq_factors_export_as_llama3(rs):
    hparams = dict(hidden_size=256, num_attention_heads=2, rope_parameters=dict(rs, rope_theta=500000.0))
    if rs["original_max_position_embeddings"] != 8192:  # Meta's config.json lacks it; the converter assumes 8192
        hparams["original_max_position_embeddings"] = rs["original_max_position_embeddings"]
    factors = llama_cpp_rope_freqs(hparams)
    assert (factors > 1).any() and (factors == 1).any()
    config = _config(rope_freq_factors=factors)
    want = _inv_freq_f64(128, 500000.0, rs)
    np.testing.assert_allclose(rope_inv_freq(config), want, rtol=1e-6, atol=0)
    exported = config.to_hf_dict()["rope_scaling"]
    if rs["low_freq_factor"] == 1.0:
        assert exported == rs  # the parameters themselves
    else:  # equivalent ones: only the wavelengths old/low and old/high matter
        assert exported == _l3(16.0, 1.0, 4.0, 2048)
    back = LlamaConfig.from_hf_dict(config.to_hf_dict())
    assert back.rope_freq_factors is None
    np.testing.assert_allclose(rope_inv_freq(back), want, rtol=1e-6, atol=0)


def test_rope_freq_factors_config():
    ones, ramp = (1.0,) * 64, tuple(np.linspace(1.0, 3.0, 64).astype(np.float32).tolist())
    linear = {"rope_type": "linear", "factor": 2.0}  # not LINEAR: transformers adds rope_theta to the dicts it gets
    assert _config(rope_freq_factors=ones).to_hf_dict()["rope_scaling"] is None
    assert _config(rope_freq_factors=ones, rope_scaling=linear).to_hf_dict()["rope_scaling"] == linear
    cfg = _config(rope_freq_factors=ramp, rope_scaling=linear)  # llama.cpp applies both
    np.testing.assert_allclose(rope_inv_freq(cfg), _inv_freq_f64(128, 500000.0, linear, ramp), rtol=1e-6, atol=0)
    assert cfg == _config(rope_freq_factors=list(ramp), rope_scaling=linear) and hash(cfg) == hash(
        _config(rope_freq_factors=np.asarray(ramp), rope_scaling=linear))
    with pytest.raises(UnsupportedModelError, match="cannot express both"):
        cfg.to_hf_dict()
    with pytest.raises(UnsupportedModelError, match=r"are not llama3 rope scaling.*export is refused"):
        _config(rope_freq_factors=ramp).to_hf_dict()
    with pytest.raises(UnsupportedModelError, match="together with rope_scaling of type 'llama3'"):
        _config(rope_freq_factors=ramp, rope_scaling=_l3(8.0, 1.0, 4.0, 8192))
    for bad, match in [((1.0,) * 63, r"shape \(63,\); must be 64"), ((1.0,) * 63 + (0.0,), "value 63 is 0.0"),
                       ((float("nan"),) + (1.0,) * 63, "value 0 is nan"), ((1e39,) * 64, "value 0 is inf"),
                       (("x",) * 64, "finite positive numbers")]:
        with pytest.raises(UnsupportedModelError, match=r"rope_freq_factors=.*" + match):
            _config(rope_freq_factors=bad)


# -- config parsing ------------------------------------------------------------------------

BASE = dict(vocab_size=32, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)


def test_from_hf_dict_formats():
    legacy = LlamaConfig.from_hf_dict(dict(BASE, model_type="llama", rope_theta=5e5, rope_scaling=LLAMA3))
    new = LlamaConfig.from_hf_dict(dict(BASE, model_type="llama",
                                        rope_parameters=dict(LLAMA3, rope_theta=5e5)))
    assert legacy == new and legacy.rope_theta == 5e5 and legacy.rope_scaling["rope_type"] == "llama3"
    assert hash(legacy) == hash(new)
    smol = LlamaConfig.from_hf_dict(dict(BASE, model_type="llama", tie_word_embeddings=True,
                                         num_key_value_heads=2, rope_scaling={"type": "default"}))
    assert smol.rope_scaling is None and smol.num_kv_groups == 2 and smol.head_dim == 16
    q = LlamaConfig.from_hf_dict(dict(BASE, model_type="qwen2"))
    assert q.attention_bias and not q.attention_out_bias
    m = LlamaConfig.from_hf_dict(dict(BASE, architectures=["MistralForCausalLM"], sliding_window=4096))
    assert m.model_type == "mistral" and m.sliding_window == 4096


@pytest.mark.parametrize("d, match", [
    (dict(BASE, model_type="gpt2"), "'gpt2'.*supported: llama, mistral, qwen2"),
    (dict(BASE, model_type="llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}), "'yarn'"),
    (dict(BASE, model_type="llama", hidden_act="gelu"), "gelu"),
    (dict(BASE, model_type="qwen2", use_sliding_window=True), "sliding"),
    (dict(BASE, model_type="llama", num_key_value_heads=3), "num_key_value_heads=3"),
])
def test_from_hf_dict_rejects(d, match):
    with pytest.raises(UnsupportedModelError, match=match):
        LlamaConfig.from_hf_dict(d)


# -- bad checkpoints -----------------------------------------------------------------------

def test_truncated_shard(save_tiny):
    d, _ = save_tiny()
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors.*(corrupt|truncated)"):
        load_hf(d)


def test_garbage_shard(save_tiny):
    d, _ = save_tiny()
    (d / "model.safetensors").write_bytes(b"\x07" * 100)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf(d)


def test_missing_shard(save_tiny):
    d, _ = save_tiny(max_shard_size="40KB")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(CheckpointError, match=f"index.json lists shard.*{victim}"):
        load_hf(d)


def test_missing_tensor(save_tiny, tmp_path):
    from safetensors.numpy import load_file, save_file

    d, _ = save_tiny()
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"missing tensor\(s\) model.layers.1.mlp.up_proj.weight"):
        load_hf(d)


def test_shape_mismatch(save_tiny):
    d, _ = save_tiny()
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor .model.layers.0.mlp.\w+_proj.weight. has shape \((64, 160|160, 64)\), but config.json implies \((64, 128|128, 64)\)"):
        load_hf(d)


def test_unsupported_model_type(save_tiny):
    d, _ = save_tiny()
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "falcon"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="config.json.*'falcon'.*supported: llama"):
        load_hf(d)
    with pytest.raises(UnsupportedModelError):
        load(d)


def test_missing_config(tmp_path):
    with pytest.raises(CheckpointError, match="config.json not found"):
        load_hf(tmp_path)
    with pytest.raises(CheckpointError, match="not a directory"):
        load_hf(tmp_path / "nope")
