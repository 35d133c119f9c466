"""A float64 NumPy GPTQ reference, written from the algorithm of Frantar et al.
(arXiv:2210.17323) and the reference implementation's ``GPTQ.fasterquant``, not from jquant.

Layout: the solve works on ``W = kernel.T`` (torch layout ``(out, in)``: rows are output
channels, columns are inputs); the returned matrices are back in the Flax kernel layout
``(in, out)``.

Quantizer (int grids, scale stored as float16, codes computed from the stored scale):

- asymmetric, integer zero: ``lo = min(min x, 0)``, ``hi = max(max x, 0)``,
  ``s = f16((hi − lo)/maxq)``, ``z = clip(round(−lo/s), 0, maxq)``,
  ``q = clip(round(x/s) + z, 0, maxq)``, ``x̂ = (q − z)·s``;
- symmetric, restricted: ``s = f16(absmax/(2^(b−1) − 1))``,
  ``q = clip(round(x/s), −(2^(b−1) − 1), 2^(b−1) − 1)``, ``x̂ = q·s``.

A scale of 0 (an all-zero group) divides by 1 instead, so every code is the zero code.
"""

from __future__ import annotations

import types

import numpy as np


def f16(v):
    """Round to float16 (the stored scale dtype) and back to float64."""
    return np.asarray(v, np.float64).astype(np.float16).astype(np.float64)


def qparams(cols, bits, symmetric):
    """Per-row ``(scale, zero)`` of a group given its columns ``cols`` ``(N, S)`` (Wᵀ layout)."""
    cols = np.asarray(cols, np.float64)
    if symmetric:
        s = f16(np.max(np.abs(cols), axis=1) / (2 ** (bits - 1) - 1))
        return s, np.zeros_like(s)
    maxq = 2**bits - 1
    lo = np.minimum(cols.min(axis=1), 0.0)
    hi = np.maximum(cols.max(axis=1), 0.0)
    s = f16((hi - lo) / maxq)
    z = np.clip(np.round(-lo / np.where(s == 0, 1.0, s)), 0, maxq)
    return s, z


def quantize_col(x, s, z, bits, symmetric):
    """``(code, x̂)`` of one column ``x`` ``(N,)`` on the grid ``(s, z)`` (codes as jquant stores
    them: unsigned, the symmetric code offset by ``2^(b−1)``)."""
    sd = np.where(s == 0, 1.0, s)
    if symmetric:
        half = 2 ** (bits - 1)
        q = np.clip(np.round(x / sd), -(half - 1), half - 1)
        return q + half, q * s
    q = np.clip(np.round(x / sd) + z, 0, 2**bits - 1)
    return q, (q - z) * s


