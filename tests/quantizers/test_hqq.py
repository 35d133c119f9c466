"""HQQ (jquant.quantizers.hqq) against a float64 NumPy reference written here from the
algorithm's description (module docstring of hqq.py and the hqq package's proximal solver)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jquant as jq
from jquant.errors import SpecError
from jquant.quantizers import hqq, quantize_weight
from jquant.quantizers.registry import options_of


def f16(v):
    return np.asarray(v, np.float64).astype(np.float16).astype(np.float64)


def grouped(w, gs):
    """(K, N) -> (G, gs, N), NaN-padded along K."""
    K, N = w.shape
    G = -(-K // gs)
    x = np.full((G * gs, N), np.nan)
    x[:K] = w
    return x.reshape(G, gs, N)


def hqq_reference(w, bits, gs, zero_type, *, p=0.7, beta=10.0, kappa=1.01, iters=20, early_stop=True,
                  optimize_scale=None, q=None):
    """float64 HQQ with per-group descent; returns (dequantized (G, gs, N), objective per group, J0)."""
    integer = zero_type == "int"
    opt_scale = integer if optimize_scale is None else optimize_scale
    q = (4.0 if integer else 2.0) if q is None else q
    xg = grouped(np.asarray(w, np.float64), gs)
    valid = ~np.isnan(xg)
    x = np.where(valid, xg, 0.0)
    nvalid = np.maximum(valid.sum(1, keepdims=True), 1)
    maxq = 2**bits - 1
    lo, hi = np.nanmin(xg, 1, keepdims=True), np.nanmax(xg, 1, keepdims=True)
    if integer:
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        s = f16((hi - lo) / maxq)
        zp = np.clip(np.round(-lo / np.where(s == 0, 1, s)), 0, maxq)
    else:  # from the integer-zero grid (int_init), its zero turned into a float minimum
        lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
        s = f16((hi - lo) / maxq)
        zp = f16(-np.clip(np.round(-lo / np.where(s == 0, 1, s)), 0, maxq) * s)
    unit = np.where(s > 0, s, 1.0)

    def codes(s, zp):
        sd = np.where(s == 0, 1, s)
        return np.clip(np.round(x / sd) + zp, 0, maxq) if integer else np.clip(np.round((x - zp) / sd), 0, maxq)

    def deq(c, s, zp):
        return (c - zp) * s if integer else c * s + zp

    def objective(s, zp):
        err = np.abs(x - deq(codes(s, zp), s, zp)) / unit
        return np.sum(np.where(valid, err**q, 0), 1, keepdims=True)

    J = J0 = objective(s, zp)
    active = np.ones_like(J, bool)
    for _ in range(iters):
        if not active.any():
            break
        sd = np.where(s == 0, 1, s)
        c = codes(s, zp)
        z = zp if integer else -zp / sd
        r = x - (c - z) * s
        a = np.abs(r)
        thr = (1 / beta) * (np.ones_like(a) if p == 1 else np.where(a > 0, a, 1.0) ** (p - 1))
        t = x - np.sign(r) * np.maximum(a - thr, 0)
        z_new = np.sum(np.where(valid, c - t / sd, 0), 1, keepdims=True) / nvalid
        if integer:
            z_new = np.clip(np.round(z_new), 0, maxq)
        s_new = s
        if opt_scale:
            cz = np.where(valid, c - z_new, 0)
            num, den = np.sum(cz * t, 1, keepdims=True), np.sum(cz * cz, 1, keepdims=True)
            s_ls = num / np.where(den > 0, den, 1)
            s_new = np.where((den > 0) & (s_ls > 0), s_ls, s)
        s_c = f16(s_new)
        zp_c = z_new if integer else f16(-z_new * s_c)
        J_c = objective(s_c, zp_c)
        take = active & (J_c < J)
        s, zp, J = np.where(take, s_c, s), np.where(take, zp_c, zp), np.where(take, J_c, J)
        if early_stop:
            active = take
        beta *= kappa
    return np.where(valid, deq(codes(s, zp), s, zp), np.nan), J, J0


def weights(K, N, seed):
    """LLM-like weights: N(0, 0.02²) with a few large outliers."""
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.02, (K, N))
    idx = rng.integers(0, w.size, size=max(1, w.size // 200))
    w.flat[idx] *= rng.uniform(4, 10, size=idx.size)
    return w.astype(np.float32)


def spec(bits, gs, zero_type, **options):
    return jq.QuantSpec(bits=bits, group_size=gs, symmetric=False, zero_type=zero_type, method="hqq",
                        options=options)


@pytest.mark.parametrize("zero_type", ["int", "float"])
@pytest.mark.parametrize("bits,gs,shape", [(4, 64, (256, 48)), (3, 64, (200, 40)), (2, 32, (128, 64)),
                                           (1, 8, (64, 16)), (8, 16, (64, 16))])
def test_matches_float64_reference(bits, gs, shape, zero_type):
    w = weights(*shape, seed=bits)
    qt, info = quantize_weight(w, spec(bits, gs, zero_type))
    deq_ref, J_ref, J0_ref = hqq_reference(w, bits, gs, zero_type)
    got = grouped(np.asarray(qt.dequantize(jnp.float32), np.float64), gs)
    valid = ~np.isnan(deq_ref)
    # Codes sit on rounding boundaries differently in float32 and float64 now and then, and
    # the descent path can fork there; nearly every group must agree exactly.
    same = np.all(np.where(valid, np.isclose(got, deq_ref, rtol=1e-6, atol=1e-9), True), axis=1)
    assert same.mean() > 0.97, same.mean()
    n = w.size
    np.testing.assert_allclose(info["loss"], J_ref.sum() / n, rtol=2e-3)
    np.testing.assert_allclose(info["loss_rtn"], J0_ref.sum() / n, rtol=1e-5)
    assert info["loss"] <= info["loss_rtn"]
    assert qt.method == "hqq" and qt.shape == shape
    if zero_type == "int":  # an integer zero point: 0 is exactly on the grid
        assert qt.zero.dtype == jnp.uint8


def _solve_objectives(w, bits, gs, zero_type, max_iters, **options):
    """Each group's objective after k = 0..max_iters iterations, from the jitted solve."""
    sp = spec(bits, gs, zero_type, **options)
    lay = hqq.layout_for(w.shape, sp)
    xg = lay.to_groups(jnp.asarray(w, jnp.float32))
    s0, zp0 = hqq.formats.params_from_range(*hqq.find_range(xg, sp), sp.grid)
    out = []
    for k in range(max_iters + 1):
        opts = dataclasses_replace(options_of(sp).resolved(zero_type), iters=k)
        out.append(np.asarray(hqq.hqq_solve(xg, s0, zp0, grid=sp.grid, opts=opts)[2]))
    return np.stack(out)


