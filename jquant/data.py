"""Text for calibration and evaluation: local files, Hugging Face ``datasets``, and corpora
that need no network.

Named sources (``load_text(name)``):

- ``pydoc``: the English documentation of every CPython (``pydoc_data.topics``), the
  default *calibration* corpus. Technical prose about Python.
- ``fortunes``: the quotations, literature and humour of Debian's ``fortunes`` package
  (``/usr/share/games/fortunes``), a different domain, used to *evaluate* models so a
  method cannot win only on its own calibration text.
- ``licenses``: the licence texts in ``/usr/share/common-licenses`` (legal English).
- ``hf:<dataset>[:<config>]:<split>[:<column>]``: a Hugging Face dataset already in the
  local cache (e.g. ``hf:wikitext:wikitext-2-raw-v1:test``); offline-aware.
- anything else is a path to a UTF-8 text file (or a directory of ``.txt`` files).

Sampling is deterministic given a seed.
"""

from __future__ import annotations

import glob
import os

import numpy as np

from jquant.errors import DataError

FORTUNES_DIR = "/usr/share/games/fortunes"
LICENSES_DIR = "/usr/share/common-licenses"
# Prose categories of the fortunes package (computing, ASCII art and the like left out).
FORTUNE_TOPICS = ("education", "food", "humorists", "kids", "law", "literature", "love", "medicine", "men-women",
                  "news", "people", "pets", "platitudes", "politics", "pratchett", "science", "songs-poems",
                  "sports", "wisdom", "work")
# Distinct licence texts (older versions of the same licence are left out).
_LICENSES = ("GPL-3", "LGPL-3", "Apache-2.0", "MPL-2.0", "GFDL-1.3", "Artistic", "CC0-1.0", "BSD")


def _pydoc() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


def _fortunes() -> str:
    files = [os.path.join(FORTUNES_DIR, t) for t in FORTUNE_TOPICS if os.path.isfile(os.path.join(FORTUNES_DIR, t))]
    if not files:
        raise DataError(f"the 'fortunes' corpus needs Debian's fortunes package ({FORTUNES_DIR} is empty or missing): "
                        "apt-get install fortunes")
    parts = []
    for f in files:
        with open(f, encoding="utf-8", errors="replace") as fh:
            # Entries are separated by lines holding a single '%'.
            parts.extend(e.strip() for e in fh.read().split("\n%\n") if e.strip())
    return "\n\n".join(parts)


def _licenses() -> str:
    texts = []
    for name in _LICENSES:
        p = os.path.join(LICENSES_DIR, name)
        if os.path.isfile(p):
            with open(p, encoding="utf-8", errors="replace") as fh:
                texts.append(fh.read().strip())
    if not texts:
        raise DataError(f"no licence texts found in {LICENSES_DIR}")
    return "\n\n".join(texts)


def _hf(spec: str) -> str:
    parts = spec.split(":")[1:]
    if len(parts) < 2:
        raise DataError(f"dataset source {spec!r} must be hf:<dataset>[:<config>]:<split>[:<column>]")
    column = "text"
    if len(parts) == 4:
        name, config, split, column = parts
    elif len(parts) == 3:
        name, config, split = parts
    else:
        (name, split), config = parts, None
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise DataError("the 'datasets' package is needed for hf: sources") from e
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
        hint = " (offline mode is on)" if offline else " (is it in the local Hugging Face cache? this machine may have no network)"
        raise DataError(f"cannot load dataset {name!r} config {config!r} split {split!r}{hint}: {type(e).__name__}: {e}") from e
    if column not in ds.column_names:
        raise DataError(f"dataset {name!r} has no column {column!r}; columns: {ds.column_names}")
    return "\n\n".join(t for t in ds[column] if t and t.strip())


