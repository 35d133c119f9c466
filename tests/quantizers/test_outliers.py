"""LLM.int8-style outliers (jquant.quantizers.outliers, arXiv:2208.07339) against a float64
NumPy reference, the matmul of both parts, storage and the pipeline."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jquant as jq
import pallas_kernels as pk
from jquant import calibrate
from jquant.errors import ShapeError, SpecError
from jquant.models import LlamaConfig, init_model
from jquant.quantizers import outliers, quantize_weight

INT8 = dict(bits=8, granularity="channel", symmetric=True, method="outliers")


def reference(w, a, threshold):
    """float64: rows with a > threshold kept (float16), the rest int8 per output column
    (symmetric restricted, scale absmax/127 in float16) after zeroing the kept rows."""
    w = np.asarray(w, np.float64)
    keep = np.flatnonzero(np.asarray(a) > threshold)
    w0 = w.copy()
    w0[keep] = 0
    s = (np.abs(w0).max(0) / 127).astype(np.float16).astype(np.float64)
    q = np.clip(np.round(w0 / np.where(s == 0, 1, s)), -127, 127)
    deq = q * s
    deq[keep] = w[keep].astype(np.float16)
    return deq, keep


def test_matches_reference_and_matmul_adds_both_parts():
    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.05, (96, 40)).astype(np.float32)
    a = np.abs(rng.normal(0, 1.5, 96)).astype(np.float32)
    a[[3, 50, 77]] = [9.0, 30.0, 6.5]
    qt, info = quantize_weight(w, jq.QuantSpec(**INT8), {"act_abs_max": a})
    deq_ref, keep = reference(w, a, 6.0)
    assert info["outliers"] == keep.size and keep.size >= 3
    np.testing.assert_array_equal(np.asarray(qt.outlier_idx), keep)
    np.testing.assert_allclose(np.asarray(qt.dequantize(jnp.float32), np.float64), deq_ref, rtol=0, atol=1e-7)
    # bits/weight: int8 codes + f16 scales per column + f16 outlier rows + int32 indices
    want = (96 * 40 * 8 + 40 * 16 + keep.size * 40 * 16 + keep.size * 32) / (96 * 40)
    assert abs(qt.bits_per_weight - want) < 1e-9
    x = rng.normal(size=(5, 96)).astype(np.float32)
    x[:, keep] *= 20  # outlier features
    y_ref = x.astype(np.float64) @ deq_ref
    for backend in ("xla", "dequant", "interpret"):
        with pk.use_backend(backend):
            y = np.asarray(jax.jit(pk.qmatmul)(jnp.asarray(x), qt))
        np.testing.assert_allclose(y, y_ref, rtol=2e-5, atol=2e-4)
    # the kept rows make the error on outlier-heavy inputs far smaller than plain int8
    plain = jq.quantize(w, jq.QuantSpec(bits=8, granularity="channel", symmetric=True)).dequantize(jnp.float32)
    assert np.abs(x @ np.asarray(qt.dequantize(jnp.float32)) - x @ w).max() <= np.abs(x @ np.asarray(plain) - x @ w).max()


def test_cap_save_restore_and_no_outliers(tmp_path):
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 8)).astype(np.float32)
    a = np.linspace(0, 20, 64).astype(np.float32)  # 44 features above 6: capped at 10% = 6, the largest
    qt, info = quantize_weight(w, jq.QuantSpec(**INT8), {"act_abs_max": a})
    assert info["outliers"] == 6 and np.array_equal(np.asarray(qt.outlier_idx), np.arange(58, 64))
    jq.save(tmp_path / "c", {"k": qt})
    back = jq.restore(tmp_path / "c")["k"]
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qt.dequantize()))
    assert back.nbytes == qt.nbytes
    qt0, info0 = quantize_weight(w, jq.QuantSpec(**INT8), {"act_abs_max": np.zeros(64, np.float32)})
    assert info0["outliers"] == 0 and qt0.outlier_idx is None


def test_pipeline_finds_planted_outlier_features():
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = init_model(cfg, key=0)
    # a large input-norm weight on features 4 and 9 makes them outliers of q/k/v's input
    norm = model.layers[0].input_layernorm.scale
    norm[...] = norm[...].at[jnp.array([4, 9])].set(40.0)
    toks = np.random.default_rng(0).integers(0, 64, size=(4, 16)).astype(np.int32)
    spec = jq.QuantSpec(**INT8, options={"threshold": 6.0})
    state, logs = calibrate.quantize_model(model, toks, [(r"_proj/kernel$", spec)], progress=False)
    q = {jq.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=jq.is_qtensor)[0]}
    idx = np.asarray(q["layers/0/self_attn/q_proj/kernel"].outlier_idx)
    assert {4, 9} <= set(idx.tolist())


def test_bad_input():
    with pytest.raises(SpecError, match="threshold must be > 0"):
        jq.QuantSpec(**INT8, options={"threshold": 0.0})
    with pytest.raises(SpecError, match="max_fraction must be in"):
        jq.QuantSpec(**INT8, options={"max_fraction": 0.0})
    with pytest.raises(SpecError, match="holds 0 exactly"):
        jq.QuantSpec(bits=8, symmetric=False, zero_type="float", method="outliers")
    with pytest.raises(SpecError, match=r"needs the input statistic\(s\) \['act_abs_max'\]"):
        jq.quantize(np.ones((8, 4), np.float32), jq.QuantSpec(**INT8))
    with pytest.raises(ShapeError, match=r"^l: act_abs_max of shape \(7,\) does not match the kernel's 8 inputs"):
        outliers.quantize_with_outliers(np.ones((8, 4), np.float32), jq.QuantSpec(**INT8), np.ones(7), path="l")
