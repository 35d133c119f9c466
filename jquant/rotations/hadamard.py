"""Hadamard matrices and the fast Walsh–Hadamard transform, plain and randomised.

Rotating a layer's input by an orthogonal ``Q`` (activations ``x -> x @ Q``, weights
``W -> Qᵀ @ W``) leaves the float model unchanged and spreads outlier channels over all
channels, which makes both easier to quantize. A normalised Hadamard matrix with random
signs is the rotation QuaRot uses (arXiv:2404.00456), and SpinQuant's starting point before
it learns one (arXiv:2405.16406); a Haar-random orthogonal matrix is the alternative for
sizes that have no Hadamard matrix.

**Orders.** A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H @ H.T = n·I``; it
exists only for ``n`` = 1, 2 or a multiple of 4. jquant builds ``n = 2^k·m`` as the Kronecker
product ``H_n = H_m ⊗ H_{2^k}`` (``np.kron(H_m, H_{2^k})``: index ``i = a·2^k + b``), with
``H_{2^k}`` Sylvester's and the base ``H_m`` (``m = 1`` or a multiple of 4) from:

- **Paley I** (R. E. A. C. Paley, "On orthogonal matrices", J. Math. Phys. 12, 1933):
  ``m = q + 1``, ``q ≡ 3 (mod 4)`` a prime power: ``H = I + [[0, 1ᵀ], [−1, Q]]`` with ``Q``
  the Jacobsthal matrix ``Q[a, b] = χ(a − b)`` (``χ`` the quadratic character of GF(q)).
- **Paley II** (same paper): ``m = 2(q + 1)``, ``q ≡ 1 (mod 4)`` a prime power:
  ``H = C ⊗ [[1, 1], [1, −1]] + I ⊗ [[1, −1], [−1, −1]]`` with ``C = [[0, 1ᵀ], [1, Q]]``.
- **Williamson** (J. Williamson, Duke Math. J. 11, 1944): ``m = 4w`` from four symmetric
  circulant ±1 matrices ``A, B, C, D`` with ``A² + B² + C² + D² = 4w·I``, tabulated for
  ``w`` = 23, 29 (M. Hall, *Combinatorial Theory*, 2nd ed., 1986), 39 (S. London, PhD
  thesis, U. Illinois Chicago, 2013) and 43 (Hall): the orders 92, 116, 156 and 172 that
  Paley's constructions miss below 188.

The first that applies, in this order, builds a base; ``n`` is split trying the largest
power of two first (so ``24 = 2·12``, ``11008 = 64·172``, ``14336 = 512·28``). Every
multiple of 4 up to 184 is reached; the first order that is not is 188 = 4·47 (see
:func:`hadamard_supported`; :func:`random_orthogonal` serves any size).

**Orientation.** Activations are row vectors (Flax: ``y = x @ W``, kernels ``(in, out)``).
:func:`hadamard_transform` computes ``x @ H.T / √n`` along an axis (``H x / √n`` for a
column vector); :func:`random_hadamard_matrix` returns ``Q = diag(s) @ H.T / √n`` with ``s``
random signs, so that ``x @ Q == hadamard_transform(x * s)``, which is what
:func:`random_hadamard_transform` computes without forming ``Q``. Along axis 0 of a kernel
the same call computes ``Qᵀ @ W``: one function folds a rotation into the weights and
applies it online to activations.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jquant.errors import DTypeError, ShapeError

# First rows of symmetric circulant Williamson matrices A, B, C, D of order w (Hall 1986; London 2013).
_WILLIAMSON = {
    23: ("++---+---+-++-+---+---+", "+-++-++--++++++--++-++-",
         "+++---++-+-++-+-++---++", "+++-+++-+------+-+++-++"),
    29: ("+++---++--+-+----+-+--++---++", "+-+---++--+-++++++-+--++---+-",
         "++++-++-+---++++++---+-++-+++", "++--+--+-+++-++++-+++-+--+--+"),
    39: ("+++--+-+-----+--++----++--+-----+-+--++", "+++--++-+---+-+--+----+--+-+---+-++--++",
         "++++---+--++----+-+--+-+----++--+---+++", "+---++-+-+-----+++-++-+++-----+-+-++---"),
    43: ("++---++++-+--+--++--------++--+--+-++++---+", "+++-+-++--+-+-++++-+----+-++++-+-+--++-+-++",
         "++-++++++----+-+--++-++-++--+-+----++++++-+", "+---++--++++-+-+++-++--++-+++-+-++++--++---"),
}


# ----------------------------------------------------------------------------- construction


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, e)`` with ``q = p^e``, p prime, or None."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    e = 0
    while q % p == 0:
        q //= p
        e += 1
    return (p, e) if q == 1 else None


@functools.lru_cache(maxsize=None)
def _quadratic_character(p: int, e: int) -> np.ndarray:
    """χ on GF(p^e), ``(q,)`` int8, element ``Σ c_t x^t`` at index ``Σ c_t p^t``: 0 at 0, +1 on squares.

    Walks the powers of ``x`` modulo the first monic ``f`` of degree ``e`` for which ``x``
    generates the multiplicative group (a primitive polynomial); the even powers are the squares.
    """
    q = p ** e
    for c in itertools.product(range(p), repeat=e):  # f = x^e + Σ c_t x^t
        if c[0] == 0:
            continue
        chi = np.zeros(q, np.int8)
        v = [1] + [0] * (e - 1)
        for k in range(q - 1):
            idx = sum(d * p ** t for t, d in enumerate(v))
            if chi[idx]:
                break  # x has order k < q - 1: f is not primitive
            chi[idx] = 1 - 2 * (k % 2)
            top, v = v[-1], [0] + v[:-1]  # multiply by x, then reduce x^e = -Σ c_t x^t
            v = [(d - top * ct) % p for d, ct in zip(v, c)]
        else:
            return chi
    raise AssertionError(f"no primitive polynomial of degree {e} over GF({p})")  # one always exists


def _jacobsthal(q: int) -> np.ndarray:
    """Jacobsthal matrix ``Q[a, b] = χ(a − b)`` of GF(q), ``(q, q)`` float64."""
    p, e = _prime_power(q)
    digits = (np.arange(q)[:, None] // p ** np.arange(e)) % p
    idx = sum(((digits[:, None, t] - digits[None, :, t]) % p) * p ** t for t in range(e))
    return _quadratic_character(p, e)[idx].astype(np.float64)


def _paley1(q: int) -> np.ndarray:
    s = np.zeros((q + 1, q + 1))
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, _jacobsthal(q)
    return s + np.eye(q + 1)


def _paley2(q: int) -> np.ndarray:
    c = np.zeros((q + 1, q + 1))
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, _jacobsthal(q)
    return np.kron(c, [[1, 1], [1, -1]]) + np.kron(np.eye(q + 1), [[1, -1], [-1, -1]])


def _williamson(w: int) -> np.ndarray:
    a, b, c, d = (_circulant(np.array([1.0 if ch == "+" else -1.0 for ch in r])) for r in _WILLIAMSON[w])
    return np.block([[a, b, c, d], [-b, a, -d, c], [-c, d, a, -b], [-d, -c, b, a]])


def _circulant(row: np.ndarray) -> np.ndarray:
    n = len(row)
    return row[(np.arange(n)[None, :] - np.arange(n)[:, None]) % n]


def _construction(m: int):
    """``(builder, argument)`` of a base Hadamard matrix of order ``m`` (a multiple of 4), or None."""
    if m % 4:
        return None
    q = m - 1
    if q % 4 == 3 and _prime_power(q):
        return _paley1, q
    q = m // 2 - 1
    if q % 4 == 1 and _prime_power(q):
        return _paley2, q
    if m // 4 in _WILLIAMSON:
        return _williamson, m // 4
    return None


@functools.lru_cache(maxsize=None)
def _base(m: int) -> np.ndarray:
    """The base Hadamard matrix of order ``m`` (``(m, m)`` float64, read-only, cached)."""
    if m == 1:
        h = np.ones((1, 1))
    else:
        build, arg = _construction(m)
        h = build(arg)
    h.setflags(write=False)
    return h


def _sylvester(p: int) -> np.ndarray:
    h = np.ones((1, 1))
    while len(h) < p:
        h = np.block([[h, h], [h, -h]])
    return h


def _order(n) -> int:
    """``n`` as a positive int, or a ShapeError naming it."""
    try:
        if isinstance(n, bool):
            raise TypeError
        n = operator.index(n)
    except TypeError:
        raise ShapeError(f"a Hadamard order must be a positive integer, got {n!r}") from None
    if n < 1:
        raise ShapeError(f"a Hadamard order must be a positive integer, got n={n}")
    return n


def _split(n: int) -> tuple[int, int] | None:
    """``(2^k, m)`` with ``n = 2^k·m`` and a base of order ``m``, largest ``2^k`` first, or None."""
    k = (n & -n).bit_length() - 1
    for j in range(k, -1, -1):
        m = n >> j
        if m == 1 or _construction(m):
            return 1 << j, m
    return None


def _factor(n) -> tuple[int, int]:
    """:func:`_split`, or a ShapeError naming ``n`` and the base orders there are."""
    n = _order(n)
    split = _split(n)
    if split is not None:
        return split
    if n > 2 and n % 4:
        raise ShapeError(f"no Hadamard matrix of order n={n} exists (only n = 1, 2 or a multiple of 4); "
                         f"use random_orthogonal(n, key) instead")
    bases = [1] + [m for m in range(12, 257, 4) if m & (m - 1) and _construction(m)]
    raise ShapeError(f"no Hadamard construction for n={n}: supported are n = 2^k·m with m in {bases} or a larger "
                     f"Paley order (q + 1, q ≡ 3 mod 4, or 2(q + 1), q ≡ 1 mod 4, q a prime power); "
                     f"use random_orthogonal(n, key) instead")


def hadamard_supported(n: int) -> bool:
    """Whether :func:`hadamard_matrix` (and the transforms) can build order ``n`` (a positive int)."""
    return _split(_order(n)) is not None


def hadamard_matrix(n: int) -> np.ndarray:
    """The Hadamard matrix ``H_n = H_m ⊗ H_{2^k}`` that :func:`hadamard_transform` applies.

    Args:
      n: the order, ``2^k·m`` with ``m`` 1 or a base order (see the module docstring).

    Returns:
      ``(n, n)`` float64 NumPy array, entries ±1, ``H @ H.T == n·I`` (unnormalised). Dense:
      ``8·n²`` bytes (2 GB at n = 16384); the transforms never form it.

    Raises:
      ShapeError: ``n`` is not a positive integer or has no construction here.
    """
    p, m = _factor(n)
    return np.kron(_base(m), _sylvester(p))


# ----------------------------------------------------------------------------- transforms


def _fwht(y):
    """Unnormalised Sylvester–Hadamard transform along the last axis (length a power of two).

    ``log2(p)`` butterfly stages, each a reshape ``(..., p/2h, 2, h)`` and a sum/difference.
    """
    p = y.shape[-1]
    lead = y.shape[:-1]
    h = 1
    while h < p:
        y = y.reshape(*lead, p // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = jnp.stack([a + b, a - b], axis=-2)
        h *= 2
    return y.reshape(*lead, p)


def _axis(x, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise ShapeError(f"axis {axis} is out of range for an array of shape {tuple(x.shape)}")
    return axis % x.ndim


def _float(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise DTypeError(f"a Hadamard transform needs a floating array, got dtype {x.dtype}")
    return x


def hadamard_transform(x, axis: int = -1, *, normalized: bool = True, transpose: bool = False):
    """The fast Walsh–Hadamard transform of ``x`` along ``axis``: ``x @ H.T / √n``.

    With ``H = hadamard_matrix(n)`` (``n = x.shape[axis] = 2^k·m``, ``H = H_m ⊗ H_{2^k}``), each
    vector along ``axis`` becomes ``H v / √n``; with ``axis=-1`` that is
    ``x @ H.T / sqrt(n)``. ``O(n·(log2(2^k) + m))`` per vector: a dense ``m × m`` product then
    ``k`` butterfly stages, no ``n × n`` matrix. Pure and jittable (``n`` is static).

    Args:
      x: floating array, any shape; ``x.shape[axis]`` a supported order.
      axis: the axis transformed.
      normalized: divide by ``√n``, so the transform is orthogonal (``‖Hx‖ = ‖x‖``).
      transpose: apply ``Hᵀ`` instead of ``H`` (``x @ H / √n``): with ``normalized`` the inverse.

    Returns:
      an array of ``x``'s shape and dtype; computed in at least float32 (bf16/f16 inputs are
      upcast once and the result rounded once).

    Raises:
      DTypeError: ``x`` is not floating. ShapeError: bad ``axis`` or unsupported ``n``.
    """
    x = _float(x)
    axis = _axis(x, axis)
    _factor(x.shape[axis])
    return _transform(x, axis, normalized, transpose)


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _transform(x, axis: int, normalized: bool, transpose: bool):
    """:func:`hadamard_transform` on checked arguments, compiled once per shape (not op by op)."""
    n = x.shape[axis]
    p, m = _split(n)
    ct = jnp.promote_types(x.dtype, jnp.float32)
    y = jnp.moveaxis(x, axis, -1).astype(ct)
    lead = y.shape[:-1]
    y = y.reshape(*lead, m, p)
    if m > 1:
        hm = _base(m)
        y = jnp.einsum("ab,...bp->...ap", jnp.asarray(hm.T if transpose else hm, ct), y,
                       precision=lax.Precision.HIGHEST)
    y = _fwht(y).reshape(*lead, n)
    if normalized:
        y = y * jnp.asarray(1 / math.sqrt(n), ct)
    return jnp.moveaxis(y.astype(x.dtype), -1, axis)


def random_signs(n: int, key, dtype=jnp.float32):
    """The random ±1 vector ``s`` (``(n,)``, ``dtype``) of the randomised Hadamard rotation for ``key``."""
    return jax.random.rademacher(key, (_order(n),), dtype)


def random_hadamard_matrix(n: int, key, dtype=jnp.float32):
    """QuaRot's random Hadamard rotation ``Q = diag(s) @ H.T / √n`` (arXiv:2404.00456).

    ``s = random_signs(n, key)``; orthogonal; ``x @ Q == random_hadamard_transform(x, key)``
    and ``Q.T @ W == random_hadamard_transform(W, key, axis=0)`` (fold into an ``(in, out)``
    kernel): signs first, then the transform, as QuaRot's code builds it (``matmul_hadU(diag(s))``);
    for column vectors the same map is ``Qᵀ = H·diag(s)/√n``.

    Returns:
      ``(n, n)`` array of ``dtype`` (computed in at least float32). Raises ShapeError as
      :func:`hadamard_matrix`.
    """
    ct = jnp.promote_types(dtype, jnp.float32)
    return hadamard_transform(jnp.diag(random_signs(n, key).astype(ct))).astype(dtype)


def random_hadamard_transform(x, key, axis: int = -1, *, transpose: bool = False):
    """``x @ Q`` along ``axis`` with ``Q = random_hadamard_matrix(n, key)``, in ``O(n log n)``.

    Computes ``hadamard_transform(x * s, axis)`` (signs ``s = random_signs(n, key)`` along
    ``axis``): a row vector ``v`` becomes ``v @ Q``; along axis 0 of a kernel ``W`` it gives
    ``Q.T @ W``. ``transpose=True`` applies ``Qᵀ`` instead (``x @ Q.T``, the inverse):
    ``hadamard_transform(x, transpose=True) * s``. Shapes, dtypes and errors as
    :func:`hadamard_transform`.
    """
    x = _float(x)
    axis = _axis(x, axis)
    n = x.shape[axis]
    s = random_signs(n, key).astype(x.dtype).reshape((n,) + (1,) * (x.ndim - axis - 1))  # ±1: exact in any dtype
    if transpose:
        return hadamard_transform(x, axis, transpose=True) * s
    return hadamard_transform(x * s, axis)


def random_orthogonal(n: int, key, dtype=jnp.float32):
    """A Haar-distributed random orthogonal matrix, ``(n, n)`` of ``dtype``, for any ``n ≥ 1``.

    QR of a standard Gaussian matrix ``G = QR`` with the columns of ``Q`` multiplied by the
    signs of ``diag(R)``, which makes the factorisation unique and ``Q`` Haar (F. Mezzadri,
    "How to generate random matrices from the classical compact groups", arXiv:math-ph/0609050);
    SpinQuant's random initialisation (arXiv:2405.16406). Computed in at least float32.
    """
    ct = jnp.promote_types(dtype, jnp.float32)
    q, r = jnp.linalg.qr(jax.random.normal(key, (_order(n),) * 2, ct))
    return (q * jnp.where(jnp.diagonal(r) < 0, -1, 1).astype(ct)).astype(dtype)
