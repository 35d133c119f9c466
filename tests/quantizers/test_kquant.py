"""GGUF block quantization (jquant.quantizers.kquant): bytes against gguf-py's quantizers
(Q4_0..Q8_0) and an independent float32 NumPy port of llama.cpp's C reference
(``ggml_reference.py``: the k-quants and every importance-weighted path), dequantization
against gguf-py bit for bit, the QTensor / method / checkpoint integration, and the errors."""

import os
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

import jquant
from jquant import QuantSpec
from jquant.errors import ShapeError, SpecError
from jquant.quantizers import kquant as kq

sys.path.insert(0, os.path.dirname(__file__))
import ggml_reference as ref  # noqa: E402

CLASSIC = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")
KQUANTS = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k")
ALL = CLASSIC + KQUANTS


def rows(K=512, seed=0):
    """Random rows plus the edge cases: zeros, denormal-range and tiny values, one outlier,
    all-equal values, half-integer ties, a block of zeros inside a row."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((10, K)).astype(np.float32)
    x[1] = 0
    x[2] *= np.float32(1e-19)
    x[3, 5] = 40.0
    x[4] = 0.3
    x[5, : K // 2] = -1.75
    x[6, 64:128] *= np.float32(1e-7)
    x[7] = np.round(rng.uniform(-127, 127, K) * 2) / 2
    x[7, 0] = 127
    x[8, 32:64] = 0
    x[9] = np.abs(x[9]) + 0.5  # all positive: the minimum clamps to 0
    return x


def importance(K=512, seed=1):
    return np.exp(np.random.default_rng(seed).standard_normal(K) * 1.5).astype(np.float32)


@pytest.fixture(scope="module")
def x():
    return rows()


def test_sizes_match_gguf():
    for t in ALL:
        assert gguf.GGML_QUANT_SIZES[T[t.upper()]] == (kq.BLOCK[t], kq.TYPE_SIZE[t])


@pytest.mark.parametrize("qtype", CLASSIC)
def test_classic_bytes_equal_gguf_quantizer(x, qtype):
    ours = np.asarray(kq.quantize_blocks(x, qtype))
    np.testing.assert_array_equal(ours, gguf.quants.quantize(x, T[qtype.upper()]))


@pytest.mark.parametrize("qtype", KQUANTS)
def test_kquant_bytes_equal_c_reference_port(x, qtype):
    ours = np.asarray(kq.quantize_blocks(x, qtype))
    np.testing.assert_array_equal(ours, ref.quantize(x, qtype))


@pytest.mark.parametrize("qtype", ("q4_0", "q4_1", "q5_0", "q5_1") + KQUANTS)
def test_imatrix_bytes_equal_c_reference_port(x, qtype):
    imp = importance()
    ours = np.asarray(kq.quantize_blocks(x, qtype, imp))
    np.testing.assert_array_equal(ours, ref.quantize(x, qtype, imp))
    assert not np.array_equal(ours, np.asarray(kq.quantize_blocks(x, qtype)))  # the weights are used


def test_q8_0_ignores_importance_like_llama_cpp(x):
    np.testing.assert_array_equal(np.asarray(kq.quantize_blocks(x, "q8_0", importance())),
                                  np.asarray(kq.quantize_blocks(x, "q8_0")))


def _same_bits(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert a.shape == b.shape
    nan = np.isnan(a)
    np.testing.assert_array_equal(nan, np.isnan(b))
    np.testing.assert_array_equal(a[~nan].view(np.uint32), b[~nan].view(np.uint32))


@pytest.mark.parametrize("qtype", ALL)
def test_dequantize_equals_gguf_bit_for_bit(x, qtype):
    K = x.shape[1]
    data = np.asarray(kq.quantize_blocks(x, qtype))
    deq = kq.dequantize_blocks(data, qtype, K)
    _same_bits(deq, gguf.quants.dequantize(data, T[qtype.upper()]))
    rel = np.linalg.norm(np.asarray(deq)[0] - x[0]) / np.linalg.norm(x[0])
    assert rel < {2: 0.45, 3: 0.25, 4: 0.13, 5: 0.07, 6: 0.04, 8: 0.01}[jquant.formats.FIXED_BITS[qtype]]
    # arbitrary bytes too (every code and scale pattern; f16 fields may be Inf/NaN)
    junk = np.random.default_rng(3).integers(0, 256, size=(3, kq.row_bytes(qtype, K)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        theirs = gguf.quants.dequantize(junk, T[qtype.upper()])
    _same_bits(kq.dequantize_blocks(junk, qtype, K), theirs)


@pytest.mark.parametrize("qtype,imatrix", [("q4_0", True), ("q6_k", False)])
def test_without_jit_same_bytes(qtype, imatrix):
    x = rows(K=256)[[0, 3]]
    imp = importance(K=256) if imatrix else None
    want = np.asarray(kq.quantize_blocks(x, qtype, imp))
    with jax.disable_jit():
        got = np.asarray(kq.quantize_blocks(x, qtype, imp))
        deq = np.asarray(kq.dequantize_blocks(got, qtype, 256))
    np.testing.assert_array_equal(got, want)
    _same_bits(deq, kq.dequantize_blocks(want, qtype, 256))


@pytest.mark.parametrize("qtype", ("q4_0", "q4_k", "q6_k"))
def test_imatrix_lowers_the_weighted_error(qtype):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    w = importance(K=256, seed=6) ** 2  # strongly uneven channels
    err = {}
    for name, imp in (("plain", None), ("imatrix", w)):
        deq = np.asarray(kq.dequantize_blocks(kq.quantize_blocks(x, qtype, imp), qtype, 256))
        err[name] = float(np.sum(w * (x - deq) ** 2))
    assert err["imatrix"] < err["plain"], err


# ---------------------------------------------------------------------------------------
# QTensor, method, checkpoint, summary, kernels
# ---------------------------------------------------------------------------------------
def _tree(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32))  # noqa: E731
    return {"a": {"kernel": f(512, 24)}, "b": {"kernel": f(576, 16)}, "c": {"kernel": f(256, 8)},
            "norm": {"scale": f(24)}}


def test_quantize_tree_fallback_save_restore_summary(tmp_path):
    tree = _tree()
    rules = [("a/kernel", QuantSpec(format="q4_k", method="kquant", options={"fallback": True})),
             ("b/kernel", QuantSpec(format="q6_k", method="kquant", options={"fallback": True})),
             ("c/kernel", QuantSpec(format="q8_0", method="kquant"))]
    q = jquant.quantize_tree(tree, rules)
    a, b, c = q["a"]["kernel"], q["b"]["kernel"], q["c"]["kernel"]
    assert (a.format, b.format, c.format) == ("q4_k", "q8_0", "q8_0")  # 576 % 256 != 0: Q6_K -> Q8_0
    assert a.scale is None and a.zero is None and a.codes.dtype == jnp.uint8
    assert a.codes.shape == (512 // 256 * 144, 24) and a.group_size == 256 and a.axis == 0
    # column n of codes holds GGUF row n (the (out, in) weight's row)
    w = np.asarray(tree["a"]["kernel"])
    np.testing.assert_array_equal(np.asarray(a.codes).T, np.asarray(kq.quantize_blocks(w.T, "q4_k")))
    _same_bits(a.dequantize(), gguf.quants.dequantize(np.asarray(a.codes).T, T.Q4_K).T)
    assert a.bits_per_weight == 4.5 and b.bits_per_weight == 8.5 and c.bits_per_weight == 8.5
    s = jquant.summary(q)
    by = {leaf.path: leaf for leaf in s.leaves}
    assert by["a/kernel"].bits_per_weight == 4.5 and by["b/kernel"].bits_per_weight == 8.5
    q6 = jquant.quantize_tree({"k": tree["c"]["kernel"]}, [("k", QuantSpec(format="q6_k", method="kquant"))])
    assert jquant.summary(q6).quantized_bits_per_weight == 6.5625
    jquant.save(tmp_path / "ck", q)
    r = jquant.restore(tmp_path / "ck")
    for k in ("a", "b", "c"):
        qa, qb = q[k]["kernel"], r[k]["kernel"]
        assert qb.scale is None and qb.format == qa.format and qb.shape == qa.shape
        np.testing.assert_array_equal(np.asarray(qb.codes), np.asarray(qa.codes))
        _same_bits(qb.dequantize(), qa.dequantize())


def test_jit_of_dequantize_and_kernels_fall_back():
    from pallas_kernels import dispatch
    from pallas_kernels.layout import KernelUnsupported, kernel_weight

    w = _tree()["a"]["kernel"]
    qt = jquant.quantize(w, QuantSpec(format="q5_k", method="kquant"))
    _same_bits(jax.jit(lambda t: t.dequantize())(qt), qt.dequantize())
    with pytest.raises(KernelUnsupported, match="q5_k"):
        kernel_weight(qt)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 512)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(dispatch.qmatmul(x, qt)), np.asarray(x @ qt.dequantize()),
                               rtol=1e-5, atol=1e-4)


def test_imatrix_method_uses_act_sq_mean():
    w = _tree()["c"]["kernel"]
    spec = QuantSpec(format="q4_k", method="kquant", options={"imatrix": True})
    assert jquant.quantizers.needs_data(spec)
    assert not jquant.quantizers.needs_data(QuantSpec(format="q4_k", method="kquant"))
    with pytest.raises(SpecError, match="act_sq_mean"):
        jquant.quantize_tree({"k": w}, [("k", spec)])
    imp = importance(K=256)
    q = jquant.quantize_tree({"k": w}, [("k", spec)], stats={"k": {"act_sq_mean": imp}})["k"]
    np.testing.assert_array_equal(np.asarray(q.codes).T, ref.quantize(np.asarray(w).T, "q4_k", imp))


def test_errors_name_path_length_block_and_fallback():
    tree = _tree()
    with pytest.raises(ShapeError, match=r"b/kernel.*576.*256.*Q5_0.*fallback"):
        jquant.quantize_tree(tree, [("b/kernel", QuantSpec(format="q4_k", method="kquant"))])
    for fmt, fb in (("q2_k", "Q4_0"), ("q3_k", "Q4_0"), ("q5_k", "Q5_1"), ("q6_k", "Q8_0")):
        with pytest.raises(ShapeError, match=fb):
            jquant.quantize(tree["b"]["kernel"], QuantSpec(format=fmt, method="kquant"), path="b/kernel")
    w48 = jnp.ones((48, 4), jnp.float32)
    with pytest.raises(ShapeError, match=r"x: .*48.*F16"):  # Q8_0 needs a multiple of 32 too
        jquant.quantize(w48, QuantSpec(format="q6_k", method="kquant", options={"fallback": True}), path="x")
    with pytest.raises(ShapeError, match="no fallback"):
        jquant.quantize(w48, QuantSpec(format="q4_0", method="kquant", options={"fallback": True}), path="x")
    with pytest.raises(ShapeError, match="2-D"):
        jquant.quantize(jnp.ones((2, 256, 4)), QuantSpec(format="q4_k", method="kquant"), path="x")
    with pytest.raises(ShapeError, match="axis"):
        jquant.quantize(jnp.ones((256, 256)), QuantSpec(format="q4_k", method="kquant", axis=1), path="x")
    with pytest.raises(SpecError, match="rtn.*q4_k"):
        QuantSpec(format="q4_k")  # rtn does not make GGML blocks
    with pytest.raises(SpecError, match="kquant.*int"):
        QuantSpec(format="int", method="kquant")
    with pytest.raises(SpecError, match="imatrix"):
        QuantSpec(format="q4_k", method="kquant", options={"imatrix": 1})
    with pytest.raises(ShapeError, match="importance"):
        kq.quantize_blocks(np.zeros((2, 256), np.float32), "q4_k", np.ones(128, np.float32))
    with pytest.raises(ShapeError):
        kq.dequantize_blocks(np.zeros((2, 100), np.uint8), "q4_k", 256)
