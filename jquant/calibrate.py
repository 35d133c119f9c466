"""The layer-wise calibration pipeline every data-driven quantizer plugs into.

Calibration tokens go through the embedding; then, for each decoder block in turn:

1. the block's linears are solved **true-sequentially** in the order
   ``q/k/v → o → gate/up → down`` (the block's ``LINEAR_GROUPS``): the block runs in
   stages, stage ``k`` carrying the calibration set from the input of group ``k − 1`` to the
   input of group ``k`` with the groups before it already quantized in place, and folding
   that input into the statistics the group's methods declare (GPTQ's Hessian
   ``H = 2·XᵀX/n``, per-channel activation magnitudes, ...; see
   :mod:`jquant.quantizers.stats`) in the same jitted call; each linear is then quantized by
   the method its rule names, through the method registry (data-free methods such as
   ``rtn`` and ``hqq`` need no statistics). Every part of the block runs once per
   calibration window: the whole sequential solve costs one forward pass;
2. the last stage's output, computed with the *quantized* block, is the next block's input.

Only one block's weights, statistics and activations are live at a time (the hidden
states of the calibration set, and between stages one intermediate activation, are the
working set, kept in memory). Every ``checkpoint_every`` seconds the finished blocks'
parameters and the hidden states are written to ``work_dir`` atomically; a job killed at
any point and started again with the same arguments continues after the last resume point
and gives bit-identical results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jquant import _xla_cpu, checkpoint, distributed
from jquant._atomic import write_json, write_npy_parts
from jquant.errors import CheckpointError, DataError, NonFiniteError, SpecError, at
from jquant.models.llama import DecoderBlock
from jquant.qtensor import is_qtensor
from jquant.quantizers import gptq, registry, rtn
from jquant.quantizers.stats import Collector
from jquant.spec import Rule, compile_rules, match, path_str
from jquant.tree import quantize_tree

# Linears of a Llama block, in true-sequential order, with where AWQ folds its scales
# (the model's own table; the pipeline reads it from the model it is given).
BLOCK_STRUCTURE = DecoderBlock.LINEAR_GROUPS
SEQUENTIAL_GROUPS = tuple(names for names, _ in BLOCK_STRUCTURE)
_BLOCK_LINEAR = re.compile(r"^layers/\d+/(" + "|".join(n for g in SEQUENTIAL_GROUPS for n in g) + r")/kernel$")


@dataclasses.dataclass
class LayerLog:
    path: str
    method: str
    seconds: float
    loss: float | None = None  # the method's own loss (GPTQ: Σ(w−q)²/U_jj²/2; HQQ: mean |w − q|)
    recon: float | None = None  # tr(ΔWᵀ H ΔW)/2 = ‖X(W−Q)‖²/n on the calibration inputs
    recon_rtn: float | None = None  # the same for RTN with the same grid, for comparison
    damp: float | None = None
    extra: dict | None = None  # method-specific numbers (AWQ: the chosen α and its search losses)


def _fingerprint(tokens: np.ndarray, rules: Sequence[Rule], extra: str) -> str:
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(tokens).tobytes())
    h.update(repr([(p, None if s is None else s.to_dict()) for p, s in rules]).encode())
    h.update(extra.encode())
    return h.hexdigest()


def _replace(state, values: dict):
    """``state`` with the leaves at the given paths replaced."""
    return jax.tree_util.tree_map_with_path(lambda kp, x: values.get(path_str(kp), x), state, is_leaf=is_qtensor)


def _leaf(state, path: str):
    for kp, x in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_qtensor)[0]:
        if path_str(kp) == path:
            return x
    raise KeyError(path)


def quantize_model(model, tokens, rules: Sequence[Rule], *, work_dir: str | None = None, batch_size: int = 8,
                   progress: bool = True, model_id: str = "", checkpoint_every: float = 60.0,
                   on_layer: Callable[[LayerLog], None] | None = None, timings: dict | None = None,
                   mesh=None, read_block: Callable[[int], nnx.State] | None = None,
                   on_block: Callable[[int, nnx.State], None] | None = None):
    """Quantize a Llama-family NNX model by ``rules``, calibrating data-driven methods on ``tokens``.

    Each block runs once over the calibration set, in the stages of
    :meth:`~jquant.models.DecoderBlock.calibration_stage`: stage ``k`` computes the input of
    linear group ``k`` from the previous stage's output (kept in memory) with groups ``< k``
    already quantized, and folds it into the group's statistics in the same jitted call.

    Args:
      model: a :class:`jquant.models.Llama` (left unchanged).
      tokens: int32 ``(n, seq_len)`` calibration windows.
      rules: ``(pattern, QuantSpec | None)``; each block linear is quantized by the method its
        rule names (:mod:`jquant.quantizers`), given the input statistics the method declares;
        other leaves (embedding, head, norms) go through :func:`jquant.quantize_tree` and
        must use data-free methods (a SpecError says so before any work).
      work_dir: where the resume point goes; an unfinished job in it is resumed.
      batch_size: calibration windows per forward pass.
      model_id: a string naming the model (part of the job's fingerprint for resumption).
      checkpoint_every: seconds of work between resume points in ``work_dir`` (the finished
        blocks' parameters and the hidden states after them, written atomically); 0 writes
        one after every block. A killed job loses at most this much work.
      timings: if a dict, the wall seconds of each phase are added to it: ``embed``,
        ``forward`` (the stages with their statistics), ``prepare`` (e.g. AWQ's search),
        ``solve`` (the methods), ``baseline`` (the logged reconstruction errors),
        ``checkpoint`` (resume points).
      mesh: a ``jax.sharding.Mesh`` with axes ``("data", "model")``
        (:func:`jquant.distributed.make_mesh`), or None for one device. Each calibration
        batch is split over ``data`` (``batch_size`` must divide by its size) and every
        statistic is reduced over it with ``psum`` inside ``shard_map``; methods that split
        their solve (GPTQ's output columns) use every device of the mesh. The result equals
        the single-device one up to float32 summation order.
      read_block: streaming in: ``read_block(i)`` returns block ``i``'s float parameters
        (``nnx.State``), read when the block starts; ``model``'s blocks may then be abstract
        (:func:`jquant.models.hf.stream_hf` gives both).
      on_block: streaming out: ``on_block(i, state)`` receives each quantized block when it
        is finished (in order; after a resume, the finished blocks first, read back from
        ``work_dir``), and the block is not kept: the returned state's block leaves are
        left as ``model`` had them. With both, memory holds about one block's working set
        whatever the depth.
    Returns:
      ``(state, logs)``: the quantized ``nnx.State`` (``nnx.update`` a model with it) and
      one :class:`LayerLog` per quantized block linear.
    Raises:
      DataError: non-integer, empty or out-of-vocabulary tokens, a bad batch size.
      SpecError: a data-driven rule outside the block linears.
      CheckpointError: ``work_dir`` holds an unfinished job with other arguments.
      NonFiniteError: NaN/Inf in the calibration statistics or the block outputs.
    """
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"calibration tokens must be integer token ids, got dtype {tokens.dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    data_size = mesh.shape.get("data", 1) if mesh is not None else 1
    if batch_size % data_size:
        raise DataError(f"batch_size={batch_size} does not divide over the {data_size} devices of the mesh's 'data' "
                        f"axis; use a multiple of {data_size}")
    if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, (int, float, np.integer, np.floating)) \
            or not checkpoint_every >= 0:
        raise DataError(f"checkpoint_every must be a number of seconds >= 0, got {checkpoint_every!r}")
    tokens = tokens.astype(np.int32)
    if len(tokens) % batch_size % data_size:
        raise DataError(f"the last calibration batch holds {len(tokens) % batch_size} windows, which do not divide over "
                        f"the {data_size} devices of the mesh's 'data' axis; use a number of windows that is a multiple "
                        f"of {data_size}")
    clock = _Clock(timings)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise DataError(f"calibration tokens must be a non-empty (n, seq_len) array, got shape {tokens.shape}")
    config = model.config
    if tokens.max() >= config.vocab_size or tokens.min() < 0:
        raise DataError(f"calibration token ids outside the vocabulary of {config.vocab_size}")
    compiled = compile_rules(rules)
    graphdef, state = nnx.split(model)
    _check_data_driven_leaves(state, compiled)
    n_layers = len(model.layers)
    groups = type(model.layers[0]).LINEAR_GROUPS
    logs: list[LayerLog] = []

    shapes = [(path_str(kp), tuple(x.shape), str(x.dtype)) for kp, x in jax.tree_util.tree_flatten_with_path(state)[0]]
    fp = _fingerprint(tokens, rules, f"{model_id}|{batch_size}|{n_layers}|{shapes}")
    done = -1
    resume = _Resume(work_dir, fp) if work_dir is not None else None
    if resume is not None:
        done, logs = resume.load()

    # Stage functions, jitted once per (block kind, stage, statistics): the blocks of a model
    # may differ in static settings (Gemma 3's sliding-window and global layers), so each
    # block runs with its own graph definition.
    stage_fns: dict = {}

    def stage_fn(block_gd, k: int, names: tuple[str, ...]):
        """Jitted ``(block state, carry, stats) -> (carry, stats)``: stage ``k`` of a block of
        graph ``block_gd``, folding its output's statistics ``names``."""
        if (block_gd, k, names) not in stage_fns:
            coll = Collector(names)
            axis = "data" if data_size > 1 else None

            def f(bstate, carry, st):
                carry, x = nnx.merge(block_gd, bstate).calibration_stage(k, carry)
                return carry, (coll.update(st, x, axis) if names else st)

            if axis is None:
                stage_fns[(block_gd, k, names)] = jax.jit(f)
            else:  # batch split over 'data', statistics psum-reduced, parameters replicated
                from jax.sharding import PartitionSpec as P

                stage_fns[(block_gd, k, names)] = jax.jit(jax.shard_map(
                    f, mesh=mesh, in_specs=(P(), P("data"), P()), out_specs=(P("data"), P()), axis_names={"data"}))
        return stage_fns[(block_gd, k, names)]

    def finalize(coll: Collector, st, where: str) -> dict:
        stats = coll.finalize(st)
        for k, v in stats.items():
            if not bool(jnp.all(jnp.isfinite(v))):
                raise NonFiniteError(at(where, f"calibration statistic {k!r} holds NaN/Inf "
                                               "(NaN/Inf in the calibration activations)"))
        return stats

    # The parameters are an argument, not a closure: closed-over arrays are compiled in as
    # constants (the whole model, held twice). Blocks not in memory (streaming) are scalar
    # placeholders: the embedding never reads them.
    embed = jax.jit(lambda st, t: nnx.merge(graphdef, st).embed(t))
    embed_state = jax.tree_util.tree_map(
        lambda x: jnp.zeros((), x.dtype) if isinstance(x, jax.ShapeDtypeStruct) else x, state)

    batches = [slice(i, i + batch_size) for i in range(0, len(tokens), batch_size)]
    if done >= 0:
        hidden = [jnp.asarray(x) for x in resume.hidden(batches)]
    else:
        with clock("embed"):
            hidden = [embed(embed_state, jnp.asarray(tokens[b])) for b in batches]  # one (batch, seq, hidden) per batch
            jax.block_until_ready(hidden)

    if data_size > 1:  # the calibration set split over 'data' (every process holds all of it)
        from jax.sharding import NamedSharding, PartitionSpec as P

        replicated = NamedSharding(mesh, P())
        hidden = [distributed.put(h, NamedSharding(mesh, P("data"))) for h in hidden]

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_layers, initial=done + 1, desc="calibrate", unit="block", disable=None)
    block_states = {}
    last_save = time.perf_counter()
    for i in range(n_layers):
        prefix = f"layers/{i}/"
        if i <= done:  # finished before: take its saved parameters
            finished = resume.block(i, nnx.split(model.layers[i])[1])
            if on_block is not None:
                on_block(i, finished)
            else:
                block_states[i] = finished
            continue
        t_block = time.perf_counter()
        block_gd, bstate = nnx.split(model.layers[i])
        if read_block is not None:
            bstate = read_block(i)
        if data_size > 1:  # once per block, not once per batch
            bstate = distributed.put(bstate, replicated)

        def collect(bstate, leader: str, names) -> dict:
            """The statistics ``names`` of ``leader``'s input over the calibration set, running
            the block's stages up to it from the block input (for ``prepare`` hooks)."""
            k = next(j for j, (g, _) in enumerate(groups) if leader in g)
            names = tuple(sorted(set(names)))
            coll = Collector(names)
            st = coll.init(_leaf(bstate, f"{leader}/kernel").shape[0])
            for h in hidden:
                carry = {"h": h}
                for j in range(k):
                    carry, _ = stage_fn(block_gd, j, ())(bstate, carry, ())
                _, st = stage_fn(block_gd, k, names)(bstate, carry, st)
            return finalize(coll, st, f"{prefix}{leader}")

        block_specs = {}
        for names, _ in groups:
            for name in names:
                _, spec = match(f"{prefix}{name}/kernel", compiled)
                if spec is not None:
                    block_specs[name] = spec
        prepared = {}  # block-level transforms (AWQ's scales) on the float block, before any quantization
        for mname in sorted({sp.method for sp in block_specs.values()}):
            m = registry.get(mname)
            if m.prepare is not None:
                with clock("prepare"):
                    bstate, pinfo = m.prepare(bstate, groups, block_specs, collect, _replace, _leaf, prefix=prefix)
                for names, _ in groups:
                    if names[0] in pinfo:
                        for n in names:
                            prepared[n] = {f"{mname}": pinfo[names[0]]}
        carries = [{"h": h} for h in hidden]
        del hidden
        for k, (names, _) in enumerate(groups):
            specs = {n: block_specs[n] for n in names if n in block_specs}
            needed = tuple(sorted({n for sp in specs.values() for n in registry.get(sp.method).stats_for(sp)}))
            coll = Collector(needed)
            st = coll.init(_leaf(bstate, f"{names[0]}/kernel").shape[0]) if needed else ()
            f = stage_fn(block_gd, k, needed)
            with clock("forward"):
                for j, carry in enumerate(carries):
                    carries[j], st = f(bstate, carry, st)
                stats = finalize(coll, st, f"{prefix}{names[0]}") if needed else {}
            new = {}
            for name, spec in specs.items():
                new[f"{name}/kernel"] = _quantize_linear(bstate, name, spec, stats, prefix, prepared.get(name), logs,
                                                         on_layer, clock, mesh)
            bstate = _replace(bstate, new)
            if data_size > 1:  # the quantized linears (on this process) back onto the mesh
                bstate = distributed.put(bstate, replicated)
            _xla_cpu.trim_host_memory()  # the stage's freed temporaries back to the system
        # The quantized block's outputs are the next block's inputs.
        f = stage_fn(block_gd, len(groups), ())
        with clock("forward"):
            hidden = []
            for j in range(len(carries)):  # each batch's carry freed as its output arrives: the
                hidden.append(f(bstate, carries[j], ())[0]["h"])  # peak is the carries, not carries + outputs
                carries[j] = None
            del carries
            _xla_cpu.trim_host_memory()
            if not all(bool(jnp.all(jnp.isfinite(h))) for h in hidden):
                raise NonFiniteError(f"{prefix[:-1]}: block outputs hold NaN/Inf after quantization")
        block_states[i] = distributed.to_host(bstate)  # this process's copy (the mesh is for the work)
        if resume is not None and distributed.process_zero_says(
                time.perf_counter() - last_save >= checkpoint_every or i == n_layers - 1):
            with clock("checkpoint"):
                resume.save(i, block_states, hidden, logs)
            last_save = time.perf_counter()
        if on_block is not None:  # handed over, not kept (written first, so a resume point can name it)
            if resume is not None:
                with clock("checkpoint"):
                    resume.save_blocks(block_states)
            on_block(i, block_states.pop(i))
        if bar is not None:
            block_logs = [e for e in logs if e.path.startswith(prefix)]
            worst = max((e.recon / e.recon_rtn for e in block_logs if e.recon and e.recon_rtn), default=float("nan"))
            bar.set_postfix_str(f"block {i} {time.perf_counter() - t_block:.1f}s worst recon/rtn {worst:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()

    # Assemble: quantized blocks, then the remaining (non-block) leaves by the data-free rules.
    out = state
    repl = {}
    for i, bst in block_states.items():
        for kp, x in jax.tree_util.tree_flatten_with_path(bst, is_leaf=is_qtensor)[0]:
            repl[f"layers/{i}/{path_str(kp)}"] = x
    out = _replace(out, repl)
    # Block linears left in float by their rule stay so; every other leaf a rule names
    # (embedding, head, norms) is quantized by its data-free method.
    rest_rules = [(_BLOCK_LINEAR.pattern, None)] + list(rules)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rules for block linears match nothing here
        out = quantize_tree(out, rest_rules)
    if resume is not None:
        resume.close()
    return out, logs


def _quantize_linear(bstate, name: str, spec, stats: dict, prefix: str, prepared: dict | None,
                     logs: list[LayerLog], on_layer, clock, mesh=None) -> object:
    """Quantize one block linear through the method registry and log it."""
    path = f"{prefix}{name}/kernel"
    # This process's copies (the block's parameters and statistics live on the mesh):
    # single-device work (logging) must not mix them with arrays of other placements.
    w, stats = distributed.to_host((_leaf(bstate, f"{name}/kernel"), stats))
    t0 = time.perf_counter()
    entry = LayerLog(path=path, method=spec.method, seconds=0.0)
    with clock("solve"):
        qt, info = registry.quantize_weight(w, spec, stats, path=path, prepared=True, mesh=mesh)
        qt = distributed.to_host(qt)  # a solve split over several processes: every one holds the result
        jax.block_until_ready(qt.codes)
    entry.loss, entry.damp = info.get("loss"), info.get("damp")
    entry.extra = prepared
    entry.seconds = time.perf_counter() - t0
    H = stats.get("hessian")
    if H is not None:
        with clock("baseline"):
            entry.recon = gptq.reconstruction_error(w, qt, H)
            # RTN on the same grid as the baseline, where RTN can take the format and the
            # weight is the original one (after AWQ's folding it is not: its own search
            # losses, in ``extra``, compare with RTN instead).
            transformed = any(isinstance(v, dict) for v in (prepared or {}).values())
            if spec.format in registry.get("rtn").formats and not transformed:
                rspec = dataclasses.replace(spec, method="rtn", options=())
                entry.recon_rtn = gptq.reconstruction_error(w, rtn.quantize(w, rspec, path=path), H)
    logs.append(entry)
    if on_layer is not None:
        on_layer(entry)
    return qt


class _Clock:
    """Adds the wall seconds of ``with clock(phase):`` blocks to ``timings[phase]`` (a no-op
    without a dict)."""

    def __init__(self, timings: dict | None):
        self.timings = timings

    @contextlib.contextmanager
    def __call__(self, phase: str):
        if self.timings is None:
            yield
            return
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[phase] = self.timings.get(phase, 0.0) + time.perf_counter() - t


class _Resume:
    """A calibration job's resume point in ``work_dir``.

    ``blocks/NNN`` holds each finished block's parameters (a checksummed checkpoint),
    ``hidden_NNN.npy`` the calibration set's hidden states after block ``NNN`` (raw bytes of
    the model's dtype, so bfloat16 survives), and ``progress.json`` (the job's fingerprint,
    the last finished block ``done``, the hidden-state file with its dtype and SHA-256, the
    logs so far) is written last, atomically: until it names the new point the old one
    stands whole, so a kill at any moment resumes from a consistent point.
    """

    def __init__(self, work_dir: str, fingerprint: str):
        self.dir, self.fp = work_dir, fingerprint
        self.progress = os.path.join(work_dir, "progress.json")
        self.saved: set[int] = set()
        self.meta: dict = {}
        self.lock = None
        if distributed.is_writer():
            os.makedirs(work_dir, exist_ok=True)
            self.lock = _lock(work_dir)
            os.makedirs(os.path.join(work_dir, "blocks"), exist_ok=True)

    def close(self) -> None:
        if self.lock is not None:
            self.lock.close()  # releases the lock
            self.lock = None

    def load(self) -> tuple[int, list[LayerLog]]:
        """The last finished block and the logs so far (``-1, []`` for a new job). In a
        multi-process run every process reads the files process 0 wrote, and all must see
        the same point (``work_dir`` on a filesystem they share)."""
        distributed.barrier("jquant: resume point ready")  # process 0 has made work_dir and finished writing
        try:
            done, logs, err = *self._load(), None
        except CheckpointError as e:
            done, logs, err = -2, [], e
        seen = distributed.every_process(done)
        if err is not None:
            raise err
        if len(set(seen)) > 1:
            bad = [p for p, d in enumerate(seen) if d == -2]
            if bad:
                raise CheckpointError(f"{self.dir}: process(es) {bad} could not read the resume point (see their "
                                      "logs); delete the directory to start again")
            raise CheckpointError(f"{self.dir}: the processes see different resume points (last finished block per "
                                  f"process: {seen}); the work directory must be on a filesystem every process "
                                  "shares (a network or cluster filesystem), with the same path")
        return done, logs

    def _load(self) -> tuple[int, list[LayerLog]]:
        if not os.path.isfile(self.progress):
            return -1, []
        try:
            with open(self.progress) as fh:
                prog = json.load(fh)
            done, logs = int(prog["done"]), [LayerLog(**e) for e in prog.get("logs", [])]
            self.meta = {k: prog["hidden"][k] for k in ("file", "dtype", "sha256")}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{self.progress}: unreadable resume point ({type(e).__name__}: {e}); delete "
                                  f"{self.dir} to start again") from e
        if prog.get("fingerprint") != self.fp:
            raise CheckpointError(f"{self.dir}: holds an unfinished job with other arguments (model, rules, "
                                  "calibration tokens or batch size); use another work_dir or delete it")
        self.saved = set(range(done + 1))
        return done, logs

    def hidden(self, batches) -> list[np.ndarray]:
        path = os.path.join(self.dir, os.path.basename(self.meta["file"]))
        try:
            with open(path, "rb") as fh:
                raw = fh.read()
        except OSError as e:
            raise CheckpointError(f"{path}: the resume point's hidden states cannot be read ({e}); delete "
                                  f"{self.dir} to start again") from e
        if hashlib.sha256(raw).hexdigest() != self.meta["sha256"]:
            raise CheckpointError(f"{path}: the hidden states do not match the checksum in {self.progress} "
                                  f"(corrupted); delete {self.dir} to start again")
        import io

        arr = np.load(io.BytesIO(raw))
        dt = jnp.dtype(self.meta["dtype"])
        if arr.dtype != dt:
            arr = arr.view(dt)
        return [arr[b] for b in batches]

    def block(self, i: int, target):
        return checkpoint.restore(os.path.join(self.dir, "blocks", f"{i:03d}"), target=target)

    def save_blocks(self, block_states: dict) -> None:
        """Write the finished blocks not written yet (on their own they are no resume point:
        ``progress.json`` says which blocks a resume takes)."""
        if not distributed.is_writer():
            return
        for i in sorted(block_states):
            if i not in self.saved:
                checkpoint.save(os.path.join(self.dir, "blocks", f"{i:03d}"), block_states[i], overwrite=True)
                self.saved.add(i)

    def save(self, done: int, block_states: dict, hidden: list, logs: list[LayerLog]) -> None:
        hidden = distributed.to_host(hidden)  # (a collective, before only process 0 goes on)
        if distributed.is_writer():
            self._write(done, block_states, hidden, logs)
        distributed.barrier("jquant: resume point written")  # no process reads it before it is whole

    def _write(self, done: int, block_states: dict, hidden: list, logs: list[LayerLog]) -> None:
        self.save_blocks(block_states)
        if not all(i in self.saved for i in range(done + 1)):
            raise CheckpointError(f"{self.dir}: blocks {sorted(set(range(done + 1)) - self.saved)} were never written")
        name = f"hidden_{done:03d}.npy"
        # batch by batch, hashed as written: no concatenated copy, no second read
        digest = write_npy_parts(os.path.join(self.dir, name), hidden)
        write_json(self.progress, {"fingerprint": self.fp, "done": done,
                                   "hidden": {"file": name, "dtype": np.asarray(hidden[0]).dtype.name,
                                              "sha256": digest},
                                   "logs": [dataclasses.asdict(e) for e in logs]})
        for f in os.listdir(self.dir):  # earlier resume points' hidden states
            if f.startswith("hidden") and f != name:
                try:
                    os.remove(os.path.join(self.dir, f))
                except OSError:
                    pass


def _lock(work_dir: str):
    """An exclusive lock on ``work_dir/lock`` for as long as the returned file stays open, or
    CheckpointError when another job holds it (two jobs writing one resume point would
    corrupt each other's work)."""
    import fcntl

    path = os.path.join(work_dir, "lock")
    fh = open(path, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.seek(0)
        holder = fh.read().strip() or "another process"
        fh.close()
        raise CheckpointError(f"{work_dir}: another calibration job ({holder}) is running in this work directory; "
                              "wait for it to finish, or give this job another work_dir / --out") from None
    fh.seek(0)
    fh.truncate()
    fh.write(f"pid {os.getpid()} on {os.uname().nodename}")
    fh.flush()
    return fh


def _check_data_driven_leaves(state, compiled) -> None:
    """Refuse, before any work, a data-driven rule on a leaf the pipeline collects no statistics for."""
    for kp, _ in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_qtensor)[0]:
        path = path_str(kp)
        if _BLOCK_LINEAR.search(path):
            continue
        i, spec = match(path, compiled)
        if registry.needs_data(spec):
            raise SpecError(at(path, f"rule {i} gives method {spec.method!r}, which needs calibration statistics; the "
                                     "pipeline collects them for the linears of the decoder blocks only ("
                                     f"{', '.join(n.split('/')[1] for g in SEQUENTIAL_GROUPS for n in g)}). "
                                     "Quantize this leaf with a data-free method (rtn, hqq) or keep it in float (None)"))


def self_generated_tokens(model, *, n: int, seq_len: int, seed: int = 0, batch_size: int = 128,
                          temperature: float = 1.0, first_id: int = 0, bos: int | None = None,
                          progress: bool = False) -> np.ndarray:
    """``n`` windows of text the float model writes itself, ``(n, seq_len)`` int32.

    Each window starts from one token drawn uniformly from ``[first_id, vocab)`` (pass the
    number of special tokens so none starts a window) and continues by sampling at
    ``temperature``: text from the model's own distribution, not from one domain, in the
    spirit of LLM-QAT's data-free calibration (arXiv:2305.17888). Deterministic given ``seed``.
    With ``bos``, each window starts with it, then the random token.
    """
    from jquant.models import generate

    vocab = model.config.vocab_size
    if not 0 <= first_id < vocab:
        raise DataError(f"first_id={first_id} outside the vocabulary of {vocab}")
    rng = np.random.default_rng(seed)
    out = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="generate calibration text", unit="window", disable=None)
    for b in range(0, n, batch_size):
        m = min(batch_size, n - b)
        prompt = rng.integers(first_id, vocab, size=(m, 1)).astype(np.int32)
        if bos is not None:
            prompt = np.concatenate([np.full((m, 1), bos, np.int32), prompt], axis=1)
        toks = generate(model, prompt, seq_len - prompt.shape[1], key=jax.random.key(seed * 100003 + b),
                        temperature=temperature)
        out.append(np.asarray(toks, np.int32))
        if bar is not None:
            bar.update(m)
    if bar is not None:
        bar.close()
    return np.concatenate(out)


def calibration_tokens(tokenizer, *, text: str = "pydoc", n: int = 128, seq_len: int = 512, seed: int = 0,
                       vocab_size: int | None = None, model=None, progress: bool = False) -> np.ndarray:
    """``n`` calibration windows from a text source (see :mod:`jquant.data`).

    ``text="selfgen"`` has the float ``model`` write them (:func:`self_generated_tokens`);
    ``"a+b+…"`` mixes sources, ``n`` split evenly (the first ones take the remainder). For
    ``pydoc`` only the calibration part is used; its tail is held out for evaluation. When the
    tokenizer puts ``<bos>`` before a text (:func:`jquant.data.bos_token`: Gemma, Llama), every
    window starts with it, as every text the model was trained on did.
    """
    from jquant import data

    parts = text.split("+")
    if len(parts) > 1:
        counts = [n // len(parts) + (i < n % len(parts)) for i in range(len(parts))]
        return np.concatenate([calibration_tokens(tokenizer, text=p, n=c, seq_len=seq_len, seed=seed,
                                                  vocab_size=vocab_size, model=model, progress=progress)
                               for p, c in zip(parts, counts) if c])
    if text == "selfgen":
        if model is None:
            raise DataError("'selfgen' calibration needs the model to generate from")
        special = [int(i) for i in getattr(tokenizer, "all_special_ids", []) or []]
        first = max(special) + 1 if special and max(special) < 1000 else 0
        return self_generated_tokens(model, n=n, seq_len=seq_len, seed=seed, first_id=first,
                                     bos=data.bos_token(tokenizer), progress=progress)
    src = data.load_text(text)
    if text == "pydoc":
        src = data.split_text(src)[0]  # the tail is held out for evaluation
    toks = data.tokenize(tokenizer, src, vocab_size)
    return data.calibration_windows(toks, n, seq_len, seed, bos=data.bos_token(tokenizer))
