"""AWQ (jquant.quantizers.awq, arXiv:2306.00978): the grid search against a float64 NumPy
reference, the folding leaving the float model unchanged, and the pipeline."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant import calibrate
from jquant.errors import SpecError
from jquant.models import LlamaConfig, forward, init_model
from jquant.models.gemma import FULL, SLIDING, Gemma3Config
from jquant.quantizers import awq, collect

AWQ4 = jq.QuantSpec(bits=4, group_size=32, symmetric=False, method="awq", options={"grid": 10})


def test_search_matches_float64_reference(ref):
    """Losses of every α (RTN on W·s, unscaled, error tr(ΔWᵀHΔW)) against NumPy in float64."""
    rng = np.random.default_rng(0)
    K = 96
    X = rng.normal(size=(512, K)) * np.where(np.arange(K) % 17 == 0, 12.0, 1.0)  # a few outlier channels
    H = 2 * X.T @ X / len(X)
    a = np.mean(np.abs(X), 0)
    ws = tuple(rng.normal(0, 0.05, size=(K, n)).astype(np.float32) for n in (40, 24))
    s, losses = awq.search_scales(ws, jnp.asarray(H, jnp.float32), jnp.asarray(a, jnp.float32), spec=AWQ4)
    n = 10
    want = []
    for i in range(n):
        sa = np.maximum(np.maximum(a, 1e-4) ** (i / n), 1e-4)
        sa = sa / np.sqrt(sa.max() * sa.min())
        total = 0.0
        for w in ws:
            xg = ref.grouped(w.astype(np.float64) * sa[:, None], 0, "group", 32)
            deq = ref.int_grid(xg, 4, symmetric=False).deq.reshape(K, -1)
            d = w - deq / sa[:, None]
            total += np.sum(d * (H @ d))
        want.append(total)
    want = np.array(want)
    np.testing.assert_allclose(np.asarray(losses), want, rtol=2e-3)
    assert int(np.argmin(losses)) == int(np.argmin(want))
    assert want.min() < want[0]  # outlier channels: scaling beats plain RTN here
    best = int(np.argmin(want))
    sb = np.maximum(a, 1e-4) ** (best / n)
    np.testing.assert_allclose(np.asarray(s), sb / np.sqrt(sb.max() * sb.min()), rtol=1e-5)


def _model(kv_heads, family="llama"):
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=kv_heads)
    if family == "gemma3":  # norms weigh by 1 + w: folding must divide 1 + w, not w
        model = init_model(Gemma3Config(**kw, head_dim=16, sliding_window=5, layer_types=(SLIDING, FULL)), key=1)
        state = nnx.state(model)
        norms = {jq.path_str(kp): 0.3 * jax.random.normal(jax.random.key(i), x.shape) for i, (kp, x) in
                 enumerate(jax.tree_util.tree_flatten_with_path(state)[0]) if jq.path_str(kp).endswith("/scale")}
        nnx.update(model, calibrate._replace(state, norms))
        return model
    return init_model(LlamaConfig(**kw), key=1)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("kv_heads", [4, 2])  # v->o folded (no GQA) / skipped (GQA), as AutoAWQ
def test_folding_leaves_the_float_model_unchanged(kv_heads, family):
    model = _model(kv_heads, family)
    gd, state = nnx.split(model)
    toks = np.random.default_rng(0).integers(0, 96, size=(4, 24)).astype(np.int32)
    ref_logits = np.asarray(forward(gd, state, jnp.asarray(toks))[0])
    h = model.embed(jnp.asarray(toks))
    specs = {n: AWQ4 for g in calibrate.SEQUENTIAL_GROUPS for n in g}
    folded = state
    for i, block in enumerate(model.layers):
        bgd, bst = nnx.split(block)

        def coll(bst, leader, names):
            _, inputs = nnx.merge(bgd, bst).forward_with_inputs(h)
            return collect(names, [inputs[leader]])

        bst2, info = awq.prepare_block(bst, type(block).LINEAR_GROUPS, specs, coll, calibrate._replace,
                                       calibrate._leaf, prefix=f"layers/{i}/")
        assert isinstance(info["self_attn/q_proj"], dict) and isinstance(info["mlp/down_proj"], dict)
        if kv_heads == 4:
            assert isinstance(info["self_attn/o_proj"], dict)
        else:
            assert info["self_attn/o_proj"].startswith("skipped: self_attn/v_proj/kernel has 32 outputs")
        # something did move: the norm weights are no longer the originals
        assert not np.allclose(np.asarray(calibrate._leaf(bst2, "input_layernorm/scale")),
                               np.asarray(calibrate._leaf(bst, "input_layernorm/scale")))
        h = nnx.merge(bgd, bst)(h)[0]
        folded = calibrate._replace(folded, {f"layers/{i}/{jq.path_str(kp)}": x for kp, x in
                                             jax.tree_util.tree_flatten_with_path(bst2)[0]})
    got = np.asarray(forward(gd, folded, jnp.asarray(toks))[0])
    assert np.max(np.abs(got - ref_logits)) / np.max(np.abs(ref_logits)) < 1e-5


def test_pipeline_awq_rtn_and_gptq():
    model = _model(2)
    toks = np.random.default_rng(1).integers(0, 96, size=(8, 32)).astype(np.int32)
    rules = [(r"_proj/kernel$", AWQ4)]
    state, logs = calibrate.quantize_model(model, toks, rules, batch_size=4, progress=False)
    assert len(logs) == 14 and all(e.method == "awq" for e in logs)
    for e in logs:
        if "o_proj" in e.path:  # GQA: not scaled, and the log says why
            assert e.extra["awq"].startswith("skipped:") and "grouped-query attention" in e.extra["awq"]
        else:
            x = e.extra["awq"]
            assert x["loss"] <= x["loss_rtn"] and 0 <= x["alpha"] < 1
    s = jq.summary(state)
    assert all(x.kind.startswith("awq int4 g32") for x in s.quantized) and len(s.quantized) == 14
    # AWQ + GPTQ: the GPTQ solve on the scaled weights beats RTN of the same scaled weights.
    g = dataclasses.replace(AWQ4, options={"grid": 10, "then": "gptq", "act_order": True})
    _, glogs = calibrate.quantize_model(model, toks, [(r"_proj/kernel$", g)], batch_size=4, progress=False)
    # o_proj is not scaled (GQA) and keeps the RTN baseline: GPTQ beats it; the scaled linears
    # log no RTN baseline (their weights are no longer the original ones), and on the whole
    # AWQ+GPTQ's output error is below AWQ+RTN's.
    for e in glogs:
        assert (e.recon < e.recon_rtn) if "o_proj" in e.path else (e.recon_rtn is None)
    assert sum(e.recon for e in glogs) < sum(e.recon for e in logs)


def test_bad_input():
    with pytest.raises(SpecError, match="AWQ grid must be >= 2"):
        jq.QuantSpec(bits=4, symmetric=False, method="awq", options={"grid": 1})
    with pytest.raises(SpecError, match="AWQ then must be 'rtn' or 'gptq'"):
        jq.QuantSpec(bits=4, symmetric=False, method="awq", options={"then": "hqq"})
    with pytest.raises(SpecError, match="awq option damp='x' must be of type float"):
        jq.QuantSpec(bits=4, symmetric=False, method="awq", options={"then": "gptq", "damp": "x"})
    with pytest.raises(SpecError, match="does not take format 'nf4'"):
        jq.QuantSpec(format="nf4", method="awq")
    with pytest.raises(SpecError, match=r"^w: method 'awq' transforms a whole decoder block"):
        jq.quantize_tree({"w": np.ones((64, 8), np.float32)}, [("w", AWQ4)])
    model = _model(4)
    mixed = [(r"q_proj/kernel$", AWQ4), (r"_proj/kernel$", dataclasses.replace(AWQ4, bits=3))]
    with pytest.raises(SpecError, match="layers/0/self_attn/q_proj: AWQ linears that share an input"):
        calibrate.quantize_model(model, np.zeros((2, 8), np.int32), mixed, progress=False)
