"""The layer-wise calibration pipeline on a tiny random Llama."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant import calibrate
from jquant.quantizers import gptq
from jquant.errors import CheckpointError, DataError
from jquant.models import LlamaConfig, forward, init_model

LIN = r"(q|k|v|o|gate|up|down)_proj/kernel$"
GPTQ3 = jq.QuantSpec(bits=3, group_size=32, symmetric=False, method="gptq", options={"act_order": True})


@pytest.fixture(scope="module")
def tiny():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    model = init_model(cfg, key=0)
    toks = np.random.default_rng(0).integers(0, 128, size=(16, 64)).astype(np.int32)
    return model, toks


@pytest.fixture(scope="module")
def gptq_run(tiny):
    model, toks = tiny
    return calibrate.quantize_model(model, toks, [(LIN, GPTQ3)], batch_size=8, progress=False)


def test_every_linear_quantized_and_beats_rtn(tiny, gptq_run):
    model, _ = tiny
    state, logs = gptq_run
    assert len(logs) == 7 * model.config.num_hidden_layers
    for e in logs:
        assert e.method == "gptq"
        assert e.recon < e.recon_rtn, e.path  # ‖X(W−Q)‖² below RTN's on every layer
    s = jq.summary(state)
    assert len(s.quantized) == 7 * model.config.num_hidden_layers
    assert all(x.kind.startswith("gptq int3 g32") for x in s.quantized)


def test_true_sequential_inputs_come_from_quantized_layers(tiny, gptq_run):
    """o_proj's Hessian is built from attention outputs of the *quantized* q/k/v."""
    model, toks = tiny
    state, logs = gptq_run
    gd, _ = nnx.split(model)
    # Rebuild block 0 with quantized q/k/v only and check o_proj's logged reconstruction error
    # is computed on those inputs (and not on the float model's).
    block = model.layers[0]
    bgd, bst = nnx.split(block)
    q_state = nnx.split(nnx.merge(gd, state).layers[0])[1]
    qkv = {f"self_attn/{n}/kernel": calibrate._leaf(q_state, f"self_attn/{n}/kernel") for n in ("q_proj", "k_proj", "v_proj")}
    bst_q = calibrate._replace(bst, qkv)
    h = nnx.merge(gd, nnx.split(model)[1]).embed(jnp.asarray(toks))

    def hess(bs):
        _, inp = nnx.merge(bgd, bs).forward_with_inputs(h)
        return gptq.hessian_update(gptq.Hessian.zeros(64), inp["self_attn/o_proj"]).H

    w = calibrate._leaf(bst, "self_attn/o_proj/kernel")
    qo = calibrate._leaf(q_state, "self_attn/o_proj/kernel")
    logged = next(e.recon for e in logs if e.path == "layers/0/self_attn/o_proj/kernel")
    np.testing.assert_allclose(gptq.reconstruction_error(w, qo, hess(bst_q)), logged, rtol=1e-4)
    assert abs(gptq.reconstruction_error(w, qo, hess(bst)) - logged) > 1e-6 * max(logged, 1e-12)


def test_resume_after_kill_is_bit_identical(tiny, gptq_run, tmp_path):
    model, toks = tiny
    state, _ = gptq_run

    class Kill(Exception):
        pass

    def killer(e):
        if e.path == "layers/1/mlp/gate_proj/kernel":
            raise Kill

    with pytest.raises(Kill):
        calibrate.quantize_model(model, toks, [(LIN, GPTQ3)], work_dir=str(tmp_path), progress=False,
                                 on_layer=killer, checkpoint_every=0)
    assert json.load(open(os.path.join(tmp_path, "progress.json")))["done"] == 0
    resumed, logs = calibrate.quantize_model(model, toks, [(LIN, GPTQ3)], work_dir=str(tmp_path), progress=False)
    a = jax.tree_util.tree_leaves(state)
    b = jax.tree_util.tree_leaves(resumed)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert len(logs) == 21
    # Another job in the same work_dir is refused.
    other = [(LIN, dataclasses.replace(GPTQ3, bits=4))]
    with pytest.raises(CheckpointError, match="other arguments"):
        calibrate.quantize_model(model, toks, other, work_dir=str(tmp_path), progress=False)


def test_mixed_methods_and_float_rules(tiny):
    model, toks = tiny
    rules = [(r"mlp/down_proj", None), (r"self_attn", jq.QuantSpec(bits=4, group_size=32)),
             (LIN, dataclasses.replace(GPTQ3, options={}))]
    state, logs = calibrate.quantize_model(model, toks, rules, progress=False)
    kinds = {e.path.split("/", 2)[2]: e.method for e in logs if e.path.startswith("layers/0/")}
    assert kinds["self_attn/q_proj/kernel"] == "rtn" and kinds["mlp/up_proj/kernel"] == "gptq"
    assert "mlp/down_proj/kernel" not in kinds
    gd, _ = nnx.split(model)
    logits = forward(gd, state, jnp.asarray(toks[:2]))[0]
    assert logits.shape == (2, 64, 128) and bool(jnp.all(jnp.isfinite(logits)))


