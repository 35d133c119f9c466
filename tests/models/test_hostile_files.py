"""Bad and hostile model files: each is refused with a jquant error naming the file, the key or
tensor, and the offending value, quickly and without allocating what the file declares."""

from __future__ import annotations

import json
import re
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_hf_model
from gguf_writer import kv_array, kv_string, raw_gguf, write_gguf

from jquant.errors import CheckpointError, JQuantError, UnsupportedModelError
from jquant.models import config_from_gguf, load, load_gguf, load_hf, read_config

gguf = pytest.importorskip("gguf")
VT = gguf.GGUFValueType
U8, U32, I32, F32, STR, ARR = 0, 4, 5, 6, 8, 9
REPO = Path(__file__).resolve().parents[2]


def _refused(exc, fn, *match):
    """``fn()`` raises ``exc`` within a second, and the message matches each regex in ``match``."""
    t = time.perf_counter()
    with pytest.raises(exc) as info:
        fn()
    assert time.perf_counter() - t < 1.0, "refusing a hostile file must not take long"
    for m in match:
        assert re.search(m, str(info.value)), (m, str(info.value))
    return info.value


# -- GGUF container: declared counts and lengths ---------------------------------------------

PAD = b"\0" * 60_000  # a 60 KB file


@pytest.mark.parametrize("blob, match", [
    (raw_gguf([("big", ARR, kv_array(U8, PAD, 2**62))]), r"4611686018427387904 uint8 elements of array 'big'"),
    (raw_gguf([("big", ARR, kv_array(STR, PAD, 2**40))]), r"1099511627776 string elements of array 'big'"),
    (raw_gguf([("s", STR, struct.pack("<Q", 2**60) + PAD)]), r"value of 's'.*declared length 1152921504606846976"),
    (raw_gguf([("k", U32, b"\0" * 4)], n_kv=2**40) + PAD, r"1099511627776 key/value pairs"),
    (raw_gguf([("k", U32, b"\0" * 4)], n_tensors=2**40) + PAD, r"1099511627776 tensors"),
    (raw_gguf([("a", ARR, kv_array(ARR, PAD, 1))]), r"array 'a'.*element type 9 \(array\).*nested arrays"),
    (raw_gguf([("v", 13, PAD)]), r"'v'.*value type 13; valid: 0 \(uint8\)"),
    (raw_gguf([("\xff", U32, b"\0" * 4)]).replace(b"\xc3\xbf", b"\xff\xff"), r"metadata key.*not valid UTF-8"),
    (raw_gguf([("k", U32, b"\0" * 4), ("k", U32, b"\0" * 4)]), r"key 'k' at byte \d+ appears twice"),
    (b"GGML" + PAD, r"not a GGUF file \(starts with b'GGML'"),
    (raw_gguf([("k", U32, b"\0" * 4)])[:30], r"only \d+ remain.*truncated"),
    (raw_gguf([("general.alignment", U32, struct.pack("<I", 24))]), r"general.alignment=24: must be a positive power of two"),
], ids=["array-2^62", "strings-2^40", "string-2^60", "kv-2^40", "tensors-2^40", "nested-array", "value-type",
        "utf8", "duplicate-key", "magic", "truncated", "alignment"])
def test_gguf_declared_counts_refused_quickly(tmp_path, blob, match):
    f = tmp_path / "hostile.gguf"
    f.write_bytes(blob)
    _refused(CheckpointError, lambda: load_gguf(f, tokenizer=False), "hostile.gguf", match)


@pytest.mark.parametrize("version, match", [(1, "version 1 is not supported"), (3 << 24, "big-endian")])
def test_gguf_unsupported_versions(tmp_path, version, match):
    f = tmp_path / "v.gguf"
    f.write_bytes(raw_gguf(version=version))
    _refused(UnsupportedModelError, lambda: load_gguf(f, tokenizer=False), "v.gguf", match)


# -- GGUF tensor table: ranges, types, shapes -------------------------------------------------

F32_T, Q4_1_T = 0, 3
DATA = b"\0" * 4096


