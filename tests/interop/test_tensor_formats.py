"""One linear in the GPTQ, AWQ and compressed-tensors layouts: jquant's tensors equal the
tools' own packing (their loops, transcribed in ``gptq_awq_reference``; compressed-tensors'
installed compressor), and read back into QTensors value for value."""

from __future__ import annotations

import numpy as np
import pytest
from gptq_awq_reference import awq_dequantize, awq_pack, gptq_dequantize, gptq_pack_rows, gptq_pack_zeros

import jquant as jq
from jquant.errors import FormatError
from jquant.interop import awq, compressed_tensors, gptq
from jquant.interop.base import Scheme, int_parts, int_qtensor

K, N = 256, 96


def _qtensor(bits, group_size=64, sym=False, act_order=False, seed=0, k=K, n=N):
    """An integer QTensor with random codes, scales, zeros (and a random act-order g_idx)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2 ** bits, (k, n))
    G = 1 if group_size == -1 else -(-k // group_size)
    scale = (rng.uniform(0.5, 2.0, (G, n)) * 2.0 ** -7).astype(np.float16)
    zero = np.full((G, n), 2 ** (bits - 1)) if sym else rng.integers(1, 2 ** bits, (G, n))
    g_idx = None
    if act_order:
        g_idx = rng.permutation(np.arange(k) // (k if group_size == -1 else group_size)).astype(np.int32)
    return int_qtensor(codes, scale, zero, g_idx, bits=bits, group_size=group_size, dtype=np.float32,
                       method="gptq", name="w"), codes, scale, zero, g_idx


@pytest.mark.parametrize("v1", [True, False], ids=["v1", "v2"])
@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_tensors_equal_autogptq_packing(bits, sym, v1):
    for act_order, gs in ((False, 64), (True, 64), (False, -1)):
        qt, codes, scale, zero, g_idx = _qtensor(bits, gs, sym, act_order)
        t = gptq.to_tensors(int_parts(qt, "w", fmt="gptq"), "w", "gptq" if v1 else "gptq_v2")
        gi = g_idx if g_idx is not None else np.arange(K) // (K if gs == -1 else gs)
        np.testing.assert_array_equal(t["qweight"], gptq_pack_rows(codes, bits))
        np.testing.assert_array_equal(t["qzeros"], gptq_pack_zeros(zero, bits, v1))
        np.testing.assert_array_equal(t["scales"], scale)
        np.testing.assert_array_equal(t["g_idx"], gi)
        assert t["qweight"].dtype == t["qzeros"].dtype == np.int32 and t["scales"].dtype == np.float16
        ref = gptq_dequantize(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, v1)
        np.testing.assert_array_equal(np.asarray(qt.dequantize()), ref.astype(np.float32))
        back = gptq.from_tensors(t, Scheme(bits, gs, sym, act_order), (K, N), name="w", dtype=np.float32,
                                 checkpoint_format="gptq" if v1 else "gptq_v2")
        np.testing.assert_array_equal(np.asarray(back.dequantize()), ref.astype(np.float32))
        assert back.grid.symmetric == sym and (back.g_idx is not None) == act_order


def test_gptq_kernel_layout_perm_is_exported_in_logical_order():
    qt, codes, scale, zero, g_idx = _qtensor(4, 64, False, True)
    kernel = jq.qtensor.act_order_to_perm(qt)
    assert kernel.perm is not None and kernel.g_idx is None
    t = gptq.to_tensors(int_parts(kernel, "w", fmt="gptq"), "w")
    np.testing.assert_array_equal(t["qweight"], gptq_pack_rows(codes, 4))
    np.testing.assert_array_equal(t["g_idx"], g_idx)


def test_gptq_v1_reads_zero_plus_one_and_refuses_what_it_cannot_hold():
    qt, *_ = _qtensor(4, 64, False)
    parts = int_parts(qt, "w", fmt="gptq")
    parts.zero[0, 3] = 0
    with pytest.raises(FormatError, match=r"w: zero point 0 \(group 0, column 3\).*gptq_v2"):
        gptq.to_tensors(parts, "w", "gptq")
    t = gptq.to_tensors(parts, "w", "gptq_v2")  # v2 holds it
    back = gptq.from_tensors(t, Scheme(4, 64, False, False), (K, N), name="w", dtype=np.float32,
                             checkpoint_format="gptq_v2")
    assert int(np.asarray(back.zero)[0, 3]) == 0
    # A v1 file whose stored zero is 15 means 16 to every v1 reader: read as such.
    t = gptq.to_tensors(int_parts(qt, "w", fmt="gptq"), "w", "gptq_v2")  # stored zeros, read as v1 (+1)
    back = gptq.from_tensors(t, Scheme(4, 64, False, False), (K, N), name="w", dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(back.zero, np.int32), int_parts(qt, "w", fmt="gptq").zero + 1)


def test_gptq_bad_tensors_are_named():
    qt, *_ = _qtensor(4, 64)
    t = gptq.to_tensors(int_parts(qt, "w", fmt="gptq"), "w")
    with pytest.raises(FormatError, match=r"L\.qweight: int32 \(32, 96\), but 3-bit"):
        gptq.from_tensors(t, Scheme(3, 64, False, False), (K, N), name="L", dtype=np.float32)
    with pytest.raises(FormatError, match=r"L\.qzeros: int32 \(4, 12\), but 4-bit group size 128"):
        gptq.from_tensors(t, Scheme(4, 128, False, False), (K, N), name="L", dtype=np.float32)
    no_gidx = {k: v for k, v in t.items() if k != "g_idx"}
    with pytest.raises(FormatError, match=r"L\.g_idx: missing, but desc_act"):
        gptq.from_tensors(no_gidx, Scheme(4, 64, False, True), (K, N), name="L", dtype=np.float32)
    shuffled = dict(t, g_idx=np.random.default_rng(0).permutation(t["g_idx"]))
    with pytest.raises(FormatError, match=r"L\.g_idx: not the contiguous groups.*desc_act is false"):
        gptq.from_tensors(shuffled, Scheme(4, 64, False, False), (K, N), name="L", dtype=np.float32)
    bad = dict(t, g_idx=np.full(K, 9, np.int32))
    with pytest.raises(FormatError, match=r"g_idx holds groups in \[9, 9\]; valid: \[0, 4\)"):
        gptq.from_tensors(bad, Scheme(4, 64, False, True), (K, N), name="L", dtype=np.float32)
    with pytest.raises(FormatError, match="5-bit weights; the GPTQ format holds 2, 3, 4, 8"):
        gptq.to_tensors(int_parts(_qtensor(5, 64)[0], "w", fmt="gptq"), "w")
    with pytest.raises(FormatError, match=r"shape \(in, out\) = \(256, 40\).*multiples of 32"):
        gptq.to_tensors(int_parts(_qtensor(3, 64, n=40)[0], "w", fmt="gptq"), "w")


def test_int_parts_refuses_what_no_integer_format_holds():
    w = np.random.default_rng(0).normal(size=(128, 64)).astype(np.float32)
    with pytest.raises(FormatError, match=r"L \(QTensor\(nf4.*has format 'nf4'"):
        int_parts(jq.quantize(w, jq.QuantSpec(format="nf4", group_size=64)), "L", fmt="gptq")
    with pytest.raises(FormatError, match="zero_type='float'"):
        int_parts(jq.quantize(w, jq.QuantSpec(bits=4, group_size=32, symmetric=False, zero_type="float")), "L",
                  fmt="awq")
    with pytest.raises(FormatError, match="L: is a float array"):
        int_parts(w, "L", fmt="gptq")


def test_rtn_qtensor_exports_as_its_values():
    """A real RTN result (not synthetic parts) survives every format's round trip."""
    w = np.random.default_rng(1).normal(size=(K, N)).astype(np.float32)
    for spec, fmts in ((jq.QuantSpec(bits=4, group_size=64, symmetric=False), ("gptq", "awq", "ct")),
                       (jq.QuantSpec(bits=8, granularity="channel"), ("gptq", "ct")),
                       (jq.QuantSpec(bits=4, granularity="tensor"), ("gptq", "ct"))):
        qt = jq.quantize(w, spec)
        want = np.asarray(qt.dequantize())
        for fmt in fmts:
            parts = int_parts(qt, "w", fmt=fmt)
            s = parts.scheme
            if fmt == "gptq":
                back = gptq.from_tensors(gptq.to_tensors(parts, "w"), s, (K, N), name="w", dtype=np.float32)
            elif fmt == "awq":
                back = awq.from_tensors(awq.to_tensors(parts, "w"), s, (K, N), name="w", dtype=np.float32)
            else:
                back = compressed_tensors.from_tensors(compressed_tensors.to_tensors(parts, "w"), s, (K, N),
                                                       name="w", dtype=np.float32)
            np.testing.assert_array_equal(np.asarray(back.dequantize()), want, err_msg=f"{spec} {fmt}")


