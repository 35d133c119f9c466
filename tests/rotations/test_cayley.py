"""Cayley SGD (jquant.rotations.cayley, arXiv:2002.01113 Algorithm 2) against a float64 NumPy
transcription of the paper's formulas (a Python loop over matrices and fixed-point
iterations, iterating on Y as the paper writes it), with and without jit; orthogonality over
many steps; orthogonal Procrustes solved to its known optimum; the step-size cap."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jquant.errors import ShapeError, SpecError
from jquant.rotations import CayleySgdState, cayley_sgd, project_orthogonal


def orthogonal(shape, rng):
    """float64 Haar-random orthogonal matrices of ``shape`` ``(..., n, n)`` (QR with the signs
    of diag(R) folded in)."""
    q, r = np.linalg.qr(rng.normal(size=shape))
    return q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]


def orth_err(r):
    """max |RᵀR − I| in float64, over a stack."""
    r = np.asarray(r, np.float64)
    return float(np.abs(np.swapaxes(r, -1, -2) @ r - np.eye(r.shape[-1])).max())


def ref_step(x, g, m, lr, beta=0.9, s=2, eps=1e-8, q=0.5):
    """One step of Algorithm 2 on one float64 matrix: returns ``(Y, M, α, W)``."""
    m = beta * m - g
    w_hat = m @ x.T - 0.5 * x @ (x.T @ m @ x.T)
    w = w_hat - w_hat.T
    m = w @ x
    alpha = min(lr, 2 * q / (np.abs(w).sum(axis=0).max() + eps))
    y = x + alpha * m
    for _ in range(s):
        y = x + alpha / 2 * w @ (x + y)
    return y, m, alpha, w


def ref_stack(x, g, m, lr, **kw):
    """:func:`ref_step` over a stack ``(..., n, n)``: ``(Y, M, [α])``."""
    shape = x.shape
    outs = [ref_step(*(a.reshape(-1, *shape[-2:])[i] for a in (x, g, m)), lr, **kw)
            for i in range(int(np.prod(shape[:-2], dtype=int)))]
    return (np.stack([o[0] for o in outs]).reshape(shape), np.stack([o[1] for o in outs]).reshape(shape),
            [o[2] for o in outs])


def close(got, want, rtol=1e-5):
    """float32 against float64, relative to the scale of ``want``."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=rtol * np.abs(want).max())


def maybe_jit(f, jit):
    return jax.jit(f) if jit else f


