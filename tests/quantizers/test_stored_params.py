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