def test_awq_tensors_equal_autoawq_packing():
    for sym, gs in ((False, 64), (True, 128), (False, -1)):
        qt, codes, scale, zero, _ = _qtensor(4, gs, sym)
        t = awq.to_tensors(int_parts(qt, "w", fmt="awq"), "w")
        np.testing.assert_array_equal(t["qweight"], awq_pack(codes))
        np.testing.assert_array_equal(t["qzeros"], awq_pack(zero))
        np.testing.assert_array_equal(t["scales"], scale)
        ref = awq_dequantize(t["qweight"], t["qzeros"], t["scales"], K if gs == -1 else gs)
        np.testing.assert_array_equal(np.asarray(qt.dequantize()), ref.astype(np.float32))
        back = awq.from_tensors(t, Scheme(4, gs, sym, False), (K, N), name="w", dtype=np.float32)
        np.testing.assert_array_equal(np.asarray(back.dequantize()), ref.astype(np.float32))


def test_awq_refuses_what_it_cannot_hold():
    with pytest.raises(FormatError, match="3-bit weights; the AWQ GEMM format holds 4-bit weights only"):
        awq.to_tensors(int_parts(_qtensor(3, 64)[0], "w", fmt="awq"), "w")
    with pytest.raises(FormatError, match="act-order"):
        awq.to_tensors(int_parts(_qtensor(4, 64, act_order=True)[0], "w", fmt="awq"), "w")
    with pytest.raises(FormatError, match="not a multiple of the group size 96"):
        awq.to_tensors(int_parts(_qtensor(4, 96)[0], "w", fmt="awq"), "w")


