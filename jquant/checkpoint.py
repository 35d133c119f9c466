"""Save and restore trees holding QTensors with Orbax.

A checkpoint is one Orbax composite directory with two items: ``arrays`` (every array of
the tree: float leaves and the children of each QTensor) and ``meta`` (JSON: each leaf's
key path, and a QTensor's static metadata: shape, dtype, format, bits, group size…).
Orbax writes into a temporary directory and renames it when complete, so a checkpoint
is either whole or absent; a crash mid-save leaves no half-written checkpoint behind.

Integrity (format version 2): the metadata holds the SHA-256 of every array's bytes
(``sha256``: ``{part: hex}``, part ``array`` for a float leaf), verified on restore, so a
flipped or zeroed byte in the Orbax data files is a :class:`CheckpointError` naming the
leaf (Orbax reads some damaged chunks without complaint). QTensor parts are checked
against their metadata (:func:`jquant.qtensor.check_parts`) and their values (finite
scales, indices in range: :func:`jquant.qtensor.check_values`) on save and on restore.
Format version 3 adds ``digest``, the SHA-256 of the metadata itself (its canonical JSON
without the digest), verified once the metadata's structure is checked: an edited leaf name, bit width or scale
dtype in the JSON (found by fuzzing: 14 in 10,000 mutated checkpoints restored other values
without error under version 2) is a :class:`CheckpointError`. Version-2 checkpoints (no
digest) and version-1 ones (no checksums either) still load, the latter with a
:class:`CheckpointWarning`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jquant.errors import CheckpointError, CheckpointWarning, JQuantError, at
from jquant.formats import Grid
from jquant.qtensor import QTensor, check_parts, check_values, is_qtensor
from jquant.spec import path_str

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)  # 1: without checksums; 2: without the metadata's digest
_PARTS = ("codes", "scale", "zero", "g_idx", "perm", "outlier_idx", "outlier_w")


def _key_json(k) -> list:
    if isinstance(k, jax.tree_util.DictKey):
        return ["dict", k.key if isinstance(k.key, (int, str)) else str(k.key)]
    if isinstance(k, jax.tree_util.SequenceKey):
        return ["seq", k.idx]
    if isinstance(k, jax.tree_util.GetAttrKey):
        return ["attr", k.name]
    return ["other", str(k)]


def _digest(a) -> str:
    """SHA-256 of an array's bytes (C order, as stored; copied to the host if on a device)."""
    v = np.ascontiguousarray(np.asarray(a))
    return hashlib.sha256(v.reshape(-1).view(np.uint8)).hexdigest()


def _checkpointer():
    """Orbax's checkpointer, process-local: in a multi-process run each call is this
    process's alone (no barriers with the others); the caller decides which process writes
    (:func:`jquant.distributed.is_writer`) and passes arrays this process holds whole."""
    import orbax.checkpoint as ocp

    me = jax.process_index()
    mp = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                            barrier_sync_key_prefix=f"jquant{me}")
    handler = ocp.CompositeCheckpointHandler(composite_options=ocp.CompositeOptions(multiprocessing_options=mp))
    return ocp, ocp.Checkpointer(handler, multiprocessing_options=mp)


