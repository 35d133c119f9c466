"""Gemma 3 (text) vs Hugging Face transformers: logits, KV cache, generation, the block-wise
API, export, and the configs the model refuses."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VOCAB, torch_linear_inputs, torch_logits
from flax import nnx

from jquant.errors import UnsupportedModelError
from jquant.models import forward, generate, load_hf, save_hf
from jquant.models.gemma import FULL, SLIDING, Gemma3, Gemma3Config

torch = pytest.importorskip("torch")

TOL = 1e-4
LINEAR = {"rope_type": "linear", "factor": 4.0}


def _tokens(seed=0, batch=2, seq=40):
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq))


@pytest.fixture
def gemma(save_tiny):
    """``gemma(**kw) -> (dir, torch model, our model, config)``: 4 layers (local, global,
    local, local), window 5, tied embeddings unless ``tie=False``."""

    def make(tie=True, rope_scaling=None, layers=4):
        d, tmodel = save_tiny(kind="gemma3", tie=tie, rope_scaling=rope_scaling, layers=layers)
        model, config = load_hf(d)
        return d, tmodel, model, config

    return make


@pytest.mark.parametrize("seq", [40, 300], ids=["short", "chunked"])
@pytest.mark.parametrize("rope", [None, LINEAR], ids=["rope-default", "rope-linear"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gemma3_logits_match_transformers(gemma, tie, rope, seq):
    """Local layers (window 5 < seq) and a global layer with its own rope base and scaling;
    300 tokens run causal attention in query chunks."""
    _, tmodel, model, config = gemma(tie=tie, rope_scaling=rope)
    assert isinstance(model, Gemma3) and config.layer_types == (SLIDING, FULL, SLIDING, SLIDING)
    assert ("lm_head" in nnx.state(model)) != tie
    toks = _tokens(seq=seq)
    ref = torch_logits(tmodel, toks)
    out, _ = model(jnp.asarray(toks))
    assert np.abs(ref).max() > 1.0
    diff = float(np.abs(np.asarray(out) - ref).max())
    assert diff < TOL, diff


def test_each_gemma3_feature_matters(gemma):
    """The parity above is not loose: dropping any one Gemma feature moves the logits far
    beyond the tolerance (the window, the local rope base, the query scale)."""
    _, tmodel, model, config = gemma()
    toks = _tokens(seq=40)
    ref = torch_logits(tmodel, toks)
    graphdef, state = nnx.split(model)
    variants = {
        "no window": dict(sliding_window=1000),
        "global rope base everywhere": dict(rope_local_base_freq=config.rope_theta),
        "head_dim query scale": dict(query_pre_attn_scalar=float(config.head_dim)),
    }
    for what, change in variants.items():
        m = Gemma3(dataclasses.replace(config, **change), rngs=nnx.Rngs(0))
        nnx.update(m, state)
        diff = float(np.abs(np.asarray(m(jnp.asarray(toks))[0]) - ref).max())
        assert diff > 100 * TOL, (what, diff)


def test_gemma3_kv_cache_and_generation_match(gemma):
    """Prefill, single tokens and chunks through the cache give the full forward's logits
    (sliding-window masks by slot, the global layer over everything); greedy generation
    equals transformers'."""
    _, tmodel, model, _ = gemma()
    toks = jnp.asarray(_tokens(seq=150))
    full, _ = model(toks)
    graphdef, state = nnx.split(model)
    cache = model.init_cache(2, 160)
    chunks = []
    for a, b in [(0, 7), (7, 8), (8, 130), (130, 131), (131, 150)]:
        logits, cache = forward(graphdef, state, toks[:, a:b], cache=cache)
        chunks.append(logits)
    diff = float(jnp.abs(jnp.concatenate(chunks, axis=1) - full).max())
    assert diff < 1e-5, diff

    prompt = _tokens(seed=3, seq=6)
    with torch.no_grad():
        ref = tmodel.generate(torch.as_tensor(prompt), max_new_tokens=12, do_sample=False,
                              eos_token_id=None, pad_token_id=0, min_new_tokens=12).numpy()
    np.testing.assert_array_equal(np.asarray(generate(model, prompt, 12)), ref)


