"""The CLI's token cache: a text tokenized once is read back without building the tokenizer."""

import numpy as np
import pytest

from jquant import cli, data, models
from jquant.errors import DataError


def test_cached_ids_equal_the_tokenizers_and_skip_building_it(tiny_llama_dir, tmp_path, monkeypatch):
    model, text_file = tiny_llama_dir
    monkeypatch.setenv("JQUANT_CACHE", str(tmp_path / "cache"))
    text = open(text_file).read()[:20_000]
    tok = models.load_tokenizer(model)
    want = data.tokenize(tok, text, 320)
    first = cli._Tokenizer(model)
    np.testing.assert_array_equal(first.ids(text, 320, "t"), want)
    assert first.bos() == data.bos_token(tok)
    assert len(list((tmp_path / "cache" / "tokens").glob("*.npy"))) == 2

    def refuse(path):
        raise AssertionError("the tokenizer was built although the text is cached")

    monkeypatch.setattr(models, "load_tokenizer", refuse)
    again = cli._Tokenizer(model)
    got = again.ids(text, 320, "t")
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, want)
    assert again.bos() == data.bos_token(tok)
    with pytest.raises(AssertionError, match="was built"):  # another text is not in the cache
        again.ids(text + "!", 320, "t")
    # the cached ids are still checked against the vocabulary they are used with
    with pytest.raises(DataError, match=r"outside the model's vocabulary of 10"):
        again.ids(text, 10, "t")


def test_no_cache_and_no_tokenizer(tiny_llama_dir, tmp_path, monkeypatch):
    model, _ = tiny_llama_dir
    monkeypatch.setenv("JQUANT_CACHE", "")  # caching off: tokenized every time, nothing written
    tok = cli._Tokenizer(model)
    np.testing.assert_array_equal(tok.ids("hello world", 320, "t"), data.tokenize(tok.get(), "hello world", 320))
    monkeypatch.setattr(models, "load_tokenizer", lambda path: None)  # a checkpoint without tokenizer files
    with pytest.raises(DataError, match=r"the model has no tokenizer files to tokenize the evaluation text"):
        cli._Tokenizer(model).ids("hello", 320, "the evaluation text")
