"""The one exception hierarchy of jquant.

Every error a user can trigger derives from :class:`JQuantError`; messages name the
tree path (or file), the offending value and what would be valid.
"""

from __future__ import annotations

import reprlib


class JQuantError(Exception):
    """Base class of every jquant error."""


class SpecError(JQuantError, ValueError):
    """An invalid quantization spec or rule (bits, group size, format, option)."""


class ShapeError(JQuantError, ValueError):
    """A spec that cannot apply to a leaf's shape, or arrays of mismatched shapes."""


class NonFiniteError(JQuantError, ValueError):
    """NaN or Inf where finite numbers are required (weights, scales, activations)."""


class DTypeError(JQuantError, TypeError):
    """A non-floating leaf given to a quantizer, or an unsupported dtype."""


class CheckpointError(JQuantError):
    """A missing, truncated or corrupt checkpoint file, or one that does not match."""


class UnsupportedModelError(JQuantError):
    """A model architecture or config the converters do not support."""


class FormatError(JQuantError, ValueError):
    """A quantized tensor a checkpoint format cannot express (bits, grid, layout), or a
    pre-quantized checkpoint whose tensors disagree with its quantization config."""


class DataError(JQuantError, ValueError):
    """Calibration / evaluation data that cannot serve (too short, out of vocabulary, missing)."""


class RuleWarning(UserWarning):
    """A quantization rule that matched no leaf of the tree."""


class CheckpointWarning(UserWarning):
    """A checkpoint that loads but cannot be fully verified (written without checksums)."""


def at(path: str | None, msg: str) -> str:
    """Prefix a message with the tree path it concerns."""
    return f"{path}: {msg}" if path else msg


_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 6
_repr.maxlevel = 3


def short(value) -> str:
    """A bounded ``repr`` for messages: values read from files may be huge, deep or self-referential."""
    return _repr.repr(value)


def settings_from_dict(cls, d, what: str):
    """``cls(**d)`` for a frozen settings dataclass read from a file: ``d`` must be a mapping
    whose keys are fields of ``cls`` (a misspelt key is an error, never ignored); ``cls``
    validates the values itself."""
    import dataclasses

    if not isinstance(d, dict):
        raise SpecError(f"{what} must be a mapping, got {short(d)}")
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = set(d) - set(fields)
    if unknown:
        raise SpecError(f"unknown {what} key(s) {sorted(unknown)}; valid: {', '.join(fields)}")
    try:
        return cls(**d)
    except TypeError as e:  # a value of a type the validation compares badly
        raise SpecError(f"{what}: {e}") from e
