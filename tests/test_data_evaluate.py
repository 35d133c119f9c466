"""Text sources, window sampling, perplexity and agreement against NumPy references."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jquant import data, evaluate
from jquant.errors import DataError, ShapeError

V = 37


def bigram_fn(table):
    """A 'model' whose logits at each position depend only on the current token."""
    t = jnp.asarray(table)
    return lambda tokens: t[tokens]


def nll_reference(table, windows):
    """float64 mean NLL of tokens[1:] given tokens[:-1], over every window."""
    table = np.asarray(table, np.float64)
    logp = table - np.log(np.exp(table).sum(-1, keepdims=True))
    total, count = 0.0, 0
    for w in windows:
        for a, b in zip(w[:-1], w[1:], strict=True):
            total -= logp[a, b]
            count += 1
    return total / count, count


@pytest.fixture
def stream():
    return np.random.default_rng(0).integers(0, V, size=1000).astype(np.int32)


@pytest.fixture
def table():
    return np.random.default_rng(1).standard_normal((V, V)).astype(np.float32) * 2


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_perplexity_matches_reference(stream, table, batch_size):
    seq = 64
    res = evaluate.perplexity(bigram_fn(table), stream, seq_len=seq, batch_size=batch_size)
    windows = stream[: (len(stream) // seq) * seq].reshape(-1, seq)
    nll, count = nll_reference(table, windows)
    assert res.windows == 15 and res.tokens == count == 15 * 63
    np.testing.assert_allclose(res.nll, nll, rtol=1e-5)
    np.testing.assert_allclose(res.ppl, math.exp(nll), rtol=1e-5)


def test_bos_replaces_the_first_token_of_each_window(stream, table):
    """With ``bos`` every window (evaluation and calibration) starts with it; the scored
    tokens (all but the first of each window) are the stream's, so the NLL is the reference's
    on the windows with their first token replaced."""
    seq = 64
    res = evaluate.perplexity(bigram_fn(table), stream, seq_len=seq, bos=3)
    windows = stream[: (len(stream) // seq) * seq].reshape(-1, seq).copy()
    plain, _ = nll_reference(table, windows)
    windows[:, 0] = 3
    nll, count = nll_reference(table, windows)
    assert res.tokens == count and abs(nll - plain) > 1e-4
    np.testing.assert_allclose(res.nll, nll, rtol=1e-5)
    w = data.eval_windows(stream, seq, bos=3)
    assert (w[:, 0] == 3).all() and (w[:, 1:] == windows[:, 1:]).all()
    c = data.calibration_windows(stream, 5, seq, seed=1, bos=3)
    assert (c[:, 0] == 3).all() and (c[:, 1:] == data.calibration_windows(stream, 5, seq, seed=1)[:, 1:]).all()


def test_bos_token_of_real_tokenizers():
    """SmolLM2's tokenizer adds no <bos>; a tokenizer that does is detected."""
    from jquant.models import load_gguf_tokenizer

    assert data.bos_token(load_gguf_tokenizer()) is None

    class Tok:
        bos_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": ([2] if add_special_tokens else []) + [ord(c) for c in text]}

    assert data.bos_token(Tok()) == 2 and data.bos_token(None) is None


def test_perplexity_max_windows(stream, table):
    res = evaluate.perplexity(bigram_fn(table), stream, seq_len=100, max_windows=4)
    nll, _ = nll_reference(table, stream[:400].reshape(4, 100))
    assert res.windows == 4
    np.testing.assert_allclose(res.nll, nll, rtol=1e-5)


def test_agreement_and_compare(stream, table):
    other = table + np.random.default_rng(2).standard_normal(table.shape).astype(np.float32) * 0.5
    same = evaluate.agreement(bigram_fn(table), bigram_fn(table), stream, seq_len=50, batch_size=4)
    assert abs(same.kl) < 1e-6 and same.top1 == 1.0
    ag = evaluate.agreement(bigram_fn(table), bigram_fn(other), stream, seq_len=50, batch_size=4)
    # reference: mean over every position of KL(p_ref || p_other) and argmax agreement
    toks = stream[:1000].reshape(-1, 50).ravel()
    lp = table.astype(np.float64) - np.log(np.exp(table.astype(np.float64)).sum(-1, keepdims=True))
    lq = other.astype(np.float64) - np.log(np.exp(other.astype(np.float64)).sum(-1, keepdims=True))
    kl = (np.exp(lp) * (lp - lq)).sum(-1)[toks].mean()
    top = (lp.argmax(-1) == lq.argmax(-1))[toks].mean()
    np.testing.assert_allclose(ag.kl, kl, rtol=1e-5)
    np.testing.assert_allclose(ag.top1, top, rtol=1e-6)
    cmp = evaluate.compare(bigram_fn(table), bigram_fn(other), stream, seq_len=50, batch_size=3)
    np.testing.assert_allclose(cmp.ref.ppl, evaluate.perplexity(bigram_fn(table), stream, seq_len=50).ppl, rtol=1e-5)
    np.testing.assert_allclose(cmp.quant.ppl, evaluate.perplexity(bigram_fn(other), stream, seq_len=50).ppl, rtol=1e-5)
    np.testing.assert_allclose(cmp.agreement.kl, kl, rtol=1e-5)


