"""Quality of a (quantized) language model on real text.

- :func:`perplexity`: the standard method: tokenize the whole text, cut it into
  non-overlapping windows of ``seq_len`` tokens, take the mean next-token negative
  log-likelihood over every predicted position (each window's first token has no
  context and is not scored), and ``exp`` of it.
- :func:`agreement`: how far a quantized model's next-token distribution is from the
  float model's: mean ``KL(p_float ‖ p_quant)`` per token, and top-1 agreement.

Both take ``logits_fn(tokens: int32[B, T]) -> float[B, T, V]``, so they serve any model.
With ``bos`` (:func:`jquant.data.bos_token`), every window starts with that token in place of
its first (never scored) one, as llama.cpp's ``perplexity`` does: Gemma, trained with
``<bos>`` before every text, more than doubles its perplexity without it.
Pass a model's parameters as the bound arguments of a ``jax.tree_util.Partial``
(``Partial(f, params)``): they then reach the jitted evaluation as arguments. A plain
closure over large arrays makes XLA embed them in the compiled program as constants (slow
to compile, their memory held twice).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jquant.data import eval_windows
from jquant.errors import ShapeError


@dataclasses.dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int

    def __str__(self):
        return f"ppl {self.ppl:.3f} (mean NLL {self.nll:.4f} over {self.tokens} tokens in {self.windows} windows)"


def _batches(windows: np.ndarray, batch_size: int):
    """Full batches; the last one padded by repeating a window, with a 0/1 row mask."""
    n = len(windows)
    for i in range(0, n, batch_size):
        b = windows[i: i + batch_size]
        mask = np.ones(len(b), np.float32)
        if len(b) < batch_size:
            pad = batch_size - len(b)
            b = np.concatenate([b, np.repeat(b[:1], pad, axis=0)])
            mask = np.concatenate([mask, np.zeros(pad, np.float32)])
        yield jnp.asarray(b), jnp.asarray(mask)


def _progress(total, desc, enabled):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="win", leave=False, disable=None)


def _partial(fn: Callable) -> Partial:
    """``fn`` as a pytree a jitted function can take as an argument: a ``Partial``'s bound
    arguments are traced like any array argument; a plain function is static."""
    return fn if isinstance(fn, Partial) else Partial(fn)


def _eager(hidden_fn: Callable) -> Callable:
    """``hidden_fn`` as a function called outside any jit: a :class:`Blockwise` as it is (it
    jits its blocks), anything else jitted whole with its parameters as arguments."""
    if isinstance(hidden_fn, Blockwise):
        return hidden_fn
    fn, jitted = _partial(hidden_fn), jax.jit(lambda f, t: f(t))
    return lambda t: jitted(fn, t)


def token_nll(logits, tokens):
    """Per-position NLL (float32) of ``tokens[:, 1:]`` under ``logits[:, :-1]``: shape ``(B, T-1)``."""
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]


def perplexity(logits_fn: Callable, tokens: np.ndarray, *, seq_len: int = 512, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = False, desc: str = "perplexity",
               bos: int | None = None) -> PerplexityResult:
    """Perplexity of ``logits_fn`` on a token stream (see module doc)."""
    windows = eval_windows(np.asarray(tokens), seq_len, max_windows, bos)

    @jax.jit
    def nll_sum(fn, batch, mask):
        return jnp.sum(token_nll(fn(batch), batch) * mask[:, None])

    fn = _partial(logits_fn)

    total = 0.0
    bar = _progress(len(windows), desc, progress)
    for batch, mask in _batches(windows, batch_size):
        total += float(nll_sum(fn, batch, mask))
        if bar is not None:
            bar.update(int(mask.sum()))
    if bar is not None:
        bar.close()
    count = len(windows) * (seq_len - 1)
    nll = total / count
    return PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=count, windows=len(windows))


@dataclasses.dataclass
class AgreementResult:
    kl: float  # mean KL(p_ref || p) in nats per token
    top1: float  # fraction of positions whose argmax agrees
    tokens: int

    def __str__(self):
        return f"KL {self.kl:.5f} nats/token, top-1 agreement {100 * self.top1:.2f}% over {self.tokens} tokens"


def agreement(ref_logits_fn: Callable, logits_fn: Callable, tokens: np.ndarray, *, seq_len: int = 512,
              batch_size: int = 8, max_windows: int | None = None, progress: bool = False,
              bos: int | None = None) -> AgreementResult:
    """Mean ``KL(p_ref ‖ p)`` and top-1 agreement of two models' next-token distributions."""
    windows = eval_windows(np.asarray(tokens), seq_len, max_windows, bos)

    @jax.jit
    def stats(fr, fq, batch, mask):
        lr = jax.nn.log_softmax(fr(batch).astype(jnp.float32), axis=-1)
        lq = jax.nn.log_softmax(fq(batch).astype(jnp.float32), axis=-1)
        kl = jnp.sum(jnp.exp(lr) * (lr - lq), axis=-1)
        top = (jnp.argmax(lr, -1) == jnp.argmax(lq, -1)).astype(jnp.float32)
        return jnp.sum(kl * mask[:, None]), jnp.sum(top * mask[:, None])

    kl_total = top_total = 0.0
    bar = _progress(len(windows), "agreement", progress)
    for batch, mask in _batches(windows, batch_size):
        k, t = stats(_partial(ref_logits_fn), _partial(logits_fn), batch, mask)
        kl_total += float(k)
        top_total += float(t)
        if bar is not None:
            bar.update(int(mask.sum()))
    if bar is not None:
        bar.close()
    count = len(windows) * seq_len
    return AgreementResult(kl=kl_total / count, top1=top_total / count, tokens=count)


