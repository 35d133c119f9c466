"""Export a quantized model for other tools and read each export back: compressed-tensors
(vLLM, transformers), GPTQ (GPTQModel, vLLM) and GGUF (llama.cpp, with k-quants). Each
export is loaded again with jquant and must give the logits of the model that was saved.

    python examples/07_export.py --out exports/
"""
import argparse
import os

import jax
import numpy as np
from flax import nnx

import jquant as jq
from jquant import models
from jquant.interop import save_quantized
from jquant.interop.gguf import save_gguf


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True, help="directory for the exports")
    a = ap.parse_args(argv)

    model, config, tok = models.load(a.model)
    src = str(models.resolve_model(a.model))
    graphdef, state = nnx.split(model)
    linears = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)/kernel$"
    int4 = jq.QuantSpec(bits=4, group_size=32, symmetric=False)  # integer zero points: every format holds it
    q4k = jq.QuantSpec(method="kquant", format="q4_k", options={"fallback": True})  # GGUF k-quant blocks
    tokens = np.asarray(tok("Exports that other tools load.")["input_ids"], np.int32)[None]
    logits = jax.jit(lambda gd, st, t: nnx.merge(gd, st)(t)[0], static_argnums=0)

    for fmt, spec in (("compressed-tensors", int4), ("gptq", int4), ("gguf", q4k)):
        qmodel = nnx.merge(graphdef, jq.quantize_tree(state, [(linears, spec)]))
        path = os.path.join(a.out, f"model-{fmt}" + (".gguf" if fmt == "gguf" else ""))
        if fmt == "gguf":
            rep = save_gguf(qmodel, config, path, source=src if src.endswith(".gguf") else None, tokenizer=tok,
                            overwrite=True)
        else:
            rep = save_quantized(qmodel, config, path, fmt, tok, overwrite=True)
        back, _, _ = models.load(path)  # jquant reads its own exports as QTensors
        x, y = (np.asarray(logits(*nnx.split(m), tokens)) for m in (qmodel, back))
        print(f"{fmt:<19} {rep['bytes'] / 2**20:8.1f} MiB  {path}\n{'':<19} read back: max |logit diff| "
              f"{np.abs(x - y).max():.2e}, same next tokens {bool((x.argmax(-1) == y.argmax(-1)).all())}")


if __name__ == "__main__":
    main()
