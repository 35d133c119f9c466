"""Quantize a Hugging Face or GGUF checkpoint with a shipped recipe, measure perplexity
before and after on text of another domain, and generate with the packed model.

    python examples/02_quantize_and_generate.py --model smollm2-135m --recipe rtn_w4_g64
"""
import argparse

import numpy as np
from flax import nnx
from jax.tree_util import Partial

import jquant as jq
from jquant import data, evaluate, models, recipes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="HF directory, .gguf file or shipped model name")
    ap.add_argument("--recipe", default="rtn_w4_g64", help="a data-free recipe (see `jquant recipes`)")
    ap.add_argument("--text", default="fortunes", help="evaluation text: fortunes, licenses, or a file")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--prompt", default="The best way to learn a new language is")
    ap.add_argument("--new-tokens", type=int, default=24)
    a = ap.parse_args(argv)

    model, config, tok = models.load(a.model)
    recipe = recipes.load_recipe(a.recipe)
    graphdef, state = nnx.split(model)
    qstate = jq.quantize_tree(state, recipe.rules)  # a tree of QTensors where the rules say
    qmodel = nnx.merge(graphdef, qstate)
    f, q = jq.summary(state), jq.summary(qstate)
    print(f"{a.recipe}: {f.nbytes / 2**20:.1f} MiB -> {q.nbytes / 2**20:.1f} MiB, "
          f"{q.quantized_bits_per_weight:.3f} bits/weight on {len(q.quantized)} quantized leaves")

    tokens = data.tokenize(tok, data.load_text(a.text), config.vocab_size)
    for name, st in (("float", state), (a.recipe, qstate)):  # parameters as arguments, not jit constants
        logits = Partial(lambda st, t: nnx.merge(graphdef, st)(t)[0], st)
        r = evaluate.perplexity(logits, tokens, seq_len=a.seq_len, batch_size=2, max_windows=a.windows)
        print(f"perplexity on {a.text} ({r.tokens} tokens), {name}: {r.ppl:.3f}")

    prompt = np.asarray(tok(a.prompt, add_special_tokens=False)["input_ids"], np.int32)
    for name, m in (("float", model), (a.recipe, qmodel)):  # greedy; the QTensors stay packed
        out = models.generate(m, prompt, a.new_tokens, eos_token_id=tok.eos_token_id)
        print(f"{name}: {tok.decode(np.asarray(out)[len(prompt):], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
