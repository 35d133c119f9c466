"""Fuzzing model files: tiny valid seeds, mutations, and a worker that loads each input under a
memory limit and a time limit.

Used by ``tests/models/test_fuzz_files.py`` (a short slice driven by hypothesis) and by
``benchmarks/fuzz.py`` (the long run). Three formats:

- ``gguf``: a tiny llama (F32) and a tiny tied qwen2 (Q4_1) GGUF, loaded with ``load_gguf``;
- ``safetensors``: a directory with ``config.json`` + ``model.safetensors``, loaded with ``load_hf``;
- ``recipe``: the YAML recipes of ``configs/``, loaded with ``load_recipe``;
- ``orbax``: checkpoints of ``jquant.save`` (QTensors of several kinds, float32 and bfloat16
  arrays), restored with ``jquant.restore``; a restore that succeeds must give exactly the saved
  values (else ``wrong``: a silently wrong result).

Every outcome is classified: ``ok`` (loaded, and the result passes its invariants), ``error``
(a ``jquant.errors`` error), ``wrong`` (loaded without error but not the saved values),
``crash`` (any other exception; ``memory`` for ``MemoryError``),
``hang`` (over the per-input time limit), ``died`` (the worker process was killed, e.g. by a
signal). Only ``ok`` and ``error`` are acceptable.

Mutations are written against a tiny ``Draw`` interface (``int(lo, hi)``, ``pick(seq)``) so
that hypothesis (``st.data()``) and a seeded ``numpy`` generator can drive the same code.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import shutil
import struct
import time
import traceback
from pathlib import Path

import numpy as np

FORMATS = ("gguf", "safetensors", "recipe", "orbax")
REPO = Path(__file__).resolve().parents[2]
INTERESTING = (0, 1, 2, 3, 7, 8, 31, 32, 255, 256, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40,
               2**60, 2**62, 2**63 - 1, 2**64 - 1)
MEMORY_LIMIT = 3 << 30  # address space the worker may add to what it holds after its warm-up
TIME_LIMIT = 20.0  # seconds per input (a tiny model loads in well under a second)


# -- drawing ------------------------------------------------------------------------------------

class RngDraw:
    """The ``Draw`` interface over a ``numpy.random.Generator``."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def int(self, lo: int, hi: int) -> int:
        """An integer in ``lo..hi`` (inclusive)."""
        return int(self.rng.integers(lo, hi + 1)) if hi > lo else lo

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]


class HypothesisDraw:
    """The ``Draw`` interface over hypothesis' ``st.data()``."""

    def __init__(self, data):
        from hypothesis import strategies as st

        self.data, self.st = data, st

    def int(self, lo: int, hi: int) -> int:
        return self.data.draw(self.st.integers(lo, max(lo, hi)))

    def pick(self, seq):
        return self.data.draw(self.st.sampled_from(list(seq)))


# -- seeds ---------------------------------------------------------------------------------------

def tiny_state(*, layers=1, hidden=32, heads=2, kv_heads=1, inter=64, vocab=64, bias=False, tie=False, seed=0):
    """A Hugging Face state dict of small random float32 arrays, and its ``cfg`` for ``write_gguf_state``."""
    rng = np.random.default_rng(seed)
    hd = hidden // heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
    if not tie:
        shapes["lm_head.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
                       p + "self_attn.q_proj.weight": (heads * hd, hidden),
                       p + "self_attn.k_proj.weight": (kv_heads * hd, hidden),
                       p + "self_attn.v_proj.weight": (kv_heads * hd, hidden),
                       p + "self_attn.o_proj.weight": (hidden, heads * hd), p + "mlp.gate_proj.weight": (inter, hidden),
                       p + "mlp.up_proj.weight": (inter, hidden), p + "mlp.down_proj.weight": (hidden, inter)})
        if bias:
            for n, rows in (("q", heads * hd), ("k", kv_heads * hd), ("v", kv_heads * hd)):
                shapes[p + f"self_attn.{n}_proj.bias"] = (rows,)
    sd = {k: (0.1 * rng.standard_normal(s)).astype(np.float32) for k, s in shapes.items()}
    cfg = dict(layers=layers, heads=heads, kv_heads=kv_heads, hidden=hidden, intermediate=inter, vocab=vocab,
               context=128, eps=1e-5, tie=tie, rope_theta=10000.0)
    return sd, cfg


