"""Checks on the values a model file declares (sizes, counts, floats), shared by the converters.

Each check returns the value as a Python number or raises :class:`CheckpointError` whose
message names ``what`` (the file and key), the value and what would be valid.
"""

from __future__ import annotations

import math

import numpy as np

from jquant.errors import CheckpointError, NonFiniteError, short

MAX_SIZE = 2**31 - 1  # no hidden size, head count, layer count or vocabulary is larger

def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def size(value, what: str, *, lowest: int = 1) -> int:
    """A size or count: an integer in ``lowest..2**31-1``."""
    if not _is_int(value) or not lowest <= value <= MAX_SIZE:
        kind = "a positive integer" if lowest == 1 else f"an integer >= {lowest}"
        raise CheckpointError(f"{what}={short(value)}: must be {kind} (at most {MAX_SIZE})")
    return int(value)


def token_id(value, what: str) -> int | tuple[int, ...] | None:
    """A token id (or list of ids, or ``None``): non-negative integers."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) and v >= 0 for v in value):
        return tuple(int(v) for v in value)
    if _is_int(value) and value >= 0:
        return int(value)
    raise CheckpointError(f"{what}={short(value)}: must be a non-negative integer token id (or a list of them)")


def flag(value, what: str) -> bool:
    """A boolean: ``true``/``false`` in JSON (a string such as ``"false"`` is refused, not read as true)."""
    if not isinstance(value, (bool, np.bool_)):
        raise CheckpointError(f"{what}={short(value)}: must be true or false")
    return bool(value)


def positive_float(value, what: str) -> float:
    """A finite positive number (epsilon, rotary base, scaling factor)."""
    if not isinstance(value, (int, float, np.integer, np.floating)) or isinstance(value, (bool, np.bool_)) \
            or not math.isfinite(value) or value <= 0:
        raise CheckpointError(f"{what}={short(value)}: must be a finite positive number")
    return float(value)


def finite(arr: np.ndarray, what: str) -> np.ndarray:
    """``arr`` if every value is finite; a NaN or Inf weight means a corrupt file."""
    bad = arr.size - int(np.count_nonzero(np.isfinite(arr)))
    if bad:
        raise NonFiniteError(f"{what}: {bad} of {arr.size} values are NaN or Inf; weights must be finite "
                             "(corrupt file?)")
    return arr