def test_bad_calibration_tokens(tiny):
    model, _ = tiny
    for bad in (-1, float("nan"), "60", True):
        with pytest.raises(DataError, match="checkpoint_every must be a number of seconds >= 0"):
            calibrate.quantize_model(model, np.zeros((2, 8), np.int32), [(LIN, GPTQ3)], progress=False,
                                     checkpoint_every=bad)
    with pytest.raises(DataError, match="vocabulary"):
        calibrate.quantize_model(model, np.full((2, 8), 999, np.int32), [(LIN, GPTQ3)], progress=False)
    with pytest.raises(DataError, match="non-empty"):
        calibrate.quantize_model(model, np.zeros((0, 8), np.int32), [(LIN, GPTQ3)], progress=False)


def test_self_generated_calibration(tiny):
    """'selfgen' windows are sampled from the model itself: deterministic, in the vocabulary,
    and each continues its first token the way the model's generate() does."""
    from jquant.models import generate

    model, _ = tiny

    class Tok:
        all_special_ids = [0, 1, 2]

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [3 + (ord(c) % 100) for c in text]}

    a = calibrate.calibration_tokens(Tok(), text="selfgen", n=5, seq_len=12, seed=1, model=model)
    b = calibrate.calibration_tokens(Tok(), text="selfgen", n=5, seq_len=12, seed=1, model=model)
    assert a.shape == (5, 12) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert a[:, 0].min() >= 3 and a.max() < 128  # no window starts on a special token
    c = calibrate.calibration_tokens(Tok(), text="selfgen", n=5, seq_len=12, seed=2, model=model)
    assert not np.array_equal(a, c)
    # Windows come from the model: regenerate one batch with the same key and prompt.
    same = generate(model, jnp.asarray(a[:, :1]), 11, key=jax.random.key(100003 * 1 + 0), temperature=1.0)
    np.testing.assert_array_equal(np.asarray(same), a)
    with pytest.raises(DataError, match="needs the model"):
        calibrate.calibration_tokens(Tok(), text="selfgen", n=2, seq_len=8)
    # Mixed sources split the windows.
    path = os.path.join(os.path.dirname(__file__), "..", "README.md")
    mixed = calibrate.calibration_tokens(Tok(), text=f"selfgen+{path}", n=5, seq_len=12, seed=1, model=model,
                                         vocab_size=128)
    assert mixed.shape == (5, 12)
    np.testing.assert_array_equal(mixed[:3], calibrate.calibration_tokens(Tok(), text="selfgen", n=3, seq_len=12,
                                                                          seed=1, model=model))


def test_bad_tokens_and_batch_size_are_refused(tiny):
    model, toks = tiny
    with pytest.raises(DataError, match="must be integer token ids, got dtype float"):
        calibrate.quantize_model(model, toks.astype(np.float32) + 0.5, [(LIN, GPTQ3)], progress=False)
    for bad in (0, -1, 2.0, True):
        with pytest.raises(DataError, match="batch_size must be an integer >= 1"):
            calibrate.quantize_model(model, toks, [(LIN, GPTQ3)], batch_size=bad, progress=False)


def test_all_zero_hessian_is_a_failed_calibration():
    from jquant.quantizers.gptq import gptq_quantize

    w = np.random.default_rng(0).normal(size=(32, 8)).astype(np.float32)
    with pytest.raises(DataError, match=r"^l/kernel: Hessian is all zeros: no calibration input reached"):
        gptq_quantize(w, np.zeros((32, 32), np.float32), GPTQ3, path="l/kernel")


def test_calibration_stages_compose_to_the_block(tiny):
    """The stages run every part of the block once and give the block's output and the
    inputs forward_with_inputs captures, bit for bit."""
    _check_stages(*tiny)


def _check_stages(model, toks):
    h = model.embed(jnp.asarray(toks[:4]))
    for block in model.layers:
        out, inputs = block.forward_with_inputs(h)
        carry = {"h": h}
        for k, (names, _) in enumerate(block.LINEAR_GROUPS):
            carry, x = block.calibration_stage(k, carry)
            for n in names:
                np.testing.assert_array_equal(np.asarray(x), np.asarray(inputs[n]), err_msg=n)
        carry, x = block.calibration_stage(len(block.LINEAR_GROUPS), carry)
        assert x is None and set(carry) == {"h"}
        np.testing.assert_array_equal(np.asarray(carry["h"]), np.asarray(out))
        h = out


