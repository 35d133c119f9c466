"""Hadamard matrices, the fast Walsh–Hadamard transform and random rotations
(jquant.rotations.hadamard) against float64 NumPy references: Sylvester's matrix from its
closed form ``(−1)^popcount(i & j)``, ``H @ H.T == n·I`` checked exactly, dense products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jquant.errors import DTypeError, ShapeError
from jquant.rotations import (hadamard_matrix, hadamard_supported, hadamard_transform, random_hadamard_matrix,
                              random_hadamard_transform, random_orthogonal, random_signs)

# n -> (2^k, m), the documented split: the largest power of two whose cofactor has a base.
SPLIT = {12: (1, 12), 20: (1, 20), 28: (1, 28), 36: (1, 36), 40: (2, 20), 52: (1, 52), 60: (1, 60),
         108: (1, 108), 140: (1, 140), 156: (1, 156), 172: (1, 172),  # the orders QuaRot tabulates
         64: (64, 1), 256: (256, 1), 576: (16, 36), 640: (32, 20), 1536: (128, 12), 2048: (2048, 1),
         4096: (4096, 1), 11008: (64, 172), 14336: (512, 28)}  # model widths
BASES = [1, 2, 4, 12, 20, 24, 28, 36, 44, 52, 60, 68, 76, 92, 100, 108, 116, 140, 156, 172, 244, 344]
DENSE_MAX = 4096  # larger orders are checked through the Kronecker structure, not an n×n matrix
BIG = [n for n in SPLIT if n > DENSE_MAX]


def sylvester(p):
    """Sylvester's Hadamard matrix of order p = 2^k in closed form, float64."""
    i = np.arange(p)
    return (-1.0) ** np.bitwise_count(i[:, None] & i[None, :])


def kron_apply(x, n):
    """float64 ``x @ H.T`` along the last axis for ``H = H_m ⊗ S_p`` without forming H."""
    p, m = SPLIT[n]
    hm = hadamard_matrix(m)
    xs = np.asarray(x, np.float64).reshape(*x.shape[:-1], m, p)
    return np.einsum("ab,cd,...bd->...ac", hm, sylvester(p), xs, optimize=True).reshape(x.shape)


def rand(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def close(got, want, rtol=1e-5):
    """float32 against float64: relative to the scale of ``want`` (entries near 0 have no relative error)."""
    want = np.asarray(want, np.float64)
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=rtol, atol=rtol * np.abs(want).max())


@pytest.mark.parametrize("n", BASES + [n for n in SPLIT if n <= 1536])
def test_matrix_is_hadamard(n):
    """Entries ±1 and H Hᵀ = n·I exactly in float64; Paley I/II (primes and prime powers), Williamson."""
    h = hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == np.float64
    assert np.all(np.abs(h) == 1)
    np.testing.assert_array_equal(h @ h.T, n * np.eye(n))


@pytest.mark.parametrize("n", [n for n in SPLIT if n <= DENSE_MAX and SPLIT[n][0] > 1])
def test_matrix_is_kronecker_of_base_and_sylvester(n):
    """H_n == H_m ⊗ S_{2^k} for the documented split (so H Hᵀ = m·I ⊗ 2^k·I = n·I)."""
    p, m = SPLIT[n]
    np.testing.assert_array_equal(hadamard_matrix(n), np.kron(hadamard_matrix(m), sylvester(p)))
    if m == 1:
        np.testing.assert_array_equal(hadamard_matrix(n), sylvester(n))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("n", list(SPLIT))
def test_transform_matches_dense_product(n, jit):
    """hadamard_transform(x) == x @ H.T / √n in float32 (rtol 1e-5), and unnormalised x @ H.T."""
    x = rand((3, n), n)
    f = jax.jit(hadamard_transform, static_argnames=("axis", "normalized")) if jit else hadamard_transform
    want = x.astype(np.float64) @ hadamard_matrix(n).T if n <= DENSE_MAX else kron_apply(x, n)
    got = f(jnp.asarray(x))
    assert got.dtype == jnp.float32 and got.shape == x.shape
    close(got, want / np.sqrt(n))
    close(f(jnp.asarray(x), normalized=False), want)


