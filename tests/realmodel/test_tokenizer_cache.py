"""The GGUF tokenizer cache: the cached tokenizer tokenizes exactly as the one transformers
builds from the file, and a damaged or disabled cache falls back to building it."""

import os

import pytest

from jquant.models import default_model_path, load_gguf_tokenizer
from jquant.models.gguf import _reader, _tokenizer_cache

pytestmark = pytest.mark.realmodel

TEXT = "Q: What's the difference between a duck?\nA: One of its legs is both the same. 42 × π ≈ 131.9 — naïve café"


def test_cached_tokenizer_is_the_built_one(tmp_path, monkeypatch):
    monkeypatch.setenv("JQUANT_CACHE", str(tmp_path))
    built = load_gguf_tokenizer()
    import transformers

    cache = _tokenizer_cache(_reader(default_model_path()), transformers.__version__)
    assert cache.parent == tmp_path / "tokenizers" and (cache / "tokenizer.json").is_file()
    cached = load_gguf_tokenizer()
    assert cached(TEXT)["input_ids"] == built(TEXT)["input_ids"]
    assert cached.all_special_ids == built.all_special_ids and len(cached) == len(built)
    # A damaged entry is rebuilt; an empty JQUANT_CACHE builds without writing anything.
    (cache / "tokenizer.json").write_text("{not json")
    assert load_gguf_tokenizer()(TEXT)["input_ids"] == built(TEXT)["input_ids"]
    assert (cache / "tokenizer.json").read_text().startswith("{\n")
    monkeypatch.setenv("JQUANT_CACHE", "")
    assert load_gguf_tokenizer()(TEXT)["input_ids"] == built(TEXT)["input_ids"]
    assert sorted(os.listdir(tmp_path / "tokenizers")) == [cache.name]
