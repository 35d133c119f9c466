"""QuaRot: random Hadamard rotations fused into the weights make 4-bit activations work.
The same W4A4 quantizers (RTN weights per channel, every linear's input 4-bit per token)
with and without the rotations, measured by perplexity and KL to the float model.

    python examples/05_rotations_w4a4.py
"""
import argparse

from flax import nnx
from jax.tree_util import Partial

import jquant as jq
from jquant import data, evaluate, models
from jquant.activations import ActQuantSpec, set_quantizers
from jquant.rotations import RotationSpec, rotate


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default="fortunes")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--windows", type=int, default=4)
    a = ap.parse_args(argv)

    model, config, tok = models.load(a.model)
    tokens = data.tokenize(tok, data.load_text(a.text), config.vocab_size)
    linears = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
    w4 = [(linears, jq.QuantSpec(bits=4, granularity="channel", symmetric=True))]
    a4 = [(linears, ActQuantSpec(bits=4, symmetric=True, clip_ratio=0.9))]

    def logits_of(m):
        gd, st = nnx.split(m)
        return Partial(lambda st, t: nnx.merge(gd, st)(t)[0], st)

    ref = logits_of(model)
    for name, rotation in (("W4A4", None), ("QuaRot W4A4", RotationSpec(kind="hadamard", online=("mlp/down_proj",)))):
        m = model
        if rotation is not None:  # R1 (residual), R2 (value heads), online R4 before down_proj
            m, notes = rotate(m, rotation)
            print("\n".join(f"  note: {n}" for n in notes))
        gd, st = nnx.split(m)
        m = nnx.merge(gd, jq.quantize_tree(st, w4))  # weights after rotating
        m, placed = set_quantizers(m, a4)  # activations quantized at every linear's input
        cmp = evaluate.compare(ref, logits_of(m), tokens, seq_len=a.seq_len, batch_size=2, max_windows=a.windows)
        print(f"{name:<12} on {len(placed)} linears: perplexity {cmp.quant.ppl:.2f} (float {cmp.ref.ppl:.2f}), "
              f"KL {cmp.agreement.kl:.4f}, top-1 agreement {100 * cmp.agreement.top1:.1f}%")


if __name__ == "__main__":
    main()
