"""Stored scales and zeros keep their value or the quantizer refuses (issue: silent NaN/zeros)."""

import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant.errors import NonFiniteError


def _w(scale=1.0):
    return (np.random.default_rng(0).normal(size=(128, 8)) * scale).astype(np.float32)


@pytest.mark.parametrize("method", ["rtn", "hqq"])
def test_scale_overflowing_float16_is_refused_or_widened(method):
    w = _w()
    w[5, 3] = 1e6  # absmax/7 = 1.4e5 > float16's 65504
    spec = jq.QuantSpec(bits=4, group_size=32, symmetric=method == "rtn", method=method)
    with pytest.raises(NonFiniteError, match=r"^dec/w: 1 stored scale\(s\) overflow float16.*scale_dtype='float32'"):
        jq.quantize(jnp.asarray(w, jnp.bfloat16), spec, path="dec/w")
    import dataclasses
    q = jq.quantize(jnp.asarray(w, jnp.bfloat16), dataclasses.replace(spec, scale_dtype="float32"))
    deq = np.asarray(q.dequantize(jnp.float32))
    assert np.all(np.isfinite(deq)) and abs(deq[5, 3] - 1e6) < 1e6 / 7


def test_float_minimum_overflow_and_scale_underflow_refused():
    with pytest.raises(NonFiniteError, match=r"overflow float16"):
        jq.quantize(_w(1e5), jq.QuantSpec(bits=4, group_size=32, symmetric=False, zero_type="float"))
    with pytest.raises(NonFiniteError, match=r"^x: 32 group scale\(s\) underflow to 0 in float16"):
        jq.quantize(_w(1e-9), jq.QuantSpec(bits=4, group_size=32), path="x")
    # all-zero groups are fine (scale 0 is their exact value)
    w = _w()
    w[:32] = 0
    q = jq.quantize(w, jq.QuantSpec(bits=4, group_size=32))
    assert np.all(np.asarray(q.dequantize())[:32] == 0)


def test_through_quantize_tree_names_the_leaf():
    w = _w()
    w[0, 0] = 1e6
    with pytest.raises(NonFiniteError, match=r"^layer/kernel: 1 stored scale\(s\) overflow"):
        jq.quantize_tree({"layer": {"kernel": w}}, [("kernel", jq.QuantSpec(bits=4, group_size=32))])


@pytest.mark.parametrize("fmt", ["q4_k", "q4_0", "q8_0", "q6_k"])
def test_block_formats_refuse_what_their_block_scales_cannot_hold(fmt):
    """GGUF blocks keep float16 (super-)block scales inside the block bytes."""
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 16)), jnp.float32)
    spec = jq.QuantSpec(format=fmt, method="kquant")
    with pytest.raises(NonFiniteError, match=r"^k: \d+ block\(s\) of nonzero weights .* dequantize to all zeros"):
        jq.quantize(w * 1e-8, spec, path="k")
    with pytest.raises(NonFiniteError, match=r"^k: .* dequantize to NaN/Inf"):
        jq.quantize(w * 1e9, spec, path="k")
    assert np.all(np.isfinite(np.asarray(jq.quantize(w, spec).dequantize())))


def test_importance_matrix_and_outlier_rows_are_checked():
    from jquant.errors import DataError
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 16)), jnp.float32)
    spec = jq.QuantSpec(format="q4_0", method="kquant", options={"imatrix": True})
    for bad in (-jnp.ones(256), jnp.full(256, jnp.nan)):
        with pytest.raises(DataError, match="importance matrix"):
            jq.quantize(w, spec, {"act_sq_mean": bad}, path="k")
    dead = jnp.asarray(np.r_[np.zeros(32), np.ones(224)], jnp.float32)  # inputs dead in calibration
    deq = np.asarray(jq.quantize(w, spec, {"act_sq_mean": dead}).dequantize())
    assert np.abs(deq[:32] - np.asarray(w)[:32]).max() < 0.5 * np.abs(np.asarray(w)[:32]).max()  # not zeros
    o = jq.QuantSpec(bits=8, granularity="channel", method="outliers")
    big = w.at[0].mul(1e5)
    with pytest.raises(NonFiniteError, match="beyond float16"):
        jq.quantize(big, o, {"act_abs_max": jnp.zeros(256).at[0].set(10.0)})
    with pytest.raises(NonFiniteError, match="act_abs_max holds NaN"):
        jq.quantize(w, o, {"act_abs_max": jnp.full(256, jnp.nan)})
    # a whole group of outlier rows: the quantized part is zeros there, which is right
    q = jq.quantize(w[:64], jq.QuantSpec(bits=4, group_size=16, method="outliers", options={"max_fraction": 0.5}),
                    {"act_abs_max": jnp.zeros(64).at[:16].set(100.0)})
    np.testing.assert_allclose(np.asarray(q.dequantize())[:16], np.asarray(w[:16]), rtol=1e-3, atol=1e-3)


def test_every_method_refuses_empty_arrays_and_awq_outside_the_pipeline():
    from jquant.errors import ShapeError, SpecError
    for spec in (jq.QuantSpec(format="q4_0", method="kquant"), jq.QuantSpec(format="nvfp4", method="blockfloat"),
                 jq.QuantSpec(bits=4, symmetric=False, method="hqq")):
        with pytest.raises(ShapeError, match=r"^e: cannot quantize an empty array"):
            jq.quantize(jnp.zeros((0, 64)), spec, path="e")
    awq = jq.QuantSpec(bits=4, group_size=16, symmetric=False, method="awq")
    with pytest.raises(SpecError, match=r"^w: method 'awq' transforms a whole decoder block"):
        jq.quantize(jnp.ones((64, 8)), awq, {"act_abs_mean": jnp.ones(64), "hessian": jnp.eye(64)}, path="w")