def f32(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("lr0,capped", [(0.02, False), (50.0, True)])
def test_steps_match_reference(jit, lr0, capped):
    """Three steps on {8×8, stack (2, 8, 8)} with a schedule lr0/(1 + count): updates Y − X and
    momenta equal the float64 reference; the cap binds (or not) as the case says."""
    rng = np.random.default_rng(0)
    x = {"r1": orthogonal((8, 8), rng), "r2": orthogonal((2, 8, 8), rng)}
    m = jax.tree.map(np.zeros_like, x)
    opt = cayley_sgd(lambda c: lr0 / (1 + c), 0.9)
    params, state = f32(x), opt.init(f32(x))
    update = maybe_jit(opt.update, jit)
    for k in range(3):
        g = jax.tree.map(lambda a: rng.normal(size=a.shape), x)
        u, state = update(f32(g), state, params)
        for name in x:
            y, m[name], alphas = ref_stack(x[name], g[name], m[name], lr0 / (1 + k))
            assert all((a < lr0 / (1 + k)) == capped for a in alphas)
            close(u[name], y - x[name])
            close(state.momentum[name], m[name])
            x[name] = y
        params = optax.apply_updates(params, u)
        assert int(state.count) == k + 1
    for name in x:
        close(params[name], x[name])


@pytest.mark.parametrize("jit", [False, True])
def test_transposed_reading_same_step(jit):
    """The documented layout claim: stepping Rᵀ with gradient Gᵀ (the (out, in) reading) gives
    the transpose of stepping R with G while the cap does not bind (two steps: momentum too)."""
    rng = np.random.default_rng(5)
    x, gs = orthogonal((16, 16), rng), rng.normal(size=(2, 16, 16))
    assert ref_step(x, gs[0], np.zeros_like(x), 0.01)[2] == 0.01  # the cap does not bind
    opt = cayley_sgd(0.01)
    update = maybe_jit(opt.update, jit)
    r, rt = f32(x), f32(x.T)
    s, st = opt.init(r), opt.init(rt)
    for g in gs:
        u, s = update(f32(g), s, r)
        ut, st = update(f32(g.T), st, rt)
        r, rt = optax.apply_updates(r, u), optax.apply_updates(rt, ut)
        close(ut, np.asarray(u, np.float64).T)
    close(rt, np.asarray(r, np.float64).T)


def run_steps(opt, params, grads, jit):
    """Apply ``opt`` along a stack of gradients; returns the params after each step."""
    def body(carry, g):
        p, s = carry
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    if jit:
        return jax.jit(lambda p, gs: jax.lax.scan(body, (p, opt.init(p)), gs)[1])(params, grads)
    carry, out = (params, opt.init(params)), []
    for k in range(len(jax.tree.leaves(grads)[0])):
        carry, p = body(carry, jax.tree.map(lambda a: a[k], grads))
        out.append(p)
    return jax.tree.map(lambda *a: jnp.stack(a), *out)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_orthogonality_kept(jit, schedule):
    """200 steps of random gradients on {64×64, stack (3, 16, 16)}: max |RᵀR − I| < 1e-5 at
    every step, while R moves far from its start (steps turn R by angles θ up to about 0.03)."""
    rng = np.random.default_rng(1)
    x = {"r1": orthogonal((64, 64), rng), "r2": orthogonal((3, 16, 16), rng)}
    steps = 200
    grads = f32(jax.tree.map(lambda a: rng.normal(size=(steps, *a.shape)), x))
    lr = 1e-3 if schedule == "constant" else optax.cosine_decay_schedule(1e-3, steps)
    traj = run_steps(cayley_sgd(lr), f32(x), grads, jit)
    for name in x:
        assert max(orth_err(r) for r in traj[name]) < 1e-5
        assert np.abs(np.asarray(traj[name][-1], np.float64) - x[name]).max() > 0.1


def test_procrustes_reaches_optimum():
    """min ‖A R − B‖²_F over orthogonal R, A 128×32, B = A R*: from a random orthogonal start
    with det R₀ = det R* (a Cayley step multiplies R by a rotation, det 1, so R stays on its
    start's component of O(32)), 300 steps bring the loss below 1e-4 of its start and R
    within 1e-3 of R*, which is the closed-form solution U Vᵀ of Aᵀ B = U Σ Vᵀ."""
    rng = np.random.default_rng(2)
    a, r_star, r0 = rng.normal(size=(128, 32)), orthogonal((32, 32), rng), orthogonal((32, 32), rng)
    if np.linalg.det(r0) * np.linalg.det(r_star) < 0:
        r0[:, 0] *= -1
    b = a @ r_star
    u, _, vt = np.linalg.svd(a.T @ b)
    np.testing.assert_allclose(u @ vt, r_star, atol=1e-10)  # the closed form recovers R*
    close(project_orthogonal(jnp.asarray(a.T @ b, jnp.float32)), u @ vt)

    a32, b32 = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    loss = lambda r: jnp.sum((a32 @ r - b32) ** 2)
    opt = cayley_sgd(3e-5, 0.9)

    def body(carry, _):
        r, s = carry
        l, g = jax.value_and_grad(loss)(r)
        upd, s = opt.update(g, s, r)
        return (optax.apply_updates(r, upd), s), l

    r = jnp.asarray(r0, jnp.float32)
    (r, _), losses = jax.jit(lambda r: jax.lax.scan(body, (r, opt.init(r)), None, length=300))(r)
    assert float(loss(r)) < 1e-4 * float(losses[0])
    assert np.abs(np.asarray(r, np.float64) - u @ vt).max() < 1e-3


@pytest.mark.parametrize("jit", [False, True])
def test_huge_learning_rate_is_capped(jit):
    """lr = 1e6: α = 2q/‖W‖₁ (θ = α‖W‖₂ ≤ 1), so the update stays finite. With 2 iterations
    Y = p₂(αW) X, whose squared singular values are 1 − θ⁴/4 + θ⁶/16 ≤ 1 (the documented
    orthogonality loss, at most 3/16); with 30 iterations Y is the exact Cayley transform,
    orthogonal. Without the cap (q huge) the same step explodes."""
    rng = np.random.default_rng(3)
    x, g = orthogonal((32, 32), rng), 100 * rng.normal(size=(32, 32))
    _, _, alpha, w = ref_step(x, g, np.zeros_like(x), 1e6)
    assert alpha < 1e6
    theta = np.abs(np.linalg.eigvals(alpha * w))
    assert theta.max() <= 1
    want_sv2 = np.sort(1 - theta ** 4 / 4 + theta ** 6 / 16)
    eye = np.eye(32)
    cayley = np.linalg.solve(eye - alpha / 2 * w, (eye + alpha / 2 * w) @ x)

    def one_step(**kw):
        opt = cayley_sgd(1e6, **kw)
        u, _ = maybe_jit(opt.update, jit)(f32(g), opt.init(f32(x)), f32(x))
        assert np.all(np.isfinite(u))
        return np.asarray(optax.apply_updates(f32(x), u), np.float64)

    y2 = one_step()
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(y2.T @ y2)), want_sv2, atol=1e-5)
    assert orth_err(y2) < 3 / 16
    y30 = one_step(iterations=30)
    close(y30, cayley)
    assert orth_err(y30) < 1e-5
    assert np.abs(one_step(q=1e12) - x).max() > 1e6