def test_gemma3_blockwise_inputs_match_transformers(gemma):
    """The input of every linear (what calibration collects) equals what the torch linears see."""
    _, tmodel, model, _ = gemma()
    toks = _tokens(seq=10)
    ref, seen = torch_linear_inputs(tmodel, 1, toks)
    h = model.embed(jnp.asarray(toks))
    h, _ = model.layers[0](h)
    h1, inputs = model.layers[1].forward_with_inputs(h)
    for layer in model.layers[2:]:
        h1, _ = layer(h1)
    assert float(np.abs(np.asarray(model.head(h1)) - ref).max()) < TOL
    assert set(inputs) == set(seen) and len(seen) == 7
    for k in seen:
        np.testing.assert_allclose(np.asarray(inputs[k]), seen[k], atol=2e-5, rtol=0)


def test_gemma3_save_hf_round_trip(gemma, tmp_path):
    _, tmodel, model, config = gemma(rope_scaling=LINEAR)
    out = save_hf(model, config, tmp_path / "exported")
    back = __import__("transformers").AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    toks = _tokens(seq=24)
    np.testing.assert_allclose(torch_logits(back, toks), torch_logits(tmodel, toks), atol=1e-5, rtol=0)
    _, config2 = load_hf(out)
    assert config2 == config


BASE = dict(model_type="gemma3_text", vocab_size=VOCAB, hidden_size=64, intermediate_size=160,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16)


def test_gemma3_config_defaults_and_rope_forms():
    c = Gemma3Config.from_hf_dict(dict(BASE, num_hidden_layers=12, rope_local_base_freq=20000.0))
    assert c.layer_types == (SLIDING,) * 5 + (FULL,) + (SLIDING,) * 5 + (FULL,)
    assert c.tie_word_embeddings and c.query_scale == 256 ** -0.5 and c.rope_local_base_freq == 20000.0
    assert c.layer_config(5).sliding_window is None and c.layer_config(0).rope_theta == 20000.0
    c5 = Gemma3Config.from_hf_dict(dict(BASE, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}))
    c4 = Gemma3Config.from_hf_dict(dict(BASE, rope_theta=1e6, rope_local_base_freq=1e4,
                                        rope_scaling={"rope_type": "linear", "factor": 8.0}))
    assert c5 == c4 and c4.rope_scaling["factor"] == 8.0
    assert c4.layer_config(0).rope_scaling is None  # local layers are not scaled
    assert Gemma3Config.from_hf_dict(c4.to_hf_dict()) == c4


@pytest.mark.parametrize("d, match", [
    (dict(BASE, final_logit_softcapping=30.0), "final_logit_softcapping"),
    (dict(BASE, attn_logit_softcapping=50.0), "attn_logit_softcapping"),
    (dict(BASE, use_bidirectional_attention=True), "bidirectional"),
    (dict(BASE, hidden_activation="silu"), "hidden_activation"),
    (dict(BASE, model_type="gemma3"), "multimodal"),
    (dict(BASE, layer_types=["sliding_attention", "chunked_attention"]), "layer_types"),
    (dict(BASE, layer_types=["sliding_attention"]), "layer_types"),
    (dict(BASE, rope_parameters={"full_attention": {"rope_type": "default"},
                                 "sliding_attention": {"rope_type": "linear", "factor": 2.0}}), "sliding-window"),
])
def test_gemma3_config_refuses_what_the_model_does_not_implement(d, match):
    with pytest.raises(UnsupportedModelError, match=match):
        Gemma3Config.from_hf_dict(d)


def test_load_hf_refuses_softcapping(save_tiny):
    import json

    d, _ = save_tiny(kind="gemma3", tie=True)
    cfg = json.loads((d / "config.json").read_text())
    cfg["final_logit_softcapping"] = 30.0
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"config\.json.*final_logit_softcapping=30\.0"):
        load_hf(d)