@dataclasses.dataclass
class CachedReference:
    """The reference (float) model as its last hidden states on the evaluation windows and its
    head: ``head(hidden[i:j])`` gives the reference logits without the reference's forward
    pass through the blocks (the head is about a fifth of a small model's forward).

    Attributes:
      hidden: ``(windows, seq_len, hidden)`` the output of the last block on each window
        (:func:`reference_hidden` computes or loads it).
      head: ``(batch, seq_len, hidden) -> (batch, seq_len, vocab)`` logits (final norm and
        lm_head); jit-traceable.
    """

    hidden: np.ndarray
    head: Callable


def reference_hidden(hidden_fn: Callable, tokens: np.ndarray, *, seq_len: int = 512, batch_size: int = 8,
                     max_windows: int | None = None, cache: str | None = None,
                     progress: bool = False, bos: int | None = None) -> np.ndarray:
    """``hidden_fn`` (``int32 (B, T) -> (B, T, hidden)``) on every evaluation window of
    ``tokens``, ``(windows, seq_len, hidden)``; kept in the ``.npy`` file ``cache`` when given
    (read back if it exists and has the windows' shape; written atomically). The caller
    keys the file name by the model, its dtype and the windows."""
    from jquant._atomic import write_npy

    windows = eval_windows(np.asarray(tokens), seq_len, max_windows, bos)
    if cache is not None and os.path.isfile(cache):
        try:
            h = np.load(cache, mmap_mode="r")
            if h.shape[:2] == windows.shape:
                return np.asarray(h)
        except (OSError, ValueError):
            pass  # unreadable: computed again below
    hidden_fn = _eager(hidden_fn)
    out = []
    bar = _progress(len(windows), "reference", progress)
    for batch, mask in _batches(windows, batch_size):
        n = int(mask.sum())
        out.append(np.asarray(hidden_fn(batch))[:n])
        if bar is not None:
            bar.update(n)
    if bar is not None:
        bar.close()
    h = np.concatenate(out)
    if cache is not None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(cache)), exist_ok=True)
            write_npy(cache, h)
        except OSError:
            pass  # an unwritable cache only costs time
    return h


@dataclasses.dataclass
class HiddenAndHead:
    """A model given as its blocks and its head, so that :func:`compare` can take the head
    (final norm and lm_head, the largest matmul of a model with a large vocabulary) over a
    few positions at a time: ``head(hidden(tokens))`` are the logits.

    Attributes:
      hidden: ``int32 (B, T) -> (B, T, hidden)``, the last block's output; jit-traceable, or
        a :class:`Blockwise`.
      head: ``(B, t, hidden) -> (B, t, vocab)`` logits; jit-traceable.
    """

    hidden: Callable
    head: Callable


class Blockwise:
    """``model.hidden(tokens)`` run as one jitted call per block instead of one program for
    the whole stack: the embedding, then each of ``model.layers``, each a jitted function of
    (the block's parameters, its input). Blocks with the same structure share one compiled
    program, so a 30-block model compiles one block, not 30 unrolled ones: less compile time
    and less compile-time memory. The result equals :meth:`jquant.models.Llama.hidden` up to
    float32 rounding where XLA fuses across a block boundary differently.

    Args:
      model: a :class:`jquant.models.Llama` (any family member), float or quantized.
    Call:
      ``int32 (B, T) -> (B, T, hidden)``; not jit-traceable (it calls jitted functions):
      :func:`reference_hidden` and :func:`compare` call it outside their own jit.
    """

    def __init__(self, model):
        from flax import nnx

        graphdef, self._state = nnx.split(model)
        self._embed = _compiled(("embed", graphdef), lambda: jax.jit(lambda st, t: nnx.merge(graphdef, st).embed(t)))
        self._blocks = []
        for layer in model.layers:
            gd, st = nnx.split(layer)
            fn = _compiled(("block", gd), lambda gd=gd: jax.jit(lambda st, h: nnx.merge(gd, st)(h)[0]))
            self._blocks.append((fn, st))

    def __call__(self, tokens):
        h = self._embed(self._state, jnp.asarray(tokens))
        for fn, st in self._blocks:
            h = fn(st, h)
        return h


_COMPILED: dict = {}  # (kind, graph definition) -> jitted function, shared by every Blockwise


def _compiled(key, make):
    if key not in _COMPILED:
        _COMPILED[key] = make()
    return _COMPILED[key]


