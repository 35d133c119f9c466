"""GPTQ: quantize a linear layer column by column, feeding each column's error forward
through the inverse Hessian of its inputs (Frantar et al., arXiv:2210.17323).

For a kernel ``W`` (Flax layout ``(in, out)``; the solve works on ``Wᵀ``, rows = outputs)
and the Hessian ``H = 2·XᵀX/n`` of its inputs ``X`` (``n`` rows of ``in`` features):

1. dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W_j = 0``;
2. optionally **act-order**: process inputs by descending ``H_jj``;
3. damping ``λ = damp·mean(diag H)``; if the Cholesky factorisation fails, ``λ`` is
   multiplied by 10 and it is tried again (``max_damp_tries`` times in all);
4. GPTQ's ``U`` is the upper Cholesky factor of ``(H + λI)⁻¹``; the solve never forms it. It
   factorises ``H + λI = A·Aᵀ`` (``A`` upper, one Cholesky of the reversed matrix) and uses
   ``U = A⁻¹``: with ``E_j = (w̃_j − q_j)/U_jj`` GPTQ's error feedback
   ``w̃_j = w_j − Σ_{i<j} U_ij·E_i`` is ``w̃_j = w_j + Σ_{i<j} (A_ij/A_jj)·(w_i − q_i)``
   (from ``W − Q = UᵀE``), with ``w`` the original weights. No inverse (⅔K³ flops saved);
5. in blocks of ``block_size`` columns (lazy batch updates), for each column ``j``:
   ``q = Q(w̃_j)``, ``w̃_{k>j} += (A_jk/A_kk)·(w_j − q_j)``; after the block the columns to
   its right get the block's accumulated update in one matmul.

Group scales/zeros are computed when a group starts, from the already-updated weights;
with **static groups** they are computed up front from the original weights of the
contiguous groups (so act-order needs no ``g_idx`` gather at inference); per-channel and
per-tensor parameters are always computed up front. With act-order and dynamic groups
the groups follow the processing order and ``g_idx[i]`` names the group of input ``i``.

Output rows (columns of the Flax kernel) are independent: the solve takes any number
of them, so it can be split across devices.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jquant import formats
from jquant.errors import DataError, NonFiniteError, ShapeError, SpecError, at
from jquant.qtensor import GroupLayout, QTensor
from jquant.quantizers.registry import Method, options_of, register
from jquant.quantizers.rtn import check_weight, find_range, layout_for, pack_qtensor
from jquant.quantizers.stats import Hessian, hessian_update  # noqa: F401  (GPTQ's statistic)
from jquant.spec import QuantSpec

_HP = lax.Precision.HIGHEST  # float32 products throughout the solve
_SEGMENT = 32  # columns per rank-1 segment of the in-block loop


@dataclasses.dataclass(frozen=True)
class GPTQOptions:
    """GPTQ options, read from ``QuantSpec.options`` (all optional).

    ``damp``: λ = damp·mean(diag H); ``block_size``: columns per lazy batch update;
    ``act_order``: process inputs by descending ``diag H`` (with ``g_idx``); ``static_groups``:
    group parameters from the original weights up front (act-order without ``g_idx``);
    ``max_damp_tries``: factorisation attempts, λ ×10 each time.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    static_groups: bool = False
    max_damp_tries: int = 6

    def validate(self) -> None:
        if not self.damp > 0:
            raise SpecError(f"GPTQ damp must be > 0, got {self.damp}")
        if self.block_size < 1:
            raise SpecError(f"GPTQ block_size must be >= 1, got {self.block_size}")
        if self.max_damp_tries < 1:
            raise SpecError(f"GPTQ max_damp_tries must be >= 1, got {self.max_damp_tries}")



# ---------------------------------------------------------------------------------------
# The solve
# ---------------------------------------------------------------------------------------
class GPTQInfo(NamedTuple):
    loss: float  # Σ (w − q)²/U_jj² / 2 over the layer: GPTQ's own error estimate
    damp: float  # the damping λ used, relative to mean(diag H)
    tries: int  # Cholesky attempts (1 = no escalation)


def _order(H, act_order: bool):
    """Processing order of the inputs and the dead mask. With act-order the order is by
    descending ``diag H``, dead inputs counted with ``H_jj = 1`` as in the reference GPTQ."""
    diag = jnp.diag(H)
    dead = diag == 0
    perm = jnp.argsort(-jnp.where(dead, 1.0, diag), stable=True) if act_order else jnp.arange(H.shape[0])
    return perm, dead


