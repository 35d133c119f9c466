"""Save and restore trees holding QTensors with Orbax.

A checkpoint is one Orbax composite directory with two items: ``arrays`` (every array of
the tree: float leaves and the children of each QTensor) and ``meta`` (JSON: each leaf's
key path, and a QTensor's static metadata: shape, dtype, format, bits, group size…).
Orbax writes into a temporary directory and renames it when complete, so a checkpoint
is either whole or absent; a crash mid-save leaves no half-written checkpoint behind.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jquant.errors import CheckpointError
from jquant.formats import Grid
from jquant.qtensor import QTensor, is_qtensor
from jquant.spec import path_str

FORMAT_VERSION = 1
_PARTS = ("codes", "scale", "zero", "g_idx", "perm", "outlier_idx", "outlier_w")


def _key_json(k) -> list:
    if isinstance(k, jax.tree_util.DictKey):
        return ["dict", k.key if isinstance(k.key, (int, str)) else str(k.key)]
    if isinstance(k, jax.tree_util.SequenceKey):
        return ["seq", k.idx]
    if isinstance(k, jax.tree_util.GetAttrKey):
        return ["attr", k.name]
    return ["other", str(k)]


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp, ocp.Checkpointer(ocp.CompositeCheckpointHandler())


def save(path: str | os.PathLike, tree, *, overwrite: bool = False) -> None:
    """Save ``tree`` (arrays and QTensors) to the directory ``path``, atomically."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    arrays: dict[str, Any] = {}
    leaves_meta = []
    for i, (keypath, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qtensor)[0]):
        name = f"{i:06d}"
        entry: dict[str, Any] = {"path": path_str(keypath), "keys": [_key_json(k) for k in keypath]}
        if is_qtensor(leaf):
            parts = {p: getattr(leaf, p) for p in _PARTS if getattr(leaf, p) is not None}
            arrays[name] = parts
            entry["qtensor"] = {
                "shape": list(leaf.shape), "dtype": leaf.dtype, "grid": leaf.grid._asdict(),
                "granularity": leaf.granularity, "group_size": leaf.group_size, "axis": leaf.axis,
                "word_bits": leaf.word_bits, "method": leaf.method,
                "parts": {p: [list(a.shape), str(a.dtype)] for p, a in parts.items()},
            }
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            arrays[name] = leaf
            entry["array"] = [list(leaf.shape), str(leaf.dtype)]
        else:
            entry["value"] = leaf if isinstance(leaf, (int, float, str, bool)) or leaf is None else repr(leaf)
        leaves_meta.append(entry)
    meta = {"format_version": FORMAT_VERSION, "leaves": leaves_meta}
    ocp, ckptr = _checkpointer()
    # Write beside the target and swap, so an existing checkpoint survives a failed save.
    new, old = path + ".saving", path + ".replaced"
    for stale in (new, old):
        if os.path.exists(stale):
            shutil.rmtree(stale)
    ckptr.save(new, args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)))
    if hasattr(ckptr, "wait_until_finished"):
        ckptr.wait_until_finished()
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(new, path)
    if os.path.exists(old):
        shutil.rmtree(old)


def load_meta(path: str | os.PathLike) -> dict:
    """The JSON metadata of a checkpoint."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    ocp, ckptr = _checkpointer()
    try:
        meta = ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({type(e).__name__}: {e})") from e
    if not isinstance(meta, dict) or meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not a jquant checkpoint of format version {FORMAT_VERSION}")
    return meta


class _Seq(dict):
    """A list under construction (index -> value)."""


def _rebuild(entries: list[dict], values: list[Any]):
    """Nested dicts (dict keys) and lists (sequence keys) from typed key paths."""
    root: dict = {}
    for entry, value in zip(entries, values):
        keys = entry["keys"]
        if not keys:
            return value
        node = root
        for (_, k), (next_kind, _) in zip(keys[:-1], keys[1:]):
            node = node.setdefault(k, _Seq() if next_kind == "seq" else {})
        node[keys[-1][1]] = value

    def finish(node):
        if isinstance(node, _Seq):
            return [finish(node[i]) for i in sorted(node)]
        if isinstance(node, dict):
            return {k: finish(v) for k, v in node.items()}
        return node

    return finish(root)


def restore(path: str | os.PathLike, *, target=None,
            shardings: jax.sharding.Sharding | Callable[[str, str, tuple], jax.sharding.Sharding] | None = None):
    """Restore a tree saved by :func:`save`.

    Args:
      path: the checkpoint directory.
      target: optional tree of the same structure (e.g. an NNX State); when given, the
        result has its exact container types, matched by leaf path.
      shardings: where arrays go: one Sharding for all, or a callable
        ``(leaf_path, part, shape) -> Sharding`` (part is ``array``, ``codes``, ``scale``,
        ``zero`` or ``g_idx``). Default: the default device.
    """
    path = os.path.abspath(os.fspath(path))
    meta = load_meta(path)
    entries = meta["leaves"]

    def sds(leaf_path, part, shape, dtype):
        sh = shardings(leaf_path, part, tuple(shape)) if callable(shardings) else shardings
        if sh is None:
            sh = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.ShapeDtypeStruct(tuple(shape), np.dtype(dtype) if dtype != "bfloat16" else jax.numpy.bfloat16,
                                    sharding=sh)

    abstract: dict[str, Any] = {}
    for i, e in enumerate(entries):
        name = f"{i:06d}"
        if "qtensor" in e:
            abstract[name] = {p: sds(e["path"], p, s, d) for p, (s, d) in e["qtensor"]["parts"].items()}
        elif "array" in e:
            abstract[name] = sds(e["path"], "array", *e["array"])
    ocp, ckptr = _checkpointer()
    try:
        arrays = ckptr.restore(path, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract)))["arrays"]
    except Exception as e:
        raise CheckpointError(f"{path}: cannot restore arrays ({type(e).__name__}: {e})") from e
    values = []
    for i, e in enumerate(entries):
        name = f"{i:06d}"
        if "qtensor" in e:
            m = e["qtensor"]
            parts = arrays[name]
            values.append(QTensor(parts["codes"], parts.get("scale"), parts.get("zero"), parts.get("g_idx"),
                                  shape=tuple(m["shape"]), dtype=m["dtype"], grid=Grid(**m["grid"]),
                                  granularity=m["granularity"], group_size=m["group_size"], axis=m["axis"],
                                  word_bits=m["word_bits"], method=m["method"], perm=parts.get("perm"),
                                  outlier_idx=parts.get("outlier_idx"), outlier_w=parts.get("outlier_w")))
        elif "array" in e:
            values.append(arrays[name])
        else:
            values.append(e["value"])
    if target is None:
        return _rebuild(entries, values)
    by_path = {e["path"]: v for e, v in zip(entries, values)}
    t_leaves, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=is_qtensor)
    out = []
    for keypath, _ in t_leaves:
        p = path_str(keypath)
        if p not in by_path:
            raise CheckpointError(f"{path}: target leaf {p!r} is not in the checkpoint")
        out.append(by_path[p])
    if len(out) != len(entries):
        missing = sorted(set(by_path) - {path_str(k) for k, _ in t_leaves})
        raise CheckpointError(f"{path}: checkpoint leaves {missing[:5]} are not in the target tree")
    return jax.tree_util.tree_unflatten(treedef, out)
