"""Atomic, durable file writes: write a temporary file beside the target, flush it to disk
(``fsync``), rename it over the target, and flush the directory entry, so after a crash or a
power loss the target is either the old file or the whole new one."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def _writing(path: str, suffix: str, mode: str = "wb"):
    """The open temporary file ``path + suffix``; when the block ends without an error it is
    flushed to disk and renamed over ``path``. On an error it is closed and left, and the
    target is untouched."""
    tmp = path + suffix
    fh = open(tmp, mode)
    try:
        yield fh
    except BaseException:
        fh.close()
        raise
    fh.flush()
    os.fsync(fh.fileno())
    fh.close()
    os.replace(tmp, path)
    _fsync_dir(path)


def write_json(path: str, obj) -> None:
    with _writing(path, ".tmp", "w") as fh:
        json.dump(obj, fh, indent=1)


def write_npy(path: str, arr: np.ndarray) -> None:
    with _writing(path, ".tmp.npy") as fh:
        np.save(fh, arr)


def write_npz(path: str, **arrays) -> None:
    with _writing(path, ".tmp.npz") as fh:
        np.savez(fh, **arrays)


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
    with _writing(path, ".tmp.npy") as fh:
        fh.write(buf.getvalue())
        for p in parts:
            data = memoryview(np.ascontiguousarray(p).reshape(-1).view(np.uint8))  # (bfloat16 has no buffer format)
            fh.write(data)
            digest.update(data)
    return digest.hexdigest()
