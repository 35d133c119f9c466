"""The visual report of a quantization job, and the comparison of several.

:func:`write_report` turns what ``jquant quantize`` and ``jquant eval`` wrote into one
self-contained HTML page (every figure inlined as a PNG, and written beside it):

- the quality table: float against quantized perplexity, KL, top-1 agreement on each
  evaluated text, bits/weight (quantized leaves and every parameter, metadata included)
  and the size in memory and on disk;
- per-layer reconstruction error of the method against RTN on the same grid (the logs of
  the calibration pipeline, ``layers.json``), by block and linear; for data-free recipes the
  relative weight error ``‖W − Q‖² / ‖W‖²`` of every quantized linear instead;
- for the worst layers: the distribution of their weights and quantization errors, and the
  magnitudes of their input activations per channel on calibration text (outlier channels
  show as spikes), with the outlier ratio ``max / median`` of every linear's input;
- bits/weight split into codes, scales, zeros, indices (g_idx / act-order permutation),
  outliers and the parameters kept in float;
- the loss curves of QAT and learned rotations, when the job trained them;
- wall time per stage of the job.

:func:`write_compare` draws quality against bits/weight for several outputs of one model.

Both write to a temporary directory and rename it into place: an error leaves nothing
half-written. Plots use matplotlib's Agg backend (no display, no server).
"""

from __future__ import annotations

import base64
import dataclasses
import glob
import html
import io
import json
import os
import re
import shutil
import tempfile

import numpy as np

from jquant.errors import DataError

MANIFEST = "jquant.json"
_TOP = 4  # worst layers shown in detail


# ----------------------------------------------------------------------------- reading


