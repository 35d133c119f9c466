"""The method zoo on the default model: quality, size and speed of every quantizer, side by
side with the peers installable here, in one run.

Quality: SmolLM2-135M-Instruct's linears quantized by each row's method (embedding and norms
float), evaluated on two texts of other domains than any calibration text: Debian's
``fortunes`` (quotations, literature) and ``licenses`` (legal text), ``--eval-windows``
non-overlapping windows of 512 tokens each. Columns: perplexity and mean KL(p_float ‖ p_quant)
per token on each text, bits/weight of the linears counting every stored piece (codes,
scales, zeros, g_idx), the checkpoint's size on disk (Orbax directory), and the seconds the
method took on all 210 linears. Data-driven rows calibrate on text the float model wrote
itself (``selfgen``, ``--calib-windows`` windows, kept in ``--out`` so later runs reuse them).

Peers: the ``hqq`` package (HQQ's own implementation, installed with ``pip --target`` into
``--out``/peers, never a dependency of jquant) quantizes the same weights at the same
setting; its dequantized weights go into the same Flax model, its bits/weight count its
stored float16 scale and zero.

Speed (``--timing``): the time one 8192×28672 matrix (a 70B model's MLP, Flax layout
``(in, out)``) takes, jquant against the peer, compile time apart.

    python benchmarks/zoo.py [--only hqq_w3,rtn_w3] [--eval-windows 16] [--timing] [--force]

A finished row stays in ``benchmarks/results/zoo.json`` (rows run with the same evaluation
settings are not run again unless ``--force``); the table shows every finished row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LINEARS = "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
TEXTS = ("fortunes", "licenses")
HQQ_PEER = "hqq==0.2.8.post1"


def _int(bits, group, method="rtn", zero_type="int", **options):
    return {"format": "int", "bits": bits, "group_size": group, "symmetric": False, "zero_type": zero_type,
            "method": method, "options": options}


def _gptq(bits, group, **options):
    return _int(bits, group, "gptq", damp=0.1, act_order=True, static_groups=True, **options)


def _awq(bits, group, then="rtn"):
    extra = {"damp": 0.1, "act_order": True, "static_groups": True} if then == "gptq" else {}
    return _int(bits, group, "awq", then=then, **extra)


def _kq(fmt, imatrix=False):
    return {"format": fmt, "method": "kquant", "options": {"fallback": True, "imatrix": imatrix}}


# row -> (setting, label, what): what is a jquant spec dict, ("peer:hqq", bits, group), or
# ("recipe", name) for a recipe's rules on the linears (mixes that differ by layer).
ROWS = {
    "rtn_w4": ("W4 g64", "RTN (integer zero)", _int(4, 64)),
    "rtn_w4_fmin": ("W4 g64", "RTN (float minimum)", _int(4, 64, zero_type="float")),
    "hqq_w4": ("W4 g64", "HQQ (jquant, float minimum)", _int(4, 64, "hqq", zero_type="float")),
    "hqq_w4_os": ("W4 g64", "HQQ (jquant, float minimum, scale refitted)",
                  _int(4, 64, "hqq", zero_type="float", optimize_scale=True)),
    "hqq_w4_int": ("W4 g64", "HQQ (jquant, integer zero)", _int(4, 64, "hqq")),
    "peer_hqq_w4": ("W4 g64", "hqq package", ("peer:hqq", 4, 64)),
    "gptq_w4": ("W4 g64", "GPTQ act-order static", _gptq(4, 64)),
    "awq_w4": ("W4 g64", "AWQ + RTN", _awq(4, 64)),
    "awq_gptq_w4": ("W4 g64", "AWQ + GPTQ act-order static", _awq(4, 64, "gptq")),
    "rtn_w3": ("W3 g64", "RTN (integer zero)", _int(3, 64)),
    "rtn_w3_fmin": ("W3 g64", "RTN (float minimum)", _int(3, 64, zero_type="float")),
    "rtn_w3_mse": ("W3 g64", "RTN (integer zero, MSE range)", {**_int(3, 64), "range": "mse"}),
    "hqq_w3": ("W3 g64", "HQQ (jquant, integer zero)", _int(3, 64, "hqq")),
    "hqq_w3_fmin": ("W3 g64", "HQQ (jquant, float minimum)", _int(3, 64, "hqq", zero_type="float")),
    "peer_hqq_w3": ("W3 g64", "hqq package", ("peer:hqq", 3, 64)),
    "gptq_w3": ("W3 g64", "GPTQ act-order static", _gptq(3, 64)),
    "awq_w3": ("W3 g64", "AWQ + RTN", _awq(3, 64)),
    "awq_gptq_w3": ("W3 g64", "AWQ + GPTQ act-order static", _awq(3, 64, "gptq")),
    "rtn_w2": ("W2 g32", "RTN (integer zero)", _int(2, 32)),
    "hqq_w2": ("W2 g32", "HQQ (jquant, integer zero)", _int(2, 32, "hqq")),
    "peer_hqq_w2": ("W2 g32", "hqq package", ("peer:hqq", 2, 32)),
    "gptq_w2": ("W2 g32", "GPTQ act-order static", _gptq(2, 32)),
    "rtn_w8": ("W8 chan", "RTN int8 per channel", {"format": "int", "bits": 8, "granularity": "channel",
                                                  "symmetric": True}),
    "outliers_w8": ("W8 chan", "LLM.int8 outliers (> 6.0) + int8", {"format": "int", "bits": 8, "granularity": "channel",
                                                                   "symmetric": True, "method": "outliers",
                                                                   "options": {"threshold": 6.0}}),
    # BitNet's weight formats, post-training (BitNet trains with them; see QAT for that use).
    "binary": ("1-bit", "BitNet binary (per tensor)", {"format": "binary", "granularity": "tensor"}),
    "ternary": ("1.58-bit", "BitNet b1.58 ternary absmean (per tensor)", {"format": "ternary",
                                                                         "granularity": "tensor"}),
    "ternary_g64": ("1.58-bit", "ternary absmean g64", {"format": "ternary", "group_size": 64}),
    "bcq_w3": ("W3 g128", "BCQ 3 planes", {"format": "bcq", "bits": 3, "group_size": 128, "method": "bcq"}),
    "rtn_w3_g128": ("W3 g128", "RTN (integer zero)", _int(3, 128)),
    "mxfp4": ("block fp", "MXFP4 (E8M0 per 32)", {"format": "mxfp4", "method": "blockfloat"}),
    "nvfp4": ("block fp", "NVFP4 (E4M3 per 16 + tensor)", {"format": "nvfp4", "method": "blockfloat"}),
    "mxfp8": ("block fp", "MXFP8 E4M3", {"format": "mxfp8_e4m3", "method": "blockfloat"}),
    # GGUF types: the default model's inputs of 576 are not a multiple of 256, so the k-quants
    # fall back on those linears as llama-quantize does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0,
    # Q2_K/Q3_K -> Q4_0); down_proj (1536 inputs) keeps the k-quant.
    "q8_0": ("GGUF", "Q8_0", _kq("q8_0")),
    "q6_k": ("GGUF", "Q6_K (fallback Q8_0)", _kq("q6_k")),
    "q5_k": ("GGUF", "Q5_K (fallback Q5_1)", _kq("q5_k")),
    "q4_k": ("GGUF", "Q4_K (fallback Q5_0)", _kq("q4_k")),
    "q4_1": ("GGUF", "Q4_1", _kq("q4_1")),
    "q4_0": ("GGUF", "Q4_0", _kq("q4_0")),
    "q4_0_imatrix": ("GGUF", "Q4_0 + imatrix", _kq("q4_0", True)),
    "q3_k": ("GGUF", "Q3_K (fallback Q4_0)", _kq("q3_k")),
    "q2_k": ("GGUF", "Q2_K (fallback Q4_0)", _kq("q2_k")),
    # llama.cpp's mixes: a recipe's linear rules (its embedding rule left out, as in every row)
    "q4_k_m": ("GGUF", "Q4_K_M mix (Q6_K on more-bits v/down)", ("recipe", "q4_k_m")),
    "q5_k_m": ("GGUF", "Q5_K_M mix (Q6_K on more-bits v/down)", ("recipe", "q5_k_m")),
}


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def _disk_mib(qstate) -> float:
    """The size of the Orbax checkpoint of ``qstate``, in MiB."""
    import jquant as jq

    d = tempfile.mkdtemp(prefix="zoo_")
    try:
        jq.save(os.path.join(d, "params"), qstate)
        return _dir_bytes(d) / 2**20
    finally:
        shutil.rmtree(d, ignore_errors=True)


def ensure_peer(out: str) -> str:
    """The hqq package in ``out/peers/hqq`` (pip --target, no dependencies: torch is ours)."""
    target = os.path.join(out, "peers", "hqq")
    if not os.path.isdir(os.path.join(target, "hqq")):
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                        "--target", target, HQQ_PEER, "termcolor"], check=True)
    if target not in sys.path:
        sys.path.insert(0, target)
    return target


def hqq_peer_quantize(w: np.ndarray, bits: int, group: int):
    """The hqq package's quantization of a Flax kernel ``w`` ``(in, out)``, as its HQQLinear
    configures it (BaseQuantizeConfig: axis 1, groups along the input, zero rounded at 4 bits
    before the solve); returns the dequantized ``(in, out)`` float32 weight with scale and
    zero held in float16 (its compute dtype) and the bits/weight it stores."""
    import torch
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    cfg = BaseQuantizeConfig(nbits=bits, group_size=group, axis=1)["weight_quant_params"]
    W = torch.from_numpy(np.ascontiguousarray(w.T))  # HF layout (out, in)
    wq, meta = Quantizer.quantize(W, nbits=bits, channel_wise=True, group_size=group, optimize=True,
                                  round_zero=cfg["round_zero"], axis=1, bitpack=False, device="cpu")
    scale, zero = meta["scale"].half().float(), meta["zero"].half().float()
    deq = ((wq.float() - zero) * scale).reshape(meta["shape"])
    bpw = bits + 2 * 16 / group
    return deq.numpy().T.astype(np.float32), bpw


class Evaluator:
    """Float model log-probabilities cached per text; a parameter state -> ppl and KL per text."""

    def __init__(self, eval_windows: int, batch: int = 4):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from jquant import data, models
        from jquant.models import forward

        self.model, self.config, self.tok = models.load()
        self.graphdef, self.state = nnx.split(self.model)
        self.batch = batch
        self.windows = {}
        for src in TEXTS:
            toks = data.tokenize(self.tok, data.load_text(src), self.config.vocab_size)
            self.windows[src] = data.eval_windows(toks, 512, eval_windows)
        gd = self.graphdef

        @jax.jit
        def logp(st, b):
            return jax.nn.log_softmax(forward(gd, st, b)[0].astype(jnp.float32), -1)

        @jax.jit
        def stats(st, b, lr):
            lq = jax.nn.log_softmax(forward(gd, st, b)[0].astype(jnp.float32), -1)
            nll = -jnp.sum(jnp.take_along_axis(lq[:, :-1], b[:, 1:, None], -1))
            kl = jnp.sum(jnp.exp(lr) * (lr - lq))
            return nll, kl

        self._stats = stats
        self.ref = {s: [np.asarray(logp(self.state, jnp.asarray(w[i:i + batch])))
                        for i in range(0, len(w), batch)] for s, w in self.windows.items()}
        self.float_ppl = self.evaluate(self.state)

    def evaluate(self, st) -> dict:
        import jax.numpy as jnp

        out = {}
        for s, w in self.windows.items():
            nll = kl = 0.0
            for j, i in enumerate(range(0, len(w), self.batch)):
                a, b = self._stats(st, jnp.asarray(w[i:i + self.batch]), self.ref[s][j])
                nll += float(a)
                kl += float(b)
            out[s] = {"ppl": math.exp(nll / (len(w) * 511)), "kl": kl / (len(w) * 512)}
        return out


def calibration_tokens(ev: Evaluator, out: str, windows: int) -> np.ndarray:
    from jquant import calibrate

    path = os.path.join(out, f"selfgen_{windows}x512.npy")
    if os.path.isfile(path):
        return np.load(path)
    print(f"writing {windows} self-generated calibration windows", flush=True)
    toks = calibrate.calibration_tokens(ev.tok, text="selfgen", n=windows, seq_len=512, model=ev.model,
                                        vocab_size=ev.config.vocab_size, progress=True)
    np.save(path, toks)
    return toks


def run_row(name: str, ev: Evaluator, out: str, calib_windows: int) -> dict:
    import jax

    import jquant as jq
    from jquant import calibrate
    from jquant.spec import path_str

    setting, label, what = ROWS[name]
    row = {"row": name, "setting": setting, "method": label}
    t0 = time.perf_counter()
    if isinstance(what, tuple) and what[0] == "recipe":
        from jquant import recipes

        recipe = recipes.load_recipe(what[1]).for_model(ev.config.num_hidden_layers)
        rules = [(p, s) for p, s in recipe.rules if not re.search(p, "embed_tokens/embedding")]
        qstate = jq.quantize_tree(ev.state, rules)
        jax.block_until_ready(jax.tree_util.tree_leaves(qstate))
        row["seconds"] = time.perf_counter() - t0
        row["bits_per_weight"] = jq.summary(qstate).quantized_bits_per_weight
        row["disk_mib"] = _disk_mib(qstate)
        row["spec"] = {"recipe": recipe.to_dict()}
    elif isinstance(what, tuple):  # a peer
        ensure_peer(out)
        _, bits, group = what
        pat = re.compile(LINEARS)
        bpws = []

        def one(kp, x):
            if not pat.search(path_str(kp)):
                return x
            deq, bpw = hqq_peer_quantize(np.asarray(x, np.float32), bits, group)
            bpws.append(bpw)
            return jax.numpy.asarray(deq)

        qstate = jax.tree_util.tree_map_with_path(one, ev.state)
        row["seconds"] = time.perf_counter() - t0
        row["bits_per_weight"] = float(np.mean(bpws))
        row["disk_mib"] = None
        row["spec"] = {"peer": HQQ_PEER, "nbits": bits, "group_size": group, "axis": 1}
    else:
        spec = jq.QuantSpec.from_dict(what)
        rules = [(LINEARS, spec)]
        if jq.quantizers.needs_data(spec):
            toks = calibration_tokens(ev, out, calib_windows)
            t0 = time.perf_counter()
            qstate, _ = calibrate.quantize_model(ev.model, toks, rules, progress=True)
            row["calibration"] = {"text": "selfgen", "windows": calib_windows, "seq_len": 512}
        else:
            qstate = jq.quantize_tree(ev.state, rules)
        jax.block_until_ready(jax.tree_util.tree_leaves(qstate))
        row["seconds"] = time.perf_counter() - t0
        row["bits_per_weight"] = jq.summary(qstate).quantized_bits_per_weight
        row["disk_mib"] = _disk_mib(qstate)
        row["spec"] = spec.to_dict()
    row["quality"] = ev.evaluate(qstate)
    return row


def timing(out: str, reps: int, only: str = "") -> list[dict]:
    """One 8192×28672 matrix: jquant's methods against the hqq package (W4 g64); GPTQ with the
    Hessian of 16384 random input rows (its time is the solve's, the Hessian is not counted)."""
    import jax
    import jax.numpy as jnp

    import jquant as jq
    from jquant.quantizers import collect, quantize_weight

    K, N = 8192, 28672
    w = jax.random.normal(jax.random.key(0), (K, N), jnp.float32) * 0.02
    x = jax.random.normal(jax.random.key(1), (16384, K), jnp.float32)
    H = collect(["hessian"], [x])["hessian"]
    del x
    res = []
    cases = (("RTN W4 g64 (jquant)", _int(4, 64)),
             ("HQQ W4 g64 float min (jquant)", _int(4, 64, "hqq", zero_type="float")),
             ("HQQ W4 g64 float min, scale refitted (jquant)",
              _int(4, 64, "hqq", zero_type="float", optimize_scale=True)),
             ("HQQ W4 g64 integer zero (jquant)", _int(4, 64, "hqq")),
             ("GPTQ W4 g64 act-order static (jquant)", _gptq(4, 64)),
             ("Q4_K (jquant)", _kq("q4_k")), ("Q6_K (jquant)", _kq("q6_k")), ("Q8_0 (jquant)", _kq("q8_0")))
    for label, d in cases:
        if only not in label:
            continue
        spec = jq.QuantSpec.from_dict(d)
        times = []
        for r in range(reps + 1):
            t = time.perf_counter()
            jax.block_until_ready(quantize_weight(w, spec, {"hessian": H})[0].codes)
            times.append(time.perf_counter() - t)
        res.append({"what": label, "first_s": times[0], "seconds": float(np.median(times[1:]))})
        print(f"{label:<40} {res[-1]['seconds']:8.2f} s (first call {times[0]:.2f} s)", flush=True)
    del H
    ensure_peer(out)
    import torch
    from hqq.core.quantize import Quantizer

    W = torch.from_numpy(np.asarray(w).T.copy())  # HF layout (out, in)
    del w
    times = []
    for r in range(reps + 1):
        t = time.perf_counter()
        Quantizer.quantize(W, nbits=4, channel_wise=True, group_size=64, optimize=True, round_zero=True, axis=1,
                           bitpack=True, device="cpu")
        times.append(time.perf_counter() - t)
    res.append({"what": "HQQ W4 g64 (hqq package, torch CPU)", "first_s": times[0],
                "seconds": float(np.median(times[1:]))})
    print(f"{res[-1]['what']:<40} {res[-1]['seconds']:8.2f} s (first call {times[0]:.2f} s)", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated rows (default: all)")
    ap.add_argument("--out", default="out/zoo", help="peers, calibration tokens")
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--calib-windows", type=int, default=64)
    ap.add_argument("--timing", action="store_true", help="time one 8192x28672 matrix (jquant vs hqq package)")
    ap.add_argument("--timing-only", action="store_true", help="only the timing (no quality rows)")
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (for BENCHMARKS.md)")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--timing-match", default="", help="time only jquant's cases whose label contains this "
                                                         "(the hqq package is always timed)")
    ap.add_argument("--force", action="store_true", help="rerun rows already in the JSON")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "zoo.json"))
    args = ap.parse_args()
    names = [] if args.timing_only else ([n for n in args.only.split(",") if n] or list(ROWS))
    args.timing = args.timing or args.timing_only
    unknown = set(names) - set(ROWS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; known: {', '.join(ROWS)}")
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    doc = {"rows": {}, "timing": None}
    if os.path.isfile(args.json):
        with open(args.json) as fh:
            doc = json.load(fh)
    if doc.get("eval_windows") not in (None, args.eval_windows):
        doc["rows"] = {}  # other evaluation windows: the old rows do not compare
    doc["eval_windows"] = args.eval_windows
    todo = [n for n in names if args.force or n not in doc["rows"]]
    if todo:
        ev = Evaluator(args.eval_windows)
        doc["float"] = ev.float_ppl
        for name in todo:
            print(f"{name}: {ROWS[name][1]} {ROWS[name][0]}", flush=True)
            doc["rows"][name] = run_row(name, ev, args.out, args.calib_windows)
            with open(args.json, "w") as fh:
                json.dump(doc, fh, indent=1)
    if args.timing:
        rows = timing(args.out, args.reps, args.timing_match)
        if args.timing_match and doc.get("timing"):  # a partial run updates the rows it timed
            kept = [r for r in doc["timing"]["rows"] if r["what"] not in {x["what"] for x in rows}]
            rows = kept + rows
        doc["timing"] = {"shape": [8192, 28672], "rows": rows}
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
    # The table: every finished row, in ROWS order.
    fl = doc.get("float", {})
    print(f"\n{doc['eval_windows']} windows of 512 tokens per text; float ppl "
          + ", ".join(f"{s} {fl[s]['ppl']:.3f}" for s in TEXTS if s in fl))
    rows = [doc["rows"][n] for n in ROWS if n in doc["rows"]]
    cells = []
    for r in rows:
        q = r["quality"]
        cells.append([r["setting"], r["method"]] + [f"{q[s][k]:.3f}" if k == "ppl" else f"{q[s][k]:.4f}"
                                                    for s in TEXTS for k in ("ppl", "kl")]
                     + [f"{r['bits_per_weight']:.3f}", "" if r.get("disk_mib") is None else f"{r['disk_mib']:.1f}",
                        f"{r['seconds']:.1f}"])
    head = ["setting", "method"] + [f"{s} {k}" for s in TEXTS for k in ("ppl", "KL")] + ["bits/w", "disk MiB",
                                                                                          "quant s"]
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for c in cells:
            print("| " + " | ".join(c) + " |")
    else:
        widths = [max(len(x) for x in col) for col in zip(head, *cells)]
        for c in [head] + cells:
            print("  ".join(x.ljust(w) if i < 2 else x.rjust(w) for i, (x, w) in enumerate(zip(c, widths))))
    if doc.get("timing"):
        print("\none 8192x28672 matrix:")
        for t in doc["timing"]["rows"]:
            print(f"  {t['what']:<40} {t['seconds']:8.2f} s (first call {t['first_s']:.2f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
