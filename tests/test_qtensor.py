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


def test_sharded_dequantize_subprocess(cpu_devices_env):
    env = cpu_devices_env(8)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-c", SHARDING_SCRIPT], env=env, cwd=root, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SHARDING_OK" in res.stdout


# ---------------------------------------------------------------------------------------
# Parts against metadata: a QTensor whose arrays disagree with its static fields is refused
# ---------------------------------------------------------------------------------------
from jquant.errors import DTypeError, NonFiniteError, ShapeError, SpecError  # noqa: E402
from jquant.qtensor import check_parts, check_values  # noqa: E402


def asym():
    return jquant.quantize(rand((64, 8), 0), SPEC)  # codes (8, 8) uint32, scale/zero (2, 8)


@pytest.mark.parametrize("change, err, words", [
    (dict(codes=jnp.zeros((7, 8), jnp.uint32)), ShapeError, ["codes", "(7, 8)", "expected (8, 8)", "64 4-bit codes"]),
    (dict(codes=jnp.zeros((8, 8), jnp.int32)), DTypeError, ["codes", "int32", "uint32"]),
    (dict(codes=jnp.zeros((8, 8), jnp.uint8)), DTypeError, ["codes", "uint8", "uint32"]),
    (dict(scale=jnp.ones((4, 8), jnp.float16)), ShapeError, ["scale", "(4, 8)", "expected (2, 8)", "group 32"]),
    (dict(scale=jnp.ones((2, 8), jnp.int32)), DTypeError, ["scale", "int32", "floating"]),
    (dict(zero=None), ShapeError, ["zero is None", "(2, 8)"]),
    (dict(zero=jnp.ones((2, 8), jnp.float16)), DTypeError, ["zero", "float16", "integer"]),
    (dict(g_idx=jnp.zeros((63,), jnp.int32)), ShapeError, ["g_idx", "(63,)", "expected (64,)"]),
    (dict(g_idx=jnp.zeros((64,), jnp.float32)), DTypeError, ["g_idx", "float32", "integer"]),
    (dict(g_idx=jnp.zeros((64,), jnp.int32), perm=jnp.arange(64, dtype=jnp.int32)), ShapeError,
     ["both g_idx and perm"]),
    (dict(perm=jnp.arange(32, dtype=jnp.int32)), ShapeError, ["perm", "(32,)", "expected (64,)"]),
    (dict(outlier_idx=jnp.arange(2, dtype=jnp.int32)), ShapeError, ["outlier_idx and outlier_w", "only outlier_idx"]),
    (dict(outlier_idx=jnp.arange(2, dtype=jnp.int32), outlier_w=jnp.ones((3, 8), jnp.float16)), ShapeError,
     ["outlier_w", "(3, 8)", "expected (2, 8)"]),
    (dict(shape=(64, 9)), ShapeError, ["codes", "(8, 8)", "expected (8, 9)"]),
    (dict(group_size=16), ShapeError, ["scale", "(2, 8)", "expected (4, 8)"]),
    (dict(grid=SPEC.grid._replace(bits=3)), ShapeError, ["codes", "(8, 8)", "expected (6, 8)", "3-bit"]),
    (dict(word_bits=8), ShapeError, ["codes", "(8, 8)", "expected (32, 8)", "32 uint8 words"]),
    (dict(grid=SPEC.grid._replace(symmetric=True)), ShapeError, ["zero", "stores no zero", "valid: None"]),
    (dict(grid=SPEC.grid._replace(fmt="int5")), SpecError, ["'int5'", "valid:"]),
    (dict(axis=2), SpecError, ["axis", "0..1", "2"]),
    (dict(granularity="row"), SpecError, ["'row'", "tensor, channel, group"]),
    (dict(dtype="int8"), SpecError, ["'int8'", "float dtype"]),
])
def test_parts_disagreeing_with_metadata_are_refused(change, err, words):
    with pytest.raises(err) as ei:
        dataclasses.replace(asym(), **change)
    for w in words:
        assert w in str(ei.value), (w, str(ei.value))