def gptq_reference(kernel, H, *, bits=4, symmetric=False, group_size=None, block_size=128,
                   act_order=False, static_groups=False, damp=0.01):
    """GPTQ of a kernel ``(in, out)`` with Hessian ``H`` ``(in, in)``, all in float64.

    ``group_size=None`` is per-channel (one group of all inputs, parameters up front).
    Dynamic groups take their parameters when the group's first column is reached, from
    the weights as updated by every earlier column (whatever block those updates are still
    pending in); static groups (and per-channel) from the original weights of the
    contiguous groups, before any permutation or update.

    Returns a namespace: ``deq`` ``(in, out)``, ``codes`` ``(in, out)``, ``scale``/``zero``
    ``(G, out)`` (group ``g`` is the ``g``-th group *processed* for dynamic act-order),
    ``g_idx`` ``(in,)``, ``perm``, ``loss`` (GPTQ's Σ(w−q)²/U_jj²/2), ``W`` (the weights after
    dead-input zeroing, ``(in, out)``).
    """
    W = np.array(kernel, np.float64).T.copy()  # (N, K)
    H = np.array(H, np.float64).copy()
    N, K = W.shape
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    W_orig = W.copy()
    gs = K if group_size is None else group_size
    G = -(-K // gs)
    static = group_size is None or static_groups

    S = np.zeros((G, N))
    Z = np.zeros((G, N))
    if static:
        for g in range(G):
            S[g], Z[g] = qparams(W[:, g * gs:(g + 1) * gs], bits, symmetric)

    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(K)
    W = W[:, perm]
    H = H[perm][:, perm]

    lam = damp * np.mean(np.diag(H))
    Hd = H + lam * np.eye(K)
    L = np.linalg.cholesky(Hd)  # raises LinAlgError when not positive definite
    Linv = np.linalg.inv(L)
    Hinv = Linv.T @ Linv
    U = np.linalg.cholesky((Hinv + Hinv.T) / 2).T  # upper: Hinv = UᵀU

    codes = np.zeros((N, K))
    deq = np.zeros((N, K))
    loss = 0.0
    s_cur = z_cur = None
    for i1 in range(0, K, block_size):
        i2 = min(i1 + block_size, K)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros((N, i2 - i1))
        for i in range(i2 - i1):
            j = i1 + i
            if static:
                g = perm[j] // gs
                s, z = S[g], Z[g]
            else:
                if j % gs == 0:
                    # The group's fully updated weights: in-block columns are current in
                    # W1; columns beyond the block still owe this block's pending update.
                    j2 = min(j + gs, K)
                    cols = W1[:, i:i + gs]
                    if j2 > i2:
                        beyond = W[:, i2:j2] - E1[:, :i] @ U[i1:j, i2:j2]
                        cols = np.concatenate([cols, beyond], axis=1)
                    s_cur, z_cur = qparams(cols, bits, symmetric)
                    S[j // gs], Z[j // gs] = s_cur, z_cur
                s, z = s_cur, z_cur
            w = W1[:, i]
            c, q = quantize_col(w, s, z, bits, symmetric)
            d = U[j, j]
            err = (w - q) / d
            loss += np.sum((w - q) ** 2) / d**2 / 2
            W1[:, i:] -= np.outer(err, U[j, j:i2])
            E1[:, i] = err
            codes[:, j] = c
            deq[:, j] = q
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    inv = np.argsort(perm)
    g_idx = (inv // gs) if not static else (np.arange(K) // gs)
    return types.SimpleNamespace(
        deq=deq[:, inv].T, codes=codes[:, inv].T, scale=S, zero=Z if not symmetric else None,
        g_idx=g_idx, perm=perm, loss=loss, W=W_orig.T, lam=lam)


def jquant_block(K, group_size, block_size, static):
    """The block size jquant's gptq_quantize uses (whole groups per block for dynamic
    groups, no more than needed for K): mirrored so the reference rounds in the same order."""
    if not static:
        gs = min(group_size, K)
        block_size = gs * max(1, block_size // gs) if gs <= block_size else gs
        return min(block_size, -(-K // gs) * gs)
    return min(block_size, K)


def rtn_reference(kernel, *, bits=4, symmetric=False, group_size=None):
    """Round-to-nearest of a kernel ``(in, out)`` on the same grids (contiguous groups)."""
    W = np.asarray(kernel, np.float64).T
    N, K = W.shape
    gs = K if group_size is None else group_size
    out = np.zeros_like(W)
    for g0 in range(0, K, gs):
        s, z = qparams(W[:, g0:g0 + gs], bits, symmetric)
        for j in range(g0, min(g0 + gs, K)):
            out[:, j] = quantize_col(W[:, j], s, z, bits, symmetric)[1]
    return out.T


def output_error(kernel, deq, H):
    """``tr(ΔWᵀ H ΔW)`` in float64, ``ΔW = kernel − deq`` (``(in, out)``); ``= 2‖XΔW‖²/n``."""
    d = np.asarray(kernel, np.float64) - np.asarray(deq, np.float64)
    return float(np.sum(d * (np.asarray(H, np.float64) @ d)))
