"""GPTQ calibrated on your own text file: the model's linears quantized block by block on
windows of the file's first 90%, perplexity measured on the held-out last 10% and on text
of another domain, against RTN on the same grid.

    python examples/03_calibrate_on_your_text.py --text my_corpus.txt --windows 32
"""
import argparse

from flax import nnx
from jax.tree_util import Partial

import jquant as jq
from jquant import calibrate, data, evaluate, models


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", required=True, help="a UTF-8 text file (or a directory of .txt files)")
    ap.add_argument("--other-text", default="fortunes", help="evaluation text of another domain")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--windows", type=int, default=32, help="calibration windows")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--eval-windows", type=int, default=4)
    ap.add_argument("--out", default=None, help="save the GPTQ parameters (Orbax) here")
    a = ap.parse_args(argv)

    model, config, tok = models.load(a.model)
    calib_text, held_out = data.split_text(data.load_text(a.text))
    calib = data.calibration_windows(data.tokenize(tok, calib_text, config.vocab_size), a.windows, a.seq_len)
    grid = dict(bits=a.bits, group_size=a.group_size, symmetric=False)
    linears = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
    rtn_rules = [(linears, jq.QuantSpec(**grid))]
    gptq_rules = [(linears, jq.QuantSpec(method="gptq", **grid, options={"act_order": True}))]

    graphdef, state = nnx.split(model)
    rtn = jq.quantize_tree(state, rtn_rules)
    gptq, logs = calibrate.quantize_model(model, calib, gptq_rules, batch_size=4, progress=True)
    worse = sum(e.recon > e.recon_rtn for e in logs)
    print(f"GPTQ on {len(calib)} windows of {a.seq_len} tokens: {len(logs)} linears, "
          f"{worse} with a larger reconstruction error than RTN")

    texts = {"held-out": data.tokenize(tok, held_out, config.vocab_size),
             a.other_text: data.tokenize(tok, data.load_text(a.other_text), config.vocab_size)}
    print(f"{'':<10}" + "".join(f"{t:>14}" for t in texts))
    for name, st in (("float", state), (f"RTN W{a.bits}", rtn), (f"GPTQ W{a.bits}", gptq)):
        logits = Partial(lambda st, t: nnx.merge(graphdef, st)(t)[0], st)
        ppl = [evaluate.perplexity(logits, toks, seq_len=a.seq_len, batch_size=2, max_windows=a.eval_windows).ppl
               for toks in texts.values()]
        print(f"{name:<10}" + "".join(f"{p:>14.3f}" for p in ppl))
    if a.out:
        jq.save(a.out, gptq, overwrite=True)  # restore: jq.restore(a.out, target=state) (see 04_orbax_mesh.py)
        print(f"saved to {a.out}")


if __name__ == "__main__":
    main()