def load_text(source: str = "pydoc") -> str:
    """The text of a named source, a dataset or a local file/directory (see module doc)."""
    if source == "pydoc":
        return _pydoc()
    if source == "fortunes":
        return _fortunes()
    if source == "licenses":
        return _licenses()
    if source.startswith("hf:"):
        return _hf(source)
    if os.path.isdir(source):
        files = sorted(glob.glob(os.path.join(source, "**", "*.txt"), recursive=True))
        if not files:
            raise DataError(f"{source}: directory holds no .txt files")
        return "\n\n".join(open(f, encoding="utf-8").read() for f in files)
    if os.path.isfile(source):
        try:
            with open(source, encoding="utf-8") as fh:
                return fh.read()
        except UnicodeDecodeError as e:
            raise DataError(f"{source}: not UTF-8 text ({e})") from e
    raise DataError(f"unknown text source {source!r}: not 'pydoc', 'fortunes', 'licenses', an hf: dataset, "
                    "or an existing file or directory")


def split_text(text: str, eval_fraction: float = 0.1) -> tuple[str, str]:
    """Split a text into disjoint (calibration, evaluation) parts at a paragraph boundary."""
    if not 0.0 < eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    cut = int(len(text) * (1.0 - eval_fraction))
    para = text.rfind("\n\n", 0, cut)
    cut = para if para > 0 else cut
    return text[:cut], text[cut:]


def tokenize(tokenizer, text: str, vocab_size: int | None = None) -> np.ndarray:
    """Token ids (int32) of a whole text; checks they are inside the model's vocabulary."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if callable(tokenizer) else tokenizer.encode(text)
    return check_ids(ids, vocab_size)


def check_ids(ids, vocab_size: int | None = None) -> np.ndarray:
    """``ids`` as int32, checked inside the model's vocabulary (DataError otherwise)."""
    ids = np.asarray(ids, dtype=np.int32)
    if vocab_size is not None and ids.size and (ids.max() >= vocab_size or ids.min() < 0):
        raise DataError(f"token ids range [{ids.min()}, {ids.max()}] outside the model's vocabulary of {vocab_size}")
    return ids


def bos_token(tokenizer) -> int | None:
    """The id a tokenizer puts before every text it encodes with special tokens (Gemma's and
    Llama's ``<bos>``), or ``None`` when it adds none (SmolLM2, Qwen2)."""
    if not callable(tokenizer) or getattr(tokenizer, "bos_token_id", None) is None:
        return None
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    bos = int(tokenizer.bos_token_id)
    return bos if with_special and with_special[0] == bos and (not without or without[0] != bos) else None


def _with_bos(windows: np.ndarray, bos: int | None) -> np.ndarray:
    """Each window's first token replaced by ``bos`` (llama.cpp's ``perplexity`` does the same):
    a model trained with ``<bos>`` before every text sees one at each window start. The first
    token is never scored, so the scored tokens stay the same."""
    if bos is None:
        return windows
    windows = np.array(windows)
    windows[:, 0] = bos
    return windows


def eval_windows(tokens: np.ndarray, seq_len: int, max_windows: int | None = None, bos: int | None = None) -> np.ndarray:
    """Non-overlapping windows ``(n, seq_len)`` covering the token stream from its start; with
    ``bos``, each window starts with it (:func:`bos_token`) in place of its first token."""
    n = len(tokens) // seq_len
    if n == 0:
        raise DataError(f"text of {len(tokens)} tokens is shorter than one window of {seq_len}")
    if max_windows is not None:
        n = min(n, max_windows)
    return _with_bos(np.asarray(tokens[: n * seq_len]).reshape(n, seq_len), bos)


def calibration_windows(tokens: np.ndarray, n: int, seq_len: int, seed: int = 0, bos: int | None = None) -> np.ndarray:
    """``n`` windows of ``seq_len`` tokens at random (seeded) non-overlapping offsets (with
    ``bos``: starting with it, as :func:`eval_windows`)."""
    slots = len(tokens) // seq_len
    if slots < n:
        raise DataError(f"calibration text of {len(tokens)} tokens holds only {slots} windows of {seq_len}, "
                        f"{n} requested; use fewer or shorter windows or a longer text")
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(slots, size=n, replace=False)) * seq_len
    return _with_bos(np.stack([tokens[s: s + seq_len] for s in starts]).astype(np.int32), bos)