def _factor(H, perm, dead, damp, Kp: int):
    """Lower Cholesky factor ``L`` of ``P·(H̃ + λI)·P``: ``H̃`` is ``H`` in processing order, dead
    inputs given ``H_jj = 1``, padded to ``Kp`` with unit diagonal; ``P`` reverses the order.

    Then ``A = P·L·P`` is upper triangular with ``A·Aᵀ = H̃ + λI``, and ``A⁻¹`` is the upper
    Cholesky factor of ``(H̃ + λI)⁻¹`` that GPTQ feeds errors through. The reordering, the
    dead inputs, the padding, the damping and the reversal are one gather over ``H``.
    Returns ``(L, λ, failed)``; a failed factorisation comes back as NaN.
    """
    K = H.shape[0]
    diag = jnp.where(dead, 1.0, jnp.diag(H))
    lam = damp * jnp.mean(diag)
    idx = jnp.concatenate([perm, jnp.arange(K, Kp)])[::-1]  # reversed processing order
    i, j = idx[:, None], idx[None, :]
    real = (i < K) & (j < K)
    Hr = jnp.where(real, H[jnp.minimum(i, K - 1), jnp.minimum(j, K - 1)], 0.0)
    d = jnp.where(idx < K, diag[jnp.minimum(idx, K - 1)], 1.0) + lam
    Hr = jnp.where(i == j, d[:, None], Hr)
    # Hr is symmetric: factorising Hrᵀ lets XLA hand LAPACK its column-major copy for free.
    L = cholesky(Hr.T)
    return L, lam, ~jnp.all(jnp.isfinite(jnp.diag(L)))  # LAPACK's failure is all NaN


_CHOL_WHOLE = 16384  # widest matrix factorised by one LAPACK call
_CHOL_BLOCK = 4096


def cholesky(A):
    """Lower Cholesky factor of a symmetric positive definite ``A`` (float32, lower
    triangle read). Up to ``_CHOL_WHOLE`` wide, one LAPACK ``potrf``; wider (a 70B model's
    down_proj Hessian is 28672 wide), right-looking by blocks of ``_CHOL_BLOCK``: LAPACK
    factorises each diagonal block, the panel below it is ``P·L_jj⁻ᵀ`` and the trailing
    updates are XLA matmuls. (OpenBLAS's ``potrf`` on the 28672-wide matrix, called from an
    XLA thread, crashes the process with a segfault in its copy kernel on this machine.) A
    failed block's NaN reaches the diagonal, as LAPACK's failure does."""
    n = A.shape[0]
    if n <= _CHOL_WHOLE:
        return lax.linalg.cholesky(A, symmetrize_input=False)
    b = _CHOL_BLOCK
    L = jnp.zeros_like(A)
    for j0 in range(0, n, b):
        j1 = min(j0 + b, n)
        left = L[j0:j1, :j0]
        d = A[j0:j1, j0:j1] - (jnp.dot(left, left.T, precision=_HP) if j0 else 0.0)
        Ljj = lax.linalg.cholesky(d, symmetrize_input=False)
        L = L.at[j0:j1, j0:j1].set(Ljj)
        if j1 < n:
            panel = A[j1:, j0:j1] - (jnp.dot(L[j1:, :j0], left.T, precision=_HP) if j0 else 0.0)
            inv = lax.linalg.triangular_solve(Ljj, jnp.eye(j1 - j0, dtype=A.dtype), left_side=True, lower=True)
            L = L.at[j1:, j0:j1].set(jnp.dot(panel, inv.T, precision=_HP))
    return L


def _params_of(cols, valid, spec: QuantSpec):
    """Grid parameters ``(1, 1, N)`` of one group given its rows ``(S, N)`` of W."""
    xg = jnp.where(valid[:, None], cols, jnp.nan)[None]  # (1, S, N)
    s, z = formats.params_from_range(*find_range(xg, spec), spec.grid)
    return s, z


