"""The layer-wise calibration pipeline every data-driven quantizer plugs into.

Calibration tokens go through the embedding; then, for each decoder block in turn:

1. the block's linears are solved **true-sequentially** in the order
   ``q/k/v → o → gate/up → down``: for each group the block runs on the current hidden
   states with the linears already quantized in place, the inputs of the group are
   captured and folded into the statistics the group's methods declare (GPTQ's Hessian
   ``H = 2·XᵀX/n``, per-channel activation magnitudes, ...; see
   :mod:`jquant.quantizers.stats`), collected once for linears that share the input, and
   each linear is quantized by the method its rule names, through the method registry
   (data-free methods such as ``rtn`` and ``hqq`` need no statistics);
2. the block's *quantized* outputs become the next block's inputs.

Only one block's weights, Hessians and activations are live at a time (the hidden
states of the calibration set are the working set). After every block its quantized
parameters and the hidden states are written to ``work_dir`` atomically; a job killed at
any point and started again with the same arguments continues after the last finished
block and gives bit-identical results.
"""

from __future__ import annotations

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

from jquant import checkpoint
from jquant._atomic import write_json, write_npy
from jquant.errors import CheckpointError, DataError, NonFiniteError, SpecError, at
from jquant.qtensor import is_qtensor
from jquant.quantizers import gptq, registry, rtn
from jquant.quantizers.stats import Collector
from jquant.spec import Rule, compile_rules, match, path_str
from jquant.tree import quantize_tree

