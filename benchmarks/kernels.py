"""Packed low-bit matmul speed: the kernels against the float matmul, with the device's ceilings.

For every M in the list and (N, K) in the Llama-70B-like shapes, the weight is W4, groups of
128, asymmetric integer zero (the GPTQ/AWQ layout), and the table gives:

- ``packed``: on a GPU the Pallas kernel (``wq_matmul``); elsewhere the chunked XLA path
  (``xla_matmul``), which is what the models use there;
- ``float``: the unquantized matmul of the same shape (bf16 ``jnp.dot`` on GPU; f32 on CPU,
  where bf16 dots are emulated);
- ``deq+dot``: XLA dequantizing the whole weight and then multiplying;
- achieved bandwidth (packed weights + scales + activations + output bytes / time) and
  FLOP/s (2·M·N·K / time), against the ceilings measured in the same run (streaming read
  bandwidth of a large array; the rate of a large float matmul).

The speed-up column is ``float / packed`` (higher is better). Timings on shared machines are
noisy: compare within one run.

Usage: python benchmarks/kernels.py [--m 1,4,16,64] [--shapes 8192x8192,...] [--reps 10] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

import jquant as jq
from jquant._timing import device_time
from pallas_kernels import wq_matmul, xla_matmul

SHAPES = [(8192, 8192), (28672, 8192), (8192, 28672)]  # (N, K)


def _time(f, *args, reps):
    return device_time(lambda: f(*args), reps)


def ceilings(gpu: bool, reps: int) -> dict:
    """Streaming-read bandwidth (bytes/s) and matmul rate (FLOP/s) of this device, measured now."""
    n = (1 << 28) if gpu else (1 << 27)  # 1 GiB / 512 MiB of float32
    a = jnp.ones((n,), jnp.float32)
    bw = 4 * n / _time(jax.jit(jnp.sum), a, reps=reps)
    del a
    d = 8192 if gpu else 2048
    dt = jnp.bfloat16 if gpu else jnp.float32
    x = jnp.ones((d, d), dt)
    mm = 2 * d**3 / _time(jax.jit(lambda x: x @ x), x, reps=max(3, reps // 2))
    return {"read_bandwidth_GBs": bw / 1e9, "matmul_TFLOPs": mm / 1e12}


def weight(N: int, K: int, key: int = 0):
    """A W4 g128 asymmetric QTensor of a random (K, N) weight, built without a float copy of it
    beyond one transient array."""
    w = jax.random.normal(jax.random.key(key), (K, N), jnp.float32) * 0.02
    qt = jq.quantize(w, jq.QuantSpec(bits=4, granularity="group", group_size=128, symmetric=False))
    return w, qt


def run(ms, shapes, reps: int) -> dict:
    gpu = jax.default_backend() == "gpu"
    fdt = jnp.bfloat16 if gpu else jnp.float32
    ceil = ceilings(gpu, reps)
    rows = []
    packed = jax.jit(wq_matmul) if gpu else jax.jit(xla_matmul)
    deq = jax.jit(lambda x, qt: x @ qt.dequantize(x.dtype))
    dense = jax.jit(lambda x, w: x @ w)
    for N, K in shapes:
        w, qt = weight(N, K)
        wf = w.astype(fdt)
        del w
        qbytes = qt.nbytes
        for M in ms:
            x = jax.random.normal(jax.random.key(M), (M, K), fdt)
            y_ref = np.asarray(deq(x, qt), np.float32)
            y = np.asarray(packed(x, qt), np.float32)
            err = float(np.abs(y - y_ref).max() / (np.abs(y_ref).max() + 1e-30))
            t_p = _time(packed, x, qt, reps=reps)
            t_f = _time(dense, x, wf, reps=reps)
            t_d = _time(deq, x, qt, reps=reps)
            io = qbytes + (M * K + M * N) * jnp.dtype(fdt).itemsize
            rows.append({
                "M": M, "N": N, "K": K, "packed_ms": t_p * 1e3, "float_ms": t_f * 1e3, "deq_dot_ms": t_d * 1e3,
                "speedup_vs_float": t_f / t_p, "speedup_vs_deq": t_d / t_p,
                "packed_GBs": io / t_p / 1e9, "bw_fraction": io / t_p / 1e9 / ceil["read_bandwidth_GBs"],
                "packed_TFLOPs": 2 * M * N * K / t_p / 1e12, "max_rel_err_vs_deq": err,
            })
            r = rows[-1]
            print(f"{M:5d} {N:6d} {K:6d} {r['packed_ms']:9.3f} {r['float_ms']:9.3f} {r['deq_dot_ms']:9.3f} "
                  f"{r['speedup_vs_float']:7.2f}x {r['speedup_vs_deq']:7.2f}x {r['packed_GBs']:8.1f} "
                  f"{100 * r['bw_fraction']:5.1f}% {r['packed_TFLOPs']:7.3f}", flush=True)
        del wf, qt
    return {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
            "packed_path": "pallas wq_matmul" if gpu else "xla_matmul (chunked dequantize-and-dot)",
            "float_dtype": jnp.dtype(fdt).name, "weight": "W4 g128 asymmetric int zero",
            "ceilings": ceil, "rows": rows, "host": platform.node()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    gpu = jax.default_backend() == "gpu"
    ap.add_argument("--m", default="1,4,16,64,256,1024" if gpu else "1,4,16,64")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="NxK,...")
    ap.add_argument("--reps", type=int, default=20 if gpu else 5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    ms = [int(m) for m in a.m.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()})")
    print(f"{'M':>5} {'N':>6} {'K':>6} {'packed ms':>9} {'float ms':>9} {'deq ms':>9} {'vs float':>8} "
          f"{'vs deq':>8} {'GB/s':>8} {'%bw':>6} {'TFLOP/s':>7}")
    res = run(ms, shapes, a.reps)
    c = res["ceilings"]
    print(f"ceilings: read {c['read_bandwidth_GBs']:.1f} GB/s, matmul {c['matmul_TFLOPs']:.3f} TFLOP/s")
    out = a.json or os.path.join(os.path.dirname(__file__), "results",
                                 f"kernels_{res['platform']}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
