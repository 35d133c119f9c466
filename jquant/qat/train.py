"""Quantization-aware training of a Flax model's linears, driven by Optax.

Every kernel a rule quantizes is fake-quantized in the forward pass: integer grids with
learned scales and zero points (:func:`~jquant.qat.fake_quant.lsq_fake_quant`, LSQ/LSQ+,
initialised from RTN or from given QTensors such as GPTQ's), other formats with the
straight-through estimator around their own quantizer. The loss is the next-token
cross-entropy on the training windows or, for distillation, ``KL(p_float ‖ p_quant)`` per
token against the float model's logits on the same windows (the default: on text of a
model's own domain it is the direct signal of what quantization lost).

The optimiser is Optax: AdamW on the weights (decay on the kernels only), Adam on the
quantizer parameters with their own learning rate (EfficientQAT trains the two at
different rates; ``train="scales"`` trains the quantizer parameters alone, its second phase),
linear warm-up then cosine decay, gradient clipping by global norm.

Steps are jitted and data-parallel over every device (the batch sharded along a ``data``
mesh axis, parameters replicated; XLA sums the gradients). The batch of step ``i`` is a
function of the seed and ``i`` alone, so a run resumed from its checkpoint (``work_dir``,
written atomically every ``checkpoint_every`` steps) continues with the same loss curve.
A non-finite loss stops the run with the last good checkpoint kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import _train_checkpoint as train_checkpoint
from jquant.errors import CheckpointError, DataError, NonFiniteError, SpecError
from jquant.qat.fake_quant import _check_lsq, init_params, lsq_fake_quant, ste_fake_quant, to_qtensor
from jquant.spec import QuantSpec, compile_rules, match, path_str



@dataclasses.dataclass(frozen=True)
class QATConfig:
    """Settings of a QAT run (all validated).

    Attributes:
      steps: optimiser steps.
      learning_rate: peak learning rate of the weights (AdamW).
      scale_learning_rate: peak learning rate of the learned scales and zero points (Adam).
      warmup_steps: linear warm-up, then cosine decay to 0 at ``steps``.
      weight_decay: AdamW's, on kernels only.
      clip_norm: gradient clipping by global norm (None: off).
      batch_size: windows per step (a multiple of the device count when several run).
      train: ``"all"`` (weights and quantizer parameters) or ``"scales"`` (quantizer
        parameters only: EfficientQAT's end-to-end phase).
      objective: ``"kl"`` (distillation from the float model) or ``"ce"`` (next token).
      checkpoint_every: steps between checkpoints in ``work_dir`` (0: only at the end).
      eval_every: steps between held-out perplexities (0: none).
      seed: the batch order.
    """

    steps: int = 100
    learning_rate: float = 1e-5
    scale_learning_rate: float = 1e-3
    warmup_steps: int = 0
    weight_decay: float = 0.0
    clip_norm: float | None = 1.0
    batch_size: int = 4
    train: str = "all"
    objective: str = "kl"
    checkpoint_every: int = 50
    eval_every: int = 0
    seed: int = 0

    def __post_init__(self):
        def integer(name, lo):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise SpecError(f"QAT {name}={v!r}; valid: an integer >= {lo}")

        integer("steps", 1)
        integer("warmup_steps", 0)
        integer("batch_size", 1)
        integer("checkpoint_every", 0)
        integer("eval_every", 0)
        integer("seed", 0)
        for name in ("learning_rate", "scale_learning_rate"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v >= 0 and np.isfinite(v)):
                raise SpecError(f"QAT {name}={v!r}; valid: a finite number >= 0")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise SpecError(f"QAT weight_decay={self.weight_decay!r}; valid: a number >= 0")
        if self.clip_norm is not None and not (isinstance(self.clip_norm, (int, float)) and self.clip_norm > 0):
            raise SpecError(f"QAT clip_norm={self.clip_norm!r}; valid: a number > 0 or None")
        if self.train not in ("all", "scales"):
            raise SpecError(f"QAT train={self.train!r}; valid: all, scales")
        if self.objective not in ("kl", "ce"):
            raise SpecError(f"QAT objective={self.objective!r}; valid: kl, ce")
        if self.warmup_steps >= self.steps and self.warmup_steps:
            raise SpecError(f"QAT warmup_steps={self.warmup_steps} must be below steps={self.steps}")

    @classmethod
    def from_dict(cls, d) -> QATConfig:
        """From a recipe's ``qat:`` mapping (a misspelt key is an error)."""
        from jquant.errors import settings_from_dict

        return settings_from_dict(cls, d, "qat settings")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class QATResult:
    """What :func:`train` returns.

    Attributes:
      state: the model's ``nnx.State`` with the trained kernels as QTensors (exactly the
        fake-quant forward values) and every other parameter as trained.
      losses: the training loss of every step (resumed steps included).
      evals: ``[(step, perplexity)]`` on the held-out windows.
      seconds: wall time of this call (compilation included).
      tokens_per_second: training tokens per second of this call's steps.
    """

    state: nnx.State
    losses: list[float]
    evals: list[tuple[int, float]]
    seconds: float
    tokens_per_second: float


def batch_indices(n_windows: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The windows of step ``step``: epoch ``step // (n // b)`` is a permutation of the
    windows drawn from ``(seed, epoch)``; a function of its arguments alone (resumable)."""
    per_epoch = n_windows // batch_size
    epoch, j = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n_windows)
    return perm[j * batch_size:(j + 1) * batch_size]


def _split(model, rules, init):
    """Flattened parameters, and which kernels are LSQ-trained / STE fake-quantized."""
    compiled = compile_rules(list(rules))
    graphdef, state = nnx.split(model)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    paths = [path_str(kp) for kp, _ in flat]
    treedef = jax.tree_util.tree_structure(state)
    params = {p: jnp.asarray(v, jnp.float32) for p, (_, v) in zip(paths, flat)}
    lsq, ste, qparams = {}, {}, {}
    start = dict(params)
    for p in paths:
        _, spec = match(p, compiled)
        if spec is None or not p.endswith("kernel"):
            continue
        try:
            _check_lsq(spec)
        except SpecError:
            ste[p] = spec
            continue
        lsq[p] = spec
        qt = (init or {}).get(p)
        try:
            qparams[p] = init_params(params[p], spec, qt)
        except SpecError as e:
            raise SpecError(f"{p}: {e}") from None
        if qt is not None:  # start from that result exactly: its values sit on its own grid
            start[p] = jnp.asarray(qt.dequantize(jnp.float32))
    return graphdef, treedef, paths, params, start, lsq, ste, qparams, state


def train(model, tokens, rules: Sequence, config: QATConfig = QATConfig(), *, work_dir: str | None = None,
          eval_tokens=None, init: dict | None = None, progress: bool = False,
          on_step: Callable[[int, float], None] | None = None) -> QATResult:
    """Train ``model``'s quantized linears with the quantizer in the loop (see the module doc).

    Args:
      model: a float Flax NNX model (Llama family, Gemma 3) — not modified.
      tokens: int32 ``(n, seq_len)`` training windows.
      rules: ``[(pattern, QuantSpec | None)]``: the kernels to quantize and their grids.
      config: :class:`QATConfig`.
      work_dir: checkpoints (resumed from when it holds one of the same run).
      eval_tokens: int32 ``(m, seq_len)`` held-out windows for ``eval_every``.
      init: ``{path: QTensor}`` starting points (e.g. GPTQ's result) instead of RTN's: the
        kernel starts at the QTensor's values and its scales and zeros at the QTensor's (the
        distillation target stays the float model).
      progress: a tqdm bar with the loss and tokens/s.
      on_step: called as ``on_step(step, loss)`` after every step.
    Returns:
      :class:`QATResult`.
    Raises:
      DataError: fewer windows than one batch, or not a 2-D int array.
      SpecError: a batch size that the devices do not divide.
      CheckpointError: a checkpoint in ``work_dir`` of another run (model, rules or config).
      NonFiniteError: a non-finite loss (the message names the step and the checkpoint kept).
    """
    import optax

    t_start = time.perf_counter()
    if not isinstance(config, QATConfig):
        raise SpecError(f"config must be a QATConfig, got {type(config).__name__}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"QAT tokens must be an int array (windows, seq_len), got {tokens.dtype} {tokens.shape}")
    if len(tokens) < config.batch_size:
        raise DataError(f"QAT: {len(tokens)} training window(s), fewer than one batch of {config.batch_size}")
    n_dev = jax.device_count()
    if n_dev > 1 and config.batch_size % n_dev:
        raise SpecError(f"QAT batch_size={config.batch_size} must be a multiple of the {n_dev} devices "
                        "(the batch is split across them)")
    graphdef, treedef, paths, frozen_float, params, lsq, ste, qparams, state0 = _split(model, rules, init)
    if not lsq and not ste:
        raise SpecError("QAT: no rule quantizes any kernel of the model")
    dtype = model.dtype if hasattr(model, "dtype") else jnp.float32
    trainable = {"w": params if config.train == "all" else {}, "q": qparams}
    fixed = {} if config.train == "all" else params

    def weights(tr):
        p = {**fixed, **tr["w"]}
        out = {}
        for k in paths:
            w = p[k]
            if k in lsq:
                q = tr["q"][k]
                w = lsq_fake_quant(w, q["scale"], q["zero"], lsq[k])
            elif k in ste:
                w = ste_fake_quant(w, ste[k])
            out[k] = w
        return out

    # The teacher is the float model: the same weights without the activation / KV-cache
    # quantizers a recipe may have placed (weight + activation QAT, e.g. W4A8).
    from jquant.activations import set_quantizers

    teacher_gd = nnx.split(set_quantizers(model)[0])[0]

    def logits(p, batch, gd=graphdef):
        st = jax.tree_util.tree_unflatten(treedef, [p[k].astype(dtype) for k in paths])
        return nnx.merge(gd, st)(batch)[0].astype(jnp.float32)

    def loss_fn(tr, batch):
        lq = jax.nn.log_softmax(logits(weights(tr), batch), -1)
        if config.objective == "ce":
            return -jnp.mean(jnp.take_along_axis(lq[:, :-1], batch[:, 1:, None], -1))
        lr_ = jax.lax.stop_gradient(jax.nn.log_softmax(logits(frozen_float, batch, teacher_gd), -1))
        return jnp.mean(jnp.sum(jnp.exp(lr_) * (lr_ - lq), -1))

    def schedule(peak):
        if config.warmup_steps:
            return optax.warmup_cosine_decay_schedule(0.0, peak, config.warmup_steps, config.steps)
        return optax.cosine_decay_schedule(peak, config.steps)

    decay_mask = {"w": {k: k.endswith("kernel") for k in trainable["w"]},
                  "q": jax.tree.map(lambda _: False, qparams)}
    opt = optax.multi_transform(
        {"w": optax.adamw(schedule(config.learning_rate), weight_decay=config.weight_decay, mask=decay_mask),
         "q": optax.adam(schedule(config.scale_learning_rate))},
        {"w": jax.tree.map(lambda _: "w", trainable["w"]), "q": jax.tree.map(lambda _: "q", qparams)})
    if config.clip_norm is not None:
        opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
    opt_state = opt.init(trainable)

    mesh = None
    if n_dev > 1:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

        mesh = Mesh(np.array(jax.devices()), ("data",))
        replicated = NamedSharding(mesh, P())
        trainable, opt_state, fixed, frozen_float = jax.device_put((trainable, opt_state, fixed, frozen_float),
                                                                   replicated)
        data_sharding = NamedSharding(mesh, P("data"))

    @jax.jit
    def step(tr, os_, batch):
        loss, g = jax.value_and_grad(loss_fn)(tr, batch)
        upd, os_ = opt.update(g, os_, tr)
        return optax.apply_updates(tr, upd), os_, loss

    @jax.jit
    def eval_nll(tr, batch):
        lq = jax.nn.log_softmax(logits(weights(tr), batch), -1)
        return -jnp.mean(jnp.take_along_axis(lq[:, :-1], batch[:, 1:, None], -1))

    run_key = _run_key(config, paths, params, lsq, ste, tokens)
    start, losses, evals = 0, [], []
    if work_dir is not None:
        restored = train_checkpoint.restore(work_dir, "qat", run_key, (trainable, opt_state), "QAT")
        if restored is not None:
            (trainable, opt_state), start, losses, evals = restored
            if mesh is not None:
                trainable, opt_state = jax.device_put((trainable, opt_state), replicated)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="QAT", unit="step", disable=None)
    t_steps, n_tokens = time.perf_counter(), 0
    last_good = start if train_checkpoint.exists(work_dir, "qat") else None
    for i in range(start, config.steps):
        batch = jnp.asarray(tokens[batch_indices(len(tokens), config.batch_size, i, config.seed)], jnp.int32)
        if mesh is not None:
            batch = jax.device_put(batch, data_sharding)
        new_tr, new_os, loss = step(trainable, opt_state, batch)
        loss = float(loss)
        if not np.isfinite(loss):
            if last_good is not None:
                kept = f"the last good checkpoint (step {last_good}) is kept in {work_dir}"
            elif work_dir is not None:
                kept = f"no checkpoint yet in {work_dir} (checkpoint_every={config.checkpoint_every})"
            else:
                kept = "no checkpoint was written (pass work_dir)"
            raise NonFiniteError(f"QAT step {i}: the loss is {loss} (learning rate {config.learning_rate} / "
                                 f"{config.scale_learning_rate} too high?); training stopped, {kept}")
        trainable, opt_state = new_tr, new_os
        losses.append(loss)
        n_tokens += batch.size
        if config.eval_every and eval_tokens is not None and (i + 1) % config.eval_every == 0:
            ev = np.asarray(eval_tokens, np.int32)
            nll = float(np.mean([float(eval_nll(trainable, jnp.asarray(ev[j:j + config.batch_size])))
                                 for j in range(0, len(ev) - config.batch_size + 1, config.batch_size)]))
            evals.append((i + 1, float(np.exp(nll))))
        if on_step is not None:
            on_step(i, loss)
        if bar is not None:
            bar.set_postfix_str(f"loss {loss:.4f}, {n_tokens / (time.perf_counter() - t_steps):.0f} tok/s")
            bar.update(1)
        done = i + 1 == config.steps
        if work_dir is not None and (done or (config.checkpoint_every and (i + 1) % config.checkpoint_every == 0)):
            train_checkpoint.save(work_dir, "qat", run_key, (trainable, opt_state), i + 1, losses, evals)
            last_good = i + 1
    if bar is not None:
        bar.close()
    t_train = time.perf_counter() - t_steps
    qstate = convert(state0, paths, treedef, {**fixed, **trainable["w"]}, trainable["q"], lsq, ste)
    return QATResult(qstate, losses, evals, time.perf_counter() - t_start,
                     n_tokens / t_train if t_train > 0 and n_tokens else 0.0)


def convert(state0, paths, treedef, params, qparams, lsq, ste):
    """The trained parameters as an ``nnx.State``: LSQ kernels as their QTensors (exactly the
    forward values), STE kernels quantized by their method, the rest as trained."""
    from jquant.quantizers import quantize_weight

    leaves0 = jax.tree_util.tree_leaves(state0)
    out = []
    for k, old in zip(paths, leaves0):
        if k in lsq:  # the float32 trained weight: the codes are computed as the forward computed them
            q = qparams[k]
            out.append(to_qtensor(jnp.asarray(jax.device_get(params[k])), jax.device_get(q["scale"]),
                                  None if q["zero"] is None else jax.device_get(q["zero"]), lsq[k]))
            continue
        w = jax.device_get(params[k]).astype(np.asarray(old).dtype)
        if k in ste:
            out.append(quantize_weight(jnp.asarray(w), ste[k], {}, path=k)[0])
        else:
            out.append(jnp.asarray(w))
    return jax.tree_util.tree_unflatten(treedef, out)


def _run_key(config, paths, params, lsq, ste, tokens) -> str:
    """What a checkpoint must match to be resumed: the settings, the quantized kernels and
    their specs, the parameter shapes and the training windows."""
    import hashlib

    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True, default=str).encode())
    for k in paths:
        h.update(f"{k}{tuple(params[k].shape)}{lsq.get(k) or ste.get(k)}".encode())
    h.update(np.ascontiguousarray(tokens).tobytes())
    return h.hexdigest()
