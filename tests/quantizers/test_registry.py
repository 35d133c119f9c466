"""The method interface: registry, statistics, and the pipeline collecting what a method declares."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jquant as jq
from jquant import calibrate
from jquant.errors import SpecError
from jquant.models import LlamaConfig, init_model
from jquant.quantizers import collect, gptq, registry
from jquant.quantizers.registry import Method


def test_statistics_against_float64():
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(3, 7, 12)).astype(np.float32) * rng.uniform(0.1, 3, 12).astype(np.float32)
               for _ in range(4)]
    X = np.concatenate([b.reshape(-1, 12) for b in batches]).astype(np.float64)
    got = collect(["hessian", "act_sq_mean", "act_abs_mean", "act_abs_max"], batches)
    np.testing.assert_allclose(got["hessian"], 2 * X.T @ X / len(X), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["act_sq_mean"], np.mean(X**2, 0), rtol=1e-5)
    np.testing.assert_allclose(got["act_abs_mean"], np.mean(np.abs(X), 0), rtol=1e-5)
    np.testing.assert_array_equal(got["act_abs_max"], np.max(np.abs(X), 0).astype(np.float32))


@pytest.mark.parametrize("k", [12, 700, 1536])
def test_gram_by_upper_blocks_is_the_full_product(k):
    """The Hessian's Gram matrix from the blocks on and above the diagonal, mirrored: symmetric
    and equal to XᵀX (float64 reference; bit-equal to the float32 full product here)."""
    from jquant.quantizers.stats import gram

    x = np.random.default_rng(k).normal(size=(300, k)).astype(np.float32)
    g = np.asarray(jax.jit(gram)(jnp.asarray(x)))
    np.testing.assert_array_equal(g, g.T)
    np.testing.assert_allclose(g, x.astype(np.float64).T @ x.astype(np.float64), rtol=1e-5, atol=1e-3)
    full = np.asarray(jax.jit(lambda a: a.T @ a)(jnp.asarray(x)))
    np.testing.assert_allclose(g, full, rtol=1e-6, atol=1e-4)


def test_registry_errors():
    with pytest.raises(SpecError, match="unknown method 'nope'; available: ") as e:
        jq.QuantSpec(method="nope")
    assert {"rtn", "gptq", "hqq", "awq", "kquant"} <= set(str(e.value).split(": ")[-1].split(", "))
    with pytest.raises(SpecError, match="already registered"):
        registry.register(Method("rtn", lambda *a, **k: None))
    with pytest.raises(SpecError, match=r"unknown statistic\(s\) \['xtx'\]"):
        registry.register(Method("bad_stats", lambda *a, **k: None, stats=("xtx",)))
    with pytest.raises(SpecError, match="method 'rtn' takes no options"):
        jq.QuantSpec(options={"damp": 0.1})


def test_quantize_tree_runs_a_data_driven_method_given_stats():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 16)).astype(np.float32)
    X = rng.normal(size=(256, 64)).astype(np.float32)
    H = collect(["hessian"], [X])["hessian"]
    spec = jq.QuantSpec(bits=3, group_size=32, symmetric=False, method="gptq")
    out = jq.quantize_tree({"l": {"kernel": w}}, [("kernel", spec)], stats={"l/kernel": {"hessian": H}})
    direct, _ = gptq.gptq_quantize(w, H, spec)
    np.testing.assert_array_equal(np.asarray(out["l"]["kernel"].codes), np.asarray(direct.codes))


@pytest.fixture
def probe_method():
    """A toy data-driven method that records the statistics it was handed and rounds like RTN."""
    seen = {}

    def quantize(w, spec, stats, *, path):
        seen[path] = {k: np.asarray(v) for k, v in stats.items()}
        return jq.quantize(w, jq.QuantSpec(bits=spec.bits, group_size=spec.group_size, symmetric=False)), {"loss": 1.0}

    registry.register(Method("probe", quantize, stats=("act_abs_max", "act_sq_mean")))
    yield seen
    registry._REGISTRY.pop("probe")


def test_pipeline_collects_exactly_the_declared_statistics(probe_method):
    """The probe gets act_abs_max and act_sq_mean of each linear's true input (from the
    block as it stands when the linear's group is solved), computed here independently."""
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1)
    model = init_model(cfg, key=3)
    toks = np.random.default_rng(0).integers(0, 64, size=(6, 16)).astype(np.int32)
    spec = jq.QuantSpec(bits=4, group_size=16, symmetric=False, method="probe")
    state, logs = calibrate.quantize_model(model, toks, [(r"_proj/kernel$", spec)], batch_size=4, progress=False)
    assert len(logs) == 14 and all(e.method == "probe" and e.recon is None for e in logs)
    assert all(set(v) == {"act_abs_max", "act_sq_mean"} for v in probe_method.values())
    # Block 0, q_proj: its input is the normed embedding of the float model.
    h = model.embed(jnp.asarray(toks))
    _, inputs = model.layers[0].forward_with_inputs(h)
    x = np.asarray(inputs["self_attn/q_proj"], np.float64).reshape(-1, 32)
    got = probe_method["layers/0/self_attn/q_proj/kernel"]
    np.testing.assert_allclose(got["act_abs_max"], np.abs(x).max(0), rtol=1e-5)
    np.testing.assert_allclose(got["act_sq_mean"], (x**2).mean(0), rtol=1e-4)
    # k_proj shares q_proj's input: the same statistics, collected once.
    np.testing.assert_array_equal(got["act_sq_mean"], probe_method["layers/0/self_attn/k_proj/kernel"]["act_sq_mean"])


def test_data_driven_rule_outside_the_blocks_is_refused_before_work():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    model = init_model(cfg, key=0)
    toks = np.zeros((2, 8), np.int32)
    gspec = jq.QuantSpec(bits=4, group_size=16, symmetric=False, method="gptq")
    with pytest.raises(SpecError, match=r"^lm_head/kernel: rule 0 gives method 'gptq', which needs calibration"):
        calibrate.quantize_model(model, toks, [(r"kernel$", gspec)], progress=False)
    # A data-free rule on a block leaf that is not a linear (a norm) is applied, not dropped.
    nspec = jq.QuantSpec(bits=8, granularity="tensor")
    state, _ = calibrate.quantize_model(model, toks, [(r"layers/0/input_layernorm", nspec)], progress=False)
    leaves = {jq.path_str(kp): x for kp, x in
              jax.tree_util.tree_flatten_with_path(state, is_leaf=jq.is_qtensor)[0]}
    assert isinstance(leaves["layers/0/input_layernorm/scale"], jq.QTensor)
    assert not isinstance(leaves["layers/0/self_attn/q_proj/kernel"], jq.QTensor)
