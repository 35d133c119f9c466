"""Orbax save/restore of trees holding QTensors of every kind."""

import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from nnx_models import MLP

import jquant
from jquant import QuantSpec
from jquant.errors import CheckpointError

META = ("shape", "dtype", "grid", "granularity", "group_size", "axis", "word_bits", "method")


def rand(shape, seed, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape).astype(np.float32)).astype(dtype)


def make_tree():
    act = jquant.quantize(rand((96, 16), 4), QuantSpec(bits=4, group_size=32, symmetric=False))
    g_idx = jnp.asarray(np.random.default_rng(9).permutation(96) // 32, jnp.int32)  # act-order groups
    return {
        "sym": jquant.quantize(rand((64, 16), 0), QuantSpec(bits=4, group_size=32)),
        "asym": jquant.quantize(rand((64, 16), 1), QuantSpec(bits=3, group_size=32, symmetric=False, word_bits=8)),
        "fmin": jquant.quantize(rand((64, 16), 2, jnp.bfloat16),
                                QuantSpec(bits=4, group_size=32, symmetric=False, zero_type="float")),
        "nf4": jquant.quantize(rand((16, 64), 3), QuantSpec(format="nf4", granularity="channel", axis=1)),
        "act": dataclasses.replace(act, g_idx=g_idx),
        "float": {"bias": rand((16,), 5), "emb": rand((10, 8), 6, jnp.bfloat16)},
        "layers": [rand((4,), 7), {"w": jquant.quantize(rand((32, 8), 8), QuantSpec(format="ternary", group_size=16))}],
        "step": 7,  # a Python scalar leaf, kept in the JSON metadata
    }


def assert_same_tree(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a, is_leaf=jquant.is_qtensor)
    lb, tb = jax.tree_util.tree_flatten_with_path(b, is_leaf=jquant.is_qtensor)
    assert [jquant.path_str(k) for k, _ in la] == [jquant.path_str(k) for k, _ in lb]
    for (k, x), (_, y) in zip(la, lb):
        assert type(x) is type(y) or not jquant.is_qtensor(x), jquant.path_str(k)
        if jquant.is_qtensor(x):
            assert jquant.is_qtensor(y)
            for m in META:
                assert getattr(x, m) == getattr(y, m), (jquant.path_str(k), m)
            for part in ("codes", "scale", "zero", "g_idx"):
                u, v = getattr(x, part), getattr(y, part)
                assert (u is None) == (v is None), (jquant.path_str(k), part)
                if u is not None:
                    assert u.dtype == v.dtype and u.shape == v.shape
                    np.testing.assert_array_equal(np.asarray(u).view(np.uint8), np.asarray(v).view(np.uint8))
        elif isinstance(x, int):
            assert x == y and type(y) is int
        else:
            assert x.dtype == y.dtype and x.shape == y.shape
            np.testing.assert_array_equal(np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    tree = make_tree()
    path = tmp_path_factory.mktemp("ckpt") / "model"
    jquant.save(path, tree)
    return tree, path


def test_round_trip_without_target(saved):
    tree, path = saved
    out = jquant.restore(path)
    assert isinstance(out, dict) and isinstance(out["layers"], list) and isinstance(out["layers"][1], dict)
    assert_same_tree(tree, out)
    assert out["act"].g_idx.dtype == jnp.int32 and out["fmin"].dtype == "bfloat16"
    np.testing.assert_array_equal(np.asarray(out["act"].dequantize()), np.asarray(tree["act"].dequantize()))
    np.testing.assert_array_equal(np.asarray(out["fmin"].dequantize(jnp.float32)),
                                  np.asarray(tree["fmin"].dequantize(jnp.float32)))


def test_round_trip_with_target_and_shardings(saved):
    tree, path = saved
    out = jquant.restore(path, target=tree)
    assert jax.tree_util.tree_structure(out, is_leaf=jquant.is_qtensor) == \
        jax.tree_util.tree_structure(tree, is_leaf=jquant.is_qtensor)
    assert_same_tree(tree, out)
    mesh = Mesh(np.array(jax.devices()[:1]), ("x",))
    sh = NamedSharding(mesh, P())
    out = jquant.restore(path, shardings=sh)
    assert_same_tree(tree, out)
    assert all(a.sharding == sh for a in jax.tree_util.tree_leaves(out) if not isinstance(a, int))
    calls = []

    def pick(leaf_path, part, shape):
        calls.append((leaf_path, part, shape))
        return jax.sharding.SingleDeviceSharding(jax.devices()[0])

    assert_same_tree(tree, jquant.restore(path, shardings=pick))
    assert ("sym", "codes", (8, 16)) in calls and ("act", "g_idx", (96,)) in calls
    assert ("float/bias", "array", (16,)) in calls and ("layers/1/w", "scale", (2, 8)) in calls
    assert not any(p == "sym" and part == "zero" for p, part, _ in calls)


def test_target_mismatch_is_checkpoint_error(saved):
    tree, path = saved
    extra = dict(tree, new=jnp.ones(3))
    with pytest.raises(CheckpointError, match="'new'"):
        jquant.restore(path, target=extra)
    fewer = {k: v for k, v in tree.items() if k != "sym"}
    with pytest.raises(CheckpointError, match="sym"):
        jquant.restore(path, target=fewer)


def test_nnx_state_target(tmp_path):
    model = MLP(nnx.Rngs(0))
    q = jquant.quantize_tree(nnx.state(model), [("kernel", QuantSpec(bits=4, group_size=32))])
    jquant.save(tmp_path / "nnx", q)
    fresh = MLP(nnx.Rngs(1))  # same structure, other values
    out = jquant.restore(tmp_path / "nnx", target=nnx.state(fresh))
    assert isinstance(out, nnx.State)
    assert_same_tree(q, out)
    nnx.update(fresh, jquant.dequantize_tree(out))
    nnx.update(model, jquant.dequantize_tree(q))
    x = rand((3, 64), 2)
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(model(x)))


def test_refuses_overwrite(tmp_path):
    a = {"w": jquant.quantize(rand((32, 8), 0), QuantSpec(bits=4, group_size=32))}
    b = {"w": jquant.quantize(rand((32, 8), 1), QuantSpec(bits=8, group_size=16))}
    jquant.save(tmp_path / "c", a)
    with pytest.raises(CheckpointError, match="overwrite=True"):
        jquant.save(tmp_path / "c", b)
    assert_same_tree(a, jquant.restore(tmp_path / "c"))
    jquant.save(tmp_path / "c", b, overwrite=True)
    assert_same_tree(b, jquant.restore(tmp_path / "c"))
    assert not [p for p in os.listdir(tmp_path) if p != "c"]  # no temporary directory left behind


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        jquant.restore(tmp_path / "absent")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "garbage.bin").write_bytes(b"\x00\x01not a checkpoint")
    with pytest.raises(CheckpointError, match="junk"):
        jquant.restore(junk)
    tree = {"w": jquant.quantize(rand((32, 8), 0), QuantSpec(bits=4, group_size=32)), "b": rand((8,), 1)}
    jquant.save(tmp_path / "ok", tree)
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "ok", broken)
    shutil.rmtree(broken / "arrays")
    with pytest.raises(CheckpointError, match="broken"):
        jquant.restore(broken)
    no_meta = tmp_path / "no_meta"
    shutil.copytree(tmp_path / "ok", no_meta)
    shutil.rmtree(no_meta / "meta")
    with pytest.raises(CheckpointError, match="no_meta"):
        jquant.restore(no_meta)


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import jquant.checkpoint as ck

    old = {"w": jquant.quantize(rand((64, 8), 3), QuantSpec(bits=4, group_size=32))}
    path = tmp_path / "ck"
    jquant.save(path, old)
    real = ck._checkpointer

    class Crash(Exception):
        pass

    def crashing():
        ocp, ckptr = real()

        class C:
            def save(self, *a, **k):
                raise Crash

        return ocp, C()

    monkeypatch.setattr(ck, "_checkpointer", crashing)
    with pytest.raises(Crash):
        jquant.save(path, {"w": rand((64, 8), 4)}, overwrite=True)
    monkeypatch.setattr(ck, "_checkpointer", real)
    back = jquant.restore(path)
    np.testing.assert_array_equal(np.asarray(back["w"].codes), np.asarray(old["w"].codes))
    jquant.save(path, {"w": rand((64, 8), 4)}, overwrite=True)  # a later good save replaces it
    assert not jquant.is_qtensor(jquant.restore(path)["w"])