def save(path: str | os.PathLike, tree, *, overwrite: bool = False) -> None:
    """Save ``tree`` (arrays and QTensors) to the directory ``path``, atomically, with a
    SHA-256 of every array's bytes.

    Raises:
      CheckpointError: ``path`` exists and ``overwrite`` is False.
      ShapeError, DTypeError, NonFiniteError: a QTensor whose parts disagree with its
        metadata, or with NaN/Inf scales or zeros (named by leaf path); nothing is written.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True to replace it)")
    arrays: dict[str, Any] = {}
    leaves_meta = []
    for i, (keypath, leaf) in enumerate(jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_qtensor)[0]):
        name = f"{i:06d}"
        entry: dict[str, Any] = {"path": path_str(keypath), "keys": [_key_json(k) for k in keypath]}
        if is_qtensor(leaf):
            try:
                check_parts(leaf)
            except JQuantError as e:
                raise type(e)(at(entry["path"], str(e))) from None
            check_values(leaf, entry["path"])
            parts = {p: getattr(leaf, p) for p in _PARTS if getattr(leaf, p) is not None}
            arrays[name] = parts
            entry["sha256"] = {p: _digest(a) for p, a in parts.items()}
            entry["qtensor"] = {
                "shape": list(leaf.shape), "dtype": leaf.dtype, "grid": leaf.grid._asdict(),
                "granularity": leaf.granularity, "group_size": leaf.group_size, "axis": leaf.axis,
                "word_bits": leaf.word_bits, "method": leaf.method,
                "parts": {p: [list(a.shape), str(a.dtype)] for p, a in parts.items()},
            }
        elif hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            arrays[name] = leaf
            entry["array"] = [list(leaf.shape), str(leaf.dtype)]
            entry["sha256"] = {"array": _digest(leaf)}
        else:
            entry["value"] = leaf if isinstance(leaf, (int, float, str, bool)) or leaf is None else repr(leaf)
        leaves_meta.append(entry)
    meta = {"format_version": FORMAT_VERSION, "leaves": leaves_meta}
    meta["digest"] = _meta_digest(meta)
    ocp, ckptr = _checkpointer()
    if jax.process_count() > 1:  # orbax refuses arrays of one process's devices in a multi-process run
        arrays = jax.tree_util.tree_map(np.asarray, arrays)
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
    """The JSON metadata of a checkpoint, checked for its version and structure.

    Raises:
      CheckpointError: no directory, unreadable / truncated / non-JSON metadata, a format
        version other than :data:`READABLE_VERSIONS`, or leaf entries missing fields.
    """
    path = os.path.abspath(os.fspath(path))
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    ocp, ckptr = _checkpointer()
    try:
        meta = ckptr.restore(path, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # orbax raises many types for a damaged directory
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({type(e).__name__}: {e})") from e
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{path}: not a jquant checkpoint this version reads (format_version {version!r}; "
                              f"readable: {', '.join(map(str, READABLE_VERSIONS))})")
    leaves = meta.get("leaves")
    if not isinstance(leaves, list):
        raise CheckpointError(f"{path}: checkpoint metadata has no list of leaves")
    seen = set()
    for i, e in enumerate(leaves):
        where = e.get("path", f"leaf #{i}") if isinstance(e, dict) else f"leaf #{i}"
        why = _malformed(e, version)
        if why:
            raise CheckpointError(f"{path}: metadata entry of {str(where)[:200]!r} is malformed: {why}")
        key = tuple(tuple(k) for k in e["keys"])
        if key in seen or (not key and len(leaves) > 1):
            raise CheckpointError(f"{path}: metadata entry of {where!r}: its key path repeats another leaf's")
        seen.add(key)
    if version >= 3 or "digest" in meta:
        digest = meta.get("digest")
        if not isinstance(digest, str) or digest != _meta_digest(meta):
            raise CheckpointError(f"{path}: the checkpoint's metadata does not match its digest (sha256 "
                                  f"{str(digest)[:16]!r}…): it was edited or is corrupt; save the tree again")
    if version < 2:
        warnings.warn(f"{path}: checkpoint format version {version} has no checksums; its arrays are restored "
                      "unverified (save it again to add them)", CheckpointWarning, stacklevel=3)
    return meta


def _meta_digest(meta: dict) -> str:
    """SHA-256 of the metadata's canonical JSON (sorted keys, no spaces), ``digest`` left out."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


_QT_FIELDS = ("shape", "dtype", "grid", "granularity", "group_size", "axis", "word_bits", "method", "parts")
_DTYPES = ("float32", "float16", "bfloat16", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32",
           "int64", "uint64", "bool")
_HEX = re.compile(r"[0-9a-f]{64}")


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _bad_array(a) -> str | None:
    """Why ``a`` is not ``[shape (list of ints >= 0), dtype name]``, or None."""
    if not (isinstance(a, list) and len(a) == 2 and isinstance(a[0], list) and all(_is_int(n) for n in a[0])):
        return f"an array's [shape, dtype] is {str(a)[:80]}, not a list of sizes >= 0 and a dtype name"
    if a[1] not in _DTYPES:
        return f"dtype {str(a[1])[:40]!r} is not one of {', '.join(_DTYPES)}"
    return None