@pytest.mark.parametrize("jit", [False, True])
def test_huge_learning_rate_many_steps(jit):
    """20 steps at lr = 1e6 on a stack (2, 16, 16): finite and never growing (‖R‖₂ ≤ 1) with 2
    iterations; orthogonal with 30."""
    rng = np.random.default_rng(4)
    x = f32(orthogonal((2, 16, 16), rng))
    grads = f32(rng.normal(size=(20, 2, 16, 16)))
    traj = np.asarray(run_steps(cayley_sgd(1e6), x, grads, jit), np.float64)
    assert np.all(np.isfinite(traj)) and np.linalg.norm(traj, ord=2, axis=(-2, -1)).max() < 1 + 1e-5
    traj = run_steps(cayley_sgd(1e6, iterations=30), x, grads, jit)
    assert max(orth_err(r) for r in traj) < 1e-5


@pytest.mark.parametrize("kw,name", [
    (dict(learning_rate=0.0), "learning_rate"), (dict(learning_rate=-1.0), "learning_rate"),
    (dict(learning_rate=float("nan")), "learning_rate"), (dict(learning_rate="1e-3"), "learning_rate"),
    (dict(momentum=1.0), "momentum"), (dict(momentum=-0.1), "momentum"), (dict(momentum=True), "momentum"),
    (dict(iterations=0), "iterations"), (dict(iterations=2.0), "iterations"),
    (dict(q=0.0), "q"), (dict(epsilon=-1e-8), "epsilon"),
])
def test_bad_settings(kw, name):
    kw = {"learning_rate": 1e-3, **kw}
    with pytest.raises(SpecError, match=f"{name}="):
        cayley_sgd(**kw)


@pytest.mark.parametrize("shape", [(4, 5), (3, 4, 5), (6,), ()])
def test_non_square_leaf(shape):
    params = {"ok": jnp.eye(4), "layers": {"w": jnp.zeros(shape)}}
    with pytest.raises(ShapeError, match=rf"layers/w: .*shape {re_shape(shape)}"):
        cayley_sgd(1e-3).init(params)


def re_shape(shape):
    return str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")


def test_update_needs_params_and_state_type():
    opt = cayley_sgd(1e-3)
    state = opt.init({"r": jnp.eye(4)})
    assert isinstance(state, CayleySgdState) and int(state.count) == 0
    with pytest.raises(SpecError, match="params"):
        opt.update({"r": jnp.ones((4, 4))}, state)
    with pytest.raises(ShapeError, match=r"\(3, 4\)"):
        project_orthogonal(jnp.ones((3, 4)))
