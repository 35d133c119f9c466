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
