"""Kill a GPTQ calibration job (or, ``--job qat``, a QAT run; ``--job rotations``, SpinQuant
rotation learning) with SIGKILL at random moments,
resume it, and compare the result bit for bit with an uninterrupted run.

The job (``--child``, one process) builds a tiny random Llama (``jquant.models.init_model``),
draws calibration tokens, runs ``jquant.calibrate.quantize_model`` with GPTQ W3 g32
act-order on every block linear in ``DIR/work`` (the resumable state: per-block Orbax
checkpoints, ``hidden_NNN.npy``, ``progress.json``, a resume point after every block), saves the quantized tree to ``DIR/final``
and its layer logs to ``DIR/logs.json``, and writes ``DIR/DONE`` last. Starting it again
with the same ``DIR`` resumes.

A trial kills the job 1..``--max-kills`` times at uniformly random moments (the first
within an uninterrupted run's time from start-up to exit, measured on the reference run;
later ones, on the shorter resumed runs, within 60% of it; a trial whose first run finishes
before its kill is redone, so every trial has at least one kill mid-job), then lets it finish, and compares the final tree (every array's bytes, every QTensor's metadata) and
the layer logs (all but the timings) with the reference. With ``--delay S`` every
``os.replace`` in the job sleeps up to ``S`` seconds before and after renaming, so kills
often land inside atomic writes and between two of them (a gap that otherwise lasts
microseconds).

Usage:
  python scripts/kill_resume.py [--trials 20] [--max-kills 3] [--delay 0.05] [--seed 0]
                                [--dtype float32|bfloat16] [--layers 3] [--job gptq|qat|rotations] [--json out.json]
Exit status 0 when every trial is identical.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the checkout's jquant, not an installed one
    sys.path.insert(0, str(ROOT))

LIN = r"(q|k|v|o|gate|up|down)_proj/kernel$"


# ---------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------
def child(out: str, dtype: str, layers: int, delay: float, cache: str | None = None, job: str = "gptq") -> int:
    if delay > 0:  # widen the windows around every atomic rename
        real_replace = os.replace
        rnd = random.Random(os.getpid() ^ time.time_ns())

        def slow_replace(src, dst, **kw):
            time.sleep(rnd.uniform(0, delay))
            real_replace(src, dst, **kw)
            time.sleep(rnd.uniform(0, delay))

        os.replace = slow_replace
    import jax
    import jax.numpy as jnp

    if cache:  # compile once for all the runs (the cached executables are the same code)
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    import numpy as np

    import jquant as jq
    from jquant import calibrate
    from jquant._atomic import write_json
    from jquant.models import LlamaConfig, init_model

    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2)
    model = init_model(cfg, key=0, dtype=jnp.dtype(dtype))
    toks = np.random.default_rng(0).integers(0, 128, size=(16, 64)).astype(np.int32)
    if job == "qat":  # W2 g32 QAT (LSQ+ scales, distillation), a checkpoint after every step
        from jquant import qat

        spec = jq.QuantSpec(bits=2, group_size=32, symmetric=False)
        Path(out, "started").touch()
        res = qat.train(model, toks, [(LIN, spec)], qat.QATConfig(steps=12, batch_size=4, checkpoint_every=1,
                                                                  learning_rate=1e-4, warmup_steps=2),
                        work_dir=os.path.join(out, "work"))
        jq.save(os.path.join(out, "final"), res.state, overwrite=True)
        write_json(os.path.join(out, "logs.json"), {"losses": res.losses})
        Path(out, "DONE").touch()
        return 0
    if job == "rotations":  # SpinQuant R1/R2 for W4 A4 KV4 (KL objective), 30 steps, a checkpoint after every step
        from jquant.activations import ActQuantSpec, set_quantizers
        from jquant.rotations.spinquant import learn_rotations

        qmodel, _ = set_quantizers(model, [(LIN, ActQuantSpec(bits=4, clip_ratio=0.9))],
                                   ActQuantSpec(bits=4, symmetric=False))
        Path(out, "started").touch()
        res = learn_rotations(qmodel, toks, weight_rules=[(LIN, jq.QuantSpec(bits=4, granularity="channel"))],
                              steps=30, learning_rate=0.05, batch_size=4, objective="kl",
                              work_dir=os.path.join(out, "work"), checkpoint_every=1)
        np.savez(os.path.join(out, "final.npz"), r1=res.r1, r2=res.r2)
        write_json(os.path.join(out, "logs.json"), {"losses": res.losses})
        Path(out, "DONE").touch()
        return 0
    spec = jq.QuantSpec(bits=3, group_size=32, symmetric=False, method="gptq", options={"act_order": True})
    Path(out, "started").touch()
    # checkpoint_every=0: a resume point after every block, so kills land between many of them
    state, logs = calibrate.quantize_model(model, toks, [(LIN, spec)], work_dir=os.path.join(out, "work"),
                                           checkpoint_every=0,
                                           batch_size=8, progress=False, model_id=f"tiny-llama-{dtype}")
    jq.save(os.path.join(out, "final"), state, overwrite=True)
    write_json(os.path.join(out, "logs.json"),
               [{k: v for k, v in vars(e).items() if k != "seconds"} for e in logs])
    Path(out, "DONE").touch()
    return 0


# ---------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------
def _launch(out: str, args) -> subprocess.Popen:
    for marker in ("started", "DONE"):
        Path(out, marker).unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", out, "--dtype", args.dtype,
           "--layers", str(args.layers), "--delay", str(args.delay), "--cache", args.cache, "--job", args.job]
    log = open(os.path.join(out, "child.log"), "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=str(ROOT))


def _wait_started(proc: subprocess.Popen, out: str, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while not os.path.exists(os.path.join(out, "started")):
        if proc.poll() is not None or time.perf_counter() - t0 > timeout:
            return -1.0
        time.sleep(0.005)
    return time.perf_counter()


def _work_state(out: str) -> str:
    """What the job left behind: blocks finished per progress.json, and temporary files."""
    work = os.path.join(out, "work")
    done = "-"
    for name, key in (("progress.json", "done"), ("qat_progress.json", "step"), ("rotations_progress.json", "step")):
        try:
            with open(os.path.join(work, name)) as fh:
                done = str(json.load(fh)[key])
        except (OSError, ValueError, KeyError):
            pass
    tmp = sorted(os.path.relpath(os.path.join(r, f), out) for r, ds, fs in os.walk(out) for f in ds + fs
                 if f.endswith((".tmp", ".tmp.npy", ".saving", ".replaced")) or ".orbax-checkpoint-tmp" in f)
    return f"done={done}" + (f" tmp={','.join(tmp)}" if tmp else "")


def run_to_end(out: str, args) -> tuple[int, float]:
    proc = _launch(out, args)
    t_start = _wait_started(proc, out)
    rc = proc.wait()
    return rc, (time.perf_counter() - t_start) if t_start > 0 else float("nan")


def compare(ref: str, out: str) -> str | None:
    """None when ``out`` holds the same final result and logs as ``ref``; else what differs."""
    if not os.path.exists(os.path.join(out, "DONE")):
        return "the job did not finish"
    diff = (_rotations_diff if os.path.exists(os.path.join(ref, "final.npz")) else _tree_diff)(ref, out)
    if diff is not None:
        return diff
    with open(os.path.join(ref, "logs.json")) as a, open(os.path.join(out, "logs.json")) as b:
        if json.load(a) != json.load(b):
            return "the results agree but the logs differ"
    return None


def _rotations_diff(ref: str, out: str) -> str | None:
    """Learned rotations (float64 R1, R2), byte for byte."""
    import numpy as np

    with np.load(os.path.join(ref, "final.npz")) as a, np.load(os.path.join(out, "final.npz")) as b:
        differ = [k for k in a.files if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
                  or not np.array_equal(a[k].view(np.uint8), b[k].view(np.uint8))]
    return f"learned rotations differ: {', '.join(differ)}" if differ else None


def _tree_diff(ref: str, out: str) -> str | None:
    """The quantized trees: every array's bytes, every QTensor's metadata."""
    import jax
    import numpy as np

    import jquant as jq

    ta, tb = jq.restore(os.path.join(ref, "final")), jq.restore(os.path.join(out, "final"))
    la = jax.tree_util.tree_flatten_with_path(ta, is_leaf=jq.is_qtensor)[0]
    lb = jax.tree_util.tree_flatten_with_path(tb, is_leaf=jq.is_qtensor)[0]
    if [jq.path_str(k) for k, _ in la] != [jq.path_str(k) for k, _ in lb]:
        return "tree structure differs"
    differ = []
    for (k, x), (_, y) in zip(la, lb):
        if jq.is_qtensor(x) != jq.is_qtensor(y) or (
                jq.is_qtensor(x) and jax.tree_util.tree_structure(x) != jax.tree_util.tree_structure(y)):
            differ.append(jq.path_str(k))
            continue
        for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
            u, v = np.asarray(u), np.asarray(v)
            if u.dtype != v.dtype or u.shape != v.shape or not np.array_equal(u.view(np.uint8), v.view(np.uint8)):
                differ.append(jq.path_str(k))
                break
    return f"{len(differ)} of {len(la)} leaves differ, first {differ[0]}" if differ else None


def harness(args) -> dict:
    rng = random.Random(args.seed)
    base = Path(args.dir or tempfile.mkdtemp(prefix="jquant-kill-resume-"))
    base.mkdir(parents=True, exist_ok=True)
    args.cache = str(base / "jax-cache")
    # Two uninterrupted runs: the first fills the compilation cache, the second (the reference,
    # timed as the later runs will be) must agree with it bit for bit.
    for name in ("cold", "ref"):
        ref = str(base / name)
        shutil.rmtree(ref, ignore_errors=True)
        os.makedirs(ref)
        rc, t_ref = run_to_end(ref, args)
        if rc != 0:
            raise SystemExit(f"the uninterrupted {name} run failed (rc {rc}): {_last_error(ref)}")
    diff = compare(str(base / "cold"), ref)
    if diff is not None:
        raise SystemExit(f"two uninterrupted runs differ: {diff}")
    print(f"reference run: {t_ref:.1f}s of calibration after start-up ({args.layers} blocks, {args.dtype}, "
          f"os.replace delay up to {args.delay}s)", flush=True)
    trials = []
    t_est = t_ref  # a fresh run's time from start-up to exit, tracked as runs finish under the current load
    for t in range(args.trials):
        out = str(base / f"trial{t:03d}")
        n_kills = rng.randint(1, args.max_kills)
        for attempt in range(5):  # until the first kill lands mid-job (a run that finishes first is redone)
            shutil.rmtree(out, ignore_errors=True)
            os.makedirs(out)
            kills = []
            while len(kills) < n_kills:
                proc = _launch(out, args)
                t_start = _wait_started(proc, out)
                if t_start < 0:
                    kills.append({"at": None, "state": f"exited rc {proc.returncode} before starting"})
                    break
                # the first kill anywhere in a fresh run; later ones early, as a resumed run is shorter
                at = rng.uniform(0, t_est * (0.95 if not kills else 0.6))
                try:
                    proc.wait(timeout=max(0.0, at - (time.perf_counter() - t_start)))
                    if not kills:
                        t_est = 0.5 * t_est + 0.5 * (time.perf_counter() - t_start)
                    kills.append({"at": at, "state": f"finished before the kill (rc {proc.returncode})"})
                    break
                except subprocess.TimeoutExpired:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills.append({"at": at, "state": _work_state(out)})
            if kills[0]["state"].startswith("done="):
                break
        rc, _ = run_to_end(out, args)
        diff = f"resumed run failed (rc {rc}): " + _last_error(out) if rc != 0 else compare(ref, out)
        trials.append({"trial": t, "kills": kills, "identical": diff is None, "difference": diff})
        ks = "; ".join(f"{k['at']:.2f}s {k['state']}" if k["at"] is not None else k["state"] for k in kills)
        print(f"trial {t:3d}: {'identical' if diff is None else 'DIFFERENT: ' + diff}  [kills: {ks}]", flush=True)
        if diff is None and not args.keep:
            shutil.rmtree(out)
    n_ok = sum(tr["identical"] for tr in trials)
    n_kills = sum(1 for tr in trials for k in tr["kills"] if k["state"].startswith("done="))
    print(f"{n_ok} of {len(trials)} identical to the uninterrupted run ({n_kills} SIGKILLs landed mid-job)")
    if not args.keep and n_ok == len(trials) and not args.dir:
        shutil.rmtree(base)
    return {"identical": n_ok, "trials": len(trials), "kills_mid_job": n_kills, "reference_seconds": t_ref,
            "job": args.job, "dtype": args.dtype, "layers": args.layers, "delay": args.delay, "seed": args.seed,
            "details": trials}


def _last_error(out: str) -> str:
    try:
        lines = Path(out, "child.log").read_text().strip().splitlines()
    except OSError:
        return "no log"
    errs = [ln for ln in lines if "Error" in ln or "error" in ln]
    return (errs or lines or ["no output"])[-1][:300]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--max-kills", type=int, default=3)
    ap.add_argument("--delay", type=float, default=0.05, help="max sleep before and after each os.replace (s)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--job", default="gptq", choices=["gptq", "qat", "rotations"],
                    help="gptq: a GPTQ calibration job; qat: 12 steps of W2 g32 QAT; rotations: 30 steps of "
                         "SpinQuant R1/R2 learning (W4 A4 KV4); the last two with a checkpoint every step")
    ap.add_argument("--dir", default=None, help="where trials run (default: a temporary directory)")
    ap.add_argument("--keep", action="store_true", help="keep the directories of identical trials")
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--cache", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child, args.dtype, args.layers, args.delay, args.cache, args.job)
    result = harness(args)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0 if result["identical"] == result["trials"] else 1


if __name__ == "__main__":
    sys.exit(main())
