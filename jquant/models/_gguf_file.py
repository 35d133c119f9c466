"""A bounded reader of the GGUF container (header, metadata, tensor table), memory-mapped data.

Every count and length the file declares (tensor and key/value counts, array lengths, string
lengths, tensor dimensions) is checked against the bytes that remain *before* anything is
read or allocated, so a 60 KB file that declares an array of 2**62 elements is refused in
microseconds instead of looping or allocating (``gguf.GGUFReader`` trusts those counts).
Tensor data ranges are checked too: aligned, inside the file, not overlapping each other.

Layout (GGUF v2/v3, little-endian; https://github.com/ggml-org/ggml/blob/master/docs/gguf.md)::

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key | u32 type | value)        value: scalar | string | array(u32 type, u64 n, items)
    n_tensors x (string name | u32 n_dims | u64 ne[n_dims] | u32 ggml_type | u64 offset)
    padding to general.alignment (default 32) | tensor data (offsets relative to here)

A string is ``u64 length`` + UTF-8 bytes. Nested arrays are refused, as llama.cpp does.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jquant.errors import CheckpointError, UnsupportedModelError

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 2**62  # no tensor's element count may exceed this (llama.cpp: INT64_MAX)

# GGUF value types: id -> (name, numpy dtype or None for string/array)
_STRING, _ARRAY = 8, 9
_SCALARS = {0: np.dtype("<u1"), 1: np.dtype("<i1"), 2: np.dtype("<u2"), 3: np.dtype("<i2"),
            4: np.dtype("<u4"), 5: np.dtype("<i4"), 6: np.dtype("<f4"), 7: np.dtype("?"),
            10: np.dtype("<u8"), 11: np.dtype("<i8"), 12: np.dtype("<f8")}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32", 6: "float32",
               7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64", 12: "float64"}
_VALID_TYPES = ", ".join(f"{k} ({v})" for k, v in _TYPE_NAMES.items())


class TensorInfo(NamedTuple):
    """One entry of the tensor table.

    ``shape`` is GGML's ``[ne0, ne1, ...]`` (``ne0`` = the contiguous row length, so a numpy
    array has ``reversed(shape)``); ``offset`` is absolute in the file; ``data`` the stored
    elements as numpy (F32/F16/F64 and integer types as such, ``uint8`` ``(..., bytes_per_row)``
    for the others, as ``gguf.GGUFReader`` gives them to ``gguf.quants.dequantize``), memory-mapped.
    """

    name: str
    tensor_type: Any  # gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    n_elements: int
    n_bytes: int
    offset: int
    data: np.ndarray


class GGUFFile:
    """The parsed header of a GGUF file: ``fields`` (key -> value) and ``tensors`` (in file order).

    Values: Python ``int``/``float``/``bool``/``str`` for scalars; a 1-D numpy array for a
    numeric array; a ``list[str]`` for an array of strings.

    Raises:
      CheckpointError: anything malformed; the message names the file, the byte offset, the
        key or tensor, the declared value and what would be valid.
      UnsupportedModelError: a big-endian file or a GGUF version other than 2 or 3.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mm = np.memmap(self.path, mode="r") if self.path.stat().st_size else np.zeros(0, np.uint8)
        self._buf = memoryview(self._mm)
        self.size = len(self._buf)
        self._pos = 0
        self.fields: dict[str, Any] = {}
        self.field_types: dict[str, tuple[int, int | None]] = {}  # key -> (GGUF value type, array element type)
        self.tensors: list[TensorInfo] = []
        self._parse()

    # -- primitive reads, each checked against the bytes left --------------------------------

    def _fail(self, msg: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {msg}")

    def _need(self, n: int, what: str) -> None:
        left = self.size - self._pos
        if n > left:
            raise self._fail(f"{what} at byte {self._pos} needs {n} bytes but only {left} remain "
                             f"(file size {self.size}): truncated or corrupt GGUF file")

    def _unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self._need(n, what)
        v = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += n
        return v[0] if len(v) == 1 else v

    def _string(self, what: str) -> str:
        n = self._unpack("<Q", f"length of {what}")
        self._need(n, f"{what} (declared length {n})")
        raw = bytes(self._buf[self._pos:self._pos + n])
        self._pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self._fail(f"{what} at byte {self._pos - n} is not valid UTF-8 ({e.reason})") from None

    def _count(self, what: str, min_item_bytes: int) -> int:
        n = self._unpack("<Q", f"count of {what}")
        left = self.size - self._pos
        if n * min_item_bytes > left:
            raise self._fail(f"declares {n} {what} at byte {self._pos - 8}; each takes at least "
                             f"{min_item_bytes} bytes and only {left} remain, so at most {left // min_item_bytes} "
                             "would fit: truncated, corrupt or hostile GGUF file")
        return n

    # -- the file ----------------------------------------------------------------------------

    def _parse(self) -> None:
        self._need(8, "GGUF magic and version")
        magic = bytes(self._buf[:4])
        if magic != MAGIC:
            raise self._fail(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
        self._pos = 4
        version = self._unpack("<I", "GGUF version")
        if version & 0xFFFF == 0 and version:
            raise UnsupportedModelError(f"{self.path}: big-endian GGUF files are not supported "
                                        f"(version field {version:#x})")
        if version not in VERSIONS:
            raise UnsupportedModelError(f"{self.path}: GGUF version {version} is not supported; supported: 2, 3")
        # minimal sizes: a tensor entry is name(8) + n_dims(4) + type(4) + offset(8); a kv is key(8)+type(4)+1
        n_tensors_pos = self._pos
        n_tensors = self._unpack("<Q", "tensor count")
        n_kv = self._count("key/value pairs", 8 + 4 + 1)
        if n_tensors * 24 > self.size - self._pos:
            raise self._fail(f"declares {n_tensors} tensors at byte {n_tensors_pos}; each tensor entry takes at "
                             f"least 24 bytes and only {self.size - self._pos} remain: corrupt or hostile GGUF file")
        for _ in range(n_kv):
            key_pos = self._pos
            key = self._string("metadata key")
            if key in self.fields:
                raise self._fail(f"metadata key {key!r} at byte {key_pos} appears twice")
            self.fields[key] = self._value(key)
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self.fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if (not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0
                or alignment & (alignment - 1)):
            raise self._fail(f"general.alignment={alignment!r}: must be a positive power of two (default 32)")
        data_start = -(-self._pos // alignment) * alignment
        self.tensors = self._tensor_data(infos, data_start, alignment)

    def _value(self, key: str, vtype: int | None = None, in_array: bool = False):
        type_pos = self._pos
        if vtype is None:
            vtype = self._unpack("<I", f"type of {key!r}")
        if not in_array:
            self.field_types[key] = (vtype, None)
        if vtype in _SCALARS:
            dt = _SCALARS[vtype]
            self._need(dt.itemsize, f"value of {key!r}")
            v = np.frombuffer(self._buf, dt, 1, self._pos)[0].item()
            self._pos += dt.itemsize
            return v
        if vtype == _STRING:
            return self._string(f"value of {key!r}")
        if vtype == _ARRAY and not in_array:
            itype = self._unpack("<I", f"element type of array {key!r}")
            self.field_types[key] = (vtype, itype)
            if itype in _SCALARS:
                dt = _SCALARS[itype]
                n = self._count(f"{_TYPE_NAMES[itype]} elements of array {key!r}", dt.itemsize)
                arr = np.frombuffer(self._buf, dt, n, self._pos).copy()
                self._pos += n * dt.itemsize
                return arr
            if itype == _STRING:
                n = self._count(f"string elements of array {key!r}", 8)
                return [self._string(f"element {i} of array {key!r}") for i in range(n)]
            raise self._fail(f"array {key!r} at byte {type_pos} has element type {itype} "
                             f"({_TYPE_NAMES.get(itype, 'unknown')}); valid: a scalar type or string "
                             "(nested arrays are not allowed)")
        raise self._fail(f"metadata {key!r} at byte {type_pos} has value type {vtype}; valid: {_VALID_TYPES}")

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        entry_pos = self._pos
        name = self._string("tensor name")
        n_dims = self._unpack("<I", f"dimension count of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise self._fail(f"tensor {name!r} (entry at byte {entry_pos}) has {n_dims} dimensions; "
                             f"valid: 1 to {MAX_DIMS}")
        self._need(8 * n_dims, f"dimensions of tensor {name!r}")
        shape = struct.unpack_from(f"<{n_dims}Q", self._buf, self._pos)
        self._pos += 8 * n_dims
        n = 1
        for d in shape:
            n *= d
        if n > MAX_ELEMENTS:
            raise self._fail(f"tensor {name!r} declares shape {list(shape)} ({n} elements); "
                             f"at most 2**62 elements are valid")
        ttype = self._unpack("<I", f"type of tensor {name!r}")
        offset = self._unpack("<Q", f"data offset of tensor {name!r}")
        return name, shape, ttype, offset

    def _tensor_data(self, infos, data_start: int, alignment: int) -> list[TensorInfo]:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        data_size = self.size - data_start
        if data_size < 0 and infos:
            raise self._fail(f"the tensor data would start at byte {data_start}, past the end of the file "
                             f"(size {self.size}): truncated GGUF file")
        tensors, seen = [], set()
        for name, shape, ttype, offset in infos:
            if name in seen:
                raise self._fail(f"tensor {name!r} appears twice in the tensor table")
            seen.add(name)
            try:
                qtype = GGMLQuantizationType(ttype)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise self._fail(f"tensor {name!r} has GGML type {ttype}, which is not a known type; valid: "
                                 f"{', '.join(f'{t.value} ({t.name})' for t in GGMLQuantizationType)}") from None
            if shape[0] % block:
                raise self._fail(f"tensor {name!r} ({qtype.name}) has rows of {shape[0]} elements, not a "
                                 f"multiple of the {qtype.name} block size {block}")
            n_elements = int(np.prod(shape, dtype=object))
            n_bytes = n_elements // block * type_size
            if offset % alignment:
                raise self._fail(f"tensor {name!r} has data offset {offset}, not a multiple of the "
                                 f"alignment {alignment}")
            if offset + n_bytes > data_size:
                raise self._fail(f"tensor {name!r} ({qtype.name}, shape {list(shape)}) needs {n_bytes} bytes "
                                 f"at data offset {offset}, but the data section has {max(data_size, 0)} bytes "
                                 f"(file size {self.size}): truncated or corrupt GGUF file")
            tensors.append((name, qtype, shape, n_elements, n_bytes, data_start + offset))
        by_offset = sorted(tensors, key=lambda t: (t[5], t[5] + t[4]))
        for a, b in zip(by_offset, by_offset[1:]):
            if a[5] + a[4] > b[5]:
                raise self._fail(f"tensor {a[0]!r} ({a[1].name}, shape {list(a[2])}) occupies bytes "
                                 f"{a[5]}..{a[5] + a[4]}, overlapping tensor {b[0]!r} at byte {b[5]}: "
                                 "each tensor needs its own data range")
        return [TensorInfo(name, qtype, shape, n_el, n_bytes, off, self._array(qtype, shape, n_bytes, off))
                for name, qtype, shape, n_el, n_bytes, off in tensors]

    def _array(self, qtype, shape, n_bytes: int, offset: int) -> np.ndarray:
        """The stored data as numpy, a view of the memory map (no copy)."""
        plain = {"F32": np.float32, "F16": np.float16, "F64": np.float64,
                 "I8": np.int8, "I16": np.int16, "I32": np.int32, "I64": np.int64}
        np_shape = tuple(reversed(shape))
        raw = self._mm[offset:offset + n_bytes]
        if qtype.name in plain:
            return raw.view(np.dtype(plain[qtype.name]).newbyteorder("<")).reshape(np_shape)
        return raw.reshape(*np_shape[:-1], -1) if n_bytes else raw.reshape(*np_shape[:-1], 0)
