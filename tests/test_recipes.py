"""Recipes: every shipped one loads; every key of a recipe is checked."""

import pytest

from jquant import recipes
from jquant.errors import SpecError
from jquant.quantizers import needs_data

GOOD_RULE = {"pattern": "_proj/kernel$", "spec": {"bits": 4, "group_size": 64, "symmetric": False}}


@pytest.mark.parametrize("name", recipes.available())
def test_shipped_recipes_load(name):
    r = recipes.load_recipe(name)
    assert r.rules and r.name == name
    if any(needs_data(s) for _, s in r.rules):  # data-driven recipes say how to calibrate
        assert {"text", "windows"} <= set(r.calibration)


def test_hqq_recipes_name_hqq():
    for name in ("hqq_w4_g64", "hqq_w3_g64", "hqq_w2_g32", "hqq_w2_g16"):
        (_, spec), = recipes.load_recipe(name).rules
        assert spec.method == "hqq" and not spec.symmetric


def test_activation_and_kv_cache_sections():
    r = recipes.load_recipe("w8a8_kv8")
    assert len(r.activations) == 1 and r.activations[0][1].bits == 8 and r.kv_cache.symmetric is False
    again = recipes.recipe_from_dict(r.to_dict(), "again")
    assert again.activations == r.activations and again.kv_cache == r.kv_cache
    assert "activations" not in recipes.load_recipe("rtn_w4_g64").to_dict()
    for doc, match in [
        ({"rules": [], "activations": {"pattern": "x"}}, r"'activations' must be a list"),
        ({"rules": [], "activations": [{"pattern": "x"}]}, r"activation rule 0 needs exactly"),
        ({"rules": [], "activations": [{"pattern": "x", "spec": {"bits": 12}}]},
         r"activation rule 0 \('x'\): activation quantization bits=12"),
        ({"rules": [], "kv_cache": {"bits": 4, "clip": 0.9}}, r"kv_cache: unknown activation quantization spec key"),
        ({"rules": [], "kv_cache": [4]}, r"kv_cache: activation quantization spec must be a mapping"),
    ]:
        with pytest.raises(SpecError, match=match):
            recipes.recipe_from_dict(doc, "r.yaml")


@pytest.mark.parametrize("doc,match", [
    ({"rules": [GOOD_RULE], "calibation": {}}, r"unknown recipe key\(s\) \['calibation'\]"),
    ({"rules": [GOOD_RULE], "calibration": {"windowz": 4}}, r"unknown calibration key\(s\) \['windowz'\]"),
    ({"rules": [GOOD_RULE], "calibration": {"windows": 0}}, r"calibration windows=0 must be >= 1"),
    ({"rules": [GOOD_RULE], "calibration": {"seq_len": "512"}}, r"seq_len='512' must be an integer"),
    ({"rules": [GOOD_RULE], "calibration": {"windows": 2.5}}, r"windows=2.5 must be an integer"),
    ({"rules": [GOOD_RULE], "calibration": [1]}, r"'calibration' must be a mapping"),
    ({"rules": {"pattern": "x"}}, r"'rules' must be a list"),
    ({"rules": [{"pattern": "x", "spec": None, "sepc": 1}]}, r"unknown key\(s\) \['sepc'\]"),
    ({"rules": [{"pattern": 3, "spec": None}]}, r"pattern must be a string"),
    ({"rules": [{"pattern": "x", "spec": [4]}]}, r"spec must be a mapping or null"),
    ({"rules": [{"pattern": "x", "spec": {"method": "gptq", "options": {"damp": "0.1"}}}]},
     r"rule 0 \('x'\): gptq option damp='0.1' must be of type float"),
    ({"rules": [{"pattern": "x", "spec": {"bitz": 4}}]}, r"unknown QuantSpec field"),
])
def test_bad_recipes(doc, match):
    with pytest.raises(SpecError, match=match):
        recipes.recipe_from_dict(doc, "r.yaml")


BOMB = ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
        "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
        "rules: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n")


@pytest.mark.parametrize("text, match", [
    (b"rules: []\nname: \xff\xfe\n", r"a recipe must be UTF-8 text"),
    (b"rules: " + b"[" * 1000 + b"]" * 1000, r"invalid YAML: RecursionError"),
    (b"rules: []\ndate: 2001-13-45\n", r"invalid YAML: ValueError"),
    (BOMB.encode(), r"expands to more than 100000 values \(nested YAML aliases\?\)"),
    (b"&a [*a]", r"needs a 'rules' list"),
    (b"rules: &r [*r]", r"expands to more than 100000 values"),
    (b"rules: []\nname: [1, 2]\n", r"name must be a string, got \[1, 2\]"),
    (b"rules: !!python/object/apply:os.system ['echo pwned']\n", r"invalid YAML: ConstructorError"),
], ids=["utf8", "deep", "timestamp", "alias-bomb", "self-ref", "self-ref-rules", "name", "python-tag"])
def test_hostile_recipe_files(tmp_path, text, match):
    """Found by the fuzzer (tests/models/test_fuzz_files.py): each raised a bare error, or expanded."""
    f = tmp_path / "r.yaml"
    f.write_bytes(text)
    with pytest.raises(SpecError, match=match) as info:
        recipes.load_recipe(str(f))
    assert "r.yaml" in str(info.value) and len(str(info.value)) < 2000


