"""Block-scaled floats (jquant.quantizers.blockfloat): MXFP4 bytes against gguf-py's quantizer and
dequantizer, NVFP4 against gguf-py's dequantizer (times the tensor scale), every format against
a float64 NumPy reference written here from the specs (OCP MX v1.0 scale rule, NVIDIA NVFP4
two-level scales, round-to-nearest-even E2M1 / E4M3 / E5M2), the documented differences
between llama.cpp's MXFP4 rule and the OCP one, and the QTensor / method / checkpoint / errors."""

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import jquant
from jquant import QuantSpec
from jquant.errors import NonFiniteError, ShapeError, SpecError
from jquant.quantizers import blockfloat as bf

MX = ("mxfp4", "mxfp8_e4m3", "mxfp8_e5m2")
ALL = MX + ("nvfp4",)


# ---------------------------------------------------------------------------------------
# float64 reference from the specs
# ---------------------------------------------------------------------------------------
def rne(y, man_bits, emin, fmax):
    """Round float64 ``y`` to the nearest value of a binary float format with ``man_bits``
    mantissa bits and smallest normal exponent ``emin`` (subnormals below), ties to even,
    saturating to ±``fmax``."""
    a = np.minimum(np.abs(y), fmax)
    _, ex = np.frexp(a)
    e = np.maximum(ex - 1, emin)
    q = np.ldexp(1.0, e - man_bits)
    return np.sign(y) * np.minimum(np.round(a / q) * q, fmax)


E2M1 = dict(man_bits=1, emin=0, fmax=6.0)
ELEM = {"mxfp4": (E2M1, 2), "mxfp8_e4m3": (dict(man_bits=3, emin=-6, fmax=448.0), 8),
        "mxfp8_e5m2": (dict(man_bits=2, emin=-14, fmax=57344.0), 15)}


