"""Round-to-nearest quantization speed: jquant (jit) vs a plain NumPy implementation.

For each shape, W4 g128 (symmetric, and asymmetric with an integer zero point) on f32
weights in the Flax layout (in, out):
  - jquant: compile time (first call) apart from the steady-state run time (median of reps);
  - numpy: the same algorithm (grouped absmax / min-max, round, clip, pack 8 codes per uint32);
  - the memory floor: the time to read the weight and write the codes at the copy bandwidth
    measured in the same run (np.copyto of an array of the weight's size).
Throughput is the f32 weight's size divided by the time.

Usage: python benchmarks/rtn.py [--shapes 4096x4096,8192x28672] [--reps 5] [--json out.json]
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

import jquant as jq
from jquant._timing import median_time


def numpy_rtn(w: np.ndarray, bits: int, group: int, symmetric: bool):
    """Plain NumPy W-bit RTN along axis 0 of (K, N), packed 32//bits codes per uint32 word."""
    K, N = w.shape
    g = w.reshape(K // group, group, N)
    if symmetric:
        half = 2 ** (bits - 1)
        s = (np.abs(g).max(axis=1, keepdims=True) / (half - 1)).astype(np.float16).astype(np.float32)
        s_safe = np.where(s == 0, 1, s)
        c = (np.clip(np.round(g / s_safe), -(half - 1), half - 1) + half).astype(np.uint32)
        z = None
    else:
        maxq = 2**bits - 1
        lo = np.minimum(g.min(axis=1, keepdims=True), 0)
        hi = np.maximum(g.max(axis=1, keepdims=True), 0)
        s = ((hi - lo) / maxq).astype(np.float16).astype(np.float32)
        s_safe = np.where(s == 0, 1, s)
        z = np.clip(np.round(-lo / s_safe), 0, maxq)
        c = np.clip(np.round(g / s_safe) + z, 0, maxq).astype(np.uint32)
        z = z.astype(np.uint8)
    c = c.reshape(K // (32 // bits), 32 // bits, N)
    packed = np.zeros((K // (32 // bits), N), np.uint32)
    for i in range(32 // bits):
        packed |= c[:, i] << np.uint32(i * bits)
    return packed, s.astype(np.float16), z


def copy_bandwidth(nbytes: int, reps: int) -> float:
    """Bytes/s of np.copyto (counting read + write) on arrays of ``nbytes``."""
    a = np.ones(nbytes // 4, np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)
    t = median_time(lambda: np.copyto(b, a), reps)
    return 2 * nbytes / t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,8192x28672")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "rtn.json"))
    args = ap.parse_args()
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    rows = []
    for K, N in shapes:
        w_np = np.random.default_rng(0).standard_normal((K, N), dtype=np.float32) * 0.02
        w = jnp.asarray(w_np)
        nbytes = w_np.nbytes
        bw = copy_bandwidth(nbytes, args.reps)
        # Floor: read the weight once and write the 4-bit codes (+ scales, negligible).
        floor = (nbytes + nbytes / 8) / (bw / 2)
        for symmetric in (True, False):
            spec = jq.QuantSpec(bits=4, group_size=128, symmetric=symmetric)
            t0 = time.perf_counter()
            jax.block_until_ready(jq.quantize(w, spec))
            first = time.perf_counter() - t0
            t_jq = median_time(lambda: jax.block_until_ready(jq.quantize(w, spec)), args.reps)
            t_np = median_time(lambda: numpy_rtn(w_np, 4, 128, symmetric), max(1, args.reps // 2))
            # Same codes as the NumPy implementation (sanity, not a timing).
            q = jq.quantize(w, spec)
            p_np, _, _ = numpy_rtn(w_np, 4, 128, symmetric)
            same = bool(np.array_equal(np.asarray(q.codes), p_np))
            rows.append({
                "shape": f"{K}x{N}", "scheme": spec.describe(), "weight_MB": nbytes / 1e6,
                "jquant_s": t_jq, "jquant_compile_s": max(first - t_jq, 0.0), "numpy_s": t_np,
                "speedup_vs_numpy": t_np / t_jq, "jquant_GBps": nbytes / t_jq / 1e9, "numpy_GBps": nbytes / t_np / 1e9,
                "copy_GBps": bw / 1e9, "floor_s": floor, "x_floor": t_jq / floor, "codes_equal_numpy": same,
            })
    hdr = (f"{'shape':>11} {'scheme':<14} {'MB':>6} {'jquant s':>9} {'compile s':>9} {'numpy s':>8} "
           f"{'x numpy':>8} {'jq GB/s':>8} {'np GB/s':>8} {'copy GB/s':>9} {'floor s':>8} {'x floor':>8} {'same':>5}")
    print(hdr)
    for r in rows:
        print(f"{r['shape']:>11} {r['scheme']:<14} {r['weight_MB']:>6.0f} {r['jquant_s']:>9.4f} {r['jquant_compile_s']:>9.2f} "
              f"{r['numpy_s']:>8.4f} {r['speedup_vs_numpy']:>8.2f} {r['jquant_GBps']:>8.2f} {r['numpy_GBps']:>8.2f} "
              f"{r['copy_GBps']:>9.2f} {r['floor_s']:>8.4f} {r['x_floor']:>8.2f} {str(r['codes_equal_numpy']):>5}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"benchmark": "rtn", "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                   "jax": jax.__version__, "backend": jax.default_backend(), "rows": rows}, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