def make_seeds(root: Path) -> dict[str, list[Path]]:
    """Valid tiny inputs of each format under ``root``: ``.gguf`` files, HF directories, YAML recipes."""
    from gguf_writer import write_gguf_state
    from safetensors.numpy import save_file

    from jquant.models import LlamaConfig

    root.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, list[Path]] = {f: [] for f in FORMATS}
    for name, arch, qtype, kw in (("llama_f32", "llama", "F32", {}),
                                  ("qwen2_q4_1", "qwen2", "Q4_1", dict(bias=True, tie=True))):
        sd, cfg = tiny_state(**kw)
        f = root / f"{name}.gguf"
        write_gguf_state(f, sd, cfg, arch=arch, qtype=qtype)
        seeds["gguf"].append(f)
    for name, kind, kw in (("llama", "llama", dict(kv_heads=1)), ("qwen2", "qwen2", dict(bias=True, tie=True))):
        sd, cfg = tiny_state(**kw)
        d = root / f"hf_{name}"
        d.mkdir(exist_ok=True)
        config = LlamaConfig(vocab_size=cfg["vocab"], hidden_size=cfg["hidden"], intermediate_size=cfg["intermediate"],
                             num_hidden_layers=cfg["layers"], num_attention_heads=cfg["heads"],
                             num_key_value_heads=cfg["kv_heads"], tie_word_embeddings=cfg["tie"], model_type=kind,
                             attention_bias=kind == "qwen2")
        (d / "config.json").write_text(json.dumps(config.to_hf_dict(), indent=2))
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
        seeds["safetensors"].append(d)
    seeds["recipe"] = sorted((REPO / "configs").glob("*.yaml"))
    seeds["orbax"] = orbax_seeds(root)
    return seeds


def orbax_seeds(root: Path) -> list[Path]:
    """Two ``jquant.save`` checkpoints, each with ``<name>.expected.npz`` beside it: every leaf's
    values (QTensors dequantized) and metadata, what a correct restore must give."""
    import jax.numpy as jnp

    import jquant as jq
    from jquant.qtensor import is_qtensor

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(0, 1, (256, 64)), jnp.float32)
    x = jnp.asarray(rng.normal(0, 1, (64, 256)) * np.where(rng.random(256) < 0.05, 30.0, 1.0), jnp.float32)
    from jquant.quantizers import collect

    stats = collect(["hessian", "act_abs_max"], [x])
    trees = {
        "ck_int": {"a": jq.quantize(w, jq.QuantSpec(bits=4, group_size=32, symmetric=False)),
                   "b": jq.quantize(w, jq.QuantSpec(bits=8, granularity="channel")),
                   "norm": jnp.ones((64,), jnp.bfloat16), "emb": w[:16].astype(jnp.float32)},
        "ck_mixed": {"gptq": jq.quantize(w, jq.QuantSpec(method="gptq", bits=3, group_size=64,
                                                         options={"act_order": True}), stats),
                     "q4k": jq.quantize(w, jq.QuantSpec(method="kquant", format="q4_k")),
                     "nf4": jq.quantize(w, jq.QuantSpec(format="nf4", group_size=64)),
                     "outliers": jq.quantize(w, jq.QuantSpec(method="outliers", bits=4, group_size=32,
                                                             options={"threshold": 6.0}), stats)},
    }
    out = []
    for name, tree in trees.items():
        d = root / name
        jq.save(d, tree, overwrite=True)
        expect = {}
        for k, v in tree.items():
            expect[k] = np.asarray(v.dequantize(jnp.float32) if is_qtensor(v) else v.astype(jnp.float32))
            expect[k + ".meta"] = np.asarray(_meta(v))
        np.savez(root / f"{name}.expected.npz", **expect)
        out.append(d)
    return out


def _meta(v) -> str:
    from jquant.qtensor import is_qtensor

    if is_qtensor(v):
        return repr((v.shape, v.dtype, v.grid, v.granularity, v.group_size, v.axis, v.method))
    return repr((tuple(v.shape), str(v.dtype)))


# -- mutations --------------------------------------------------------------------------------------

