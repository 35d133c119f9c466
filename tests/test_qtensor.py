"""QTensor as a pytree: jit, vmap, tree_map, act-order g_idx, sharding."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantSpec

SPEC = QuantSpec(bits=4, group_size=32, symmetric=False)


def rand(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32))


def ref_deq(ref, w, spec, axis=0):
    xg = ref.grouped(np.asarray(w), axis, spec.granularity, spec.group_size)
    r = ref.int_grid(xg, spec.bits, spec.symmetric, spec.full_range, spec.zero_type)
    return r.deq, ~np.isnan(xg)


def test_pytree_leaves_and_static_metadata():
    qt = jquant.quantize(rand((64, 8), 0), SPEC)
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    # children: codes, scale, zero (g_idx None is no leaf); everything else is aux data
    assert [a.dtype for a in leaves] == [jnp.uint32, jnp.float16, jnp.uint8]
    assert [a.shape for a in leaves] == [(8, 8), (2, 8), (2, 8)]
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert rebuilt.shape == (64, 8) and rebuilt.grid == qt.grid and rebuilt.group_size == 32
    # tree_map acts on the arrays and keeps the metadata
    host = jax.tree_util.tree_map(np.asarray, qt)
    assert isinstance(host, jquant.QTensor) and isinstance(host.codes, np.ndarray)
    assert host.grid == qt.grid and host.shape == qt.shape and host.dtype == "float32"
    doubled = jax.tree_util.tree_map(lambda a: a, qt)
    np.testing.assert_array_equal(np.asarray(doubled.dequantize()), np.asarray(qt.dequantize()))
    # a QTensor with a different spec has a different treedef (static metadata)
    other = jquant.quantize(rand((64, 8), 0), dataclasses.replace(SPEC, bits=3))
    assert jax.tree_util.tree_structure(other) != treedef


def test_dequantize_under_jit_and_retracing(ref):
    w = rand((96, 16), 1)
    qt = jquant.quantize(w, SPEC)
    traces = []

    @jax.jit
    def f(q, x):
        traces.append(1)
        return x @ q.dequantize()

    x = rand((3, 96), 2)
    deq, valid = ref_deq(ref, w, SPEC)
    wd = np.asarray(qt.dequantize(), np.float64)
    np.testing.assert_allclose(ref.grouped(wd, 0, "group", 32)[valid], deq[valid], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(f(qt, x)), np.asarray(x, np.float64) @ wd, rtol=1e-5, atol=1e-5)
    # same static metadata, new arrays: no retrace; another spec: one retrace
    f(jquant.quantize(rand((96, 16), 3), SPEC), x)
    assert len(traces) == 1
    f(jquant.quantize(w, dataclasses.replace(SPEC, bits=5)), x)
    assert len(traces) == 2


def test_quantize_inside_jit_returns_qtensor(ref):
    w = rand((64, 8), 4)
    qj = jax.jit(lambda a: jquant.quantize(a, SPEC))(w)
    assert isinstance(qj, jquant.QTensor) and qj.shape == (64, 8)
    deq, valid = ref_deq(ref, w, SPEC)
    got = ref.grouped(np.asarray(qj.dequantize(), np.float64), 0, "group", 32)
    np.testing.assert_allclose(got[valid], deq[valid], rtol=1e-6)


def test_vmap_build_and_dequantize(ref):
    W = rand((3, 64, 8), 5)
    qb = jax.vmap(lambda a: jquant.quantize(a, SPEC))(W)
    assert qb.shape == (64, 8)  # static: the per-example shape
    assert qb.codes.shape == (3, 8, 8) and qb.scale.shape == (3, 2, 8)
    deq_b = jax.vmap(lambda q: q.dequantize())(qb)
    assert deq_b.shape == (3, 64, 8)
    for i in range(3):
        deq, valid = ref_deq(ref, W[i], SPEC)
        np.testing.assert_allclose(ref.grouped(np.asarray(deq_b[i], np.float64), 0, "group", 32)[valid], deq[valid], rtol=1e-6)
    # vmap over a batch stacked by tree_map from separately quantized tensors
    qs = [jquant.quantize(W[i], SPEC) for i in range(3)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *qs)
    np.testing.assert_array_equal(np.asarray(stacked.codes), np.asarray(qb.codes))
    np.testing.assert_array_equal(np.asarray(jax.vmap(jquant.dequantize)(stacked)), np.asarray(deq_b))


def test_dequantize_tree_and_passthrough():
    w = rand((64, 8), 6)
    tree = {"a": jquant.quantize(w, SPEC), "b": [jnp.ones(3, jnp.bfloat16), 7]}
    out = jquant.dequantize_tree(tree)
    assert out["a"].dtype == jnp.float32 and out["a"].shape == (64, 8)
    assert out["b"][0].dtype == jnp.bfloat16 and out["b"][1] == 7
    out16 = jquant.dequantize_tree(tree, jnp.bfloat16)
    assert out16["a"].dtype == jnp.bfloat16
    assert jquant.dequantize(jnp.ones(2), jnp.float16).dtype == jnp.float16
    assert jquant.is_qtensor(tree["a"]) and not jquant.is_qtensor(w)
    assert float(jnp.max(jnp.abs(out["a"] - w))) <= float(jnp.max(tree["a"].scale)) / 2 + 1e-6


def test_repr():
    qt = jquant.quantize(rand((64, 8), 0), SPEC)
    r = repr(qt)
    assert "int4" in r and "group32" in r and "(64, 8)" in r and f"{qt.bits_per_weight:.3f}" in r


@pytest.mark.parametrize("axis", [0, 1])
def test_act_order_g_idx(ref, axis):
    """GPTQ act-order: groups of the permuted order; g_idx maps each original row to its group."""
    K, N, gs = 96, 8, 32
    shape = (K, N) if axis == 0 else (N, K)
    w = rand(shape, 7)
    perm = np.random.default_rng(8).permutation(K)
    spec = dataclasses.replace(SPEC, axis=axis)
    qp = jquant.quantize(jnp.take(w, perm, axis=axis), spec)  # contiguous groups in permuted order
    codes_p = np.asarray(qp.unpacked_codes())
    inv = np.argsort(perm)
    codes = np.take(codes_p, inv, axis=axis)  # back to the original order
    g_idx = jnp.asarray(inv // gs, jnp.int32)  # row perm[j] sits at permuted position j
    qt = dataclasses.replace(qp, codes=jquant.pack(codes, 4, axis=axis), g_idx=g_idx)
    # reference: the original row k uses group inv[k] // gs of the permuted grouping
    xg = ref.grouped(np.take(np.asarray(w), perm, axis=axis), axis, "group", gs)
    r = ref.int_grid(xg, 4, symmetric=False)
    s, z = r.scale[:, 0, :], r.zero[:, 0, :]  # (G, N)
    c = np.moveaxis(codes, axis, 0).astype(np.float64)
    expected = (c - z[inv // gs]) * s[inv // gs]
    got = np.moveaxis(np.asarray(qt.dequantize(), np.float64), axis, 0)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert np.max(np.abs(got - np.moveaxis(np.asarray(w), axis, 0))) <= np.max(s) / 2 + 1e-6
    got_jit = jax.jit(lambda q: q.dequantize())(qt)
    np.testing.assert_array_equal(np.asarray(got_jit), np.asarray(qt.dequantize()))


SHARDING_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jquant

    assert jax.device_count() == 8, jax.devices()
    w = jnp.asarray(np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32))
    for spec in [jquant.QuantSpec(bits=4, group_size=64, symmetric=False),
                 jquant.QuantSpec(bits=3, group_size=128)]:
        qt = jquant.quantize(w, spec)
        expect = np.asarray(jax.jit(lambda q: q.dequantize())(qt))
        assert np.max(np.abs(expect - np.asarray(w))) <= float(jnp.max(qt.scale.astype(jnp.float32))) / 2 + 1e-6
        mesh = Mesh(np.array(jax.devices()), ("out",))
        sh = NamedSharding(mesh, P(None, "out"))  # along the output axis
        qs = jax.tree_util.tree_map(lambda a: jax.device_put(a, sh), qt)
        assert len(qs.codes.sharding.device_set) == 8
        assert {s.data.shape for s in qs.codes.addressable_shards} == {(qt.codes.shape[0], 8)}
        out = jax.jit(lambda q: q.dequantize())(qs)
        np.testing.assert_array_equal(np.asarray(out), expect)
        assert {s.data.shape for s in out.addressable_shards} == {(256, 8)}, out.sharding
    print("SHARDING_OK")
""")


def test_sharded_dequantize_subprocess():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SHARDING_OK" in res.stdout
