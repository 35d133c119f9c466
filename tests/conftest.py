"""Shared test helpers: a float64 NumPy reference of jquant's grouping and int grids.

Written from the formulas in ``jquant/formats.py``'s docstring and the QuantSpec
semantics, never by calling jquant internals. Exposed through the ``ref`` fixture.
"""

import os
import types

import numpy as np
import pytest


def f16(v):
    """Round to float16 (the stored scale dtype) and back to float64."""
    return np.asarray(v, np.float64).astype(np.float16).astype(np.float64)


def grouped(w, axis=0, granularity="group", group_size=128):
    """float64 grouped view ``(G, S, R)``: groups of ``group_size`` consecutive entries along
    ``axis`` (ragged last group padded with NaN); ``channel``: one group; ``tensor``: ``(1, N, 1)``."""
    w = np.asarray(w, np.float64)
    if granularity == "tensor":
        return w.reshape(1, -1, 1)
    x = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
    K = x.shape[0]
    S = K if granularity == "channel" else min(group_size, K)
    G = -(-K // S)
    xp = np.full((G * S, x.shape[1]), np.nan)
    xp[:K] = x
    return xp.reshape(G, S, x.shape[1])


def stored_params(p, axis, granularity):
    """A QTensor's stored scale/zero ``param_shape`` -> float64 ``(G, 1, R)``."""
    p = np.asarray(p, np.float64)
    if granularity == "tensor":
        return p.reshape(1, 1, 1)
    p = np.moveaxis(p, axis, 0)
    return p.reshape(p.shape[0], 1, -1)


def int_grid(xg, bits, symmetric=True, full_range=False, zero_type="int", lo=None, hi=None, store=f16):
    """Reference RTN on an int grid of a grouped view (range ``[lo, hi]``, default min/max).

    Returns a namespace with ``codes``, ``scale``, ``zero`` (None when symmetric), ``deq``
    (float64), ``unclipped`` (the code before clipping) and ``qmin``/``qmax`` of the codes.
    """
    if lo is None:
        lo = np.nanmin(xg, axis=1, keepdims=True)
        hi = np.nanmax(xg, axis=1, keepdims=True)
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    zero = None
    if symmetric:
        half = 2 ** (bits - 1)
        if full_range:  # GGUF Q4_0: the signed extreme maps to -half
            ext = np.where(np.abs(lo) > np.abs(hi), lo, hi)
            s = store(ext / -half)
            qlo = -half
        else:
            s = store(np.maximum(np.abs(lo), np.abs(hi)) / (half - 1))
            qlo = -(half - 1)
        u = np.round(xg / np.where(s == 0, 1.0, s))
        q = np.clip(u, qlo, half - 1)
        codes, deq = q + half, q * s
        unclipped, cmin, cmax = u + half, qlo + half, 2 * half - 1
    else:
        maxq = 2**bits - 1
        if zero_type == "int":  # GPTQ: range widened to hold 0, integer zero point
            lo, hi = np.minimum(lo, 0.0), np.maximum(hi, 0.0)
            s = store((hi - lo) / maxq)
            sd = np.where(s == 0, 1.0, s)
            zero = np.clip(np.round(-lo / sd), 0, maxq)
            unclipped = np.round(xg / sd) + zero
            codes = np.clip(unclipped, 0, maxq)
            deq = (codes - zero) * s
        else:  # GGUF Q4_1 / HQQ: float minimum; the step is measured from the stored minimum
            zero = store(lo)
            s = store((hi - zero) / maxq)
            unclipped = np.round((xg - zero) / np.where(s == 0, 1.0, s))
            codes = np.clip(unclipped, 0, maxq)
            deq = codes * s + zero
        cmin, cmax = 0, maxq
    return types.SimpleNamespace(codes=codes, scale=s, zero=zero, deq=deq, unclipped=unclipped,
                                 cmin=cmin, cmax=cmax)


@pytest.fixture
def ref():
    return types.SimpleNamespace(f16=f16, grouped=grouped, stored_params=stored_params, int_grid=int_grid)


# ----------------------------------------------------------------------------- a tiny model on disk


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """``(model dir, text file)``: a random 2-block Llama (hidden 64, MLP 256, vocab 320) saved
    by ``transformers`` as a Hugging Face directory, with a byte-level BPE tokenizer trained
    on the text (Python documentation): what a user's own small checkpoint looks like to the
    examples and the CLI."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from jquant import data

    d = tmp_path_factory.mktemp("tiny")
    text = data.load_text("pydoc")[:400_000]
    (d / "text.txt").write_text(text)
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator([text[i:i + 2000] for i in range(0, 100_000, 2000)], trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>")
    assert len(tok) <= 320
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                   tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1.0 + 0.1 * torch.randn(p.shape) if name.endswith("norm.weight") else
                    torch.randn(p.shape) / np.sqrt(p.shape[-1]))
    model.save_pretrained(d / "model", safe_serialization=True)
    tok.save_pretrained(d / "model")
    return str(d / "model"), str(d / "text.txt")


# ----------------------------------------------------------------------------- headless browser


class _Page:
    """What a real browser made of an HTML page: ``images`` (``data-file`` or src → decoded
    with a size), ``tables`` (id → rows of cell texts, header first), ``text``."""

    def __init__(self, images, tables, text):
        self.images, self.tables, self.text = images, tables, text


_CHECK_JS = ("<script>window.addEventListener('load',()=>{const r=[...document.images].map(i=>[i.dataset.file||"
             "i.src.slice(0,80),i.complete&&i.naturalWidth>0&&i.naturalHeight>0]);const t={};for(const tb of "
             "document.querySelectorAll('table[id]')){t[tb.id]=[...tb.rows].map(r=>[...r.cells].map(c=>"
             "c.textContent.trim()))}const p=document.createElement('pre');p.id='jquant-check';p.textContent="
             "JSON.stringify({images:r,tables:t,text:document.body.innerText});document.body.appendChild(p)});"
             "</script>")


def _browser_binary():
    import shutil

    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("no headless Chromium (scripts/setup_env.sh installs chromium-headless-shell)")
    pytest.skip("no headless Chromium installed (apt-get install chromium-headless-shell)")


def check_page(path: str) -> _Page:
    """Open ``path`` in headless Chromium and report what it rendered (a copy of the page
    with a probe script beside it; the page itself has no script)."""
    import html as _html
    import json as _json
    import re
    import subprocess

    binary = _browser_binary()
    src = open(path, encoding="utf-8").read()
    assert "<script" not in src
    probe = os.path.join(os.path.dirname(path), ".probe.html")
    with open(probe, "w", encoding="utf-8") as fh:
        fh.write(src.replace("</body>", _CHECK_JS + "</body>"))
    try:
        dom = subprocess.run([binary, "--no-sandbox", "--disable-gpu", "--virtual-time-budget=15000",
                              "--dump-dom", "file://" + os.path.abspath(probe)],
                             capture_output=True, text=True, timeout=120).stdout
    finally:
        os.remove(probe)
    m = re.search(r'<pre id="jquant-check">(.*?)</pre>', dom, re.S)
    assert m, f"the browser did not run the page's load event: {dom[-500:]}"
    got = _json.loads(_html.unescape(m.group(1)))
    return _Page({k: v for k, v in got["images"]}, got["tables"], got["text"])


@pytest.fixture
def browser():
    """``check_page``: open an HTML file in headless Chromium (see :func:`check_page`)."""
    return check_page


# ----------------------------------------------------------------------------- compiled programs


_FAST_COMPILE = "--xla_backend_optimization_level=0"


def pytest_configure(config):
    """Compile fast: most of the suite's time is XLA:CPU compiling thousands of small programs
    (50–100 ms each here), few of which run long.

    - LLVM's optimisation level 0 (``XLA_FLAGS``, for this process and the subprocesses the
      tests start): a quarter less time over the suite, the same HLO and the same numerics
      contracts (every reference comparison still holds). ``JQUANT_TEST_XLA_DEFAULT=1`` runs
      the suite at XLA's default level, as users run jquant.
    - One persistent XLA compilation cache for the whole run, shared with those subprocesses
      (examples, 8-device and 2-process runs, the CLI): the same program compiles once. It
      starts empty in a fresh temporary directory, so no result depends on an earlier run; a
      ``JAX_COMPILATION_CACHE_DIR`` the caller set is used instead. A size limit turns on JAX's
      file lock, so processes that run at once never read an entry half written.
    """
    import sys
    import tempfile

    if not os.environ.get("JQUANT_TEST_XLA_DEFAULT") and _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FAST_COMPILE).strip()
    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    config._jquant_xla_cache = tempfile.mkdtemp(prefix="jquant-test-xla-")
    cache = {"jax_compilation_cache_dir": config._jquant_xla_cache,
             "jax_persistent_cache_min_compile_time_secs": 0.2,
             "jax_compilation_cache_max_size": 8 << 30}
    os.environ.update({name.upper(): str(value) for name, value in cache.items()})  # read by every process
    if "jax" in sys.modules:  # imported before this hook: its config read the environment already
        import jax

        for name, value in cache.items():
            jax.config.update(name, value)


def pytest_unconfigure(config):
    import shutil

    path = getattr(config, "_jquant_xla_cache", None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def cpu_devices_env():
    """``env(n, **extra)``: this process's environment for a subprocess with ``n`` fake CPU
    devices (``--xla_force_host_platform_device_count``, added to the run's ``XLA_FLAGS``)."""

    def env(n: int, **extra) -> dict:
        flags = (os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", **extra)

    return env
