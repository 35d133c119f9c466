"""GPTQ solve speed: jquant (jitted JAX) vs a straightforward PyTorch GPTQ, and the flop floor.

For each layer shape (in, out) — Llama-7B's 4096x4096, 11008x4096 (down_proj) and
4096x11008 (gate/up) — W4 g128 asymmetric, block 128, no act-order:
  - jquant: compile time (first call) apart from the run time (median of reps);
  - torch: the reference algorithm (GPTQ's fasterquant: Cholesky inverse, lazy block
    updates, group parameters at group start), float32 on the CPU, same block size;
  - floor: the solve's flops at the matmul rate measured in the same run
    (f32 jnp.dot of 4096x4096 matrices, best of 5): N·K² for the error feedback and ⅓K³ for the
    Cholesky factorisation (the least GPTQ needs: jquant feeds the errors through the
    factor of H itself, so no inverse). The reference algorithm also inverts, ⅔K³ more.

With ``--profile DIR`` one more jquant solve per shape runs under ``jax.profiler`` (trace in
DIR) and the operations that took the most time are printed, summed over their calls.

Usage: python benchmarks/gptq.py [--shapes 4096x4096,11008x4096,4096x11008] [--reps 3] [--json out.json]
                                 [--profile DIR]
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
from jquant.quantizers import gptq


def matmul_rate(n=4096, reps=5) -> float:
    """The best f32 matmul rate of ``reps`` runs: the floor is what the machine can reach."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    t = min(median_time(lambda: jax.block_until_ready(f(a)), 1) for _ in range(reps))
    return 2 * n**3 / t


def profile_ops(fn, trace_dir: str, top: int = 12) -> list[tuple[str, int, float]]:
    """Run ``fn`` once under the JAX profiler; ``(op, calls, seconds)`` of the XLA operations that
    took the most time in all, from the Perfetto trace."""
    import collections
    import glob
    import gzip

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        fn()
    path = max(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True), key=os.path.getmtime)
    with gzip.open(path) as fh:
        events = json.load(fh)
    events = events["traceEvents"] if isinstance(events, dict) else events
    total, calls = collections.Counter(), collections.Counter()
    for e in events:
        name = e.get("name", "")
        # Thread-pool bookkeeping and Python frames ("$file:line") are not operations.
        if e.get("ph") == "X" and "dur" in e and not name.startswith(("$", "ThunkExecutor", "np.", "Pjit", "Common")):
            total[name] += e["dur"]
            calls[name] += 1
    return [(name, calls[name], us / 1e6) for name, us in total.most_common(top)]


def torch_gptq(W, H, bits=4, group=128, block=128, damp=0.01):
    """GPTQ as in the reference fasterquant, in PyTorch. W: (out, in) float32 tensor."""
    import torch

    W = W.clone()
    H = H.clone()
    rows, cols = W.shape
    maxq = 2**bits - 1
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols)
    L = torch.linalg.cholesky(H)
    Hinv = torch.cholesky_inverse(L)
    Hinv = torch.linalg.cholesky(Hinv, upper=True)
    Q = torch.zeros_like(W)

    def params(x):
        lo = torch.clamp(x.min(1).values, max=0)
        hi = torch.clamp(x.max(1).values, min=0)
        s = ((hi - lo) / maxq).half().float()
        s = torch.where(s == 0, torch.ones_like(s), s)
        z = torch.round(-lo / s)
        return s[:, None], z[:, None]

    s = z = None
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i:i + 1]
            d = Hinv1[i, i]
            if (i1 + i) % group == 0:
                s, z = params(W1[:, i:i + group] if i + group <= i2 - i1 else W[:, i1 + i:i1 + i + group])
            q = (torch.clamp(torch.round(w / s) + z, 0, maxq) - z) * s
            Q1[:, i:i + 1] = q
            err = (w - q) / d
            W1[:, i:] -= err @ Hinv1[i:i + 1, i:]
            Err1[:, i:i + 1] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return Q


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="in x out")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "results", "gptq.json"))
    ap.add_argument("--profile", default="", help="also profile one jquant solve per shape, trace in this folder")
    args = ap.parse_args()
    rate = matmul_rate()
    spec = jq.QuantSpec(bits=4, group_size=128, symmetric=False, method="gptq", options={"block_size": 128})
    rows = []
    for shape in args.shapes.split(","):
        K, N = (int(v) for v in shape.split("x"))
        rng = np.random.default_rng(0)
        X = rng.standard_normal((2 * K, K), dtype=np.float32)
        X[:, : K // 8] *= 5.0
        H = jnp.asarray(2.0 * X.T @ X / X.shape[0])
        w = jnp.asarray(rng.standard_normal((K, N), dtype=np.float32) * 0.02)
        t0 = time.perf_counter()
        qt, _ = gptq.gptq_quantize(w, H, spec)
        jax.block_until_ready(qt.codes)
        first = time.perf_counter() - t0
        t_jq = median_time(lambda: jax.block_until_ready(gptq.gptq_quantize(w, H, spec)[0].codes), args.reps)
        flops = N * K**2 + K**3 // 3
        row = {"shape_in_out": f"{K}x{N}", "jquant_s": t_jq, "jquant_compile_s": max(first - t_jq, 0.0),
               "flops": flops, "floor_s": flops / rate, "x_floor": t_jq / (flops / rate), "matmul_GFLOPs": rate / 1e9}
        if args.profile:
            ops = profile_ops(lambda: jax.block_until_ready(gptq.gptq_quantize(w, H, spec)[0].codes),
                              os.path.join(args.profile, f"{K}x{N}"))
            row["profile_top_ops"] = [{"op": n, "calls": c, "s": t} for n, c, t in ops]
            print(f"profile {K}x{N}: " + ", ".join(f"{n} ×{c} {t:.3f} s" for n, c, t in ops), flush=True)
        if not args.skip_torch:
            import torch

            torch.set_num_threads(os.cpu_count())
            Wt = torch.from_numpy(np.asarray(w).T.copy())
            Ht = torch.from_numpy(np.array(H))
            Qt = torch_gptq(Wt, Ht)
            row["torch_s"] = median_time(lambda: torch_gptq(Wt, Ht), args.reps)
            row["torch_over_jquant"] = row["torch_s"] / t_jq
            deq = np.asarray(qt.dequantize()).T
            row["frac_equal_torch"] = float(np.mean(np.isclose(deq, Qt.numpy(), rtol=0, atol=1e-6)))
        rows.append(row)
        print(row, flush=True)
    print(f"\nmatmul rate (f32 4096^3): {rate / 1e9:.1f} GFLOP/s")
    print(f"{'in x out':>11} {'jquant s':>9} {'compile s':>9} {'floor s':>8} {'x floor':>8} {'torch s':>8} {'torch/jq':>8} {'same':>6}")
    for r in rows:
        print(f"{r['shape_in_out']:>11} {r['jquant_s']:>9.2f} {r['jquant_compile_s']:>9.2f} {r['floor_s']:>8.2f} "
              f"{r['x_floor']:>8.2f} {r.get('torch_s', float('nan')):>8.2f} {r.get('torch_over_jquant', float('nan')):>8.2f} "
              f"{r.get('frac_equal_torch', float('nan')):>6.3f}")
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump({"benchmark": "gptq", "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine(),
                   "jax": jax.__version__, "rows": rows}, fh, indent=1)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