def _load_json(path: str, what: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except OSError as e:
        raise DataError(f"{path}: cannot read the {what} ({e.strerror or e})") from None
    except ValueError as e:
        raise DataError(f"{path}: the {what} is not valid JSON ({e})") from None


def read_results(out: str) -> dict:
    """What a ``jquant quantize`` directory holds: ``{"manifest", "evals" (text → result),
    "layers" (calibration logs or None)}``.

    Raises:
      DataError: ``out`` is not a directory written by ``jquant quantize`` (no ``jquant.json``),
        or one of its JSON files cannot be read.
    """
    out = os.path.abspath(out)
    mpath = os.path.join(out, MANIFEST)
    if not os.path.isdir(out):
        raise DataError(f"{out}: not a directory; give the --out directory of `jquant quantize`")
    if not os.path.isfile(mpath):
        raise DataError(f"{out}: holds no {MANIFEST}, so no quantization results; run `jquant quantize --out {out}` "
                        f"(and `jquant eval {out}`) first")
    manifest = _load_json(mpath, "manifest")
    for key in ("model", "recipe", "bits_per_weight_quantized", "bits_per_weight_all", "seconds"):
        if key not in manifest:
            raise DataError(f"{mpath}: the manifest has no {key!r} (written by another tool or version?)")
    evals = {}
    for f in sorted(glob.glob(os.path.join(out, "eval_*.json"))):
        r = _load_json(f, "evaluation result")
        if not all(k in r for k in ("text", "float_ppl", "quant_ppl", "kl", "top1")):
            raise DataError(f"{f}: not an evaluation result of `jquant eval` (needs text, float_ppl, quant_ppl, kl, "
                            "top1)")
        evals[r["text"]] = r
    lpath = os.path.join(out, "layers.json")
    layers = _load_json(lpath, "calibration log") if os.path.isfile(lpath) else None
    return {"dir": out, "manifest": manifest, "evals": evals, "layers": layers}


# ----------------------------------------------------------------------------- analysis


@dataclasses.dataclass
class LinearStats:
    """What the report shows of one quantized linear ``layers/i/name``."""

    path: str
    block: int
    name: str
    weight_err: float  # ‖W − Q‖² / ‖W‖²
    recon: float | None = None  # the method's ‖X(W − Q)‖²/n on the calibration inputs
    recon_rtn: float | None = None  # the same for RTN
    act_max: np.ndarray | None = None  # (in,) max |x| per input channel
    act_mean: np.ndarray | None = None  # (in,) mean |x| per input channel
    weights: np.ndarray | None = None  # (in, out) float weight (worst layers only)
    error: np.ndarray | None = None  # (in, out) W − Q (worst layers only)

    @property
    def badness(self) -> float:
        """Ranking key: the method's reconstruction error on the calibration inputs when
        logged (what the layer's output loses), else the relative weight error."""
        return self.recon if self.recon is not None else self.weight_err

    @property
    def outlier_ratio(self) -> float | None:
        if self.act_max is None:
            return None
        med = float(np.median(self.act_max))
        return float(self.act_max.max() / med) if med > 0 else float("inf")


_LINEAR = re.compile(r"^layers/(\d+)/(.+)/kernel$")


def _parts_bytes(q) -> dict[str, int]:
    """Bytes of a QTensor by part: codes, scales, zeros, indices, outliers."""
    nb = lambda x: 0 if x is None else int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize  # noqa: E731
    return {"codes": nb(q.codes), "scales": nb(q.scale), "zeros": nb(q.zero),
            "indices": nb(q.g_idx) + nb(q.perm), "outliers": nb(q.outlier_idx) + nb(q.outlier_w)}


def analyse(out: str, manifest: dict, *, windows: int = 4, seq_len: int = 256) -> dict:
    """Load the float model and the quantized checkpoint of ``out`` and measure what the
    report plots: every quantized linear's weight error, the input magnitudes per channel of
    every linear over ``windows`` windows of ``seq_len`` calibration tokens (the job's own
    calibration tokens when it kept them, else pydoc text), the bytes of each QTensor part.

    Returns ``{"linears": [LinearStats], "parts": {part: bytes}, "params": n, "act_source": str}``.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jquant as jq
    from jquant import data, recipes
    from jquant.cli import ROTATIONS, _load_model, _prepare, _Tokenizer
    from jquant.qtensor import is_qtensor
    from jquant.spec import path_str

    model, config, _, _, _ = _load_model(manifest["model"], manifest["dtype"], tokenizer=False)
    # The float weights the quantizer saw: the recipe's rotations fused, its quantizers placed.
    prepared = _prepare(model, recipes.recipe_from_dict(manifest["recipe"], f"{out}/{MANIFEST} recipe"),
                        rotations=os.path.join(out, ROTATIONS))
    fstate = nnx.state(prepared)
    qstate = jq.restore(os.path.join(out, "params"), target=fstate)
    floats = {path_str(kp): x for kp, x in jax.tree_util.tree_flatten_with_path(fstate)[0]}

    parts = {"codes": 0, "scales": 0, "zeros": 0, "indices": 0, "outliers": 0, "float": 0}
    params = 0
    linears: dict[str, LinearStats] = {}
    for kp, leaf in jax.tree_util.tree_flatten_with_path(qstate, is_leaf=is_qtensor)[0]:
        path = path_str(kp)
        if is_qtensor(leaf):
            params += leaf.size
            for k, v in _parts_bytes(leaf).items():
                parts[k] += v
            m = _LINEAR.match(path)
            if m and path in floats:
                w = np.asarray(floats[path], np.float64)
                e = w - np.asarray(leaf.dequantize(jnp.float32), np.float64)
                linears[path] = LinearStats(path, int(m.group(1)), m.group(2),
                                            float((e ** 2).sum() / max((w ** 2).sum(), 1e-300)))
        elif hasattr(leaf, "shape"):
            n = int(np.prod(leaf.shape))
            params += n
            parts["float"] += n * np.dtype(leaf.dtype).itemsize

    # Input magnitudes per channel of every block linear, on the float model.
    tpath = os.path.join(out, "work", "tokens.npy")
    if os.path.isfile(tpath):
        toks = np.load(tpath)[:windows, :seq_len]
        act_source = f"{toks.shape[0]} calibration windows of {toks.shape[1]} tokens (the job's own)"
    else:
        toker = _Tokenizer(manifest["model"])
        ids = toker.ids(data.split_text(data.load_text("pydoc"))[0], config.vocab_size, "text for the activations")
        toks = data.eval_windows(ids, seq_len, windows, toker.bos())
        act_source = f"{toks.shape[0]} windows of {seq_len} tokens of pydoc text"
    gd_embed, st = nnx.split(prepared)
    embed = jax.jit(lambda s, t: nnx.merge(gd_embed, s).embed(t))
    h = embed(st, jnp.asarray(toks))

    def block_fn(bstate, h, gd):
        out_h, inputs = nnx.merge(gd, bstate).forward_with_inputs(h)
        red = {k: (jnp.max(jnp.abs(x), axis=(0, 1)), jnp.mean(jnp.abs(x.astype(jnp.float32)), axis=(0, 1)))
               for k, x in inputs.items()}
        return out_h, red

    fns = {}
    for i, layer in enumerate(prepared.layers):
        gd, bstate = nnx.split(layer)
        if gd not in fns:
            fns[gd] = jax.jit(lambda s, x, _gd=gd: block_fn(s, x, _gd))
        h, red = fns[gd](bstate, h)
        for name, (mx, mean) in red.items():
            ls = linears.get(f"layers/{i}/{name}/kernel")
            if ls is not None:
                ls.act_max, ls.act_mean = np.asarray(mx, np.float64), np.asarray(mean, np.float64)
    return {"linears": list(linears.values()), "parts": parts, "params": params, "act_source": act_source,
            "floats": floats, "qstate": qstate}


def _attach_logs(linears: list[LinearStats], layers: dict | None) -> None:
    if not layers:
        return
    by_path = {f"{e['path']}/kernel" if not e["path"].endswith("/kernel") else e["path"]: e
               for e in layers.get("layers", [])}
    for ls in linears:
        e = by_path.get(ls.path)
        if e is not None:
            ls.recon, ls.recon_rtn = e.get("recon"), e.get("recon_rtn")


def _worst(linears: list[LinearStats], analysis: dict, top: int) -> list[LinearStats]:
    import jax
    import jax.numpy as jnp

    from jquant.qtensor import is_qtensor
    from jquant.spec import path_str

    worst = sorted(linears, key=lambda s: -s.badness)[:top]
    qleaves = {path_str(kp): leaf for kp, leaf in
               jax.tree_util.tree_flatten_with_path(analysis["qstate"], is_leaf=is_qtensor)[0]}
    for ls in worst:
        w = np.asarray(analysis["floats"][ls.path], np.float32)
        ls.weights, ls.error = w, w - np.asarray(qleaves[ls.path].dequantize(jnp.float32), np.float32)
    return worst


# ----------------------------------------------------------------------------- figures


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def _fig_layers(linears: list[LinearStats], logged: bool, method: str) -> bytes:
    plt = _plt()
    names = sorted({s.name for s in linears})
    if logged:
        fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.2))
        for n in names:
            pts = sorted((s.block, s.recon, s.recon_rtn) for s in linears if s.name == n and s.recon is not None)
            if not pts:
                continue
            x = [p[0] for p in pts]
            line, = a.semilogy(x, [p[1] for p in pts], marker="o", ms=3, label=n)
            if all(p[2] for p in pts):
                a.semilogy(x, [p[2] for p in pts], ls=":", color=line.get_color())
                b.plot(x, [p[1] / p[2] for p in pts], marker="o", ms=3, color=line.get_color(), label=n)
        a.set(title=f"reconstruction error ‖X(W−Q)‖²/n: {method} (solid), RTN (dotted)", xlabel="block")
        b.axhline(1.0, color="grey", lw=0.8)
        b.set(title=f"{method} / RTN (below 1: the method wins)", xlabel="block")
        b.legend(fontsize=7, ncol=2)
    else:
        fig, a = plt.subplots(figsize=(8, 4.2))
        for n in names:
            pts = sorted((s.block, s.weight_err) for s in linears if s.name == n)
            a.semilogy([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=n)
        a.set(title="relative weight error ‖W−Q‖²/‖W‖² (no calibration log: a data-free recipe)", xlabel="block")
        a.legend(fontsize=7, ncol=2)
    return _png(fig)


def _fig_worst_weights(worst: list[LinearStats]) -> bytes:
    plt = _plt()
    fig, axes = plt.subplots(2, len(worst), figsize=(3.6 * len(worst), 6.2), squeeze=False)
    for j, s in enumerate(worst):
        a = axes[0, j]
        w = s.weights.ravel()
        a.hist(w, bins=120, log=True, histtype="stepfilled", color="tab:blue", alpha=0.8, label="W")
        a.hist(s.error.ravel(), bins=120, log=True, histtype="stepfilled", color="tab:red", alpha=0.6, label="W − Q")
        a.set_title(s.path.removesuffix("/kernel"), fontsize=8)
        a.legend(fontsize=7)
        b = axes[1, j]
        b.semilogy(np.abs(s.weights).max(axis=1), lw=0.7, label="max |W| per input row")
        b.semilogy(np.sqrt((s.error ** 2).mean(axis=1)), lw=0.7, color="tab:red", label="rms error per input row")
        b.set_xlabel("input channel")
        b.legend(fontsize=7)
    fig.suptitle("worst layers: weights and quantization error (log counts)", fontsize=10)
    return _png(fig)


def _inputs(linears: list[LinearStats]) -> list[tuple[int, str, LinearStats]]:
    """The distinct linear inputs (linears of one block that read the same activations, as
    q/k/v and gate/up, count once): ``(block, "q_proj,k_proj,v_proj", first linear)``."""
    seen: dict[tuple[int, bytes], list[LinearStats]] = {}
    for s in sorted(linears, key=lambda s: (s.block, s.name)):
        if s.act_max is not None:
            seen.setdefault((s.block, s.act_max.tobytes()), []).append(s)
    return [(b, ",".join(x.name.rsplit("/", 1)[-1] for x in group), group[0]) for (b, _), group in seen.items()]


def _fig_activations(worst: list[LinearStats], linears: list[LinearStats]) -> bytes:
    plt = _plt()
    inputs = _inputs(linears)
    of = {id(x): (b, label) for b, label, first in inputs for x in linears
          if x.block == b and x.act_max is not None and x.act_max.tobytes() == first.act_max.tobytes()}
    shown, keys = [], set()
    for s in worst:
        if id(s) in of and of[id(s)] not in keys:
            keys.add(of[id(s)])
            shown.append((s, of[id(s)]))
    fig, axes = plt.subplots(1, len(shown) + 1, figsize=(3.6 * (len(shown) + 1), 3.6), squeeze=False)
    for j, (s, (b, label)) in enumerate(shown):
        a = axes[0, j]
        a.plot(s.act_max, lw=0.7, label="max |x|")
        a.plot(s.act_mean, lw=0.7, label="mean |x|")
        k = int(np.argmax(s.act_max))
        a.annotate(f"ch {k}", (k, s.act_max[k]), fontsize=7)
        a.set(title=f"block {b}: input of {label}", xlabel="input channel", yscale="log")
        a.title.set_fontsize(8)
        a.legend(fontsize=7)
    a = axes[0, -1]
    for label in sorted({label for _, label, _ in inputs}):
        pts = sorted((b, first.outlier_ratio) for b, lab, first in inputs if lab == label)
        a.semilogy([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, label=label)
    a.set(title="outlier ratio: max over channels / median of max |x|", xlabel="block")
    a.title.set_fontsize(8)
    a.legend(fontsize=6)
    return _png(fig)


def _fig_bits(parts: dict, params: int) -> bytes:
    plt = _plt()
    fig, a = plt.subplots(figsize=(8, 1.9))
    left = 0.0
    colors = {"codes": "tab:blue", "scales": "tab:orange", "zeros": "tab:green", "indices": "tab:purple",
              "outliers": "tab:red", "float": "tab:grey"}
    for k, v in parts.items():
        bpw = 8.0 * v / max(params, 1)
        if bpw <= 0:
            continue
        a.barh([0], [bpw], left=left, color=colors[k], label=f"{k} {bpw:.3f}")
        left += bpw
    a.set(yticks=[], xlabel=f"bits per parameter over all {params:,} parameters (total {left:.3f})")
    a.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, 1.45))
    return _png(fig)


def _fig_training(curves: dict[str, np.ndarray], evals: list) -> bytes:
    """Loss curves of the job's training phases (QAT, learned rotations) by step."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 3.6), squeeze=False)
    for a, (name, losses) in zip(axes[0], curves.items()):
        a.plot(np.arange(1, len(losses) + 1), losses, lw=0.8)
        a.set(title=name, xlabel="step", ylabel="training loss")
        if name.startswith("QAT") and evals:
            b = a.twinx()
            b.plot([e[0] for e in evals], [e[1] for e in evals], "o-", color="tab:red", ms=3)
            b.set_ylabel("held-out perplexity", color="tab:red")
    return _png(fig)


def _training_curves(res: dict) -> tuple[dict[str, np.ndarray], list]:
    curves, evals = {}, []
    qat = (res["layers"] or {}).get("qat")
    if qat and qat.get("losses"):
        curves["QAT loss (distillation KL or cross-entropy)"] = np.asarray(qat["losses"], np.float64)
        evals = [tuple(e) for e in qat.get("evals") or []]
    rot = os.path.join(res["dir"], "rotations.npz")
    if os.path.isfile(rot):
        try:
            with np.load(rot) as f:
                curves["learned rotations (SpinQuant) loss"] = np.asarray(f["losses"], np.float64)
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"{rot}: cannot read the learned rotations' losses ({e})") from None
    return curves, evals