def test_timings_by_phase(tiny):
    model, toks = tiny
    tm = {}
    calibrate.quantize_model(model, toks[:8], [(LIN, GPTQ3)], progress=False, timings=tm)
    assert {"embed", "forward", "solve", "baseline"} <= set(tm) and all(v > 0 for v in tm.values())


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_resume_keeps_the_model_dtype_and_resume_interval(tiny, tmp_path, dtype):
    """A bfloat16 job resumes bit-identically (the hidden states keep their dtype on disk);
    with a long checkpoint interval a killed job has no resume point and starts again."""
    model, toks = tiny
    m = init_model(model.config, dtype=jnp.dtype(dtype), key=0)
    ref, _ = calibrate.quantize_model(m, toks, [(LIN, GPTQ3)], progress=False)

    class Kill(Exception):
        pass

    def killer(e):
        if e.path == "layers/2/self_attn/o_proj/kernel":
            raise Kill

    for every, done in ((0, 1), (1e9, None)):
        wd = str(tmp_path / f"w{every}")
        with pytest.raises(Kill):
            calibrate.quantize_model(m, toks, [(LIN, GPTQ3)], work_dir=wd, progress=False, on_layer=killer,
                                     checkpoint_every=every)
        prog = os.path.join(wd, "progress.json")
        if done is None:
            assert not os.path.exists(prog)
        else:
            saved = json.load(open(prog))
            assert saved["done"] == done and saved["hidden"]["dtype"] == dtype
        resumed, _ = calibrate.quantize_model(m, toks, [(LIN, GPTQ3)], work_dir=wd, progress=False)
        for x, y in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(resumed)):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_unreadable_resume_point_is_a_checkpoint_error(tiny, tmp_path):
    model, toks = tiny
    with open(tmp_path / "progress.json", "w") as fh:
        fh.write('{"fingerprint": "x", "do')
    with pytest.raises(CheckpointError, match="progress.json: unreadable resume point"):
        calibrate.quantize_model(model, toks, [(LIN, GPTQ3)], work_dir=str(tmp_path), progress=False)


# -- Gemma 3: blocks of two kinds (sliding-window and global) ---------------------------------

@pytest.fixture(scope="module")
def tiny_gemma():
    from jquant.models.gemma import FULL, SLIDING, Gemma3Config

    cfg = Gemma3Config(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=5,
                       layer_types=(SLIDING, FULL, SLIDING))
    model = init_model(cfg, key=0)
    toks = np.random.default_rng(0).integers(0, 128, size=(8, 64)).astype(np.int32)
    return model, toks


def test_gemma3_calibration_stages_compose_to_each_block(tiny_gemma):
    _check_stages(*tiny_gemma)


def test_gemma3_pipeline_runs_each_block_as_its_kind(tiny_gemma):
    """GPTQ on the last (sliding-window) block only: its Hessian must come from hidden states
    that went through the global block 1 as a global block (64 tokens, window 5: a block run
    with the wrong kind's graph gives other inputs), and GPTQ beats RTN on every linear."""
    model, toks = tiny_gemma
    rules = [(r"^layers/2/.*_proj/kernel$", GPTQ3)]
    state, logs = calibrate.quantize_model(model, toks, rules, batch_size=4, progress=False)
    assert len(logs) == 7 and all(e.recon < e.recon_rtn for e in logs)
    h = model.embed(jnp.asarray(toks))
    for layer in model.layers[:2]:
        h, _ = layer(h)
    _, inputs = model.layers[2].forward_with_inputs(h)
    x = np.asarray(inputs["self_attn/q_proj"], np.float64).reshape(-1, 64)
    H = jnp.asarray(2 * x.T @ x / len(x), jnp.float32)
    gd, _ = nnx.split(model)
    q = calibrate._leaf(state, "layers/2/self_attn/q_proj/kernel")
    w = calibrate._leaf(nnx.state(model), "layers/2/self_attn/q_proj/kernel")
    logged = next(e.recon for e in logs if e.path == "layers/2/self_attn/q_proj/kernel")
    np.testing.assert_allclose(gptq.reconstruction_error(w, q, H), logged, rtol=1e-3)
    # the whole quantized model runs and stays close to the float one at 3 bits
    ref = np.asarray(forward(gd, nnx.state(model), jnp.asarray(toks[:2]))[0])
    got = np.asarray(forward(gd, state, jnp.asarray(toks[:2]))[0])
    assert np.abs(got - ref).max() / np.abs(ref).max() < 0.5


