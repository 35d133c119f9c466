"""GGUF export: the blocks gguf-py dequantizes are our values, the file reads back into the
same model (q/k permutation, Gemma's 1 + w norms, tied heads), metadata and tokenizer are
there, and what GGUF cannot hold is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jquant as jq
from jquant.errors import CheckpointError, FormatError
from jquant.interop.gguf import save_gguf
from jquant.models import load, load_gguf, load_hf
from tiny_hf_models import VOCAB, tiny_hf_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from gguf_writer import write_gemma3_gguf, write_gguf  # noqa: E402

gguf = pytest.importorskip("gguf")
TOKENS = np.random.default_rng(0).integers(3, VOCAB, (2, 12))


def _bpe_tokenizer():
    """A real (trained) BPE tokenizer of VOCAB tokens: specials, letters and merges."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2 style, as llama.cpp's gpt2 model
    text = ["the quick brown fox jumps over the lazy dog and then some more words follow here"] * 20
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>"]))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def _quantize(model, rules):
    gd, st = nnx.split(model)
    return nnx.merge(gd, jq.quantize_tree(st, rules))


def _same(a, b):
    x = jax.tree_util.tree_leaves(jq.dequantize_tree(nnx.state(a)))
    y = jax.tree_util.tree_leaves(jq.dequantize_tree(nnx.state(b)))
    assert len(x) == len(y)
    for u, v in zip(x, y):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    # weights equal; logits to float rounding (a QTensor matmul and a float one sum differently)
    np.testing.assert_allclose(np.asarray(a(jnp.asarray(TOKENS))[0]), np.asarray(b(jnp.asarray(TOKENS))[0]),
                               atol=1e-5, rtol=0)


KQ = lambda fmt: jq.QuantSpec(method="kquant", format=fmt)  # noqa: E731
RTN = {"q4_0": jq.QuantSpec(bits=4, group_size=32, full_range=True),
       "q8_0": jq.QuantSpec(bits=8, group_size=32, full_range=True),
       "q5_0": jq.QuantSpec(bits=5, group_size=32, full_range=True),
       "q4_1": jq.QuantSpec(bits=4, group_size=32, symmetric=False, zero_type="float"),
       "q5_1": jq.QuantSpec(bits=5, group_size=32, symmetric=False, zero_type="float")}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "m"
    tiny_hf_model(tie=False, kv_heads=2).save_pretrained(d, safe_serialization=True)
    return d


@pytest.mark.parametrize("rules", [
    [(r"layers/.*/kernel", KQ("q4_0")), (r"lm_head", KQ("q8_0"))],
    [(r"layers/.*/kernel", KQ("q5_1"))],
    [(r"mlp/down_proj", jq.QuantSpec(method="kquant", format="q6_k", options={"fallback": True})),
     (r"layers/.*/kernel", KQ("q4_1"))],  # 160 rows: llama-quantize's Q8_0 fallback
    [(r"layers/.*/kernel", RTN["q4_0"]), (r"lm_head", RTN["q8_0"])],
    [(r"layers/0/.*/kernel", RTN["q4_1"]), (r"layers/.*/kernel", RTN["q5_0"]), (r"lm_head", RTN["q5_1"])],
], ids=["kquant-q4_0", "kquant-q5_1", "kquant-mix", "rtn-q4_0-q8_0", "rtn-q4_1-q5_0-q5_1"])
def test_export_from_hf_reads_back_in_gguf_and_in_jquant(hf_dir, tmp_path, rules):
    model, cfg = load_hf(hf_dir)
    qm = _quantize(model, rules)
    rep = save_gguf(qm, cfg, tmp_path / "m.gguf", tokenizer=_bpe_tokenizer())
    r = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert r.fields["general.architecture"].contents() == "llama"
    assert r.fields["tokenizer.ggml.tokens"].contents()[:3] == ["<unk>", "<s>", "</s>"]
    assert len(r.fields["tokenizer.ggml.merges"].contents()) > 10
    assert r.fields["tokenizer.ggml.bos_token_id"].contents() == 1
    # gguf-py's own dequantization of every linear equals ours (llama.cpp's q/k row order undone)
    by_name = {t.name: t for t in r.tensors}
    for i, layer in enumerate(qm.layers):
        for gg, lin, heads in (("attn_q", layer.self_attn.q_proj, cfg.num_attention_heads),
                               ("attn_k", layer.self_attn.k_proj, cfg.num_key_value_heads),
                               ("ffn_down", layer.mlp.down_proj, None)):
            t = by_name[f"blk.{i}.{gg}.weight"]
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(lin.kernel.get_value().shape[::-1])
            if heads:
                from jquant.models import unpermute_qk
                w = unpermute_qk(w, heads)
            np.testing.assert_array_equal(w.T, np.asarray(lin.kernel.get_value().dequantize()))
    assert sum(v for k, v in rep["types"].items() if k not in ("F32", "F16")) == 2 * 7 + any(p == "lm_head" for p, _ in rules)
    back, _, tok = load(tmp_path / "m.gguf")
    _same(qm, back)
    src = _bpe_tokenizer()
    assert tok("the lazy dog")["input_ids"][-4:] == src("the lazy dog")["input_ids"][-4:]