def _fig_time(seconds: dict, evals: dict) -> bytes:
    plt = _plt()
    items = [(k, float(v)) for k, v in seconds.items() if isinstance(v, (int, float))]
    items += [(f"eval {t}", float(r["eval_seconds"])) for t, r in evals.items() if "eval_seconds" in r]
    fig, a = plt.subplots(figsize=(8, 0.35 * len(items) + 1))
    a.barh([k for k, _ in items][::-1], [v for _, v in items][::-1], color="tab:blue")
    for y, (_, v) in enumerate(items[::-1]):
        a.text(v, y, f" {v:.1f}s", va="center", fontsize=7)
    a.set(xlabel="wall seconds")
    return _png(fig)


# ----------------------------------------------------------------------------- HTML

_CSS = """body{font-family:system-ui,sans-serif;max-width:1300px;margin:1.5em auto;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}img{max-width:100%}
.note{color:#555;font-size:.9em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}"""


def _table(header: list[str], rows: list[list], table_id: str) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _img(name: str, png: bytes, alt: str) -> str:
    return (f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" alt="{html.escape(alt)}" '
            f'data-file="{name}">')


def _publish(tmp: str, dest: str, overwrite: bool) -> None:
    if os.path.exists(dest):
        if not overwrite:
            shutil.rmtree(tmp, ignore_errors=True)
            raise DataError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it")
        old = dest + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def _staging(dest: str) -> str:
    parent = os.path.dirname(os.path.abspath(dest)) or "."
    try:
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".report-", dir=parent)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would make the published report private
        return tmp
    except OSError as e:
        raise DataError(f"{dest}: cannot write the report there ({e.strerror or e})") from None


