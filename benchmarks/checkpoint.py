"""What the checksums cost: jquant.save / jquant.restore with and without SHA-256 of every array.

The tree is a Llama-like block stack of ~``--mb`` MB: float32 embedding and norms and W4 g128
QTensors (codes, float16 scales, uint8 zeros). Each save / restore is timed ``--reps`` times
(median) with the checksums (the shipped code) and with the digest replaced by a constant
(the same code path without the hashing: the baseline), alternating so both see the same
disk cache. ``sha256 alone`` is the time to hash the tree's bytes already on the host.

Usage: python benchmarks/checkpoint.py [--mb 100] [--reps 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import jquant as jq
import jquant.checkpoint as ck


def make_tree(mb: float):
    """float32 embedding + norms, and (K, N) W4 g128 kernels, ``mb`` MB of stored bytes in all."""
    rng = np.random.default_rng(0)
    spec = jq.QuantSpec(bits=4, group_size=128, symmetric=False)
    d = 1024
    tree = {"embed": jnp.asarray(rng.standard_normal((8192, d), np.float32)), "layers": []}
    while (jq.summary(tree).nbytes / 1e6) < mb:
        w = jnp.asarray(rng.standard_normal((d, 4 * d), np.float32))
        tree["layers"].append({"up": jq.quantize(w, spec), "down": jq.quantize(w.T, spec),
                               "norm": jnp.asarray(rng.standard_normal((d,), np.float32))})
    return tree


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mb", type=float, default=100.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    tree = make_tree(args.mb)
    nbytes = jq.summary(tree).nbytes
    leaves = [a for a in jax.tree_util.tree_leaves(tree)]
    host = [np.asarray(a) for a in leaves]
    t_hash = statistics.median(timed(lambda: [ck._digest(a) for a in host]) for _ in range(args.reps))
    real = ck._digest
    times = {("save", True): [], ("save", False): [], ("restore", True): [], ("restore", False): []}
    tmp = tempfile.mkdtemp(prefix="jquant-ckbench-")
    try:
        for _ in range(args.reps):
            for hashing in (True, False):
                ck._digest = real if hashing else (lambda a: "0")
                path = os.path.join(tmp, f"ck{int(hashing)}")
                times["save", hashing].append(timed(lambda: jq.save(path, tree, overwrite=True)))
                times["restore", hashing].append(
                    timed(lambda: jax.block_until_ready(jax.tree_util.tree_leaves(jq.restore(path)))))
    finally:
        ck._digest = real
        shutil.rmtree(tmp)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"tree: {nbytes / 1e6:.1f} MB stored ({len(leaves)} arrays) on {jax.devices()[0].platform}; "
          f"median of {args.reps}")
    print(f"{'':10} {'with sha256 s':>14} {'without s':>10} {'overhead s':>11} {'overhead %':>11}")
    rows = {}
    for op in ("save", "restore"):
        a, b = med[op, True], med[op, False]
        rows[op] = {"with": a, "without": b, "overhead_s": a - b, "overhead_pct": 100 * (a - b) / b}
        print(f"{op:10} {a:>14.3f} {b:>10.3f} {a - b:>11.3f} {100 * (a - b) / b:>10.1f}%")
    print(f"sha256 alone of the host bytes: {t_hash:.3f} s ({nbytes / t_hash / 1e9:.2f} GB/s)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"mb": nbytes / 1e6, "arrays": len(leaves), "reps": args.reps, "sha256_s": t_hash,
                       "platform": jax.devices()[0].platform, "cpu": platform.processor(), **rows}, fh, indent=1)


if __name__ == "__main__":
    main()
