"""Learned rotations (SpinQuant, arXiv:2405.16406): R1 (residual stream) and one R2 per layer
(value heads), learned on the Stiefel manifold with Cayley SGD
(:func:`jquant.rotations.cayley_sgd`, an Optax transformation) to minimise the next-token
loss of the model with its weights, activations and KV cache fake-quantized (straight-through
estimator); the model's weights stay frozen. R4 (down_proj's input) stays an online Hadamard
transform. The learned matrices are then fused (:func:`jquant.rotations.fuse_rotations`) and
the weights quantized by RTN or GPTQ as usual.

SpinQuant's reference learns at learning rate 1.5 with a cosine decay to 0 for 100 steps from
random Hadamard matrices; when GPTQ quantizes the weights afterwards it learns with the weights
in float (W16A4KV4), because GPTQ will adapt them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant.errors import DataError, SpecError
from jquant.rotations.fuse import _params, fold_norms, fuse_rotations, rotate_params
from jquant.rotations.quarot import random_rotations
from jquant.spec import QuantSpec, compile_rules, match, path_str


@dataclasses.dataclass
class LearnedRotations:
    """The result of :func:`learn_rotations`.

    Attributes:
      r1: ``(hidden, hidden)`` float64, orthogonal.
      r2: ``(layers, head_dim, head_dim)`` float64, orthogonal.
      losses: the training loss at every step.
      seconds: wall time of the learning (compilation included).
    """

    r1: np.ndarray
    r2: np.ndarray
    losses: list[float]
    seconds: float


def _weight_fake_quant(p: dict, compiled) -> dict:
    """Every kernel a rule matches quantized and dequantized (RTN of its spec), gradient
    straight through to the rotated float weight."""
    from jquant.quantizers.rtn import fake_quant

    out = dict(p)
    for path, w in p.items():
        _, spec = match(path, compiled)
        if spec is not None:
            out[path] = w + jax.lax.stop_gradient(fake_quant(w, dataclasses.replace(spec, method="rtn")) - w)
    return out


def learn_rotations(model, tokens, *, weight_rules: Sequence = (), steps: int = 100, learning_rate: float = 1.5,
                    batch_size: int = 4, kind: str = "hadamard", seed: int = 0,
                    online: Sequence[str] = ("mlp/down_proj",), objective: str = "ce", progress: bool = False,
                    on_step: Callable[[int, float], None] | None = None, work_dir: str | None = None,
                    checkpoint_every: int = 10) -> LearnedRotations:
    """Learn R1 and R2 for ``model`` (see the module doc).

    Args:
      model: a float Llama-family model whose activation / KV-cache quantizers are already
        placed (:func:`jquant.activations.set_quantizers`): the loss runs the model as it will
        run quantized.
      tokens: int32 ``(n, seq_len)`` calibration windows; each step takes ``batch_size`` of them
        in turn.
      weight_rules: ``(pattern, QuantSpec | None)``: the weights fake-quantized (by RTN with
        the rule's grid) in the loss; empty for W16 (when GPTQ quantizes the weights after).
      steps, learning_rate: Cayley SGD with a cosine decay from ``learning_rate`` to 0.
      kind: the starting rotations (``"hadamard"`` or ``"orthogonal"``), from ``seed``.
      online: linears whose input is Hadamard-rotated online (kept fixed).
      objective: ``"ce"``, the next-token cross-entropy on the windows (SpinQuant's), or
        ``"kl"``, ``KL(p_float ‖ p_quant)`` per token against the float model on the same
        windows (distillation: a direct signal where the text's own entropy dominates the
        cross-entropy, e.g. text the model wrote itself).
      work_dir: checkpoints of the learning (the rotations and the optimiser state every
        ``checkpoint_every`` steps and at the end); a run started again with the same
        arguments resumes from the last one and gives the uninterrupted run's rotations bit
        for bit.
    Returns:
      :class:`LearnedRotations` (float64 matrices, re-orthogonalised).
    Raises:
      SpecError: steps < 1, a learning rate <= 0, a batch size < 1, another objective.
      DataError: fewer calibration windows than one batch.
      CheckpointError: ``work_dir`` holds a checkpoint of another run, or an unreadable one.
    """
    import optax

    from jquant.rotations.cayley import cayley_sgd, project_orthogonal

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SpecError(f"learn_rotations: steps={steps!r} must be an integer >= 1")
    if not learning_rate > 0:
        raise SpecError(f"learn_rotations: learning_rate={learning_rate!r} must be > 0")
    if objective not in ("ce", "kl"):
        raise SpecError(f"learn_rotations: objective={objective!r}; valid: ce, kl")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpecError(f"learn_rotations: batch_size={batch_size!r} must be an integer >= 1")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 0:
        raise SpecError(f"learn_rotations: checkpoint_every={checkpoint_every!r} must be an integer >= 0")
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or len(tokens) < batch_size:
        raise DataError(f"learn_rotations: {len(tokens) if tokens.ndim == 2 else 0} calibration windows, at least "
                        f"one batch of {batch_size} needed")
    t0 = time.perf_counter()
    compiled = compile_rules(list(weight_rules))
    base, _ = fuse_rotations(model, online=online) if online else (model, [])
    folded, _ = fold_norms(base)
    c = folded.config
    graphdef, state = nnx.split(folded)
    paths = [path_str(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    treedef = jax.tree_util.tree_structure(state)
    p0 = {k: jnp.asarray(v, jnp.float32) for k, v in _params(folded).items()}
    groups = type(folded.layers[0]).LINEAR_GROUPS

    float_gd, float_state = nnx.split(model)

    def loss_fn(rs, batch):
        p = rotate_params(p0, c, groups, rs["r1"], rs["r2"], xp=jnp)
        p = _weight_fake_quant(p, compiled)
        st = jax.tree_util.tree_unflatten(treedef, [p[k].astype(folded.dtype) for k in paths])
        lq = jax.nn.log_softmax(nnx.merge(graphdef, st)(batch)[0].astype(jnp.float32), -1)
        if objective == "ce":
            return -jnp.mean(jnp.take_along_axis(lq[:, :-1], batch[:, 1:, None], -1))
        plain = _without_quantizers(nnx.merge(float_gd, float_state))
        lr_ = jax.lax.stop_gradient(jax.nn.log_softmax(plain(batch)[0].astype(jnp.float32), -1))
        return jnp.mean(jnp.sum(jnp.exp(lr_) * (lr_ - lq), -1))

    r1, r2 = random_rotations(c, kind, seed)
    rs = {"r1": jnp.asarray(r1, jnp.float32), "r2": jnp.asarray(r2, jnp.float32)}
    opt = cayley_sgd(optax.cosine_decay_schedule(learning_rate, steps))
    opt_state = opt.init(rs)

    @jax.jit
    def step(rs, opt_state, batch):
        loss, g = jax.value_and_grad(loss_fn)(rs, batch)
        upd, opt_state = opt.update(g, opt_state, rs)
        # A capped Cayley step (large learning rates) leaves the manifold by up to 3/16 with the
        # paper's 2 fixed-point iterations: project back every step, as SpinQuant re-orthogonalises.
        return jax.tree.map(project_orthogonal, optax.apply_updates(rs, upd)), opt_state, loss

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc="learn rotations", unit="step", disable=None)
    losses, start = [], 0
    run_key = None
    if work_dir is not None:
        import hashlib

        from jquant import _train_checkpoint as train_checkpoint

        h = hashlib.sha256(repr((steps, float(learning_rate), batch_size, kind, seed, tuple(online), objective,
                                 [(p, None if s is None else s.to_dict()) for p, s in weight_rules],
                                 [(k, tuple(np.shape(v)), str(v.dtype)) for k, v in sorted(p0.items())])).encode())
        h.update(tokens.tobytes())
        h.update(np.asarray(r1, np.float64).tobytes())
        run_key = h.hexdigest()
        restored = train_checkpoint.restore(work_dir, "rotations", run_key, (rs, opt_state), "rotation learning")
        if restored is not None:
            (rs, opt_state), start, losses, _ = restored
            if bar is not None:
                bar.update(start)
    n_batches = len(tokens) // batch_size
    for i in range(start, steps):
        j = i % n_batches
        rs, opt_state, loss = step(rs, opt_state, jnp.asarray(tokens[j * batch_size:(j + 1) * batch_size]))
        losses.append(float(loss))
        if on_step is not None:
            on_step(i, losses[-1])
        if bar is not None:
            bar.set_postfix_str(f"loss {losses[-1]:.4f}")
            bar.update(1)
        if run_key is not None and (i + 1 == steps or (checkpoint_every and (i + 1) % checkpoint_every == 0)):
            train_checkpoint.save(work_dir, "rotations", run_key, (rs, opt_state), i + 1, losses)
    if bar is not None:
        bar.close()

    def orth(r):  # the nearest orthogonal matrix in float64 (the float32 iterate is orthogonal to ~1e-6)
        u, _, vt = np.linalg.svd(np.asarray(r, np.float64))
        return u @ vt

    r2 = np.stack([orth(r) for r in np.asarray(rs["r2"])])
    return LearnedRotations(orth(rs["r1"]), r2, losses, time.perf_counter() - t0)


def _without_quantizers(model):
    """The model with its activation / KV-cache quantizers off (the float reference)."""
    from jquant.activations import set_quantizers

    return set_quantizers(model)[0]


def weight_rules_for_learning(rules: Sequence) -> list:
    """The rules whose specs can be fake-quantized in the loss (int formats); others kept float."""
    out = []
    for pat, spec in rules:
        out.append((pat, spec if isinstance(spec, QuantSpec) and spec.format == "int" else None))
    return out
