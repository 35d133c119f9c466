"""Flax forward speed against transformers (torch, CPU), and perplexity of RTN recipes.

Part 1, speed: tokens/s of the jitted Flax forward (float32) of the default model
(SmolLM2-135M-Instruct) at batch 1 and 8 with 512 tokens, against transformers' own
model loaded from the same GGUF, in the same run on the same machine; the ratio is
the figure to compare (timings on shared machines are noisy). Compile time is reported
apart.

Part 2, quality: perplexity of the float model and of RTN W8, W4 and W3 (group 64,
asymmetric integer zero) on the held-out tail of the default calibration
corpus (pydoc) and on out-of-domain text (fortunes).

Usage: python benchmarks/forward.py [--reps 3] [--windows 16] [--skip-quality] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jquant as jq
from jquant._timing import median_time
from jquant import data, evaluate
from jquant.models import default_model_path, forward, load_gguf

SCHEMES = {
    "rtn W8 g64": jq.QuantSpec(bits=8, group_size=64, symmetric=False),
    "rtn W4 g64": jq.QuantSpec(bits=4, group_size=64, symmetric=False),
    "rtn W3 g64": jq.QuantSpec(bits=3, group_size=64, symmetric=False),
}
LINEARS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"


def speed(graphdef, state, path, reps):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count())
    tm = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              torch_dtype=torch.float32)
    tm.eval()
    rows = []
    rng = np.random.default_rng(0)
    for batch in (1, 8):
        toks = rng.integers(0, 49152, size=(batch, 512), dtype=np.int32)
        x = jnp.asarray(toks)
        t0 = time.perf_counter()
        jax.block_until_ready(forward(graphdef, state, x)[0])
        first = time.perf_counter() - t0
        t_jax = median_time(lambda: jax.block_until_ready(forward(graphdef, state, x)[0]), reps)
        xt = torch.from_numpy(toks.astype(np.int64))
        with torch.inference_mode():
            tm(xt)
            t_torch = median_time(lambda: tm(xt).logits, reps)
            ref = tm(xt).logits.numpy()
        diff = float(np.abs(np.asarray(forward(graphdef, state, x)[0]) - ref).max())
        n = batch * 512
        rows.append({"batch": batch, "tokens": n, "flax_s": t_jax, "flax_compile_s": max(first - t_jax, 0.0),
                     "torch_s": t_torch, "flax_tok_s": n / t_jax, "torch_tok_s": n / t_torch,
                     "flax_over_torch_speed": t_torch / t_jax, "max_abs_logit_diff": diff})
    return rows


def quality(graphdef, state, tok, vocab, windows):
    texts = {"pydoc (held-out tail)": data.split_text(data.load_text("pydoc"))[1]}
    try:
        texts["fortunes"] = data.load_text("fortunes")
    except jq.errors.DataError as e:
        print(f"note: {e}")
    streams = {k: data.tokenize(tok, v, vocab) for k, v in texts.items()}
    variants = {"float32": state}
    for name, spec in SCHEMES.items():
        variants[name] = jq.quantize_tree(state, [(LINEARS, spec)])
    rows = []
    for name, st in variants.items():
        fn = lambda t, st=st: forward(graphdef, st, t)[0]  # noqa: E731
        row = {"model": name, "bits_per_weight_linears": jq.summary(st).quantized_bits_per_weight
               if name != "float32" else 32.0}
        for tname, toks in streams.items():
            r = evaluate.perplexity(fn, toks, seq_len=512, batch_size=4, max_windows=windows)
            row[tname] = r.ppl
            row["tokens"] = r.tokens
        rows.append(row)
        print(f"  {name}: " + ", ".join(f"{k} {row[k]:.3f}" for k in streams))
    return rows, list(streams)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "forward.json"))
    args = ap.parse_args()
    path = str(default_model_path())
    model, config, tok = load_gguf(path)
    graphdef, state = nnx.split(model)
    out = {}
    if os.path.isfile(args.json):  # a partial rerun (--skip-speed/--skip-quality) keeps the other part
        with open(args.json) as fh:
            out = json.load(fh)
    out.update({"benchmark": "forward", "model": os.path.basename(path), "cpus": os.cpu_count(),
                "machine": platform.processor() or platform.machine(), "jax": jax.__version__})
    if not args.skip_speed:
        rows = speed(graphdef, state, path, args.reps)
        out["speed"] = rows
        print(f"{'batch':>5} {'tokens':>6} {'flax s':>8} {'compile s':>9} {'torch s':>8} {'flax tok/s':>10} "
              f"{'torch tok/s':>11} {'flax/torch':>10} {'max|dlogit|':>11}")
        for r in rows:
            print(f"{r['batch']:>5} {r['tokens']:>6} {r['flax_s']:>8.3f} {r['flax_compile_s']:>9.2f} {r['torch_s']:>8.3f} "
                  f"{r['flax_tok_s']:>10.0f} {r['torch_tok_s']:>11.0f} {r['flax_over_torch_speed']:>10.2f} "
                  f"{r['max_abs_logit_diff']:>11.2e}")
    if not args.skip_quality:
        rows, names = quality(graphdef, state, tok, config.vocab_size, args.windows)
        out["quality"] = rows
        print(f"{'model':<16} {'bits/w':>7} " + " ".join(f"{n:>22}" for n in names))
        for r in rows:
            print(f"{r['model']:<16} {r['bits_per_weight_linears']:>7.3f} " + " ".join(f"{r[n]:>22.3f}" for n in names))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
