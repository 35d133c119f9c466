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
