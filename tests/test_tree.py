"""quantize_tree over nested dicts, linen params and NNX State; rules; summary()."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from nnx_models import MLP

import jquant
from jquant import QuantSpec
from jquant.errors import DTypeError, RuleWarning

S4 = QuantSpec(bits=4, group_size=32)
S8C = QuantSpec(bits=8, granularity="channel", symmetric=False)


def rand(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)


def ref_deq(ref, w, spec):
    xg = ref.grouped(np.asarray(w, np.float64), spec.axis, spec.granularity, spec.group_size)
    r = ref.int_grid(xg, spec.bits, spec.symmetric, spec.full_range, spec.zero_type)
    return r, ~np.isnan(xg)


def assert_matches_ref(ref, q, w, spec):
    assert isinstance(q, jquant.QTensor)
    assert (q.bits, q.granularity, q.grid.symmetric) == (spec.bits, spec.granularity, spec.symmetric)
    r, valid = ref_deq(ref, w, spec)
    got = ref.grouped(np.asarray(q.dequantize(jnp.float32), np.float64), spec.axis, spec.granularity, spec.group_size)
    np.testing.assert_allclose(got[valid], r.deq[valid], rtol=1e-6)


def test_nested_dict_first_match_wins_and_none_keeps_float(ref):
    params = {"enc": {"w": rand((64, 32), 0), "b": rand((32,), 1)},
              "dec": {"w": rand((32, 64), 2)},
              "emb": rand((100, 16), 3)}
    rules = [("emb", None), ("enc/w", S4), ("w$", S8C), (".*", QuantSpec(bits=6, granularity="tensor"))]
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuleWarning)  # every rule matched: no warning
        q = jquant.quantize_tree(params, rules, progress=lambda p, s: seen.append((p, s.bits)))
    assert q["emb"] is params["emb"]  # None: untouched
    assert_matches_ref(ref, q["enc"]["w"], params["enc"]["w"], S4)  # first match (enc/w), not w$
    assert_matches_ref(ref, q["dec"]["w"], params["dec"]["w"], S8C)
    assert_matches_ref(ref, q["enc"]["b"], params["enc"]["b"], QuantSpec(bits=6, granularity="tensor"))
    assert sorted(seen) == [("dec/w", 8), ("enc/b", 6), ("enc/w", 4)]
    # QTensor leaves are left alone on a second pass; the float leaf now matches nothing but None
    with pytest.warns(RuleWarning):
        q2 = jquant.quantize_tree(q, rules)
    assert q2["enc"]["w"] is q["enc"]["w"]


def test_linen_params_with_lists(ref):
    params = {"params": {
        "embed": {"embedding": rand((50, 32), 4)},
        "blocks": [{"attn": {"kernel": rand((32, 64), 5), "bias": rand((64,), 6)}},
                   {"attn": {"kernel": rand((32, 64), 7), "bias": rand((64,), 8)}}],
        "head": {"kernel": rand((32, 50), 9, jnp.bfloat16)},
    }}
    rules = [(r"blocks/1/", None), (r"kernel$", S4)]
    q = jquant.quantize_tree(params, rules)
    p, qp = params["params"], q["params"]
    assert isinstance(qp["blocks"], list) and len(qp["blocks"]) == 2
    assert_matches_ref(ref, qp["blocks"][0]["attn"]["kernel"], p["blocks"][0]["attn"]["kernel"], S4)
    assert qp["blocks"][1]["attn"]["kernel"] is p["blocks"][1]["attn"]["kernel"]
    assert qp["blocks"][0]["attn"]["bias"] is p["blocks"][0]["attn"]["bias"]  # unmatched: float
    head = qp["head"]["kernel"]
    assert head.dtype == "bfloat16" and head.dequantize().dtype == jnp.bfloat16
    assert_matches_ref(ref, head, p["head"]["kernel"].astype(jnp.float32), S4)
    # paths in summary() use the same key-path strings the rules see
    paths = [leaf.path for leaf in jquant.summary(q).leaves]
    assert "params/blocks/0/attn/kernel" in paths and "params/embed/embedding" in paths


def test_nnx_state_quantize_update_and_run(ref):
    model = MLP(nnx.Rngs(0))
    state = nnx.state(model)
    orig = {k: (np.asarray(state[k]["kernel"].get_value()), np.asarray(state[k]["bias"].get_value())) for k in ("l1", "l2")}
    q = jquant.quantize_tree(state, [("kernel", S4)])
    assert isinstance(q, nnx.State)
    assert jquant.is_qtensor(q["l1"]["kernel"].get_value()) and not jquant.is_qtensor(q["l1"]["bias"].get_value())
    assert_matches_ref(ref, q["l2"]["kernel"].get_value(), orig["l2"][0], S4)
    nnx.update(model, q)
    assert jquant.is_qtensor(model.l1.kernel.get_value())
    nnx.update(model, jquant.dequantize_tree(nnx.state(model)))
    x = np.random.default_rng(1).standard_normal((5, 64))
    y = np.asarray(model(jnp.asarray(x, jnp.float32)), np.float64)
    # float64 forward pass with the reference-dequantized kernels
    k1 = ref.grouped(orig["l1"][0], 0, "group", 32)
    k1 = ref.int_grid(k1, 4).deq.reshape(-1, 32)[:64]
    k2 = ref.int_grid(ref.grouped(orig["l2"][0], 0, "group", 32), 4).deq.reshape(-1, 8)[:32]
    h = np.maximum(x @ k1 + orig["l1"][1], 0)
    np.testing.assert_allclose(y, h @ k2 + orig["l2"][1], rtol=1e-4, atol=1e-4)


def test_unmatched_rule_warns():
    params = {"a": {"kernel": rand((32, 8), 0)}}
    with pytest.warns(RuleWarning, match="nothing_here"):
        jquant.quantize_tree(params, [("kernel", S4), ("nothing_here", S4)])
    # a rule shadowed by an earlier one never wins, so it warns too
    with pytest.warns(RuleWarning, match="ker"):
        jquant.quantize_tree(params, [("kernel", S4), ("ker", None)])


def test_matched_int_leaf_is_dtype_error_naming_path():
    params = {"layer": {"kernel": rand((32, 8), 0), "step": jnp.arange(4, dtype=jnp.int32)}}
    with pytest.raises(DTypeError, match=r"layer/step.*int32"):
        jquant.quantize_tree(params, [(".*", S4)])
    q = jquant.quantize_tree(params, [("kernel", S4)])  # unmatched int leaf: untouched
    assert q["layer"]["step"] is params["layer"]["step"]


def test_summary_totals_and_bits_per_weight():
    params = {"a": rand((96, 48), 0), "b": rand((96, 48), 1, jnp.bfloat16), "c": rand((48,), 2), "d": rand((64, 16), 3)}
    rules = [("a", QuantSpec(bits=4, group_size=32, symmetric=False)), ("b", QuantSpec(format="nf4", granularity="channel")),
             ("d", QuantSpec(bits=3, group_size=64))]
    q = jquant.quantize_tree(params, rules)
    s = jquant.summary(q)
    # by hand: packed words + float16 scales (+ uint8 zeros)
    a = 12 * 48 * 4 + 3 * 48 * 2 + 3 * 48       # 96 four-bit codes = 12 uint32 per column, 3 groups
    b = 12 * 48 * 4 + 48 * 2                    # nf4 channel
    c = 48 * 4                                  # float32 bias
    d = 6 * 16 * 4 + 16 * 2                     # 64 three-bit codes = 2 blocks of 3 words per column
    by_path = {x.path: x for x in s.leaves}
    assert {k: v.nbytes for k, v in by_path.items()} == {"a": a, "b": b, "c": c, "d": d}
    assert s.nbytes == a + b + c + d == sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(
        q, is_leaf=jquant.is_qtensor))
    assert s.numel == 2 * 96 * 48 + 48 + 64 * 16
    assert s.bits_per_weight == pytest.approx(8 * (a + b + c + d) / s.numel)
    assert [x.path for x in s.quantized] == ["a", "b", "d"]
    assert s.quantized_bits_per_weight == pytest.approx(8 * (a + b + d) / (2 * 96 * 48 + 64 * 16))
    assert by_path["a"].bits_per_weight == pytest.approx(8 * a / (96 * 48))
    assert by_path["a"].bits_per_weight == pytest.approx(4 + 16 / 32 + 8 / 32)
    assert by_path["c"].kind == "float32" and by_path["a"].kind == "int4 g32 asym" and by_path["b"].kind == "nf4 channel"
    table = s.table()
    assert "int4 g32 asym" in table and "3/4 quantized" in table and f"{s.nbytes:,}" in table


def test_summary_int_leaf_is_not_quantized():
    q = jquant.quantize_tree({"w": rand((32, 8), 0), "step": jnp.zeros((), jnp.int32)}, [("w", S4)])
    s = jquant.summary(q)
    assert [x.path for x in s.quantized] == ["w"]