# ---------------------------------------------------------------------------------------
# Integrity: checksums, manifest, version, target, QTensor parts
# ---------------------------------------------------------------------------------------
import json  # noqa: E402
import re  # noqa: E402
import warnings  # noqa: E402

from jquant.errors import CheckpointWarning, NonFiniteError, ShapeError  # noqa: E402


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_meta(ckpt, fn, digest=True):
    """Edit a checkpoint's metadata; with ``digest``, as a consistent writer would (the digest
    recomputed), to reach the checks behind it; without, as damage does."""
    p = ckpt / "meta" / "metadata"
    meta = json.loads(p.read_text())
    fn(meta)
    if digest and "digest" in meta:
        meta["digest"] = jquant.checkpoint._meta_digest(meta)
    p.write_text(json.dumps(meta))


def _data_files(ckpt):
    files = [os.path.join(r, f) for r, _, fs in os.walk(ckpt / "arrays") for f in fs
             if os.sep + "d" + os.sep in os.path.join(r, f)]
    return sorted(files, key=os.path.getsize, reverse=True)


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    tree = {"w": jquant.quantize(rand((512, 256), 0), QuantSpec(bits=4, group_size=32, symmetric=False)),
            "emb": rand((256, 256), 1), "norm": rand((256,), 2, jnp.bfloat16)}
    path = tmp_path_factory.mktemp("big") / "ck"
    jquant.save(path, tree)
    return tree, path


