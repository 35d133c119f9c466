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