@pytest.mark.parametrize("n", BIG)
def test_big_transform_rows(n):
    """A few outputs of the big orders against rows of H written out from the base and Sylvester's formula."""
    p, m = SPLIT[n]
    x = rand((2, n), n)
    rows = np.array([0, 1, p - 1, p, n // 2 + 3, n - 1])
    hm, s = hadamard_matrix(m), sylvester(p)
    h_rows = np.stack([np.kron(hm[i // p], s[i % p]) for i in rows])
    close(np.asarray(hadamard_transform(jnp.asarray(x)))[:, rows], x.astype(np.float64) @ h_rows.T / np.sqrt(n))


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("n", [12, 40, 64, 156])
def test_transform_axis_batch_transpose(n, jit):
    """Along another axis of a batched array, and transpose=True applies Hᵀ (x @ H / √n)."""
    x = rand((2, n, 3, 2), n + 1)
    h = hadamard_matrix(n) / np.sqrt(n)
    f = jax.jit(hadamard_transform, static_argnames=("axis", "transpose")) if jit else hadamard_transform
    for axis in (1, -3):
        close(f(jnp.asarray(x), axis=axis), np.einsum("ij,ajbc->aibc", h, x))
        close(f(jnp.asarray(x), axis=axis, transpose=True), np.einsum("ji,ajbc->aibc", h, x))
    xt = np.moveaxis(x, 1, -1)
    close(f(jnp.asarray(xt)), xt.astype(np.float64) @ h.T)


@pytest.mark.parametrize("n", list(SPLIT) + [24, 92, 116])
def test_transform_is_orthogonal(n):
    """‖Hx‖/√n = ‖x‖ and the transpose transform inverts it, for every order (incl. the big ones)."""
    x = jnp.asarray(rand((3, n), 2 * n))
    y = hadamard_transform(x)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(y, np.float64), axis=-1),
                               np.linalg.norm(np.asarray(x, np.float64), axis=-1), rtol=1e-5)
    close(hadamard_transform(y, transpose=True), x)


def test_transform_dtypes():
    """bf16 in, bf16 out (computed in float32, rounded once); integer input is a DTypeError."""
    x = jnp.asarray(rand((5, 48), 3), jnp.bfloat16)
    got = hadamard_transform(x)
    assert got.dtype == jnp.bfloat16
    close(got, np.asarray(x, np.float64) @ hadamard_matrix(48).T / np.sqrt(48), rtol=2 ** -8)
    with pytest.raises(DTypeError, match="int32"):
        hadamard_transform(jnp.ones((3, 4), jnp.int32))


@pytest.mark.parametrize("n", [20, 128, 576])
def test_random_hadamard_matrix(n):
    """Q = diag(s) Hᵀ/√n (float64 reference), orthogonal to 1e-5, deterministic in the key."""
    key = jax.random.key(n)
    s = np.asarray(random_signs(n, key), np.float64)
    assert set(np.unique(s)) == {-1.0, 1.0} and abs(s.mean()) < 0.5
    q = np.asarray(random_hadamard_matrix(n, key), np.float64)
    close(q, s[:, None] * hadamard_matrix(n).T / np.sqrt(n))
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-5)
    np.testing.assert_array_equal(q, np.asarray(random_hadamard_matrix(n, jax.random.key(n)), np.float64))
    assert not np.allclose(q, np.asarray(random_hadamard_matrix(n, jax.random.key(n + 1)), np.float64))
    assert random_hadamard_matrix(n, key, jnp.bfloat16).dtype == jnp.bfloat16


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("n", [36, 256])
def test_random_transform_matches_matrix(n, jit):
    """Online and folded forms agree: x @ Q, Qᵀ @ W (axis 0), and transpose=True is x @ Qᵀ."""
    key = jax.random.key(7)
    q = np.asarray(random_hadamard_matrix(n, key), np.float64)
    f = jax.jit(random_hadamard_transform, static_argnames=("axis", "transpose")) if jit else random_hadamard_transform
    x, w = rand((3, n), 1), rand((n, 5), 2)
    close(f(jnp.asarray(x), key), x @ q)
    close(f(jnp.asarray(w), key, axis=0), q.T @ w)
    close(f(jnp.asarray(x), key, transpose=True), x @ q.T)
    xw = (x @ q) @ (q.T @ w)  # the rotation cancels through a linear layer
    close(xw, x.astype(np.float64) @ w, rtol=1e-5)


@pytest.mark.parametrize("n", [1, 5, 14, 188])
def test_random_orthogonal(n):
    """Any size (incl. ones without a Hadamard matrix): orthogonal to 1e-5, deterministic, key-dependent."""
    q = np.asarray(random_orthogonal(n, jax.random.key(0)), np.float64)
    assert q.shape == (n, n)
    np.testing.assert_allclose(q @ q.T, np.eye(n), atol=1e-5)
    np.testing.assert_array_equal(q, np.asarray(jax.jit(random_orthogonal, static_argnums=0)(n, jax.random.key(0))))
    if n > 1:
        assert not np.allclose(q, np.asarray(random_orthogonal(n, jax.random.key(1))))


def test_random_orthogonal_is_haar():
    """Moments of Haar O(3) over 4000 draws: E[Q] = 0, E[Q_ij²] = 1/3, E[tr Q] = 0, E[(tr Q)²] = 1,
    P(det Q = +1) = 1/2. QR without the sign fix fails these (E[Q_ii] ≈ ±0.5, det always +1)."""
    qs = np.asarray(jax.vmap(lambda k: random_orthogonal(3, k))(jax.random.split(jax.random.key(3), 4000)),
                    np.float64)
    se = 1 / np.sqrt(4000)
    assert np.abs(qs.mean(0)).max() < 4 * se
    np.testing.assert_allclose((qs ** 2).mean(0), 1 / 3, atol=4 * se)
    tr = np.trace(qs, axis1=1, axis2=2)
    assert abs(tr.mean()) < 4 * se and abs((tr ** 2).mean() - 1) < 0.1
    assert abs((np.linalg.det(qs) > 0).mean() - 0.5) < 4 * se


@pytest.mark.parametrize("n, msg", [(14, "n=14 exists"), (7, "n=7 exists"), (188, "n=188"), (0, "n=0"),
                                    (-4, "n=-4"), (2.5, "2.5"), ("8", "'8'"), (True, "True")])
def test_unsupported_orders_name_the_size(n, msg):
    with pytest.raises(ShapeError, match=msg):
        hadamard_matrix(n)
    with pytest.raises(ShapeError, match=msg):
        random_hadamard_matrix(n, jax.random.key(0))
    if type(n) is int and n > 0:
        assert not hadamard_supported(n)
        with pytest.raises(ShapeError, match=msg):
            hadamard_transform(jnp.ones((2, n)))


def test_unsupported_error_lists_bases_and_alternative():
    with pytest.raises(ShapeError, match=r"m in \[1, 12, 20, 24, 28, 36,.*172.*random_orthogonal"):
        hadamard_transform(jnp.ones((188 * 2,)))
    with pytest.raises(ShapeError, match="axis 2 is out of range"):
        hadamard_transform(jnp.ones((2, 4)), axis=2)
    with pytest.raises(ShapeError, match="n=0"):
        random_orthogonal(0, jax.random.key(0))


def test_supported_orders():
    """Every multiple of 4 up to 184 has a construction; 188 = 4·47 is the first that has none."""
    assert all(hadamard_supported(n) for n in [1, 2, *range(4, 188, 4), *SPLIT])
    assert not hadamard_supported(188) and not hadamard_supported(6)
