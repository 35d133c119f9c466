"""Independent float64 / integer NumPy references of the GPTQ and AWQ checkpoint layouts,
transcribed from the packing loops of AutoGPTQ/GPTQModel (``pack_original``) and AutoAWQ
(``WQLinear_GEMM.from_linear``), and their dequantization formulas. They share no code with
jquant (its packing is a vectorized bit stream; these are the tools' loops)."""

from __future__ import annotations

import numpy as np


def gptq_pack_rows(intweight: np.ndarray, bits: int) -> np.ndarray:
    """``(K, N)`` codes -> ``(K·bits/32, N)`` int32, AutoGPTQ's loop (3 bits: 32 codes in 3 words)."""
    intweight = intweight.astype(np.uint32)
    K, N = intweight.shape
    qweight = np.zeros((K * bits // 32, N), np.uint32)
    if bits in (2, 4, 8):
        pf = 32 // bits
        for row in range(qweight.shape[0]):
            for j in range(pf):
                qweight[row] |= intweight[row * pf + j] << np.uint32(bits * j)
    elif bits == 3:
        i = row = 0
        while row < qweight.shape[0]:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << np.uint32(30)
            row += 1
            qweight[row] |= (intweight[i] >> np.uint32(2)) & np.uint32(1)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << np.uint32(31)
            row += 1
            qweight[row] |= (intweight[i] >> np.uint32(1)) & np.uint32(3)
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << np.uint32(3 * (j - i) + 2)
            i += 10
            row += 1
    else:
        raise ValueError(bits)
    return qweight.view(np.int32)


def gptq_pack_zeros(zeros: np.ndarray, bits: int, v1: bool = True) -> np.ndarray:
    """``(G, N)`` zero points -> ``(G, N·bits/32)`` int32 (v1: ``zero - 1``, wrapped to ``bits``)."""
    z = (zeros.astype(np.int64) - (1 if v1 else 0)) & ((1 << bits) - 1)
    return gptq_pack_rows(z.T.astype(np.uint32), bits).T.copy()


def gptq_unpack(words: np.ndarray, bits: int, length: int) -> np.ndarray:
    """Inverse along axis 0 by reading bit ``i·bits`` of the column's bit stream."""
    w = words.view(np.uint32).astype(np.uint64)
    out = np.zeros((length,) + w.shape[1:], np.int64)
    for i in range(length):
        for b in range(bits):
            pos = i * bits + b
            out[i] |= ((w[pos // 32] >> np.uint64(pos % 32)) & np.uint64(1)).astype(np.int64) << b
    return out


def gptq_dequantize(qweight, qzeros, scales, g_idx, bits: int, v1: bool = True) -> np.ndarray:
    """``scales[g] * (q - z[g])`` per input row k, ``g = g_idx[k]``, float64; v1 adds 1 to z."""
    K = g_idx.shape[0]
    q = gptq_unpack(qweight, bits, K)
    z = gptq_unpack(qzeros.T.copy(), bits, scales.shape[1]).T + (1 if v1 else 0)
    return scales.astype(np.float64)[g_idx] * (q - z[g_idx])


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(intweight: np.ndarray) -> np.ndarray:
    """``(R, N)`` 4-bit codes -> ``(R, N/8)`` int32, AutoAWQ's loop with its order map."""
    intweight = intweight.astype(np.uint32)
    R, N = intweight.shape
    q = np.zeros((R, N // 8), np.uint32)
    for col in range(N // 8):
        for i in range(8):
            q[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << np.uint32(i * 4)
    return q.view(np.int32)


def awq_dequantize(qweight, qzeros, scales, group_size: int) -> np.ndarray:
    """AutoAWQ's ``dequantize_gemm``: unpack nibbles, undo the order, ``(q - z) * s`` by group."""
    def unpack(x):
        x = x.view(np.uint32)
        vals = np.stack([(x >> np.uint32(4 * i)) & 15 for i in range(8)], -1).reshape(x.shape[0], -1)
        rev = np.arange(vals.shape[1]).reshape(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
        return vals[:, rev].astype(np.int64)
    q, z = unpack(qweight), unpack(qzeros)
    g = np.arange(q.shape[0]) // group_size
    return (q - z[g]) * scales.astype(np.float64)[g]