def _bytes_mutation(data: bytes, draw, header_end: int, fields=()) -> bytes:
    """One byte-level mutation, most of them in the first ``header_end`` bytes."""
    b = bytearray(data)
    n = len(b)
    if not n:
        return bytes(draw.int(0, 255) for _ in range(draw.int(1, 16)))
    hi = max(0, min(n, header_end) - 1) if draw.int(0, 3) else n - 1
    kind = draw.pick(("flip", "byte", "truncate", "insert", "delete", "word", "word", "field", "field", "swap"))
    if kind == "field" and fields:  # count inflation: rewrite a declared count / length / offset
        pos, fmt = draw.pick(fields)
        width = struct.calcsize(fmt)
        if pos + width > n:  # an earlier mutation cut the file
            return bytes(b[:draw.int(0, n)])
        v = draw.pick(INTERESTING) % (1 << (8 * width))
        if draw.int(0, 3) == 0:  # near the original value
            v = (struct.unpack_from(fmt, b, pos)[0] + draw.int(-3, 3)) % (1 << (8 * width))
        struct.pack_into(fmt, b, pos, v)
        return bytes(b)
    pos = draw.int(0, hi)
    if kind == "flip":
        b[pos] ^= 1 << draw.int(0, 7)
    elif kind == "byte":
        b[pos] = draw.int(0, 255)
    elif kind == "truncate":
        del b[pos:]
    elif kind == "insert":
        b[pos:pos] = bytes(draw.int(0, 255) for _ in range(draw.int(1, 16)))
    elif kind == "delete":
        del b[pos:pos + draw.int(1, 64)]
    elif kind in ("word", "field"):
        width = draw.pick((4, 8))
        if pos + width <= n:
            b[pos:pos + width] = (draw.pick(INTERESTING) % (1 << (8 * width))).to_bytes(width, "little")
    else:  # swap two chunks
        q, k = draw.int(0, n - 1), draw.int(1, 32)
        b[pos:pos + k], b[q:q + k] = b[q:q + k], b[pos:pos + k]
    return bytes(b)


def gguf_fields(path: Path) -> tuple[int, list[tuple[int, str]]]:
    """``(end of the header, [(offset, struct format) of every count, length, type and offset])``."""
    from jquant.models._gguf_file import GGUFFile

    class Tracing(GGUFFile):
        def _unpack(self, fmt, what):
            trace.append((self._pos, fmt))
            return super()._unpack(fmt, what)

    trace: list[tuple[int, str]] = []
    g = Tracing(path)
    return (min(t.offset for t in g.tensors) if g.tensors else g.size), trace


JSON_VALUES = (0, -1, 1, 3, 1.5, -0.0, 1e308, float("nan"), 2**31 - 1, 2**31, 2**63, 10**30, True, False, None,
               "", "x", "64", "false", [], [1, 2], {}, {"a": 1}, "F32", "I32", "BOOL", "BF16", "F64", "U8")


def _json_edit(obj, draw):
    """Replace (or delete) one value somewhere in a JSON-like tree; return the tree."""
    def paths(o, prefix=()):
        yield prefix
        if isinstance(o, dict):
            for k, v in o.items():
                yield from paths(v, prefix + (k,))
        elif isinstance(o, list):
            for i, v in enumerate(o):
                yield from paths(v, prefix + (i,))

    every = list(paths(obj))
    target = draw.pick(every[1:] or every)
    if not target:
        return draw.pick(JSON_VALUES)
    parent = obj
    for k in target[:-1]:
        parent = parent[k]
    last = target[-1]
    if isinstance(parent, dict) and draw.int(0, 5) == 0:
        del parent[last]
    elif isinstance(parent[last], int) and not isinstance(parent[last], bool) and draw.int(0, 1):
        parent[last] = parent[last] + draw.int(-3, 3)  # off by a little: overlaps, shape mismatches
    else:
        parent[last] = draw.pick(JSON_VALUES)
    return obj


def _safetensors_header_edit(data: bytes, draw) -> bytes:
    n = struct.unpack_from("<Q", data)[0]
    header = _json_edit(json.loads(data[8:8 + n]), draw)
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


