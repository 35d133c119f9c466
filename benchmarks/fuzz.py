"""Fuzzing the file loaders: mutated GGUF files, safetensors + config.json directories, recipe
YAML and Orbax checkpoints of ``jquant.save`` (a restore without error must give the saved values), each loaded in a worker process under a memory limit and a per-input time limit.

Seeds are tiny valid inputs (``tests/models/fuzz_cases.py``: a llama F32 and a tied qwen2 Q4_1
GGUF, a llama and a qwen2 Hugging Face directory, the recipes of ``configs/``); each input applies
1 to 3 mutations (bit flips, byte edits, truncation, insertions, deletions, rewritten counts /
lengths / offsets of the GGUF header, edited safetensors header and config.json values, YAML
value edits and alias bombs). Outcomes per format: ``ok`` (loaded; the result passed its
invariants), ``error`` (a ``jquant.errors`` error, by class), ``crash`` (another exception),
``memory`` (MemoryError, or peak memory grown by more than half the limit), ``hang`` (over the
time limit), ``died`` (the worker was killed). Only ``ok`` and ``error`` are acceptable; the
first findings are printed with their traceback and their inputs kept under ``--keep``.

Usage: python benchmarks/fuzz.py [--n 10000] [--minutes 10] [--formats gguf,safetensors,recipe]
                                 [--seed 0] [--json benchmarks/results/fuzz.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "models")]

import numpy as np  # noqa: E402

import fuzz_cases as fc  # noqa: E402

BAD = ("wrong", "crash", "memory", "hang", "died")


def run_format(fmt: str, seeds, worker: fc.Worker, n: int, seconds: float, seed: int, tmp: Path, keep: Path):
    draw = fc.RngDraw(np.random.default_rng([seed, fc.FORMATS.index(fmt)]))
    counts, errors, findings, cache = collections.Counter(), collections.Counter(), [], {}
    slowest = 0.0
    t0 = time.perf_counter()
    done = 0
    while done < n and time.perf_counter() - t0 < seconds:
        src = draw.pick(seeds)
        path = fc.mutate(fmt, src, tmp / f"input_{fmt}{src.suffix}", draw, cache)
        outcome, detail, dt = worker.run(fmt, path)
        counts[outcome] += 1
        slowest = max(slowest, dt)
        done += 1
        if outcome == "error":
            errors[detail] += 1
        elif outcome in BAD:
            where = keep / f"{fmt}_{done}{src.suffix}"
            if len(findings) < 20:
                (shutil.copytree if path.is_dir() else shutil.copy)(path, where)
                findings.append({"input": str(where), "outcome": outcome, "detail": detail})
                print(f"  FINDING {fmt} #{done}: {outcome} ({where})\n{detail}", flush=True)
    elapsed = time.perf_counter() - t0
    return {"inputs": done, "seconds": round(elapsed, 1), "inputs_per_s": round(done / elapsed, 1),
            "slowest_input_s": round(slowest, 3), "worker_restarts": worker.restarts,
            "outcomes": {k: counts.get(k, 0) for k in ("ok", "error", *BAD)},
            "errors_by_class": dict(errors.most_common()), "findings": findings,
            "stopped_by": "count" if done >= n else "time"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="inputs per format")
    ap.add_argument("--minutes", type=float, default=10.0, help="time limit per format")
    ap.add_argument("--formats", default=",".join(fc.FORMATS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--memory-gib", type=float, default=fc.MEMORY_LIMIT / 2**30)
    ap.add_argument("--time-limit", type=float, default=fc.TIME_LIMIT, help="seconds per input")
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "fuzz.json"))
    ap.add_argument("--keep", default=None, help="where the inputs of findings are kept (default: a temp dir)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="jquant_fuzz_"))
    keep = Path(args.keep or tmp / "findings")
    keep.mkdir(parents=True, exist_ok=True)
    seeds = fc.make_seeds(tmp / "seeds")
    worker = fc.Worker(int(args.memory_gib * 2**30), args.time_limit)
    results = {}
    try:
        for fmt in args.formats.split(","):
            print(f"{fmt}: up to {args.n} inputs or {args.minutes} min", flush=True)
            results[fmt] = run_format(fmt, seeds[fmt], worker, args.n, args.minutes * 60, args.seed, tmp, keep)
    finally:
        worker.close()
    print(f"\n{'format':<12} {'inputs':>7} {'ok':>6} {'error':>6} {'wrong':>6} {'crash':>6} {'memory':>6} "
          f"{'hang':>5} {'died':>5} {'in/s':>6} {'slowest s':>9}")
    for fmt, r in results.items():
        o = r["outcomes"]
        print(f"{fmt:<12} {r['inputs']:>7} {o['ok']:>6} {o['error']:>6} {o['wrong']:>6} {o['crash']:>6} "
              f"{o['memory']:>6} {o['hang']:>5} {o['died']:>5} {r['inputs_per_s']:>6} {r['slowest_input_s']:>9}")
    for fmt, r in results.items():
        print(f"{fmt} errors: " + ", ".join(f"{k} {v}" for k, v in r["errors_by_class"].items()))
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    runs = {}
    if os.path.isfile(args.json):  # results of formats not run this time are kept
        with open(args.json) as fh:
            old = json.load(fh)
        runs = {fmt: {**r, "command": r.get("command", old.get("command"))} for fmt, r in old.get("results", {}).items()}
    command = " ".join(sys.argv)
    runs.update({fmt: {**r, "command": command} for fmt, r in results.items()})
    with open(args.json, "w") as fh:
        json.dump({"benchmark": "fuzz", "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "seed": args.seed, "memory_limit_gib": args.memory_gib,
                   "time_limit_s": args.time_limit, "command": command, "results": runs}, fh, indent=2)
    print(f"wrote {args.json}; findings' inputs in {keep}")
    return 1 if any(r["outcomes"][k] for r in results.values() for k in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