def test_blockwise_evaluation_equals_the_whole_model_program(tiny, gptq_run):
    """The CLI evaluates block by block (`evaluate.Blockwise`, one compiled program for the
    three same-shaped blocks): the float hidden states, and perplexity and KL of the GPTQ
    model, equal those of the whole model jitted as one program."""
    from jax.tree_util import Partial

    from jquant import evaluate

    model, toks = tiny
    state, _ = gptq_run
    qmodel = nnx.merge(nnx.graphdef(model), state)
    stream = np.random.default_rng(1).integers(0, 128, 40 * 32).astype(np.int32)
    np.testing.assert_allclose(np.asarray(evaluate.Blockwise(model)(stream[:64].reshape(2, 32))),
                               np.asarray(model.hidden(jnp.asarray(stream[:64].reshape(2, 32)))), rtol=1e-5, atol=1e-5)
    compiled = lambda: sum(f._cache_size() for k, f in evaluate._COMPILED.items() if k[0] == "block")  # noqa: E731
    n_block = compiled()
    evaluate.Blockwise(qmodel)(stream[:64].reshape(2, 32))
    assert compiled() == n_block + 1  # three quantized blocks, one program

    gd, st = nnx.split(model)
    qgd, qst = nnx.split(qmodel)
    head = Partial(lambda s, h: nnx.merge(gd, s).head(h), st)
    qhead = Partial(lambda s, h: nnx.merge(qgd, s).head(h), qst)
    whole = evaluate.compare(Partial(lambda s, t: nnx.merge(gd, s)(t)[0], st),
                             Partial(lambda s, t: nnx.merge(qgd, s)(t)[0], qst), stream, seq_len=32, batch_size=3)
    hid = evaluate.reference_hidden(evaluate.Blockwise(model), stream, seq_len=32, batch_size=3)
    blocks = evaluate.compare(evaluate.CachedReference(hid, head),
                              evaluate.HiddenAndHead(evaluate.Blockwise(qmodel), qhead), stream, seq_len=32,
                              batch_size=3)
    assert whole.ref.windows == blocks.ref.windows == 40
    assert blocks.ref.nll == pytest.approx(whole.ref.nll, rel=1e-5)
    assert blocks.quant.nll == pytest.approx(whole.quant.nll, rel=1e-5)
    assert blocks.agreement.kl == pytest.approx(whole.agreement.kl, rel=1e-4)
    assert blocks.agreement.top1 == pytest.approx(whole.agreement.top1, abs=1 / (40 * 32))
    assert blocks.agreement.kl > 1e-4  # the quantized model is another model (random tiny model: KL ~5e-4)


def test_the_pipeline_trims_host_memory_between_stages(tiny, monkeypatch):
    """glibc keeps freed 10-30 MiB activations in fragmented heaps (2.9 GiB against 1.9 GiB for
    GPTQ of SmolLM2 on 128 windows): the pipeline returns them after every group of linears
    and every block. On glibc the call reaches malloc_trim."""
    import platform

    from jquant import _xla_cpu

    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert _xla_cpu.trim_host_memory() is True
    calls = []
    monkeypatch.setattr(_xla_cpu, "trim_host_memory", lambda: calls.append(1) or True)
    model, toks = tiny
    calibrate.quantize_model(model, toks[:8], [(LIN, GPTQ3)], batch_size=8, progress=False)
    groups = len(type(model.layers[0]).LINEAR_GROUPS)
    assert len(calls) == len(model.layers) * (groups + 1)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_resume_hidden_states_are_written_batch_by_batch_as_np_save_writes_them(tmp_path, dtype):
    """The resume point's hidden states go to disk part by part, hashed as written (no
    concatenated copy of 150 MB, no second read): the file is byte for byte what np.save
    writes for the concatenation, and the digest is the file's SHA-256."""
    import hashlib

    from jquant._atomic import write_npy_parts

    rng = np.random.default_rng(0)
    parts = [jnp.asarray(rng.standard_normal((n, 5, 3)), dtype) for n in (4, 4, 2)]
    digest = write_npy_parts(str(tmp_path / "h.npy"), parts)
    np.save(tmp_path / "ref.npy", np.concatenate([np.asarray(p) for p in parts]))
    got, want = (tmp_path / "h.npy").read_bytes(), (tmp_path / "ref.npy").read_bytes()
    assert got == want and digest == hashlib.sha256(got).hexdigest()
    assert not [f for f in os.listdir(tmp_path) if "tmp" in f]
    with pytest.raises(ValueError, match="trailing shapes"):
        write_npy_parts(str(tmp_path / "bad.npy"), [parts[0], parts[0][:, :2]])
