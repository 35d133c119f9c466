"""Whole pre-quantized checkpoints: jquant writes GPTQ / AWQ / compressed-tensors directories
that read back into the same QTensors, that transformers (through compressed-tensors) runs
with the same logits, and refuses checkpoints whose tensors disagree with their config."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant.errors import CheckpointError, FormatError, NonFiniteError
from jquant.interop import save_quantized
from jquant.models import load, load_hf

from tiny_hf_models import VOCAB, tiny_hf_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

W4 = jq.QuantSpec(bits=4, group_size=32, symmetric=False)
W8 = jq.QuantSpec(bits=8, granularity="channel")
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 16))


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("float") / "m"
    tiny_hf_model(tie=False, kind="qwen2").save_pretrained(d, safe_serialization=True)  # q/k/v biases too
    return d


def _quantized(float_dir, rules):
    model, cfg = load_hf(float_dir)
    gd, st = nnx.split(model)
    return nnx.merge(gd, jq.quantize_tree(st, rules)), cfg


def _values(model):
    return {jq.path_str(k): np.asarray(jq.dequantize(v)) for k, v in
            jax.tree_util.tree_flatten_with_path(nnx.state(model), is_leaf=jq.is_qtensor)[0]}


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2", "awq", "compressed-tensors"])
def test_export_reads_back_value_for_value(float_dir, tmp_path, fmt):
    qm, cfg = _quantized(float_dir, [(r"layers/.*/kernel", W4)])
    report = save_quantized(qm, cfg, tmp_path / fmt, fmt)
    assert len(report["quantized"]) == 2 * 7 and report["float"] == ["lm_head"]
    qc = json.loads((tmp_path / fmt / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == {"gptq_v2": "gptq"}.get(fmt, fmt)
    back, _ = load_hf(tmp_path / fmt)
    a, b = _values(qm), _values(back)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert jq.is_qtensor(back.layers[1].mlp.down_proj.kernel.get_value())
    np.testing.assert_array_equal(np.asarray(qm(jnp.asarray(TOKENS))[0]), np.asarray(back(jnp.asarray(TOKENS))[0]))


def test_mixed_schemes_gptq_dynamic_and_compressed_tensors_groups(float_dir, tmp_path):
    rules = [(r"layers/1/mlp/down_proj", None), (r"layers/0/mlp/.*/kernel", W8), (r"layers/.*/kernel", W4),
             (r"lm_head", W8)]
    qm, cfg = _quantized(float_dir, rules)
    for fmt in ("gptq", "compressed-tensors"):
        report = save_quantized(qm, cfg, tmp_path / fmt, fmt)
        assert "model.layers.1.mlp.down_proj" in report["float"] and "lm_head" in report["quantized"]
        back, _ = load_hf(tmp_path / fmt)
        a, b = _values(qm), _values(back)
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{fmt} {k}")
        assert not jq.is_qtensor(back.layers[1].mlp.down_proj.kernel.get_value())
        assert back.layers[0].mlp.up_proj.kernel.get_value().bits == 8
    qc = json.loads((tmp_path / "gptq" / "config.json").read_text())["quantization_config"]
    assert qc["bits"] == 4 and qc["lm_head"] is True
    assert qc["dynamic"][r"-:^model\.layers\.1\.mlp\.down_proj$"] == {}
    with pytest.raises(FormatError, match=r"model.layers.0.mlp.down_proj: 8-bit weights; the AWQ GEMM format holds 4-bit weights only"):
        save_quantized(qm, cfg, tmp_path / "awq", "awq")
    assert not (tmp_path / "awq").exists()  # nothing written


def test_transformers_runs_our_compressed_tensors_export(float_dir, tmp_path):
    """transformers + compressed-tensors decompress our checkpoint to our weights, bit for bit,
    and compute our logits."""
    pytest.importorskip("compressed_tensors")
    # Symmetric: transformers 5.24 + compressed-tensors 0.20.1 build asymmetric modules with
    # unpacked zero points and reject the packed ones on disk (llm-compressor#1618); the
    # library's own decompressor reads our packed zero points (test_tensor_formats).
    w4 = jq.QuantSpec(bits=4, group_size=32)
    qm, cfg = _quantized(float_dir, [(r"layers/0/mlp/down_proj", W8), (r"layers/.*/kernel", w4)])
    save_quantized(qm, cfg, tmp_path / "ct", "compressed-tensors")
    tm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32)
    with torch.no_grad():
        ref = tm(torch.tensor(TOKENS)).logits.numpy()
    ours = np.asarray(qm(jnp.asarray(TOKENS))[0])
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=0)
    for name, layer in (("model.layers.0.mlp.down_proj", qm.layers[0].mlp.down_proj),
                        ("model.layers.1.self_attn.k_proj", qm.layers[1].self_attn.k_proj)):
        w = tm.get_submodule(name).weight.detach().numpy()
        # its scale parameters are float32 (the model's dtype; float16 scales widen exactly), so it
        # decompresses in float32: our float32 weights, bit for bit
        np.testing.assert_array_equal(w, np.asarray(layer.kernel.get_value().dequantize(jnp.float32)).T)


def test_load_reads_a_pre_quantized_directory_with_its_tokenizer(float_dir, tmp_path):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk)
    qm, cfg = _quantized(float_dir, [(r"layers/.*/kernel", W4)])
    save_quantized(qm, cfg, tmp_path / "g", "gptq", tok)
    model, config, tok2 = load(tmp_path / "g")
    assert tok2 is not None and tok2.convert_tokens_to_ids(["t5", "t7"]) == [5, 7]
    assert jq.is_qtensor(model.layers[0].self_attn.q_proj.kernel.get_value())


def _edit_config(d: Path, **changes):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg["quantization_config"].pop(k, None)
        else:
            cfg["quantization_config"][k] = v
    (d / "config.json").write_text(json.dumps(cfg))


def _rewrite(d: Path, fn):
    from safetensors.numpy import load_file, save_file

    t = load_file(d / "model.safetensors")
    fn(t)
    save_file(t, d / "model.safetensors", metadata={"format": "pt"})


def test_checkpoints_that_disagree_with_their_config_are_refused(float_dir, tmp_path):
    qm, cfg = _quantized(float_dir, [(r"layers/.*/kernel", W4)])
    save_quantized(qm, cfg, tmp_path / "g", "gptq")
    d = tmp_path / "g"
    _edit_config(d, bits=3)
    with pytest.raises(FormatError, match=r"g/model\.safetensors: model\.layers\.\d\.\w+\.\w+_proj\.qweight: "
                                          r"int32 \(\d+, \d+\), but 3-bit"):
        load_hf(d)
    _edit_config(d, bits=4, group_size=64)
    with pytest.raises(FormatError, match=r"_proj\.qzeros: int32 \(\d, \d+\), but 4-bit group size 64 on an \(in, out\)"):
        load_hf(d)
    _edit_config(d, group_size=32, desc_act=True)
    _rewrite(d, lambda t: t.pop("model.layers.0.mlp.up_proj.g_idx"))
    with pytest.raises(FormatError, match=r"up_proj\.g_idx: missing, but desc_act"):
        load_hf(d)
    _edit_config(d, desc_act=False, quant_method="bitsandbytes")
    with pytest.raises(FormatError, match=r"quant_method 'bitsandbytes' is not read; valid: gptq, awq"):
        load_hf(d)
    _edit_config(d, quant_method="gptq", checkpoint_format="marlin")
    with pytest.raises(FormatError, match="checkpoint_format 'marlin'"):
        load_hf(d)
    _edit_config(d, checkpoint_format="gptq", dynamic={r"-:.*layers\.1\.mlp\..*": {}})
    with pytest.raises(FormatError, match=r"model\.layers\.1\.mlp\.\w+_proj is stored quantized .* leaves it in float"):
        load_hf(d)
    _edit_config(d, dynamic=None)
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.scales",
                                        np.full_like(t["model.layers.0.mlp.up_proj.scales"], np.nan)))
    with pytest.raises(NonFiniteError, match=r"up_proj\.scales.*320 of 320 values are NaN"):
        load_hf(d)


def test_awq_refuses_other_versions_and_bits(float_dir, tmp_path):
    qm, cfg = _quantized(float_dir, [(r"layers/.*/kernel", W4)])
    save_quantized(qm, cfg, tmp_path / "a", "awq")
    _edit_config(tmp_path / "a", version="gemv")
    with pytest.raises(FormatError, match="version='gemv'"):
        load_hf(tmp_path / "a")
    _edit_config(tmp_path / "a", version="gemm", bits=8)
    with pytest.raises(FormatError, match="bits=8; AWQ checkpoints hold 4-bit"):
        load_hf(tmp_path / "a")


def test_export_refuses_what_the_format_cannot_express(float_dir, tmp_path):
    qm, cfg = _quantized(float_dir, [(r"layers/.*/kernel", jq.QuantSpec(format="nf4", group_size=32))])
    with pytest.raises(FormatError, match=r"layers/0/\w+/\w+_proj/kernel \(QTensor\(nf4 group32.*has format 'nf4'"):
        save_quantized(qm, cfg, tmp_path / "x", "gptq")
    with pytest.raises(FormatError, match="export format 'exl2' unknown; valid: gptq, gptq_v2, awq"):
        save_quantized(qm, cfg, tmp_path / "x", "exl2")
    assert not (tmp_path / "x").exists()
    qm, cfg = _quantized(float_dir, [(r"layers/.*/kernel", W4)])
    qm.layers[0].mlp.down_proj.input_transform = "hadamard"
    with pytest.raises(FormatError, match=r"layers/0/mlp/down_proj: has an online input rotation"):
        save_quantized(qm, cfg, tmp_path / "x", "gptq")
    qm.layers[0].mlp.down_proj.input_transform = None
    save_quantized(qm, cfg, tmp_path / "x", "gptq")
    with pytest.raises(CheckpointError, match="holds a checkpoint already"):
        save_quantized(qm, cfg, tmp_path / "x", "gptq")
    (tmp_path / "x" / "notes.txt").write_text("mine")
    save_quantized(qm, cfg, tmp_path / "x", "awq", overwrite=True)
    assert (tmp_path / "x" / "notes.txt").read_text() == "mine"  # overwrite replaces our files only
    assert not (tmp_path / "x" / "quantize_config.json").exists()  # the GPTQ export's config is gone


def test_pickled_weights_in_a_quantized_directory_are_refused(float_dir, tmp_path):
    qm, cfg = _quantized(float_dir, [(r"layers/.*/kernel", W4)])
    save_quantized(qm, cfg, tmp_path / "p", "gptq")
    (tmp_path / "p" / "model.safetensors").unlink()
    (tmp_path / "p" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle-based PyTorch weights"):
        load_hf(tmp_path / "p")