@pytest.mark.parametrize("tensors, match", [
    ([("a", (64,), F32_T, 0), ("b", (64,), F32_T, 128)], r"tensor 'a' \(F32, shape \[64\]\) occupies bytes \d+\.\.\d+, "
                                                        r"overlapping tensor 'b'"),
    ([("a", (64, 64), F32_T, 0)], r"tensor 'a' \(F32, shape \[64, 64\]\) needs 16384 bytes at data offset 0, but "
                                  r"the data section has 4096 bytes"),
    ([("a", (2**31, 2**31), F32_T, 0)], r"tensor 'a'.*needs 18446744073709551616 bytes"),
    ([("a", (2**40, 2**40, 2**40), F32_T, 0)], r"tensor 'a' declares shape .* at most 2\*\*62 elements"),
    ([("a", (64,), F32_T, 8)], r"tensor 'a' has data offset 8, not a multiple of the alignment 32"),
    ([("a", (64,), 99, 0)], r"tensor 'a' has GGML type 99, which is not a known type; valid: 0 \(F32\)"),
    ([("a", (48, 2), Q4_1_T, 0)], r"tensor 'a' \(Q4_1\) has rows of 48 elements, not a multiple of the Q4_1 block size 32"),
    ([("a", (1, 1, 1, 1, 1), F32_T, 0)], r"tensor 'a' .*has 5 dimensions; valid: 1 to 4"),
    ([("a", (4,), F32_T, 0), ("a", (4,), F32_T, 32)], r"tensor 'a' appears twice"),
], ids=["overlap", "past-end", "huge-bytes", "huge-elements", "misaligned", "ggml-type", "block-size", "dims",
        "duplicate"])
def test_gguf_tensor_ranges_refused(tmp_path, tensors, match):
    f = tmp_path / "t.gguf"
    f.write_bytes(raw_gguf([("general.architecture", STR, kv_string("llama"))], tensors, DATA))
    _refused(CheckpointError, lambda: load_gguf(f, tokenizer=False), "t.gguf", match)


# -- GGUF metadata values -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    return tiny_hf_model(kv_heads=2)


def _gguf_with(tmp_path, tiny, **meta):
    f = tmp_path / "m.gguf"
    write_gguf(f, tiny, meta={k.replace("__", "."): v for k, v in meta.items()})
    return f


def test_gguf_per_layer_array_of_equal_values_loads(tmp_path, tiny):
    f = _gguf_with(tmp_path, tiny, llama__attention__head_count_kv=([2, 2], VT.ARRAY, VT.UINT32),
                   llama__feed_forward_length=([160, 160], VT.ARRAY, VT.INT32))
    model, config, _ = load_gguf(f, tokenizer=False)
    assert config.num_key_value_heads == 2 and config.intermediate_size == 160
    np.testing.assert_array_equal(np.asarray(model.layers[1].mlp.up_proj.kernel.get_value()),
                                  tiny.model.layers[1].mlp.up_proj.weight.detach().numpy().T)