YAML_SNIPPETS = (
    "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
    "name: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nrules: [*f, *f, *f, *f, *f, *f, *f, *f, *f]\n",
    "rules: " + "[" * 1000 + "]" * 1000 + "\n",
    "rules: !!python/object/apply:os.system ['echo pwned']\n",
    "rules:\n  - pattern: '(((('\n    spec: {bits: 4}\n",
    "rules:\n  - pattern: 'x'\n    spec: {bits: .inf, group_size: .nan}\n",
    "rules:\n  - pattern: 'x'\n    spec: {bits: 99999999999999999999999, group_size: -1}\n",
    "\xff\xfe\x00rules: []\n",
)


def _yaml_mutation(text: bytes, draw) -> bytes:
    import yaml

    kind = draw.int(0, 9)
    if kind == 0:
        return draw.pick(YAML_SNIPPETS).encode("utf-8", "surrogateescape")
    if kind <= 4 and b"*" not in text and len(text) < 20_000:  # (aliases may expand to millions of values)
        try:
            doc = yaml.safe_load(text)
        except Exception:
            doc = None
        if isinstance(doc, (dict, list)):
            doc = _json_edit(doc, draw)
            return yaml.safe_dump(doc).encode()
    return _bytes_mutation(text, draw, len(text))


def mutate(fmt: str, seed: Path, out: Path, draw, fields_cache: dict) -> Path:
    """Write one mutated copy of ``seed`` (1 to 3 mutations) at ``out``; return the path to load."""
    steps = draw.int(1, 3)
    if fmt == "gguf":
        if seed not in fields_cache:
            fields_cache[seed] = gguf_fields(seed)
        header_end, fields = fields_cache[seed]
        data = seed.read_bytes()
        for _ in range(steps):
            data = _bytes_mutation(data, draw, header_end, fields)
        out.write_bytes(data)
        return out
    if fmt == "safetensors":
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(seed, out)
        for _ in range(steps):
            which = draw.int(0, 3)
            if which == 0:  # config.json
                cfg = out / "config.json"
                text = cfg.read_bytes()
                try:
                    edited = json.dumps(_json_edit(json.loads(text), draw)).encode() if draw.int(0, 2) else None
                except ValueError:  # an earlier mutation broke the JSON
                    edited = None
                cfg.write_bytes(edited if edited is not None else _bytes_mutation(text, draw, len(text)))
            else:
                st = out / "model.safetensors"
                data = st.read_bytes()
                hlen = 8 + struct.unpack_from("<Q", data)[0] if len(data) >= 8 else len(data)
                try:
                    data = _safetensors_header_edit(data, draw) if which == 1 else _bytes_mutation(data, draw, hlen)
                except (ValueError, struct.error):  # an earlier mutation broke the header
                    data = _bytes_mutation(data, draw, hlen)
                st.write_bytes(data)
        return out
    if fmt == "orbax":
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(seed, out)
        shutil.copy(seed.parent / f"{seed.name}.expected.npz", out.parent / f"{out.name}.expected.npz")
        files = sorted(p for p in out.rglob("*") if p.is_file())
        for _ in range(steps):
            f = draw.pick(files)
            if not f.exists():
                continue
            kind = draw.int(0, 9)
            if kind == 0:  # a file lost
                f.unlink()
                continue
            data = f.read_bytes()
            if kind <= 3 and data[:1] in (b"{", b"["):  # a JSON file's values edited
                try:
                    f.write_bytes(json.dumps(_json_edit(json.loads(data), draw)).encode())
                    continue
                except ValueError:
                    pass
            f.write_bytes(_bytes_mutation(data, draw, len(data)))
        return out
    text = seed.read_bytes()
    for _ in range(steps):
        text = _yaml_mutation(text, draw)
    out.write_bytes(text)
    return out


# -- loading and classifying --------------------------------------------------------------------------