def test_checksums_are_saved(big):
    tree, path = big
    meta = jquant.checkpoint.load_meta(path)
    assert meta["format_version"] == jquant.checkpoint.FORMAT_VERSION == 3
    assert meta["digest"] == jquant.checkpoint._meta_digest(meta)
    by = {e["path"]: e for e in meta["leaves"]}
    assert set(by["w"]["sha256"]) == {"codes", "scale", "zero"} and set(by["emb"]["sha256"]) == {"array"}
    import hashlib

    assert by["emb"]["sha256"]["array"] == hashlib.sha256(np.asarray(tree["emb"]).tobytes()).hexdigest()


@pytest.mark.parametrize("where", [0.0, 0.2, 0.45, 0.7, 0.97, 1.0])
def test_zeroed_bytes_in_the_data_are_caught_naming_the_leaf(big, tmp_path, where):
    """64 zero bytes anywhere in the largest Orbax data file: Orbax alone sometimes reads the
    damaged chunk without complaint; the checksums (or the failing read) name the leaf. The
    last couple of hundred bytes of the file are not array data (Orbax restores the same
    arrays without them): there the restore must be bit-identical instead."""
    tree, path = big
    ck = _copy(path, tmp_path / "ck")
    f = _data_files(ck)[0]
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.seek(min(int(where * size), size - 64))
        fh.write(b"\0" * 64)
    if where == 1.0:
        try:
            out = jquant.restore(ck)
        except CheckpointError as e:
            assert re.search(r"leaf '(w|emb|norm)'", str(e)), str(e)
        else:
            assert_same_tree(tree, out)
        return
    with pytest.raises(CheckpointError, match=r"leaf '(w|emb|norm)'"):
        jquant.restore(ck)


def test_target_of_other_shape_or_dtype(big):
    tree, path = big
    with pytest.raises(CheckpointError, match=r"leaf 'emb': the checkpoint holds an array of shape \(256, 256\) "
                                              r"float32, the target an array of shape \(256, 128\) float32"):
        jquant.restore(path, target=dict(tree, emb=jnp.zeros((256, 128))))
    with pytest.raises(CheckpointError, match=r"leaf 'norm': .*\(256,\) bfloat16, the target .*\(256,\) float32"):
        jquant.restore(path, target=dict(tree, norm=jnp.zeros((256,))))
    with pytest.raises(CheckpointError, match=r"leaf 'w': the checkpoint holds a QTensor of logical shape \(512, 256\) "
                                              r"float32, the target an array of shape \(256, 512\) float32"):
        jquant.restore(path, target=dict(tree, w=jnp.zeros((256, 512))))
    out = jquant.restore(path, target=dict(tree, w=jnp.zeros((512, 256))))  # a float target of the same shape
    assert jquant.is_qtensor(out["w"])