def _malformed(e, version: int) -> str | None:
    """Why a leaf entry of the metadata cannot be a checkpoint's (every field checked for its
    type and range before any is used), or None."""
    if not isinstance(e, dict) or not isinstance(e.get("path"), str) or not isinstance(e.get("keys"), list):
        return "it needs a string path and a list of keys"
    for k in e["keys"]:
        if not (isinstance(k, list) and len(k) == 2 and k[0] in ("dict", "seq", "attr", "other")
                and (_is_int(k[1]) if k[0] == "seq" else isinstance(k[1], (str, int)) and not isinstance(k[1], bool))):
            return f"key {str(k)[:60]} is not [dict|attr|other, name] or [seq, index >= 0]"
    if sum(k in e for k in ("qtensor", "array", "value")) != 1:
        return "it needs exactly one of qtensor, array, value"
    if "array" in e:
        parts = {"array": e["array"]}
    elif "qtensor" in e:
        m = e["qtensor"]
        if not (isinstance(m, dict) and all(k in m for k in _QT_FIELDS)):
            return f"a QTensor needs {', '.join(_QT_FIELDS)}"
        if not (isinstance(m["shape"], list) and all(_is_int(n) for n in m["shape"]) and isinstance(m["dtype"], str)
                and isinstance(m["grid"], dict) and isinstance(m["granularity"], str) and _is_int(m["group_size"])
                and isinstance(m["axis"], int) and not isinstance(m["axis"], bool) and m["word_bits"] in (8, 32)
                and isinstance(m["method"], str) and isinstance(m["parts"], dict) and "codes" in m["parts"]
                and set(m["parts"]) <= set(_PARTS)):
            return "a QTensor field has the wrong type or range (shape, dtype, grid, group_size, axis, word_bits, parts)"
        parts = m["parts"]
    else:
        return None
    for part, a in parts.items():
        why = _bad_array(a)
        if why:
            return f"part {part!r}: {why}"
    if version >= 2:
        sha = e.get("sha256")
        if not (isinstance(sha, dict) and set(sha) == set(parts) and all(isinstance(v, str) and _HEX.fullmatch(v)
                                                                          for v in sha.values())):
            return "it needs a SHA-256 (64 hex digits) of every array"
    return None


class _Seq(dict):
    """A list under construction (index -> value)."""


class _Leaf:
    def __init__(self, value):
        self.value = value


