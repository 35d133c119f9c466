"""Streaming: blocks read from a safetensors checkpoint one at a time and handed out as they finish."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant import calibrate
from jquant.errors import CheckpointError
from jquant.models import LlamaConfig, init_model
from jquant.models.hf import load_hf, save_hf, stream_hf

RULES = [(r"(q|k|v|o)_proj/kernel$", jq.QuantSpec(bits=3, group_size=32, symmetric=False, method="gptq",
                                                  options={"act_order": True})),
         (r"(gate|up|down)_proj/kernel$", jq.QuantSpec(bits=4, group_size=32, method="awq")),
         (r"embed_tokens", jq.QuantSpec(bits=8, granularity="channel", axis=1))]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2)
    d = tmp_path_factory.mktemp("stream") / "m"
    save_hf(init_model(cfg, key=3), cfg, d)
    toks = np.random.default_rng(1).integers(0, 128, size=(16, 32)).astype(np.int32)
    return d, toks


def _leaves(tree):
    return {jq.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=jq.is_qtensor)[0]}


def _same(a, b, where):
    if jq.is_qtensor(a):
        for p in ("codes", "scale", "zero", "g_idx"):
            x, y = getattr(a, p), getattr(b, p)
            assert (x is None) == (y is None), (where, p)
            if x is not None:
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"{where} {p}")
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=where)


def test_streamed_blocks_equal_the_model_in_memory(saved, tmp_path):
    d, toks = saved
    model, _ = load_hf(d)
    whole, logs = calibrate.quantize_model(model, toks, RULES, batch_size=8, progress=False)

    smodel, cfg, read_block = stream_hf(d)
    blocks = _leaves(nnx.state(smodel.layers))
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in blocks.values())  # nothing of the blocks read
    handed = []
    state, slogs = calibrate.quantize_model(smodel, toks, RULES, batch_size=8, progress=False, read_block=read_block,
                                           on_block=lambda i, st: handed.append((i, st)),
                                           work_dir=str(tmp_path / "w"))
    assert [i for i, _ in handed] == [0, 1, 2]
    expect = _leaves(whole)
    for i, st in handed:
        for path, leaf in _leaves(st).items():
            _same(leaf, expect[f"layers/{i}/{path}"], f"layers/{i}/{path}")
    got = _leaves(state)
    for path, leaf in expect.items():
        if path.startswith("layers/"):
            assert isinstance(got[path], jax.ShapeDtypeStruct), path  # not kept
        else:
            _same(got[path], leaf, path)  # embedding (quantized), final norm
    assert [e.recon for e in slogs] == [e.recon for e in logs]


def test_stream_resumes_and_hands_over_the_finished_blocks_first(saved, tmp_path):
    d, toks = saved
    smodel, _, read_block = stream_hf(d)
    work = str(tmp_path / "w")
    first = []

    def stop_after_one(i, st):
        first.append(i)
        if i == 1:
            raise KeyboardInterrupt  # killed while handing over block 1

    with pytest.raises(KeyboardInterrupt):
        calibrate.quantize_model(smodel, toks, RULES, batch_size=8, progress=False, read_block=read_block,
                                 on_block=stop_after_one, work_dir=work, checkpoint_every=0)
    reads = []
    second = []

    def counting(i):
        reads.append(i)
        return read_block(i)

    calibrate.quantize_model(smodel, toks, RULES, batch_size=8, progress=False, read_block=counting,
                             on_block=lambda i, st: second.append((i, st)), work_dir=work, checkpoint_every=0)
    assert first == [0, 1] and [i for i, _ in second] == [0, 1, 2]
    assert reads == [2]  # blocks 0 and 1 came from the resume point, not from the checkpoint
    model, _ = load_hf(d)
    whole, _ = calibrate.quantize_model(model, toks, RULES, batch_size=8, progress=False)
    expect = _leaves(whole)
    for i, st in second:
        for path, leaf in _leaves(st).items():
            _same(leaf, expect[f"layers/{i}/{path}"], f"layers/{i}/{path}")


def test_read_block_checks(saved):
    d, _ = saved
    _, _, read_block = stream_hf(d)
    with pytest.raises(CheckpointError, match="no decoder block 3"):
        read_block(3)
    st = read_block(0)
    assert _leaves(st)["self_attn/q_proj/kernel"].shape == (64, 64)


def test_streamed_gguf_blocks_equal_the_loaded_model(tmp_path):
    """stream_gguf: every check first, blocks dequantized only when read, and the quantized
    result equal to the model loaded whole (a Q4_1 file, as the default model ships)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent / "models"))
    from fuzz_cases import tiny_state
    from gguf_writer import write_gguf_state

    from jquant.models.gguf import load_gguf, stream_gguf

    sd, cfg = tiny_state(layers=3, hidden=64, inter=160, vocab=128, heads=4, kv_heads=2)
    f = tmp_path / "m.gguf"
    write_gguf_state(f, sd, cfg, qtype="Q4_1")
    model, _, _ = load_gguf(f, tokenizer=False)
    smodel, config, read_block = stream_gguf(f)
    assert config.num_hidden_layers == 3
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in _leaves(nnx.state(smodel.layers)).values())
    for i in range(3):
        want = _leaves(nnx.state(model.layers[i]))
        got = _leaves(read_block(i))
        assert sorted(got) == sorted(want)
        for p in want:
            _same(got[p], want[p], f"layers/{i}/{p}")
    with pytest.raises(CheckpointError, match=r"m.gguf: no decoder block 3 \(the model has 3\)"):
        read_block(3)
    toks = np.random.default_rng(1).integers(0, 128, size=(8, 32)).astype(np.int32)
    whole, _ = calibrate.quantize_model(model, toks, RULES[:1], batch_size=8, progress=False)
    handed = {}
    calibrate.quantize_model(smodel, toks, RULES[:1], batch_size=8, progress=False, read_block=read_block,
                             on_block=lambda i, st: handed.update({i: st}))
    expect = _leaves(whole)
    for i, st in handed.items():
        for path, leaf in _leaves(st).items():
            _same(leaf, expect[f"layers/{i}/{path}"], f"layers/{i}/{path}")
    assert sorted(handed) == [0, 1, 2]