@functools.partial(jax.jit, static_argnames=("act_order", "Kp"))
def _factorise(H, damp, *, act_order: bool, Kp: int):
    """``(L, perm, dead, failed)``: the processing order and the factor of :func:`_factor`.

    A program of its own: inside the column loop's program, OpenBLAS's Cholesky of a
    28672-wide Hessian (a 70B down_proj) crashes the process (a segfault in its copy kernel,
    reproduced; alone it runs)."""
    H = H.astype(jnp.float32)
    perm, dead = _order(H, act_order)
    L, _, failed = _factor(H, perm, dead, damp, Kp)
    return L, perm, dead, failed


def _gptq(w, H, damp, *, spec: QuantSpec, lay: GroupLayout, block: int, act_order: bool, static: bool):
    """Factorise, then (unless that failed) run the column loop. Returns ``(qt, loss, failed)``."""
    Kp = -(-w.shape[0] // block) * block
    L, perm, dead, failed = _factorise(H, damp, act_order=act_order, Kp=Kp)
    return _columns(w, L, perm, dead, failed, spec=spec, lay=lay, block=block, act_order=act_order, static=static)


@functools.partial(jax.jit, static_argnames=("spec", "lay", "block", "act_order", "static"))
def _columns(w, L, perm, dead, failed, *, spec: QuantSpec, lay: GroupLayout, block: int, act_order: bool,
             static: bool):
    """The column loop given the factor (none when the factorisation failed)."""
    K, N = w.shape
    Kp = L.shape[0]
    grid = spec.grid
    W = jnp.where(dead[:, None], 0.0, w.astype(jnp.float32))  # (K, N): row j holds input j

    G = lay.groups
    gs = lay.size if spec.granularity == "group" else K

    # Up-front parameters (static groups, channel, tensor) from the original weights.
    if static:
        xg = lay.to_groups(W)  # (G, S, N), or (1, K*N, 1) for tensor granularity
        s0, z0 = formats.params_from_range(*find_range(xg, spec), grid)
        s0 = jnp.broadcast_to(s0[:, 0, :], (G, N))
        z0 = jnp.broadcast_to(z0[:, 0, :], (G, N)) if z0 is not None else jnp.zeros((G, N))
        # group of each original input index
        col_group = jnp.arange(K) // gs if spec.granularity == "group" else jnp.zeros(K, jnp.int32)

    if act_order:
        W = W[perm]
    if Kp != K:  # padded inputs: zero weight, unit Hessian, masked out of every group
        W = jnp.pad(W, ((0, Kp - K), (0, 0)))
    perm_p = jnp.concatenate([perm, jnp.arange(K, Kp)])

    # Error feedback in terms of A = P·L·P (H̃ + λI = A·Aᵀ, A upper), with no inverse: column
    # j is quantized from W̃_j = W_j + Σ_{i<j} Â_ij·(W_i − Q_i), Â_ij = A_ij/A_jj, W the
    # original weights. This is GPTQ's W̃_j = W_j − Σ_{i<j} U_ij·E_i (U = A⁻¹ the upper
    # Cholesky factor of (H̃ + λI)⁻¹, E_i = (W̃_i − Q_i)/U_ii) rewritten with W − Q = UᵀE,
    # i.e. E = Aᵀ(W − Q). Tiles of A are read from L reversed.
    dA = jnp.diag(L)[::-1]

    def a_tile(r0, c0, size):
        """``A[r0:r0+size, c0:c0+size]``, from ``A_ik = L_{Kp−1−i, Kp−1−k}``."""
        return lax.rev(lax.dynamic_slice(L, (Kp - r0 - size, Kp - c0 - size), (size, size)), (0, 1))

    def ah_tile(r0, c0, size):
        """``Â[r0:r0+size, c0:c0+size]`` (strictly upper: the diagonal is not an update)."""
        t = a_tile(r0, c0, size) / lax.dynamic_slice(dA, (c0,), (size,))[None, :]
        return jnp.where(r0 + jnp.arange(size)[:, None] < c0 + jnp.arange(size)[None, :], t, 0.0)

    if not static:
        # A group's parameters come from its weights updated by every earlier column, as in
        # GPTQ. For the group's later columns that partial sum differs in the two forms: with
        # D the finished inputs and G the group, GPTQ's is W_G − U_DGᵀE_D = W_G + A_GG⁻ᵀA_DGᵀR_D,
        # and the loop holds W_G + diag(A_GG)⁻¹A_DGᵀR_D; C_G = A_GG⁻ᵀ·diag(A_GG) maps one onto
        # the other (the group's first column has all its terms in both).
        def group_map(g):
            Ag = a_tile(g * gs, g * gs, gs)
            return jax.scipy.linalg.solve_triangular(Ag.T, jnp.diag(jnp.diag(Ag)), lower=True)

        Cg = jax.vmap(group_map)(jnp.arange(Kp // gs))  # (groups in processing order, gs, gs)

    # Inner loops: whole groups per block (gptq_quantize makes the block a multiple of the
    # group), or the whole block as one run when the parameters are fixed up front.
    gsize = block if static else gs
    groups_per_block = block // gsize
    # Each run of columns goes in segments of `seg`: rank-1 updates within a segment, one
    # product for the rest of the block after it (less memory traffic than rank-1 updates
    # of the whole block tile).
    seg = _SEGMENT if gsize % _SEGMENT == 0 else gsize
    S = jnp.zeros((G, N), jnp.float32)
    Z = jnp.zeros((G, N), jnp.float32)
    Q = jnp.zeros((Kp, N), jnp.uint8)

    def block_body(b, carry):
        Acc, Q, S, Z, loss = carry  # Acc: Σ over finished blocks of Âᵀ(W − Q), per row
        i1 = b * block
        W0 = lax.dynamic_slice(W, (i1, 0), (block, N))
        W1 = W0 + lax.dynamic_slice(Acc, (i1, 0), (block, N))
        A1 = ah_tile(i1, i1, block)
        d1 = lax.dynamic_slice(dA, (i1,), (block,))

        def group_body(g, c):
            W1, Q1, R1, S, Z, loss = c
            j0 = g * gsize
            if not static:
                gidx = (i1 + j0) // gs
                base = lax.dynamic_slice(W0, (j0, 0), (gsize, N))
                part = lax.dynamic_slice(W1, (j0, 0), (gsize, N)) - base
                cols = base + jnp.dot(Cg[gidx], part, precision=_HP)
                valid = (i1 + j0 + jnp.arange(gsize)) < K
                s, z = _params_of(cols, valid, spec)
                s, z = s[0, 0], (z[0, 0] if z is not None else jnp.zeros((N,)))
                S = S.at[gidx].set(s)
                Z = Z.at[gidx].set(z)

            def seg_body(k, c1):
                W1, Q1, R1, loss = c1
                j1 = j0 + k * seg
                Ws = lax.dynamic_slice(W1, (j1, 0), (seg, N))
                As = lax.dynamic_slice(A1, (j1, j1), (seg, seg))

                def col_body(i, c2):
                    # wcol (row i of Ws) comes in the carry, read after the previous update,
                    # so nothing reads Ws while it is updated in place (else XLA copies it).
                    Ws, wcol, Q1, R1, loss = c2
                    j = j1 + i
                    if static:
                        gi = col_group[jnp.minimum(perm_p[i1 + j], K - 1)]
                        sc, zc = s0[gi], z0[gi]
                    else:
                        sc, zc = s, z
                    zz = None if spec.symmetric else zc
                    code = formats.encode(wcol, sc, zz, grid)
                    q = formats.decode(code, sc, zz, grid)
                    r = W0[j] - q
                    real = (i1 + j) < K
                    loss = loss + jnp.where(real, jnp.sum((wcol - q) ** 2) * d1[j] ** 2 / 2, 0.0)
                    Ws = Ws + As[i][:, None] * r[None, :]
                    Q1 = Q1.at[j].set(code)
                    R1 = R1.at[j].set(r)
                    return Ws, Ws[jnp.minimum(i + 1, seg - 1)], Q1, R1, loss

                _, _, Q1, R1, loss = lax.fori_loop(0, seg, col_body, (Ws, Ws[0], Q1, R1, loss))
                # The segment's update of the block's later rows, as one product (its own rows,
                # done, get a stale update that nothing reads).
                Rs = lax.dynamic_slice(R1, (j1, 0), (seg, N))
                Ab = lax.dynamic_slice(A1, (j1, 0), (seg, block))
                W1 = W1 + lax.dot_general(Ab, Rs, (((0,), (0,)), ((), ())), precision=_HP)
                return W1, Q1, R1, loss

            W1, Q1, R1, loss = lax.fori_loop(0, gsize // seg, seg_body, (W1, Q1, R1, loss))
            return W1, Q1, R1, S, Z, loss

        Q1 = jnp.zeros((block, N), jnp.uint8)
        R1 = jnp.zeros((block, N), jnp.float32)
        W1, Q1, R1, S, Z, loss = lax.fori_loop(0, groups_per_block, group_body,
                                               (W1, Q1, R1, S, Z, loss))
        Q = lax.dynamic_update_slice(Q, Q1, (i1, 0))

        # Lazy batch update of the rows below the block, one block-high tile at a time (a
        # loop with a traced start: no flops spent on the rows already done).
        def tile_body(t, Acc):
            c0 = t * block
            upd = lax.dot_general(ah_tile(i1, c0, block), R1, (((0,), (0,)), ((), ())), precision=_HP)
            return lax.dynamic_update_slice(Acc, lax.dynamic_slice(Acc, (c0, 0), (block, N)) + upd, (c0, 0))

        Acc = lax.fori_loop(b + 1, Kp // block, tile_body, Acc)
        return Acc, Q, S, Z, loss

    # No loop when the factorisation failed: gptq_quantize retries with more damping.
    _, Q, S, Z, loss = lax.fori_loop(0, jnp.where(failed, 0, Kp // block), block_body,
                                     (jnp.zeros_like(W), Q, S, Z, jnp.float32(0.0)))
    inv = jnp.argsort(perm) if act_order else None
    codes = Q[:K][inv] if act_order else Q[:K]  # (K, N), original input order
    if static:
        S, Z = s0, z0
    g_idx = (inv // gs).astype(jnp.int32) if (act_order and not static and spec.granularity == "group") else None
    zero = Z[:, None, :] if not spec.symmetric else None
    qt = pack_qtensor(codes, S[:, None, :], zero, lay, spec, w.dtype, g_idx=g_idx, method="gptq")
    return qt, loss, failed


def gptq_quantize(w, H, spec: QuantSpec, *, path: str | None = None, mesh=None) -> tuple[QTensor, GPTQInfo]:
    """GPTQ-quantize a kernel ``w`` (``(in, out)``) given the Hessian ``H`` (``(in, in)``) of its inputs.

    ``spec`` gives the grid (format, bits, granularity, group size, symmetric, range
    calibration) and, in ``spec.options``, the GPTQ options of :class:`GPTQOptions`.
    Returns the QTensor and a :class:`GPTQInfo`. Raises NonFiniteError for NaN/Inf in
    ``w`` or ``H`` and when ``H`` stays singular after every damping escalation.

    With a ``mesh`` (:func:`jquant.distributed.make_mesh`) of more than one device, the
    output columns are split over all its devices (``H`` replicated: each device factorises
    it and solves ``out / devices`` columns; the columns are padded with zeros to a multiple
    of the device count and the padding dropped). Each column's arithmetic is the
    single-device one; the result equals it up to float32 summation order.
    """
    opts = options_of(spec)
    w = jnp.asarray(w)
    check_weight(w, path)
    if w.ndim != 2 or spec.axis % 2 != 0:
        raise ShapeError(at(path, f"GPTQ needs a 2-D kernel (in, out) with axis 0, got shape {tuple(w.shape)}, "
                                  f"axis {spec.axis}"))
    if spec.format not in formats.RANGE_FORMATS:
        raise SpecError(at(path, f"GPTQ needs a range format ({', '.join(formats.RANGE_FORMATS)}), got {spec.format!r}"))
    K = w.shape[0]
    H = jnp.asarray(H)
    if H.shape != (K, K):
        raise ShapeError(at(path, f"Hessian of shape {tuple(H.shape)} does not match the kernel's {K} inputs"))
    if not bool(jnp.all(jnp.isfinite(H))):
        raise NonFiniteError(at(path, "Hessian has NaN/Inf values (NaN in the calibration activations?)"))
    if not bool(jnp.any(H != 0)):
        raise DataError(at(path, "Hessian is all zeros: no calibration input reached this layer (every input "
                                 "feature was 0), so GPTQ has nothing to fit; check the calibration data"))
    lay = layout_for(w.shape, spec, path)
    static = spec.granularity != "group" or opts.static_groups
    gs = lay.size if spec.granularity == "group" else K
    block = opts.block_size
    if not static:
        # Whole groups per block, so each group's parameters come from updated weights.
        block = gs * max(1, block // gs) if gs <= block else gs
    # No longer than needed; with dynamic groups still a whole number of groups.
    block = min(block, -(-K // gs) * gs) if not static else min(block, K)
    # Damping λ = damp·mean(diag H), ×10 on each failed factorisation.
    for tries in range(1, opts.max_damp_tries + 1):
        damp = opts.damp * 10.0 ** (tries - 1)
        if mesh is not None and mesh.size > 1:
            qt, loss, failed = _gptq_sharded(w, H, jnp.float32(damp), spec=spec, block=block, act_order=opts.act_order,
                                             static=static, mesh=mesh, path=path)
        else:
            qt, loss, failed = _gptq(w, H, jnp.float32(damp), spec=spec, lay=lay, block=block,
                                     act_order=opts.act_order, static=static)
        if not bool(failed):
            break
    else:
        raise NonFiniteError(at(path, f"Hessian is not positive definite even with damping {damp:.3g}·mean(diag H) "
                                      f"after {tries} tries"))
    info = GPTQInfo(float(loss), damp, tries)
    if info.tries > 1:
        warnings.warn(at(path, f"Cholesky failed at damp={opts.damp}; escalated to {info.damp:.3g}"), stacklevel=2)
    return qt, info


def _gptq_sharded(w, H, damp, *, spec, block, act_order, static, mesh, path):
    """:func:`_gptq` with the output columns split over every device of ``mesh``."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jquant import distributed

    K, N = w.shape
    n = mesh.size
    Np = -(-N // n) * n
    if Np != N:  # zero columns: quantized like any other, then dropped
        w = jnp.pad(w, ((0, 0), (0, Np - N)))
    # Placed explicitly: arrays committed to one device (or to this process's devices only,
    # in a multi-process run) are not moved onto the mesh by jit.
    w = distributed.put(w, NamedSharding(mesh, P(None, tuple(mesh.axis_names))))
    H, damp = distributed.put((H, damp), NamedSharding(mesh, P()))
    qt, loss, failed = _sharded_solver(spec, layout_for((K, Np // n), spec, path), block, act_order, static,
                                       mesh)(w, H, damp)
    if Np != N:
        qt = distributed.take(qt, 1, N)
    return qt, loss, failed


@functools.lru_cache(maxsize=64)
def _sharded_solver(spec, lay, block, act_order, static, mesh):
    from jax.sharding import PartitionSpec as P

    from jquant import distributed

    axes = tuple(mesh.axis_names)
    cols = P(None, axes)

    def columns(w, L, perm, dead, failed):
        qt, loss, failed = _columns(w, L, perm, dead, failed, spec=spec, lay=lay, block=block, act_order=act_order,
                                    static=static)
        return qt, lax.psum(loss, axes), failed

    # check_vma off: the solve's loop carries start replicated and become per-device.
    sharded = jax.jit(distributed.shard_map(columns, mesh=mesh, in_specs=(cols, P(), P(), P(), P()),
                                            out_specs=(cols, P(), P()), check_vma=False))

    def solve(w, H, damp):  # the factor on every device (H replicated), then the columns split
        return sharded(w, *_factorise(H, damp, act_order=act_order, Kp=-(-w.shape[0] // block) * block))

    return solve


def reconstruction_error(w, qt: QTensor, H) -> float:
    """``tr((W−Q)ᵀ H (W−Q)) / 2`` = ‖X(W−Q)‖²/n: the layer's output error on the calibration inputs."""
    return float(_reconstruction_error(jnp.asarray(w), qt, jnp.asarray(H)))


@jax.jit
def _reconstruction_error(w, qt: QTensor, H):
    d = w.astype(jnp.float32) - qt.dequantize(jnp.float32)
    return jnp.sum(d * jnp.dot(H.astype(jnp.float32), d, precision=_HP)) / 2



def _method(w, spec: QuantSpec, stats, *, path: str | None = None, mesh=None):
    qt, info = gptq_quantize(w, stats["hessian"], spec, path=path, mesh=mesh)
    return qt, {"loss": info.loss, "damp": info.damp}


def _check(spec: QuantSpec, path: str | None = None) -> None:
    if spec.granularity == "tensor":
        raise SpecError(at(path, "GPTQ computes grid parameters per group or per output channel; granularity "
                                 "'tensor' is not supported (use 'channel' or 'group')"))


register(Method("gptq", _method, stats=("hessian",), options=GPTQOptions, formats=formats.RANGE_FORMATS,
                check=_check, shards=True,
                paper="arXiv:2210.17323",
                summary="column-by-column rounding with error feedback through the inverse Hessian"))
