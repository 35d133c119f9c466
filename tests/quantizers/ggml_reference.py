"""An independent NumPy port of llama.cpp's reference block quantizers (ggml/src/ggml-quants.c).

Transliterated from the C code loop by loop, in float32 scalars (``np.float32``), so the
rounding of every operation is C's (compiled without FMA contraction) and the bytes can be
compared exactly with :mod:`jquant.quantizers.kquant`. Slow (Python loops over elements);
meant for small test inputs. Written from the C source, not from the jnp implementation.
"""

import numpy as np

F = np.float32
QK_K = 256
EPS = F(1e-15)  # GROUP_MAX_EPS


def nearest_int(fval):
    val = np.array(F(fval) + F(12582912.0), dtype=np.float32)
    i = int(val.view(np.int32))
    return (i & 0x007FFFFF) - 0x00400000


def f16(v):
    return np.float16(F(v))


def f16_bytes(v):
    return list(np.array([f16(v)], np.float16).view(np.uint8))


def f16_val(v):
    return F(f16(v))


def u8(i):
    return int(i) & 0xFF


def i8(i):
    return ((int(i) + 128) & 0xFF) - 128


def MIN(a, b):
    return a if a < b else b


def MAX(a, b):
    return a if a > b else b


# -------------------------------------------------------------------- helpers of the C file
def make_qx_quants(n, nmax, x, L, rmse_type, qw):
    max_ = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_ = x[i]
    if amax < EPS:
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(-nmax) / max_
    assert rmse_type == 1
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = MAX(-nmax, MIN(nmax - 1, l))
        L[i] = l + nmax
        w = qw[i] if qw is not None else x[i] * x[i]
        sumlx = sumlx + w * x[i] * F(l)
        suml2 = suml2 + w * F(l) * F(l)
    scale = sumlx / suml2 if suml2 != 0 else F(0)
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(F(nmax) + F(0.1) * F(is_)) / max_
        sumlx = suml2 = F(0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = MAX(-nmax, MIN(nmax - 1, l))
            w = qw[i] if qw is not None else x[i] * x[i]
            sumlx = sumlx + w * x[i] * F(l)
            suml2 = suml2 + w * F(l) * F(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + MAX(-nmax, MIN(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


def make_q3_quants(n, nmax, x, L):
    max_ = F(0)
    amax = F(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_ = x[i]
    if amax < EPS:
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(-nmax) / max_
    sumlx = F(0)
    suml2 = F(0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = MAX(-nmax, MIN(nmax - 1, l))
        L[i] = l
        w = x[i] * x[i]
        sumlx = sumlx + w * x[i] * F(l)
        suml2 = suml2 + w * F(l) * F(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = x[i] * x[i]
            slx = sumlx - w * x[i] * F(L[i])
            if slx > 0:
                sl2 = suml2 - w * F(L[i]) * F(L[i])
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = MAX(-nmax, MIN(nmax - 1, new_l))
                if new_l != L[i]:
                    slx = slx + w * x[i] * F(new_l)
                    sl2 = sl2 + w * F(new_l) * F(new_l)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if not n_changed:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else F(0)


def make_qkx(n, nmax, x, weights, L, rmin, rdelta, nstep, use_mad, v3):
    """make_qkx2_quants (v3=False) / make_qkx3_quants (v3=True). Returns (scale, the_min)."""
    min_ = x[0]
    max_ = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < min_:
            min_ = x[i]
        if x[i] > max_:
            max_ = x[i]
        w = weights[i]
        sum_w = sum_w + w
        sum_x = sum_x + w * x[i]
    if min_ > 0:
        min_ = F(0)
    if (max_ <= min_) if v3 else (max_ == min_):
        for i in range(n):
            L[i] = 0
        return F(0), -min_
    iscale = F(nmax) / (max_ - min_)
    scale = F(1) / iscale
    best_error = F(0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - min_))
        L[i] = MAX(0, MIN(nmax, l))
        diff = scale * F(L[i]) + min_ - x[i]
        diff = abs(diff) if use_mad else diff * diff
        best_error = best_error + weights[i] * diff
    Laux = [0] * n
    for is_ in range(nstep + 1):
        iscale = (F(rmin) + F(rdelta) * F(is_) + F(nmax)) / (max_ - min_)
        sum_l = sum_l2 = sum_xl = F(0)
        for i in range(n):
            if v3:
                v = iscale * (x[i] - min_)
                l = nearest_int(MIN(v, F(nmax))) if v > 0 else 0
            else:
                l = nearest_int(iscale * (x[i] - min_))
                l = MAX(0, MIN(nmax, l))
            Laux[i] = l
            w = weights[i]
            sum_l = sum_l + w * F(l)
            sum_l2 = sum_l2 + w * F(l) * F(l)
            sum_xl = sum_xl + w * F(l) * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > 0:
                this_min = F(0)
                this_scale = sum_xl / sum_l2
            cur_error = F(0)
            for i in range(n):
                diff = this_scale * F(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                cur_error = cur_error + weights[i] * diff
            if cur_error < best_error:
                L[:] = Laux
                best_error = cur_error
                scale = this_scale
                min_ = this_min
    return scale, -min_


def make_qp_quants(n, nmax, x, L, quant_weights):
    max_ = F(0)
    for i in range(n):
        max_ = MAX(max_, x[i])
    if max_ < EPS:
        for i in range(n):
            L[i] = 0
        return F(0)
    iscale = F(nmax) / max_
    for i in range(n):
        L[i] = u8(nearest_int(iscale * x[i]))
    scale = F(1) / iscale
    best_mse = F(0)
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best_mse = best_mse + quant_weights[i] * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (F(0.1) * F(is_) + F(nmax)) / max_
        scale_is = F(1) / iscale_is
        mse = F(0)
        for i in range(n):
            l = MIN(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * F(l)
            mse = mse + quant_weights[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = suml2 = F(0)
    for i in range(n):
        l = MIN(nmax, nearest_int(iscale * x[i]))
        L[i] = u8(l)
        w = quant_weights[i]
        sumlx = sumlx + w * x[i] * F(l)
        suml2 = suml2 + w * F(l) * F(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            slx = sumlx - w * x[i] * F(L[i])
            sl2 = suml2 - w * F(L[i]) * F(L[i])
            if slx > 0 and sl2 > 0:
                new_l = MIN(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    slx = slx + w * x[i] * F(new_l)
                    sl2 = sl2 + w * F(new_l) * F(new_l)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = u8(new_l)
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if not n_changed:
            break
    return sumlx / suml2 if suml2 > 0 else F(0)


def pack2(L):
    qs = []
    for j in range(0, QK_K, 128):
        for l in range(32):
            qs.append(L[j + l] | (L[j + l + 32] << 2) | (L[j + l + 64] << 4) | (L[j + l + 96] << 6))
    return qs


def pack_k4_scales(ls, lm):
    s = [0] * 12
    for j in range(8):
        if j < 4:
            s[j] = ls[j]
            s[j + 4] = lm[j]
        else:
            s[j + 4] = (ls[j] & 0xF) | ((lm[j] & 0xF) << 4)
            s[j - 4] |= (ls[j] >> 4) << 6
            s[j] |= (lm[j] >> 4) << 6
    return [u8(v) for v in s]


def get_scale_min_k4(j, q):
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def sum_sq(x):
    s = F(0)
    for v in x:
        s = s + v * v
    return s


# -------------------------------------------------------------------- one block / super-block
def q4_0_impl(xb, qw, sigma2):
    weight = [qw[j] * np.sqrt(sigma2 + xb[j] * xb[j]) for j in range(32)]
    L = [0] * 32
    d = make_qx_quants(32, 8, xb, L, 1, weight)
    return f16_bytes(d) + [L[j] | (L[j + 16] << 4) for j in range(16)]


def _qh(L):
    qh = 0
    for j in range(16):
        qh |= ((L[j] & 0x10) >> 4) << j
        qh |= ((L[j + 16] & 0x10) >> 4) << (j + 16)
    return [(qh >> (8 * k)) & 0xFF for k in range(4)]


def q5_0_impl(xb, qw, sigma2):
    weight = [qw[j] * np.sqrt(sigma2 + xb[j] * xb[j]) for j in range(32)]
    L = [0] * 32
    d = make_qx_quants(32, 16, xb, L, 1, weight)
    return f16_bytes(d) + _qh(L) + [(L[j] & 0xF) | ((L[j + 16] & 0xF) << 4) for j in range(16)]


def _q_1_impl(xb, qw, sigma2, nmax):
    weight = [qw[j] * np.sqrt(sigma2 + xb[j] * xb[j]) for j in range(32)]
    L = [0] * 32
    d, mn = make_qkx(32, nmax, xb, weight, L, -0.9, 0.05, 36, False, True)
    return f16_bytes(d) + f16_bytes(-mn), L


def q4_1_impl(xb, qw, sigma2):
    head, L = _q_1_impl(xb, qw, sigma2, 15)
    return head + [L[j] | (L[j + 16] << 4) for j in range(16)]


def q5_1_impl(xb, qw, sigma2):
    head, L = _q_1_impl(xb, qw, sigma2, 31)
    return head + _qh(L) + [(L[j] & 0xF) | ((L[j + 16] & 0xF) << 4) for j in range(16)]


def q2_k(x, qw=None):
    L = [0] * QK_K
    scales = [F(0)] * 16
    mins = [F(0)] * 16
    sc = [0] * 16
    if qw is None:
        max_scale = F(0)
        max_min = F(0)
        for j in range(16):
            xs = x[16 * j:16 * j + 16]
            weights = [abs(v) for v in xs]
            Lj = [0] * 16
            scales[j], mins[j] = make_qkx(16, 3, xs, weights, Lj, -0.5, 0.1, 15, True, False)
            L[16 * j:16 * j + 16] = Lj
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        if max_scale > 0:
            iscale = F(15) / max_scale
            for j in range(16):
                sc[j] = u8(nearest_int(iscale * scales[j]))
            d = max_scale / F(15)
        else:
            d = F(0)
        if max_min > 0:
            iscale = F(15) / max_min
            for j in range(16):
                sc[j] = u8(sc[j] | (nearest_int(iscale * mins[j]) << 4))
            dmin = max_min / F(15)
        else:
            dmin = F(0)
    else:
        sigma2 = sum_sq(x) / F(QK_K)
        sw = [F(0)] * 16
        for j in range(16):
            xs = x[16 * j:16 * j + 16]
            weight = [qw[16 * j + l] * np.sqrt(sigma2 + xs[l] * xs[l]) for l in range(16)]
            for l in range(16):
                sw[j] = sw[j] + weight[l]
            Lj = [0] * 16
            scales[j], mins[j] = make_qkx(16, 3, xs, weight, Lj, -0.9, 0.05, 36, False, True)
            L[16 * j:16 * j + 16] = Lj
        Ls, Lm = [0] * 16, [0] * 16
        d = make_qp_quants(16, 15, scales, Ls, sw)
        dmin = make_qp_quants(16, 15, mins, Lm, sw)
        sc = [u8(Ls[j] | (Lm[j] << 4)) for j in range(16)]
    for j in range(16):
        dq = f16_val(d) * F(sc[j] & 0xF)
        if not dq:
            continue
        dm = f16_val(dmin) * F(sc[j] >> 4)
        for ii in range(16):
            l = nearest_int((x[16 * j + ii] + dm) / dq)
            L[16 * j + ii] = MAX(0, MIN(3, l))
    return sc + pack2(L) + f16_bytes(d) + f16_bytes(dmin)


def q3_k(x, qw=None):
    L = [0] * QK_K
    scales = [F(0)] * 16
    s = [0] * 12
    if qw is None:
        max_scale = F(0)
        amax = F(0)
        for j in range(16):
            Lj = [0] * 16
            scales[j] = make_q3_quants(16, 4, x[16 * j:16 * j + 16], Lj)
            L[16 * j:16 * j + 16] = Lj
            a = abs(scales[j])
            if a > amax:
                amax = a
                max_scale = scales[j]
        if max_scale:
            iscale = F(-32) / max_scale
            ls = [MAX(-32, MIN(31, i8(nearest_int(iscale * scales[j])))) + 32 for j in range(16)]
            d = F(1) / iscale
        else:
            ls = None
            d = F(0)
    else:
        sigma2 = F(2) * sum_sq(x) / F(QK_K)
        sw = [F(0)] * 16
        for j in range(16):
            xs = x[16 * j:16 * j + 16]
            weight = [qw[16 * j + l] * np.sqrt(sigma2 + xs[l] * xs[l]) for l in range(16)]
            sumw = F(0)
            for l in range(16):
                sumw = sumw + weight[l]
            sw[j] = sumw
            Lj = [0] * 16
            scales[j] = make_qx_quants(16, 4, xs, Lj, 1, weight)
            L[16 * j:16 * j + 16] = Lj
        ls = [0] * 16
        d = make_qx_quants(16, 32, scales, ls, 1, sw)
    if ls is not None:
        for j in range(16):
            l = ls[j]
            if j < 8:
                s[j] = l & 0xF
            else:
                s[j - 8] |= (l & 0xF) << 4
            s[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))
        s = [u8(v) for v in s]
    for j in range(16):
        scv = s[j] & 0xF if j < 8 else s[j - 8] >> 4
        scv = (scv | (((s[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32
        dq = f16_val(d) * F(scv)
        if not dq:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / dq)
            L[16 * j + ii] = MAX(-4, MIN(3, l)) + 4
    hmask = [0] * 32
    for j in range(QK_K):
        if L[j] > 3:
            hmask[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    return hmask + pack2(L) + s + f16_bytes(d)


def _k45(x, qw, nmax):
    L = [0] * QK_K
    scales = [F(0)] * 8
    mins = [F(0)] * 8
    if qw is None:
        max_scale = F(0)
        max_min = F(0)
        for j in range(8):
            xs = x[32 * j:32 * j + 32]
            av_x = np.sqrt(sum_sq(xs) / F(32))
            weights = [av_x + abs(v) for v in xs]
            Lj = [0] * 32
            if nmax == 15:
                scales[j], mins[j] = make_qkx(32, 15, xs, weights, Lj, -1.0, 0.1, 20, False, False)
            else:
                scales[j], mins[j] = make_qkx(32, 31, xs, weights, Lj, -0.5, 0.1, 15, False, False)
            L[32 * j:32 * j + 32] = Lj
            if scales[j] > max_scale:
                max_scale = scales[j]
            if mins[j] > max_min:
                max_min = mins[j]
        inv_scale = F(63) / max_scale if max_scale > 0 else F(0)
        inv_min = F(63) / max_min if max_min > 0 else F(0)
        ls = [MIN(63, u8(nearest_int(inv_scale * scales[j]))) for j in range(8)]
        lm = [MIN(63, u8(nearest_int(inv_min * mins[j]))) for j in range(8)]
        d = max_scale / F(63)
        dmin = max_min / F(63)
    else:
        sigma2 = F(2) * sum_sq(x) / F(QK_K)
        sw = [F(0)] * 8
        for j in range(8):
            xs = x[32 * j:32 * j + 32]
            weights = [qw[32 * j + l] * np.sqrt(sigma2 + xs[l] * xs[l]) for l in range(32)]
            sumw = F(0)
            for l in range(32):
                sumw = sumw + weights[l]
            sw[j] = sumw
            Lj = [0] * 32
            scales[j], mins[j] = make_qkx(32, nmax, xs, weights, Lj, -0.9, 0.05, 36, False, True)
            L[32 * j:32 * j + 32] = Lj
        ls, lm = [0] * 8, [0] * 8
        d = make_qp_quants(8, 63, scales, ls, sw)
        dmin = make_qp_quants(8, 63, mins, lm, sw)
        if nmax == 31:
            ls = [MIN(63, v) for v in ls]
            lm = [MIN(63, v) for v in lm]
    s = pack_k4_scales(ls, lm)
    for j in range(8):
        scv, m = get_scale_min_k4(j, s)
        dq = f16_val(d) * F(scv)
        if not dq:
            continue
        dm = f16_val(dmin) * F(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / dq)
            L[32 * j + ii] = MAX(0, MIN(nmax, l))
    return f16_bytes(d) + f16_bytes(dmin) + s, L


def q4_k(x, qw=None):
    head, L = _k45(x, qw, 15)
    qs = []
    for j in range(0, QK_K, 64):
        qs += [L[j + l] | (L[j + l + 32] << 4) for l in range(32)]
    return head + qs


def q5_k(x, qw=None):
    head, L = _k45(x, qw, 31)
    qh = [0] * 32
    ql = []
    m1, m2 = 1, 2
    for n in range(0, QK_K, 64):
        for j in range(32):
            l1 = L[n + j]
            if l1 > 15:
                l1 -= 16
                qh[j] |= m1
            l2 = L[n + j + 32]
            if l2 > 15:
                l2 -= 16
                qh[j] |= m2
            ql.append(l1 | (l2 << 4))
        m1 <<= 2
        m2 <<= 2
    return head + qh + ql


def q6_k(x, qw=None):
    L = [0] * QK_K
    scales = [F(0)] * 16
    max_scale = F(0)
    max_abs_scale = F(0)
    for ib in range(16):
        Lj = [0] * 16
        scales[ib] = make_qx_quants(16, 32, x[16 * ib:16 * ib + 16], Lj, 1,
                                    None if qw is None else qw[16 * ib:16 * ib + 16])
        L[16 * ib:16 * ib + 16] = Lj
        a = abs(scales[ib])
        if a > max_abs_scale:
            max_abs_scale = a
            max_scale = scales[ib]
    if max_abs_scale < EPS:
        return [0] * 210
    iscale = F(-128) / max_scale
    d = F(1) / iscale
    sc = [i8(MIN(127, nearest_int(iscale * scales[ib]))) for ib in range(16)]
    for j in range(16):
        dq = f16_val(d) * F(sc[j])
        if not dq:
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / dq)
            L[16 * j + ii] = MAX(-32, MIN(31, l)) + 32
    ql = [0] * 128
    qh = [0] * 64
    for h, j in enumerate(range(0, QK_K, 128)):
        for l in range(32):
            q1, q2, q3, q4 = (L[j + l + 32 * k] & 0xF for k in range(4))
            ql[64 * h + l] = q1 | (q3 << 4)
            ql[64 * h + l + 32] = q2 | (q4 << 4)
            qh[32 * h + l] = ((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) | ((L[j + l + 64] >> 4) << 4)
                              | ((L[j + l + 96] >> 4) << 6))
    return ql + qh + [u8(v) for v in sc] + f16_bytes(d)


_KQ = {"q2_k": q2_k, "q3_k": q3_k, "q4_k": q4_k, "q5_k": q5_k, "q6_k": q6_k}
_IMPL32 = {"q4_0": q4_0_impl, "q4_1": q4_1_impl, "q5_0": q5_0_impl, "q5_1": q5_1_impl}


def quantize(rows, qtype, importance=None):
    """``rows`` float32 ``(R, K)`` -> uint8 ``(R, bytes)`` as llama.cpp's ``quantize_<type>``
    (reference path without ``importance``, the ``_impl`` path with it). Block-32 types
    without importance are not ported here (gguf-py implements them)."""
    rows = np.asarray(rows, np.float32)
    out = []
    with np.errstate(all="ignore"):
        for r in rows:
            x = [F(v) for v in r]
            qw = None if importance is None else [F(v) for v in np.asarray(importance, np.float32)]
            b = []
            if qtype in _KQ:
                for i in range(0, len(x), QK_K):
                    b += _KQ[qtype](x[i:i + QK_K], None if qw is None else qw[i:i + QK_K])
            else:
                assert qw is not None, "block-32 types without importance: use gguf-py"
                sigma2 = sum_sq(x) / F(len(x))
                for i in range(0, len(x), 32):
                    b += _IMPL32[qtype](x[i:i + 32], qw[i:i + 32], sigma2)
            out.append(b)
    return np.array(out, dtype=np.uint8)