_TITLES = {"layers": "Error by layer", "worst": "Worst layers", "activations": "Activations",
           "bits": "Bits per weight", "training": "Training", "time": "Time"}


def quality_rows(res: dict) -> list[list]:
    """The quality table's rows (float, then quantized, for each evaluated text)."""
    m = res["manifest"]
    mib = lambda b: "" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    rows = []
    for text, r in sorted(res["evals"].items()):
        rows.append([f"float ({m.get('dtype', 'float32')})", text, r.get("windows", ""), f"{r['float_ppl']:.3f}",
                     "", "", "", "32.000", "32.000", mib(m.get("float_param_bytes")), ""])
        rows.append([m["recipe"]["name"], text, r.get("windows", ""), f"{r['quant_ppl']:.3f}",
                     f"{r['quant_ppl'] / r['float_ppl']:.4f}", f"{r['kl']:.4f}", f"{100 * r['top1']:.1f}",
                     f"{m['bits_per_weight_quantized']:.3f}", f"{m['bits_per_weight_all']:.3f}",
                     mib(m.get("quant_param_bytes")), mib(m.get("checkpoint_bytes_on_disk"))])
    return rows


QUALITY_HEADER = ["model", "text", "windows", "perplexity", "ppl / float", "KL", "top-1 %", "bits/w quantized",
                  "bits/w all", "MiB in memory", "MiB on disk"]