# ---------------------------------------------------------------------------------------
# compressed-tensors: its own compressor, not a transcription
# ---------------------------------------------------------------------------------------
ct = pytest.importorskip("compressed_tensors")
torch = pytest.importorskip("torch")


def _ct_scheme(bits, gs, sym):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="channel" if gs == -1 else "group",
                            group_size=None if gs == -1 else gs)
    return QuantizationScheme(targets=["Linear"], weights=args)


@pytest.mark.parametrize("bits,gs,sym", [(4, 64, True), (4, 64, False), (3, 32, False), (8, -1, True),
                                         (2, 128, False), (5, 64, True)])
def test_compressed_tensors_decompressor_reads_our_tensors_and_we_read_its(bits, gs, sym):
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor

    qt, codes, scale, zero, _ = _qtensor(bits, gs, sym, k=256, n=80)
    t = compressed_tensors.to_tensors(int_parts(qt, "w", fmt="ct"), "w")
    sd = {k: torch.from_numpy(np.array(v)) for k, v in t.items()}
    out = PackedQuantizationCompressor.decompress(sd, _ct_scheme(bits, gs, sym))
    # theirs computes in the scale dtype (float16): ours, cast to float16, is the same bits
    ours = np.asarray(qt.dequantize(np.float16))
    np.testing.assert_array_equal(out["weight"].numpy(), ours.T)
    # their compressor, from the float weight, our scales and their signed zero points
    w = torch.from_numpy(ours.T.astype(np.float32))
    state = {"weight": w, "weight_scale": torch.from_numpy(scale.T.astype(np.float32))}
    if not sym:
        state["weight_zero_point"] = torch.from_numpy((zero.T - 2 ** (bits - 1)).astype(np.int8))
    packed = PackedQuantizationCompressor.compress(state, _ct_scheme(bits, gs, sym))
    np.testing.assert_array_equal(packed["weight_packed"].numpy(), t["weight_packed"])
    if not sym:
        np.testing.assert_array_equal(packed["weight_zero_point"].numpy(), t["weight_zero_point"])
    theirs = {k: v.numpy() for k, v in packed.items()}
    theirs["weight_scale"] = scale.T.copy()
    back = compressed_tensors.from_tensors(theirs, Scheme(bits, gs, sym, False), (256, 80), name="w",
                                           dtype=np.float32)
    np.testing.assert_array_equal(np.asarray(back.dequantize()), np.asarray(qt.dequantize()))


def test_compressed_tensors_config_parses_with_the_library():
    from compressed_tensors.quantization import QuantizationConfig

    schemes = {"model.layers.0.mlp.down_proj": Scheme(8, -1, True, False),
               "model.layers.0.self_attn.q_proj": Scheme(4, 64, False, False),
               "model.layers.0.self_attn.k_proj": Scheme(4, 64, False, False)}
    cfg = compressed_tensors.quantization_config(schemes, ["lm_head"], {m: "float16" for m in schemes}, "0.20.0")
    parsed = QuantizationConfig.model_validate(cfg)
    assert parsed.format == "pack-quantized" and len(parsed.config_groups) == 2
    scheme_of = compressed_tensors.parse_config(cfg, "cfg")
    for m, s in schemes.items():
        assert scheme_of(m) == s
    assert scheme_of("lm_head") is None
    with pytest.raises(FormatError, match=r"config_groups\.g: format 'float-quantized'"):
        compressed_tensors.parse_config({"config_groups": {"g": {"targets": ["Linear"], "weights": {}}},
                                         "format": "float-quantized"}, "cfg")