def mx_reference(x, fmt):
    """OCP MX v1.0: shared_exp = floor(log2(amax)) − emax_elem (clamped to E8M0), elements
    RNE(x / 2^shared_exp), saturating; returns the dequantized float64 rows."""
    elem, emax = ELEM[fmt]
    R, K = x.shape
    xb = x.astype(np.float64).reshape(R, K // 32, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    _, ex = np.frexp(amax)
    se = np.clip(np.where(amax > 0, ex - 1 - emax, -127), -127, 127)
    scale = np.ldexp(1.0, se)
    return (rne(xb / scale, **elem) * scale).reshape(R, K)


def nvfp4_reference(x):
    """NVIDIA NVFP4: s = amax/(448·6) (stored float32), b = E4M3(amax_16/(6·s)), elements
    E2M1(x/(b·s)); returns the dequantized rows rounded to float32 once (as stored)."""
    R, K = x.shape
    s = float(np.float32(np.abs(x).max() / 2688.0))
    xb = x.astype(np.float64).reshape(R, K // 16, 16)
    b = rne(np.abs(xb).max(-1, keepdims=True) / (6 * s), man_bits=3, emin=-6, fmax=448.0)
    safe = np.where(b > 0, b, 1.0)
    v = np.where(b > 0, rne(xb / (safe * s), **E2M1), 0.0)
    return (v * b * s).astype(np.float32).reshape(R, K)


def gauss(R=12, K=512, seed=0, sd=0.05):
    return (np.random.default_rng(seed).standard_normal((R, K)) * sd).astype(np.float32)


def edge_rows(K=512, seed=0):
    """Random rows plus zeros, tiny values, an outlier, constants, half-integer ties, a zero block."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((10, K)).astype(np.float32)
    x[1] = 0
    x[2] *= np.float32(1e-19)
    x[3, 5] = 40.0
    x[4] = 0.3
    x[5, : K // 2] = -1.75
    x[6, 64:128] *= np.float32(1e-7)
    x[7] = np.round(rng.uniform(-127, 127, K) * 2) / 2  # x / 2^e lands on E2M1 midpoints
    x[7, 0] = 127
    x[8, 32:64] = 0
    x[9] = np.abs(x[9]) + 0.5
    return x


def _same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    nan = np.isnan(a)
    np.testing.assert_array_equal(nan, np.isnan(b))
    np.testing.assert_array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))


# ---------------------------------------------------------------------------------------
# gguf
# ---------------------------------------------------------------------------------------
def test_sizes_match_gguf():
    assert gguf.GGML_QUANT_SIZES[T.MXFP4] == (bf.ROW_BLOCK["mxfp4"], bf.TYPE_SIZE["mxfp4"])
    assert gguf.GGML_QUANT_SIZES[T.NVFP4] == (bf.ROW_BLOCK["nvfp4"], bf.TYPE_SIZE["nvfp4"])


@pytest.mark.parametrize("x", [edge_rows(), gauss(sd=0.02)], ids=["edge", "gauss"])
def test_mxfp4_bytes_and_values_equal_gguf(x):
    ours = np.asarray(bf.quantize_blocks(x, "mxfp4"))
    theirs = gguf.quants.quantize(x, T.MXFP4)
    np.testing.assert_array_equal(ours, theirs)
    _same_bits(bf.dequantize_blocks(ours, "mxfp4", x.shape[1]), gguf.quants.dequantize(theirs, T.MXFP4))


def test_mxfp4_near_midpoints_bytes_equal_gguf():
    # values within a few ulps of every E2M1 midpoint (both signs, many scales 2^e): where the
    # float32 errors |d·k − x| tie or nearly tie; column 0 (6·2^e) fixes each block's scale at 2^e
    rng = np.random.default_rng(9)
    mids = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    scale = np.float32(2.0) ** rng.integers(-20, 20, (64, 1)).astype(np.float32)
    v = mids[rng.integers(0, 7, (64, 31))] * scale
    v = (v.view(np.int32) + rng.integers(-3, 4, v.shape).astype(np.int32)).view(np.float32)
    v = v * np.where(rng.random(v.shape) < 0.5, -1, 1).astype(np.float32)
    x = np.concatenate([6 * scale, v], axis=1)
    ours = np.asarray(bf.quantize_blocks(x, "mxfp4"))
    np.testing.assert_array_equal(ours[:, 0], 127 + np.log2(scale[:, 0]).astype(int))
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, T.MXFP4))


def test_mxfp4_exponent_equals_float32_log2_at_power_of_two_boundaries():
    # every float32 up to 512 ulps below 2^k: where float32 log2 rounds up to k
    v = np.concatenate([(np.array([np.float32(2.0) ** k]).view(np.uint32) - np.arange(1, 513, dtype=np.uint32))
                        .view(np.float32) for k in range(-100, 128)])
    want = np.floor(np.log2(v)) - 2 + 127
    exact = np.floor(np.log2(v.astype(np.float64))) - 2 + 127
    assert np.sum(want != exact) > 1000  # the case exists and is exercised
    np.testing.assert_array_equal(np.asarray(bf.e8m0_gguf(jnp.asarray(v))), want)
    np.testing.assert_array_equal(np.floor(np.log2(v.astype(np.float64)).astype(np.float32)), np.floor(np.log2(v)))


def test_mxfp4_differs_from_ocp_where_documented():
    # amax 4 -> scale 2^0: ties at E2M1 midpoints go to the smaller magnitude (first codebook entry)
    x = np.zeros((1, 32), np.float32)
    x[0, :9] = [4.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75]
    ours = np.asarray(bf.quantize_blocks(x, "mxfp4"))
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, T.MXFP4))
    deq = np.asarray(bf.dequantize_blocks(ours, "mxfp4", 32))[0, :9]
    np.testing.assert_array_equal(deq, [4, 0, 0.5, 1, 1.5, 2, 3, 4, -0.5])
    np.testing.assert_array_equal(mx_reference(x, "mxfp4")[0, :9], [4, 0, 1, 1, 2, 2, 4, 4, -1])
    # amax just below 2^20: float32 log2 rounds to 20, so the scale is 2^18 (OCP: 2^17)
    y = np.full((1, 32), np.float32(0.5))
    y[0, 0] = np.nextafter(np.float32(2.0**20), np.float32(0))
    b = np.asarray(bf.quantize_blocks(y, "mxfp4"))
    np.testing.assert_array_equal(b, gguf.quants.quantize(y, T.MXFP4))
    assert b[0, 0] == 127 + 18
    assert np.asarray(bf.dequantize_blocks(b, "mxfp4", 32))[0, 0] == 2.0**20  # 4·2^18
    assert mx_reference(y, "mxfp4")[0, 0] == 6 * 2.0**17


def test_dequantize_arbitrary_bytes_equals_gguf():
    rng = np.random.default_rng(3)
    junk = rng.integers(0, 256, size=(4, bf.row_bytes("mxfp4", 256)), dtype=np.uint8)
    junk[:, ::17] = rng.integers(2, 255, size=junk[:, ::17].shape)  # exponent bytes 2..254 (see docstring)
    with np.errstate(all="ignore"):
        _same_bits(bf.dequantize_blocks(junk, "mxfp4", 256), gguf.quants.dequantize(junk, T.MXFP4))
    junk = rng.integers(0, 256, size=(4, bf.row_bytes("nvfp4", 256)), dtype=np.uint8)
    s = np.float32(0.0123)
    _same_bits(bf.dequantize_blocks(junk, "nvfp4", 256, s), gguf.quants.dequantize(junk, T.NVFP4) * s)
    e = np.zeros((1, 17), np.uint8)
    e[0, 0], e[0, 1] = 255, 0x21  # E8M0 255 is NaN (gguf-py: 2^128)
    assert np.all(np.isnan(np.asarray(bf.dequantize_blocks(e, "mxfp4", 32))))


def test_nvfp4_values_equal_gguf_dequantizer_and_scale_bytes_its_encoder_below_248():
    x = gauss(K=512, seed=4)
    data = np.asarray(bf.quantize_blocks(x, "nvfp4"))
    s = np.float32(np.abs(x).max() / np.float32(2688))
    assert np.asarray(bf.nvfp4_tensor_scale(x)) == s
    _same_bits(bf.dequantize_blocks(data, "nvfp4", 512, s), gguf.quants.dequantize(data, T.NVFP4) * s)
    # block scales: E4M3 of amax_16 / (6 s); gguf-py's encoder agrees below 248 (from there, where E4M3
    # rounds to 256 or more, it writes 448)
    b = np.abs(x).reshape(-1, 16).max(-1) / np.float32(s * np.float32(6))
    sb = data.reshape(-1, 36)[:, :4].reshape(-1)
    low = b < 248
    assert low.sum() > 100 and (~low).sum() > 0
    np.testing.assert_array_equal(sb[low], gguf.quants.NVFP4.fp32_to_ue4m3(b[low]))
    assert np.all(gguf.quants.NVFP4.fp32_to_ue4m3(b[~low]) == 0x7E) and not np.all(sb[~low] == 0x7E)


# ---------------------------------------------------------------------------------------
# the spec reference
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", MX)
def test_mx_dequantized_equals_spec_reference(fmt):
    x = np.concatenate([gauss(K=256, seed=1), gauss(R=2, K=256, seed=2, sd=3e-6), gauss(R=2, K=256, seed=5, sd=300)])
    x[0, :32] = 0  # an all-zero block
    deq = np.asarray(bf.dequantize_blocks(bf.quantize_blocks(x, fmt), fmt, 256))
    ref = mx_reference(x, fmt)
    np.testing.assert_array_equal(deq.astype(np.float64), ref)
    rel = np.linalg.norm(deq - x) / np.linalg.norm(x)
    assert rel < {"mxfp4": 0.12, "mxfp8_e4m3": 0.04, "mxfp8_e5m2": 0.08}[fmt], rel


def test_mxfp8_ties_round_to_even_and_saturate():
    # amax 300 -> shared_exp 0 for E4M3 (floor(log2 300) − 8): 300 > 256 stays, 449 would saturate
    x = np.zeros((1, 32), np.float32)
    # ties to the even mantissa: 8.5 -> 8, 9.5 -> 10, 12.5 -> 12, 13.5 -> 14; subnormal 1.5·2^-9 -> 2·2^-9
    x[0, :6] = [300.0, 8.5, 9.5, 12.5, 13.5, -0.0029296875]
    deq = np.asarray(bf.dequantize_blocks(bf.quantize_blocks(x, "mxfp8_e4m3"), "mxfp8_e4m3", 32))[0, :6]
    np.testing.assert_array_equal(deq, mx_reference(x, "mxfp8_e4m3")[0, :6])
    np.testing.assert_array_equal(deq, [288.0, 8.0, 10.0, 12.0, 14.0, -0.00390625])
    y = np.full((1, 32), np.float32(500.0))  # shared_exp 0: 500 > 448 saturates
    assert np.asarray(bf.dequantize_blocks(bf.quantize_blocks(y, "mxfp8_e4m3"), "mxfp8_e4m3", 32))[0, 0] == 448.0


def test_nvfp4_dequantized_equals_spec_reference():
    x = np.concatenate([gauss(K=512, seed=6), gauss(R=2, K=512, seed=7, sd=1e-4)])
    x[0, :16] = 0
    x[1, 16:32] = 0.3  # constant block, E2M1 exactly 6·b·s
    deq = np.asarray(bf.dequantize_blocks(bf.quantize_blocks(x, "nvfp4"), "nvfp4", 512, bf.nvfp4_tensor_scale(x)))
    np.testing.assert_array_equal(deq, nvfp4_reference(x))
    assert np.linalg.norm(deq[:12] - x[:12]) / np.linalg.norm(x[:12]) < 0.12


# ---------------------------------------------------------------------------------------
# QTensor, method, checkpoint, summary, jit, kernels, errors
# ---------------------------------------------------------------------------------------
def _tree(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray((rng.standard_normal(s) * 0.05).astype(np.float32))  # noqa: E731
    return {"a": {"kernel": f(512, 24)}, "b": {"kernel": f(576, 16)}, "c": {"kernel": f(256, 8)},
            "d": {"kernel": f(128, 8)}, "norm": {"scale": f(24)}}


def test_quantize_tree_save_restore_summary(tmp_path):
    tree = _tree()
    rules = [("a/kernel", QuantSpec(format="mxfp4", method="blockfloat")),
             ("b/kernel", QuantSpec(format="nvfp4", method="blockfloat")),
             ("c/kernel", QuantSpec(format="mxfp8_e4m3", method="blockfloat")),
             ("d/kernel", QuantSpec(format="mxfp8_e5m2", method="blockfloat"))]
    q = jquant.quantize_tree(tree, rules)
    a, b, c = q["a"]["kernel"], q["b"]["kernel"], q["c"]["kernel"]
    assert a.scale is None and a.zero is None and a.codes.dtype == jnp.uint8 and a.codes.shape == (16 * 17, 24)
    assert b.scale.shape == (1, 1) and b.scale.dtype == jnp.float32 and b.codes.shape == (9 * 36, 16)
    assert (a.group_size, b.group_size, a.axis, a.method) == (32, 16, 0, "blockfloat")
    w = np.asarray(tree["a"]["kernel"])
    np.testing.assert_array_equal(np.asarray(a.codes).T, gguf.quants.quantize(w.T, T.MXFP4))  # column n = row n
    _same_bits(a.dequantize(), gguf.quants.dequantize(np.asarray(a.codes).T, T.MXFP4).T)
    wb = np.asarray(tree["b"]["kernel"])
    np.testing.assert_array_equal(np.asarray(b.dequantize()), nvfp4_reference(wb.T).T)
    assert a.bits_per_weight == 4.25 and c.bits_per_weight == 8.25
    assert b.bits_per_weight == 4.5 + 32 / (576 * 16)
    by = {leaf.path: leaf for leaf in jquant.summary(q).leaves}
    assert by["a/kernel"].bits_per_weight == 4.25 and by["d/kernel"].bits_per_weight == 8.25
    assert by["b/kernel"].bits_per_weight == 4.5 + 32 / (576 * 16)
    jquant.save(tmp_path / "ck", q)
    r = jquant.restore(tmp_path / "ck")
    for k in ("a", "b", "c", "d"):
        qa, qb = q[k]["kernel"], r[k]["kernel"]
        assert qb.format == qa.format and qb.shape == qa.shape and (qb.scale is None) == (qa.scale is None)
        np.testing.assert_array_equal(np.asarray(qb.codes), np.asarray(qa.codes))
        _same_bits(qb.dequantize(), qa.dequantize())


@pytest.mark.parametrize("fmt", ALL)
def test_jit_and_no_jit_agree(fmt):
    x = edge_rows(K=128)[[0, 3, 7, 8]]
    want = np.asarray(bf.quantize_blocks(x, fmt))
    np.testing.assert_array_equal(np.asarray(jax.jit(lambda r: bf.quantize_blocks(r, fmt))(x)), want)
    s = bf.nvfp4_tensor_scale(x)
    with jax.disable_jit():
        got = np.asarray(bf.quantize_blocks(x, fmt))
        deq = np.asarray(bf.dequantize_blocks(got, fmt, 128, s if fmt == "nvfp4" else None))
    np.testing.assert_array_equal(got, want)
    _same_bits(deq, bf.dequantize_blocks(want, fmt, 128, s if fmt == "nvfp4" else None))
    qt = jquant.quantize(jnp.asarray(x.T), QuantSpec(format=fmt, method="blockfloat"))
    _same_bits(jax.jit(lambda t: t.dequantize())(qt), qt.dequantize())


def test_kernels_refuse_and_qmatmul_falls_back():
    from pallas_kernels import dispatch
    from pallas_kernels.layout import KernelUnsupported, kernel_weight

    qt = jquant.quantize(_tree()["b"]["kernel"], QuantSpec(format="nvfp4", method="blockfloat"))
    with pytest.raises(KernelUnsupported, match="nvfp4"):
        kernel_weight(qt)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 576)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(dispatch.qmatmul(x, qt)), np.asarray(x @ qt.dequantize()),
                               rtol=1e-5, atol=1e-5)


def test_errors():
    tree = _tree()
    with pytest.raises(ShapeError, match=r"b/kernel: mxfp4 .*blocks of 32.*length 560"):
        jquant.quantize(tree["b"]["kernel"][:560], QuantSpec(format="mxfp4", method="blockfloat"), path="b/kernel")
    with pytest.raises(ShapeError, match=r"x: nvfp4 .*blocks of 64.*length 96"):
        jquant.quantize(jnp.ones((96, 4)), QuantSpec(format="nvfp4", method="blockfloat"), path="x")
    with pytest.raises(ShapeError, match=r"x: mxfp8_e4m3 .*blocks of 32.*length 48"):
        jquant.quantize_tree({"x": jnp.ones((48, 4))}, [("x", QuantSpec(format="mxfp8_e4m3", method="blockfloat"))])
    with pytest.raises(ShapeError, match="x: .*2-D"):
        jquant.quantize(jnp.ones((2, 64, 4)), QuantSpec(format="mxfp4", method="blockfloat"), path="x")
    with pytest.raises(ShapeError, match="axis"):
        jquant.quantize(jnp.ones((64, 64)), QuantSpec(format="mxfp4", method="blockfloat", axis=1), path="x")
    bad = np.ones((64, 4), np.float32)
    bad[3, 1] = np.nan
    with pytest.raises(NonFiniteError, match="x: .*NaN"):
        jquant.quantize(jnp.asarray(bad), QuantSpec(format="nvfp4", method="blockfloat"), path="x")
    with pytest.raises(SpecError, match="rtn.*mxfp4"):
        QuantSpec(format="mxfp4")
    with pytest.raises(SpecError, match="blockfloat.*int"):
        QuantSpec(format="int", method="blockfloat")
    with pytest.raises(SpecError, match="options"):
        QuantSpec(format="mxfp4", method="blockfloat", options={"x": 1})
    with pytest.raises(ShapeError):
        bf.dequantize_blocks(np.zeros((2, 10), np.uint8), "mxfp4", 32)
    with pytest.raises(SpecError):
        bf.quantize_blocks(np.zeros((2, 32), np.float32), "mxfp6")


def test_recipes_load():
    from jquant import recipes

    for name, fmt in (("mxfp4", "mxfp4"), ("nvfp4", "nvfp4")):
        specs = [s for _, s in recipes.load_recipe(name).rules if s is not None]
        assert specs and all(s.format == fmt and s.method == "blockfloat" for s in specs)