def test_qat_section():
    r = recipes.load_recipe("qat_w2_g32")
    assert r.qat.steps == 200 and r.qat.objective == "kl" and r.rules[0][1].bits == 2
    assert recipes.recipe_from_dict(r.to_dict(), "again") == r
    with pytest.raises(SpecError, match=r"qat: unknown qat settings key\(s\) \['step'\]"):
        recipes.recipe_from_dict({"rules": [GOOD_RULE], "qat": {"step": 3}}, "doc")
    with pytest.raises(SpecError, match=r"qat: QAT objective='mse'; valid: kl, ce"):
        recipes.recipe_from_dict({"rules": [GOOD_RULE], "qat": {"objective": "mse"}}, "doc")
    act_order = {"pattern": "proj/kernel$", "spec": {"method": "gptq", "bits": 2, "group_size": 32,
                                                     "symmetric": False, "options": {"act_order": True}}}
    with pytest.raises(SpecError, match=r"rule 0 .*QAT trains contiguous groups.*static_groups: true"):
        recipes.recipe_from_dict({"rules": [act_order], "qat": {"steps": 3}}, "doc")
    act_order["spec"]["options"]["static_groups"] = True
    assert recipes.recipe_from_dict({"rules": [act_order], "qat": {"steps": 3}}, "doc").qat.steps == 3
    awq = {"pattern": "proj/kernel$", "spec": {"method": "awq", "bits": 4, "group_size": 64}}
    with pytest.raises(SpecError, match=r"qat section after AWQ rules is not supported"):
        recipes.recipe_from_dict({"rules": [awq], "qat": {"steps": 3}}, "doc")


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    f = tmp_path / "r.yaml"
    f.write_text('rules: [{pattern: "x", spec: {bits: 4}}]\nqat: {learning_rate: 5e-5, scale_learning_rate: 1E-4}\n')
    r = recipes.load_recipe(str(f))
    assert r.qat.learning_rate == 5e-5 and r.qat.scale_learning_rate == 1e-4


def test_mesh_field():
    base = {"rules": [{"pattern": "kernel", "spec": {"bits": 4, "method": "gptq"}}]}
    r = recipes.recipe_from_dict({**base, "mesh": "data=2,model=4"})
    assert r.mesh == "data=2,model=4" and r.to_dict()["mesh"] == "data=2,model=4"
    assert recipes.recipe_from_dict(r.to_dict()) == r
    assert recipes.recipe_from_dict(base).mesh is None and "mesh" not in recipes.recipe_from_dict(base).to_dict()
    for bad, match in [("data=two", "integer"), ("tensor=2", "unknown axis"), (8, "must be a string")]:
        with pytest.raises(SpecError, match=match):
            recipes.recipe_from_dict({**base, "mesh": bad}, "r.yaml")


