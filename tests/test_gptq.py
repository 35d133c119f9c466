"""GPTQ (jquant.gptq, arXiv:2210.17323) against the float64 NumPy reference in
tests/gptq_reference.py, written from the paper and the reference ``fasterquant``.

Kernels are in Flax layout ``(in, out)``; the Hessian is ``(in, in)``. Shapes are few and
small (K ≤ 200, N ≤ 64) because every new shape/spec recompiles the solve.

Tolerances. The solve runs in float32 and the reference in float64. A weight lying within
a float32 ulp of a rounding boundary may get a different code, and that code's error is
fed forward, so a few later roundings may flip too. We therefore require ≥ 99% of the
dequantized entries to be equal (in practice all are), the reconstruction error
``tr(ΔWᵀ H ΔW)`` and GPTQ's own loss within 1% of the reference's. A real algorithmic
difference (wrong permutation, group parameters from the wrong weights, a missing
update, a column left unquantized) changes far more than 1% of the entries or the error
by far more than 1% (the ragged-block bug below: 4% of entries, error ×2.5).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantSpec
from jquant.errors import NonFiniteError, ShapeError, SpecError
from jquant.quantizers import gptq
from jquant.quantizers.gptq import gptq_quantize
from jquant.quantizers.stats import Hessian, hessian_update

from gptq_reference import gptq_reference, jquant_block, output_error, qparams

MIN_EQUAL = 0.99  # fraction of dequantized entries equal to the reference's (see module docstring)
ERR_RTOL = 0.01  # relative tolerance on the reconstruction error and on GPTQ's loss


# ---------------------------------------------------------------------------------------
# Problems
# ---------------------------------------------------------------------------------------
@functools.cache
def correlated(K, N, seed=0, scale_spread=0.5):
    """Calibration inputs X ``(4K, K)`` with correlated features and per-feature scales
    ``exp(scale_spread·N(0,1))``, a kernel ``(K, N)`` and ``H = 2XᵀX/n`` (float32)."""
    rng = np.random.default_rng(seed)
    n = 4 * K
    mix = np.eye(K) + rng.normal(size=(K, K)) / np.sqrt(K)
    X = (rng.normal(size=(n, K)) @ mix * np.exp(scale_spread * rng.normal(size=K))).astype(np.float32)
    H = (2.0 * X.astype(np.float64).T @ X / n).astype(np.float32)
    w = rng.normal(size=(K, N)).astype(np.float32)
    return X, H, w


@functools.cache
def ill_conditioned(K, N, seed=1, n_dead=5):
    """H with eigenvalues log-spaced over 1e-6..1 and ``n_dead`` exactly dead inputs
    (zero row and column); a kernel ``(K, N)``. Returns ``(None, H, w, dead)``."""
    rng = np.random.default_rng(seed)
    Qm, _ = np.linalg.qr(rng.normal(size=(K, K)))
    H = (Qm * np.logspace(-6, 0, K)) @ Qm.T
    dead = np.sort(rng.choice(K, n_dead, replace=False))
    H[dead, :] = 0.0
    H[:, dead] = 0.0
    w = rng.normal(size=(K, N)).astype(np.float32)
    return None, H.astype(np.float32), w, dead


def problem(name):
    if name == "well":
        return (*correlated(128, 64), np.array([], int))
    if name == "ragged":
        return (*correlated(200, 64, seed=2), np.array([], int))
    if name == "ill":
        return ill_conditioned(128, 64)
    raise KeyError(name)


def gptq_spec(bits=4, symmetric=False, group_size=None, **options):
    gran = "channel" if group_size is None else "group"
    return QuantSpec(bits=bits, symmetric=symmetric, granularity=gran, group_size=group_size or 128,
                     method="gptq", options=options)


# name: (problem, bits, symmetric, group_size (None = per-channel), block_size, act_order, static_groups)
CASES = {
    "well-g32-asym-block64": ("well", 4, False, 32, 64, False, False),
    "well-g32-asym-block64-actorder": ("well", 4, False, 32, 64, True, False),
    "well-g64-sym-block16-actorder": ("well", 4, True, 64, 16, True, False),  # group > block_size
    "well-channel-asym-block32-actorder": ("well", 4, False, None, 32, True, False),
    "well-g64-sym-static-actorder": ("well", 4, True, 64, 128, True, True),
    "ragged200-g64-asym-actorder": ("ragged", 4, False, 64, 128, True, False),
    "ragged200-g64-sym3-block32": ("ragged", 3, True, 64, 32, False, False),
    "ill-g32-asym-block64-actorder": ("ill", 4, False, 32, 64, True, False),
    "ill-channel-sym-block32": ("ill", 4, True, None, 32, False, False),
    "ill-g64-asym-static": ("ill", 4, False, 64, 128, False, True),
}


@functools.cache
def solve(prob, bits, symmetric, group_size, block_size, act_order, static_groups):
    """jquant's result and the reference's on one case (cached: several tests read them)."""
    X, H, w, dead = problem(prob)
    spec = gptq_spec(bits, symmetric, group_size, block_size=block_size, act_order=act_order,
                     static_groups=static_groups)
    qt, info = gptq_quantize(w, H, spec, path="layers/0/mlp/kernel")
    K = w.shape[0]
    static = group_size is None or static_groups
    ref = gptq_reference(w, H, bits=bits, symmetric=symmetric, group_size=group_size,
                         block_size=jquant_block(K, group_size or K, block_size, static),
                         act_order=act_order, static_groups=static_groups)
    return spec, qt, info, ref


def deq64(qt):
    return np.asarray(qt.dequantize(jnp.float32), np.float64)


def equal_fraction(a, b):
    # Equal dequantized values: the same code on the same (float16) scale gives the same
    # number in float32 and float64, up to the float32 product's rounding.
    return float(np.mean(np.isclose(a, b, rtol=1e-6, atol=0.0)))


def assert_matches_reference(qt, info, ref, H):
    deq = deq64(qt)
    frac = equal_fraction(deq, ref.deq)
    assert frac >= MIN_EQUAL, f"only {frac:.4f} of the dequantized entries match the reference"
    err, err_ref = output_error(ref.W, deq, H), output_error(ref.W, ref.deq, H)
    assert err == pytest.approx(err_ref, rel=ERR_RTOL)
    assert info.loss == pytest.approx(ref.loss, rel=ERR_RTOL)
    scale_frac = np.mean(np.asarray(qt.scale, np.float64) == ref.scale)
    assert scale_frac >= MIN_EQUAL
    return frac, err / err_ref


# ---------------------------------------------------------------------------------------
# 1. Against the float64 reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case):
    prob = CASES[case][0]
    _, H, w, dead = problem(prob)
    spec, qt, info, ref = solve(*CASES[case])
    assert qt.shape == w.shape and qt.method == "gptq"
    assert info.tries == 1 and info.damp == pytest.approx(0.01, rel=1e-6)
    assert_matches_reference(qt, info, ref, H)
    # Dead inputs carry no signal: their weights are zeroed, so they dequantize to 0 exactly.
    if len(dead):
        np.testing.assert_array_equal(deq64(qt)[dead], 0.0)


def test_reference_is_block_size_invariant():
    # Sanity check of the reference itself: in exact arithmetic lazy batch updates change
    # nothing, and the reference computes each group's parameters from fully updated
    # weights, so its result must not depend on the block size (up to float64 rounding).
    _, H, w, _ = problem("well")
    a = gptq_reference(w, H, group_size=32, block_size=128, act_order=True)
    b = gptq_reference(w, H, group_size=32, block_size=1, act_order=True)
    c = gptq_reference(w, H, group_size=32, block_size=48, act_order=True)  # groups straddle blocks
    np.testing.assert_allclose(a.deq, b.deq, rtol=1e-9, atol=0)
    np.testing.assert_allclose(a.deq, c.deq, rtol=1e-9, atol=0)


# Regression: K < block with a group size that does not divide K once left the last K % gs rows unquantized.
@pytest.mark.parametrize("K,group_size,block_size", [(100, 32, 128), (200, 64, 256)], ids=["K100-g32-default", "K200-g64-block256"])
def test_ragged_when_block_exceeds_K(K, group_size, block_size):
    X, H, w = correlated(K, 32, seed=3)
    spec = gptq_spec(4, False, group_size, block_size=block_size, act_order=True)
    qt, info = gptq_quantize(w, H, spec)
    ref = gptq_reference(w, H, group_size=group_size, block_size=jquant_block(K, group_size, block_size, False),
                         act_order=True)
    assert_matches_reference(qt, info, ref, H)


# ---------------------------------------------------------------------------------------
# 2. Act-order and static-groups semantics
# ---------------------------------------------------------------------------------------
def test_act_order_dynamic_groups_g_idx():
    _, H, w, _ = problem("well")
    spec, qt, info, ref = solve(*CASES["well-g32-asym-block64-actorder"])
    K, gs = w.shape[0], 32
    assert qt.g_idx is not None
    g_idx = np.asarray(qt.g_idx)
    # By hand: inputs in processing order (descending diag H, stable), groups of 32 along it.
    perm = np.argsort(-np.diag(H).astype(np.float64), kind="stable")
    expected = np.empty(K, int)
    expected[perm] = np.arange(K) // gs
    np.testing.assert_array_equal(g_idx, expected)
    assert np.any(np.diff(g_idx) < 0), "the permutation should scatter the groups (not a meaningful test otherwise)"
    np.testing.assert_array_equal(np.bincount(g_idx), np.full(K // gs, gs))
    # dequantize() decodes every input row with its own group's scale/zero.
    codes = np.asarray(qt.unpacked_codes(), np.float64)
    scale = np.asarray(qt.scale, np.float64)
    zero = np.asarray(qt.zero, np.float64)
    by_hand = (codes - zero[g_idx]) * scale[g_idx]
    np.testing.assert_allclose(deq64(qt), by_hand, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(codes, ref.codes)


def test_static_groups_use_original_contiguous_groups():
    _, H, w, _ = problem("well")
    spec, qt, info, ref = solve(*CASES["well-g64-sym-static-actorder"])
    assert qt.g_idx is None
    K, N = w.shape
    scale = np.asarray(qt.scale, np.float64)
    assert scale.shape == (K // 64, N)
    # Each group's scale is the RTN scale of the *original* weights of its contiguous group.
    for g in range(K // 64):
        s, _ = qparams(w[g * 64:(g + 1) * 64].T, 4, True)
        np.testing.assert_array_equal(scale[g], s)
    rtn = jquant.quantize(w, dataclasses.replace(spec, method="rtn", options=()))
    np.testing.assert_array_equal(scale, np.asarray(rtn.scale, np.float64))
    # ...and decoding follows the contiguous groups, although the solve ran in act-order.
    codes = np.asarray(qt.unpacked_codes(), np.float64)
    by_hand = (codes - 8) * np.repeat(scale, 64, axis=0)
    np.testing.assert_allclose(deq64(qt), by_hand, rtol=1e-6, atol=0)


def test_static_groups_differ_from_dynamic():
    # Dynamic groups see the updated weights, so their scales differ from the static ones
    # (otherwise the static-groups tests above would not distinguish the two).
    _, _, w, _ = problem("ill")
    _, qt_static, _, _ = solve(*CASES["ill-g64-asym-static"])
    dyn = gptq_reference(w, problem("ill")[1], group_size=64, act_order=False)
    assert np.mean(np.asarray(qt_static.scale, np.float64) != dyn.scale) > 0.1


# ---------------------------------------------------------------------------------------
# 3. GPTQ beats RTN
# ---------------------------------------------------------------------------------------
def output_sq_error(X, H, w, deq):
    """‖X(W−Q)‖² when X is known; tr(ΔWᵀHΔW) (= 2‖XΔW‖²/n) otherwise."""
    d = np.asarray(w, np.float64) - deq
    if X is None:
        return output_error(w, deq, H)
    return float(np.sum((X.astype(np.float64) @ d) ** 2))


@pytest.mark.parametrize("case", list(CASES))
def test_gptq_beats_rtn(case):
    X, H, w, _ = problem(CASES[case][0])
    spec, qt, _, _ = solve(*CASES[case])
    rtn = jquant.quantize(w, dataclasses.replace(spec, method="rtn", options=()))
    e_gptq = output_sq_error(X, H, w, deq64(qt))
    e_rtn = output_sq_error(X, H, w, deq64(rtn))
    assert e_gptq < e_rtn, (e_gptq, e_rtn)


def test_act_order_helps_with_varying_input_scales():
    # Input scales spread over ~e^±4: act-order quantizes the inputs that matter most first,
    # while the most columns remain to absorb their error.
    X, H, w = correlated(128, 64, seed=4, scale_spread=2.0)
    errs = {}
    for ao in (False, True):  # same spec as two CASES entries: no extra compilation
        qt, _ = gptq_quantize(w, H, gptq_spec(4, False, 32, block_size=64, act_order=ao, static_groups=False))
        errs[ao] = output_sq_error(X, H, w, deq64(qt))
    assert errs[True] <= errs[False], errs


# ---------------------------------------------------------------------------------------
# 4. Hessian accumulation
# ---------------------------------------------------------------------------------------
def test_hessian_update_matches_float64():
    rng = np.random.default_rng(5)
    K, n = 64, 1000
    X = (rng.normal(size=(n, K)) + 0.5).astype(np.float32)  # nonzero mean: no small off-diagonals
    H64 = 2.0 * X.astype(np.float64).T @ X / n

    def accumulate(splits, as_3d=False):
        h = Hessian.zeros(K)
        for part in np.split(X, splits):
            if as_3d and len(part) % 2 == 0:
                part = part.reshape(2, -1, K)  # (..., in) batches are flattened
            h = hessian_update(h, jnp.asarray(part))
        return h

    a = accumulate([7, 300, 301, 640])
    b = accumulate([500], as_3d=True)
    c = accumulate(list(range(100, n, 100)))
    for h in (a, b, c):
        assert float(h.n) == n
        assert h.H.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(h.H, np.float64), H64, rtol=1e-5)
    # Insensitive to how the rows are split into batches.
    np.testing.assert_allclose(np.asarray(a.H), np.asarray(b.H), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(a.H), np.asarray(c.H), rtol=2e-6)


# ---------------------------------------------------------------------------------------
# 5. Damping escalation
# ---------------------------------------------------------------------------------------
def small_problem(seed=6, K=64, N=16):
    rng = np.random.default_rng(seed)
    return rng, rng.normal(size=(K, N)).astype(np.float32)


def test_damping_escalates_on_non_pd_hessian():
    rng, w = small_problem()
    K = w.shape[0]
    Qm, _ = np.linalg.qr(rng.normal(size=(K, K)))
    eig = rng.uniform(0.5, 1.5, K)
    eig[0] = -0.05 * eig.mean()  # |λ_min| = 5·(0.01·mean diag): damp 0.01 fails, 0.1 works
    H = ((Qm * eig) @ Qm.T).astype(np.float32)
    spec = gptq_spec(4, False, 32, block_size=32, act_order=True)
    with pytest.warns(UserWarning, match="layers/3/attn/kernel.*escalated"):
        qt, info = gptq_quantize(w, H, spec, path="layers/3/attn/kernel")
    assert info.tries == 2
    assert info.damp == pytest.approx(0.1, rel=1e-5)
    deq = deq64(qt)
    assert np.all(np.isfinite(deq)) and np.all(np.isfinite(np.asarray(qt.scale, np.float64)))
    ref = gptq_reference(w, H, group_size=32, block_size=32, act_order=True, damp=0.1)
    assert equal_fraction(deq, ref.deq) >= MIN_EQUAL


@pytest.mark.parametrize("kind", ["indefinite", "negative-definite"])
def test_damping_gives_up_with_nonfinite_error(kind):
    _, w = small_problem()
    K = w.shape[0]
    if kind == "indefinite":  # positive diagonal, eigenvalues 4 and -2: λ ≤ 0.1 cannot fix it
        H = np.kron(np.eye(K // 2), np.array([[1.0, 3.0], [3.0, 1.0]]))
    else:
        H = -np.eye(K) - 0.1
    spec = gptq_spec(4, False, 32, block_size=32, act_order=True, max_damp_tries=2)
    with pytest.raises(NonFiniteError, match="layers/7/mlp/down/kernel.*positive definite"):
        gptq_quantize(w, H.astype(np.float32), spec, path="layers/7/mlp/down/kernel")


# ---------------------------------------------------------------------------------------
# 6. Bad input
# ---------------------------------------------------------------------------------------
def test_bad_input():
    rng, w = small_problem()
    K = w.shape[0]
    H = np.eye(K, dtype=np.float32)
    spec = gptq_spec(4, False, 32)
    p = "layers/1/q/kernel"
    Hn = H.copy()
    Hn[3, 5] = np.nan
    with pytest.raises(NonFiniteError, match=p):
        gptq_quantize(w, Hn, spec, path=p)
    wn = w.copy()
    wn[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match=p):
        gptq_quantize(wn, H, spec, path=p)
    with pytest.raises(ShapeError, match=p):
        gptq_quantize(w, np.eye(K + 1, dtype=np.float32), spec, path=p)
    with pytest.raises(ShapeError, match=p):
        gptq_quantize(w[None], H, spec, path=p)
    with pytest.raises(ShapeError, match=p):
        gptq_quantize(w, H, gptq_spec(4, False, 2 * K), path=p)
    with pytest.raises(SpecError, match="blocksize"):
        gptq_quantize(w, H, gptq_spec(4, False, 32, blocksize=64), path=p)
    for bad in ({"damp": 0.0}, {"block_size": 0}, {"max_damp_tries": 0}):
        with pytest.raises(SpecError):
            gptq_quantize(w, H, gptq_spec(4, False, 32, **bad), path=p)
    with pytest.raises(SpecError, match="method 'gptq' does not take format 'binary'"):
        QuantSpec(format="binary", method="gptq")  # refused when the spec is built, before any work
    with pytest.raises(SpecError, match=r"damp='0.1' must be of type float, got str"):
        gptq_spec(4, False, 32, damp="0.1")
    with pytest.raises(SpecError, match=r"act_order=1 must be of type bool"):
        gptq_spec(4, False, 32, act_order=1)


# ---------------------------------------------------------------------------------------
# 7. jit and op by op
# ---------------------------------------------------------------------------------------
def test_jit_and_no_jit_agree():
    rng, w = small_problem(seed=7)
    K = w.shape[0]
    X = (rng.normal(size=(4 * K, K)) @ (np.eye(K) + rng.normal(size=(K, K)) / 8)).astype(np.float32)
    H = (2.0 * X.astype(np.float64).T @ X / len(X)).astype(np.float32)
    spec = gptq_spec(4, False, 32, block_size=32, act_order=True)
    a, ia = gptq_quantize(w, H, spec)
    with jax.disable_jit():
        b, ib = gptq_quantize(w, H, spec)
        h = hessian_update(Hessian.zeros(K), jnp.asarray(X))
    # Zero-mean X: some off-diagonals are ~1e-4 of the diagonal, hence the absolute part.
    np.testing.assert_allclose(np.asarray(h.H, np.float64), H, rtol=1e-5, atol=1e-6 * np.abs(H).max())
    ref = gptq_reference(w, H, group_size=32, block_size=32, act_order=True)
    for qt in (a, b):
        assert equal_fraction(deq64(qt), ref.deq) >= MIN_EQUAL
    np.testing.assert_array_equal(np.asarray(a.g_idx), np.asarray(b.g_idx))
    assert equal_fraction(deq64(a), deq64(b)) >= MIN_EQUAL
    assert ia.loss == pytest.approx(ib.loss, rel=1e-4)


# ---------------------------------------------------------------------------------------
# 8. The factor the solve runs on: A = P·L·P upper with A·Aᵀ = H̃ + λI, and A⁻¹ = GPTQ's U
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,Kp,act_order", [(37, 37, False), (37, 48, True), (203, 256, True)])
def test_factor_matches_numpy(n, Kp, act_order):
    from jquant.quantizers.gptq import _factor, _order

    rng = np.random.default_rng(n)
    X = rng.normal(size=(2 * n, n)) * np.exp(rng.normal(size=n))
    X[:, [3, 11]] = 0.0  # two dead inputs
    H = (X.T @ X / len(X)).astype(np.float32)
    damp = 0.05
    perm, dead = _order(jnp.asarray(H), act_order)
    L, lam, failed = _factor(jnp.asarray(H), perm, dead, jnp.float32(damp), Kp)
    perm, dead = np.asarray(perm), np.asarray(dead)
    np.testing.assert_array_equal(np.flatnonzero(dead), [3, 11])
    if act_order:
        assert np.all(np.diff(np.where(dead, 1.0, np.diag(H))[perm]) <= 0)
    # H̃: processing order, dead inputs given H_jj = 1, padded with a unit diagonal, damped.
    Ht = np.eye(Kp)
    Ht[:n, :n] = H.astype(np.float64)[np.ix_(perm, perm)]
    Ht[np.flatnonzero(dead[perm]), np.flatnonzero(dead[perm])] = 1.0
    lam_ref = damp * np.mean(np.diag(Ht)[:n])
    Ht += lam_ref * np.eye(Kp)
    assert not bool(failed) and float(lam) == pytest.approx(lam_ref, rel=1e-6)
    A = np.asarray(L, np.float64)[::-1, ::-1]
    assert np.all(np.tril(A, -1) == 0) and np.all(np.diag(A) > 0)
    np.testing.assert_allclose(A @ A.T, Ht, atol=1e-5 * np.abs(Ht).max())
    U = np.linalg.cholesky(np.linalg.inv(Ht)).T  # GPTQ's factor
    np.testing.assert_allclose(np.linalg.inv(A), U, atol=1e-4 * np.abs(U).max())


def test_factor_failure_is_flagged():
    from jquant.quantizers.gptq import _factor, _order

    H = -jnp.eye(8)
    perm, dead = _order(H, False)
    assert bool(_factor(H, perm, dead, jnp.float32(0.01), 8)[2])


def test_blocked_cholesky_of_wide_hessians(monkeypatch):
    """Wider than one LAPACK call (a 70B down_proj's 28672; here thresholds scaled down):
    the blocked factor equals float64 NumPy's, and a matrix that is not positive definite
    gives NaN on the diagonal (what GPTQ's damping escalation checks)."""
    monkeypatch.setattr(gptq, "_CHOL_WHOLE", 64)
    monkeypatch.setattr(gptq, "_CHOL_BLOCK", 24)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 100))
    A = x.T @ x / 300 + 0.01 * np.eye(100)
    L = np.asarray(jax.jit(gptq.cholesky)(jnp.asarray(A, jnp.float32)), np.float64)
    np.testing.assert_allclose(L, np.linalg.cholesky(A), atol=2e-6)
    assert np.all(np.triu(L, 1) == 0)
    A[70, 70] = -5.0
    assert np.isnan(np.diag(np.asarray(jax.jit(gptq.cholesky)(jnp.asarray(A, jnp.float32))))).any()
