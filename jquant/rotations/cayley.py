"""Cayley SGD with momentum on the orthogonal group, as an Optax transformation.

SpinQuant (arXiv:2405.16406) learns its rotations with the Cayley SGD of Li, Fuxin and
Todorovic, "Efficient Riemannian Optimization on the Stiefel Manifold via the Cayley
Transform" (ICLR 2020, arXiv:2002.01113, Algorithm 2). One step, for a parameter ``X`` of
shape ``(n, n)`` with ``XᵀX = I`` and its Euclidean gradient ``G = ∂f/∂X``:

    M ← β M − G                          momentum (the paper's sign: M points downhill)
    Ŵ = M Xᵀ − ½ X (Xᵀ M Xᵀ)
    W = Ŵ − Ŵᵀ                           skew-symmetric, n × n
    M ← W X                              momentum projected onto the tangent space at X
    α = min(lr, 2q / (‖W‖₁ + ε))         ‖W‖₁: the largest absolute column sum
    Y⁰ = X + α M,   Yⁱ = X + (α/2) W (X + Yⁱ⁻¹),   i = 1 … s
    X ← Yˢ

``Yⁱ`` are fixed-point iterations for the Cayley transform
``Y = (I − α/2 W)⁻¹ (I + α/2 W) X``, which is orthogonal whenever ``X`` is, at the cost of a
few matrix products instead of an inverse. ``‖W‖₁`` bounds the spectral norm, so the cap on
``α`` makes the iteration a contraction with factor ≤ ``q`` (``q < 1``): it converges for any
learning rate, to the Cayley transform. The 1-norm is the one of SpinQuant's
``train_utils/optimizer.py`` (which credits the authors' ``stiefel_optimizer.py``); that code
also runs 5 iterations from the unprojected momentum and re-orthogonalises by QR at random
about once in 100 steps. This module starts from the projected momentum as Algorithm 2
writes it, with the paper's ``s = 2``, and leaves re-orthogonalising to the caller.

**Orthogonality.** ``s`` iterations give ``Y = pₛ(αW) X`` with
``pₛ(A) = I + A + A²/2 + … + A^(s+1)/2^s``, the Cayley series ``I + Σₖ Aᵏ/2^(k−1)`` cut after
``k = s + 1``. For skew ``A`` with eigenvalues ``±iθ`` the singular values of ``pₛ(A)`` are
``|pₛ(iθ)| = 1 + O(θ^(s+2)/2^(s+1))``; for the default ``s = 2``,
``|p₂(iθ)|² = 1 − θ⁴/4 + θ⁶/16``: a step that turns ``X`` by angles up to ``θ = α‖W‖₂``
shrinks its singular values by up to about ``θ⁴/8`` and never grows them (``s = 1`` grows
them by as much). That is 2·10⁻⁸ at θ = 0.02, but up to 0.1 (``|YᵀY − I|`` up to 3/16) when
the cap binds with θ near ``2q = 1``, and the losses add up over steps. Each further
iteration cuts the error by about ``θ/2``: raise ``iterations`` for large steps, or
re-orthogonalise now and then with :func:`project_orthogonal`.

**Layout.** jquant applies a rotation to row vectors, ``h → h @ R``, with ``R`` stored as
``(in, out)`` like a Flax kernel; its columns are the orthonormal frame, so ``X = R``
(the paper's column-orthonormal ``n × p``) and the update multiplies on the left,
``R ← pₛ(αW) R`` (the Cayley transform of ``αW`` as ``s → ∞``). For square ``R`` the other
reading, ``X = Rᵀ`` (PyTorch's ``(out, in)`` rows), gives the same ``Y`` in exact arithmetic
as long as the cap does not bind; the cap differs, being the 1-norm of ``Rᵀ W R`` instead of
``W``. Leaves may be stacks ``(..., n, n)`` (one R2 per layer): each matrix gets its own
``W`` and ``α``.

**Optax.** ``update(grads, state, params)`` needs ``params`` and returns ``u = Y − X``, so that
``optax.apply_updates(params, u) == Y`` up to one rounding; ``u`` is computed directly,
``u⁰ = α W X``, ``uⁱ = α W X + (α/2) W uⁱ⁻¹`` (the same iterates, ``Yⁱ = X + uⁱ``), without
the cancellation of subtracting ``X`` from ``Y``. Everything runs in the parameters' dtype.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from jquant.errors import ShapeError, SpecError, at, short
from jquant.spec import path_str


class CayleySgdState(NamedTuple):
    """State of :func:`cayley_sgd`: the step count (evaluates a learning-rate schedule) and
    the projected momentum ``M = W X``, one array per parameter leaf, of its shape."""

    count: jax.Array
    momentum: Any


def _number(value, name: str, valid: str, ok) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
        raise SpecError(f"cayley_sgd {name}={short(value)}: must be {valid}")


def _check_settings(learning_rate, momentum, iterations, epsilon, q) -> None:
    if not callable(learning_rate):
        _number(learning_rate, "learning_rate", "a number > 0 or an optax schedule", lambda v: v > 0)
    _number(momentum, "momentum", "a number with 0 <= momentum < 1", lambda v: 0 <= v < 1)
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise SpecError(f"cayley_sgd iterations={short(iterations)}: must be an integer >= 1")
    _number(epsilon, "epsilon", "a finite number >= 0", lambda v: 0 <= v < math.inf)
    _number(q, "q", "a number > 0 (q < 1 makes the Cayley iteration a contraction)", lambda v: v > 0)


def _check_square(params) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        shape = tuple(jnp.shape(leaf))
        if len(shape) < 2 or shape[-1] != shape[-2]:
            raise ShapeError(at(path_str(path), f"cayley_sgd needs square matrices (n, n) or stacks "
                                                f"(..., n, n) of them, got shape {shape}"))


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _step(x, g, m, lr, beta: float, iterations: int, epsilon: float, q: float):
    """One Cayley SGD step on ``x`` ``(..., n, n)``: returns ``(u, W X)``, ``u = Y − X``."""
    m = beta * m - g
    mx = m @ _mT(x)
    w_hat = mx - 0.5 * (x @ (_mT(x) @ mx))
    w = w_hat - _mT(w_hat)
    wx = w @ x
    norm = jnp.max(jnp.sum(jnp.abs(w), axis=-2), axis=-1)[..., None, None]
    alpha = jnp.minimum(lr, 2 * q / (norm + epsilon)).astype(x.dtype)
    u0 = alpha * wx
    u = lax.fori_loop(0, iterations, _iterate, (u0, u0, w, 0.5 * alpha))[0]
    return u, wx


def _iterate(_, carry):
    """``uⁱ = α W X + (α/2) W uⁱ⁻¹`` (a module-level body: eager calls reuse its trace)."""
    u, u0, w, half_alpha = carry
    return u0 + half_alpha * (w @ u), u0, w, half_alpha


def cayley_sgd(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.9, *, iterations: int = 2,
               epsilon: float = 1e-8, q: float = 0.5) -> optax.GradientTransformation:
    """Cayley SGD with momentum (arXiv:2002.01113, Algorithm 2), SpinQuant's rotation optimizer
    (arXiv:2405.16406): keeps square orthogonal parameters orthogonal (see the module doc for
    the math, the layout ``h → h @ R`` with ``X = R``, and how orthogonal a step stays).

    Args:
      learning_rate: ``lr > 0`` or an optax schedule ``count -> lr``; the step is
        ``α = min(lr, 2q / (‖W‖₁ + ε))`` per matrix.
      momentum: ``β`` in ``M ← β M − G``, ``0 <= β < 1``.
      iterations: fixed-point iterations ``s ≥ 1`` of the Cayley transform (the paper's 2).
      epsilon: ``ε ≥ 0`` in the cap's denominator.
      q: the cap's factor ``q > 0`` (the paper's 0.5; ``q < 1`` for a contraction).

    Returns:
      An ``optax.GradientTransformation`` over a pytree of ``(..., n, n)`` float leaves, each
      matrix orthogonal; ``update(grads, state, params)`` requires ``params`` and returns
      ``Y − X``, to apply with ``optax.apply_updates``.

    Raises:
      SpecError: a setting out of range (or ``update`` called without ``params``).
      ShapeError: (from ``init``) a leaf whose last two axes are not square, naming its path.
    """
    _check_settings(learning_rate, momentum, iterations, epsilon, q)
    schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
    beta, epsilon, q = float(momentum), float(epsilon), float(q)

    def init_fn(params):
        _check_square(params)
        return CayleySgdState(count=jnp.zeros([], jnp.int32), momentum=jax.tree.map(jnp.zeros_like, params))

    def update_fn(updates, state, params=None):
        if params is None:
            raise SpecError("cayley_sgd needs the parameters: call update(grads, state, params)")
        lr = schedule(state.count)
        xs, treedef = jax.tree.flatten(params)
        steps = [_step(x, g, m, lr, beta, iterations, epsilon, q) for x, g, m in
                 zip(xs, treedef.flatten_up_to(updates), treedef.flatten_up_to(state.momentum))]
        u, m = (treedef.unflatten(t) for t in zip(*steps)) if steps else (updates, state.momentum)
        return u, CayleySgdState(count=optax.safe_increment(state.count), momentum=m)

    return optax.GradientTransformation(init_fn, update_fn)


def project_orthogonal(x):
    """The orthogonal matrix nearest ``x`` in Frobenius norm, ``U Vᵀ`` from the SVD
    ``x = U Σ Vᵀ`` (the polar factor; also the orthogonal Procrustes solution
    ``argmax_R tr(Rᵀ x)``, Schönemann, Psychometrika 31, 1966), for ``x`` ``(..., n, n)``.

    Re-orthogonalises a rotation that rounding or few Cayley iterations left slightly off.

    Raises:
      ShapeError: ``x`` not square in its last two axes.
    """
    x = jnp.asarray(x)
    if x.ndim < 2 or x.shape[-1] != x.shape[-2]:
        raise ShapeError(f"project_orthogonal needs (..., n, n), got shape {x.shape}")
    u, _, vt = jnp.linalg.svd(x, full_matrices=False)
    return u @ vt
