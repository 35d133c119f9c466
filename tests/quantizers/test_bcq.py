"""BCQ (jquant.quantizers.bcq) against a float64 NumPy reference written here from the
algorithm's description (Xu et al., arXiv:1802.00150: greedy initialisation, then
alternating least-squares α's and nearest codes, with jquant's per-group acceptance rule)."""

import numpy as np
import pytest

import jax
import jax.numpy as jnp

import jquant as jq
from jquant import recipes
from jquant.errors import DTypeError, NonFiniteError, ShapeError, SpecError
from jquant.quantizers import bcq, quantize_weight


def f16(v):
    return np.asarray(v, np.float64).astype(np.float16).astype(np.float64)


def grouped(w, gs):
    """(K, N) -> (G, gs, N), NaN-padded along K."""
    K, N = w.shape
    G = -(-K // gs)
    x = np.full((G * gs, N), np.nan)
    x[:K] = w
    return x.reshape(G, gs, N)


def values(alpha):
    """(G, k, N) α's -> (G, 2^k, N): the value of every code c, Σ_i α_i·(2·bit_i(c) − 1)."""
    k = alpha.shape[1]
    signs = np.array([[1.0 if (c >> i) & 1 else -1.0 for i in range(k)] for c in range(2**k)])  # (2^k, k)
    return np.einsum("ck,gkn->gcn", signs, alpha)


def nearest_ref(x, valid, alpha):
    """Nearest code per element (ties to the higher code) and each group's squared error."""
    d = (x[:, :, None, :] - values(alpha)[:, None, :, :]) ** 2  # (G, S, 2^k, N)
    nc = d.shape[2]
    c = nc - 1 - np.argmin(d[:, :, ::-1, :], axis=2)
    err = np.sum(np.where(valid, np.min(d, axis=2), 0.0), axis=1, keepdims=True)
    return np.where(valid, c, 0), err


def signs_of(codes, k):
    return np.stack([((codes >> i) & 1) * 2.0 - 1.0 for i in range(k)], axis=-1)  # (..., k)


def greedy_ref(x, valid, k):
    """float64 greedy: α_i = f16(mean|r|), b_i = sign(r) (sign(0) = +1). Returns (alpha (G,k,N), codes)."""
    n = np.maximum(valid.sum(1, keepdims=True), 1)
    r = x.copy()
    alphas, codes = [], np.zeros(x.shape, np.int64)
    for i in range(k):
        pos = r >= 0
        a = f16(np.sum(np.where(valid, np.abs(r), 0), 1, keepdims=True) / n)
        r = np.where(valid, r - np.where(pos, a, -a), 0)
        alphas.append(a)
        codes |= np.where(pos & valid, 1 << i, 0)
    return np.concatenate(alphas, axis=1), codes


def least_squares_ref(M, rhs):
    """Solve the normal equations M·α = rhs ((..., k, k), (..., k)). A singular system (a plane
    that is a combination of earlier planes over the group) takes its basic solution: such a
    plane gets α = 0 and the others their least squares."""
    k = M.shape[-1]
    regular = np.linalg.matrix_rank(M, hermitian=True) == k
    a = np.zeros(rhs.shape)
    a[regular] = np.linalg.solve(M[regular], rhs[regular][..., None])[..., 0]
    for idx in zip(*np.nonzero(~regular)):
        keep = []
        for j in range(k):  # planes independent of the ones kept before them
            if np.linalg.matrix_rank(M[idx][np.ix_(keep + [j], keep + [j])], hermitian=True) == len(keep) + 1:
                keep.append(j)
        if keep:
            a[idx][keep] = np.linalg.solve(M[idx][np.ix_(keep, keep)], rhs[idx][keep])
    return a


def bcq_reference(w, k, gs, iters):
    """float64 BCQ; returns (dequantized (G, gs, N), error per group (G, 1, N), valid)."""
    xg = grouped(np.asarray(w, np.float64), gs)
    valid = ~np.isnan(xg)
    x = np.where(valid, xg, 0.0)
    alpha, _ = greedy_ref(x, valid, k)
    codes, err = nearest_ref(x, valid, alpha)
    for _ in range(iters):
        B = np.where(valid[..., None], signs_of(codes, k), 0.0)  # (G, S, N, k)
        M = np.einsum("gsni,gsnj->gnij", B, B)
        rhs = np.einsum("gsni,gsn->gni", B, x)
        a = least_squares_ref(M, rhs)
        a_new = f16(np.abs(np.moveaxis(a, -1, 1)))
        c_new, e_new = nearest_ref(x, valid, a_new)
        take = e_new <= err
        improved = np.any(take & (e_new < err))
        alpha = np.where(take, a_new, alpha)
        codes = np.where(take, c_new, codes)
        err = np.where(take, e_new, err)
        if not improved:
            break
    sg = signs_of(codes, k)
    deq = np.einsum("gsnk,gkn->gsn", sg, alpha)
    return np.where(valid, deq, np.nan), err, valid


def weights(kind, shape, seed=0):
    rng = np.random.default_rng(seed)
    if kind == "normal":
        w = rng.standard_normal(shape)
    else:  # heavy tails: Student t with 2 degrees of freedom
        w = rng.standard_t(2, shape)
    return (0.02 * w).astype(np.float32)


def spec(bits=3, group_size=128, **kw):
    return jq.QuantSpec(method="bcq", format="bcq", bits=bits, group_size=group_size, **kw)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", ["normal", "t2"])
def test_matches_float64_reference(k, kind):
    w = weights(kind, (320, 48), seed=k)  # groups of 128: a ragged last group of 64
    qt, info = quantize_weight(jnp.asarray(w), spec(k, options={"iters": 15}), path="m/q_proj/kernel")
    got = grouped(np.asarray(qt.dequantize(jnp.float32), np.float64), 128)
    ref, ref_err, valid = bcq_reference(w, k, 128, 15)
    same = np.all(np.where(valid, got == ref, True), axis=1)  # (G, N)
    assert same.mean() >= 0.99, f"{k} planes, {kind}: {same.mean():.4f} of groups match"
    x = grouped(w.astype(np.float64), 128)
    got_err = np.sum(np.where(valid, (got - x) ** 2, 0), axis=1)  # (G, N)
    np.testing.assert_allclose(got_err.sum(), ref_err.sum(), rtol=2e-4)
    np.testing.assert_allclose(got_err[same], ref_err[:, 0][same], rtol=1e-5, atol=1e-12)
    assert info["loss"] == pytest.approx(got_err.sum() / w.size, rel=1e-5)
    assert np.all(qt.scale.astype(np.float32) >= 0)


def test_error_never_increases_across_rounds():
    for kind, k in (("normal", 3), ("t2", 2), ("t2", 4)):
        w = weights(kind, (384, 64), seed=7)
        xg = jnp.asarray(grouped(w, 64), jnp.float32)
        valid = ~np.isnan(np.asarray(xg))
        x64 = np.where(valid, np.asarray(xg, np.float64), 0)
        prev, prev64, totals = None, None, []
        for n in range(9):
            a, c, e, eg, e0, rounds, over = bcq.bcq_solve(xg, n, k=k)
            assert not bool(over)
            a, c, e = np.asarray(a), np.asarray(c), np.asarray(e)
            assert int(rounds) <= n
            deq = np.einsum("gsnk,gkn->gsn", signs_of(c.astype(np.int64), k), a.astype(np.float64))
            e64 = np.sum(np.where(valid, (x64 - deq) ** 2, 0), axis=1, keepdims=True)
            np.testing.assert_allclose(e, e64, rtol=1e-5, atol=1e-12)  # the solve's error is the true one
            if prev is not None:
                assert np.all(e <= prev), f"{kind}, {k} planes: a group's error rose in round {n}"
                assert np.all(e64 <= prev64 * (1 + 1e-6) + 1e-15)
            prev, prev64 = e, e64
            totals.append(e.sum())
        assert totals[-1] < 0.97 * totals[0]  # the rounds did something
        assert np.all(e <= np.asarray(e0)) and np.asarray(e0).sum() <= np.asarray(eg).sum() * (1 + 1e-6)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_beats_plain_greedy(k):
    w = weights("normal", (320, 48), seed=3).astype(np.float64)  # the reference test's shape and spec: one compile
    xg = grouped(w, 128)
    valid = ~np.isnan(xg)
    x = np.where(valid, xg, 0)
    ga, gc = greedy_ref(x, valid, k)
    greedy_err = np.sum(np.where(valid, x - np.einsum("gsnk,gkn->gsn", signs_of(gc, k), ga), 0) ** 2)
    qt, info = quantize_weight(jnp.asarray(w, jnp.float32), spec(k, options={"iters": 15}), path="w")
    err = np.sum((np.asarray(qt.dequantize(jnp.float32), np.float64) - w) ** 2)
    assert err < 0.93 * greedy_err
    assert info["loss_greedy"] == pytest.approx(greedy_err / w.size, rel=1e-4)
    # and it beats a uniform (asymmetric int) grid of the same bits up to 3 planes
    if k <= 3:
        rtn = jq.quantize(jnp.asarray(w, jnp.float32), jq.QuantSpec(bits=k, group_size=128, symmetric=False))
        assert err < np.sum((np.asarray(rtn.dequantize(jnp.float32), np.float64) - w) ** 2)


def test_one_plane_is_sign_times_mean_abs():
    w = weights("normal", (320, 48), seed=5)
    w[::7, ::3] = 0.0  # sign(0) = +1
    qt, _ = quantize_weight(jnp.asarray(w), spec(1, options={"iters": 15}), path="w")
    binary = jq.quantize(jnp.asarray(w), jq.QuantSpec(format="binary", group_size=128))
    np.testing.assert_array_equal(np.asarray(qt.scale[0]), np.asarray(binary.scale))  # β = mean|w|, stored
    np.testing.assert_array_equal(np.asarray(qt.unpacked_codes()), (w >= 0).astype(np.uint8))
    beta = np.repeat(np.asarray(binary.scale, np.float32), 128, axis=0)[:320]
    np.testing.assert_array_equal(np.asarray(qt.dequantize()), np.where(w >= 0, beta, -beta))


def test_storage_layout_and_dequantize_formula():
    w = weights("normal", (576, 16), seed=1)
    qt, _ = quantize_weight(jnp.asarray(w, jnp.bfloat16), spec(3), path="w")
    assert qt.scale.shape == (3, 5, 16) and qt.scale.dtype == jnp.float16 and qt.zero is None
    assert qt.codes.shape == (3 * 576 // 32, 16) and qt.codes.dtype == jnp.uint32 and qt.bits == 3
    assert qt.dequantize().dtype == jnp.bfloat16 and qt.dequantize().shape == (576, 16)
    c = np.asarray(qt.unpacked_codes()).astype(np.int64)
    a = np.repeat(np.asarray(qt.scale, np.float64), 128, axis=1)[:, :576]  # (3, K, N)
    want = sum(a[i] * (((c >> i) & 1) * 2 - 1) for i in range(3))
    np.testing.assert_array_equal(np.asarray(qt.dequantize(jnp.float32)), want.astype(np.float32))
    assert qt.bits_per_weight == pytest.approx(3 + 16 * 3 * 5 / 576)
    q32, _ = quantize_weight(jnp.asarray(w), spec(3, scale_dtype="float32"), path="w")
    assert q32.scale.dtype == jnp.float32
    assert np.mean((np.asarray(q32.dequantize()) - w) ** 2) <= np.mean((np.asarray(qt.dequantize(jnp.float32))
                                                                        - np.asarray(jnp.asarray(w, jnp.bfloat16),
                                                                                     np.float32)) ** 2) * 1.05


def test_tree_checkpoint_summary_and_matmul_fallback(tmp_path):
    from pallas_kernels.dispatch import explain, qmatmul
    from pallas_kernels.layout import KernelUnsupported, kernel_weight

    rules = recipes.load_recipe("bcq_w3_g128").rules
    tree = {"layers": {"0": {"self_attn": {"q_proj": {"kernel": jnp.asarray(weights("normal", (576, 64), 1))}},
                             "mlp": {"down_proj": {"kernel": jnp.asarray(weights("t2", (1536, 32), 2))}},
                             "norm": {"scale": jnp.ones((64,))}}}}
    q = jq.quantize_tree(tree, rules)
    qp = q["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    qd = q["layers"]["0"]["mlp"]["down_proj"]["kernel"]
    assert jq.is_qtensor(qp) and jq.is_qtensor(qd) and not jq.is_qtensor(q["layers"]["0"]["norm"]["scale"])
    assert qp.method == "bcq" and qp.format == "bcq" and qp.scale.shape == (3, 5, 64)  # ragged: 576 = 4·128 + 64
    s = jq.summary(q)
    assert "bcq bcq3 g128" in s.table()
    want_bits = (3 * 576 * 64 + 16 * 3 * 5 * 64 + 3 * 1536 * 32 + 16 * 3 * 12 * 32) / (576 * 64 + 1536 * 32)
    assert s.quantized_bits_per_weight == pytest.approx(want_bits)
    assert qd.bits_per_weight == pytest.approx(3 + 16 * 3 / 128)
    jq.save(tmp_path / "ck", q)
    r = jq.restore(tmp_path / "ck")
    rp = r["layers"]["0"]["self_attn"]["q_proj"]["kernel"]
    assert rp.grid == qp.grid and rp.scale.shape == qp.scale.shape
    for a, b in ((q, r),):
        da, db = jq.dequantize_tree(a), jq.dequantize_tree(b)
        for x, y in zip(jax.tree_util.tree_leaves(da), jax.tree_util.tree_leaves(db)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # no packed kernel: refused, and the matmul falls back to dequantize
    with pytest.raises(KernelUnsupported, match="bcq"):
        kernel_weight(qd)
    assert explain(qd, "xla").startswith("dequant")
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 1536)), jnp.float32)
    np.testing.assert_allclose(np.asarray(qmatmul(x, qd, "xla")), np.asarray(x @ qd.dequantize(jnp.float32)),
                               rtol=1e-5, atol=1e-5)


def test_jit_and_no_jit_agree():
    w = jnp.asarray(weights("t2", (40, 8), seed=9))
    qt, info = quantize_weight(w, spec(2, group_size=16, options={"iters": 3}), path="w")
    with jax.disable_jit():
        qn, infon = quantize_weight(w, spec(2, group_size=16, options={"iters": 3}), path="w")
    np.testing.assert_array_equal(np.asarray(qt.codes), np.asarray(qn.codes))
    np.testing.assert_array_equal(np.asarray(qt.scale), np.asarray(qn.scale))
    assert info["iters"] == infon["iters"] and info["loss"] == pytest.approx(infon["loss"], rel=1e-6)
    # the solve is traceable inside a caller's jit, rounds included
    xg = jnp.asarray(grouped(np.asarray(w), 16), jnp.float32)
    f = jax.jit(lambda x, n: bcq.bcq_solve(x, n, k=2)[2].sum())
    assert float(f(xg, 3)) == pytest.approx(info["loss"] * w.size, rel=1e-6)
    assert float(f(xg, 0)) >= float(f(xg, 3))


def test_errors_name_the_leaf():
    path = "layers/3/mlp/up_proj/kernel"
    with pytest.raises(SpecError, match=r"1\.\.4 bit planes"):
        spec(5)
    with pytest.raises(SpecError, match="bits must be an integer in 1..8"):
        spec(0)
    with pytest.raises(SpecError, match=r"does not take format 'bcq'"):
        jq.QuantSpec(format="bcq", bits=3)  # rtn
    with pytest.raises(SpecError, match=r"does not take format 'int'"):
        jq.QuantSpec(method="bcq", format="int", bits=3)
    with pytest.raises(SpecError, match="iters must be in 0..1000"):
        spec(options={"iters": -1})
    with pytest.raises(SpecError, match="must be of type int"):
        spec(options={"iters": 2.0})
    with pytest.raises(SpecError, match=r"unknown bcq option"):
        spec(options={"rounds": 3})
    w = weights("normal", (64, 8))
    bad = w.copy()
    bad[3, 2] = np.nan
    with pytest.raises(NonFiniteError, match=f"{path}: .*1 NaN/Inf"):
        quantize_weight(jnp.asarray(bad), spec(2, group_size=32), path=path)
    bad[3, 2] = np.inf
    with pytest.raises(NonFiniteError, match=path):
        quantize_weight(jnp.asarray(bad), spec(2, group_size=32), path=path)
    with pytest.raises(ShapeError, match=f"{path}: group_size 128 is larger than axis 0"):
        quantize_weight(jnp.asarray(w), spec(2), path=path)
    with pytest.raises(DTypeError, match=path):
        quantize_weight(jnp.ones((64, 8), jnp.int32), spec(2, group_size=32), path=path)
    for scale in (1e7, 2e6):  # greedy α's overflow; only the 2-plane least-squares α's do (Σα ≈ max|w|)
        with pytest.raises(NonFiniteError, match=f"{path}: .*overflow float16.*scale_dtype='float32'"):
            quantize_weight(jnp.asarray(w * scale), spec(2, group_size=32), path=path)
    qt, _ = quantize_weight(jnp.asarray(w * 1e7), spec(2, group_size=32, scale_dtype="float32"), path=path)
    assert np.all(np.isfinite(np.asarray(qt.dequantize())))


def test_zero_and_constant_groups():
    w = np.zeros((64, 8), np.float32)
    w[:, 1] = 0.5  # one value: the later planes' α's are 0, the group is exact
    w[:32, 2] = np.where(np.arange(32) % 2, 1.0, -1.0)  # ±1: singular normal equations in every round
    qt, info = quantize_weight(jnp.asarray(w), spec(2, group_size=32), path="w")
    np.testing.assert_array_equal(np.asarray(qt.dequantize()), w)
    assert info["loss"] == 0.0
