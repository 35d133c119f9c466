"""Fake quantization with the straight-through estimator and learned step sizes (LSQ/LSQ+):
gradients against the papers' formulas (float64 NumPy) and finite differences, and the
converted QTensor against the fake-quant forward, bit for bit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant as jq
from jquant.errors import SpecError
from jquant.qat import init_params, lsq_fake_quant, ste_fake_quant, to_qtensor
from jquant.qat.fake_quant import grad_scale

SPECS = [jq.QuantSpec(bits=4, group_size=32, symmetric=False), jq.QuantSpec(bits=3, group_size=64),
         jq.QuantSpec(bits=2, group_size=32, symmetric=False), jq.QuantSpec(bits=8, granularity="channel"),
         jq.QuantSpec(bits=4, group_size=32, full_range=True)]


def _w(shape=(128, 24), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.05


def _reference(w, scale, zero, spec):
    """LSQ / LSQ+ in float64 NumPy: value, d/dw (STE), d/ds and d/dz (before the gradient scale),
    for groups along axis 0 of an (in, out) kernel, group size from the spec."""
    w = np.asarray(w, np.float64)
    K, N = w.shape
    S = K if spec.granularity == "channel" else spec.group_size
    g = np.arange(K) // S
    s = np.asarray(jnp.asarray(scale).astype(spec.scale_dtype), np.float64)[g]
    bits = spec.bits
    if spec.symmetric:
        half = 2 ** (bits - 1)
        lo, hi = (-half if spec.full_range else -(half - 1)), half - 1
        v = w / s
        r = np.round(v)
        q = np.clip(r, lo, hi)
        inside = (r >= lo) & (r <= hi)
        val = q * s
        ds = np.where(inside, r - v, q)
        dz = None
    else:
        z = np.clip(np.round(np.asarray(zero, np.float64)), 0, 2 ** bits - 1)[g]
        v = w / s
        r = np.round(v) + z
        c = np.clip(r, 0, 2 ** bits - 1)
        inside = (r >= 0) & (r <= 2 ** bits - 1)
        val = (c - z) * s
        ds = np.where(inside, np.round(v) - v, c - z)
        dz = np.where(inside, 0.0, -s)
    return val, inside.astype(np.float64), ds, dz, g


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}-{'sym' if s.symmetric else 'asym'}")
def test_lsq_forward_gradients_and_conversion_match_the_papers(spec):
    w = _w()
    p = init_params(w, spec)
    # move the learned parameters off the RTN grid so some weights clip
    p = {"scale": p["scale"] * 0.7, "zero": None if p["zero"] is None else p["zero"] + 0.4}
    cot = jax.random.normal(jax.random.key(1), w.shape)

    def loss(w, s, z):
        return jnp.sum(lsq_fake_quant(w, s, z, spec) * cot)

    val = np.asarray(lsq_fake_quant(w, p["scale"], p["zero"], spec))
    ref_val, inside, ds, dz, g = _reference(w, p["scale"], p["zero"], spec)
    np.testing.assert_allclose(val, ref_val, rtol=0, atol=1e-7)
    assert 0.02 < 1 - inside.mean() < 0.9  # both regimes are exercised
    gw, gs, gz = jax.grad(loss, argnums=(0, 1, 2))(w, p["scale"], p["zero"])
    c = np.asarray(cot, np.float64)
    np.testing.assert_allclose(np.asarray(gw), c * inside, rtol=0, atol=1e-6)
    G = p["scale"].shape[0]
    scale = grad_scale(spec, w.shape)
    want_s = np.stack([(c * ds)[g == i].sum(0) for i in range(G)]) * scale
    np.testing.assert_allclose(np.asarray(gs), want_s, rtol=1e-5, atol=1e-6)
    if dz is not None:
        want_z = np.stack([(c * dz)[g == i].sum(0) for i in range(G)]) * scale
        np.testing.assert_allclose(np.asarray(gz), want_z, rtol=1e-5, atol=1e-6)
    # the QTensor after training holds exactly the forward value
    qt = to_qtensor(w, p["scale"], p["zero"], spec)
    np.testing.assert_array_equal(np.asarray(qt.dequantize()), val)
    assert qt.grid == spec.grid and qt.method == "qat"


def test_lsq_gradient_scale_is_lsqs():
    spec = jq.QuantSpec(bits=4, group_size=32, symmetric=False)
    assert grad_scale(spec, (128, 24)) == pytest.approx(1 / np.sqrt(32 * 15))
    spec = jq.QuantSpec(bits=3, group_size=64)
    assert grad_scale(spec, (128, 24)) == pytest.approx(1 / np.sqrt(64 * 3))


def test_ste_matches_finite_differences_inside_and_outside_the_range():
    """d(fake quant)/dw is the derivative of the unrounded, clipped map: 1 inside, 0 outside."""
    spec = jq.QuantSpec(bits=3, group_size=32, symmetric=False)
    w = _w((32, 4))
    p = init_params(w, spec)
    s = p["scale"] * 0.5  # half the step: the tails clip
    z = p["zero"]
    f = lambda x: jnp.sum(lsq_fake_quant(x, s, z, spec))  # noqa: E731
    g = np.asarray(jax.grad(f)(w))
    s16 = np.asarray(s.astype(jnp.float16), np.float64)[0]
    zi = np.clip(np.round(np.asarray(z, np.float64)[0]), 0, 7)

    def smooth(x):  # the clipped map without rounding, value per weight
        return (np.clip(x / s16 + zi, 0, 7) - zi) * s16

    x = np.asarray(w, np.float64)
    h = 1e-6
    fd = (smooth(x + h) - smooth(x - h)) / (2 * h)
    inside = (x / s16 + zi > 0.5) & (x / s16 + zi < 6.5)  # away from the kinks
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(g[inside], fd[inside], atol=1e-5)
    far = (x / s16 + zi < -1) | (x / s16 + zi > 8)
    assert far.any()
    np.testing.assert_allclose(g[far], fd[far], atol=1e-5)


@pytest.mark.parametrize("spec", [jq.QuantSpec(format="nf4", group_size=32),
                                  jq.QuantSpec(method="kquant", format="q4_0"),
                                  jq.QuantSpec(bits=4, group_size=32, symmetric=False, zero_type="float")])
def test_ste_fake_quant_any_format_identity_gradient(spec):
    w = _w((64, 16))
    val = ste_fake_quant(w, spec)
    qt, _ = jq.quantizers.quantize_weight(w, spec, {})
    np.testing.assert_array_equal(np.asarray(val), np.asarray(qt.dequantize()))
    g = jax.grad(lambda x: jnp.sum(ste_fake_quant(x, spec) * 3.0))(w)
    np.testing.assert_array_equal(np.asarray(g), np.full(w.shape, 3.0, np.float32))


def test_lsq_refuses_what_it_does_not_train():
    w = _w()
    with pytest.raises(SpecError, match="format 'nf4'.*ste_fake_quant"):
        init_params(w, jq.QuantSpec(format="nf4", group_size=32))
    with pytest.raises(SpecError, match="zero_type 'float'"):
        lsq_fake_quant(w, jnp.ones((4, 24)), jnp.zeros((4, 24)),
                       jq.QuantSpec(bits=4, group_size=32, symmetric=False, zero_type="float"))
    spec = jq.QuantSpec(bits=4, group_size=32, symmetric=False)
    with pytest.raises(SpecError, match="must have the spec's grid"):
        init_params(w, spec, jq.quantize(w, jq.QuantSpec(bits=3, group_size=32, symmetric=False)))
