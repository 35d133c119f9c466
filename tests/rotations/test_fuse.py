"""Fusing rotations into weights leaves the float model's function unchanged (QuaRot/SpinQuant
invariance), for the Llama family (R1 with norm folding, R2) and Gemma 3 (R2; R1 refused)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant import calibrate
from jquant.errors import ShapeError, SpecError, UnsupportedModelError
from jquant.models import LlamaConfig, forward, init_model
from jquant.models.gemma import FULL, SLIDING, Gemma3Config
from jquant.rotations import fold_norms, fuse_rotations

TOKS = np.random.default_rng(0).integers(0, 96, size=(2, 40)).astype(np.int32)


def _orthogonal(n, seed):
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q * np.sign(np.diag(r))


def _model(family="llama", tie=True, kv_heads=2, bias=False):
    kw = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=kv_heads, tie_word_embeddings=tie)
    if family == "gemma3":
        cfg = Gemma3Config(**kw, head_dim=16, sliding_window=5, layer_types=(SLIDING, FULL, SLIDING))
    else:
        cfg = LlamaConfig(**kw, attention_bias=bias, attention_out_bias=bias, mlp_bias=bias)
    model = init_model(cfg, key=3)
    state = nnx.state(model)
    rng = np.random.default_rng(1)
    # norms far from 1 (and biases nonzero), so folding them matters
    new = {jq.path_str(kp): jnp.asarray(rng.normal(0.0 if family == "gemma3" else 1.0, 0.4, x.shape), x.dtype)
           for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]
           if jq.path_str(kp).endswith(("/scale", "/bias"))}
    nnx.update(model, calibrate._replace(state, new))
    return model


def _logits(model):
    gd, st = nnx.split(model)
    return np.asarray(forward(gd, st, jnp.asarray(TOKS))[0])


def _rel(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("kv_heads,bias", [(2, False), (4, True)], ids=["gqa", "mha-bias"])
def test_llama_r1_r2_invariance(tie, kv_heads, bias):
    model = _model(tie=tie, kv_heads=kv_heads, bias=bias)
    ref = _logits(model)
    r2 = np.stack([_orthogonal(16, 10 + i) for i in range(3)])
    rotated, notes = fuse_rotations(model, r1=_orthogonal(64, 0), r2=r2)
    assert _rel(_logits(rotated), ref) < 1e-4
    assert not rotated.config.tie_word_embeddings  # the final norm's weight is not all ones
    assert (len(notes) == 1 and "untied" in notes[0]) == tie
    # the weights really moved, and the norms now weigh by 1
    q0 = np.asarray(model.layers[0].self_attn.q_proj.kernel.get_value())
    q1 = np.asarray(rotated.layers[0].self_attn.q_proj.kernel.get_value())
    assert np.abs(q0 - q1).max() > 0.1
    for layer in rotated.layers:
        np.testing.assert_array_equal(np.asarray(layer.input_layernorm.scale.get_value()), 1.0)
    np.testing.assert_array_equal(np.asarray(rotated.norm.scale.get_value()), 1.0)


def test_fold_norms_alone_and_r2_alone_keep_the_function():
    model = _model(tie=False)
    ref = _logits(model)
    folded, notes = fold_norms(model)
    assert notes == [] and _rel(_logits(folded), ref) < 1e-5
    r2only, _ = fuse_rotations(model, r2=_orthogonal(16, 5))
    assert _rel(_logits(r2only), ref) < 1e-4
    np.testing.assert_array_equal(  # R2 alone touches only v_proj and o_proj
        np.asarray(r2only.layers[1].self_attn.q_proj.kernel.get_value()),
        np.asarray(model.layers[1].self_attn.q_proj.kernel.get_value()))


def test_a_wrong_fold_breaks_the_invariance():
    """The test above is not trivially true: a rotation fused without folding the norms
    changes the logits by far more than the tolerance."""
    model = _model(tie=False)
    ref = _logits(model)
    import jquant.rotations.fuse as fuse

    orig = fuse.fold_norms
    fuse.fold_norms = lambda m: (m, [])
    try:
        bad, _ = fuse_rotations(model, r1=_orthogonal(64, 0))
    finally:
        fuse.fold_norms = orig
    assert _rel(_logits(bad), ref) > 1e-2


def test_gemma3_r2_invariance_and_r1_refused():
    model = _model("gemma3", kv_heads=2)
    ref = _logits(model)
    rotated, _ = fuse_rotations(model, r2=_orthogonal(16, 7))
    assert _rel(_logits(rotated), ref) < 1e-4
    folded, notes = fold_norms(model)  # (1 + w) norms fold too; the tied embedding is untied
    assert _rel(_logits(folded), ref) < 1e-5 and "untied" in notes[0]
    np.testing.assert_array_equal(np.asarray(folded.layers[0].input_layernorm.scale.get_value()), 0.0)
    with pytest.raises(UnsupportedModelError, match="post-MLP RMSNorms"):
        fuse_rotations(model, r1=_orthogonal(64, 0))


def test_bad_rotations_are_refused():
    model = _model(tie=False)
    with pytest.raises(ShapeError, match=r"R1: shape \(32, 32\), expected \(64, 64\)"):
        fuse_rotations(model, r1=_orthogonal(32, 0))
    with pytest.raises(SpecError, match="R1: not orthogonal"):
        fuse_rotations(model, r1=2 * _orthogonal(64, 0))
    with pytest.raises(ShapeError, match="R2"):
        fuse_rotations(model, r2=np.stack([_orthogonal(16, 0)] * 2))
    q = jq.quantize_tree(nnx.state(model), [(r"q_proj/kernel$", jq.QuantSpec(bits=4, group_size=32))])
    qmodel = _model(tie=False)
    nnx.update(qmodel, q)
    with pytest.raises(SpecError, match=r"layers/0/self_attn/q_proj/kernel: is quantized"):
        fuse_rotations(qmodel, r1=_orthogonal(64, 0))


def test_online_hadamard_on_down_proj_keeps_the_function():
    """R4: down_proj's input rotated online (1536-wide in SmolLM2: 12·128; here 96 = 12·8)."""
    model = _model(tie=False)
    ref = _logits(model)
    rot, _ = fuse_rotations(model, online=("mlp/down_proj",))
    assert rot.layers[2].mlp.down_proj.input_transform == "hadamard"
    assert rot.layers[2].mlp.up_proj.input_transform is None
    assert _rel(_logits(rot), ref) < 1e-5
    with pytest.raises(SpecError, match="already rotated online"):
        fuse_rotations(rot, online=("mlp/down_proj",))
    with pytest.raises(SpecError, match="not a linear of the block"):
        fuse_rotations(model, online=("mlp/down",))


