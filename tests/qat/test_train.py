"""The QAT loop on a tiny Llama: it lowers the distillation loss, converts to QTensors holding
exactly the trained forward, resumes after a kill with the same loss curve, runs data-parallel
on 8 forced CPU devices with the single-device step's numbers, stops clearly on a NaN."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant.errors import CheckpointError, DataError, NonFiniteError, SpecError
from jquant.models import LlamaConfig, init_model
from jquant.qat import QATConfig, lsq_fake_quant, train

CFG = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
W2 = [(r"layers/.*/kernel", jq.QuantSpec(bits=2, group_size=32, symmetric=False))]


def _model():
    """A tiny model with O(1) logits (kernels ~ N(0, 1/in), embeddings ~ N(0, 1)), so the
    float model's predictions are far from uniform and 2-bit weights change them."""
    model = init_model(CFG, key=0)
    gd, st = nnx.split(model)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(st)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    out = []
    for (kp, v), k in zip(leaves, keys):
        name = jq.path_str(kp)
        if name.endswith("kernel"):
            v = jax.random.normal(k, v.shape) / np.sqrt(v.shape[0])
        elif name.endswith("embedding"):
            v = jax.random.normal(k, v.shape)
        out.append(v)
    return nnx.merge(gd, jax.tree_util.tree_unflatten(treedef, out))


def _tokens(n=16, seq=24, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, (n, seq)).astype(np.int32)


FAST = dict(steps=8, learning_rate=1e-3, scale_learning_rate=1e-2, batch_size=4, checkpoint_every=2)


def test_qat_lowers_the_distillation_loss_and_converts_exactly():
    model = _model()
    res = train(model, _tokens(), W2, QATConfig(**FAST))
    assert len(res.losses) == 8 and np.mean(res.losses[-2:]) < 0.75 * res.losses[0], res.losses
    assert res.tokens_per_second > 0
    # every quantized kernel is a QTensor, and the QTensor model is the trained fake-quant model
    qt = res.state["layers"][0]["mlp"]["down_proj"]["kernel"].get_value()
    assert jq.is_qtensor(qt) and qt.bits == 2 and qt.method == "qat"
    gd, _ = nnx.split(model)
    q_logits = nnx.merge(gd, res.state)(jnp.asarray(_tokens(2)))[0]
    deq = jax.tree.map(lambda x: jq.dequantize(x), res.state, is_leaf=jq.is_qtensor)
    f_logits = nnx.merge(gd, deq)(jnp.asarray(_tokens(2)))[0]
    np.testing.assert_allclose(np.asarray(q_logits), np.asarray(f_logits), atol=1e-5)


def test_scales_only_training_keeps_the_weights():
    model = _model()
    res = train(model, _tokens(), W2, QATConfig(**{**FAST, "train": "scales"}))
    assert res.losses[-1] < res.losses[0]
    emb = res.state["embed_tokens"]["embedding"].get_value()
    np.testing.assert_array_equal(np.asarray(emb), np.asarray(model.embed_tokens.embedding.get_value()))


def test_resume_after_a_kill_continues_the_same_loss_curve(tmp_path):
    full = train(_model(), _tokens(), W2, QATConfig(**FAST), work_dir=str(tmp_path / "a"))

    class Kill(Exception):
        pass

    def kill_at_5(i, loss):
        if i == 4:
            raise Kill

    with pytest.raises(Kill):
        train(_model(), _tokens(), W2, QATConfig(**FAST), work_dir=str(tmp_path / "b"), on_step=kill_at_5)
    resumed = train(_model(), _tokens(), W2, QATConfig(**FAST), work_dir=str(tmp_path / "b"))
    assert resumed.losses == full.losses  # steps 0-3 read back, 4-7 recomputed from the step-4 checkpoint
    for a, b in zip(jax.tree_util.tree_leaves(jq.dequantize_tree(full.state)),
                    jax.tree_util.tree_leaves(jq.dequantize_tree(resumed.state))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CheckpointError, match="another run"):
        train(_model(), _tokens(seed=1), W2, QATConfig(**FAST), work_dir=str(tmp_path / "b"))