def test_export_from_a_gguf_source_copies_metadata_and_reuses_its_tensors(tmp_path):
    tm = tiny_hf_model(tie=True, kv_heads=2)
    src = tmp_path / "src.gguf"
    write_gguf(src, tm, qtype="Q8_0")  # linears and the embedding Q8_0, as a shipped file
    model, cfg, _ = load_gguf(src, tokenizer=False)
    qm = _quantize(model, [(r"layers/.*/kernel", KQ("q4_0"))])
    rep = save_gguf(qm, cfg, tmp_path / "out.gguf", source=src)
    assert rep["copied"] == ["token_embd.weight"] and rep["types"]["q8_0"] == 1
    r = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    rs = gguf.GGUFReader(str(src))
    for key in ("tokenizer.ggml.tokens", "llama.rope.freq_base", "llama.attention.head_count_kv",
                "tokenizer.ggml.bos_token_id"):
        assert r.fields[key].contents() == rs.fields[key].contents(), key
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    back, _, _ = load_gguf(tmp_path / "out.gguf", tokenizer=False)
    _same(qm, back)


def test_gemma3_export_writes_unit_offset_norms_and_reads_back(tmp_path):
    tm = tiny_hf_model("gemma3", tie=True, layers=3)
    src = tmp_path / "g.gguf"
    write_gemma3_gguf(src, tm)
    model, cfg, _ = load_gguf(src, tokenizer=False)
    qm = _quantize(model, [(r"layers/.*/kernel", KQ("q8_0"))])
    save_gguf(qm, cfg, tmp_path / "out.gguf", source=src)
    back, _, _ = load_gguf(tmp_path / "out.gguf", tokenizer=False)
    _same(qm, back)
    r = gguf.GGUFReader(str(tmp_path / "out.gguf"))
    norm = next(t for t in r.tensors if t.name == "blk.0.attn_norm.weight")
    np.testing.assert_array_equal(norm.data, np.asarray(qm.layers[0].input_layernorm.scale.get_value()) + 1)
    tm.save_pretrained(tmp_path / "hf", safe_serialization=True)  # without its GGUF: the vocabulary is missing
    hm, hcfg = load_hf(tmp_path / "hf")
    with pytest.raises(FormatError, match="Gemma 3 model from a Hugging Face directory is not supported"):
        save_gguf(hm, hcfg, tmp_path / "h.gguf", tokenizer=_bpe_tokenizer())


def test_what_gguf_cannot_hold_is_refused(hf_dir, tmp_path):
    model, cfg = load_hf(hf_dir)
    tok = _bpe_tokenizer()
    for spec, msg in ((jq.QuantSpec(bits=4, group_size=64), r"layers/0/\w+/\w+_proj/kernel \(QTensor\(int4 group64.*needs group size 32"),
                      (jq.QuantSpec(bits=4, group_size=32, symmetric=False), r"zero_type='float'"),
                      (jq.QuantSpec(format="nf4", group_size=32), r"format 'nf4' has no GGML block type")):
        with pytest.raises(FormatError, match=msg):
            save_gguf(_quantize(model, [(r"layers/.*/kernel", spec)]), cfg, tmp_path / "x.gguf", tokenizer=tok)
    assert not list(tmp_path.iterdir())  # nothing left behind
    with pytest.raises(CheckpointError, match="needs the model's tokenizer"):
        save_gguf(model, cfg, tmp_path / "x.gguf")
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    wordlevel = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, unk_token="a")))
    with pytest.raises(FormatError, match="byte-level BPE tokenizer"):
        save_gguf(model, cfg, tmp_path / "x.gguf", tokenizer=wordlevel)
    from tokenizers import pre_tokenizers

    ws = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE({"a": 0}, [])))
    ws.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(FormatError, match="without a ByteLevel pre-tokenizer"):
        save_gguf(model, cfg, tmp_path / "x.gguf", tokenizer=ws)
    save_gguf(model, cfg, tmp_path / "f.gguf", tokenizer=tok)  # a float model exports too (F32)
    with pytest.raises(CheckpointError, match="exists"):
        save_gguf(model, cfg, tmp_path / "f.gguf", tokenizer=tok)
