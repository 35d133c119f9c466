"""Checkpoints of the training loops (QAT, learned rotations): one mechanism for both.

A checkpoint in ``work_dir`` is ``{name}_state_{step}.npz`` (every leaf of the trainable tree and
its optimiser state, in tree order) and ``{name}_progress.json`` (the run's key, the step
reached, the losses and evaluations so far), written last and atomically: a checkpoint exists
only once its progress file names it, so a kill at any moment resumes from a whole one. The
run key (a hash of everything the trajectory depends on) guards against resuming another
run's state.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jquant._atomic import write_json, write_npz
from jquant.errors import CheckpointError


def files(work_dir: str, name: str, step: int | None = None) -> tuple[str, str]:
    """``(state file of step, progress file)`` of checkpoint ``name`` in ``work_dir``. The
    state file is named by its step and the progress file (written last) names the step: a
    kill between the two writes leaves the old progress naming the old, intact state file."""
    return (os.path.join(work_dir, f"{name}_state_{step:06d}.npz" if step is not None else f"{name}_state.npz"),
            os.path.join(work_dir, f"{name}_progress.json"))


def exists(work_dir: str | None, name: str) -> bool:
    return work_dir is not None and os.path.exists(files(work_dir, name)[1])


def save(work_dir: str, name: str, run_key: str, tree, step: int, losses: list, evals: list = ()) -> None:
    os.makedirs(work_dir, exist_ok=True)
    state_file, progress_file = files(work_dir, name, step)
    leaves = [np.asarray(jax.device_get(x)) for x in jax.tree_util.tree_leaves(tree)]
    write_npz(state_file, **{f"a{i}": a for i, a in enumerate(leaves)})
    write_json(progress_file, {"run": run_key, "step": step, "losses": list(losses), "evals": list(evals),
                               "leaves": len(leaves), "state": os.path.basename(state_file)})
    for f in os.listdir(work_dir):  # earlier checkpoints' states
        if f.startswith(f"{name}_state") and f.endswith(".npz") and f != os.path.basename(state_file):
            try:
                os.remove(os.path.join(work_dir, f))
            except OSError:
                pass


def restore(work_dir: str, name: str, run_key: str, like, what: str):
    """``(tree like like, step, losses, evals)`` of the checkpoint, or None when there is none.

    Raises:
      CheckpointError: an unreadable checkpoint, one of another run (``run_key`` differs), or
        one whose arrays do not fit ``like``; ``what`` names the training in the message.
    """
    _, progress_file = files(work_dir, name)
    if not os.path.exists(progress_file):
        return None
    try:
        with open(progress_file) as fh:
            meta = json.load(fh)
        arrays = np.load(os.path.join(work_dir, os.path.basename(str(meta["state"]))))
        step, losses, evals = int(meta["step"]), [float(x) for x in meta["losses"]], meta["evals"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{work_dir}: unreadable {what} checkpoint ({type(e).__name__}: {e}); delete "
                              f"{progress_file} to start over") from e
    if meta.get("run") != run_key:
        raise CheckpointError(f"{work_dir}: holds a {what} checkpoint of another run (model, rules, settings or "
                              "training windows differ); use another work_dir or delete it to start over")
    leaves, treedef = jax.tree_util.tree_flatten(like)
    if meta.get("leaves") != len(leaves) or len(arrays.files) != len(leaves):
        raise CheckpointError(f"{work_dir}: the {what} checkpoint holds {len(arrays.files)} arrays, this run "
                              f"{len(leaves)}: incompatible")
    out = []
    for i, ref in enumerate(leaves):
        a = arrays[f"a{i}"]
        if a.shape != tuple(np.shape(ref)):
            raise CheckpointError(f"{work_dir}: array {i} of the {what} checkpoint has shape {a.shape}, this run "
                                  f"{tuple(np.shape(ref))}: incompatible")
        out.append(jnp.asarray(a, dtype=jnp.asarray(ref).dtype))
    if not 0 <= step <= len(losses):
        raise CheckpointError(f"{work_dir}: the {what} checkpoint's step {step} disagrees with its {len(losses)} "
                              "losses")
    return jax.tree_util.tree_unflatten(treedef, out), step, losses, [tuple(e) for e in evals]