# -- GGUF -----------------------------------------------------------------------------------

def _gguf_parity(tmp_path, tmodel, **kw):
    from gguf_writer import write_gemma3_gguf

    from jquant.models import load_gguf

    write_gemma3_gguf(tmp_path / "g.gguf", tmodel, **kw)
    model, config, _ = load_gguf(tmp_path / "g.gguf", tokenizer=False)
    toks = _tokens(seq=40)
    ref = torch_logits(tmodel, toks)
    diff = float(np.abs(np.asarray(model(jnp.asarray(toks))[0]) - ref).max())
    return model, config, diff


def test_gemma3_gguf_default_pattern_matches_transformers(tmp_path):
    """Six layers as llama.cpp assumes them (five local, one global), norms stored as 1 + w."""
    from conftest import tiny_hf_model

    tmodel = tiny_hf_model("gemma3", tie=True, layers=6, query_pre_attn_scalar=16,
                           layer_types=[SLIDING] * 5 + [FULL])
    model, config, diff = _gguf_parity(tmp_path, tmodel)
    assert isinstance(model, Gemma3) and config.layer_types == (SLIDING,) * 5 + (FULL,)
    assert config.sliding_window == 5 and config.query_scale == 0.25
    assert diff < TOL, diff
    # the norm weighs by exactly the 1 + w llama.cpp stored (w itself loses its low bits in 1 + w)
    ours = np.asarray(model.layers[3].post_feedforward_layernorm.scale.get_value())
    hf = tmodel.model.layers[3].post_feedforward_layernorm.weight.detach().numpy()
    np.testing.assert_array_equal(np.float32(1) + ours, np.float32(1) + hf)


def test_gemma3_gguf_listed_pattern_and_q8_0(tmp_path):
    from conftest import tiny_hf_model

    tmodel = tiny_hf_model("gemma3", tie=True, layers=4, query_pre_attn_scalar=16)
    _, config, diff = _gguf_parity(tmp_path, tmodel, swa_pattern=True)
    assert config.layer_types == (SLIDING, FULL, SLIDING, SLIDING) and diff < TOL, diff
    _, _, diff8 = _gguf_parity(tmp_path, tmodel, swa_pattern=True, qtype="Q8_0")
    assert 10 * TOL < diff8 < 0.5, diff8  # Q8_0 weights: close, not equal


def test_gemma3_gguf_softcapping_is_refused(tmp_path):
    import gguf
    from conftest import tiny_hf_model
    from gguf_writer import write_gemma3_gguf

    from jquant.models import load_gguf

    tmodel = tiny_hf_model("gemma3", tie=True, layers=2, query_pre_attn_scalar=16)
    write_gemma3_gguf(tmp_path / "g.gguf", tmodel,
                      meta={"gemma3.final_logit_softcapping": (30.0, gguf.GGUFValueType.FLOAT32)})
    with pytest.raises(UnsupportedModelError, match=r"g\.gguf: GGUF gemma3\.final_logit_softcapping=30\.0"):
        load_gguf(tmp_path / "g.gguf", tokenizer=False)


def test_blockwise_hidden_runs_sliding_and_global_blocks_each_with_its_own_program(gemma):
    """`evaluate.Blockwise` (the CLI's evaluation) jits each kind of block once: Gemma's
    sliding-window and global layers are two graphs, and the result is the model's own."""
    from jquant import evaluate

    _, _, model, _ = gemma(layers=4)
    t = _tokens(seq=40)
    compiled = lambda: sum(f._cache_size() for k, f in evaluate._COMPILED.items() if k[0] == "block")  # noqa: E731
    before = compiled()
    got = evaluate.Blockwise(model)(t)
    assert compiled() - before == 2  # sliding, global: not one per layer
    np.testing.assert_allclose(np.asarray(got), np.asarray(model.hidden(jnp.asarray(t))), rtol=1e-5, atol=1e-5)
