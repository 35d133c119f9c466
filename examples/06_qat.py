"""Quantization-aware training with Optax: W2 g32 kernels with learned step sizes and zero
points (LSQ+), distilled from the float model's logits, from the RTN starting point; the
result is packed QTensors holding exactly the values the training used.

    python examples/06_qat.py --steps 60 --work-dir /tmp/qat   # resumes when run again
"""
import argparse

from flax import nnx
from jax.tree_util import Partial

import jquant as jq
from jquant import data, evaluate, models, qat


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--train-text", default="pydoc", help="training text")
    ap.add_argument("--eval-text", default="fortunes", help="evaluation text of another domain")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--windows", type=int, default=64, help="training windows")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--work-dir", default=None, help="checkpoints (a killed run resumes from here)")
    a = ap.parse_args(argv)

    model, config, tok = models.load(a.model)
    train_toks = data.tokenize(tok, data.split_text(data.load_text(a.train_text))[0], config.vocab_size)
    windows = data.calibration_windows(train_toks, a.windows, a.seq_len)
    rules = [(r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$",
              jq.QuantSpec(bits=a.bits, group_size=a.group_size, symmetric=False))]
    cfg = qat.QATConfig(steps=a.steps, learning_rate=1e-5, scale_learning_rate=1e-3, batch_size=4,
                        warmup_steps=max(1, a.steps // 10), objective="kl", checkpoint_every=20)
    res = qat.train(model, windows, rules, cfg, work_dir=a.work_dir, progress=True)
    print(f"QAT: loss {res.losses[0]:.3f} -> {res.losses[-1]:.3f} in {len(res.losses)} steps, "
          f"{res.tokens_per_second:.0f} tokens/s")

    graphdef, state = nnx.split(model)
    rtn = jq.quantize_tree(state, rules)
    eval_toks = data.tokenize(tok, data.load_text(a.eval_text), config.vocab_size)
    for name, st in (("float", state), (f"RTN W{a.bits} g{a.group_size}", rtn), ("QAT", res.state)):
        logits = Partial(lambda st, t: nnx.merge(graphdef, st)(t)[0], st)
        r = evaluate.perplexity(logits, eval_toks, seq_len=a.seq_len, batch_size=2, max_windows=a.eval_windows)
        bits = jq.summary(st).quantized_bits_per_weight or 32.0
        print(f"{name:<12} perplexity on {a.eval_text}: {r.ppl:.3f}  ({bits:.3f} bits/weight on the linears)")


if __name__ == "__main__":
    main()