def test_compare_with_a_cached_reference(stream, table, tmp_path):
    """The reference as cached last hidden states and a head (a Partial binding its
    parameters) gives compare's figures, and the cache file is written once and read back."""
    from jax.tree_util import Partial

    other = table + np.random.default_rng(2).standard_normal(table.shape).astype(np.float32) * 0.5
    emb = jnp.asarray(np.random.default_rng(3).standard_normal((V, 5)).astype(np.float32))
    proj = jnp.asarray(np.random.default_rng(4).standard_normal((5, V)).astype(np.float32))
    body = Partial(lambda e, t: e[t], emb)  # "hidden states"
    head = Partial(lambda p, h: h @ p, proj)
    direct = evaluate.compare(lambda t: emb[t] @ proj, bigram_fn(other), stream, seq_len=50, batch_size=3,
                              max_windows=7)
    cache = str(tmp_path / "ref" / "h.npy")
    h = evaluate.reference_hidden(body, stream, seq_len=50, batch_size=3, max_windows=7, cache=cache)
    assert h.shape == (7, 50, 5) and (tmp_path / "ref" / "h.npy").is_file()
    np.save(cache, h * 0 + 1.0)  # a cached file is read, not recomputed
    np.testing.assert_array_equal(evaluate.reference_hidden(body, stream, seq_len=50, max_windows=7, cache=cache), 1.0)
    cached = evaluate.compare(evaluate.CachedReference(h, head), Partial(lambda t_, x: t_[x], jnp.asarray(other)),
                              stream, seq_len=50, batch_size=3, max_windows=7)
    for a, b in ((cached.ref.ppl, direct.ref.ppl), (cached.quant.ppl, direct.quant.ppl),
                 (cached.agreement.kl, direct.agreement.kl), (cached.agreement.top1, direct.agreement.top1)):
        np.testing.assert_allclose(a, b, rtol=1e-6)
    # both models as hidden states and a head: the heads run over chunks of positions (50 = 2
    # chunks of 32 with the last one short, so a chunk border and the unscored last position)
    q_split = evaluate.HiddenAndHead(Partial(lambda t_, x: t_[x], jnp.asarray(other)), Partial(lambda h: h))
    old, evaluate._HEAD_CHUNK = evaluate._HEAD_CHUNK, 32
    try:
        split = evaluate.compare(evaluate.CachedReference(h, head), q_split, stream, seq_len=50, batch_size=3,
                                 max_windows=7)
    finally:
        evaluate._HEAD_CHUNK = old
    for a, b in ((split.ref.ppl, direct.ref.ppl), (split.quant.ppl, direct.quant.ppl),
                 (split.agreement.kl, direct.agreement.kl), (split.agreement.top1, direct.agreement.top1)):
        np.testing.assert_allclose(a, b, rtol=1e-5)
    with pytest.raises(ShapeError, match="does not match"):
        evaluate.compare(evaluate.CachedReference(h[:3], head), bigram_fn(other), stream, seq_len=50, max_windows=7)


def test_text_shorter_than_a_window(table):
    with pytest.raises(DataError, match="shorter than one window of 512"):
        evaluate.perplexity(bigram_fn(table), np.arange(100) % V, seq_len=512)


def test_calibration_windows_deterministic_and_disjoint(stream):
    a = data.calibration_windows(stream, 5, 100, seed=3)
    b = data.calibration_windows(stream, 5, 100, seed=3)
    c = data.calibration_windows(stream, 5, 100, seed=4)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # each window is a slot of the stream, and no slot is used twice
    starts = []
    for w in a:
        hits = [s for s in range(0, 1000, 100) if np.array_equal(stream[s:s + 100], w)]
        assert hits
        starts.append(hits[0])
    assert len(set(starts)) == 5
    with pytest.raises(DataError, match="holds only 10 windows of 100, 11 requested"):
        data.calibration_windows(stream, 11, 100)


def test_split_text_is_disjoint_and_complete():
    text = "\n\n".join(f"paragraph {i} " + "x" * (i % 7) for i in range(200))
    cal, ev = data.split_text(text, 0.1)
    assert cal + ev == text and 0.05 * len(text) < len(ev) < 0.15 * len(text)
    assert ev.startswith("\n\n")


def test_text_sources():
    pydoc = data.load_text("pydoc")
    assert len(pydoc) > 100_000 and "Python" in pydoc
    with pytest.raises(DataError, match="unknown text source"):
        data.load_text("no-such-source-or-file")


def test_hf_source_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="cannot load dataset 'jquant-no-such-dataset'.*offline mode is on"):
        data.load_text("hf:jquant-no-such-dataset:test")
    with pytest.raises(DataError, match="must be hf:"):
        data.load_text("hf:onlyname")


def test_file_sources(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world")
    assert data.load_text(str(f)) == "hello world"
    (tmp_path / "b.bin").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(DataError, match="not UTF-8"):
        data.load_text(str(tmp_path / "b.bin"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        data.load_text(str(empty))


def test_tokens_outside_vocabulary():
    class Tok:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [1, 2, 500]}

    with pytest.raises(DataError, match=r"outside the model's vocabulary of 100"):
        data.tokenize(Tok(), "x", vocab_size=100)
