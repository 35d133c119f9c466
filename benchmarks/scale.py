"""Scale: GPTQ on 70B-shaped blocks streamed from disk, peak memory against the one-block
working set, and the statistics and solve steps over 1, 2, 4, 8 devices.

1. ``stream``: a synthetic Llama checkpoint (hidden 8192, MLP 28672, 64 heads, 8 KV heads:
   Llama-2/3-70B's block; vocabulary 32000; ``--layers`` blocks, random weights) is written
   as safetensors, one shard per block. A child process opens it with
   :func:`jquant.models.hf.stream_hf` and runs :func:`jquant.calibrate.quantize_model`
   (GPTQ W4 g128, act-order, every block linear) with ``read_block`` / ``on_block``: each
   block is read when it starts, and saved to disk and dropped when it ends. Its peak RSS
   (``ru_maxrss``, which starts from the parent's peak at the fork: the parent writing the
   checkpoint peaks lower than the child) is compared with :func:`working_set`, the arithmetic of what one block's
   work must hold. ``--scale k`` divides hidden, MLP and heads by ``k`` (a quick run).
2. ``devices``: for each count ``d`` of fake CPU devices
   (``--xla_force_host_platform_device_count``), a child times the Hessian of ``n`` rows of
   the MLP's width split over ``data`` (psum) and GPTQ's solve of a down_proj-shaped kernel
   with its columns split over the devices. On this 2-core machine the fake devices share
   the same cores, so this shows the overhead of splitting, not a speed-up; on real devices
   each gets ``1/d`` of the rows and columns.

Usage: python benchmarks/scale.py [--scale 1] [--layers 2] [--windows 4] [--seq-len 512]
       [--devices 1,2,4,8] [--device-scale 4] [--only stream|devices] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(hidden=8192, intermediate=28672, heads=64, kv_heads=8, vocab=32000)


def shapes(scale: int) -> dict:
    s = dict(SHAPE)
    for k in ("hidden", "intermediate", "heads"):
        s[k] //= scale
    s["kv_heads"] = max(1, SHAPE["kv_heads"] // scale)
    return s


def working_set(s: dict, n_tokens: int, dtype_bytes: int = 2, bits: int = 4, group: int = 128,
                runtime: int = 0) -> dict:
    """Bytes one block's GPTQ work must hold, by part (the arithmetic of docs/scaling.md).

    Resident all along: the embedding and head (``dtype``), the calibration set's hidden
    states (``n_tokens × hidden``, ``dtype``), the block's float weights. At the peak (the
    down_proj solve): the MLP intermediate carried to it (``n_tokens × intermediate``,
    float32), its Hessian (``inter²`` float32), GPTQ's Cholesky factor and the reordered
    matrix it is factorised from (``2·inter²`` float32), the kernel and its update
    accumulator (``2·inter·hidden`` float32), and the quantized block so far. ``runtime``:
    the process's resident size before any data (Python, JAX, XLA; measured).
    """
    h, i = s["hidden"], s["intermediate"]
    hd = h // s["heads"]
    kv = s["kv_heads"] * hd
    block_params = 2 * h * h + 2 * h * kv + 3 * h * i
    parts = {
        "runtime": runtime,
        "embedding_and_head": 2 * s["vocab"] * h * dtype_bytes,
        "hidden_states": n_tokens * h * dtype_bytes,
        "block_float": block_params * dtype_bytes,
        "block_quantized": block_params * (bits / 8 + 2 * 2 / group),  # codes + f16 scales + zeros
        "mlp_activation_f32": n_tokens * i * 4,
        "hessian_f32": i * i * 4,
        "cholesky_f32": 2 * i * i * 4,
        "kernel_and_update_f32": 2 * i * h * 4,
    }
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------- stream
def write_checkpoint(d: str, s: dict, layers: int, seed: int = 0) -> int:
    """A Llama checkpoint of random bf16 weights (std 0.02), one safetensors shard per block."""
    import ml_dtypes
    import numpy as np
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    h, i = s["hidden"], s["intermediate"]
    hd = h // s["heads"]
    kv = s["kv_heads"] * hd

    def w(*shape):
        return (rng.standard_normal(shape, np.float32) * 0.02).astype(ml_dtypes.bfloat16)

    os.makedirs(d, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": h, "intermediate_size": i,
           "num_hidden_layers": layers, "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"],
           "vocab_size": s["vocab"], "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
           "tie_word_embeddings": False, "torch_dtype": "bfloat16", "hidden_act": "silu"}
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    index, total = {}, 0
    top = {"model.embed_tokens.weight": w(s["vocab"], h), "lm_head.weight": w(s["vocab"], h),
           "model.norm.weight": np.ones(h, ml_dtypes.bfloat16)}
    shards = [("model-top.safetensors", top)]
    for L in range(layers):
        p = f"model.layers.{L}."
        shards.append((f"model-{L:05d}.safetensors", None))
    for name, t in shards:
        if t is None:  # made when written: one block in memory at a time
            L = int(name[6:11])
            p = f"model.layers.{L}."
            t = {p + "self_attn.q_proj.weight": w(h, h), p + "self_attn.k_proj.weight": w(kv, h),
                 p + "self_attn.v_proj.weight": w(kv, h), p + "self_attn.o_proj.weight": w(h, h),
                 p + "mlp.gate_proj.weight": w(i, h), p + "mlp.up_proj.weight": w(i, h),
                 p + "mlp.down_proj.weight": w(h, i), p + "input_layernorm.weight": np.ones(h, ml_dtypes.bfloat16),
                 p + "post_attention_layernorm.weight": np.ones(h, ml_dtypes.bfloat16)}
        save_file(t, os.path.join(d, name))
        for k, v in t.items():
            index[k] = name
            total += v.nbytes
        del t
    json.dump({"metadata": {"total_size": total}, "weight_map": index},
              open(os.path.join(d, "model.safetensors.index.json"), "w"))
    return total


def _rss_now() -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmRSS:"))


def child_stream(args) -> None:
    """Run in a fresh process: stream-quantize the checkpoint, print a JSON line."""
    import resource

    import jax
    import jax.numpy as jnp
    import numpy as np

    import jquant as jq
    from jquant import calibrate
    from jquant.models.hf import stream_hf

    jax.block_until_ready(jax.jit(lambda x: x + 1)(jnp.ones(4)))
    runtime = _rss_now()  # Python, JAX, XLA: before any data (not ru_maxrss: it keeps the parent's peak)
    t0 = time.perf_counter()
    model, cfg, read_block = stream_hf(args.ckpt, dtype=jnp.bfloat16)
    t_open = time.perf_counter() - t0
    spec = jq.QuantSpec(bits=4, group_size=128, symmetric=False, method="gptq", options={"act_order": True})
    toks = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(args.windows, args.seq_len)).astype(np.int32)
    block_times, last = [], [time.perf_counter()]
    out = os.path.join(args.work, "blocks_out")

    def on_block(i, st):
        jq.save(os.path.join(out, f"{i:03d}"), st, overwrite=True)
        now = time.perf_counter()
        block_times.append(now - last[0])
        last[0] = now
        print(f"block {i}: {block_times[-1]:.1f}s, peak RSS so far "
              f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB", file=sys.stderr, flush=True)

    timings: dict = {}
    last[0] = time.perf_counter()
    calibrate.quantize_model(model, toks, [(r"_proj/kernel$", spec)], batch_size=min(args.windows, 4),
                             progress=False, work_dir=os.path.join(args.work, "work"), timings=timings,
                             read_block=read_block, on_block=on_block)
    print(json.dumps({"open_s": t_open, "block_s": block_times, "phases_s": timings, "runtime_bytes": runtime,
                      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


def run_stream(args, s: dict) -> dict:
    tmp = tempfile.mkdtemp(prefix="jquant_scale_")
    try:
        ckpt = os.path.join(tmp, "ckpt")
        t = time.perf_counter()
        nbytes = write_checkpoint(ckpt, s, args.layers)
        t_write = time.perf_counter() - t
        cmd = [sys.executable, __file__, "--child", "stream", "--ckpt", ckpt, "--work", tmp,
               "--windows", str(args.windows), "--seq-len", str(args.seq_len)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
        if r.returncode:
            raise SystemExit(r.stderr[-4000:])
        res = json.loads(r.stdout.strip().splitlines()[-1])
        ws = working_set(s, args.windows * args.seq_len, runtime=res["runtime_bytes"])
        res.update(checkpoint_bytes=nbytes, write_s=t_write, working_set=ws,
                   rss_over_working_set=res["peak_rss_bytes"] / ws["total"])
        return res
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- devices
def child_devices(args) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import PartitionSpec as P

    import jquant as jq
    from jquant import distributed as dist
    from jquant.quantizers import gptq, stats

    s = shapes(args.device_scale)
    h, i = s["hidden"], s["intermediate"]
    n = jax.device_count()
    mesh = dist.make_mesh(f"data={n}")
    rows = args.windows * args.seq_len
    x = jnp.asarray(np.random.default_rng(0).standard_normal((rows, i), np.float32))
    coll = stats.Collector(("hessian",))
    if n > 1:
        upd = jax.jit(jax.shard_map(lambda st, x: coll.update(st, x, "data"), mesh=mesh,
                                    in_specs=(P(), P("data")), out_specs=P()))
        x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P("data")))
    else:
        upd = jax.jit(coll.update)

    def hess():
        return jax.block_until_ready(upd(coll.init(i), x))

    hess()
    t = time.perf_counter()
    H = hess()["hessian"].H
    t_hess = time.perf_counter() - t
    w = jnp.asarray(np.random.default_rng(1).standard_normal((i, h), np.float32) * 0.02)
    spec = jq.QuantSpec(bits=4, group_size=128, symmetric=False, method="gptq", options={"act_order": True})
    H = jnp.asarray(np.asarray(H))
    gptq.gptq_quantize(w, H, spec, mesh=mesh if n > 1 else None)  # compile
    t = time.perf_counter()
    q, _ = gptq.gptq_quantize(w, H, spec, mesh=mesh if n > 1 else None)
    jax.block_until_ready(q.codes)
    t_solve = time.perf_counter() - t
    print(json.dumps({"devices": n, "rows": rows, "in": i, "out": h, "hessian_s": t_hess, "solve_s": t_solve}))


def run_devices(args) -> list[dict]:
    out = []
    for d in [int(v) for v in args.devices.split(",")]:
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={d}")
        cmd = [sys.executable, __file__, "--child", "devices", "--device-scale", str(args.device_scale),
               "--windows", str(args.windows), "--seq-len", str(args.seq_len)]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        if r.returncode:
            raise SystemExit(r.stderr[-4000:])
        out.append(json.loads(r.stdout.strip().splitlines()[-1]))
        print(f"  {d} device(s): hessian {out[-1]['hessian_s']:.2f}s, solve {out[-1]['solve_s']:.2f}s", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=1, help="divide hidden, MLP and heads by this (1: 70B-shaped)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--devices", default="1,2,4,8")
    ap.add_argument("--device-scale", type=int, default=4, help="shape divisor of the devices sweep")
    ap.add_argument("--only", choices=["stream", "devices"], default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", choices=["stream", "devices"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--ckpt", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child == "stream":
        return child_stream(args)
    if args.child == "devices":
        return child_devices(args)
    s = shapes(args.scale)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
              "shape": s, "layers": args.layers, "tokens": args.windows * args.seq_len,
              "command": "python " + " ".join(sys.argv)}
    if args.only in (None, "stream"):
        r = run_stream(args, s)
        result["stream"] = r
        ws = r["working_set"]
        print(f"{'part':<24}{'GiB':>8}")
        for k, v in ws.items():
            print(f"{k:<24}{v / 2**30:8.2f}")
        print(f"peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB = {r['rss_over_working_set']:.2f}x the working set; "
              f"blocks {', '.join(f'{t:.1f}s' for t in r['block_s'])}; phases "
              + ", ".join(f"{k} {v:.1f}s" for k, v in r["phases_s"].items()))
    if args.only in (None, "devices"):
        result["devices"] = run_devices(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)


if __name__ == "__main__":
    main()
