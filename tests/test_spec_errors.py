"""QuantSpec validation, rules, path strings, and the errors users can trigger."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jquant
from jquant import QuantSpec
from jquant.errors import DTypeError, JQuantError, NonFiniteError, ShapeError, SpecError


@pytest.mark.parametrize("kw,pattern", [
    (dict(bits=0), r"bits must be an integer in 1\.\.8, got 0"),
    (dict(bits=9), r"bits must be an integer in 1\.\.8, got 9"),
    (dict(bits=True), r"got True"),
    (dict(bits=4.0), r"got 4\.0"),
    (dict(group_size=0), r"group_size must be an integer >= 1, got 0"),
    (dict(group_size=-32), r"got -32"),
    (dict(format="int5"), r"unknown format 'int5'; valid: int, nf4"),
    (dict(granularity="row"), r"unknown granularity 'row'; valid: tensor, channel, group"),
    (dict(range="minmaxx"), r"unknown range calibration 'minmaxx'; valid: minmax, percentile, mse, kl"),
    (dict(method="awq_nope"), r"unknown method 'awq_nope'; available: rtn"),
    (dict(zero_type="half", symmetric=False), r"unknown zero_type 'half'"),
    (dict(scale_dtype="float8"), r"unknown scale_dtype 'float8'"),
    (dict(word_bits=16), r"word_bits must be 8 or 32, got 16"),
    (dict(format="nf4", bits=3), r"format 'nf4' has 4 bits, got bits=3"),
    (dict(format="nf4", symmetric=False), r"format 'nf4' is symmetric"),
    (dict(bits=1), r"symmetric int grid needs bits >= 2"),
    (dict(bits=4, symmetric=False, full_range=True), r"full_range applies to symmetric int grids only"),
    (dict(format="binary", range="mse"), r"format 'binary' sets its scale by mean-abs; range='mse'"),
    (dict(percentile=0.0), r"percentile must be in \(0, 100\], got 0\.0"),
    (dict(mse_max_shrink=1.0), r"mse options"),
    (dict(kl_bins=1), r"kl options"),
    (dict(axis=1.5), r"axis must be an integer, got 1\.5"),
    (dict(options={"x": [1, 2]}), r"hashable"),
])
def test_spec_validation(kw, pattern):
    with pytest.raises(SpecError, match=pattern):
        QuantSpec(**kw)


def test_spec_defaults_dict_round_trip_and_describe():
    assert QuantSpec().bits == 4 and QuantSpec(format="fp8_e4m3").bits == 8 and QuantSpec(format="binary").bits == 1
    s = QuantSpec(bits=3, group_size=64, symmetric=False, zero_type="float", range="mse", method="gptq",
                  options={"damp": 0.1, "act_order": True})
    assert s.options == (("act_order", True), ("damp", 0.1)) and s.option_dict == {"act_order": True, "damp": 0.1}
    assert QuantSpec.from_dict(s.to_dict()) == s and hash(QuantSpec.from_dict(s.to_dict())) == hash(s)
    assert s.describe() == "gptq int3 g64 asym-fmin mse"
    assert QuantSpec(format="nf4", granularity="channel").describe() == "nf4 channel"
    with pytest.raises(SpecError, match=r"unknown QuantSpec field\(s\) \['bitz'\]"):
        QuantSpec.from_dict({"bitz": 4})
    with pytest.raises(dataclasses_frozen_error()):
        s.bits = 4


def dataclasses_frozen_error():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_error_hierarchy():
    for e in (SpecError, ShapeError, NonFiniteError):
        assert issubclass(e, JQuantError) and issubclass(e, ValueError)
    assert issubclass(DTypeError, JQuantError) and issubclass(DTypeError, TypeError)
    assert issubclass(jquant.errors.CheckpointError, JQuantError)


def w_(shape, seed=0, dtype=np.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(dtype))


def test_group_larger_than_axis_names_path_and_sizes():
    with pytest.raises(ShapeError, match=r"^layers/0/kernel: group_size 128 is larger than axis 0 of shape \(64, 32\) \(64\)"):
        jquant.quantize(w_((64, 32)), QuantSpec(group_size=128), path="layers/0/kernel")
    with pytest.raises(ShapeError, match=r"^enc/w: group_size 64 is larger than axis 1"):
        jquant.quantize_tree({"enc": {"w": w_((64, 32))}}, [("w", QuantSpec(group_size=64, axis=1))])
    # the same group size is fine on the long axis, and channel granularity ignores it
    assert jquant.quantize(w_((64, 32)), QuantSpec(group_size=128, granularity="channel")).scale.shape == (1, 32)


@pytest.mark.parametrize("shape,kw,pattern", [
    ((), {}, "cannot quantize a scalar"),
    ((8, 4), dict(axis=2, group_size=4), r"axis 2 is out of range for shape \(8, 4\)"),
    ((0, 4), dict(group_size=4), r"cannot quantize an empty array of shape \(0, 4\)"),
])
def test_other_shape_errors(shape, kw, pattern):
    with pytest.raises(ShapeError, match=f"^p/q: {pattern}"):
        jquant.quantize(jnp.zeros(shape, jnp.float32), QuantSpec(**kw), path="p/q")


def test_nonfinite_weights_name_path_and_count():
    w = np.array(w_((64, 8)))
    w[3, 1] = np.nan
    w[10, 2] = np.inf
    w[11, 7] = -np.inf
    with pytest.raises(NonFiniteError, match=r"^blk/1/kernel: weight of shape \(64, 8\) has 3 NaN/Inf value\(s\)"):
        jquant.quantize(jnp.asarray(w), QuantSpec(group_size=32), path="blk/1/kernel")
    with pytest.raises(NonFiniteError, match=r"^blk/1: .* has 1 NaN/Inf"):
        jquant.quantize_tree({"blk": [w_((64, 8)), jnp.asarray(w).at[10, 2].set(0).at[11, 7].set(0)]},
                             [("kernel|blk", QuantSpec(group_size=32))])


def test_nonfinite_inf_only_bf16():
    w = w_((32, 4)).astype(jnp.bfloat16).at[0, 0].set(jnp.inf)
    with pytest.raises(NonFiniteError, match="has 1 NaN/Inf"):
        jquant.quantize(w, QuantSpec(group_size=32), path="x")


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
def test_int_input_is_dtype_error(dtype):
    with pytest.raises(DTypeError, match=rf"^emb: can only quantize floating arrays, got dtype {jnp.dtype(dtype).name}"):
        jquant.quantize(jnp.ones((32, 4), dtype), QuantSpec(group_size=32), path="emb")


def test_rule_errors():
    s = QuantSpec()
    with pytest.raises(SpecError, match=r"rule 1: invalid pattern '\(unclosed'"):
        jquant.quantize_tree({"a": w_((128, 4))}, [("a", s), ("(unclosed", s)])
    with pytest.raises(SpecError, match="rules must be a list"):
        jquant.quantize_tree({"a": w_((128, 4))}, s)
    with pytest.raises(SpecError, match=r"rule 0 must be a \(pattern, spec \| None\) pair"):
        jquant.quantize_tree({"a": w_((128, 4))}, [("a", s, "extra")])
    with pytest.raises(SpecError, match=r"rule 0 \('a'\): expected a QuantSpec or None, got dict"):
        jquant.quantize_tree({"a": w_((128, 4))}, [("a", {"bits": 4})])
    with pytest.raises(SpecError, match=r"rule 0: invalid pattern 3"):  # not a string: was a bare TypeError
        jquant.quantize_tree({"a": w_((128, 4))}, [(3, s)])


def test_data_driven_method_in_quantize_tree_names_path():
    spec = QuantSpec(method="gptq")  # valid spec, but quantize_tree is data-free
    with pytest.raises(SpecError, match=r"^dec/w: method 'gptq' needs the input statistic\(s\) \['hessian'\]"):
        jquant.quantize_tree({"dec": {"w": w_((128, 4))}}, [("w", spec)])


def test_path_str():
    tree = {"layers": [{"q_proj": {"kernel": 1}}], "t": (2,)}
    paths = [jquant.path_str(k) for k, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    assert paths == ["layers/0/q_proj/kernel", "t/0"]
    assert jquant.path_str((jax.tree_util.DictKey("a"), jax.tree_util.GetAttrKey("value"))) == "a"
    assert jquant.path_str((jax.tree_util.GetAttrKey("value"), jax.tree_util.GetAttrKey("b"))) == "value/b"



@pytest.mark.parametrize("kw,match", [
    (dict(symmetric="false"), r"symmetric must be a bool"), (dict(full_range="yes"), r"full_range must be a bool"),
    (dict(range="mse", mse_norm=float("nan")), r"mse_norm must be a finite number"),
    (dict(mse_grid=2.5), r"mse_grid must be an integer"), (dict(percentile="99"), r"percentile must be a number"),
    (dict(kl_bins=2.5), r"kl_bins must be an integer"), (dict(method="gptq", options="damp"), r"must be a mapping"),
    (dict(method="gptq", granularity="tensor"), r"granularity 'tensor' is not supported"),
    (dict(method="gptq", options={"damp": float("inf")}), r"damp=inf must be a finite number"),
    (dict(bits=4, symmetric=False, method="awq", options={"damp": 0.5}), r"apply only with then='gptq'"),
])
def test_field_types_and_ignored_options(kw, match):
    with pytest.raises(SpecError, match=match):
        QuantSpec(**kw)


def test_numpy_integers_and_block_formats_asymmetric_flag():
    import numpy as np
    assert QuantSpec(bits=np.int64(4), group_size=np.int64(64)).bits == 4
    assert QuantSpec(format="q4_1", method="kquant", symmetric=False).format == "q4_1"  # ignored by block types