def write_report(out: str, dest: str | None = None, *, model: bool = True, windows: int = 4, seq_len: int = 256,
                 overwrite: bool = True) -> str:
    """Write the report of the ``jquant quantize`` directory ``out`` to ``dest`` (default
    ``out/report``): ``index.html`` with every figure inlined, and the figures as PNGs.

    Args:
      model: load the model and the checkpoint for the weight, activation and bits/weight
        figures (``False``: only what the JSON files say).
      windows, seq_len: calibration windows for the activation magnitudes.

    Returns the path of ``index.html``.

    Raises:
      DataError: ``out`` holds no results of ``jquant quantize``, a JSON file is unreadable,
        ``dest`` cannot be written (or exists and ``overwrite`` is false). Nothing is left
        half-written.
    """
    res = read_results(out)
    m = res["manifest"]
    dest = os.path.abspath(dest or os.path.join(res["dir"], "report"))
    figs: list[tuple[str, str, bytes, str]] = []  # (section, file, png, caption)
    logged = bool(res["layers"] and any(e.get("recon") is not None for e in res["layers"].get("layers", [])))
    method = m["recipe"]["name"]
    linears: list[LinearStats] = []
    analysis = None
    if model:
        analysis = analyse(res["dir"], m, windows=windows, seq_len=seq_len)
        linears = analysis["linears"]
        _attach_logs(linears, res["layers"])
    elif logged:
        for e in res["layers"]["layers"]:
            mm = _LINEAR.match(e["path"] + "/kernel")
            if mm and e.get("recon") is not None:
                linears.append(LinearStats(e["path"] + "/kernel", int(mm.group(1)), mm.group(2), float("nan"),
                                           e["recon"], e.get("recon_rtn")))
    if linears and (logged or model):
        figs.append(("layers", "layers.png", _fig_layers(linears, logged, method),
                     "Per layer: " + ("the method's reconstruction error on the calibration inputs against RTN on "
                                      "the same grid." if logged else "relative weight error of every quantized linear.")))
    worst = []
    if analysis is not None and linears:
        worst = _worst(linears, analysis, _TOP)
        figs.append(("worst", "worst_weights.png", _fig_worst_weights(worst),
                     "The worst layers (" + ("highest reconstruction error on the calibration inputs" if logged else
                                             "highest relative weight error") + "): weight and error histograms, and "
                     "per input row the largest weight and the rms quantization error."))
        figs.append(("activations", "activations.png", _fig_activations(worst, linears),
                     f"Input activations of the worst layers per channel, on {analysis['act_source']} through the "
                     "float model; right: the outlier ratio of every linear's input by block."))
        figs.append(("bits", "bits.png", _fig_bits(analysis["parts"], analysis["params"]),
                     "Bits per parameter by what they store (GGML block formats keep their scales inside the codes)."))
    curves, train_evals = _training_curves(res)
    if curves:
        figs.append(("training", "training.png", _fig_training(curves, train_evals),
                     "Training loss by step of the job's learned parts" + (" and the held-out perplexity (red)"
                                                                            if train_evals else "") + "."))
    figs.append(("time", "time.png", _fig_time(m["seconds"], res["evals"]), "Wall time per stage of the job."))

    tmp = _staging(dest)
    try:
        for _, name, png, _ in figs:
            with open(os.path.join(tmp, name), "wb") as fh:
                fh.write(png)
        parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>jquant report: "
                 f"{html.escape(method)} on {html.escape(os.path.basename(m['model']))}</title>"
                 f"<style>{_CSS}</style></head><body>",
                 f"<h1>{html.escape(method)} on {html.escape(os.path.basename(m['model']))}</h1>",
                 f"<p class='note'>{html.escape(m['recipe'].get('description', ''))}<br>from {html.escape(res['dir'])}; "
                 f"{m.get('quantized_leaves', '?')} quantized leaves, {m.get('params', 0):,} parameters.</p>",
                 "<h2>Quality</h2>"]
        if res["evals"]:
            parts.append(_table(QUALITY_HEADER, quality_rows(res), "quality"))
            parts.append("<p class='note'>KL: mean KL(float ‖ quantized) of the next-token distributions, nats; "
                         "top-1: how often both models predict the same next token. bits/w count codes, scales, "
                         "zeros and every index the checkpoint stores.</p>")
        else:
            parts.append(f"<p>No evaluation yet: run <code>jquant eval {html.escape(res['dir'])}</code>.</p>")
        if linears:
            rows = [[s.path.removesuffix("/kernel"), f"{s.weight_err:.3e}",
                     "" if s.recon is None else f"{s.recon:.4g}", "" if not s.recon_rtn else f"{s.recon_rtn:.4g}",
                     "" if not (s.recon is not None and s.recon_rtn) else f"{s.recon / s.recon_rtn:.3f}",
                     "" if s.outlier_ratio is None else f"{s.outlier_ratio:.1f}"]
                    for s in sorted(linears, key=lambda s: -s.badness)[:12]]
            parts.append("<h2>Layers</h2>")
            parts.append(_table(["linear (worst first)", "‖W−Q‖²/‖W‖²", "recon", "recon RTN", "recon / RTN",
                                 "act outlier ratio"], rows, "layers"))
        for section, name, png, caption in figs:
            parts.append(f"<h2>{ _TITLES[section] }</h2>")
            parts.append(_img(name, png, caption))
            parts.append(f"<p class='note'>{html.escape(caption)}</p>")
        parts.append("</body></html>")
        with open(os.path.join(tmp, "index.html"), "w", encoding="utf-8") as fh:
            fh.write("\n".join(parts))
        _publish(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(dest, "index.html")


# ----------------------------------------------------------------------------- compare


def write_compare(dirs: list[str], dest: str, *, text: str | None = None, overwrite: bool = True) -> str:
    """One table and one plot (perplexity and KL against bits/weight) of several ``jquant
    quantize`` outputs of the same model, evaluated on the same text. Writes ``dest/index.html``,
    ``dest/compare.png`` and ``dest/compare.json``; returns the HTML's path.

    Args:
      text: the evaluation text to compare on (default: the one every directory has; when
        several, ``fortunes`` if present, else the first by name).

    Raises:
      DataError: fewer than two directories, one without results or evaluation, directories
        of different models, no evaluation text they all share (or ``text`` missing in one),
        evaluations of one text with different window counts, an unwritable ``dest``.
    """
    if len(dirs) < 2:
        raise DataError(f"compare needs two or more directories of `jquant quantize`, got {len(dirs)}")
    results = [read_results(d) for d in dirs]
    models = {os.path.realpath(r["manifest"]["model"]) for r in results}
    if len(models) > 1:
        raise DataError("compare: the directories hold quantizations of different models: " + "; ".join(
            f"{r['dir']}: {r['manifest']['model']}" for r in results) + " (compare outputs of one model)")
    for r in results:
        if not r["evals"]:
            raise DataError(f"{r['dir']}: no evaluation result (eval_*.json); run `jquant eval {r['dir']}` first")
    common = set.intersection(*(set(r["evals"]) for r in results))
    if text is None:
        if not common:
            raise DataError("compare: no evaluation text all directories share: " + "; ".join(
                f"{r['dir']}: {sorted(r['evals'])}" for r in results) + " (run `jquant eval DIR --text T` on each)")
        text = "fortunes" if "fortunes" in common else sorted(common)[0]
    missing = [r["dir"] for r in results if text not in r["evals"]]
    if missing:
        raise DataError(f"compare: no evaluation on {text!r} in {missing}; run `jquant eval DIR --text {text}` there")
    n_windows = {r["evals"][text].get("windows") for r in results}
    if len(n_windows) > 1:
        raise DataError(f"compare: the evaluations on {text!r} cover different window counts {sorted(n_windows)}: "
                        "evaluate every directory with the same --max-windows and --seq-len")
    rows = []
    for r in results:
        m, e = r["manifest"], r["evals"][text]
        rows.append({"dir": r["dir"], "recipe": m["recipe"]["name"], "bits_all": m["bits_per_weight_all"],
                     "bits_quantized": m["bits_per_weight_quantized"], "disk_mib": (m.get("checkpoint_bytes_on_disk")
                                                                                    or 0) / 2**20,
                     "float_ppl": e["float_ppl"], "ppl": e["quant_ppl"], "kl": e["kl"], "top1": e["top1"],
                     "quantize_s": m["seconds"].get("quantize")})
    rows.sort(key=lambda x: x["bits_all"])
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    for x in rows:
        a.scatter(x["bits_all"], x["ppl"], s=20)
        a.annotate(x["recipe"], (x["bits_all"], x["ppl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        b.scatter(x["bits_all"], x["kl"], s=20)
        b.annotate(x["recipe"], (x["bits_all"], x["kl"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    a.axhline(rows[0]["float_ppl"], color="grey", ls="--", lw=0.8, label=f"float {rows[0]['float_ppl']:.2f}")
    a.set(xlabel="bits per parameter (all)", ylabel=f"perplexity on {text}", yscale="log")
    a.legend(fontsize=8)
    b.set(xlabel="bits per parameter (all)", ylabel="KL to float (nats/token)", yscale="log")
    png = _png(fig)
    header = ["recipe", "bits/w all", "bits/w quantized", "MiB on disk", "perplexity", "ppl / float", "KL",
              "top-1 %", "quantize s", "directory"]
    trows = [[x["recipe"], f"{x['bits_all']:.3f}", f"{x['bits_quantized']:.3f}", f"{x['disk_mib']:.1f}",
              f"{x['ppl']:.3f}", f"{x['ppl'] / x['float_ppl']:.4f}", f"{x['kl']:.4f}", f"{100 * x['top1']:.1f}",
              "" if x["quantize_s"] is None else f"{x['quantize_s']:.1f}", x["dir"]] for x in rows]
    dest = os.path.abspath(dest)
    tmp = _staging(dest)
    try:
        with open(os.path.join(tmp, "compare.png"), "wb") as fh:
            fh.write(png)
        with open(os.path.join(tmp, "compare.json"), "w") as fh:
            json.dump({"model": results[0]["manifest"]["model"], "text": text, "rows": rows}, fh, indent=1)
        page = (f"<!doctype html><html><head><meta charset='utf-8'><title>jquant compare</title><style>{_CSS}"
                f"</style></head><body><h1>{len(rows)} quantizations of "
                f"{html.escape(os.path.basename(results[0]['manifest']['model']))}</h1>"
                f"<p class='note'>evaluated on {html.escape(text)}; float perplexity {rows[0]['float_ppl']:.3f}</p>"
                + _table(header, trows, "compare") + _img("compare.png", png, "quality against bits per weight")
                + "</body></html>")
        with open(os.path.join(tmp, "index.html"), "w", encoding="utf-8") as fh:
            fh.write(page)
        _publish(tmp, dest, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.join(dest, "index.html")