def test_block_and_bcq_formats_are_checked():
    w = rand((64, 8), 1)
    q8 = jquant.quantize(w, QuantSpec(format="q8_0", method="kquant"))
    with pytest.raises(ShapeError, match=r"codes has shape \(67, 8\), expected \(68, 8\) \(2 blocks of 34 bytes"):
        dataclasses.replace(q8, codes=q8.codes[:67])
    with pytest.raises(ShapeError, match=r"has a scale of shape \(1, 1\), but q8_0 stores no scale \(q8_0 stores its scales in the code blocks\); valid: None"):
        dataclasses.replace(q8, scale=jnp.ones((1, 1)))
    with pytest.raises(ShapeError, match=r"in a multiple of 32; got shape \(48, 8\)"):
        dataclasses.replace(q8, shape=(48, 8))
    nv = jquant.quantize(w, QuantSpec(format="nvfp4", method="blockfloat"))
    with pytest.raises(ShapeError, match=r"scale has shape \(2,\), expected \(1, 1\)"):
        dataclasses.replace(nv, scale=jnp.ones((2,), jnp.float32))
    bq = jquant.quantize(w, QuantSpec(format="bcq", bits=3, group_size=32, method="bcq"))
    assert bq.scale.shape == (3, 2, 8)
    check_parts(bq)
    with pytest.raises(ShapeError, match=r"scale has shape \(2, 8\), expected \(3, 2, 8\) \(one α per bit plane"):
        dataclasses.replace(bq, scale=bq.scale[0])  # a plane-less scale: refused when built


def test_checks_under_jit_vmap_and_tree_map():
    qt = asym()
    # tracers: shapes are checked at trace time
    with pytest.raises(ShapeError, match="scale has shape"):
        jax.jit(lambda s: dataclasses.replace(qt, scale=s).dequantize())(jnp.ones((3, 8), jnp.float16))
    out = jax.jit(lambda s: dataclasses.replace(qt, scale=s).dequantize())(qt.scale)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(qt.dequantize()))
    # placeholder leaves jax unflattens with, and abstract values
    leaves, treedef = jax.tree_util.tree_flatten(qt)
    for fill in (object(), None, 0):
        assert jax.tree_util.tree_unflatten(treedef, [fill] * len(leaves)).shape == qt.shape
    assert jax.eval_shape(lambda q: q, qt).codes.shape == (8, 8)
    assert jax.tree_util.tree_map(lambda a: a.sharding, qt).shape == qt.shape
    # stacked parts share leading batch axes; mismatched ones are refused
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), qt)
    assert jax.vmap(jquant.dequantize)(stacked).shape == (2, 64, 8)
    with pytest.raises(ShapeError, match=r"leading \(batch\) axes \(3,\), other parts \(2,\)"):
        dataclasses.replace(stacked, scale=jnp.stack([qt.scale] * 3))
    # gradients through the scale (integer parts get float0 cotangents)
    g = jax.grad(lambda q: jnp.sum(q.dequantize()), allow_int=True)(qt)
    assert g.scale.shape == (2, 8) and g.codes.dtype == jax.dtypes.float0


def test_check_values():
    qt = asym()
    check_values(qt, "w")
    bad = dataclasses.replace(qt, scale=qt.scale.at[1, 3].set(jnp.nan))  # the constructor reads no values
    with pytest.raises(NonFiniteError, match=r"w: 1 of 16 stored scale value\(s\) are NaN/Inf \(first at index \(1, 3\)"):
        check_values(bad, "w")
    inf_zero = jquant.quantize(rand((64, 8), 2), dataclasses.replace(SPEC, zero_type="float"))
    with pytest.raises(NonFiniteError, match="stored zero"):
        check_values(dataclasses.replace(inf_zero, zero=inf_zero.zero.at[0, 0].set(jnp.inf)))
    with pytest.raises(ShapeError, match=r"w: g_idx holds values in \[0, 2\]; valid: \[0, 2\)"):
        check_values(dataclasses.replace(qt, g_idx=jnp.arange(64, dtype=jnp.int32) % 3), "w")
    with pytest.raises(ShapeError, match="perm repeats rows"):
        check_values(dataclasses.replace(qt, perm=jnp.zeros(64, jnp.int32)), "w")
    with pytest.raises(ShapeError, match=r"outlier_idx holds values in \[1, 64\]; valid: \[0, 64\)"):
        check_values(dataclasses.replace(qt, outlier_idx=jnp.array([1, 64], jnp.int32),
                                         outlier_w=jnp.ones((2, 8), jnp.float16)), "w")