def _load(fmt: str, path: str) -> str:
    """Load one input; return ``"ok"`` or raise. ``ok`` results are checked for invariants."""
    import jax

    if fmt == "orbax":
        import jquant as jq
        from jquant.qtensor import is_qtensor

        tree = jq.restore(path)
        with np.load(f"{path}.expected.npz") as f:
            expect = dict(f)
        keys = sorted(k for k in expect if not k.endswith(".meta"))
        if not isinstance(tree, dict) or sorted(tree) != keys:
            raise WrongResult(f"restored leaves {sorted(tree) if isinstance(tree, dict) else type(tree)} != {keys}")
        for k in keys:
            v = tree[k]
            got = np.asarray(v.dequantize(jax.numpy.float32) if is_qtensor(v) else v.astype(np.float32))
            if _meta(v) != str(expect[k + ".meta"]) or got.shape != expect[k].shape or not np.array_equal(
                    got, expect[k], equal_nan=True):
                raise WrongResult(f"leaf {k!r} restored without error but differs from what was saved")
        return "ok"
    if fmt == "recipe":
        from jquant.recipes import Recipe, load_recipe
        from jquant.spec import QuantSpec

        r = load_recipe(path)
        assert isinstance(r, Recipe) and isinstance(r.name, str) and isinstance(r.description, str)
        assert all(isinstance(p, str) and (s is None or isinstance(s, QuantSpec)) for p, s in r.rules)
        return "ok"
    from flax import nnx

    from jquant.models import LlamaConfig, load_gguf, load_hf

    model, config = load_gguf(path, tokenizer=False)[:2] if fmt == "gguf" else load_hf(path)
    assert isinstance(config, LlamaConfig)
    for _, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Param):
            a = np.asarray(jax.device_get(v.get_value()))
            assert a.dtype == np.float32 and np.isfinite(a).all(), "a loaded parameter is not finite float32"
    return "ok"


class WrongResult(Exception):
    """A load that succeeded with values other than the saved ones."""


def classify(fmt: str, path: str) -> tuple[str, str]:
    """``(outcome, detail)`` of loading one input in this process."""
    from jquant.errors import JQuantError

    try:
        return _load(fmt, path), ""
    except JQuantError as e:
        return "error", type(e).__name__
    except WrongResult as e:
        return "wrong", str(e)
    except MemoryError:
        return "memory", traceback.format_exc(limit=-3)
    except BaseException as e:  # noqa: BLE001 — anything else is a finding
        if isinstance(e, KeyboardInterrupt):
            raise
        return "crash", "".join(traceback.format_exception(e, limit=-4))[-1500:]


def _worker(conn, memory_limit: int) -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jquant.models  # noqa: F401  (the warm-up: imports and first compilations before the limit)

    if memory_limit:
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        resource.setrlimit(resource.RLIMIT_AS, (used + memory_limit, hard))
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            return
        fmt, path = msg
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        outcome, detail = classify(fmt, path)
        grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024
        if grew > memory_limit // 2 and outcome in ("ok", "error"):
            outcome, detail = "memory", f"peak memory grew by {grew >> 20} MiB ({outcome} {detail})"
        conn.send((outcome, detail))


class Worker:
    """A subprocess that loads inputs one at a time under ``RLIMIT_AS`` and a per-input time limit;
    restarted after a hang or a death."""

    def __init__(self, memory_limit: int = MEMORY_LIMIT, time_limit: float = TIME_LIMIT):
        self.memory_limit, self.time_limit = memory_limit, time_limit
        self.proc = None
        self.restarts = 0

    def _start(self):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, self.memory_limit), daemon=True)
        self.proc.start()
        if not self.conn.poll(300) or self.conn.recv() != "ready":
            raise RuntimeError("the fuzz worker did not start")

    def run(self, fmt: str, path: Path) -> tuple[str, str, float]:
        """``(outcome, detail, seconds)`` of loading ``path`` as ``fmt``."""
        if self.proc is None or not self.proc.is_alive():
            self._start()
        t = time.perf_counter()
        self.conn.send((fmt, str(path)))
        try:
            if self.conn.poll(self.time_limit):
                outcome, detail = self.conn.recv()
                return outcome, detail, time.perf_counter() - t
            outcome, detail = "hang", f"no answer within {self.time_limit} s"
        except (EOFError, OSError):
            outcome, detail = "died", f"worker exit code {self.proc.exitcode}"
        self.close(kill=True)
        self.restarts += 1
        return outcome, detail, time.perf_counter() - t

    def close(self, kill: bool = False):
        if self.proc is None:
            return
        if not kill and self.proc.is_alive():
            try:
                self.conn.send(None)
                self.proc.join(10)
            except OSError:
                pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(10)
        self.proc = None
