"""GPTQ quality on the default model: float / RTN / GPTQ / GPTQ + act-order, W4 g64, W3 g64, W2 g32.

Every row is two commands of the jquant CLI, ``jquant quantize --recipe R.yaml --out DIR`` and
``jquant eval DIR --max-windows E``, so a row can be rerun by hand. The GPTQ rows calibrate on
text the float model wrote itself (``selfgen.txt``, made here once: 64 sequences of 600
sampled tokens from random first tokens, decoded), which belongs to no evaluation domain;
evaluation is on ``fortunes`` (another domain, disjoint from the calibration text by
construction). Results go to ``benchmarks/results/gptq_quality.json``. A finished row (its
``eval_fortunes.json`` exists under ``--out``) is not run again, so the script resumes; the
table and the JSON hold every finished row under ``--out``, whatever ``--only`` ran.

    python benchmarks/gptq_quality.py [--out DIR] [--only w4_ao_static,rtn_w4] [--windows 32]
    python benchmarks/gptq_quality.py --model gemma3-270m --only rtn_w4,w4,w4_ao   # the second real model

One row costs about 3 min of calibration and 2.5 min of evaluation on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

LINEARS = "(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"

# name -> (setting, method label, spec); a spec with "method": "gptq" is calibrated.
def _gptq(bits, group, range_=None, **opts):
    """Asymmetric groups of ``group``; ``group=None``: symmetric, one scale per output channel."""
    spec = {"method": "gptq", "format": "int", "bits": bits, **_grid(group), "options": {"damp": 0.1, **opts}}
    if range_:
        spec["range"] = range_
    return spec


def _grid(group):
    if group is None:
        return {"granularity": "channel", "symmetric": True}
    return {"group_size": group, "symmetric": False}


def _rtn(bits, group, range_=None):
    spec = {"format": "int", "bits": bits, **_grid(group)}
    if range_:
        spec["range"] = range_
    return spec


VARIANTS = {
    "rtn_w4": ("W4 g64", "RTN", _rtn(4, 64)),
    "rtn_w4_mse": ("W4 g64", "RTN, MSE clipping", _rtn(4, 64, "mse")),
    "w4": ("W4 g64", "GPTQ", _gptq(4, 64)),
    "w4_ao": ("W4 g64", "GPTQ + act-order", _gptq(4, 64, act_order=True)),
    "w4_ao_static": ("W4 g64", "GPTQ + act-order, static groups", _gptq(4, 64, act_order=True, static_groups=True)),
    "rtn_w3_mse": ("W3 g64", "RTN, MSE clipping", _rtn(3, 64, "mse")),
    "w3": ("W3 g64", "GPTQ", _gptq(3, 64)),
    "w3_ao": ("W3 g64", "GPTQ + act-order", _gptq(3, 64, act_order=True)),
    "w3_ao_mse": ("W3 g64", "GPTQ + act-order, MSE clipping", _gptq(3, 64, "mse", act_order=True)),
    "rtn_w2": ("W2 g32", "RTN", _rtn(2, 32)),
    "rtn_w2_mse": ("W2 g32", "RTN, MSE clipping", _rtn(2, 32, "mse")),
    "w2": ("W2 g32", "GPTQ", _gptq(2, 32)),
    "w2_ao": ("W2 g32", "GPTQ + act-order", _gptq(2, 32, act_order=True)),
    "w2_ao_mse": ("W2 g32", "GPTQ + act-order, MSE clipping", _gptq(2, 32, "mse", act_order=True)),
    # Rotations (QuaRot, arXiv:2404.00456) and W4A4KV4: the recipe's rotation / activations /
    # kv_cache sections (the 4th element) as in configs/quarot_w4a4kv4.yaml.
    "w4_ao_static_had": ("W4 g64", "GPTQ + act-order, static groups, Hadamard rotation",
                         _gptq(4, 64, act_order=True, static_groups=True), {"rotation": {"kind": "hadamard"}}),
    "rtn_w4a4kv4": ("W4A4KV4", "RTN per channel, no rotation", _rtn(4, None), "A4KV4"),
    "rtn_w4a4kv4_had": ("W4A4KV4", "RTN per channel, Hadamard rotation", _rtn(4, None), "A4KV4+had"),
    "w4a4kv4": ("W4A4KV4", "GPTQ per channel + act-order, no rotation", _gptq(4, None, act_order=True), "A4KV4"),
    "w4a4kv4_had": ("W4A4KV4", "GPTQ per channel + act-order, Hadamard rotation (quarot_w4a4kv4)",
                    _gptq(4, None, act_order=True), "A4KV4+had"),
}
_A4KV4 = {"activations": [{"pattern": LINEARS, "spec": {"bits": 4, "symmetric": True, "clip_ratio": 0.9}}],
          "kv_cache": {"bits": 4, "symmetric": False, "clip_ratio": 0.95}}
_EXTRA = {"A4KV4": _A4KV4, "A4KV4+had": {**_A4KV4, "rotation": {"kind": "hadamard"}},
          "A4KV4+learned": {**_A4KV4, "rotation": {"kind": "learned", "steps": 30, "batch_size": 4}}}
# Quantization-aware training (jquant.qat): LSQ scales and zeros plus the weights, distilled from
# the float model (KL) on the calibration windows (selfgen text, 256-token windows).
_QAT = {"steps": 120, "learning_rate": 5e-5, "scale_learning_rate": 1e-4, "warmup_steps": 10, "batch_size": 4,
        "objective": "kl", "checkpoint_every": 10}
VARIANTS["qat_w2"] = ("W2 g32", "QAT from RTN (MSE clipping), 120 steps of 4x128", _rtn(2, 32, "mse"),
                      {"qat": _QAT, "calibration": {"windows": 64, "seq_len": 128}})
VARIANTS["qat_w2_300"] = ("W2 g32", "QAT from RTN (MSE clipping), 300 steps of 4x128", _rtn(2, 32, "mse"),
                          {"qat": {**_QAT, "steps": 300, "checkpoint_every": 25},
                           "calibration": {"windows": 64, "seq_len": 128}})
VARIANTS["qat_w3"] = ("W3 g64", "QAT from RTN (MSE clipping), 120 steps of 4x128", _rtn(3, 64, "mse"),
                      {"qat": _QAT, "calibration": {"windows": 64, "seq_len": 128}})
VARIANTS["qat_gptq_w2"] = ("W2 g32", "QAT from GPTQ + act-order, static groups (MSE clipping), 100 steps of 4x128",
                           _gptq(2, 32, "mse", act_order=True, static_groups=True),
                           {"qat": {**_QAT, "steps": 100, "checkpoint_every": 25},
                            "calibration": {"windows": 64, "seq_len": 128}})
VARIANTS["qat_gptq_w2_slr"] = ("W2 g32", "QAT from GPTQ (as above), scales at lr 2e-5, 100 steps of 4x128",
                               _gptq(2, 32, "mse", act_order=True, static_groups=True),
                               {"qat": {**_QAT, "steps": 100, "scale_learning_rate": 2e-5, "checkpoint_every": 25},
                                "calibration": {"windows": 64, "seq_len": 128}})
VARIANTS["w4a4kv4_learned"] = ("W4A4KV4", "GPTQ per channel + act-order, learned rotation (SpinQuant, 30 steps)",
                               _gptq(4, None, act_order=True), "A4KV4+learned")


def write_selfgen_text(path: str, n_batches: int = 4, batch: int = 16, new_tokens: int = 600,
                       model_name: str | None = None) -> None:
    """The calibration text: sequences the float model samples (temperature 1) from random first
    tokens past the special ones (after <bos> where the tokenizer puts one), decoded.
    Deterministic: the same file on every run."""
    import jax
    import numpy as np

    from jquant import data
    from jquant.models import generate, load

    model, cfg, tok = load(model_name)
    bos = data.bos_token(tok)
    rng = np.random.default_rng(0)
    texts = []
    for b in range(n_batches):
        prompt = rng.integers(100, cfg.vocab_size, size=(batch, 1)).astype(np.int32)
        if bos is not None:
            prompt = np.concatenate([np.full((batch, 1), bos, np.int32), prompt], axis=1)
        out = np.asarray(generate(model, prompt, new_tokens, key=jax.random.key(b), temperature=1.0))
        texts.extend(tok.decode(row.tolist(), skip_special_tokens=True) for row in out)
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write("\n\n".join(texts))
    os.replace(tmp, path)


def _recipe_yaml(name: str, spec: dict, text: str, windows: int, extra=None) -> str:
    extra = dict((_EXTRA[extra] if isinstance(extra, str) else extra) or {})
    cal = extra.pop("calibration", {})
    out = {"name": name, "description": "benchmarks/gptq_quality.py row",
           "rules": [{"pattern": LINEARS, "spec": spec}], **extra}
    if spec.get("method") == "gptq" or "qat" in out or cal:
        out["calibration"] = {"text": text, "windows": windows, "seq_len": 512, "seed": 0, "batch_size": 8, **cal}
    return json.dumps(out)  # YAML is a superset of JSON


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="what `jquant quantize --model` takes (default: SmolLM2-135M)")
    ap.add_argument("--out", default=None, help="one folder per row, and selfgen.txt (default: "
                                                "out/gptq_quality[_MODEL])")
    ap.add_argument("--only", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--windows", type=int, default=32, help="calibration windows of 512 tokens")
    ap.add_argument("--eval-windows", type=int, default=32)
    ap.add_argument("--json", default=None, help="default: benchmarks/results/gptq_quality[_MODEL].json")
    args = ap.parse_args()
    suffix = "" if args.model is None else "_" + os.path.basename(args.model).split(".")[0].replace("-", "_")
    args.out = args.out or f"out/gptq_quality{suffix}"
    args.json = args.json or os.path.join(os.path.dirname(__file__), "results", f"gptq_quality{suffix}.json")
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    unknown = set(names) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown rows {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    os.makedirs(args.out, exist_ok=True)
    text = os.path.abspath(os.path.join(args.out, "selfgen.txt"))
    def calibrated(n):
        extra = VARIANTS[n][3] if len(VARIANTS[n]) > 3 else None
        return VARIANTS[n][2].get("method") == "gptq" or (isinstance(extra, dict) and "qat" in extra)

    if not os.path.isfile(text) and any(calibrated(n) for n in names):
        print(f"writing the calibration text {text}", flush=True)
        write_selfgen_text(text, model_name=args.model)
    jq = [sys.executable, "-m", "jquant.cli"]
    for name in names:
        setting, label, spec, *extra = VARIANTS[name]
        d = os.path.abspath(os.path.join(args.out, name))
        res = os.path.join(d, "eval_fortunes.json")
        if not os.path.isfile(res):
            os.makedirs(d, exist_ok=True)
            recipe = os.path.join(args.out, f"{name}.yaml")
            with open(recipe, "w") as fh:
                fh.write(_recipe_yaml(name, spec, text, args.windows, *extra))
            print(f"{name}: quantize", flush=True)
            model = [] if args.model is None else ["--model", args.model]
            subprocess.run(jq + ["quantize", *model, "--recipe", recipe, "--out", d, "--overwrite", "--quiet"],
                           check=True)
            print(f"{name}: eval", flush=True)
            subprocess.run(jq + ["eval", d, "--max-windows", str(args.eval_windows), "--quiet"], check=True)
    # The table: every row finished under --out, whether run now or before (--only picks what runs).
    rows = []
    for name, (setting, label, spec, *_) in VARIANTS.items():
        d = os.path.abspath(os.path.join(args.out, name))
        res = os.path.join(d, "eval_fortunes.json")
        if not os.path.isfile(res):
            continue
        with open(res) as fh:
            r = json.load(fh)
        with open(os.path.join(d, "jquant.json")) as fh:
            m = json.load(fh)
        rows.append({"row": name, "setting": setting, "method": label, "ppl": r["quant_ppl"], "kl": r["kl"],
                     "top1": r["top1"], "float_ppl": r["float_ppl"], "eval_tokens": r["tokens"],
                     "bits_per_weight_linears": m["bits_per_weight_quantized"],
                     "spec": spec})
    print(f"\nfortunes, {rows[0]['eval_tokens'] if rows else 0} predicted tokens; float ppl "
          f"{rows[0]['float_ppl']:.3f}" if rows else "")
    print(f"{'setting':<8} {'method':<46} {'ppl':>8} {'KL':>7} {'top-1':>6} {'bits/w':>7} {'gap rec.':>8}")
    for r in rows:
        base = min((x["ppl"] for x in rows if x["setting"] == r["setting"] and x["method"].startswith("RTN")),
                   default=None)
        rec = (base - r["ppl"]) / (base - r["float_ppl"]) if base and not r["method"].startswith("RTN") else None
        r["gap_recovered_vs_best_rtn"] = rec
        print(f"{r['setting']:<8} {r['method']:<46} {r['ppl']:>8.3f} {r['kl']:>7.4f} {100 * r['top1']:>5.1f}% "
              f"{r['bits_per_weight_linears']:>7.3f} {'' if rec is None else f'{100 * rec:.0f}%':>8}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"model": args.model or "smollm2-135m", "calibration_windows": args.windows,
                   "eval_windows": args.eval_windows, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
