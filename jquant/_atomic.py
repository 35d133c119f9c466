"""Atomic, durable file writes: write a temporary file beside the target, flush it to disk
(``fsync``), rename it over the target, and flush the directory entry, so after a crash or a
power loss the target is either the old file or the whole new one."""

from __future__ import annotations

import json
import os

import numpy as np


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _replace(tmp: str, path: str, fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    os.replace(tmp, path)
    _fsync_dir(path)


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    fh = open(tmp, "w")
    try:
        json.dump(obj, fh, indent=1)
    except BaseException:
        fh.close()
        raise
    _replace(tmp, path, fh)


def write_npy(path: str, arr: np.ndarray) -> None:
    tmp = path + ".tmp.npy"
    fh = open(tmp, "wb")
    try:
        np.save(fh, arr)
    except BaseException:
        fh.close()
        raise
    _replace(tmp, path, fh)


def write_npz(path: str, **arrays) -> None:
    tmp = path + ".tmp.npz"
    fh = open(tmp, "wb")
    try:
        np.savez(fh, **arrays)
    except BaseException:
        fh.close()
        raise
    _replace(tmp, path, fh)


def write_npy_parts(path: str, parts) -> str:
    """Write the concatenation of ``parts`` along axis 0 as one ``.npy`` file, part by part
    (never the whole array in memory), atomically; returns the file's SHA-256 (hex). The bytes
    are those ``np.save`` writes for ``np.concatenate(parts)``. ``parts``: arrays of one dtype
    and one trailing shape (host or CPU JAX arrays)."""
    import hashlib
    import io

    parts = [np.asarray(p) for p in parts]
    if not parts:
        raise ValueError("write_npy_parts: no parts")
    first = parts[0]
    if any(p.dtype != first.dtype or p.shape[1:] != first.shape[1:] for p in parts):
        raise ValueError("write_npy_parts: parts of different dtypes or trailing shapes")
    header = np.lib.format.header_data_from_array_1_0(np.empty((0,) + first.shape[1:], first.dtype))
    header["shape"] = (sum(len(p) for p in parts),) + first.shape[1:]
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    digest = hashlib.sha256(buf.getvalue())
    tmp = path + ".tmp.npy"
    fh = open(tmp, "wb")
    try:
        fh.write(buf.getvalue())
        for p in parts:
            data = memoryview(np.ascontiguousarray(p).reshape(-1).view(np.uint8))  # (bfloat16 has no buffer format)
            fh.write(data)
            digest.update(data)
    except BaseException:
        fh.close()
        raise
    _replace(tmp, path, fh)
    return digest.hexdigest()