# Linears of a Llama block, in true-sequential order; a group shares one input. With each
# group, the operation that produces its input, where a per-input-channel scale can be folded
# (AWQ): a norm weight ("scale") or the output columns of a kernel ("columns").
BLOCK_STRUCTURE = (
    (("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj"), ("scale", "input_layernorm/scale")),
    (("self_attn/o_proj",), ("columns", "self_attn/v_proj/kernel")),
    (("mlp/gate_proj", "mlp/up_proj"), ("scale", "post_attention_layernorm/scale")),
    (("mlp/down_proj",), ("columns", "mlp/up_proj/kernel")),
)
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
                   progress: bool = True, model_id: str = "",
                   on_layer: Callable[[LayerLog], None] | None = None):
    """Quantize a Llama-family NNX model by ``rules``, calibrating data-driven methods on ``tokens``.

    Args:
      model: a :class:`jquant.models.Llama` (left unchanged).
      tokens: int32 ``(n, seq_len)`` calibration windows.
      rules: ``(pattern, QuantSpec | None)``; each block linear is quantized by the method its
        rule names (:mod:`jquant.quantizers`), given the input statistics the method declares;
        other leaves (embedding, head, norms) go through :func:`jquant.quantize_tree` and
        must use data-free methods (a SpecError says so before any work).
      work_dir: where per-block results go; an unfinished job in it is resumed.
      batch_size: calibration windows per forward pass.
      model_id: a string naming the model (part of the job's fingerprint for resumption).
    Returns:
      ``(state, logs)``: the quantized ``nnx.State`` (``nnx.update`` a model with it) and
      one :class:`LayerLog` per quantized block linear.
    """
    tokens = np.asarray(tokens)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"calibration tokens must be integer token ids, got dtype {tokens.dtype}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    tokens = tokens.astype(np.int32)
    if tokens.ndim != 2 or tokens.shape[0] == 0:
        raise DataError(f"calibration tokens must be a non-empty (n, seq_len) array, got shape {tokens.shape}")
    config = model.config
    if tokens.max() >= config.vocab_size or tokens.min() < 0:
        raise DataError(f"calibration token ids outside the vocabulary of {config.vocab_size}")
    compiled = compile_rules(rules)
    graphdef, state = nnx.split(model)
    _check_data_driven_leaves(state, compiled)
    n_layers = len(model.layers)
    logs: list[LayerLog] = []

    fp = _fingerprint(tokens, rules, f"{model_id}|{batch_size}|{n_layers}")
    done = -1
    if work_dir is not None:
        os.makedirs(os.path.join(work_dir, "blocks"), exist_ok=True)
        prog_path = os.path.join(work_dir, "progress.json")
        if os.path.isfile(prog_path):
            with open(prog_path) as fh:
                prog = json.load(fh)
            if prog.get("fingerprint") != fp:
                raise CheckpointError(f"{work_dir}: holds an unfinished job with other arguments (model, rules, "
                                      "calibration tokens or batch size); use another work_dir or delete it")
            done = int(prog["done"])
            logs = [LayerLog(**e) for e in prog.get("logs", [])]

    # Block functions, jitted once per block structure.
    block_gd = nnx.split(model.layers[0])[0]

    @jax.jit
    def run_block(bstate, h):
        return nnx.merge(block_gd, bstate)(h)[0]

    stat_fns = {}

    def stat_fn(name: str, names: tuple[str, ...]):
        """Jitted ``(block state, hidden, stats) -> stats`` folding one batch of ``name``'s input."""
        if (name, names) not in stat_fns:
            coll = Collector(names)

            @jax.jit
            def f(bstate, h, st):
                _, inputs = nnx.merge(block_gd, bstate).forward_with_inputs(h)
                return coll.update(st, inputs[name])

            stat_fns[(name, names)] = f
        return stat_fns[(name, names)]

    @jax.jit
    def embed(t):
        return nnx.merge(graphdef, state).embed(t)

    batches = [slice(i, i + batch_size) for i in range(0, len(tokens), batch_size)]
    hidden_path = os.path.join(work_dir, "hidden.npy") if work_dir else None
    if done >= 0:
        h_all = np.load(hidden_path)
    else:
        h_all = np.concatenate([np.asarray(embed(jnp.asarray(tokens[b]))) for b in batches])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_layers, initial=done + 1, desc="calibrate", unit="block", disable=None)
    block_states = {}
    for i in range(n_layers):
        prefix = f"layers/{i}/"
        if i <= done:  # finished before: take its saved parameters
            bst_saved = checkpoint.restore(os.path.join(work_dir, "blocks", f"{i:03d}"),
                                           target=nnx.split(model.layers[i])[1])
            block_states[i] = bst_saved
            continue
        t_block = time.perf_counter()
        _, bstate = nnx.split(model.layers[i])

        def collect(bstate, leader: str, names) -> dict:
            """The statistics ``names`` of ``leader``'s input over the calibration set (one pass)."""
            names = tuple(sorted(set(names)))
            coll = Collector(names)
            st = coll.init(_leaf(bstate, f"{leader}/kernel").shape[0])
            f = stat_fn(leader, names)
            for b in batches:
                st = f(bstate, jnp.asarray(h_all[b]), st)
            stats = coll.finalize(st)
            for k, v in stats.items():
                if not bool(jnp.all(jnp.isfinite(v))):
                    raise NonFiniteError(at(f"{prefix}{leader}", f"calibration statistic {k!r} holds NaN/Inf "
                                                                 "(NaN/Inf in the calibration activations)"))
            return stats

        block_specs = {}
        for group in SEQUENTIAL_GROUPS:
            for name in group:
                _, spec = match(f"{prefix}{name}/kernel", compiled)
                if spec is not None:
                    block_specs[name] = spec
        prepared = {}  # block-level transforms (AWQ's scales) on the float block, before any quantization
        for mname in sorted({sp.method for sp in block_specs.values()}):
            m = registry.get(mname)
            if m.prepare is not None:
                bstate, pinfo = m.prepare(bstate, BLOCK_STRUCTURE, block_specs, collect, _replace, _leaf,
                                          prefix=prefix)
                for names, _ in BLOCK_STRUCTURE:
                    if names[0] in pinfo:
                        for n in names:
                            prepared[n] = {f"{mname}": pinfo[names[0]]}
        for group in SEQUENTIAL_GROUPS:
            specs = {n: block_specs[n] for n in group if n in block_specs}
            if not specs:
                continue
            needed = tuple(sorted({n for sp in specs.values() for n in registry.get(sp.method).stats_for(sp)}))
            stats = collect(bstate, group[0], needed) if needed else {}
            H = stats.get("hessian")
            new = {}
            for name, spec in specs.items():
                path = f"{prefix}{name}/kernel"
                w = _leaf(bstate, f"{name}/kernel")
                t0 = time.perf_counter()
                entry = LayerLog(path=path, method=spec.method, seconds=0.0)
                qt, info = registry.quantize_weight(w, spec, stats, path=path, prepared=True)
                entry.loss, entry.damp = info.get("loss"), info.get("damp")
                entry.extra = prepared.get(name)
                jax.block_until_ready(qt.codes)
                entry.seconds = time.perf_counter() - t0
                if H is not None:
                    entry.recon = gptq.reconstruction_error(w, qt, H)
                    # RTN on the same grid as the baseline, where RTN can take the format and the
                    # weight is the original one (after AWQ's folding it is not: its own search
                    # losses, in ``extra``, compare with RTN instead).
                    transformed = any(isinstance(v, dict) for v in (prepared.get(name) or {}).values())
                    if spec.format in registry.get("rtn").formats and not transformed:
                        rspec = dataclasses.replace(spec, method="rtn", options=())
                        entry.recon_rtn = gptq.reconstruction_error(w, rtn.quantize(w, rspec, path=path), H)
                new[f"{name}/kernel"] = qt
                logs.append(entry)
                if on_layer is not None:
                    on_layer(entry)
            bstate = _replace(bstate, new)
        # Push the quantized block's outputs forward.
        h_all = np.concatenate([np.asarray(run_block(bstate, jnp.asarray(h_all[b]))) for b in batches])
        if not np.all(np.isfinite(h_all)):
            raise NonFiniteError(f"{prefix[:-1]}: block outputs hold NaN/Inf after quantization")
        block_states[i] = bstate
        if work_dir is not None:
            checkpoint.save(os.path.join(work_dir, "blocks", f"{i:03d}"), bstate, overwrite=True)
            write_npy(hidden_path, h_all)
            write_json(prog_path, {"fingerprint": fp, "done": i,
                                           "logs": [dataclasses.asdict(e) for e in logs]})
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
    return out, logs


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


def self_generated_tokens(model, *, n: int, seq_len: int, seed: int = 0, batch_size: int = 32,
                          temperature: float = 1.0, first_id: int = 0, progress: bool = False) -> np.ndarray:
    """``n`` windows of text the float model writes itself, ``(n, seq_len)`` int32.

    Each window starts from one token drawn uniformly from ``[first_id, vocab)`` (pass the
    number of special tokens so none starts a window) and continues by sampling at
    ``temperature``: text from the model's own distribution, not from one domain, in the
    spirit of LLM-QAT's data-free calibration (arXiv:2305.17888). Deterministic given ``seed``.
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
        toks = generate(model, prompt, seq_len - 1, key=jax.random.key(seed * 100003 + b), temperature=temperature)
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
    ``pydoc`` only the calibration part is used; its tail is held out for evaluation.
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
        return self_generated_tokens(model, n=n, seq_len=seq_len, seed=seed, first_id=first, progress=progress)
    src = data.load_text(text)
    if text == "pydoc":
        src = data.split_text(src)[0]  # the tail is held out for evaluation
    toks = data.tokenize(tokenizer, src, vocab_size)
    return data.calibration_windows(toks, n, seq_len, seed)