_HEAD_CHUNK = 128  # positions per head call when both models come as hidden states and a head


@dataclasses.dataclass
class Comparison:
    """Float vs quantized model on the same windows, from one pass over the text."""

    ref: PerplexityResult
    quant: PerplexityResult
    agreement: AgreementResult


def compare(ref_logits_fn: Callable | CachedReference, logits_fn: Callable, tokens: np.ndarray, *,
            seq_len: int = 512, batch_size: int = 8, max_windows: int | None = None,
            progress: bool = False, bos: int | None = None) -> Comparison:
    """Perplexity of both models and their agreement, each batch run through both once.

    ``ref_logits_fn`` may be a :class:`CachedReference` of the same windows: the reference
    logits then come from its hidden states through its head. When ``logits_fn`` is a
    :class:`HiddenAndHead` too, both heads run over ``_HEAD_CHUNK`` positions at a time, so
    a step holds a few (batch, chunk, vocab) logits instead of (batch, seq, vocab) ones
    (Gemma's 262k vocabulary: 256 MiB instead of 1 GiB per array at batch 2).
    """
    windows = eval_windows(np.asarray(tokens), seq_len, max_windows, bos)
    cached = isinstance(ref_logits_fn, CachedReference)
    split = isinstance(logits_fn, HiddenAndHead)  # its blocks run before (outside) the jitted statistics
    chunked = cached and split
    fr = _partial(ref_logits_fn.head if cached else ref_logits_fn)
    fq = _partial(logits_fn.head if split else logits_fn)
    q_hidden = _eager(logits_fn.hidden) if split else None
    if cached and ref_logits_fn.hidden.shape[:2] != windows.shape:
        raise ShapeError(f"cached reference of shape {ref_logits_fn.hidden.shape[:2]} does not match the "
                         f"{windows.shape} evaluation windows")

    def chunk_stats(ref, q, targets, m):
        """Sums over positions whose next tokens are ``targets`` (-1: none, the last position)."""
        lr, lq = jax.nn.log_softmax(ref.astype(jnp.float32), -1), jax.nn.log_softmax(q.astype(jnp.float32), -1)
        has = (targets >= 0) * m
        t = jnp.maximum(targets, 0)[..., None]
        nll_r = -jnp.sum(jnp.take_along_axis(lr, t, -1)[..., 0] * has)
        nll_q = -jnp.sum(jnp.take_along_axis(lq, t, -1)[..., 0] * has)
        kl = jnp.sum(jnp.sum(jnp.exp(lr) * (lr - lq), -1) * m)
        top = jnp.sum((jnp.argmax(lr, -1) == jnp.argmax(lq, -1)) * m)
        return jnp.stack([nll_r, nll_q, kl, top])

    @jax.jit
    def stats(fr, fq, batch, mask, h, hq):
        targets = jnp.concatenate([batch[:, 1:], jnp.full_like(batch[:, :1], -1)], axis=1)
        m = mask[:, None]
        if not chunked:
            ref = fr(h) if cached else fr(batch)
            return chunk_stats(ref, fq(hq) if split else fq(batch), targets, m)
        # Whole chunks in a scan, so they run one after another (unrolled, XLA may keep the
        # logits of every chunk alive at once); a shorter last chunk after it.
        b, t = batch.shape
        n, c = t // _HEAD_CHUNK, _HEAD_CHUNK
        out = jnp.zeros(4, jnp.float32)
        if n:
            def body(acc, xs):
                hr_c, hq_c, tg_c = xs
                return acc + chunk_stats(fr(hr_c), fq(hq_c), tg_c, m), None

            parts = lambda a: jnp.moveaxis(a[:, :n * c].reshape(b, n, c, *a.shape[2:]), 1, 0)  # noqa: E731
            out, _ = jax.lax.scan(body, out, (parts(h), parts(hq), parts(targets)))
        if t > n * c:
            out = out + chunk_stats(fr(h[:, n * c:]), fq(hq[:, n * c:]), targets[:, n * c:], m)
        return out

    acc = np.zeros(4)
    bar = _progress(len(windows), "evaluate", progress)
    for i, (batch, mask) in enumerate(_batches(windows, batch_size)):
        h = None
        if cached:
            h = ref_logits_fn.hidden[i * batch_size: (i + 1) * batch_size]
            if len(h) < batch_size:  # padded like the last batch of windows
                h = np.concatenate([h, np.repeat(h[:1], batch_size - len(h), axis=0)])
        hq = q_hidden(batch) if split else None
        acc += np.asarray(stats(fr, fq, batch, mask, h, hq), dtype=np.float64)
        if bar is not None:
            bar.update(int(mask.sum()))
    if bar is not None:
        bar.close()
    n_pred = len(windows) * (seq_len - 1)
    n_all = len(windows) * seq_len
    mk = lambda s: PerplexityResult(math.exp(s / n_pred), s / n_pred, n_pred, len(windows))  # noqa: E731
    return Comparison(mk(acc[0]), mk(acc[1]), AgreementResult(acc[2] / n_all, acc[3] / n_all, n_all))
