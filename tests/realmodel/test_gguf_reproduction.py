"""Real-data check of the RTN quantizers on the default model's own quantization.

SmolLM2-135M-Instruct's linear weights are stored as GGUF Q4_1 (blocks of 32 inputs,
x = d·q + m with float16 d and m) and its embedding as Q8_0 (x = d·q, q ∈ [−127, 127]).
The dequantized weights therefore lie exactly on those grids, and RTN with the matching
spec must give back the very same codes, scales and minima: asymmetric 4-bit, group 32,
float minimum in float16 for Q4_1; symmetric restricted 8-bit, group 32 for Q8_0. The
integer zero-point variant cannot: its grid holds 0 exactly, Q4_1's generally does not.
"""

import numpy as np
import pytest

import jquant as jq

pytestmark = pytest.mark.realmodel

Q4_1 = jq.QuantSpec(bits=4, group_size=32, symmetric=False, zero_type="float", scale_dtype="float16")
INT_ZERO = jq.QuantSpec(bits=4, group_size=32, symmetric=False, zero_type="int", scale_dtype="float16")
LINEARS = {"attn_q": "self_attn/q_proj", "attn_k": "self_attn/k_proj", "attn_v": "self_attn/v_proj",
           "attn_output": "self_attn/o_proj", "ffn_gate": "mlp/gate_proj", "ffn_up": "mlp/up_proj",
           "ffn_down": "mlp/down_proj"}
LAYERS = (0, 13, 29)


@pytest.fixture(scope="module")
def gguf_model():
    from jquant.models import default_model_path, load_gguf

    path = default_model_path()
    model, config, _ = load_gguf(path)
    return path, model


def _kernel(model, layer, sub):
    attn_or_mlp, proj = sub.split("/")
    return np.asarray(getattr(getattr(model.layers[layer], attn_or_mlp), proj).kernel[...])


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("gguf_name", sorted(LINEARS))
def test_rtn_float_minimum_reproduces_q4_1(gguf_model, layer, gguf_name):
    from jquant.models import gguf_q4_1_blocks

    path, model = gguf_model
    w = _kernel(model, layer, LINEARS[gguf_name])
    d, m, codes = gguf_q4_1_blocks(path, f"blk.{layer}.{gguf_name}.weight")
    qt = jq.quantize(w, Q4_1)
    np.testing.assert_array_equal(np.asarray(qt.unpacked_codes()), codes)
    np.testing.assert_array_equal(np.asarray(qt.scale), d)
    np.testing.assert_array_equal(np.asarray(qt.zero), m)
    # Bit-identical dequantization, and equal to the GGUF formula computed in float32.
    deq = np.asarray(qt.dequantize())
    np.testing.assert_array_equal(deq, w)
    ref = np.repeat(d.astype(np.float32), 32, 0) * codes + np.repeat(m.astype(np.float32), 32, 0)
    np.testing.assert_array_equal(deq, ref)


@pytest.mark.parametrize("layer", LAYERS)
def test_integer_zero_point_does_not_reproduce_q4_1(gguf_model, layer):
    _, model = gguf_model
    w = _kernel(model, layer, "mlp/down_proj")
    deq = np.asarray(jq.quantize(w, INT_ZERO).dequantize())
    blocks_differ = np.any((deq != w).reshape(-1, 32, w.shape[1]), axis=1)
    # The int grid holds 0 exactly; Q4_1's minimum is (almost) never a multiple of its step.
    assert blocks_differ.mean() > 0.9
    assert np.abs(deq - w).max() > 0


def test_rtn_symmetric_int8_reproduces_q8_0_embedding(gguf_model):
    from jquant.models import read_gguf_tensor

    path, model = gguf_model
    emb = np.asarray(model.embed_tokens.embedding[...])  # (vocab, hidden); Q8_0 blocks run along hidden
    raw, ttype, shape = read_gguf_tensor(path, "token_embd.weight")
    assert ttype.name == "Q8_0" and shape == emb.shape
    blocks = raw.reshape(shape[0], shape[1] // 32, 34)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16)[..., 0]
    q = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(shape)
    qt = jq.quantize(emb, jq.QuantSpec(bits=8, group_size=32, symmetric=True, axis=1))
    np.testing.assert_array_equal(np.asarray(qt.scale), d)
    np.testing.assert_array_equal(np.asarray(qt.unpacked_codes()).astype(np.int16) - 128, q)
    np.testing.assert_array_equal(np.asarray(qt.dequantize()), emb)
