"""Interop: sizes on disk of every export of SmolLM2, and the import time of a 7B-shaped GPTQ
checkpoint against the time to merely read its bytes.

1. SmolLM2-135M quantized with ``rtn_w4_g64`` (and ``q4_k`` for GGUF), exported as GPTQ,
   AWQ, compressed-tensors (float tensors F16, as those tools write them) and GGUF; the table
   gives the directory/file size, the export time and the time ``jquant.models.load`` takes
   to read it back.
2. A synthetic Llama-2-7B-shaped GPTQ checkpoint (32 layers, hidden 4096, MLP 11008, vocab
   32000; 4-bit, group 128, symmetric, float16 embedding and head; random codes), written once
   to ``--cache`` in 4 shards. ``import``: ``jquant.models.load`` of it into QTensors; the
   floor: reading every tensor of the shards with ``safetensors`` (``safe_open`` +
   ``get_tensor``), the I/O and copy any loader pays. Both run cold after a warm-up read, so
   the page cache holds the files in both (a 4 GB checkpoint on a 24 GB machine).

Usage: python benchmarks/interop.py [--json benchmarks/results/interop.json] [--cache DIR] [--skip-7b]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


def smollm2_exports(work: str) -> list[dict]:
    from jquant import cli

    rows = []
    for recipe in ("rtn_w4_g64", "q4_k"):
        assert cli.main(["quantize", "--recipe", recipe, "--out", os.path.join(work, recipe), "--quiet"]) == 0
    rows.append({"format": "jquant (Orbax)", "recipe": "rtn_w4_g64",
                 "bytes": _size(os.path.join(work, "rtn_w4_g64", "params")), "export_s": None, "load_s": None})
    for fmt, recipe, ft in (("gptq", "rtn_w4_g64", "F16"), ("awq", "rtn_w4_g64", "F16"),
                            ("compressed-tensors", "rtn_w4_g64", "F16"), ("gptq", "rtn_w4_g64", "F32"),
                            ("gguf", "q4_k", "F32")):
        dst = os.path.join(work, f"{fmt}_{ft}" + (".gguf" if fmt == "gguf" else ""))
        t = time.perf_counter()
        assert cli.main(["export", os.path.join(work, recipe), "--format", fmt, "--out", dst, "--float-type", ft]) == 0
        t_export = time.perf_counter() - t
        from jquant import models

        t = time.perf_counter()
        models.load(dst)
        rows.append({"format": fmt, "recipe": recipe, "float_type": ft, "bytes": _size(dst), "export_s": t_export,
                     "load_s": time.perf_counter() - t})
    return rows


LLAMA7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
               rope_theta=10000.0, tie_word_embeddings=False, model_type="llama", architectures=["LlamaForCausalLM"],
               torch_dtype="float16", bos_token_id=1, eos_token_id=2)
QC = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False,
      "checkpoint_format": "gptq", "pack_dtype": "int32"}


def write_7b_gptq(path: str) -> None:
    """A Llama-2-7B-shaped 4-bit GPTQ checkpoint with random codes and plausible scales, 4 shards."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    h, m, L, V = 4096, 11008, 32, 32000
    tmp = path + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shapes = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, h), "self_attn.v_proj": (h, h),
              "self_attn.o_proj": (h, h), "mlp.gate_proj": (h, m), "mlp.up_proj": (h, m), "mlp.down_proj": (m, h)}
    weight_map = {}
    shards = [list(range(i * 8, (i + 1) * 8)) for i in range(4)]
    for s, layers in enumerate(shards):
        t = {}
        if s == 0:
            t["model.embed_tokens.weight"] = (rng.standard_normal((V, h), np.float32) * 0.02).astype(np.float16)
        if s == 3:
            t["lm_head.weight"] = (rng.standard_normal((V, h), np.float32) * 0.02).astype(np.float16)
            t["model.norm.weight"] = np.ones(h, np.float16)
        for i in layers:
            p = f"model.layers.{i}"
            t[f"{p}.input_layernorm.weight"] = np.ones(h, np.float16)
            t[f"{p}.post_attention_layernorm.weight"] = np.ones(h, np.float16)
            for name, (K, N) in shapes.items():
                G = K // 128
                t[f"{p}.{name}.qweight"] = rng.integers(0, 2**32, (K // 8, N), dtype=np.uint32).view(np.int32)
                t[f"{p}.{name}.qzeros"] = np.full((G, N // 8), 0x77777777, np.int32)  # v1: 8 - 1 in every nibble
                t[f"{p}.{name}.scales"] = (rng.uniform(0.5, 1.5, (G, N)) * 2e-3).astype(np.float16)
                t[f"{p}.{name}.g_idx"] = (np.arange(K) // 128).astype(np.int32)
        fname = f"model-{s + 1:05d}-of-00004.safetensors"
        save_file(t, os.path.join(tmp, fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in t})
    with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {}, "weight_map": weight_map}, fh)
    with open(os.path.join(tmp, "config.json"), "w") as fh:
        json.dump({**LLAMA7B, "quantization_config": QC}, fh)
    os.replace(tmp, path)


def read_floor(path: str) -> float:
    from safetensors import safe_open

    t = time.perf_counter()
    n = 0
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(path, f), framework="numpy") as h:
                for k in h.keys():
                    n += h.get_tensor(k).nbytes
    return time.perf_counter() - t


def import_7b(path: str) -> dict:
    import jax

    from jquant import models, summary
    from flax import nnx

    read_floor(path)  # warm the page cache
    floor = min(read_floor(path) for _ in range(2))
    times = []
    for _ in range(2):
        t = time.perf_counter()
        model, config, _ = models.load(path, dtype=np.float16)
        jax.block_until_ready(jax.tree_util.tree_leaves(nnx.state(model)))
        times.append(time.perf_counter() - t)
        s = summary(nnx.state(model))
        del model
    return {"checkpoint_bytes": _size(path), "import_s": min(times), "read_floor_s": floor,
            "ratio": min(times) / floor, "quantized_leaves": len(s.quantized), "params": s.numel,
            "bits_per_weight_quantized": s.quantized_bits_per_weight}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "interop.json"))
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "jquant_bench_7b_gptq"))
    ap.add_argument("--skip-7b", action="store_true")
    args = ap.parse_args()
    out = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}}
    with tempfile.TemporaryDirectory() as work:
        out["smollm2"] = smollm2_exports(work)
    print(f"\n{'format':<20} {'recipe':<11} {'float':>5} {'MiB':>8} {'export s':>9} {'load s':>7}")
    for r in out["smollm2"]:
        print(f"{r['format']:<20} {r['recipe']:<11} {r.get('float_type', ''):>5} {r['bytes'] / 2**20:>8.1f} "
              f"{'' if r['export_s'] is None else format(r['export_s'], '.1f'):>9} "
              f"{'' if r['load_s'] is None else format(r['load_s'], '.1f'):>7}")
    if not args.skip_7b:
        if not os.path.isdir(args.cache):
            t = time.perf_counter()
            write_7b_gptq(args.cache)
            print(f"wrote the synthetic 7B GPTQ checkpoint to {args.cache} in {time.perf_counter() - t:.0f}s")
        r = out["gptq_7b"] = import_7b(args.cache)
        print(f"\n7B-shaped GPTQ (4-bit g128, {r['checkpoint_bytes'] / 2**30:.2f} GiB, {r['quantized_leaves']} "
              f"quantized linears): import {r['import_s']:.1f}s, safetensors read floor {r['read_floor_s']:.1f}s, "
              f"ratio {r['ratio']:.2f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