def _more_bits_reference(n):
    """llama.cpp's use_more_bits, written out from its C source (integer division; C's % on a
    negative left operand is never reached because the first test already holds there)."""
    return [i for i in range(n) if i < n // 8 or i >= (7 * n) // 8 or (i >= n // 8 and (i - n // 8) % 3 == 2)]


def test_layer_selection_more_bits_and_indices():
    from jquant.spec import compile_rules, match

    # llama.cpp on a 32-layer Llama: attn_v/ffn_down of layers 0-3, 6, 9, ..., 27, 28-31 get Q6_K
    assert recipes.select_layers("more_bits", 32, "r") == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for n in (1, 2, 3, 8, 22, 30, 80):
        assert recipes.select_layers("more_bits", n, "r") == _more_bits_reference(n), n
    r = recipes.load_recipe("q4_k_m")
    assert r.layers == ("more_bits", None, None)
    assert recipes.recipe_from_dict(r.to_dict(), "again") == r  # the selection survives the manifest
    bound = r.for_model(30)
    assert bound.layers == () and bound.for_model(30) == bound
    rules = compile_rules(bound.rules)
    fmt = {p: match(p, rules)[1].format for p in
           ("layers/0/self_attn/v_proj/kernel", "layers/3/self_attn/v_proj/kernel", "layers/5/mlp/down_proj/kernel",
            "layers/15/mlp/down_proj/kernel", "layers/29/mlp/down_proj/kernel", "layers/29/self_attn/q_proj/kernel",
            "layers/2/mlp/up_proj/kernel", "embed_tokens/embedding")}
    assert fmt == {"layers/0/self_attn/v_proj/kernel": "q6_k", "layers/3/self_attn/v_proj/kernel": "q4_k",
                   "layers/5/mlp/down_proj/kernel": "q6_k", "layers/15/mlp/down_proj/kernel": "q4_k",
                   "layers/29/mlp/down_proj/kernel": "q6_k", "layers/29/self_attn/q_proj/kernel": "q4_k",
                   "layers/2/mlp/up_proj/kernel": "q4_k", "embed_tokens/embedding": "int"}
    # a list of indices, negative ones from the end; a pattern anchored on its own still works
    doc = {"rules": [{"pattern": "^layers/\\d+/mlp/down_proj/kernel$", "layers": [0, -1], "spec": {"bits": 8}},
                     {"pattern": "kernel$", "spec": {"bits": 4}}]}
    rules = compile_rules(recipes.recipe_from_dict(doc, "d").for_model(4).rules)
    assert [match(f"layers/{i}/mlp/down_proj/kernel", rules)[1].bits for i in range(4)] == [8, 4, 4, 8]
    assert match("layers/3/mlp/up_proj/kernel", rules)[1].bits == 4
    with pytest.raises(SpecError, match=r"rule 0 .*layer -5 does not exist in a model of 4 layers \(valid: -4 .. 3\)"):
        recipes.recipe_from_dict({**doc, "rules": [{**doc["rules"][0], "layers": [-5]}]}, "d").for_model(4)


@pytest.mark.parametrize("layers, match", [
    ("most_bits", r"layers 'most_bits' is not a known layer set; valid: .*more_bits"),
    ([], r"layers must be a non-empty list of layer indices"),
    ([1.5], r"layers must be a non-empty list"),
    ([True], r"layers must be a non-empty list"),
    (3, r"layers must be a non-empty list"),
])
def test_bad_layer_selections(layers, match):
    with pytest.raises(SpecError, match=match):
        recipes.recipe_from_dict({"rules": [{**GOOD_RULE, "layers": layers}]}, "r.yaml")


def test_q4_k_m_through_the_cli(tiny_llama_dir, tmp_path):
    """The mix on a 2-layer checkpoint (hidden 64, MLP 256): more_bits selects layer 1, whose
    v_proj (64 inputs) falls back from Q6_K to Q8_0 and whose down_proj (256 inputs) keeps
    Q6_K; layer 0 gets Q4_K (v_proj: fallback Q5_0); the tied embedding is int8 per 32 along
    its rows, and the quantized model runs."""
    import json
    import os

    import jax
    import numpy as np

    import jquant as jq
    from jquant import cli
    from jquant.qtensor import is_qtensor

    model, text = tiny_llama_dir
    out = str(tmp_path / "q4km")
    assert cli.main(["quantize", "--model", model, "--recipe", "q4_k_m", "--out", out, "--quiet"]) == 0
    q = jq.restore(os.path.join(out, "params"))
    leaves = {jq.spec.path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(q, is_leaf=is_qtensor)[0]}
    fmt = {p: x.grid.fmt for p, x in leaves.items() if is_qtensor(x)}
    assert fmt["layers/1/self_attn/v_proj/kernel"] == "q8_0" and fmt["layers/1/mlp/down_proj/kernel"] == "q6_k"
    assert fmt["layers/0/self_attn/v_proj/kernel"] == "q5_0" and fmt["layers/0/mlp/down_proj/kernel"] == "q4_k"
    assert fmt["layers/1/mlp/up_proj/kernel"] == "q5_0" and fmt["embed_tokens/embedding"] == "int"
    emb = leaves["embed_tokens/embedding"]
    assert emb.axis == 1 and emb.group_size == 32 and emb.grid.bits == 8
    man = json.load(open(os.path.join(out, "jquant.json")))
    # the manifest keeps the recipe as bound to this model: its layer selection written out
    assert "layers" not in man["recipe"]["rules"][0] and man["recipe"]["rules"][0]["pattern"].startswith(
        "^(?=layers/(?:1)/)")
    assert cli.main(["eval", out, "--text", text, "--seq-len", "64", "--max-windows", "2", "--quiet"]) == 0
    res = json.load(open(os.path.join(out, "eval_text.json")))
    assert np.isfinite(res["kl"]) and 0 < res["kl"] < 0.05  # 4-6 bits and an 8-bit embedding: close to float