@pytest.mark.parametrize("damage, words", [
    (lambda p: p.write_text(p.read_text()[: len(p.read_text()) // 2]), ["cannot read checkpoint metadata"]),
    (lambda p: p.write_text("not json {"), ["cannot read checkpoint metadata"]),
    (lambda p: p.write_text("[1, 2]"), ["format_version None", "readable: 1, 2, 3"]),
    (lambda p: p.write_text(p.read_text().replace('"format_version": 3', '"format_version": 7')),
     ["format_version 7", "readable: 1, 2, 3"]),
    (lambda p: p.write_text(p.read_text().replace('"keys"', '"kees"')), ["metadata entry of", "malformed"]),
    (lambda p: p.write_text(p.read_text().replace('"sha256"', '"sha"')), ["malformed", "SHA-256 (64 hex digits)"]),
    (lambda p: p.unlink(), ["cannot read checkpoint metadata"]),
])
def test_damaged_manifest(big, tmp_path, damage, words):
    _, path = big
    ck = _copy(path, tmp_path / "ck")
    damage(ck / "meta" / "metadata")
    with pytest.raises(CheckpointError) as ei:
        jquant.restore(ck)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def _first(kind):
    return lambda m: next(e for e in m["leaves"] if kind in e)


@pytest.mark.parametrize("edit, words", [
    (lambda m: _first("qtensor")(m)["qtensor"]["parts"]["scale"].__setitem__(1, "0"), ["part 'scale'", "dtype '0'"]),
    (lambda m: _first("qtensor")(m)["qtensor"]["parts"]["codes"].__setitem__(0, [-1, 3]), ["part 'codes'", ">= 0"]),
    (lambda m: _first("array")(m)["array"].__setitem__(0, [True, 2]), ["part 'array'", "sizes >= 0"]),
    (lambda m: _first("qtensor")(m)["qtensor"].__setitem__("word_bits", 7), ["QTensor field"]),
    (lambda m: _first("qtensor")(m)["qtensor"].__setitem__("group_size", "32"), ["QTensor field"]),
    (lambda m: _first("qtensor")(m)["qtensor"]["parts"].__setitem__("bogus", [[1], "uint8"]), ["QTensor field"]),
    (lambda m: _first("qtensor")(m)["sha256"].__setitem__("codes", "zz"), ["SHA-256"]),
    (lambda m: _first("array")(m).__setitem__("keys", [["seq", "x"]]), ["key ['seq', 'x']"]),
    (lambda m: _first("array")(m).__setitem__("keys", _first("qtensor")(m)["keys"]), ["repeats another leaf"]),
    (lambda m: _first("array")(m).__setitem__("keys", _first("qtensor")(m)["keys"] + [["dict", "x"]]),
     ["do not form one tree"]),
])
def test_metadata_fields_of_wrong_type_or_range(big, tmp_path, edit, words):
    """Found by fuzzing: each field of the metadata is checked before it is used (a dtype of
    '0' was a bare TypeError from numpy, a key path of another leaf's a silent merge)."""
    _, path = big
    ck = _copy(path, tmp_path / "ck")
    _edit_meta(ck, edit)
    with pytest.raises(CheckpointError) as ei:
        jquant.restore(ck)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_missing_item_and_missing_leaf(big, tmp_path):
    _, path = big
    ck = _copy(path, tmp_path / "ck")
    shutil.rmtree(ck / "arrays")
    with pytest.raises(CheckpointError, match="cannot restore arrays"):
        jquant.restore(ck)
    ck2 = _copy(path, tmp_path / "ck2")  # a leaf the metadata lists but the arrays do not hold
    _edit_meta(ck2, lambda m: m["leaves"].append(dict(m["leaves"][0], path="extra", keys=[["dict", "extra"]])))
    with pytest.raises(CheckpointError, match="cannot restore arrays"):
        jquant.restore(ck2)


def test_qtensor_metadata_disagreeing_with_parts(big, tmp_path):
    _, path = big
    ck = _copy(path, tmp_path / "ck")

    def regroup(m):
        e = next(e for e in m["leaves"] if e["path"] == "w")
        e["qtensor"]["group_size"] = 64  # parts still hold 16 groups of 32

    _edit_meta(ck, regroup)
    with pytest.raises(CheckpointError, match=r"leaf 'w': its QTensor parts disagree with its metadata: .*scale has "
                                              r"shape \(16, 256\), expected \(8, 256\)"):
        jquant.restore(ck)


def test_non_finite_scales_refused_on_save_and_restore(tmp_path, monkeypatch):
    qt = jquant.quantize(rand((64, 8), 0), QuantSpec(bits=4, group_size=32))
    bad = {"a": {"w": dataclasses.replace(qt, scale=qt.scale.at[0, 1].set(jnp.inf))}}
    with pytest.raises(NonFiniteError, match=r"a/w: 1 of 16 stored scale value\(s\) are NaN/Inf"):
        jquant.save(tmp_path / "c", bad)
    assert not os.path.exists(tmp_path / "c")
    import jquant.checkpoint as ck

    monkeypatch.setattr(ck, "check_values", lambda *a, **k: None)  # a writer that did not check
    jquant.save(tmp_path / "c", bad)
    monkeypatch.undo()
    with pytest.raises(NonFiniteError, match=r"leaf 'a/w': 1 of 16 stored scale value\(s\) are NaN/Inf"):
        jquant.restore(tmp_path / "c")
    wrong = {"w": dataclasses.replace(qt, perm=jnp.zeros(64, jnp.int32))}
    with pytest.raises(ShapeError, match="w: perm repeats rows"):
        jquant.save(tmp_path / "d", wrong)


def test_version_1_without_checksums_loads_with_a_warning(big, tmp_path):
    tree, path = big
    ck = _copy(path, tmp_path / "ck")

    def downgrade(m):
        m["format_version"] = 1
        m.pop("digest")
        for e in m["leaves"]:
            e.pop("sha256", None)

    _edit_meta(ck, downgrade)
    with pytest.warns(CheckpointWarning, match="format version 1 has no checksums"):
        out = jquant.restore(ck)
    assert_same_tree(tree, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jquant.restore(path)  # a checksummed one restores without a warning


def _qt_meta(m):
    return next(e["qtensor"] for e in m["leaves"] if "qtensor" in e)


@pytest.mark.parametrize("edit", [
    lambda m: m["leaves"][0]["keys"][0].__setitem__(1, "x"),  # a leaf renamed (found by fuzzing)
    lambda m: _qt_meta(m)["grid"].__setitem__("bits", 7),
    lambda m: _qt_meta(m)["grid"].__setitem__("scale_dtype", "bfloat16"),
    lambda m: _qt_meta(m)["grid"].__setitem__("zero_type", "float"),
    lambda m: m.__setitem__("digest", "0" * 64),
    lambda m: m.pop("digest"),
])
def test_edited_metadata_is_refused_by_its_digest(big, tmp_path, edit):
    """Format 3: the metadata carries the SHA-256 of its own canonical JSON; an edit that
    leaves it well-formed (a renamed leaf, another bit width or scale dtype: each restored
    other values without error under format 2) is refused, and so is a missing digest."""
    _, path = big
    ck = _copy(path, tmp_path / "ck")
    _edit_meta(ck, edit, digest=False)
    with pytest.raises(CheckpointError, match="does not match its digest"):
        jquant.restore(ck)


def test_format_2_without_digest_still_loads(big, tmp_path):
    tree, path = big
    ck = _copy(path, tmp_path / "ck")

    def downgrade(m):
        m["format_version"] = 2
        m.pop("digest")

    _edit_meta(ck, downgrade)
    assert_same_tree(tree, jquant.restore(ck))
