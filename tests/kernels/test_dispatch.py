"""Dispatch: a tiny quantized Llama runs end to end through the kernels (interpret mode) and
the CPU XLA path, and agrees with the dequantize-then-dot reference."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant import calibrate
from jquant.models import LlamaConfig, forward, generate, init_model
from pallas_kernels import explain, get_backend, prepare, qmatmul, set_backend, use_backend
from pallas_kernels import dispatch


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return init_model(cfg, key=0)


LINEARS = r"(q|k|v|o|gate|up|down)_proj/kernel$"


def _logits(model, state, tokens, backend):
    gd, _ = nnx.split(model)
    with use_backend(backend):
        return np.asarray(forward(gd, state, tokens)[0], np.float64)


def test_rtn_model_backends_agree(tiny):
    _, state = nnx.split(tiny)
    qstate = jq.quantize_tree(state, [(LINEARS, jq.QuantSpec(bits=4, granularity="group", group_size=32,
                                                              symmetric=False))])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 96, size=(2, 12)), jnp.int32)
    ref = _logits(tiny, qstate, tokens, "dequant")
    scale = np.abs(ref).max()
    for b in ("interpret", "xla"):
        out = _logits(tiny, qstate, tokens, b)
        assert np.abs(out - ref).max() <= 1e-4 * scale, b
    # The float model differs: the quantization is really in the path.
    flt = _logits(tiny, state, tokens, "xla")
    assert np.abs(flt - ref).max() > 1e-3 * scale


def test_act_order_gptq_model_through_kernels(tiny):
    """GPTQ with act-order gives g_idx; prepare() turns it into the perm layout the kernels read."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, 96, size=(8, 32)).astype(np.int32)
    spec = jq.QuantSpec(bits=4, granularity="group", group_size=32, symmetric=False, method="gptq",
                        options={"act_order": True})
    qstate, _ = calibrate.quantize_model(tiny, tokens, [(LINEARS, spec)], progress=False)
    leaves = [x for x in jax.tree_util.tree_leaves(qstate, is_leaf=jq.is_qtensor) if jq.is_qtensor(x)]
    assert all(x.g_idx is not None for x in leaves)
    assert all("g_idx" in explain(x, "interpret") for x in leaves)  # not kernel-ready yet
    pstate = prepare(qstate)
    pleaves = [x for x in jax.tree_util.tree_leaves(pstate, is_leaf=jq.is_qtensor) if jq.is_qtensor(x)]
    assert all(x.g_idx is None and x.perm is not None for x in pleaves)
    assert all(explain(x, "interpret") == "interpret" for x in pleaves)
    for a, b in zip(leaves, pleaves):  # the same matrix
        np.testing.assert_array_equal(np.asarray(a.dequantize()), np.asarray(b.dequantize()))
    t = jnp.asarray(tokens[:2, :10])
    ref = _logits(tiny, qstate, t, "dequant")
    scale = np.abs(ref).max()
    for b in ("interpret", "xla"):
        assert np.abs(_logits(tiny, pstate, t, b) - ref).max() <= 1e-4 * scale, b


def test_generate_with_kernels(tiny):
    _, state = nnx.split(tiny)
    qstate = jq.quantize_tree(state, [(LINEARS, jq.QuantSpec(bits=8, granularity="channel"))])
    model = nnx.merge(nnx.split(tiny)[0], qstate)
    prompt = jnp.asarray([[1, 2, 3, 4]], jnp.int32)
    with use_backend("dequant"):
        ref = np.asarray(generate(model, prompt, 6))
    with use_backend("interpret"):
        out = np.asarray(generate(model, prompt, 6))
    np.testing.assert_array_equal(out, ref)


def test_backend_selection_and_fallback():
    assert get_backend() in dispatch.BACKENDS
    assert dispatch.resolve("auto") == ("pallas" if jax.default_backend() == "gpu" else "xla")
    with pytest.raises(ValueError, match="unknown matmul backend"):
        set_backend("cuda")
    nf4 = jq.quantize(jnp.asarray(np.random.default_rng(0).normal(size=(64, 16)), jnp.float32),
                      jq.QuantSpec(format="nf4", granularity="group", group_size=32))
    assert explain(nf4, "interpret").startswith("dequant (no packed path: format 'nf4'")
    x = jnp.ones((3, 64), jnp.float32)
    np.testing.assert_allclose(qmatmul(x, nf4, "interpret"), x @ nf4.dequantize(), rtol=1e-5)
    w = jnp.ones((64, 16))
    np.testing.assert_allclose(qmatmul(x, w), x @ w)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="interpret"):
            qmatmul(x, nf4, "pallas")


def test_weights_no_tile_fits_fall_back_to_dequant():
    """Group 24 over K = 48: no power-of-two K tile walks it, so every backend dequantizes."""
    from kernel_cases import expected, random_qtensor

    qt, deq = random_qtensor(np.random.default_rng(4), 48, 16, kind="asym_int", bits=4, group=24)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(3, 48)), jnp.float32)
    for b in ("interpret", "xla", "dequant"):
        assert explain(qt, b).startswith("dequant"), b
        np.testing.assert_allclose(np.asarray(qmatmul(x, qt, b), np.float64), expected(x, deq, jnp.float32),
                                   rtol=1e-5, atol=1e-5)


def test_perm_survives_checkpoint(tmp_path):
    from kernel_cases import random_qtensor

    qt, deq = random_qtensor(np.random.default_rng(3), 128, 32, kind="asym_int", bits=4, group=32, perm=True)
    jq.save(str(tmp_path / "c"), {"w": qt})
    back = jq.restore(str(tmp_path / "c"))["w"]
    np.testing.assert_array_equal(np.asarray(back.perm), np.asarray(qt.perm))
    np.testing.assert_allclose(np.asarray(back.dequantize(), np.float64), deq, rtol=1e-6)
    assert dataclasses.replace(back, perm=None).nbytes + 128 * 4 == back.nbytes