@pytest.mark.parametrize("kind", ["hadamard", "orthogonal"])
def test_rotate_whole_model(kind):
    """R1 + R2 + R4 from a RotationSpec: the function is unchanged; activation quantizers on the
    rotated model see the rotated inputs; a Hadamard rotation is exactly orthogonal."""
    from jquant.activations import ActQuantSpec, set_quantizers
    from jquant.rotations import RotationSpec, rotate, rotation_matrix

    model = _model(tie=True)
    ref = _logits(model)
    rot, notes = rotate(model, RotationSpec(kind=kind, seed=3))
    assert _rel(_logits(rot), ref) < 1e-4 and "untied" in notes[0]
    r = rotation_matrix(64, kind, jax.random.key(0))
    assert np.abs(r.T @ r - np.eye(64)).max() < 1e-12
    if kind == "hadamard":
        np.testing.assert_allclose(np.abs(r), 1 / 8, rtol=1e-15)
    a4, _ = set_quantizers(rot, [(r"_proj/kernel$", ActQuantSpec(bits=8))])
    assert a4.layers[0].mlp.down_proj.input_transform == "hadamard" and a4.layers[0].mlp.down_proj.input_quant.bits == 8
    assert _rel(_logits(a4), ref) < 0.05
    with pytest.raises(SpecError, match="rotation kind='givens'"):
        RotationSpec(kind="givens")
    with pytest.raises(SpecError, match=r"unknown rotation spec key\(s\) \[.r3.\]"):
        RotationSpec.from_dict({"r3": True})
