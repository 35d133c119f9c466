"""Activation and KV-cache quantization (jquant.activations) against a float64 NumPy
reference, and placed in a model by rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jquant.activations import ActQuantSpec, fake_quant, set_quantizers
from jquant.errors import SpecError
from jquant.models import LlamaConfig, forward, init_model

LIN = r"_proj/kernel$"


def _reference(x, bits, symmetric, group, clip):
    """float64: per row (group) of the last axis, as the module doc states."""
    x = np.asarray(x, np.float64)
    n = x.shape[-1]
    g = n if group is None else group
    xg = x.reshape(*x.shape[:-1], n // g, g)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        amax = np.abs(xg).max(-1, keepdims=True) * clip
        s = np.where(amax > 0, amax / qmax, 1.0)
        out = np.clip(np.round(xg / s), -qmax, qmax) * s
    else:
        qmax = 2 ** bits - 1
        lo = np.minimum(xg.min(-1, keepdims=True), 0) * clip
        hi = np.maximum(xg.max(-1, keepdims=True), 0) * clip
        s = np.where(hi > lo, (hi - lo) / qmax, 1.0)
        z = np.round(-lo / s)
        out = (np.clip(np.round(xg / s) + z, 0, qmax) - z) * s
    return out.reshape(x.shape), np.broadcast_to(s, xg.shape).reshape(x.shape)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group,clip", [(None, 1.0), (16, 0.9)], ids=["row", "g16-clip"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_fake_quant_matches_float64_reference(bits, symmetric, group, clip, jit):
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((3, 5, 64)) * np.where(np.arange(64) % 13 == 0, 20.0, 1.0)  # outlier channels
    x[1, 2] = 0.0  # a row of zeros
    x = x.astype(np.float32)
    spec = ActQuantSpec(bits=bits, symmetric=symmetric, group_size=group, clip_ratio=clip)
    f = jax.jit(fake_quant, static_argnums=1) if jit else fake_quant
    got = np.asarray(f(jnp.asarray(x), spec), np.float64)
    want, step = _reference(x, bits, symmetric, group, clip)
    # float32 vs float64: a value on a rounding boundary may land one step over; nothing more
    assert np.all(np.abs(got - want) <= step * (1 + 1e-5) + 1e-7)
    assert np.mean(np.abs(got - want) < 1e-5 * (np.abs(want) + step)) > 0.995
    np.testing.assert_array_equal(got[1, 2], 0.0)
    levels = len(np.unique(got[0, 0] if group is None else got[0, 0, :16]))
    assert levels <= 2 ** bits


def test_fake_quant_gradient_is_straight_through():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 32)), jnp.float32)
    g = jax.grad(lambda v: jnp.sum(fake_quant(v, ActQuantSpec(bits=4)) * jnp.arange(32.0)))(x)
    np.testing.assert_array_equal(np.asarray(g), np.broadcast_to(np.arange(32.0), (4, 32)))


@pytest.mark.parametrize("kw, match", [
    (dict(bits=1), "bits=1"), (dict(bits=9), "bits=9"), (dict(bits=4.0), "bits=4.0"),
    (dict(clip_ratio=0.0), "clip_ratio"), (dict(clip_ratio=1.5), "clip_ratio"),
    (dict(group_size=0), "group_size"), (dict(symmetric="yes"), "symmetric"),
])
def test_bad_specs(kw, match):
    with pytest.raises(SpecError, match=match):
        ActQuantSpec(**kw)
    with pytest.raises(SpecError, match="unknown activation quantization spec key"):
        ActQuantSpec.from_dict({"bits": 4, "granularity": "token"})


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 96, (2, 40)), jnp.int32)
    return init_model(cfg, key=0), toks


def _logits(model, toks):
    gd, st = nnx.split(model)
    return np.asarray(forward(gd, st, toks)[0])


def test_quantizers_placed_by_rules(tiny):
    model, toks = tiny
    ref = _logits(model, toks)
    a8, placed = set_quantizers(model, [(LIN, ActQuantSpec(bits=8))])
    assert len(placed) == 14 and model.layers[0].mlp.down_proj.input_quant is None  # the original is unchanged
    a4, _ = set_quantizers(model, [(r"down_proj/kernel$", None), (LIN, ActQuantSpec(bits=4))])
    assert a4.layers[1].mlp.down_proj.input_quant is None and a4.layers[1].mlp.up_proj.input_quant.bits == 4
    e8 = np.abs(_logits(a8, toks) - ref).max() / np.abs(ref).max()
    e4 = np.abs(_logits(a4, toks) - ref).max() / np.abs(ref).max()
    assert 0 < e8 < 0.02 < e4  # 8 bits: close; 4 bits: visibly not
    # the parameters are untouched: a state restores onto either model
    jax.tree.map(np.testing.assert_array_equal, nnx.state(a8), nnx.state(model))
    with pytest.raises(SpecError, match=r"rule\(s\) 1 \('qproj'\) match no linear"):
        set_quantizers(model, [(LIN, ActQuantSpec()), ("qproj", ActQuantSpec())])
    with pytest.raises(SpecError, match="group_size=48 does not divide"):
        set_quantizers(model, [(LIN, ActQuantSpec(group_size=48))])


def test_kv_cache_quantizer_in_full_and_cached_attention(tiny):
    """Keys and values are quantized the same way with and without the cache: prefill plus
    single tokens through the cache give the full forward's logits."""
    model, toks = tiny
    ref = _logits(model, toks)
    kv4, _ = set_quantizers(model, kv_cache=ActQuantSpec(bits=4, symmetric=False, group_size=8))
    full = _logits(kv4, toks)
    assert 1e-3 < np.abs(full - ref).max() / np.abs(ref).max() < 0.5
    gd, st = nnx.split(kv4)
    cache = kv4.init_cache(2, 48)
    chunks = []
    for a, b in [(0, 17), (17, 18), (18, 40)]:
        logits, cache = forward(gd, st, toks[:, a:b], cache=cache)
        chunks.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(chunks, axis=1), full, atol=1e-5, rtol=0)
    # the cache holds codes: two 4-bit codes a byte, a float32 scale and a uint8 zero per group of 8
    k0 = cache.k[0]
    assert k0.codes.dtype == jnp.uint8 and k0.codes.shape == (2, 2, 48, 8) and k0.scale.shape == (2, 2, 48, 2)
    plain = model.init_cache(2, 48)
    assert cache.nbytes == plain.nbytes * (8 + 2 * 4 + 2) // 64  # 18 of 64 bytes per token and head
    # greedy generation through the quantized cache picks what the full (fake-quantized) forward picks
    from jquant.models import generate

    out = np.asarray(generate(kv4, toks[:, :6], 10))
    again = _logits(kv4, jnp.asarray(out))
    np.testing.assert_array_equal(again[:, 5:-1].argmax(-1), out[:, 6:])
    with pytest.raises(SpecError, match="does not divide head_dim=16"):
        set_quantizers(model, kv_cache=ActQuantSpec(group_size=5))