def test_a_nan_loss_stops_with_the_checkpoint_named(tmp_path):
    cfg = QATConfig(**{**FAST, "learning_rate": 1e12, "scale_learning_rate": 1e12, "clip_norm": None,
                       "objective": "ce", "checkpoint_every": 1})
    with pytest.raises(NonFiniteError, match=r"QAT step \d+: the loss is nan.*last good checkpoint \(step \d+\)"):
        train(_model(), _tokens(), W2, cfg, work_dir=str(tmp_path))
    assert os.path.exists(tmp_path / "qat_progress.json")


def test_bad_settings_and_data_are_refused():
    with pytest.raises(SpecError, match="steps=0"):
        QATConfig(steps=0)
    with pytest.raises(SpecError, match="train='weights'"):
        QATConfig(train="weights")
    with pytest.raises(DataError, match="2 training window"):
        train(_model(), _tokens(n=2), W2, QATConfig(**FAST))
    with pytest.raises(SpecError, match="no rule quantizes"):
        train(_model(), _tokens(), [(r"nothing", jq.QuantSpec())], QATConfig(**FAST))
    # a start whose groups are not contiguous (GPTQ act-order without static groups): named by its path
    model = _model()
    w = model.layers[0].mlp.down_proj.kernel.get_value()
    gptq = jq.QuantSpec(bits=2, group_size=32, symmetric=False, method="gptq", options={"act_order": True})
    H = jnp.eye(w.shape[0]) + 0.1
    qt, _ = jq.quantizers.quantize_weight(w, gptq, {"hessian": H})
    assert qt.g_idx is not None
    with pytest.raises(SpecError, match=r"layers/0/mlp/down_proj/kernel: init_params: .*static_groups: true"):
        train(model, _tokens(), W2, QATConfig(**FAST), init={"layers/0/mlp/down_proj/kernel": qt})


DP_SCRIPT = r"""
import sys
sys.path.insert(0, "tests/qat")
import jax, numpy as np
from test_train import W2, _model, _tokens
from jquant.qat import QATConfig, train
assert jax.device_count() == 8
res = train(_model(), _tokens(), W2, QATConfig(steps=3, learning_rate=1e-3, scale_learning_rate=1e-2, batch_size=8,
                                              checkpoint_every=0))
np.save(OUT, np.asarray(res.losses))
"""


def test_data_parallel_on_8_devices_equals_one_device(tmp_path, cpu_devices_env):
    out = tmp_path / "dp.npy"
    env = cpu_devices_env(8)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", f"OUT = {str(out)!r}\n" + DP_SCRIPT], env=env, cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    single = train(_model(), _tokens(), W2, QATConfig(steps=3, learning_rate=1e-3, scale_learning_rate=1e-2,
                                                      batch_size=8, checkpoint_every=0))
    np.testing.assert_allclose(np.load(out), single.losses, rtol=2e-5)


def test_weight_and_activation_qat_distils_from_the_float_model():
    """W8A4: the model runs with 4-bit activation quantizers placed; the teacher is the float
    model without them, so the loss measures what activation quantization loses (with a
    teacher that kept them, 8-bit weights would leave almost nothing to learn)."""
    from jquant.activations import ActQuantSpec, set_quantizers

    model, _ = set_quantizers(_model(), [(r"_proj/kernel$", ActQuantSpec(bits=4, symmetric=True))])
    w8 = [(r"layers/.*/kernel", jq.QuantSpec(bits=8, granularity="channel"))]
    with_act = train(model, _tokens(), w8, QATConfig(**{**FAST, "steps": 3}))
    weights_only = train(_model(), _tokens(), w8, QATConfig(**{**FAST, "steps": 3}))
    assert weights_only.losses[0] < 1e-3 < 0.02 < with_act.losses[0], (weights_only.losses, with_act.losses)