def dataclasses_replace(o, **kw):
    import dataclasses
    return dataclasses.replace(o, **kw)


@pytest.mark.parametrize("zero_type,options", [("int", {}), ("float", {}), ("float", {"optimize_scale": True}),
                                               ("int", {"early_stop": False, "objective_norm": 2.0})])
def test_objective_never_increases_random(zero_type, options):
    J = _solve_objectives(weights(256, 32, seed=7), 3, 32, zero_type, 12, **options)
    assert np.all(np.diff(J, axis=0) <= 0)
    assert np.any(J[-1] < J[0])  # and it does move


@pytest.mark.realmodel
@pytest.mark.parametrize("name,zero_type", [("blk.0.ffn_down.weight", "int"), ("blk.5.attn_q.weight", "float")])
def test_objective_never_increases_real_weights(name, zero_type):
    """On SmolLM2-135M's own weights (GGUF, HF layout (out, in) -> Flax (in, out))."""
    import gguf

    from jquant.models import default_model_path

    reader = gguf.GGUFReader(default_model_path())
    t = next(t for t in reader.tensors if t.name == name)
    w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape))).T
    J = _solve_objectives(np.ascontiguousarray(w[:, :256]), 3, 64, zero_type, 10)
    assert np.all(np.diff(J, axis=0) <= 0)
    assert J[-1].sum() < J[0].sum()


def test_jit_and_op_by_op_agree():
    w = weights(128, 16, seed=3)
    sp = spec(3, 32, "int")
    qt, _ = quantize_weight(w, sp)
    with jax.disable_jit():
        qt2, _ = quantize_weight(w, sp)
    np.testing.assert_array_equal(np.asarray(qt.codes), np.asarray(qt2.codes))
    np.testing.assert_array_equal(np.asarray(qt.scale), np.asarray(qt2.scale))


def test_plugs_into_trees_and_the_pipeline():
    from jquant import calibrate
    from jquant.models import LlamaConfig, init_model

    params = {"dec": {"w": weights(128, 32, 1), "b": np.ones(32, np.float32)}}
    out = jq.quantize_tree(params, [(r"w$", spec(3, 64, "int"))])
    assert isinstance(out["dec"]["w"], jq.QTensor) and out["dec"]["w"].method == "hqq"
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    toks = np.random.default_rng(0).integers(0, 64, size=(2, 16)).astype(np.int32)
    state, logs = calibrate.quantize_model(init_model(cfg, key=0), toks, [(r"_proj/kernel$", spec(4, 16, "int"))],
                                           progress=False)
    assert [e.method for e in logs] == ["hqq"] * 7
    assert all(e.loss is not None and e.recon is None for e in logs)  # data-free: no Hessian collected


@pytest.mark.parametrize("options,match", [
    ({"lp_norm": 0.0}, "lp_norm must be in"), ({"lp_norm": 1.5}, "lp_norm must be in"),
    ({"beta": 0}, "beta must be > 0"), ({"kappa": 0.5}, "kappa must be >= 1"), ({"iters": -1}, "iters must be >= 0"),
    ({"objective_norm": 0.0}, "objective_norm must be in"), ({"iters": 2.5}, "iters=2.5 must be of type int"),
    ({"optimize_scale": "yes"}, "must be of type bool"), ({"lp": 0.7}, r"unknown hqq option\(s\) \['lp'\]"),
])
def test_bad_options(options, match):
    with pytest.raises(SpecError, match=match):
        spec(4, 64, "int", **options)


def test_bad_specs():
    with pytest.raises(SpecError, match="asymmetric int grid"):
        jq.QuantSpec(method="hqq")  # symmetric by default: no zero point to solve for
    with pytest.raises(SpecError, match="does not take format 'nf4'"):
        jq.QuantSpec(format="nf4", method="hqq")