@pytest.mark.parametrize("key, value, exc, match", [
    ("llama.attention.head_count_kv", ([2, 4], VT.ARRAY, VT.UINT32), UnsupportedModelError,
     r"head_count_kv=\[2, 4\]: the per-layer values differ"),
    ("llama.attention.head_count_kv", ([2.0, 2.0], VT.ARRAY, VT.FLOAT32), CheckpointError,
     r"head_count_kv=\[2.0, 2.0\]: must be a positive integer or a non-empty per-layer array"),
    ("llama.attention.head_count", (0, VT.UINT32), CheckpointError, r"head_count=0: must be a positive integer"),
    ("llama.attention.head_count", (-4, VT.INT32), CheckpointError, r"head_count=-4: must be a positive integer"),
    ("llama.attention.head_count", ("four", VT.STRING), CheckpointError, r"head_count='four': must be a positive"),
    ("llama.attention.head_count", (4.0, VT.FLOAT32), CheckpointError, r"head_count=4.0: must be a positive integer"),
    ("llama.attention.head_count", (True, VT.BOOL), CheckpointError, r"head_count=True: must be a positive integer"),
    ("llama.attention.head_count", (3, VT.UINT32), CheckpointError,
     r"embedding_length=64 is not divisible by llama.attention.head_count=3"),
    ("llama.attention.head_count", None, CheckpointError, r"metadata lacks 'llama.attention.head_count'"),
    ("llama.embedding_length", (65, VT.UINT32), CheckpointError,
     r"'token_embd.weight' has shape \(128, 64\) \(vocab, hidden\), but llama.embedding_length=65"),
    ("llama.block_count", (2**31 - 1, VT.UINT32), CheckpointError,
     r"block_count=2147483647, but the file has tensors for 2 layer\(s\)"),
    ("llama.block_count", (2**40, VT.UINT64), CheckpointError, r"block_count=1099511627776: must be a positive integer"),
    ("llama.feed_forward_length", (0, VT.UINT32), CheckpointError, r"feed_forward_length=0"),
    ("llama.context_length", (-1, VT.INT32), CheckpointError, r"context_length=-1"),
    ("llama.attention.layer_norm_rms_epsilon", (float("nan"), VT.FLOAT32), CheckpointError,
     r"layer_norm_rms_epsilon=nan: must be a finite positive number"),
    ("llama.rope.freq_base", (-1.0, VT.FLOAT32), CheckpointError, r"freq_base=-1.0: must be a finite positive"),
    ("general.architecture", (7, VT.UINT32), CheckpointError, r"general.architecture=7: must be a string"),
    ("general.architecture", ("gpt2", VT.STRING), UnsupportedModelError, r"'gpt2' is not supported"),
    ("tokenizer.ggml.eos_token_id", (-2, VT.INT32), CheckpointError, r"eos_token_id=-2: must be a non-negative"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_gguf_bad_metadata(tmp_path, tiny, key, value, exc, match):
    f = _gguf_with(tmp_path, tiny, **{key.replace(".", "__"): value})
    _refused(exc, lambda: load_gguf(f, tokenizer=False), "m.gguf", match)
    _refused(exc, lambda: config_from_gguf(f), "m.gguf", match)


def test_gguf_bad_tensor_shape_named_before_dequantizing(tmp_path, tiny):
    f = tmp_path / "m.gguf"
    write_gguf(f, tiny, replace={"blk.0.attn_k.weight": np.zeros((16, 64), np.float32)})
    _refused(CheckpointError, lambda: load_gguf(f, tokenizer=False),
             r"m.gguf: tensor 'blk.0.attn_k.weight' has shape \(16, 64\), but the metadata implies \(32, 64\)")


# -- safetensors ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "m"
    tiny_hf_model(kv_heads=2).save_pretrained(d, safe_serialization=True)
    return d


@pytest.fixture
def ckpt(hf_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hf_dir, d)
    return d


def _edit_header(f: Path, edit) -> None:
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _set(name, key, value):
    def edit(h):
        h[name][key] = value(h) if callable(value) else value
    return edit


W = "model.layers.0.mlp.up_proj.weight"
G = "model.layers.0.mlp.gate_proj.weight"  # the same shape as W


@pytest.mark.parametrize("edit, match", [
    (_set(W, "dtype", "I32"), rf"tensor '{W}' has dtype I32; parameters must be stored as floating point"),
    (_set(W, "dtype", "U32"), rf"tensor '{W}' has dtype U32"),
    (_set(W, "dtype", "BOOL"), rf"tensor '{W}'.*BOOL \[160, 64\] needs 10240 bytes but data_offsets span 40960"),
    (_set(W, "dtype", "Q4"), rf"tensor '{W}'.*unknown dtype 'Q4'; valid: BOOL"),
    (_set(W, "data_offsets", lambda h: h[G]["data_offsets"]), rf"overlaps tensor"),
    (_set(W, "data_offsets", [0, 2**40]), rf"tensor '{W}'.*data_offsets must be \[begin, end\] with 0 <= begin <= end <= \d+"),
    (_set(W, "shape", [160, -64]), rf"tensor '{W}'.*shape must be a list of at most 8 integers"),
    (_set(W, "shape", [160, 64, 1]), rf"tensor '{W}' has shape \(160, 64, 1\), but config.json implies \(160, 64\)"),
    (_set(W, "shape", [64, 160]), rf"tensor '{W}' has shape \(64, 160\), but config.json implies \(160, 64\)"),
    (lambda h: h.__setitem__(W, [1, 2]), rf"tensor '{W}'.*needs dtype, shape and data_offsets"),
], ids=["int32", "uint32", "bool", "dtype-name", "overlap", "past-end", "negative-dim", "3-d", "transposed", "entry"])
def test_safetensors_header_refused(ckpt, edit, match):
    _edit_header(ckpt / "model.safetensors", edit)
    _refused(CheckpointError, lambda: load_hf(ckpt), "model.safetensors", match)


@pytest.mark.parametrize("cut, match", [
    (lambda b: b[:5], r"5 bytes, too short for a safetensors header"),
    (lambda b: b[:4000], r"truncated or corrupt"),
    (lambda b: struct.pack("<Q", 2**63) + b[8:], r"declares a 9223372036854775808-byte header"),
    (lambda b: struct.pack("<Q", 20) + b[8:], r"header is not valid JSON"),
    (lambda b: struct.pack("<Q", 2) + b"[]" + b[8:], r"header must be a JSON object, got \[\]"),
], ids=["5-bytes", "cut-header", "huge-length", "cut-json", "list"])
def test_safetensors_truncated_header(ckpt, cut, match):
    f = ckpt / "model.safetensors"
    f.write_bytes(cut(f.read_bytes()))
    _refused(CheckpointError, lambda: load_hf(ckpt), "model.safetensors", match)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf") / "s"
    tiny_hf_model(kv_heads=2).save_pretrained(d, safe_serialization=True, max_shard_size="40KB")
    return d


@pytest.mark.parametrize("edit, match", [
    (lambda ix: ix.__setitem__("weight_map", ["model-00001-of-00009.safetensors"]), r"'weight_map' must be a non-empty mapping"),
    (lambda ix: ix.pop("weight_map"), r"'weight_map' must be a non-empty mapping of tensor name to shard file name, got None"),
    (lambda ix: ix["weight_map"].__setitem__(W, "../outside.safetensors"), r"shard '../outside.safetensors' lies outside"),
    (lambda ix: ix["weight_map"].__setitem__(W, "/etc/passwd"), r"shard '/etc/passwd' lies outside"),
    (lambda ix: ix["weight_map"].__setitem__(W, "pytorch_model-1.bin"), r"pytorch_model-1.bin: pickle-based PyTorch"),
    (lambda ix: ix["weight_map"].__setitem__(W, "gone.safetensors"), r"lists shard\(s\) that do not exist: .*gone.safetensors"),
], ids=["list", "absent", "dotdot", "absolute", "pickle", "missing"])
def test_shard_index_refused(sharded_dir, tmp_path, edit, match):
    d = tmp_path / "s"
    shutil.copytree(sharded_dir, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    edit(index)
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _refused(CheckpointError, lambda: load_hf(d), match)


def test_index_not_an_object_and_tensor_stored_twice(sharded_dir, tmp_path):
    d = tmp_path / "s"
    shutil.copytree(sharded_dir, d)
    (d / "model.safetensors.index.json").write_text("[1, 2]")
    _refused(CheckpointError, lambda: load_hf(d), r"index.json: the shard index must hold a JSON object, not list")
    shutil.rmtree(d)
    shutil.copytree(sharded_dir, d)
    shards = sorted(d.glob("*.safetensors"))
    from safetensors.numpy import load_file, save_file

    a, b = load_file(shards[0]), load_file(shards[1])
    name = next(iter(a))
    save_file({**b, name: a[name]}, shards[1])
    _refused(CheckpointError, lambda: load_hf(d), rf"tensor '{re.escape(name)}' is also in .*{shards[0].name}")


# -- config.json ------------------------------------------------------------------------------------

@pytest.mark.parametrize("edits, exc, match", [
    ({"hidden_size": 0}, CheckpointError, r"hidden_size=0: must be a positive integer"),
    ({"hidden_size": -64}, CheckpointError, r"hidden_size=-64"),
    ({"hidden_size": "64"}, CheckpointError, r"hidden_size='64': must be a positive integer"),
    ({"hidden_size": 64.5}, CheckpointError, r"hidden_size=64.5"),
    ({"hidden_size": None}, CheckpointError, r"hidden_size=None"),
    ({"hidden_size": ...}, CheckpointError, r"lacks the field 'hidden_size'"),
    ({"vocab_size": True}, CheckpointError, r"vocab_size=True"),
    ({"num_attention_heads": 3, "head_dim": ...}, CheckpointError,
     r"hidden_size=64 is not divisible by num_attention_heads=3 \(and head_dim is absent\)"),
    ({"num_attention_heads": [4, 4]}, CheckpointError, r"num_attention_heads=\[4, 4\]"),
    ({"num_key_value_heads": 0}, CheckpointError, r"num_key_value_heads=0"),
    ({"num_key_value_heads": 3}, UnsupportedModelError, r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ({"head_dim": 0}, CheckpointError, r"head_dim=0"),
    ({"num_hidden_layers": 2**31 - 1}, CheckpointError, r"num_hidden_layers=2147483647, but the checkpoint has tensors for 2"),
    ({"num_hidden_layers": 10**30}, CheckpointError, r"num_hidden_layers=1000000000000000000000000000000: must be"),
    ({"tie_word_embeddings": "false"}, CheckpointError, r"tie_word_embeddings='false': must be true or false"),
    ({"rms_norm_eps": -1e-5}, CheckpointError, r"rms_norm_eps=-1e-05: must be a finite positive number"),
    ({"rope_parameters": ..., "rope_theta": "big"}, CheckpointError, r"rope_theta='big'"),
    ({"rope_parameters": {"rope_type": "linear", "factor": "x"}}, CheckpointError, r"rope_scaling factor='x'"),
    ({"rope_parameters": [1, 2]}, CheckpointError, r"rope_parameters=\[1, 2\]: must be a mapping or null"),
    ({"rope_parameters": ..., "rope_scaling": [1, 2]}, CheckpointError, r"rope_scaling=\[1, 2\]: must be a mapping"),
    ({"model_type": ["llama"]}, UnsupportedModelError, r"model_type \['llama'\].*supported: llama"),
    ({"eos_token_id": "</s>"}, CheckpointError, r"eos_token_id='</s>'"),
], ids=lambda v: "-".join(f"{k}={str(x)[:12]}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_config_json_values(ckpt, edits, exc, match):
    cfg = json.loads((ckpt / "config.json").read_text())
    for field, value in edits.items():
        if value is ...:
            del cfg[field]
        else:
            cfg[field] = value
    (ckpt / "config.json").write_text(json.dumps(cfg))
    if "checkpoint has tensors" not in match:  # that one needs the weights' headers too
        _refused(exc, lambda: read_config(ckpt), "config.json", match)
    _refused(exc, lambda: load_hf(ckpt), "config.json", match)


@pytest.mark.parametrize("text, match", [
    (lambda t: t[: len(t) // 2], r"cannot parse config.json \(JSONDecodeError"),
    (lambda t: "[1, 2, 3]", r"config.json must hold a JSON object, not list"),
    (lambda t: "null", r"config.json must hold a JSON object, not NoneType"),
    (lambda t: "[" * 100_000, r"cannot parse config.json \((RecursionError|JSONDecodeError)"),
], ids=["truncated", "list", "null", "deep"])
def test_config_json_unreadable(ckpt, text, match):
    f = ckpt / "config.json"
    f.write_text(text(f.read_text()))
    _refused(CheckpointError, lambda: load_hf(ckpt), "config.json", match)


def test_config_json_not_utf8(ckpt):
    (ckpt / "config.json").write_bytes(b'{"model_type": "\xff\xfe"}')
    _refused(CheckpointError, lambda: load_hf(ckpt), r"config.json: cannot parse config.json")


# -- pickle ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth", "last.ckpt"])
def test_pickle_weights_refused(ckpt, name):
    (ckpt / "model.safetensors").unlink()
    (ckpt / name).write_bytes(b"\x80\x04\x95 pickle that must never be loaded")
    for target in (ckpt, ckpt / name):
        err = _refused(CheckpointError, lambda: load(target), rf"{name}: pickle-based PyTorch weights",
                       "arbitrary code", "safetensors")
        assert isinstance(err, JQuantError)
    _refused(CheckpointError, lambda: load_hf(ckpt / name), rf"{name}: pickle-based")


def test_no_unpickling_anywhere():
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|joblib\.load|dill\.load")
    hits = [f"{p.relative_to(REPO)}:{i}" for folder in ("jquant", "pallas_kernels", "benchmarks", "scripts")
            for p in (REPO / folder).rglob("*.py")
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


# -- weights that are not finite --------------------------------------------------------------------

def test_nan_weights_refused(tmp_path, tiny, ckpt):
    from safetensors.numpy import load_file, save_file

    from jquant.errors import NonFiniteError

    w = np.ones((160, 64), np.float32)
    w[3, :5] = np.nan
    f = tmp_path / "m.gguf"
    write_gguf(f, tiny, replace={"blk.1.ffn_up.weight": w})
    _refused(NonFiniteError, lambda: load_gguf(f, tokenizer=False),
             r"m.gguf: tensor 'blk.1.ffn_up.weight' \(F32\): 5 of 10240 values are NaN or Inf")
    tensors = load_file(ckpt / "model.safetensors")
    tensors[W] = np.full((160, 64), np.inf, np.float32)
    save_file(tensors, ckpt / "model.safetensors")
    _refused(NonFiniteError, lambda: load_hf(ckpt), rf"model.safetensors: tensor '{W}' \(F32\): 10240 of 10240")