def _rebuild(entries: list[dict], values: list[Any]):
    """Nested dicts (dict keys) and lists (sequence keys) from typed key paths; a path that
    runs through another leaf, or a container where a leaf goes, raises TypeError."""
    root: dict = {}
    for entry, value in zip(entries, values):
        keys = entry["keys"]
        if not keys:
            return value
        node = root
        for (_, k), (next_kind, _) in zip(keys[:-1], keys[1:]):
            child = node.get(k)
            if child is None:
                child = node[k] = _Seq() if next_kind == "seq" else {}
            elif isinstance(child, _Leaf) or isinstance(child, _Seq) != (next_kind == "seq"):
                raise TypeError(f"leaf {entry['path']!r} goes through another leaf or a container of another kind")
            node = child
        if keys[-1][1] in node:
            raise TypeError(f"leaf {entry['path']!r} lands where another leaf or container is")
        node[keys[-1][1]] = _Leaf(value)

    def finish(node):
        if isinstance(node, _Leaf):
            return node.value
        if isinstance(node, _Seq):
            if sorted(node) != list(range(len(node))):
                raise TypeError(f"a list's indices {sorted(node)[:8]} are not 0..{len(node) - 1}")
            return [finish(node[i]) for i in sorted(node)]
        return {k: finish(v) for k, v in node.items()}

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
        ``zero``, ``g_idx``, ``perm``, ``outlier_idx`` or ``outlier_w``). Default: the default device.

    Raises:
      CheckpointError: a missing or damaged checkpoint (metadata, version, an array that
        cannot be read or whose bytes do not match their checksum, QTensor parts that
        disagree with their metadata), or a ``target`` whose leaves differ in path, shape
        or dtype; the message names the leaf.
      NonFiniteError, ShapeError: NaN/Inf in a stored scale or zero, or an index part out
        of range, in a checkpoint without checksums (a checksummed one cannot hold them:
        :func:`save` refuses them).
    """
    path = os.path.abspath(os.fspath(path))
    meta = load_meta(path)
    entries = meta["leaves"]
    if target is not None:
        t_leaves, treedef = jax.tree_util.tree_flatten_with_path(target, is_leaf=is_qtensor)
        _check_target(path, entries, t_leaves)

    def sds(leaf_path, part, shape, dtype):
        sh = shardings(leaf_path, part, tuple(shape)) if callable(shardings) else shardings
        if sh is None:
            sh = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
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
        raise CheckpointError(f"{path}: cannot restore arrays{_failed_leaf(e, entries)} "
                              f"({type(e).__name__}: {str(e)[:500]})") from e
    values = []
    for i, e in enumerate(entries):
        name = f"{i:06d}"
        if "value" in e:
            values.append(e["value"])
            continue
        got = arrays[name] if "qtensor" in e else {"array": arrays[name]}
        for part, want in (e.get("sha256") or {}).items():
            if _digest(got[part]) != want:
                what = "" if part == "array" else f" (QTensor part {part!r})"
                raise CheckpointError(f"{path}: leaf {e['path']!r}{what}: the bytes restored do not match the "
                                      f"checksum saved with them (sha256 {want[:16]}…): the checkpoint is corrupt")
        if "array" in e:
            values.append(arrays[name])
            continue
        m = e["qtensor"]
        parts = arrays[name]
        try:
            qt = QTensor(parts["codes"], parts.get("scale"), parts.get("zero"), parts.get("g_idx"),
                         shape=tuple(m["shape"]), dtype=m["dtype"], grid=Grid(**m["grid"]),
                         granularity=m["granularity"], group_size=m["group_size"], axis=m["axis"],
                         word_bits=m["word_bits"], method=m["method"], perm=parts.get("perm"),
                         outlier_idx=parts.get("outlier_idx"), outlier_w=parts.get("outlier_w"))
            check_parts(qt)
        except (JQuantError, TypeError, KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: leaf {e['path']!r}: its QTensor parts disagree with its metadata: "
                                  f"{err}") from err
        check_values(qt, f"{path}: leaf {e['path']!r}")
        values.append(qt)
    if target is None:
        try:
            return _rebuild(entries, values)
        except (TypeError, AttributeError, KeyError) as err:  # key paths that cannot form one tree
            raise CheckpointError(f"{path}: the leaves' key paths do not form one tree ({type(err).__name__}: "
                                  f"{err}); the metadata is corrupt") from None
    by_path = {e["path"]: v for e, v in zip(entries, values)}
    return jax.tree_util.tree_unflatten(treedef, [by_path[path_str(k)] for k, _ in t_leaves])


def _check_target(path: str, entries: list[dict], t_leaves) -> None:
    """Refuse a target whose leaves are not the checkpoint's: other paths, shapes or dtypes
    (a QTensor is compared by its logical shape and original dtype)."""
    by_path = {e["path"]: e for e in entries}
    t_paths = set()
    for keypath, leaf in t_leaves:
        p = path_str(keypath)
        t_paths.add(p)
        if p not in by_path:
            raise CheckpointError(f"{path}: target leaf {p!r} is not in the checkpoint")
        e = by_path[p]
        if "value" in e or not (hasattr(leaf, "shape") and hasattr(leaf, "dtype")):
            continue
        shape, dtype = ((e["qtensor"]["shape"], e["qtensor"]["dtype"]) if "qtensor" in e else e["array"])
        t_shape, t_dtype = tuple(leaf.shape), str(leaf.dtype)
        if tuple(shape) != t_shape or dtype != t_dtype:
            kind = "a QTensor of logical shape" if "qtensor" in e else "an array of shape"
            raise CheckpointError(f"{path}: leaf {p!r}: the checkpoint holds {kind} {tuple(shape)} {dtype}, the "
                                  f"target an array of shape {t_shape} {t_dtype}")
    if len(t_paths) != len(entries):
        missing = sorted(set(by_path) - t_paths)
        raise CheckpointError(f"{path}: checkpoint leaves {missing[:5]} are not in the target tree")


def _failed_leaf(err: BaseException, entries: list[dict]) -> str:
    """`` at leaf 'a/b' (part)`` when an Orbax/TensorStore error names the array it failed on."""
    text, e = "", err
    while e is not None and len(text) < 200_000:
        text += str(e)
        e = e.__cause__ or e.__context__
    m = re.search(r"(?:'path': '|reading \")(\d{6})(?:\.(\w+))?/", text)
    if not m or int(m.group(1)) >= len(entries):
        return ""
    return f" at leaf {entries[int(m.group(1))]['path']!r}" + (f" (QTensor part {m.group(2)!r})" if m.group(2) else "")
